"""torch's generic optimizer tests, run over every lit_optim optimizer in the registry.

torch keeps its generic optimizer checks in ``test/test_optim.py`` (``TestOptimRenewed``) driven by
the ``OptimizerInfo`` database of ``torch/testing/_internal/common_optimizers.py``. Neither runs here
(test_optim.py is not installed with torch, and common_optimizers needs torch's test-only
dependencies), so the CPU-relevant checks are restated below with torch's inputs and error regexes:

* error inputs shared by all torch optimizers (``get_error_inputs_for_all_optims``) and Adam's
  (``optim_error_inputs_func_adam``), by type and regex;
* ``test_forloop_goes_right_direction`` (with and without LR schedulers, with maximize),
* ``test_param_groups_weight_decay`` / ``test_param_groups_lr``, ``test_tensor_lr``,
* ``test_step_is_noop_when_params_have_no_grad`` / ``test_step_is_noop_for_zero_grads``,
* ``test_foreach_matches_forloop`` (parameters *and* state, float64, a zero-size parameter and a
  step where a gradient is None),
* ``test_state_dict_deterministic``, ``test_save_load_equality_with_weights_only``,
  ``test_deepcopy_copies_all_public_attrs``, ``test_non_empty_state``,
  ``test_optimizer_can_be_printed``,
* the hook tests (``register_step_pre_hook`` / ``post_hook``, ``register_state_dict_pre_hook`` /
  ``post_hook``, ``register_load_state_dict_pre_hook`` / ``post_hook``),
* and the conventions around them: ``step(closure)``, ``zero_grad``, ``add_param_group``, named
  parameters, a dtype sweep (float64, float32, bfloat16, float16), complex refusal, and a
  ``load_state_dict`` that does not alias the tensors of the dict it was given.

Documented differences from torch.optim (:data:`DIFFERENCES`) change what a test expects and say
why; each optimizer is built from its entry in the shared table (``tests/optim/table``), so the
curvature consumers (Sophia, AdaHessian) receive a Hessian estimate before each step.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import lit_optim
from lit_optim.optim import LitOptimizer

from .table import all_specs

_SPECS = {s.cls: s for s in all_specs()}
REGISTERED = sorted(
    (info.name, info.cls) for info in lit_optim.OPTIMIZERS.values() if info.cls.__module__.startswith("lit_optim")
)
NAMES = [n for n, _ in REGISTERED]

#: where lit_optim deliberately differs from torch.optim: (check, reason)
DIFFERENCES = {
    "duplicate_param_in_group": "torch only warns (UserWarning) and then updates the parameter twice per step; "
    "lit_optim refuses it with a ValueError naming the parameter (issue 15, item 9)",
    "tensor_lr_with_foreach": "torch refuses a tensor lr with foreach=True and capturable=False; lit_optim converts a "
    "one-element tensor lr (and tensor betas) to Python floats at construction, so every path accepts it",
    "tensor_betas_mixed": "torch requires betas to be all floats or all tensors; lit_optim converts each to a float",
    "complex": "torch.optim supports complex parameters (as view_as_real); lit_optim refuses them with a TypeError "
    "(optimize torch.view_as_real(param) instead), see LitOptimizer.supports_complex",
    "float16_state": "for float16/bfloat16 parameters the elementwise optimizers keep float32 state and compute in "
    "float32 (lit_optim.optim._precision); torch keeps state in the parameter's dtype",
}


_ALL = set(NAMES)
_ORTHOGONAL_AND_MEMORY_REDUCED = {
    "adago",
    "auon",
    "dct_lowrank",
    "frugal",
    "hybrid_auon",
    "muon",
    "normuon",
    "root",
    "sinkgd",
    "subset_norm",
}
#: failures found by these tests whose fix belongs elsewhere (strict xfail: an XPASS after the fix
#: fails the suite, so the marker is removed together with the bug): test -> (optimizers, reason)
PENDING: dict = {}


def _param(name, cls, test):
    for key, (names, reason) in PENDING.items():
        if key == test and name in names:
            return pytest.param(cls, id=name, marks=pytest.mark.xfail(reason=reason, strict=True))
    return pytest.param(cls, id=name)


def _spec(cls):
    return _SPECS[cls]


def _by_name(test=None):
    return [_param(name, cls, test) for name, cls in REGISTERED]


def _params(dtype=torch.float32, zero_size=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (4,), (3, 2, 2, 2), (6, 3)]
    ps = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    if zero_size:
        ps.append(torch.zeros(0, 3, dtype=dtype))
    return [nn.Parameter(p) for p in ps]


def _make(cls, params, **kw):
    spec = _spec(cls)
    return cls(params, **{**spec.inputs[0], **kw})


def _step(cls, opt, params, closure=None):
    _spec(cls).do_step(opt, params, closure)


def _set_grads(params, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (scale * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype)


def _has(cls, name):
    import inspect

    return name in inspect.signature(cls.__init__).parameters


# ------------------------------------------------------------------------------------ errors

# get_error_inputs_for_all_optims (torch/testing/_internal/common_optimizers.py)


@pytest.mark.parametrize("cls", _by_name())
def test_errors_for_all_optims(cls):
    a = nn.Parameter(torch.randn(2, 2))
    b = nn.Parameter(torch.randn(2, 2))
    kw = _spec(cls).inputs[0]
    with pytest.raises(
        TypeError, match="params argument given to the optimizer should be an iterable of Tensors or dicts"
    ):
        cls(a, **kw)
    # DIFFERENCES["duplicate_param_in_group"]
    with pytest.raises(ValueError, match="same tensor as parameter 0"):
        cls([a, a], **kw)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        cls([{"params": [a]}, {"params": [a]}], **kw)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cls([a], **{**kw, "lr": torch.tensor([0.001, 0.001])})
    with pytest.raises(
        ValueError, match="all optimizer params should be with/without names. Some param names are missing"
    ):
        cls([("weight", a), b], **kw)
    with pytest.raises(
        ValueError,
        match="all optimizer param groups should be with/without names. cannot add param group with names to the optimizer",
    ):
        cls([{"params": [a], "lr": 1e-2}, {"params": [("weight", b)]}], **kw)


# optim_error_inputs_func_adam and the lr/eps/weight_decay checks every torch optimizer makes


@pytest.mark.parametrize("cls", _by_name())
def test_errors_like_torch_adam(cls):
    p = [nn.Parameter(torch.randn(2, 2))]
    kw = _spec(cls).inputs[0]
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        cls(p, **{**kw, "lr": -1.0})
    if _has(cls, "weight_decay"):
        with pytest.raises(ValueError, match="Invalid weight_decay value: -1"):
            cls(p, **{**kw, "lr": 1e-2, "weight_decay": -1})
    if _has(cls, "eps"):
        with pytest.raises(ValueError, match="Invalid epsilon value: -1"):
            cls(p, **{**kw, "eps": -1.0})
    if _has(cls, "betas"):
        nb = len(cls(p, **kw).defaults["betas"])
        with pytest.raises(ValueError, match="Invalid beta parameter at index 0: 1.0"):
            cls(p, **{**kw, "lr": 1e-2, "betas": (1.0,) + (0.0,) * (nb - 1)})
        # DIFFERENCES["tensor_betas_mixed"]: accepted and converted to floats
        opt = cls(p, **{**kw, "lr": 1e-2, "betas": (torch.tensor(0.9),) + (0.99,) * (nb - 1)})
        assert all(isinstance(x, float) for x in opt.defaults["betas"])
    # DIFFERENCES["tensor_lr_with_foreach"]: accepted, stored as a float
    opt = cls(p, **{**kw, "lr": torch.tensor(0.001), "foreach": True})
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001) and isinstance(opt.param_groups[0]["lr"], float)


# ------------------------------------------------------------------------------------ direction


def _linear_problem(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(10, 5, generator=g, dtype=dtype))
    bias = nn.Parameter(torch.randn(10, generator=g, dtype=dtype))
    x = torch.randn(5, generator=g, dtype=dtype)
    return [weight, bias], lambda: (weight @ x + bias).pow(2).sum()


def _run_direction(cls, maximize=False, foreach=None, scheduler=None, steps=5, **extra):
    spec = _spec(cls)
    params, fn = _linear_problem()
    opt = _make(cls, params, lr=spec.lr, maximize=maximize, foreach=foreach, **extra)
    sched = scheduler(opt) if scheduler else None
    initial = fn().item()
    for _ in range(steps):
        opt.zero_grad()
        loss = fn()
        loss.backward()
        _step(cls, opt, params)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(loss.item())
        elif sched is not None:
            sched.step()
    return initial, fn().item()


@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("cls", _by_name())
def test_forloop_goes_right_direction(cls, foreach, maximize):
    initial, final = _run_direction(cls, maximize=maximize, foreach=foreach)
    if maximize:
        assert final > initial, f"{initial} -> {final}"
    else:
        assert final < initial, f"{initial} -> {final}"


@pytest.mark.parametrize(
    "scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9),
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
        lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.3, total_iters=4),
    ],
    ids=["StepLR", "ReduceLROnPlateau", "LinearLR"],
)
@pytest.mark.parametrize("cls", _by_name())
def test_forloop_goes_right_direction_with_lr_scheduler(cls, scheduler):
    initial, final = _run_direction(cls, scheduler=scheduler)
    assert final < initial, f"{initial} -> {final}"


# ------------------------------------------------------------------------------------ param groups


@pytest.mark.parametrize("cls", _by_name())
def test_param_groups_weight_decay(cls):
    if not _has(cls, "weight_decay"):
        pytest.skip("no weight_decay")
    spec = _spec(cls)
    params, fn = _linear_problem()
    weight, bias = params
    kw = {k: v for k, v in spec.inputs[0].items() if k != "weight_decay"}
    opt = cls([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}], lr=spec.lr, **kw)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    initial = fn().item()
    for _ in range(5):
        opt.zero_grad()
        fn().backward()
        _step(cls, opt, params)
    assert fn().item() < initial


@pytest.mark.parametrize("cls", _by_name())
def test_param_groups_lr(cls):
    spec = _spec(cls)
    params = _params()
    frozen = params[2:]
    before = [p.detach().clone() for p in frozen]
    moving_before = [p.detach().clone() for p in params[:2]]
    frozen_group = {"params": frozen, "lr": 0.0}
    if "adam_lr" in cls([nn.Parameter(torch.randn(2, 2))], **spec.inputs[0]).defaults:
        # whole-model optimizers: a group states its internal AdamW's lr itself (issue 15, item 23)
        frozen_group["adam_lr"] = 0.0
    opt = cls([{"params": params[:2], "lr": spec.lr}, frozen_group], **spec.inputs[0])
    for t in range(3):
        _set_grads(params, seed=t)
        _step(cls, opt, params)
    for a, b in zip(frozen, before):
        assert torch.equal(a, b), "a group with lr 0 moved"
    assert any(not torch.equal(a, b) for a, b in zip(params[:2], moving_before))


@pytest.mark.parametrize("cls", _by_name())
def test_tensor_lr(cls):
    """A 0-d tensor lr gives bit-identical steps to the same float lr, on both paths."""
    spec = _spec(cls)
    lr = spec.lr
    results = []
    t = torch.tensor(lr, dtype=torch.float64)  # a float32 tensor would hold a different number
    for lr_value, foreach, in_group in ((lr, True, False), (t, True, False), (t, False, False), (t, True, True)):
        params = _params(torch.float64)
        if in_group:  # a 0-d tensor lr in a parameter-group dict is converted like the constructor's
            opt = _make(cls, [{"params": params, "lr": lr_value}], foreach=foreach)
        else:
            opt = _make(cls, params, lr=lr_value, foreach=foreach)
        for t in range(3):
            _set_grads(params, seed=t)
            _step(cls, opt, params)
        results.append(params)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------ no-op steps


@pytest.mark.parametrize("cls", _by_name())
def test_step_is_noop_when_params_have_no_grad(cls):
    params = _params()
    opt = _make(cls, params)
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    after = opt.state_dict()["state"]
    assert sorted(after) == sorted(state_before)
    for k in after:
        assert after[k].get("step", 0) == state_before[k].get("step", 0)


def _no_weight_decay(cls):
    return {"weight_decay": 0.0} if _has(cls, "weight_decay") else {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("cls", _by_name())
def test_step_is_noop_for_zero_grads(cls, dtype):
    params = _params(dtype)
    opt = _make(cls, params, **_no_weight_decay(cls))
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        for p in params:
            p.grad = torch.zeros_like(p)
        _step(cls, opt, params)
    for p, b in zip(params, before):
        assert torch.equal(p, b), f"max change {(p.float() - b.float()).abs().max().item()}"


# ------------------------------------------------------------------------------------ foreach == for-loop


@pytest.mark.parametrize("cls", _by_name())
def test_foreach_matches_forloop(cls):
    """float64, a zero-size parameter, a gradient that is None at one step, maximize and weight decay:
    the parameters and every state tensor agree."""
    spec = _spec(cls)
    kw = {**spec.inputs[0], "maximize": True}
    if _has(cls, "weight_decay"):
        kw["weight_decay"] = 0.01
    runs = []
    for foreach in (False, True):
        params = _params(torch.float64, zero_size=True)
        opt = cls(params, **{**kw, "foreach": foreach})
        for t in range(4):
            _set_grads(params, seed=t)
            if t == 1:
                params[1].grad = None
            _step(cls, opt, params)
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, atol=_spec(cls).foreach_atol, rtol=0)
    for a, b in zip(pa, pb):
        sa, sb = oa.state[a], ob.state[b]
        assert sorted(sa) == sorted(sb)
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                torch.testing.assert_close(sa[k], sb[k], atol=max(_spec(cls).foreach_atol, 1e-12), rtol=0, msg=k)
            else:
                assert sa[k] == sb[k], k


# ------------------------------------------------------------------------------------ state dicts, copies


def _run(cls, opt, params, seeds):
    for t in seeds:
        _set_grads(params, seed=t)
        _step(cls, opt, params)


@pytest.mark.parametrize("cls", _by_name())
def test_state_dict_deterministic_and_weights_only_round_trip(cls):
    params = _params(torch.float64, zero_size=True)
    opt = _make(cls, params)
    _run(cls, opt, params, range(3))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = _make(cls, params2)
    opt2.load_state_dict(loaded)
    # a state dict of the loaded optimizer equals the saved one
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    for k in sd1["state"]:
        for key, v in sd1["state"][k].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, sd2["state"][k][key]), key
            else:
                assert v == sd2["state"][k][key], key
    _run(cls, opt, params, range(3, 6))
    _run(cls, opt2, params2, range(3, 6))
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", _by_name("test_load_state_dict_does_not_alias_the_given_dict"))
def test_load_state_dict_does_not_alias_the_given_dict(cls):
    params = _params(torch.float32)
    opt = _make(cls, params)
    _run(cls, opt, params, range(2))
    sd = opt.state_dict()
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = _make(cls, params2)
    opt2.load_state_dict(sd)
    saved = copy.deepcopy(sd)
    _run(cls, opt2, params2, range(2, 3))
    for k, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, saved["state"][k][key]), (
                    f"stepping the loaded optimizer changed the dict's {key!r}"
                )
    # and the first optimizer's state is independent of the second's
    ours = opt.state_dict()
    for k, st in ours["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, saved["state"][k][key]), f"the source optimizer's {key!r} changed"


@pytest.mark.parametrize("cls", _by_name())
def test_deepcopy_copies_all_public_attrs(cls):
    params = _params()
    opt = _make(cls, params)
    _run(cls, opt, params, range(2))

    def public(o):
        return {k for k in vars(o) if not k.startswith("_")}

    cp = copy.deepcopy(opt)
    assert public(opt) == public(cp)
    for k in public(opt):
        if isinstance(getattr(opt, k), (int, float, str, bool)):
            assert getattr(opt, k) == getattr(cp, k), k


@pytest.mark.parametrize("cls", _by_name())
def test_non_empty_state_and_printable(cls):
    params = _params()
    opt = _make(cls, params)
    _run(cls, opt, params, range(1))
    for p in params:
        assert opt.state[p].get("step", 0) == 1
    text = repr(opt)
    assert cls.__name__ in text and "Parameter Group 0" in text


# ------------------------------------------------------------------------------------ closure, zero_grad, groups


@pytest.mark.parametrize("cls", _by_name())
def test_step_with_closure_calls_it_once_and_returns_its_loss(cls):
    params, fn = _linear_problem()
    opt = _make(cls, params, lr=_spec(cls).lr)
    if hasattr(opt, "update_hessian"):
        # external mode: the closure is an ordinary one that calls backward()
        opt.update_hessian([torch.ones_like(p) for p in params])
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = fn()
        loss.backward()
        return loss

    before = fn().item()
    out = opt.step(closure)
    assert len(calls) == 1
    assert isinstance(out, torch.Tensor) and out.item() == pytest.approx(before)
    assert fn().item() < before


@pytest.mark.parametrize("cls", _by_name())
def test_zero_grad(cls):
    params = _params()
    opt = _make(cls, params)
    _set_grads(params)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("cls", _by_name())
def test_add_param_group(cls):
    spec = _spec(cls)
    params = _params()
    opt = _make(cls, params[:2], lr=spec.lr)
    opt.add_param_group({"params": params[2:], "lr": 2 * spec.lr})
    g = opt.param_groups[1]
    assert g["lr"] == 2 * spec.lr
    for key in opt.defaults:
        if key not in ("lr", "params"):
            assert key in g, f"default {key!r} not filled in"
    for p in params[2:]:
        assert "step" in opt.state[p]
    before = [p.detach().clone() for p in params[2:]]
    _run(cls, opt, params, range(2))
    assert all(not torch.equal(p, b) for p, b in zip(params[2:], before))
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [params[0]]})
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "lr": -1.0})


@pytest.mark.parametrize("cls", _by_name())
def test_named_parameters(cls):
    """torch >= 2.6 accepts (name, param) pairs and saves the names in the state dict."""
    params = _params()
    names = [f"p{i}" for i in range(len(params))]
    opt = _make(cls, list(zip(names, params)))
    assert opt.param_groups[0]["param_names"] == names
    _run(cls, opt, params, range(2))
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["param_names"] == names
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = _make(cls, list(zip(names, params2)))
    opt2.load_state_dict(sd)
    _run(cls, opt, params, range(2, 4))
    _run(cls, opt2, params2, range(2, 4))
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ hooks


@pytest.mark.parametrize("cls", _by_name())
def test_step_pre_and_post_hooks(cls):
    params = _params()
    opt = _make(cls, params)
    log = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: log.append(("pre", o is opt)))
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: log.append(("post", o is opt)))
    _run(cls, opt, params, range(2))
    assert log == [("pre", True), ("post", True)] * 2
    h1.remove()
    h2.remove()
    _run(cls, opt, params, range(2, 3))
    assert len(log) == 4
    # global hooks too
    g1 = register_optimizer_step_pre_hook(lambda o, a, k: log.append("gpre"))
    g2 = register_optimizer_step_post_hook(lambda o, a, k: log.append("gpost"))
    try:
        _run(cls, opt, params, range(3, 4))
    finally:
        g1.remove()
        g2.remove()
    assert log[4:] == ["gpre", "gpost"]


@pytest.mark.parametrize("cls", _by_name())
def test_state_dict_and_load_state_dict_hooks(cls):
    params = _params()
    opt = _make(cls, params)
    _run(cls, opt, params, range(1))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, sd):
        calls.append("sd_post")
        sd["param_groups"][0]["lr"] = 0.123
        return sd

    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert calls == ["sd_pre", "sd_post"] and sd["param_groups"][0]["lr"] == 0.123

    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = _make(cls, params2)

    def load_pre(o, state_dict):
        calls.append("load_pre")
        state_dict["param_groups"][0]["lr"] = 0.25
        return state_dict

    opt2.register_load_state_dict_pre_hook(load_pre)
    opt2.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o.param_groups[0]["lr"])))
    opt2.load_state_dict(sd)
    assert calls[2:] == ["load_pre", ("load_post", 0.25)]
    assert opt2.param_groups[0]["lr"] == 0.25


# ------------------------------------------------------------------------------------ dtypes, complex


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", _by_name())
def test_dtypes_finite_and_moving(cls, dtype):
    _dtype_sweep(cls, dtype)


@pytest.mark.parametrize(
    "cls", [pytest.param(c, id=n) for n, c in REGISTERED if n not in _ORTHOGONAL_AND_MEMORY_REDUCED]
)
def test_dtypes_finite_and_moving_float16(cls):
    _dtype_sweep(cls, torch.float16)


@pytest.mark.parametrize("cls", [pytest.param(c, id=n) for n, c in REGISTERED if n in _ORTHOGONAL_AND_MEMORY_REDUCED])
def test_float16_refused_by_the_matrix_families(cls):
    """The orthogonalized and memory-reduced families refuse float16 parameters (their state and
    matrix arithmetic would overflow) with a message naming bfloat16 / float32 instead."""
    with pytest.raises(TypeError, match="does not support float16 parameters.*bfloat16"):
        _make(cls, _params(torch.float16), lr=1e-2)


def _dtype_sweep(cls, dtype):
    """Every floating dtype steps to finite weights. For float16 the gradients are small (1e-4, whose
    square underflows in float16): DIFFERENCES["float16_state"]."""
    params = _params(dtype)
    opt = _make(cls, params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    for t in range(3):
        _set_grads(params, seed=t, scale=1e-4 if dtype == torch.float16 else 1.0)
        _step(cls, opt, params)
    for p in params:
        assert p.dtype == dtype
        assert torch.isfinite(p.float()).all(), f"non-finite weights in {dtype}"
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("cls", _by_name())
def test_complex_params_refused(cls):
    """DIFFERENCES["complex"]."""
    c = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    opt = _make(cls, [c])
    c.grad = torch.randn_like(c)
    with pytest.raises(TypeError, match="complex"):
        _step(cls, opt, [c])


def test_every_registered_lit_optim_optimizer_is_covered():
    assert len(REGISTERED) >= 20
    for name, cls in REGISTERED:
        assert issubclass(cls, LitOptimizer), name
        assert cls in _SPECS, f"{name}: no entry in tests/optim/table"
