r"""Matrix normalizations used by the orthogonalized family (all batched over leading dimensions:
an input of shape ``(..., m, n)`` is a stack of ``m x n`` matrices, each normalized on its own).

* :func:`row_normalize` / :func:`col_normalize`: every row (column) rescaled to Euclidean norm
  :math:`\sqrt{n}` (:math:`\sqrt{m}`), i.e. root-mean-square 1 per entry.
* :func:`multi_normalize`: the alternating scheme of *Gradient Multi-Normalization for Stateless
  and Scalable LLM Training* (Scetbon, Ma, Gong & Meeds, 2025, arXiv:2502.06742): project onto each
  norm's sphere in turn, ``iters`` times, converging to a matrix normalized w.r.t. all of them.
  ``("row", "col")`` is SR-Sinkhorn, the update of SinkGD (:func:`sinkhorn_normalize`).
* :func:`cosh_rms_normalize`: AuON's hyperbolic-cosine RMS scaling of the Frobenius-normalized
  momentum (Maity, 2025, arXiv:2509.24320), linear time, spectral norm <= Frobenius norm <= 1.
* :func:`cosh_rms_scale`: the cosh-RMS brake alone, :math:`Y / (\mathrm{rms}(\cosh(\gamma Y)) +
  \delta)`, which Hybrid-AuON applies to the output of one Newton-Schulz step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .newton_schulz import Coefficients, newton_schulz

__all__ = [
    "MULTI_NORMS",
    "col_normalize",
    "cosh_rms_normalize",
    "cosh_rms_scale",
    "multi_normalize",
    "row_l2_norms",
    "row_normalize",
    "sinkhorn_normalize",
]

#: norms accepted by :func:`multi_normalize`
MULTI_NORMS = ("row", "col", "spectral", "frobenius")


def row_l2_norms(x: Tensor) -> Tensor:
    """Euclidean norm of each row, shape ``(..., m, 1)``."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def row_normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Rows rescaled to norm :math:`\sqrt{n}`: :math:`\sqrt{n}\,Q(X)^{-1}X` (a new tensor)."""
    n = x.shape[-1]
    return x * (math.sqrt(n) / (row_l2_norms(x) + eps))


def col_normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Columns rescaled to norm :math:`\sqrt{m}`: :math:`\sqrt{m}\,X R(X)^{-1}` (a new tensor)."""
    m = x.shape[-2]
    return x * (math.sqrt(m) / (torch.linalg.vector_norm(x, dim=-2, keepdim=True) + eps))


def sinkhorn_normalize(x: Tensor, iters: int = 5, eps: float = 1e-8) -> Tensor:
    r"""SR-Sinkhorn (Algorithm 3 of Scetbon et al.): ``iters`` rounds of row then column
    normalization. The fixed point has all row norms :math:`\sqrt{n}` and column norms
    :math:`\sqrt{m}`; each round costs :math:`O(mn)`."""
    for _ in range(iters):
        x = col_normalize(row_normalize(x, eps), eps)
    return x


def multi_normalize(
    x: Tensor,
    norms: Sequence[str] = ("row", "col"),
    iters: int = 5,
    eps: float = 1e-8,
    ns_steps: int = 5,
    ns_coefficients: Coefficients = "quintic",
) -> Tensor:
    r"""Alternating multi-normalization (Algorithm 1 of Scetbon et al.).

    Each norm maps the matrix onto its sphere scaled to RMS 1 per entry:

    * ``"row"``: rows to norm :math:`\sqrt{n}`; ``"col"``: columns to norm :math:`\sqrt{m}`;
    * ``"spectral"``: the (Newton-Schulz) polar factor times :math:`\sqrt{\max(m, n)}`
      (``("row", "spectral")`` with ``iters=1`` is the stateless SWAN-style update: row
      normalization, then whitening);
    * ``"frobenius"``: the whole matrix to norm :math:`\sqrt{mn}`.
    """
    for name in norms:
        if name not in MULTI_NORMS:
            raise ValueError(f"norms entries must be in {list(MULTI_NORMS)}, got {name!r}")
    m, n = x.shape[-2], x.shape[-1]
    for _ in range(iters):
        for name in norms:
            if name == "row":
                x = row_normalize(x, eps)
            elif name == "col":
                x = col_normalize(x, eps)
            elif name == "frobenius":
                x = x * (math.sqrt(m * n) / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps))
            else:
                x = newton_schulz(x, ns_steps, ns_coefficients, dtype=x.dtype).mul_(math.sqrt(max(m, n)))
    return x


def cosh_rms_scale(y: Tensor, gamma: float = 1.0, eps: float = 1e-8) -> Tensor:
    r"""The cosh-RMS brake of AuON on each matrix of ``y`` (a new tensor):

    .. math::
        r = \sqrt{\operatorname{mean}\big(\cosh(\gamma Y)^2\big)}, \qquad U = \frac{Y}{r + \delta}

    with :math:`\delta` = ``eps``. Since :math:`r \ge 1`, every norm of :math:`U` is at most that of
    :math:`Y`; entries far above the RMS raise :math:`r` and shrink the whole matrix. With
    ``gamma=1`` this is Hybrid-AuON's :math:`Y / (\mathrm{rms}(\cosh(Y)) + \delta)`.
    """
    dims = (-2, -1)
    r = torch.cosh(y * gamma).square().mean(dim=dims, keepdim=True).sqrt_()
    return y / r.add_(eps)


def cosh_rms_normalize(x: Tensor, gamma: float = 1.5, eps: float = 1e-8, norm_eps: float = 1e-7) -> Tensor:
    r"""AuON's normalization of a momentum matrix (a new tensor).

    .. math::
        G = \frac{X}{\lVert X\rVert_F + 10^{-7}}, \qquad
        r = \sqrt{\operatorname{mean}\big(\cosh(\gamma G)^2\big)}, \qquad
        U = \frac{G}{r + 10^{-8}}

    i.e. :func:`cosh_rms_scale` of the Frobenius-normalized :math:`X`. Since :math:`\cosh \ge 1`,
    :math:`r \ge 1` and :math:`\lVert U\rVert_2 \le \lVert U\rVert_F \le 1`: the update stays in
    the unit spectral-norm trust region without building an orthogonal matrix. Large entries raise
    :math:`r` and brake the whole step.
    """
    g = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + norm_eps)
    return cosh_rms_scale(g, gamma, eps)
