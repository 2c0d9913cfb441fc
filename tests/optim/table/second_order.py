"""Table entries of the curvature-consuming optimizers (Sophia, AdaHessian).

The generic tests feed synthetic gradients; these optimizers also need a Hessian-diagonal estimate
before each step. ``feed_then_step`` hands them a synthetic one through the documented
``update_hessian`` method: ``|g|`` of the current gradient (NaN/Inf replaced by 1, so that the
generic non-finite-*gradient* test exercises the optimizer's gradient check rather than the
estimate check, which tests/curvature/test_optimizers.py covers). The hand-written references
below apply the same feed.
"""

from __future__ import annotations

import torch

import lit_optim

from .spec import ErrorInput, OptimSpec


def synthetic_diag(g: torch.Tensor) -> torch.Tensor:
    if g.is_sparse:  # the generic sparse-gradient test: the optimizer must refuse the gradient itself
        g = g.to_dense()
    if torch.is_complex(g):
        g = g.abs()
    return torch.nan_to_num(g.detach().abs(), nan=1.0, posinf=1.0, neginf=1.0)


def feed_then_step(opt, params, closure=None):
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    opt.update_hessian([None if p.grad is None else synthetic_diag(p.grad) for p in params])
    opt.step()
    return loss


def ref_sophia(p, grads, kw):
    lr, (b1, b2) = kw.get("lr", 1e-4), kw.get("betas", (0.965, 0.99))
    rho, wd, eps = kw.get("rho", 0.04), kw.get("weight_decay", 0.1), kw.get("eps", 1e-12)
    p = p.clone()
    m = torch.zeros_like(p)
    h = torch.zeros_like(p)
    for g in grads:
        h = b2 * h + (1 - b2) * g.abs()
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        p = p - lr * torch.clamp(m / torch.clamp(rho * h, min=eps), -1.0, 1.0)
    return p


def ref_adahessian(p, grads, kw):
    lr, (b1, b2), eps = kw.get("lr", 0.03), kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-4)
    wd, k, block = kw.get("weight_decay", 0.0), kw.get("hessian_power", 1.0), kw.get("block_size", 1)
    p = p.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        d = g.abs()
        if block > 1:  # mean over consecutive blocks of the last dimension (4 columns = 2 blocks of 2)
            d = d.reshape(*d.shape[:-1], -1, block).mean(-1, keepdim=True).expand(*d.shape[:-1], -1, block)
            d = d.reshape(g.shape)
        v = b2 * v + (1 - b2) * d * d
        m = b1 * m + (1 - b1) * g
        p = p * (1 - lr * wd)
        denom = torch.sqrt(v / (1 - b2**t)) ** k + eps
        p = p - lr * (m / (1 - b1**t)) / denom
    return p


def _wrong_shape(opt, params):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.update_hessian([torch.ones(7) for _ in params])


def _wrong_length(opt, params):
    opt.update_hessian([torch.ones_like(params[0])])


def _nan_estimate(opt, params):
    opt.update_hessian([torch.full_like(p, float("nan")) for p in params])


def _no_estimate(opt, params):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


def _foreign_param(opt, params):
    opt.update_hessian({torch.nn.Parameter(torch.ones(2)): torch.ones(2)})


COMMON = [
    ErrorInput({"lr": -1e-3}, ValueError, r"lr must be in \[0, inf\), got -0.001"),
    ErrorInput({"betas": (1.2, 0.99)}, ValueError, r"betas\[0\] must be in \[0, 1\), got 1.2"),
    ErrorInput({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in \[0, 1\), got 1.0"),
    ErrorInput({"weight_decay": -0.1}, ValueError, r"weight_decay must be in \[0, inf\), got -0.1"),
    ErrorInput({"update_period": 0}, ValueError, r"update_period must be an integer >= 1, got 0"),
    ErrorInput({"n_probes": 1.5}, TypeError, r"n_probes must be an integer >= 1, got float 1.5"),
    ErrorInput({"probe": "uniform"}, ValueError, r"probe must be one of \['rademacher', 'gaussian'\], got 'uniform'"),
    ErrorInput({"seed": "x"}, TypeError, r"seed must be an integer, got str 'x'"),
    ErrorInput(
        {},
        ValueError,
        r"estimate 0 has shape \(7,\), its parameter has shape \(5, 4\)",
        at="step",
        step_fn=_wrong_shape,
    ),
    ErrorInput({}, ValueError, r"expected 4 estimates .* got 1", at="step", step_fn=_wrong_length),
    ErrorInput({}, FloatingPointError, r"non-finite Hessian estimate", at="step", step_fn=_nan_estimate),
    ErrorInput({}, ValueError, r"not one of this optimizer's parameters", at="step", step_fn=_foreign_param),
]

#: float16 and bfloat16 parameters are stepped in float32 with float32 state (issue 15, item 8)
LOW_PRECISION_TOO = (torch.float32, torch.bfloat16, torch.float16)

SPECS = [
    OptimSpec(
        lit_optim.Sophia,
        dtypes=LOW_PRECISION_TOO,
        inputs=[{}, {"weight_decay": 0.0, "rho": 1.0}, {"betas": (0.9, 0.95), "eps": 1e-8, "rho": 5.0}],
        errors=COMMON
        + [
            ErrorInput({"rho": -1.0}, ValueError, r"rho must be in \[0, inf\), got -1.0"),
            ErrorInput({"eps": 0.0}, ValueError, r"eps must be in \(0, inf\), got 0.0"),
        ],
        reference=ref_sophia,
        reference_kwargs={"lr": 0.05, "rho": 5.0, "weight_decay": 0.1},
        step_fn=feed_then_step,
        lr=5e-2,
    ),
    OptimSpec(
        lit_optim.AdaHessian,
        dtypes=LOW_PRECISION_TOO,
        inputs=[{}, {"hessian_power": 0.5, "weight_decay": 0.01}, {"block_size": 2, "spatial_average": False}],
        errors=COMMON
        + [
            ErrorInput({"hessian_power": 0.0}, ValueError, r"hessian_power must be in \(0, 1\], got 0.0"),
            ErrorInput({"hessian_power": 1.5}, ValueError, r"hessian_power must be in \(0, 1\], got 1.5"),
            ErrorInput({"block_size": 0}, ValueError, r"block_size must be an integer >= 1, got 0"),
            ErrorInput({"eps": -1.0}, ValueError, r"eps must be in \(0, inf\), got -1.0"),
            ErrorInput({"eps": 0.0}, ValueError, r"eps must be in \(0, inf\), got 0.0 .*divides the momentum by 0"),
            ErrorInput({}, RuntimeError, r"has received no Hessian estimate yet", at="step", step_fn=_no_estimate),
        ],
        reference=ref_adahessian,
        reference_kwargs={"lr": 0.1, "hessian_power": 0.5, "weight_decay": 0.01, "block_size": 2},
        step_fn=feed_then_step,
        lr=5e-2,
    ),
]
