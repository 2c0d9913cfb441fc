"""Generic tests run over every entry of the shared optimizer table (tests/optim/table)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import lit_optim
import lit_optim.optim as lo
from lit_optim.optim import LitOptimizer, NonFiniteGradientError

from .table import all_specs

SPECS = all_specs()
IDS = [s.name for s in SPECS]


def by_inputs():
    for spec in SPECS:
        for i, kw in enumerate(spec.inputs):
            yield pytest.param(spec, kw, id=f"{spec.name}-{i}")


def make_params(dtype=torch.float64, zero_size=True, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (4,), (3, 2, 2, 2), (6, 3)]
    ps = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    if noncontig:
        ps[0] = torch.randn(4, 5, generator=g, dtype=torch.float64).to(dtype).t()
    if zero_size:
        ps.append(torch.zeros(0, 3, dtype=dtype))
    return [torch.nn.Parameter(p) for p in ps]


def grad_seq(params, n, seed=1, none_at=None):
    g = torch.Generator().manual_seed(seed)
    seq = []
    for t in range(n):
        gs = []
        for i, p in enumerate(params):
            if none_at is not None and (t, i) in none_at:
                gs.append(None)
            else:
                gs.append(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        seq.append(gs)
    return seq


def run_steps(spec, opt, params, seq):
    for gs in seq:
        for p, gr in zip(params, gs):
            p.grad = None if gr is None else gr.clone()
        spec.do_step(opt, params)


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


# ------------------------------------------------------------------------------------ meta


def test_every_exported_optimizer_has_a_table_entry():
    exported = {
        getattr(lo, n)
        for n in lo.__all__
        if inspect.isclass(getattr(lo, n))
        and issubclass(getattr(lo, n), torch.optim.Optimizer)
        and getattr(lo, n) is not LitOptimizer
    }
    covered = {s.cls for s in SPECS}
    missing = sorted(c.__name__ for c in exported - covered)
    assert not missing, f"optimizers without an entry in tests/optim/table: {missing}"
    for c in exported:
        assert getattr(lit_optim, c.__name__) is c, f"{c.__name__} is not re-exported as lit_optim.{c.__name__}"


def test_every_registered_lit_optim_class_is_exported():
    for name, info in lit_optim.OPTIMIZERS.items():
        if info.cls.__module__.startswith("lit_optim"):
            assert info.cls.__name__ in lo.__all__, f"registered {name} -> {info.cls.__name__} not in lit_optim.optim.__all__"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_docstring_names_paper_rule_and_hyperparameters(spec):
    doc = inspect.getdoc(spec.cls) or ""
    assert "Paper" in doc or "Papers" in doc, f"{spec.name}: docstring must name its paper"
    assert "Args:" in doc
    sig = inspect.signature(spec.cls.__init__)
    for pname, prm in sig.parameters.items():
        if pname in ("self", "params") or prm.kind in (prm.VAR_KEYWORD, prm.VAR_POSITIONAL):
            continue
        assert pname in doc, f"{spec.name}: hyperparameter {pname!r} is not explained in the docstring"


# ------------------------------------------------------------------------------------ errors


def _error_cases():
    for spec in SPECS:
        for i, e in enumerate(spec.errors):
            yield pytest.param(spec, e, id=f"{spec.name}-{i}")


@pytest.mark.parametrize("spec,err", list(_error_cases()))
def test_error_inputs(spec, err):
    params = make_params(torch.float32, zero_size=False)
    kwargs = {**spec.inputs[0], **err.kwargs}
    if err.at == "init":
        with pytest.raises(err.exc, match=err.match):
            spec.cls(params, **kwargs)
        return
    opt = spec.cls(params, **kwargs)
    with pytest.raises(err.exc, match=err.match):
        if err.step_fn is not None:
            err.step_fn(opt, params)
        else:
            for p in params:
                p.grad = torch.randn_like(p)
            spec.do_step(opt, params)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_sparse_and_complex_gradients_refused(spec):
    if not issubclass(spec.cls, LitOptimizer):
        pytest.skip("not a LitOptimizer")
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = spec.cls([p], **spec.inputs[0])
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse gradients"):
        spec.do_step(opt, [p])
    if spec.cls.supports_complex:
        return
    c = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    opt = spec.cls([c], **spec.inputs[0])
    c.grad = torch.randn_like(c)
    with pytest.raises(TypeError, match="complex"):
        spec.do_step(opt, [c])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_nonfinite_gradient_is_reported_and_not_applied(spec):
    params = make_params(torch.float32, zero_size=False)
    opt = spec.cls(params, **spec.inputs[0])
    run_steps(spec, opt, params, grad_seq(params, 1))
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="non-finite gradient"):
        spec.do_step(opt, params)
    for b, p in zip(before, params):
        assert torch.equal(b, p)
    opt2 = spec.cls(params, **{**spec.inputs[0], "nonfinite": "skip"})
    params[0].grad = torch.full_like(params[0], float("inf"))
    spec.do_step(opt2, params)
    assert opt2.skipped_steps == 1
    for b, p in zip(before, params):
        assert torch.equal(b, p)


# ------------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("noncontig", [False, True], ids=["contiguous", "noncontiguous"])
@pytest.mark.parametrize("spec,kw", list(by_inputs()))
def test_loss_goes_down(spec, kw, noncontig):
    torch.manual_seed(0)
    X = torch.randn(64, 6)
    W_true = torch.randn(5, 6)
    Y = X @ W_true.t() + 0.01 * torch.randn(64, 5)
    W = torch.nn.Parameter(torch.zeros(6, 5).t() if noncontig else torch.zeros(5, 6))
    assert W.is_contiguous() != noncontig
    b = torch.nn.Parameter(torch.zeros(5))
    params = [W, b]
    opt = spec.cls(params, **{"lr": spec.lr, **kw})

    def closure():
        opt.zero_grad()
        loss = ((X @ W.t() + b - Y) ** 2).mean()
        loss.backward()
        return loss

    with torch.no_grad():
        initial = ((X @ W.t() + b - Y) ** 2).mean().item()
    for _ in range(spec.steps):
        if spec.needs_closure:
            spec.do_step(opt, params, closure)
        else:
            closure()
            spec.do_step(opt, params)
    with torch.no_grad():
        final = ((X @ W.t() + b - Y) ** 2).mean().item()
    assert final < 0.5 * initial, f"{spec.name}{kw}: loss {initial:.4f} -> {final:.4f}"


@pytest.mark.parametrize("spec,kw", list(by_inputs()))
def test_foreach_matches_for_loop_float64(spec, kw):
    params = make_params(torch.float64)
    seq = grad_seq(params, 4, none_at={(1, 0), (2, 3)})
    results = []
    for foreach in (True, False):
        ps = clone_params(params)
        opt = spec.cls(ps, **{**kw, "foreach": foreach})
        run_steps(spec, opt, ps, seq)
        results.append(ps)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=spec.foreach_atol, rtol=0)


@pytest.mark.parametrize("spec,kw", list(by_inputs()))
def test_blocked_multi_tensor_path_matches(spec, kw):
    """Elementwise optimizers cut large tensors into cache-sized slices; results must not change."""
    if not getattr(spec.cls, "elementwise", False):
        pytest.skip("not elementwise")
    params = make_params(torch.float64, noncontig=True)
    seq = grad_seq(params, 3)
    results = []
    for block in (0, 7):
        ps = clone_params(params)
        opt = spec.cls(ps, **kw)
        opt.block_numel = block
        run_steps(spec, opt, ps, seq)
        results.append(ps)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)


@pytest.mark.parametrize("spec,kw", list(by_inputs()))
def test_state_dict_round_trip_continues_identically(spec, kw):
    params = make_params(torch.float64)
    seq = grad_seq(params, 6)
    opt = spec.cls(params, **kw)
    run_steps(spec, opt, params, seq[:3])
    saved = copy.deepcopy(opt.state_dict())
    ps2 = clone_params(params)
    opt2 = spec.cls(ps2, **kw)
    opt2.load_state_dict(saved)
    run_steps(spec, opt, params, seq[3:])
    run_steps(spec, opt2, ps2, seq[3:])
    for a, b in zip(params, ps2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_deepcopy(spec):
    params = make_params(torch.float64)
    seq = grad_seq(params, 4)
    opt = spec.cls(params, **spec.inputs[0])
    run_steps(spec, opt, params, seq[:2])
    opt_copy = copy.deepcopy(opt)
    ps2 = opt_copy.param_groups[0]["params"]
    ps2 = [p for g in opt_copy.param_groups for p in g["params"]]
    run_steps(spec, opt, params, seq[2:])
    run_steps(spec, opt_copy, ps2, seq[2:])
    for a, b in zip(params, ps2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_dtypes(spec):
    for dtype in spec.dtypes:
        params = make_params(dtype)
        before = [p.detach().clone() for p in params]
        opt = spec.cls(params, **spec.inputs[0])
        run_steps(spec, opt, params, grad_seq(params, 3))
        for p, b in zip(params, before):
            assert p.dtype == dtype
            assert torch.isfinite(p.float()).all()
        assert any(not torch.equal(p, b) for p, b in zip(params, before) if p.numel()), f"{dtype}: no update"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_lr_change_mid_run_is_honored(spec):
    if not spec.lr_zero_freezes:
        pytest.skip("lr=0 does not freeze this optimizer")
    params = make_params(torch.float64)
    seq = grad_seq(params, 4)
    opt = spec.cls(params, **spec.inputs[0])
    run_steps(spec, opt, params, seq[:2])
    for g in opt.param_groups:
        g["lr"] = 0.0
    frozen = [p.detach().clone() for p in params]
    run_steps(spec, opt, params, seq[2:3])
    for a, b in zip(params, frozen):
        assert torch.equal(a, b)
    # and a doubled lr gives a different step than the original lr
    for g, g0 in zip(opt.param_groups, spec.cls(make_params(), **spec.inputs[0]).param_groups):
        g["lr"] = 2 * g0["lr"]
    run_steps(spec, opt, params, seq[3:])
    assert any(not torch.equal(a, b) for a, b in zip(params, frozen) if a.numel())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_maximize_equals_minimizing_the_negation(spec):
    params = make_params(torch.float64)
    seq = grad_seq(params, 3)
    neg = [[None if g is None else -g for g in gs] for gs in seq]
    ps1, ps2 = clone_params(params), clone_params(params)
    run_steps(spec, spec.cls(ps1, **spec.inputs[0]), ps1, seq)
    run_steps(spec, spec.cls(ps2, **{**spec.inputs[0], "maximize": True}), ps2, neg)
    for a, b in zip(ps1, ps2):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_closure_loss_is_returned_and_none_grads_are_skipped(spec):
    params = make_params(torch.float64)
    opt = spec.cls(params, **spec.inputs[0])
    frozen = params[2].detach().clone()

    def closure():
        opt.zero_grad()
        loss = sum((p**2).sum() for i, p in enumerate(params) if i != 2)
        loss.backward()
        return loss

    if spec.step_fn is None:
        out = opt.step(closure)
        assert isinstance(out, torch.Tensor) and out.item() > 0
    else:
        spec.do_step(opt, params, closure)
    assert params[2].grad is None
    assert torch.equal(params[2], frozen)
    # state is created at construction (zeros, step 0) and left untouched by steps without a grad
    st = opt.state.get(params[2], {})
    fresh = spec.cls(make_params(torch.float64), **spec.inputs[0]).state
    fresh_st = fresh[list(fresh)[2]] if len(fresh) > 2 else {}
    assert st.get("step", 0) == 0
    assert sorted(st) == sorted(fresh_st)
    for k, v in st.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, fresh_st[k]), k


@pytest.mark.parametrize("spec", [s for s in SPECS if s.reference is not None], ids=lambda s: s.name)
def test_three_steps_match_hand_written_rule(spec):
    torch.manual_seed(3)
    kw = {**spec.inputs[0], **spec.reference_kwargs}
    p0 = torch.randn(spec.reference_shape, dtype=torch.float64)
    grads = [torch.randn(spec.reference_shape, dtype=torch.float64) for _ in range(3)]
    expected = spec.reference(p0, grads, kw)
    for foreach in (True, False):
        p = torch.nn.Parameter(p0.clone())
        opt = spec.cls([p], **{**kw, "foreach": foreach})
        run_steps(spec, opt, [p], [[g] for g in grads])
        torch.testing.assert_close(p.detach(), expected, atol=spec.reference_atol, rtol=0)
