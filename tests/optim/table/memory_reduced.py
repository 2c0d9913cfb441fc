"""Table entries and hand-written update rules of the memory-reduced optimizers (FRUGAL,
SubsetNormAdam, DCTLowRank).

The references below recompute the subspaces their own way (``torch.linalg.svd`` instead of the
Gram-matrix eigen-decomposition, the DCT matrix from its formula, the moment rotation of the DCT
optimizer as the matrix product ``P_new^T P_old``), so they check the optimizers' maths, not a
copy of their code.
"""

from __future__ import annotations

import math

import torch

import lit_optim

from .spec import ErrorInput, OptimSpec

COMMON = [
    ErrorInput({"lr": -1e-3}, ValueError, r"lr must be in \[0, inf\), got -0.001"),
    ErrorInput({"weight_decay": -0.1}, ValueError, r"weight_decay must be in \[0, inf\), got -0.1"),
    ErrorInput({"eps": -1.0}, ValueError, r"eps must be in \(0, inf\), got -1.0"),
    ErrorInput({"eps": 0.0}, ValueError, r"eps must be in \(0, inf\), got 0.0 .*would divide 0 by 0"),
    ErrorInput({"rank": 0}, ValueError, r"rank must be an int >= 1 or a float in \(0, 1\], got 0"),
    ErrorInput({"rank": 1.5}, ValueError, r"rank must be an int >= 1 or a float in \(0, 1\], got 1.5"),
    ErrorInput({"rank": True}, TypeError, r"rank must be an int >= 1 or a float in \(0, 1\], got bool True"),
    ErrorInput({"rank": "half"}, TypeError, r"rank must be .* got str 'half'"),
    ErrorInput({"update_proj_gap": 0}, ValueError, r"update_proj_gap must be an integer >= 1, got 0"),
    ErrorInput({"update_proj_gap": 2.5}, TypeError, r"update_proj_gap must be an integer >= 1, got float 2.5"),
]
BETAS = [
    ErrorInput({"betas": (1.2, 0.999)}, ValueError, r"betas\[0\] must be in \[0, 1\), got 1.2"),
    ErrorInput({"betas": (0.9,)}, ValueError, r"betas must have 2 entries"),
]


def dct_matrix(d: int) -> torch.Tensor:
    """Orthonormal DCT-II basis vectors as columns, from the formula."""
    q = torch.empty(d, d, dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            c = math.sqrt(1.0 / d) if j == 0 else math.sqrt(2.0 / d)
            q[i, j] = c * math.cos(math.pi * (2 * i + 1) * j / (2 * d))
    return q


def _svd_basis(g: torch.Tensor, r: int, left: bool) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return u[:, :r] if left else vh[:r].t()


def _proj(P, g, left):
    return P.t() @ g if left else g @ P


def _back(P, x, left):
    return P @ x if left else x @ P.t()


def _rank(kw, d):
    r = kw.get("rank", 0.25)
    return min(r, d) if isinstance(r, int) else max(1, math.ceil(r * d - 1e-9))


def ref_frugal(p, grads, kw):
    """FRUGAL with the SVD subspace (reset at each refresh), AdamW inside, signSGD/SGD outside."""
    assert kw["projection"] == "svd"
    lr, (b1, b2), eps, wd = kw.get("lr", 1e-3), kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-8), kw.get("weight_decay", 0.0)
    T, gamma, free = kw.get("update_proj_gap", 200), kw.get("state_free_lr_scale", 1.0), kw.get("state_free", "signsgd")
    m_, n_ = p.shape
    left = m_ <= n_
    r = _rank(kw, min(m_, n_))
    p = p.clone()
    for t, g in enumerate(grads, 1):
        if (t - 1) % T == 0:
            P = _svd_basis(g, r, left)
            shape = (r, n_) if left else (m_, r)
            M, V = torch.zeros(shape, dtype=g.dtype), torch.zeros(shape, dtype=g.dtype)
        s = (t - 1) % T + 1
        R = _proj(P, g, left)
        p = p * (1 - lr * wd)
        res = g - _back(P, R, left)
        p = p - lr * gamma * (torch.sign(res) if free == "signsgd" else res)
        M = b1 * M + (1 - b1) * R
        V = b2 * V + (1 - b2) * R * R
        p = p - lr * _back(P, (M / (1 - b1**s)) / (torch.sqrt(V / (1 - b2**s)) + eps), left)
    return p


def ref_subset_norm(p, grads, kw):
    """AdamSNSM: per-column (m <= n) or per-row (m > n) second moment, SVD subspace momentum."""
    assert kw["projection"] == "svd"
    lr, (b1, b2), eps, wd = kw.get("lr", 1e-3), kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-8), kw.get("weight_decay", 0.0)
    T, red = kw.get("update_proj_gap", 200), kw.get("subset_reduction", "mean")
    ada = kw.get("adagrad", False)
    m_, n_ = p.shape
    left = m_ <= n_
    r = _rank(kw, min(m_, n_))
    dim = 0 if left else 1
    v = torch.zeros((1, n_) if left else (m_, 1), dtype=p.dtype)
    p = p.clone()
    for t, g in enumerate(grads, 1):
        if (t - 1) % T == 0:
            P = _svd_basis(g, r, left)
            M = torch.zeros((r, n_) if left else (m_, r), dtype=g.dtype)
        s = (t - 1) % T + 1
        p = p * (1 - lr * wd)
        sq = (g**2).sum(dim, keepdim=True)
        if red == "mean":
            sq = sq / g.shape[dim]
        v = v + sq if ada else b2 * v + (1 - b2) * sq
        bc2 = 1.0 if ada else 1 - b2**t
        R = _proj(P, g, left)
        M = b1 * M + (1 - b1) * R
        N = _back(P, M / (1 - b1**s), left) + (g - _back(P, R, left))
        p = p - lr * N / (torch.sqrt(v / bc2) + eps)
    return p


def ref_dct(p, grads, kw):
    """DCT-AdamW: top-r DCT columns by l1 alignment, moments rotated by P_new^T P_old on refresh.

    Bias corrections: "keep" uses the global step t; "reset" the steps since the refresh; "rotate"
    each direction's own count ``a`` of steps since it entered the subspace, carried by the same
    rotation as the moments (a direction new after a refresh restarts at 0)."""
    lr, (b1, b2), eps, wd = kw.get("lr", 1e-3), kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-8), kw.get("weight_decay", 0.0)
    T, ordn, mode = kw.get("update_proj_gap", 200), kw.get("dct_norm", 1), kw.get("on_refresh", "rotate")
    m_, n_ = p.shape
    left = m_ <= n_
    d = min(m_, n_)
    r = _rank(kw, d)
    Q = dct_matrix(d).to(p.dtype)
    p = p.clone()
    P = None
    for t, g in enumerate(grads, 1):
        if (t - 1) % T == 0:
            S = Q.t() @ g if left else g @ Q
            dim = 1 if left else 0
            scores = S.abs().sum(dim) if ordn == 1 else (S**2).sum(dim).sqrt()
            idx = torch.topk(scores, r).indices.sort().values
            Pn = Q[:, idx]
            if P is None:
                shape = (r, n_) if left else (m_, r)
                M, V = torch.zeros(shape, dtype=g.dtype), torch.zeros(shape, dtype=g.dtype)
                age = torch.zeros(r, dtype=g.dtype)
            elif mode == "rotate":
                Rot = Pn.t() @ P  # (r_new, r_old)
                M, V = (Rot @ M, Rot @ V) if left else (M @ Rot.t(), V @ Rot.t())
                age = (Rot.abs() @ age).round()
            elif mode == "reset":
                M, V = torch.zeros_like(M), torch.zeros_like(V)
            P = Pn
        age = age + 1
        s = {"keep": t, "reset": (t - 1) % T + 1}.get(mode)
        c = torch.full((r,), float(s), dtype=g.dtype) if s is not None else age
        c = c.view(-1, 1) if left else c.view(1, -1)
        R = P.t() @ g if left else g @ P
        p = p * (1 - lr * wd)
        M = b1 * M + (1 - b1) * R
        V = b2 * V + (1 - b2) * R * R
        U = (M / (1 - b1**c)) / (torch.sqrt(V / (1 - b2**c)) + eps)
        p = p - lr * (P @ U if left else U @ P.t())
    return p


SPECS = [
    OptimSpec(
        lit_optim.FRUGAL,
        inputs=[
            {},
            {"projection": "svd", "weight_decay": 0.1, "update_proj_gap": 3},
            {"projection": "blockwise", "update_proj_gap": 2},
            {"projection": "random", "state_free": "sgd", "update_proj_gap": 2, "rank": 2},
            {"projection": "topk", "state_full": "sgdm", "update_proj_gap": 3},
            {"projection": "dct", "update_proj_gap": 2, "reset_state": False, "state_free_lr_scale": 0.5},
            {"projection": "svd", "state_free": "none", "update_proj_gap": 2},
            {"projection": "svd", "proj_dtype": "bfloat16", "update_proj_gap": 2},
        ],
        errors=COMMON
        + BETAS
        + [
            ErrorInput({"projection": "qr"}, ValueError, r"projection must be one of \['svd', .*'blockwise'\] or a callable.*got 'qr'"),
            ErrorInput({"state_free": "adam"}, ValueError, r"state_free must be one of \['signsgd', 'sgd', 'none'\], got 'adam'"),
            ErrorInput({"state_full": "lion"}, ValueError, r"state_full must be one of \['adamw', 'sgdm'\], got 'lion'"),
            ErrorInput({"projection": "blockwise", "rank": 4}, ValueError, r"projection='blockwise' needs rank as a fraction"),
            ErrorInput({"state_free_lr_scale": -1.0}, ValueError, r"state_free_lr_scale must be in \[0, inf\), got -1.0"),
            ErrorInput({"seed": 1.5}, TypeError, r"seed must be an int, got float 1.5"),
            ErrorInput({"proj_dtype": "int8"}, ValueError, r"proj_dtype must be None or a floating torch dtype .*got 'int8'"),
        ],
        reference=ref_frugal,
        reference_kwargs={"projection": "svd", "lr": 0.05, "weight_decay": 0.1, "rank": 2, "update_proj_gap": 2},
        reference_shape=(3, 5),
    ),
    OptimSpec(
        lit_optim.SubsetNormAdam,
        inputs=[
            {},
            {"projection": "svd", "weight_decay": 0.1, "update_proj_gap": 2},
            {"projection": "randk", "subset_reduction": "sum", "update_proj_gap": 3},
            {"subspace_momentum": False, "adagrad": True},
            {"projection": "random", "reset_momentum": False, "update_proj_gap": 2, "rank": 2},
            {"projection": "dct", "update_proj_gap": 2},
            {"projection": "dct", "update_proj_gap": 2, "proj_dtype": "bfloat16"},
        ],
        errors=COMMON
        + BETAS
        + [
            ErrorInput({"betas": (0.9, 1.1)}, ValueError, r"betas\[1\] must be in \[0, 1\), got 1.1"),
            ErrorInput({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in \[0, 1\), got 1.0 .*pass adagrad=True"),
            ErrorInput({"projection": "blockwise"}, ValueError, r"projection must be one of .*got 'blockwise'"),
            ErrorInput({"subset_reduction": "max"}, ValueError, r"subset_reduction must be one of \['mean', 'sum'\], got 'max'"),
            ErrorInput({"proj_dtype": "int8"}, ValueError, r"proj_dtype must be None or a floating torch dtype .*got 'int8'"),
        ],
        reference=ref_subset_norm,
        reference_kwargs={"projection": "svd", "lr": 0.05, "weight_decay": 0.1, "rank": 2, "update_proj_gap": 2},
        reference_shape=(5, 3),
    ),
    OptimSpec(
        lit_optim.DCTLowRank,
        inputs=[
            {"update_proj_gap": 5},
            {"update_proj_gap": 2, "on_refresh": "keep", "weight_decay": 0.1},
            {"update_proj_gap": 2, "on_refresh": "reset", "rank": 3, "dct_norm": 2},
            {"update_proj_gap": 2, "proj_dtype": "bfloat16"},
        ],
        errors=COMMON
        + BETAS
        + [
            ErrorInput({"dct_norm": 3}, ValueError, r"dct_norm must be one of \[1, 2\], got 3"),
            ErrorInput({"on_refresh": "project"}, ValueError, r"on_refresh must be one of \['rotate', 'keep', 'reset'\]"),
            ErrorInput({"proj_dtype": "int8"}, ValueError, r"proj_dtype must be None or a floating torch dtype .*got 'int8'"),
        ],
        reference=ref_dct,
        reference_kwargs={"lr": 0.05, "weight_decay": 0.1, "rank": 2, "update_proj_gap": 2},
        reference_shape=(4, 7),
    ),
]
