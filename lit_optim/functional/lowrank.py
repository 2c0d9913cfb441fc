"""Low-rank gradient projections shared by the memory-reduced optimizers (FRUGAL, Subset-Norm with
Subspace-Momentum, DCT low-rank).

Conventions. A parameter with ``ndim >= 2`` is seen as a matrix ``G`` of shape ``(m, n)`` with
``m = shape[0]`` and ``n = numel / m`` (conv kernels are flattened). The projection acts on the
smaller side ``d = min(m, n)`` and keeps the larger one, as GaLore does:

* ``side == "left"`` (``m <= n``): a basis ``P`` of shape ``(m, r)``; ``R = P^T G`` has shape
  ``(r, n)`` and ``back(X) = P X``.
* ``side == "right"`` (``m > n``): a basis ``P`` of shape ``(n, r)``; ``R = G P`` has shape
  ``(m, r)`` and ``back(X) = X P^T``.

Two kinds of basis are supported: a dense one (a float tensor ``(d, r)`` with orthonormal columns)
and a coordinate one (an ``int64`` tensor of ``r`` sorted row indices for ``"left"``, column indices
for ``"right"``), which selects rows/columns of ``G`` and costs no matrix product at all.

Basis rules (each is a function of the current gradient and, for the random ones, of a seed, so
that a run resumed from a checkpoint draws exactly the same subspaces):

* :func:`svd_basis`: the top-``r`` singular vectors of ``G`` (GaLore), computed from the
  eigen-decomposition of the ``d x d`` Gram matrix (:func:`gram`, :func:`basis_from_gram`),
  several times faster on CPU than a full SVD.
* :func:`random_basis`: a random orthonormal basis (QR of a Gaussian matrix).
* :func:`random_indices`: ``r`` coordinates drawn uniformly without replacement (RandK).
* :func:`topk_indices`: the ``r`` rows/columns of ``G`` with the largest norms.
* :func:`lit_optim.functional.dct.dct_indices`: the ``r`` DCT basis vectors best aligned with ``G``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "add_back_",
    "basis_from_gram",
    "gram",
    "lowrank_shape",
    "matrix_shape",
    "project",
    "project_back",
    "projection_side",
    "random_basis",
    "random_indices",
    "resolve_rank",
    "seeded_generator",
    "svd_basis",
    "topk_indices",
]


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """``(m, n)`` of the matrix view of a parameter with ``ndim >= 2``: ``m = shape[0]``."""
    if len(shape) < 2:
        raise ValueError(f"a matrix view needs a tensor with at least 2 dimensions, got shape {tuple(shape)}")
    m = int(shape[0])
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return m, n


def projection_side(m: int, n: int) -> str:
    """``"left"`` when ``m <= n`` (project the rows' space), else ``"right"``."""
    return "left" if m <= n else "right"


def resolve_rank(rank: int | float, d: int) -> int:
    """Rank used for a matrix whose smaller side is ``d``: ``rank`` itself when it is an int (capped
    at ``d``), ``ceil(rank * d)`` when it is a fraction in (0, 1]."""
    if d <= 0:
        return 0
    if isinstance(rank, bool):
        raise TypeError(f"rank must be an int >= 1 or a float in (0, 1], got {rank!r}")
    if isinstance(rank, int):
        return max(1, min(rank, d))
    return max(1, min(d, math.ceil(rank * d - 1e-9)))


def lowrank_shape(m: int, n: int, r: int) -> tuple[int, int]:
    """Shape of the projected gradient: ``(r, n)`` for ``"left"``, ``(m, r)`` for ``"right"``."""
    return (r, n) if projection_side(m, n) == "left" else (m, r)


def project(g: Tensor, basis: Tensor, side: str, dtype: torch.dtype | None = None) -> Tensor:
    """``P^T G`` (left) or ``G P`` (right) for a dense basis; the selected rows (left) or columns
    (right) for an index basis. ``g`` is the ``(m, n)`` matrix view; returns a new tensor of
    ``g``'s dtype. ``dtype``: run the product in this dtype (e.g. ``torch.bfloat16``: 3-4x faster
    matrix products on CPUs with bf16 units and on GPUs), the result cast back."""
    if basis.dtype == torch.int64:
        return g.index_select(0 if side == "left" else 1, basis)
    if dtype is not None and dtype != g.dtype:
        return project(g.to(dtype), basis.to(dtype), side).to(g.dtype)
    if side == "left":
        return basis.t() @ g
    return g @ basis


def project_back(x: Tensor, basis: Tensor, side: str, m: int, n: int) -> Tensor:
    """The ``(m, n)`` contiguous matrix ``P X`` (left) or ``X P^T`` (right); for an index basis the
    rows/columns of ``x`` are placed at the selected indices and the rest is zero."""
    if basis.dtype == torch.int64:
        out = x.new_zeros(m, n)
        out.index_copy_(0 if side == "left" else 1, basis, x)
        return out
    if side == "left":
        return basis @ x
    return x @ basis.t()


def add_back_(
    out: Tensor, x: Tensor, basis: Tensor, side: str, alpha: float = 1.0, dtype: torch.dtype | None = None
) -> Tensor:
    """``out += alpha * back(x)`` in place for an ``(m, n)`` contiguous ``out``; an index basis
    touches only the selected rows/columns (no full-size temporary; the indices must be distinct,
    as every built-in rule's are). ``dtype``: run the product of
    a dense basis in this dtype (see :func:`project`) and add the result to ``out``."""
    if basis.dtype == torch.int64:
        if side == "left":
            out.index_add_(0, basis, x, alpha=alpha)
        else:
            # index_add_ along the strided dimension is 5-10x slower on a CPU than gathering the
            # columns, adding and scattering them back (the indices are distinct)
            cols = out.index_select(1, basis)
            cols.add_(x, alpha=alpha)
            out.index_copy_(1, basis, cols)
        return out
    if dtype is not None and dtype != out.dtype:
        b, xd = basis.to(dtype), x.to(dtype)
        return out.add_(b @ xd if side == "left" else xd @ b.t(), alpha=alpha)
    if side == "left":
        return out.addmm_(basis, x, alpha=alpha)
    return out.addmm_(x, basis.t(), alpha=alpha)


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed is a fixed mix of the integer ``keys`` (e.g. the optimizer seed,
    the parameter's index and the refresh count): the same keys always draw the same numbers, so
    random subspaces need no saved RNG state to resume exactly."""
    h = 1469598103934665603
    for k in keys:
        h ^= int(k) & 0xFFFFFFFFFFFFFFFF
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


def gram(g: Tensor, side: str) -> Tensor:
    """The ``d x d`` Gram matrix of the projected side of the ``(m, n)`` matrix ``g``: ``G G^T``
    (``"left"``) or ``G^T G`` (``"right"``), in float32 (float64 for float64 input). When the kept
    side of ``G`` is split over several ranks, the Gram matrix of the whole matrix is the sum of the
    ranks' Gram matrices (what the sharded path of the optimizers reduces)."""
    work = g.detach().to(torch.float64 if g.dtype == torch.float64 else torch.float32)
    return work @ work.t() if side == "left" else work.t() @ work


def basis_from_gram(gram_matrix: Tensor, r: int, dtype: torch.dtype) -> Tensor:
    """The eigenvectors of the ``r`` largest eigenvalues of a Gram matrix, as a ``(d, r)`` tensor of
    ``dtype`` with the sign of each vector fixed (largest-magnitude entry positive), so that the
    result does not depend on the LAPACK path taken."""
    _, vecs = torch.linalg.eigh(gram_matrix)
    top = vecs[:, -r:].flip(1)
    idx = top.abs().argmax(0)
    signs = torch.sign(top.gather(0, idx.unsqueeze(0)))
    signs[signs == 0] = 1.0
    return (top * signs).to(dtype).contiguous()


def svd_basis(g: Tensor, r: int, side: str) -> Tensor:
    """Top-``r`` left (``"left"``) or right (``"right"``) singular vectors of ``g`` as a ``(d, r)``
    tensor of ``g``'s dtype.

    Computed from the eigen-decomposition of the ``d x d`` Gram matrix ``G G^T`` (left) or
    ``G^T G`` (right) (:func:`gram`, :func:`basis_from_gram`), in float32 (float64 for float64
    input): the eigenvectors of the ``r`` largest eigenvalues are the top singular vectors. On a CPU
    this is several times faster than ``torch.linalg.svd`` of ``G``. The sign of each vector is
    fixed (largest-magnitude entry positive) so that the result does not depend on the LAPACK path
    taken.
    """
    return basis_from_gram(gram(g, side), r, g.dtype)


def random_basis(d: int, r: int, generator: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """A ``(d, r)`` basis with orthonormal columns: the Q factor of a Gaussian matrix drawn from
    ``generator`` (in float64 on the CPU, so the draw is the same on every device)."""
    a = torch.randn(d, r, generator=generator, dtype=torch.float64)
    q, rr = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(rr)).where(torch.diagonal(rr) != 0, torch.ones(()))
    return q.to(device=device, dtype=dtype).contiguous()


def random_indices(d: int, r: int, generator: torch.Generator, device) -> Tensor:
    """``r`` sorted indices drawn uniformly without replacement from ``range(d)`` (RandK)."""
    return torch.randperm(d, generator=generator)[:r].sort().values.to(device)


def topk_indices(g: Tensor, r: int, side: str, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Sorted indices of the ``r`` rows (left) or columns (right) of ``g`` with the largest
    Euclidean norms.

    ``reduce``: for a ``g`` that holds only part of the kept side of the matrix (a shard), a
    function summing a per-line statistic over all parts (an all-reduce); the squared norms of this
    part are reduced before the selection, so every part selects the same lines."""
    dim = 1 if side == "left" else 0
    if reduce is None:
        norms = torch.linalg.vector_norm(g.float(), dim=dim)
    else:
        norms = reduce(g.float().square().sum(dim)).sqrt()
    return torch.topk(norms, r, sorted=False).indices.sort().values
