"""The compiled (fused) update path, ``fused=True`` (lit_optim/optim/_compiled.py), on CPU.

Most tests trace with the ``aot_eager`` backend: torch.compile traces, guards and recompiles
exactly as with Inductor (the recompilation checks are meaningful), but runs the traced operations
one by one instead of compiling C++, which keeps this file fast. The tests taking the
``inductor`` fixture run
the real fused C++ kernels for three optimizers that cover every kind of scalar the updates use
(lerp weights, alpha/value scalars, bias corrections, Adan's first-step branch); the whole table
on Inductor is ``test_inductor_fused_matches_foreach_all`` (slow). The CUDA versions are in
``tests/cuda/``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import lit_optim
from lit_optim.optim import LitOptimizer, _compiled
from lit_optim.optim._compiled import FusedFallbackWarning

from .optim.table import all_specs

SPECS = [s for s in all_specs() if isinstance(s.cls, type) and issubclass(s.cls, LitOptimizer)]
ELEMENTWISE = [s for s in SPECS if s.cls.elementwise]
IDS = [s.name for s in ELEMENTWISE]

#: EXAdam's dynamic step size calls math.log(step), which torch.compile evaluates by specialising
#: the step (math.log2 and math.sqrt stay symbolic): one graph per step until exadam.py uses log2
RECOMPILES_EACH_STEP: set[str] = set()


@pytest.fixture
def inductor():
    """Requested by the tests that run the Inductor kernels (see ``_fused_backend``)."""


@pytest.fixture(autouse=True)
def _fused_backend(request, monkeypatch):
    """aot_eager (with lists of 4 tensors, quicker to trace) unless the test requests
    ``inductor``; fallbacks are errors; fresh statistics."""
    backend = "inductor" if "inductor" in request.fixturenames else "aot_eager"
    if backend == "aot_eager":
        monkeypatch.setitem(_compiled.CHUNK_BY_DEVICE, "cpu", 4)
    # this process compiles dozens of configurations of each update rule (dtypes, maximize, input
    # sets, list shapes); a training run compiles a handful
    monkeypatch.setattr(_compiled, "RECOMPILE_LIMIT", 64)
    prev = _compiled.BACKEND
    _compiled.BACKEND = backend
    _compiled._BROKEN.clear()
    _compiled._STATS.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedFallbackWarning)
        yield
    _compiled.BACKEND = prev
    _compiled._BROKEN.clear()


def make_params(dtype, seed=0):
    """Tiny parameters: a matrix, a vector, a 3-D tensor and a zero-size tensor."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (4,), (3, 2, 2), (0, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


def grad_seq(params, n, seed=1, none_at=()):
    g = torch.Generator().manual_seed(seed)
    return [
        [None if (t, i) in none_at else torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
         for i, p in enumerate(params)]
        for t in range(n)
    ]


def cosine(t, n, base):
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / n)))


def run(spec, opt, params, seq, base_lr=None, start=0, total=None):
    """Steps with the given gradients; with ``base_lr`` every group's lr follows a cosine."""
    total = total or len(seq)
    for t, gs in enumerate(seq, start):
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        if base_lr is not None:
            for group in opt.param_groups:
                group["lr"] = cosine(t, total, base_lr)
        spec.do_step(opt, params)


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def graphs(cls) -> int:
    """Graphs compiled for ``cls`` since the test started (graphs compiled by earlier tests of this
    process are reused, not counted)."""
    return int(_compiled.compile_report().get(cls.__name__, {}).get("graphs", 0))


def compiled_calls(cls) -> int:
    return int(_compiled.compile_report().get(cls.__name__, {}).get("calls", 0))


def kw_of(spec, **extra):
    return {**spec.inputs[0], **extra}


# ----------------------------------------------------------------------------- same results


def _compare(spec, kw, dtype, atol, rtol, steps=4):
    params = make_params(dtype)
    seq = grad_seq(params, steps, none_at={(1, 0), (2, 2)})
    base_lr = kw.get("lr", 1e-2)
    out = []
    for fused in (False, True):
        ps = clone(params)
        opt = spec.cls(ps, **{**kw, "fused": fused})
        run(spec, opt, ps, seq, base_lr=base_lr)
        out.append((ps, opt))
    (a, oa), (b, ob) = out
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=atol, rtol=rtol)
    for p, q in zip(a, b):
        for k, v in oa.state[p].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(ob.state[q][k], v, atol=atol, rtol=rtol)
            else:
                assert ob.state[q][k] == v
    assert compiled_calls(spec.cls) >= steps, "the fused path did not run"


def _inputs():
    for spec in ELEMENTWISE:
        for i, kw in enumerate(spec.inputs):
            yield pytest.param(spec, kw, id=f"{spec.name}-{i}")


@pytest.mark.parametrize("spec,kw", list(_inputs()))
def test_fused_matches_foreach_float64(spec, kw):
    """Every input set of the table, a zero-size and a one-element parameter, missing gradients
    (so parameters at different step counts) and a learning rate changed at every step."""
    _compare(spec, kw, torch.float64, atol=1e-12, rtol=0)


@pytest.mark.parametrize("spec", ELEMENTWISE, ids=IDS)
def test_fused_matches_foreach_float32(spec):
    _compare(spec, kw_of(spec), torch.float32, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spec", ELEMENTWISE, ids=IDS)
def test_fused_maximize(spec):
    _compare(spec, kw_of(spec, maximize=True), torch.float64, atol=1e-12, rtol=0, steps=3)


# ----------------------------------------------------------------------------- no recompilation


def _exadam_may_exhaust(strict):
    return [
        pytest.param(
            s,
            id=s.name,
            marks=[pytest.mark.xfail(strict=strict, reason="exadam.py uses math.log(step): one graph per step")]
            if s.name in RECOMPILES_EACH_STEP
            else [],
        )
        for s in ELEMENTWISE
    ]



@pytest.mark.parametrize("spec", _exadam_may_exhaust(strict=True))
def test_cosine_schedule_and_changed_hyperparameters_do_not_recompile(spec):
    """100 steps with a cosine learning rate, and mid-run changes of the weight decay and betas:
    after the first two steps (Adan has a first-step branch) no graph is compiled."""
    params = make_params(torch.float32)[:3]
    kw = kw_of(spec, weight_decay=0.01) if "weight_decay" in spec.cls(params).defaults else kw_of(spec)
    opt = spec.cls(params, **{**kw, "fused": True})
    seq = grad_seq(params, 100)
    run(spec, opt, params, seq[:2], base_lr=1e-3, total=100)
    warm = graphs(spec.cls)
    recompiles_before = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    run(spec, opt, params, seq[2:10], base_lr=1e-3, start=2, total=100)
    assert graphs(spec.cls) == warm, _compiled.compile_report()
    run(spec, opt, params, seq[10:50], base_lr=1e-3, start=10, total=100)
    for group in opt.param_groups:
        if group.get("weight_decay", 0.0) != 0.0:
            group["weight_decay"] *= 1.5
        if "betas" in group:
            group["betas"] = tuple(b * 0.999 for b in group["betas"])
        if "eps" in group and group["eps"] > 0:
            group["eps"] *= 2.0
    run(spec, opt, params, seq[50:], base_lr=1e-3, start=50, total=100)
    assert graphs(spec.cls) == warm, _compiled.compile_report()
    recompiles_after = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    assert recompiles_after == recompiles_before
    assert _compiled.compile_report()[spec.cls.__name__]["calls"] >= 100


def test_groups_and_instances_share_one_graph():
    """One compiled function per update rule: parameter groups with other hyperparameters, another
    instance and another bucket size reuse the graph."""
    ps = make_params(torch.float32)
    opt = lit_optim.Lion(
        [{"params": ps[:2], "lr": 1e-3, "weight_decay": 0.1}, {"params": ps[2:], "lr": 3e-4, "weight_decay": 0.2}],
        fused=True,
    )
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    first = graphs(lit_optim.Lion)  # 1, or 0 when an earlier test compiled this graph
    assert first <= 1
    qs = make_params(torch.float32, seed=3) + make_params(torch.float32, seed=4)
    opt2 = lit_optim.Lion(qs, lr=1e-2, weight_decay=0.05, betas=(0.8, 0.95), fused=True)
    for q in qs:
        q.grad = torch.randn_like(q)
    opt2.step()
    opt.step()
    assert graphs(lit_optim.Lion) == first, _compiled.compile_report()


# ----------------------------------------------------------------------------- behaviour kept


@pytest.mark.parametrize("spec", _exadam_may_exhaust(strict=False))
def test_state_dict_round_trip_continues_identically(spec):
    params = make_params(torch.float64)
    seq = grad_seq(params, 6)
    kw = kw_of(spec, fused=True)
    ps = clone(params)
    opt = spec.cls(ps, **kw)
    run(spec, opt, ps, seq)
    qs = clone(params)
    opt_a = spec.cls(qs, **kw)
    run(spec, opt_a, qs, seq[:3])
    saved = copy.deepcopy(opt_a.state_dict())
    rs = [torch.nn.Parameter(q.detach().clone()) for q in qs]
    opt_b = spec.cls(rs, **kw)
    opt_b.load_state_dict(saved)
    assert all(g["fused"] is True for g in opt_b.param_groups)
    run(spec, opt_b, rs, seq[3:])
    for a, b in zip(ps, rs):
        assert torch.equal(a, b)


def test_chunks_flat_aliases_and_padding(monkeypatch):
    """Lists of 2 tensors: padding, a one-element tensor (its own lists), a non-contiguous
    parameter (passed unflattened), a non-contiguous gradient, a zero-size tensor."""
    monkeypatch.setitem(_compiled.CHUNK_BY_DEVICE, "cpu", 2)
    spec = next(s for s in ELEMENTWISE if s.cls is lit_optim.Adan)
    params = make_params(torch.float64) + [
        torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64).t()),
        torch.nn.Parameter(torch.randn(1, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(7, dtype=torch.float64)),
    ]
    seq = grad_seq(params, 3)
    seq[1][0] = torch.randn(4, 5, dtype=torch.float64).t()  # non-contiguous gradient of a (5, 4) parameter
    out = []
    for fused in (False, True):
        ps = clone(params)
        opt = lit_optim.Adan(ps, weight_decay=0.02, fused=fused)
        run(spec, opt, ps, seq)
        out.append(ps)
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)


def test_whole_bucket_mode_as_on_cuda(monkeypatch):
    """CHUNK_BY_DEVICE 0 (the CUDA setting): the bucket's own tensors in one graph."""
    monkeypatch.setitem(_compiled.CHUNK_BY_DEVICE, "cpu", 0)
    spec = next(s for s in ELEMENTWISE if s.cls is lit_optim.AdaBelief)
    _compare(spec, kw_of(spec, weight_decay=0.01, maximize=True), torch.float64, atol=1e-12, rtol=0)


def test_user_gradients_are_never_written():
    """The user's gradients are read, never written (maximize negates inside the compiled code)."""
    ps = make_params(torch.float32)
    opt = lit_optim.AdaBelief(ps, maximize=True, fused=True)
    grads = [torch.randn_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(ps, grads):
        assert torch.equal(p.grad, g)


# ----------------------------------------------------------------------------- the flag


def test_fused_flag_is_validated():
    ps = make_params(torch.float32)
    with pytest.raises(TypeError, match=r"fused must be None, True or False, got 'yes'"):
        lit_optim.Adan(ps, fused="yes")
    with pytest.raises(ValueError, match=r"fused=True and foreach=False cannot be combined"):
        lit_optim.Adan(ps, fused=True, foreach=False)
    with pytest.raises(ValueError, match=r"fused=True and foreach=False in param group 0 cannot be combined"):
        lit_optim.Lion([{"params": ps, "foreach": False}], fused=True)
    opt = lit_optim.Lion(ps)
    assert opt.defaults["fused"] is None and opt.param_groups[0]["fused"] is None


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_optimizer_accepts_fused(spec):
    """Every LitOptimizer takes fused=True; the ones without an elementwise update run their
    multi-tensor path with it. Checked: one step runs and moves the parameters."""
    ps = make_params(torch.float32)[:3]
    opt = spec.cls(ps, **kw_of(spec, fused=True))
    assert all(g["fused"] is True for g in opt.param_groups)
    before = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.randn_like(p)
    spec.do_step(opt, ps)
    assert any(not torch.equal(b, p) for b, p in zip(before, ps))


def test_state_dict_saved_before_fused_existed_loads():
    ps = make_params(torch.float32)
    opt = lit_optim.Lion(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["fused"]
    opt2 = lit_optim.Lion(clone(ps), fused=True)
    opt2.load_state_dict(sd)
    for p in opt2.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt2.step()  # a group without the key runs the multi-tensor path


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        def fn(*a, **k):
            raise torch._dynamo.exc.TorchDynamoException("no compiler here")

        return fn

    monkeypatch.setattr(_compiled, "_make_runner", broken)
    monkeypatch.setattr(_compiled, "_RUNNERS", {})
    params = make_params(torch.float64)
    seq = grad_seq(params, 2)
    spec = next(s for s in ELEMENTWISE if s.cls is lit_optim.Lion)
    ref = clone(params)
    run(spec, lit_optim.Lion(ref, weight_decay=0.1), ref, seq)
    ps = clone(params)
    opt = lit_optim.Lion(ps, weight_decay=0.1, fused=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FusedFallbackWarning)
        run(spec, opt, ps, seq)
    assert [str(w.message) for w in caught if w.category is FusedFallbackWarning] == [
        (
            "Lion(fused=True): torch.compile failed (TorchDynamoException: no compiler here); running the "
            "multi-tensor (foreach) update instead for this optimizer class"
        )
    ]
    assert _compiled.compile_report()["Lion"]["fallback"] == "no compiler here"
    for a, b in zip(ref, ps):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- Inductor


def _by_name(*names):
    return [pytest.param(s, id=s.name) for s in ELEMENTWISE if s.cls.__name__ in names]


@pytest.mark.parametrize("spec", _by_name("Lion", "Adan", "AdaBelief"))
def test_inductor_fused_matches_foreach(spec, inductor):
    """The real fused C++ kernels, float32 (the dtype of the benchmarks)."""
    _compare(spec, kw_of(spec, weight_decay=0.01), torch.float32, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ELEMENTWISE, ids=IDS)
def test_inductor_fused_matches_foreach_all(spec, inductor):
    _compare(spec, kw_of(spec), torch.float64, atol=1e-12, rtol=0)


def test_newton_schulz_context_swaps_the_iteration():
    import importlib

    ns = importlib.import_module("lit_optim.functional.newton_schulz")
    x = torch.randn(3, 8, 6)
    eager = ns.orthogonalize([x])[0]
    with _compiled.compiled_newton_schulz("cpu"):  # CPU: the eager iteration (COMPILE_NS_BY_DEVICE)
        assert ns._iterate_owned is ns._eager_iterate_owned
        same = ns.orthogonalize([x])[0]
    assert torch.equal(eager, same)
    assert _compiled.newton_schulz_iteration("cpu") is ns._eager_iterate_owned
