"""Base-class (LitOptimizer) behaviour found missing by outside testing (issue 15 items 5, 6, 9, 22,
24 and issue 14's eager state): non-finite detection without false alarms, load_state_dict
validation, duplicate parameters, group dict values, torch's error types and wording."""

from __future__ import annotations

import copy

import pytest
import torch

import lit_optim
from lit_optim.optim import NonFiniteGradientError

from .table import all_specs

SPECS = all_specs()
IDS = [s.name for s in SPECS]
ELEMENTWISE = [s for s in SPECS if getattr(s.cls, "elementwise", False)]


def _params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in [(5, 4), (4,), (6, 3)]]


# ----------------------------------------------------------------------------- item 5: non-finite


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_large_finite_gradients_are_not_reported_non_finite(spec):
    """Four float32 entries of 1e19 overflow a sum of squared norms; they are finite."""
    ps = _params()
    opt = spec.cls(ps, **spec.inputs[0])
    for p in ps:
        p.grad = torch.zeros_like(p)
    ps[0].grad[0, :4] = 1e19
    spec.do_step(opt, ps)
    assert opt.skipped_steps == 0


def test_float16_gradient_of_2100_is_finite():
    p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float16))
    opt = lit_optim.Lion([p], lr=1e-3)
    p.grad = torch.full_like(p, 2100.0)
    opt.step()
    assert opt.skipped_steps == 0 and torch.isfinite(p).all()
    assert not torch.equal(p.detach(), torch.zeros_like(p))


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_non_finite_gradient_is_located_and_weights_untouched(mode):
    ps = _params()
    before = [p.detach().clone() for p in ps]
    opt = lit_optim.AdaBelief(ps, nonfinite=mode)
    for p in ps:
        p.grad = torch.ones_like(p)
    ps[2].grad[1, 1] = float("nan")
    if mode == "raise":
        with pytest.raises(NonFiniteGradientError, match=r"param group 0, parameter 2 \(shape \(6, 3\)\)"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)


# ----------------------------------------------------------------------------- item 6: load_state_dict


def _stepped(cls, **kw):
    ps = _params()
    opt = cls(ps, **kw)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    return ps, opt


def test_state_dict_from_another_optimizer_class_is_refused():
    _, a = _stepped(lit_optim.AdaBelief)
    _, b = _stepped(lit_optim.AdaBound)
    with pytest.raises(ValueError, match="saved by AdaBelief, not by AdaBound"):
        b.load_state_dict(a.state_dict())
    _, d = _stepped(lit_optim.DiffGrad)
    _, e = _stepped(lit_optim.EXAdam)
    with pytest.raises(ValueError, match="saved by DiffGrad, not by EXAdam"):
        e.load_state_dict(d.state_dict())


def test_torch_adamw_state_dict_is_refused_with_the_missing_hyperparameters():
    ps = _params()
    t = torch.optim.AdamW(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    t.step()
    _, ours = _stepped(lit_optim.AdaBelief)
    with pytest.raises(ValueError, match=r"AdaBelief.load_state_dict: param group 0 .* lacks the hyperparameters .*nonfinite"):
        ours.load_state_dict(t.state_dict())


def test_state_without_class_tag_is_checked_key_by_key():
    """A state dict that lost the class tag (e.g. flattened by a distributed checkpoint) is still
    checked: a missing per-parameter state key, and a wrong shape, are refused."""
    _, a = _stepped(lit_optim.AdaBelief)
    sd = a.state_dict()
    sd.pop("lit_optim_optimizer")
    del sd["state"][1]["exp_avg"]
    _, b = _stepped(lit_optim.AdaBelief)
    with pytest.raises(ValueError, match=r"state of parameter 1 of param group 0 \(shape \(4,\)\) lacks \['exp_avg'\]"):
        b.load_state_dict(sd)
    sd = a.state_dict()
    sd["state"][0]["exp_avg_var"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"state 'exp_avg_var' of parameter 0 .* has shape \(3, 3\), expected \(5, 4\)"):
        b.load_state_dict(sd)


def test_valid_state_dict_round_trips_and_old_untagged_dicts_load():
    ps, a = _stepped(lit_optim.Adan)
    sd = copy.deepcopy(a.state_dict())
    assert sd["lit_optim_optimizer"] == "Adan"
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    b = lit_optim.Adan(ps2)
    untagged = {k: v for k, v in sd.items() if k != "lit_optim_optimizer"}
    b.load_state_dict(untagged)
    for p, q in zip(ps, ps2):
        p.grad = torch.full_like(p, 0.5)
        q.grad = torch.full_like(q, 0.5)
    a.step()
    b.step()
    for p, q in zip(ps, ps2):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- item 9: duplicates


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_duplicate_parameter_in_a_group_is_refused(spec):
    ps = _params()
    with pytest.raises(ValueError, match=r"parameter 2 of a parameter group \(shape \(5, 4\)\) is the same tensor as parameter 0"):
        spec.cls([ps[0], ps[1], ps[0]], **spec.inputs[0])


# ----------------------------------------------------------------------------- item 22: group values


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_zero_dim_tensor_lr_in_a_group_dict_behaves_like_the_constructor_value(spec):
    ps = _params(torch.float64)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(spec.inputs[0])
    lr = kw.pop("lr", spec.cls.__init__.__defaults__[0] if spec.cls.__init__.__defaults__ else 1e-3)
    a = spec.cls([{"params": ps, "lr": torch.tensor(lr, dtype=torch.float64)}], lr=lr, **kw)
    b = spec.cls(qs, lr=lr, **kw)
    assert isinstance(a.param_groups[0]["lr"], float)
    for _ in range(2):
        for p, q in zip(ps, qs):
            p.grad = torch.ones_like(p) * 0.3
            q.grad = torch.ones_like(q) * 0.3
        spec.do_step(a, ps)
        spec.do_step(b, qs)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q)


def test_group_dict_values_are_range_checked_like_constructor_values():
    ps = _params()
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got 1.0"):
        lit_optim.AdaBelief([{"params": ps, "betas": (0.9, 1.0)}])
    with pytest.raises(ValueError, match=r"lr must be in \[0, inf\)"):
        lit_optim.Lion([{"params": ps, "lr": -1.0}])
    with pytest.raises(TypeError, match="maximize must be a bool"):
        lit_optim.Adan([{"params": ps, "maximize": "yes"}])
    opt = lit_optim.Lion(ps[:1])
    with pytest.raises(ValueError, match=r"weight_decay must be in \[0, inf\)"):
        opt.add_param_group({"params": ps[1:], "weight_decay": -0.5})


# ----------------------------------------------------------------------------- item 24: torch's errors


def test_errors_match_torch_types_and_wording():
    ps = _params()
    for cls in (torch.optim.AdamW, lit_optim.AdaBelief):
        with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
            cls(ps, lr=torch.tensor([1e-3, 1e-3]))
        with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
            cls(ps, lr=-0.1)
        with pytest.raises(ValueError, match="Invalid beta parameter at index 0: 1.5"):
            cls(ps, betas=(1.5, 0.9))
        with pytest.raises(ValueError, match="Invalid epsilon value: -1.0"):
            cls(ps, eps=-1.0)
        with pytest.raises(ValueError, match="Invalid weight_decay value: -1.0"):
            cls(ps, weight_decay=-1.0)


# ----------------------------------------------------------------------------- eager state


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_state_exists_at_construction_with_step_zero(spec):
    """Every parameter has its state (step 0) before the first step, so a distributed checkpoint
    loads into complete state and torch's get_optimizer_state_dict does not run its zero-lr
    initialization step (which would advance the step count)."""
    ps = _params()
    opt = spec.cls(ps, **spec.inputs[0])
    for p in ps:
        assert opt.state[p]["step"] == 0
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    opt.add_param_group({"params": [frozen]})
    assert frozen not in opt.state


def test_get_optimizer_state_dict_does_not_advance_the_step():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = torch.nn.Linear(3, 2)
    opt = lit_optim.AdaBelief(model.parameters())
    get_optimizer_state_dict(model, opt)
    assert all(opt.state[p]["step"] == 0 for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- flattened wrappers


@pytest.mark.parametrize("name", ["muon", "normuon", "frugal", "subset_norm"])
def test_parameters_flattened_by_deepspeed_or_fsdp1_are_refused(name):
    """DeepSpeed ZeRO (and FSDP1 without use_orig_params) replace the optimizer's parameters by flat
    1-D partitions; a matrix-aware optimizer refuses them instead of silently turning into an
    elementwise method. We reproduce what DeepSpeed's ZeRO optimizer does to the wrapped optimizer."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = lit_optim.create_optimizer(model, name)
    for group in opt.param_groups:
        flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in group["params"]]))
        flat.grad = torch.ones_like(flat)
        group["params"] = [flat]
    with pytest.raises(TypeError, match="flattened 1-D buffers.*Use FSDP2"):
        opt.step()


def test_elementwise_optimizers_accept_replaced_parameters():
    """Elementwise updates do not depend on shapes: flattened partitions are fine for them."""
    model = torch.nn.Linear(4, 3)
    opt = lit_optim.Adan(model.parameters())
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]
    opt.step()
    assert opt.state[flat]["step"] == 1
