"""Hutchinson estimators of the Hessian diagonal and trace.

Paper: *ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning*, Yao, Gholami, Shen,
Mustafa, Keutzer & Mahoney, AAAI 2021 (arXiv:2006.00719), after Bekas, Kokiopoulou & Saad,
*An estimator for the diagonal of a matrix* (2007) and Hutchinson (1990).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ..functional.hutchinson import (
    PROBE_DISTRIBUTIONS,
    differentiable_grads,
    hessian_vector_product,
    probe_like,
)
from .sharded import refuse_sharded_double_backward

__all__ = ["hutchinson_diagonal", "hutchinson_trace"]


def _check_common(n: int, name: str, distribution: str, loss_scale: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    if distribution not in PROBE_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {list(PROBE_DISTRIBUTIONS)}, got {distribution!r}")
    if not (isinstance(loss_scale, (int, float)) and loss_scale > 0 and loss_scale != float("inf")):
        raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")


def _grads_with_graph(loss: Tensor, params: list[Tensor], loss_scale: float) -> list[Tensor | None]:
    grads = differentiable_grads(loss * loss_scale if loss_scale != 1.0 else loss, params)
    used = [g for g in grads if g is not None]
    if not used:
        raise ValueError("the loss does not depend on any of the given parameters")
    flat = [i for i, g in enumerate(grads) if g is not None and not g.requires_grad]
    if len(flat) == len(used):
        raise ValueError(
            "the gradient does not depend on the parameters (no graph through the backward pass): either the "
            "loss is linear in them, or an op between the loss and the parameters does not record its backward "
            "for double differentiation; Hessian-vector products cannot be taken through it"
        )
    if flat:
        warnings.warn(
            f"Hutchinson: the gradients of {len(flat)} parameter(s) (indices {flat[:8]}) carry no graph, so their "
            "Hessian diagonal is estimated as 0. This is exact when the loss is linear in them; otherwise an op on "
            "their path is not twice differentiable.",
            stacklevel=3,
        )
    return grads


def hutchinson_diagonal(
    loss: Tensor,
    params: Sequence[Tensor],
    n_probes: int = 1,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    loss_scale: float = 1.0,
) -> list[Tensor | None]:
    r"""Hutchinson estimate of the diagonal of the Hessian of ``loss`` w.r.t. ``params``.

    .. math::
        \widehat{\operatorname{diag}}(H) = \frac{1}{S} \sum_{s=1}^{S} v_s \odot (H v_s),
        \qquad E[v v^\top] = I,

    unbiased; with Rademacher probes its variance at entry :math:`i` is
    :math:`\frac{1}{S}\sum_{j\ne i} H_{ij}^2` (exact for a diagonal Hessian). Each product
    :math:`Hv` is one extra backward through the gradient, which is computed once with
    ``create_graph=True`` by :func:`torch.autograd.grad`; ``param.grad`` is neither read nor written
    and the double-backward graph is freed on return.

    Args:
        loss: scalar loss with its graph (do not call ``backward()`` on it first).
        params: the parameters; the result is aligned with them.
        n_probes: :math:`S`, the number of probes averaged (error falls as :math:`1/\sqrt{S}`).
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        generator: ``torch.Generator`` on the parameters' device for reproducible probes.
        loss_scale: the loss is multiplied by this before differentiating and the estimate divided
            by it (keeps float16 gradients from underflowing; AMP's loss scale).

    Returns:
        One tensor per parameter shaped like it, or None for a parameter the loss does not use.

    Raises:
        lit_optim.functional.hutchinson.DoubleBackwardError: an op on the path (e.g. fused
            scaled-dot-product attention) has no double backward; the message names the fixes.
        lit_optim.curvature.sharded.ShardedDoubleBackwardError: the parameters are FSDP2 / DTensor
            shards, through which no double backward can run (use :func:`gnb_diagonal` there).
    """
    _check_common(n_probes, "n_probes", distribution, loss_scale)
    params = list(params)
    refuse_sharded_double_backward(params, "hutchinson_diagonal")
    grads = _grads_with_graph(loss, params, loss_scale)
    diag: list[Tensor | None] = [None if g is None else torch.zeros_like(p) for g, p in zip(grads, params)]
    for s in range(n_probes):
        vs = [None if g is None else probe_like(p, distribution, generator) for g, p in zip(grads, params)]
        hv = hessian_vector_product(grads, params, vs, retain_graph=s + 1 < n_probes)
        with torch.no_grad():
            for d, v, h in zip(diag, vs, hv):
                if d is not None and h is not None:
                    d.addcmul_(v, h)
    del grads
    scale = 1.0 / (n_probes * loss_scale)
    with torch.no_grad():
        for d in diag:
            if d is not None:
                d.mul_(scale)
    return diag


def hutchinson_trace(
    loss: Tensor,
    params: Sequence[Tensor],
    n_probes: int = 1,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    loss_scale: float = 1.0,
) -> Tensor:
    r"""Hutchinson estimate of :math:`\operatorname{tr}(H)`:
    :math:`\frac{1}{S}\sum_s v_s^\top H v_s` (unbiased), a float32 scalar tensor.

    The *dynamical stability* bound of Wu, Wang & Su (*The Implicit Regularization of Dynamical
    Stability in Stochastic Gradient Descent*, ICML 2023): a minimum linearly stable for SGD with
    learning rate :math:`\eta` has :math:`\operatorname{tr}(H) \le 2/\eta`. Arguments as in
    :func:`hutchinson_diagonal`.
    """
    diag = hutchinson_diagonal(loss, params, n_probes, distribution, generator, loss_scale)
    total = torch.zeros((), dtype=torch.float32, device=loss.device)
    for d in diag:
        if d is not None:
            total = total + d.detach().float().sum().to(total.device)
    return total
