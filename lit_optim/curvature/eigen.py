"""Top Hessian eigenvalue by power iteration on Hessian-vector products."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..functional.hutchinson import differentiable_grads, hessian_vector_product
from .sharded import refuse_sharded_double_backward

__all__ = ["EigenResult", "top_hessian_eigenvalue"]


class EigenResult(NamedTuple):
    #: Rayleigh quotient :math:`v^\top H v` at the last iterate (float)
    eigenvalue: float
    #: unit-norm eigenvector estimate, one block per parameter (None for unused parameters)
    vector: list[Tensor | None]
    #: Hessian-vector products taken
    iterations: int
    #: True when the relative change of the eigenvalue fell below ``tol``
    converged: bool


def _dot(a: list[Tensor | None], b: list[Tensor | None]) -> Tensor:
    total = None
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        t = torch.sum(x.double() * y.double())
        total = t if total is None else total + t.to(total.device)
    return total if total is not None else torch.zeros((), dtype=torch.float64)


def _power(grads, params, v, n_iters, tol, loss_scale, shift, last):
    """Power iteration on ``H - shift * I`` from the unit vector ``v``; returns (eigenvalue of H,
    vector, iterations, converged)."""
    eig = prev = None
    converged = False
    it = 0
    for it in range(1, n_iters + 1):
        hv = hessian_vector_product(grads, params, v, retain_graph=not (last and it == n_iters))
        hv = [None if h is None else h.detach() / loss_scale for h in hv]
        if shift:
            hv = [h if h is None or x is None else h - shift * x for h, x in zip(hv, v)]
        mu = float(_dot(v, hv))
        eig = mu + shift
        hn = math.sqrt(float(_dot(hv, hv)))
        if hn == 0 or not math.isfinite(hn):
            break
        v = [None if h is None else h / hn for h in hv]
        if prev is not None and abs(eig - prev) <= tol * max(abs(eig), abs(mu)):
            converged = True
            break
        prev = eig
    return float(eig), v, it, converged


def top_hessian_eigenvalue(
    loss: Tensor,
    params: Sequence[Tensor],
    n_iters: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    loss_scale: float = 1.0,
    init: Sequence[Tensor | None] | None = None,
    which: str = "largest",
) -> EigenResult:
    r"""The top eigenvalue of the Hessian of ``loss`` w.r.t. ``params`` by power iteration:
    :math:`v \leftarrow Hv / \lVert Hv\rVert`, :math:`\lambda = v^\top H v`.

    ``which="largest"`` (default) returns the largest (most positive) eigenvalue
    :math:`\lambda_{\max}`, the sharpness: gradient descent with learning rate :math:`\eta` is
    stable only while :math:`\lambda_{\max} \le 2/\eta`. Power iteration converges to the eigenvalue
    of largest magnitude; when that one is negative, a second run on the shifted operator
    :math:`H - \lambda_{\text{neg}} I` (whose dominant eigenvalue is
    :math:`\lambda_{\max} - \lambda_{\text{neg}} \ge 0`) finds :math:`\lambda_{\max}`.
    ``which="magnitude"`` returns the eigenvalue of largest magnitude. Each iteration costs one
    Hessian-vector product (double backward through the gradient, computed once).

    Args:
        loss: scalar loss with its graph.
        params: parameters.
        n_iters: maximum number of Hessian-vector products per power run.
        tol: stop when :math:`|\lambda_k - \lambda_{k-1}| \le \text{tol}\cdot|\lambda_k|`.
        generator: for the random start vector.
        loss_scale: see :func:`~lit_optim.curvature.hutchinson_diagonal`.
        init: start vector (e.g. the previous eigenvector, for warm starts); random if None.
        which: ``"largest"`` (default) or ``"magnitude"``.
    """
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters must be an integer >= 1, got {n_iters!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if not (isinstance(loss_scale, (int, float)) and 0 < loss_scale < float("inf")):
        raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
    if which not in ("largest", "magnitude"):
        raise ValueError(f"which must be 'largest' or 'magnitude', got {which!r}")
    params = list(params)
    refuse_sharded_double_backward(params, "top_hessian_eigenvalue")
    grads = differentiable_grads(loss * loss_scale if loss_scale != 1.0 else loss, params)
    if all(g is None or not g.requires_grad for g in grads):
        raise ValueError("the gradient does not depend on the parameters: no Hessian-vector product can be taken")
    if init is not None:
        v = [None if g is None or x is None else x.detach().to(p.dtype).clone() for g, p, x in zip(grads, params, init)]
    else:
        v = [
            None if g is None else torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            for g, p in zip(grads, params)
        ]
    norm = math.sqrt(float(_dot(v, v)))
    if norm == 0:
        raise ValueError("init must not be the zero vector")
    v = [None if x is None else x / norm for x in v]
    eig, vec, iters, converged = _power(grads, params, v, n_iters, tol, loss_scale, 0.0, last=which == "magnitude")
    if which == "largest" and eig < 0:
        # the dominant eigenvalue is negative: find the top of the spectrum of H - eig*I
        start = [
            None if g is None else torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            for g, p in zip(grads, params)
        ]
        n = math.sqrt(float(_dot(start, start)))
        start = [None if x is None else x / n for x in start]
        eig2, vec, it2, converged = _power(grads, params, start, n_iters, tol, loss_scale, eig, last=True)
        eig, iters = eig2, iters + it2
    del grads
    return EigenResult(eig, vec, iters, converged)
