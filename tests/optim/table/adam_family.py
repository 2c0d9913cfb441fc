"""Table entries and hand-written update rules of the Adam-family optimizers and AdaGrad."""

from __future__ import annotations

import math

import torch

import lit_optim
from lit_optim.optim import NonFiniteGradientError  # noqa: F401  (re-exported for readers)

from .spec import ErrorInput, OptimSpec

BETAS_ERRORS = [
    ErrorInput({"betas": (1.2, 0.999)}, ValueError, r"betas\[0\] must be in \[0, 1\), got 1.2"),
    ErrorInput({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in \[0, 1\), got 1.0"),
    ErrorInput({"betas": (0.9,)}, ValueError, r"betas must have 2 entries"),
]
#: eps=0 refused where it would divide 0 by 0 (issue 15, item 7)
EPS_ZERO = r"eps must be in \(0, inf\), got 0.0 .*divides 0 by 0"
COMMON = [
    ErrorInput({"lr": -1e-3}, ValueError, r"lr must be in \[0, inf\), got -0.001"),
    ErrorInput({"weight_decay": -0.1}, ValueError, r"weight_decay must be in \[0, inf\), got -0.1"),
]


def ref_adabelief(p, grads, kw):
    lr, (b1, b2), eps, wd = (
        kw.get("lr", 1e-3),
        kw.get("betas", (0.9, 0.999)),
        kw.get("eps", 1e-16),
        kw.get("weight_decay", 0),
    )
    p = p.clone()
    m = torch.zeros_like(p)
    s = torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
        p = p - lr * (m / (1 - b1**t)) / (torch.sqrt(s / (1 - b2**t)) + eps)
    return p


def ref_lion(p, grads, kw):
    lr, (b1, b2), wd = kw.get("lr", 1e-4), kw.get("betas", (0.9, 0.99)), kw.get("weight_decay", 0)
    p = p.clone()
    m = torch.zeros_like(p)
    for g in grads:
        c = b1 * m + (1 - b1) * g
        p = p - lr * (torch.sign(c) + wd * p)
        m = b2 * m + (1 - b2) * g
    return p


def ref_adan(p, grads, kw):
    lr, (b1, b2, b3) = kw.get("lr", 1e-3), kw.get("betas", (0.98, 0.92, 0.99))
    eps, wd = kw.get("eps", 1e-8), kw.get("weight_decay", 0)
    p = p.clone()
    m, n, v = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    prev = None
    for t, g in enumerate(grads, 1):
        d = torch.zeros_like(g) if prev is None else g - prev
        prev = g
        m = b1 * m + (1 - b1) * g
        n = b2 * n + (1 - b2) * d
        v = b3 * v + (1 - b3) * (g + b2 * d) ** 2
        u = (m / (1 - b1**t) + b2 * n / (1 - b2**t)) / (torch.sqrt(v / (1 - b3**t)) + eps)
        p = (p - lr * u) / (1 + lr * wd)
    return p


def ref_diffgrad(p, grads, kw):
    lr, (b1, b2), eps = kw.get("lr", 1e-3), kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-8)
    wd = kw.get("weight_decay", 0)
    p = p.clone()
    m, v, prev = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        xi = 1 / (1 + torch.exp(-torch.abs(prev - g)))
        prev = g
        p = p - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * xi * m / (torch.sqrt(v) + eps)
    return p


def ref_adabound(p, grads, kw):
    lr, (b1, b2), eps = kw.get("lr", 1e-3), kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-8)
    final_lr, gamma, ams = kw.get("final_lr", 0.1), kw.get("gamma", 1e-3), kw.get("amsbound", False)
    p = p.clone()
    m, v, vmax = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = torch.maximum(vmax, v)
        vv = vmax if ams else v
        lower = final_lr * (1 - 1 / (gamma * t + 1))
        upper = final_lr * (1 + 1 / (gamma * t))
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t) / (torch.sqrt(vv) + eps)
        p = p - torch.clamp(step, lower, upper) * m
    return p


def ref_exadam(p, grads, kw):
    lr, (b1, b2), eps, wd = (
        kw.get("lr", 1e-3),
        kw.get("betas", (0.9, 0.999)),
        kw.get("eps", 1e-8),
        kw.get("weight_decay", 0),
    )
    dynamic = kw.get("dynamic_step_size", True)
    p = p.clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        d1 = 1 + v / (v + eps) * b2**t
        d2 = 1 + m**2 / (m**2 + eps) * b1**t
        mt = m / (1 - b1**t) * d1
        vt = v / (1 - b2**t) * d2
        gt = g / (1 - b1**t) * d1
        # the paper's dynamic step size (arXiv:2412.20302v1, Algorithm 1): lr * ln(sqrt(2) * sqrt(t + 1))
        alpha = lr * math.log(math.sqrt(2.0) * math.sqrt(t + 1)) if dynamic else lr
        p = p - alpha * (mt + gt) / (torch.sqrt(vt) + eps)
    return p


def ref_adagrad(p, grads, kw):
    lr, eps, init = kw.get("lr", 1e-2), kw.get("eps", 1e-10), kw.get("initial_accumulator_value", 0.0)
    p = p.clone()
    acc = torch.full_like(p, init)
    for g in grads:
        acc = acc + g * g
        p = p - lr * g / (torch.sqrt(acc) + eps)
    return p


def ref_adagradnorm(p, grads, kw):
    lr, eps, b2 = kw.get("lr", 1.0), kw.get("eps", 1e-10), kw.get("initial_accumulator_value", 0.0)
    p = p.clone()
    for g in grads:
        b2 = b2 + float((g * g).sum())
        p = p - lr * g / (math.sqrt(b2) + eps)
    return p


#: float16 and bfloat16 parameters are stepped in float32 with float32 state (issue 15, item 8)
LOW_PRECISION_TOO = (torch.float32, torch.bfloat16, torch.float16)

SPECS = [
    OptimSpec(
        lit_optim.AdaBelief,
        dtypes=LOW_PRECISION_TOO,
        inputs=[{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": False}, {"amsgrad": True}],
        errors=COMMON
        + BETAS_ERRORS
        + [
            ErrorInput({"eps": -1.0}, ValueError, r"eps must be in \(0, inf\), got -1.0"),
            ErrorInput({"eps": 0.0}, ValueError, EPS_ZERO),
        ],
        reference=ref_adabelief,
        reference_kwargs={"lr": 0.1, "weight_decay": 0.05},
    ),
    OptimSpec(
        lit_optim.Lion,
        dtypes=LOW_PRECISION_TOO,
        inputs=[{}, {"weight_decay": 0.5}],
        errors=COMMON + BETAS_ERRORS,
        reference=ref_lion,
        reference_kwargs={"lr": 0.01, "weight_decay": 0.1},
        lr=2e-2,
    ),
    OptimSpec(
        lit_optim.Adan,
        dtypes=LOW_PRECISION_TOO,
        inputs=[{}, {"weight_decay": 0.02}, {"weight_decay": 0.02, "no_prox": True}],
        errors=COMMON
        + [
            ErrorInput({"betas": (0.98, 0.92)}, ValueError, r"betas must have 3 entries"),
            ErrorInput({"betas": (0.98, 0.92, -0.1)}, ValueError, r"betas\[2\] must be in \[0, 1\), got -0.1"),
            ErrorInput({"eps": 0.0}, ValueError, EPS_ZERO),
        ],
        reference=ref_adan,
        reference_kwargs={"lr": 0.05, "weight_decay": 0.02},
    ),
    OptimSpec(
        lit_optim.DiffGrad,
        dtypes=LOW_PRECISION_TOO,
        inputs=[{}, {"weight_decay": 0.01}, {"weight_decay": 0.01, "decoupled_weight_decay": True}],
        errors=COMMON + BETAS_ERRORS + [ErrorInput({"eps": 0.0}, ValueError, EPS_ZERO)],
        reference=ref_diffgrad,
        reference_kwargs={"lr": 0.1, "weight_decay": 0.01},
    ),
    OptimSpec(
        lit_optim.AdaBound,
        dtypes=LOW_PRECISION_TOO,
        # eps=0 is safe for AdaBound (the clip bounds the infinite step where v = 0, and m = 0 there)
        inputs=[{}, {"amsbound": True}, {"weight_decay": 0.01}, {"eps": 0.0}],
        errors=COMMON
        + BETAS_ERRORS
        + [
            ErrorInput({"gamma": 0.0}, ValueError, r"gamma must be in \(0, inf\), got 0.0"),
            ErrorInput({"final_lr": -1.0}, ValueError, r"final_lr must be in \[0, inf\), got -1.0"),
        ],
        reference=ref_adabound,
        reference_kwargs={"lr": 0.1, "amsbound": True, "gamma": 0.1},
    ),
    OptimSpec(
        lit_optim.EXAdam,
        dtypes=LOW_PRECISION_TOO,
        inputs=[{}, {"weight_decay": 0.01}, {"dynamic_step_size": False}],
        errors=COMMON
        + BETAS_ERRORS
        + [
            ErrorInput({"eps": 0.0}, ValueError, EPS_ZERO),
            ErrorInput({"dynamic_step_size": 1}, TypeError, r"dynamic_step_size must be a bool, got int 1"),
        ],
        reference=ref_exadam,
        reference_kwargs={"lr": 0.1, "weight_decay": 0.01},
    ),
    OptimSpec(
        lit_optim.AdaGrad,
        dtypes=LOW_PRECISION_TOO,
        inputs=[
            {},
            {"initial_accumulator_value": 0.1, "weight_decay": 0.01},
            {"eps": 0.0, "initial_accumulator_value": 0.1},
        ],
        errors=COMMON
        + [
            ErrorInput(
                {"initial_accumulator_value": -1.0}, ValueError, r"initial_accumulator_value must be in \[0, inf\)"
            ),
            ErrorInput({"eps": 0.0}, ValueError, r"eps must be in \(0, inf\) when initial_accumulator_value is 0"),
        ],
        reference=ref_adagrad,
        reference_kwargs={"lr": 0.5, "initial_accumulator_value": 0.1},
        lr=0.1,
    ),
    OptimSpec(
        lit_optim.AdaGradNorm,
        dtypes=LOW_PRECISION_TOO,
        # eps=0 is safe for AdaGradNorm: the step is 0 while every gradient has been zero
        inputs=[{}, {"initial_accumulator_value": 1.0}, {"eps": 0.0}],
        errors=COMMON,
        reference=ref_adagradnorm,
        reference_kwargs={"lr": 0.7, "initial_accumulator_value": 0.3},
        lr=1.0,
    ),
]
