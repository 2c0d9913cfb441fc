"""Table entries and hand-written update rules of the orthogonalized family (issue 10).

The references below are written out with plain torch/torch.linalg operations on one matrix
(explicit Newton-Schulz loop, torch.quantile for ROOT's threshold) and share no code with
lit_optim."""

from __future__ import annotations

import math

import torch

import lit_optim

from .spec import ErrorInput, OptimSpec

QUINTIC = (3.4445, -4.7750, 2.0315)


def ns_ref(x, steps=5, coeffs=QUINTIC, eps=1e-7):
    """Newton-Schulz on one matrix, written out."""
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (torch.linalg.matrix_norm(x) + eps)
    for k in range(steps):
        a, b, c = coeffs[k] if isinstance(coeffs[0], tuple) else coeffs
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def shape_factor(m, n, mode):
    if mode == "original":
        return math.sqrt(max(1.0, m / n))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    return 1.0


def momentum_dir(m, g, mu, nesterov):
    m = mu * m + (1 - mu) * g
    return m, ((1 - mu) * g + mu * m) if nesterov else m


def ref_muon(p, grads, kw):
    lr, mu, nest = kw.get("lr", 0.02), kw.get("momentum", 0.95), kw.get("nesterov", True)
    wd, adj, steps = kw.get("weight_decay", 0.0), kw.get("adjust_lr", "original"), kw.get("ns_steps", 5)
    p, m = p.clone(), torch.zeros_like(p)
    for g in grads:
        m, u = momentum_dir(m, g, mu, nest)
        o = ns_ref(u, steps)
        p = p * (1 - lr * wd) - lr * shape_factor(*p.shape, adj) * o
    return p


def ref_normuon(p, grads, kw):
    lr, mu, b2, eps = kw.get("lr", 0.02), kw.get("momentum", 0.95), kw.get("beta2", 0.95), kw.get("eps", 1e-8)
    wd = kw.get("weight_decay", 0.0)
    p, m, v = p.clone(), torch.zeros_like(p), torch.zeros(p.shape[0], dtype=p.dtype)
    for g in grads:
        m, u = momentum_dir(m, g, mu, kw.get("nesterov", True))
        o = ns_ref(u)
        v = b2 * v + (1 - b2) * (o * o).mean(dim=1)
        on = o / (torch.sqrt(v)[:, None] + eps)
        on = on * torch.linalg.matrix_norm(o) / (torch.linalg.matrix_norm(on) + eps)
        p = p * (1 - lr * wd) - lr * shape_factor(*p.shape, "original") * on
    return p


def auon_ref(x, gamma, eps):
    g = x / (torch.linalg.matrix_norm(x) + 1e-7)
    r = torch.sqrt(torch.mean(torch.cosh(gamma * g) ** 2))
    return g / (r + eps)


def ref_auon(p, grads, kw):
    lr, mu, gamma, eps = kw.get("lr", 0.24), kw.get("momentum", 0.95), kw.get("gamma", 1.5), kw.get("eps", 1e-8)
    wd = kw.get("weight_decay", 0.0)
    p, m = p.clone(), torch.zeros_like(p)
    for g in grads:
        m, u = momentum_dir(m, g, mu, kw.get("nesterov", True))
        p = p * (1 - lr * wd) - lr * shape_factor(*p.shape, "original") * auon_ref(u, gamma, eps)
    return p


def ref_hybrid_auon(p, grads, kw):
    """The paper's hybrid rule (arXiv:2509.24320, Sec. 3.2): Y = one Newton-Schulz step of the
    momentum, U = Y / (rms(cosh(gamma Y)) + delta), gamma = 1 by default; Y is not normalized again."""
    lr, mu, gamma, eps = kw.get("lr", 0.24), kw.get("momentum", 0.95), kw.get("gamma", 1.0), kw.get("eps", 1e-8)
    wd = kw.get("weight_decay", 0.0)
    p, m = p.clone(), torch.zeros_like(p)
    for g in grads:
        m, u = momentum_dir(m, g, mu, kw.get("nesterov", True))
        y = ns_ref(u, kw.get("ns_steps", 1))
        r = torch.sqrt(torch.mean(torch.cosh(gamma * y) ** 2))
        p = p * (1 - lr * wd) - lr * shape_factor(*p.shape, "original") * (y / (r + eps))
    return p


def ref_root(p, grads, kw):
    lr, mu, q = kw.get("lr", 1e-3), kw.get("momentum", 0.95), kw.get("threshold_quantile", 0.9)
    wd = kw.get("weight_decay", 0.0)
    # a 3x4 matrix has aspect ratio 4/3, nearest (log scale) to ROOT's 2048x3072 entry (ratio 1.5)
    coeffs = (3.4509, -4.5790, 1.9325)
    p, m = p.clone(), torch.zeros_like(p)
    for g in grads:
        m, u = momentum_dir(m, g, mu, kw.get("nesterov", True))
        tau = torch.quantile(u.abs().flatten(), q) + 1e-9
        outliers = torch.sign(u) * torch.relu(u.abs() - tau)
        b = u - outliers
        o = ns_ref(b, 5, coeffs)
        p = p * (1 - lr * wd) - lr * shape_factor(*p.shape, "match_rms_adamw") * o
    return p


def ref_adago(p, grads, kw):
    lr, mu, gamma = kw.get("lr", 0.05), kw.get("momentum", 0.95), kw.get("gamma", 10.0)
    eps, v0, wd = kw.get("eps", 0.01), kw.get("v0", 1e-3), kw.get("weight_decay", 0.0)
    p, m, v2 = p.clone(), torch.zeros_like(p), v0**2
    for g in grads:
        m, u = momentum_dir(m, g, mu, kw.get("nesterov", False))
        s = min(float(torch.linalg.matrix_norm(g)), gamma)
        v2 += s * s
        alpha = lr * max(eps, s / math.sqrt(v2))
        p = p * (1 - lr * wd) - alpha * shape_factor(*p.shape, "original") * ns_ref(u)
    return p


def ref_sinkgd(p, grads, kw):
    lr, iters, wd = kw.get("lr", 1e-3), kw.get("iters", 5), kw.get("weight_decay", 0.0)
    mm, nn_ = p.shape
    p = p.clone()
    for g in grads:
        x = g
        for _ in range(iters):
            x = math.sqrt(nn_) * x / (x.norm(dim=1, keepdim=True) + 1e-8)
            x = math.sqrt(mm) * x / (x.norm(dim=0, keepdim=True) + 1e-8)
        p = p * (1 - lr * wd) - lr * x
    return p


COMMON = [
    ErrorInput({"lr": -0.1}, ValueError, r"lr must be in \[0, inf\), got -0.1"),
    ErrorInput({"weight_decay": -1.0}, ValueError, r"weight_decay must be in \[0, inf\), got -1.0"),
    ErrorInput({"adam_betas": (0.9, 1.5)}, ValueError, r"adam_betas\[1\] must be in \[0, 1\), got 1.5"),
    ErrorInput({"adam_lr": -1.0}, ValueError, r"adam_lr must be in \[0, inf\), got -1.0"),
    ErrorInput(
        {"adjust_lr": "rms"},
        ValueError,
        r"adjust_lr must be one of \['original', 'match_rms_adamw', 'none'\], got 'rms'",
    ),
    ErrorInput({"noise_beta": 1.0}, ValueError, r"noise_beta must be in \[0, 1\), got 1.0"),
    ErrorInput({"noise_clip": 0.5}, ValueError, r"noise_clip must be in \[1, inf\), got 0.5"),
    ErrorInput({"layerwise_noise_adaptive": "yes"}, TypeError, r"layerwise_noise_adaptive must be a bool"),
    ErrorInput({"distributed": "auto"}, TypeError, r"distributed must be None, True or False"),
]
MOMENTUM = [
    ErrorInput({"momentum": 1.0}, ValueError, r"momentum must be in \[0, 1\), got 1.0"),
    ErrorInput({"nesterov": 1}, TypeError, r"nesterov must be a bool, got 1"),
]
NS = [
    ErrorInput({"ns_steps": 0}, ValueError, r"ns_steps must be an integer >= 1, got 0"),
    ErrorInput({"ns_coefficients": "septic"}, ValueError, r"coefficients must be one of .*'quintic'.*got 'septic'"),
    ErrorInput({"ns_coefficients": (1.0, 2.0)}, ValueError, r"coefficients\[0\] must be a triple"),
    ErrorInput({"ns_dtype": "int8"}, ValueError, r"must be a floating dtype"),
]

SPECS = [
    OptimSpec(
        lit_optim.Muon,
        inputs=[
            {},
            {"nesterov": False, "weight_decay": 0.1, "adjust_lr": "match_rms_adamw"},
            {"layerwise_noise_adaptive": True, "ns_method": "gram"},
        ],
        errors=COMMON + MOMENTUM + NS + [ErrorInput({"ns_method": "svd"}, ValueError, r"ns_method must be one of")],
        reference=ref_muon,
        reference_kwargs={"lr": 0.1, "weight_decay": 0.1},
        lr=0.05,
        foreach_atol=1e-10,
    ),
    OptimSpec(
        lit_optim.NorMuon,
        inputs=[{}, {"nesterov": False, "weight_decay": 0.05, "beta2": 0.5}, {"layerwise_noise_adaptive": True}],
        errors=COMMON + MOMENTUM + NS + [ErrorInput({"beta2": 1.0}, ValueError, r"beta2 must be in \[0, 1\), got 1.0")],
        reference=ref_normuon,
        reference_kwargs={"lr": 0.1, "weight_decay": 0.1, "beta2": 0.8},
        lr=0.05,
        foreach_atol=1e-10,
    ),
    OptimSpec(
        lit_optim.AuON,
        inputs=[{}, {"nesterov": False, "gamma": 3.0, "weight_decay": 0.05}, {"layerwise_noise_adaptive": True}],
        errors=COMMON + MOMENTUM + [ErrorInput({"gamma": 0.0}, ValueError, r"gamma must be in \(0, inf\), got 0.0")],
        reference=ref_auon,
        reference_kwargs={"lr": 0.5, "weight_decay": 0.1, "gamma": 2.0},
        lr=0.5,
        foreach_atol=1e-10,
    ),
    OptimSpec(
        lit_optim.HybridAuON,
        inputs=[{}, {"ns_steps": 2, "nesterov": False}, {"layerwise_noise_adaptive": True}],
        errors=COMMON + MOMENTUM + NS,
        reference=ref_hybrid_auon,
        reference_kwargs={"lr": 0.5, "weight_decay": 0.1, "gamma": 1.5},
        lr=0.5,
        foreach_atol=1e-10,
    ),
    OptimSpec(
        lit_optim.ROOT,
        inputs=[
            {},
            {"threshold_quantile": 1.0, "ns_coefficients": "quintic", "nesterov": False},
            {"layerwise_noise_adaptive": True},
        ],
        errors=COMMON
        + MOMENTUM
        + NS
        + [ErrorInput({"threshold_quantile": 1.5}, ValueError, r"threshold_quantile must be in \[0, 1\], got 1.5")],
        reference=ref_root,
        reference_kwargs={"lr": 0.05, "weight_decay": 0.1, "threshold_quantile": 0.7},
        lr=0.05,
        foreach_atol=1e-10,
    ),
    OptimSpec(
        lit_optim.AdaGO,
        inputs=[{}, {"nesterov": True, "gamma": 0.5, "weight_decay": 0.05}, {"layerwise_noise_adaptive": True}],
        errors=COMMON
        + MOMENTUM
        + NS
        + [
            ErrorInput({"gamma": -1.0}, ValueError, r"gamma must be in \(0, inf\), got -1.0"),
            ErrorInput({"v0": 0.0}, ValueError, r"v0 must be in \(0, inf\), got 0.0"),
        ],
        reference=ref_adago,
        reference_kwargs={"lr": 0.2, "weight_decay": 0.1, "gamma": 1.5, "eps": 0.3},
        lr=0.3,
        foreach_atol=1e-10,
    ),
    OptimSpec(
        lit_optim.SinkGD,
        inputs=[
            {},
            {"iters": 1, "weight_decay": 0.05},
            {"layerwise_noise_adaptive": True},
            {"norms": ("row", "spectral"), "iters": 1},
        ],
        errors=COMMON
        + [
            ErrorInput({"iters": 0}, ValueError, r"iters must be an integer >= 1, got 0"),
            ErrorInput({"norms": ("row", "l1")}, ValueError, r"norms entries must be in .*got 'l1'"),
            ErrorInput({"norms": "row"}, ValueError, r"norms must be a non-empty tuple"),
        ],
        reference=ref_sinkgd,
        reference_kwargs={"lr": 0.05, "weight_decay": 0.1, "iters": 3},
        lr=0.05,
        foreach_atol=1e-10,
    ),
]
