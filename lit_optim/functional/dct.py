"""The Discrete Cosine Transform basis and the gradient-aligned column selection of "SVD-Free
Low-Rank Adaptive Gradient Optimization for Large Language Models" (Modoranu, Safaryan,
Schultheis & Alistarh, 2025, arXiv:2505.17967).

The orthonormal DCT-II basis of size ``d`` has the columns

.. math::
    Q_{ij} = \\sqrt{2/d}\\; c_j \\cos\\!\\Big(\\frac{\\pi (2i + 1) j}{2d}\\Big), \\qquad
    c_0 = 1/\\sqrt{2},\\; c_{j>0} = 1,

so ``Q^T Q = I``. It is built once per (size, dtype, device) and shared by every layer of that
size. For a gradient ``G`` (``m x n``, projected on its smaller side ``d``), one matrix product
``S = Q^T G`` (left) or ``S = G Q`` (right) gives the alignment of every basis vector with the
gradient; the ``r`` vectors with the largest ``l1`` (default) or ``l2`` norms of their row/column of
``S`` are selected, and only their indices are stored.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["clear_dct_cache", "dct_basis", "dct_cache_bytes", "dct_indices"]

_CACHE: dict[tuple[int, torch.dtype, str], Tensor] = {}
_LOCK = threading.Lock()


def _build(d: int) -> Tensor:
    i = torch.arange(d, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(d, dtype=torch.float64).unsqueeze(0)
    q = torch.cos(math.pi * (2 * i + 1) * j / (2 * d)) * math.sqrt(2.0 / d)
    q[:, 0] /= math.sqrt(2.0)
    return q


def dct_basis(d: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The ``(d, d)`` orthonormal DCT-II basis (basis vectors as columns), computed in float64 and
    cached per ``(d, dtype, device)``; the returned tensor is shared: do not modify it."""
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise ValueError(f"d must be an integer >= 1, got {d!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (d, dtype, str(dev))
    q = _CACHE.get(key)
    if q is None:
        with _LOCK:
            q = _CACHE.get(key)
            if q is None:
                q = _build(d).to(device=dev, dtype=dtype)
                _CACHE[key] = q
    return q


def clear_dct_cache() -> None:
    """Drop the cached DCT bases (they are rebuilt on demand)."""
    with _LOCK:
        _CACHE.clear()


def dct_cache_bytes() -> int:
    """Bytes held by the cached DCT bases (shared by all layers and optimizers)."""
    return sum(q.numel() * q.element_size() for q in _CACHE.values())


def dct_indices(
    g: Tensor,
    r: int,
    side: str,
    norm: int = 1,
    basis: Tensor | None = None,
    dtype: torch.dtype | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Select the ``r`` DCT basis vectors most aligned with the ``(m, n)`` gradient matrix ``g``.

    Returns ``(indices, projected)``: the sorted ``int64`` indices of the selected basis vectors and
    the projected gradient (``Q[:, idx]^T G`` for ``"left"``, ``G Q[:, idx]`` for ``"right"``),
    read off the alignment product so that the selection step costs a single matrix product.
    ``dtype``: run that product in this dtype (e.g. ``torch.bfloat16``); the projected gradient is
    returned in ``g``'s dtype. ``reduce``: for a ``g`` that holds only part of the kept side of the
    matrix (a shard), a function summing the per-vector scores over all parts (an all-reduce): the
    ``l1`` norms (or squared ``l2`` norms) of this part are reduced before the selection, so every
    part selects the same vectors and returns its part of the projected gradient.
    """
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2, got {norm!r}")
    d = g.shape[0] if side == "left" else g.shape[1]
    out_dtype = g.dtype
    if dtype is not None and dtype != g.dtype:
        g = g.to(dtype)
    q = basis.to(g.dtype) if basis is not None else dct_basis(d, g.dtype, g.device)
    s = q.t() @ g if side == "left" else g @ q
    dim = 1 if side == "left" else 0
    if reduce is None:
        scores = torch.linalg.vector_norm(s.float(), ord=norm, dim=dim)
    else:
        part = s.float().abs().sum(dim) if norm == 1 else s.float().square().sum(dim)
        scores = reduce(part)
        if norm == 2:
            scores = scores.sqrt()
    idx = torch.topk(scores, r, sorted=False).indices.sort().values
    proj = s.index_select(0 if side == "left" else 1, idx)
    return idx, proj.to(out_dtype)
