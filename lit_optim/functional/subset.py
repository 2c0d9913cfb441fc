"""Subset statistics for the Subset-Norm adaptive step size of "Lean and Mean Adaptive Optimization
via Subset-Norm and Subspace-Momentum with Convergence Guarantees" (Nguyen & Nguyen, ICML 2025,
arXiv:2411.07120).

Subset-Norm shares one second-moment entry per *subset* of coordinates. For a matrix gradient the
paper's heuristic takes the subsets to be the rows or columns along the smaller side: with
``G`` of shape ``(m, n)``, ``m <= n``, each of the ``n`` columns (``m`` entries) is one subset, so the
second moment is a ``(1, n)`` row that broadcasts over ``G``; for ``m > n`` it is an ``(m, 1)``
column. That cuts the second moment of a ``d x d`` layer from ``d^2`` to ``d`` numbers
(``O(sqrt(numel))``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SUBSET_REDUCTIONS", "subset_dim", "subset_shape", "subset_sq"]

SUBSET_REDUCTIONS = ("mean", "sum")


def subset_dim(m: int, n: int) -> int:
    """The dimension reduced over (the smaller side): 0 when ``m <= n`` (subsets are columns),
    1 otherwise (subsets are rows)."""
    return 0 if m <= n else 1


def subset_shape(m: int, n: int) -> tuple[int, int]:
    """Shape of the shared second moment: ``(1, n)`` when ``m <= n``, ``(m, 1)`` otherwise."""
    return (1, n) if m <= n else (m, 1)


def subset_sq(g: Tensor, reduction: str = "mean", dim: int | None = None) -> Tensor:
    """Per-subset ``sum`` (the paper's definition, ``||g_S||^2``) or ``mean`` of the squared entries
    of the ``(m, n)`` matrix ``g``, kept as a broadcastable ``(1, n)`` or ``(m, 1)`` tensor.

    ``mean`` equals ``sum / |S|``: with it the update has the per-coordinate scale of Adam, so the
    same learning rate suits the subset-normed matrices and the coordinate-wise vectors.
    ``dim``: the dimension reduced over (default :func:`subset_dim` of ``g``'s shape); pass it when
    ``g`` is a part of a larger matrix (a shard of its other dimension), whose shape decides.
    """
    if reduction not in SUBSET_REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(SUBSET_REDUCTIONS)}, got {reduction!r}")
    if dim is None:
        dim = subset_dim(*g.shape)
    sq = torch.linalg.vector_norm(g, 2, dim=dim, keepdim=True).square_()
    if reduction == "mean":
        sq.div_(g.shape[dim])
    return sq
