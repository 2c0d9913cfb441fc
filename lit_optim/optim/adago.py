"""AdaGO: orthogonalized momentum with an AdaGrad-norm step size."""

from __future__ import annotations

from typing import Any

import torch

from ..registry import register_optimizer
from ._base import check_non_negative, check_positive
from ._orthogonal import (
    OrthogonalOptimizer,
    _state_dtype,
    momentum_defaults,
    ns_group_defaults,
    shared_kwargs,
    with_common_args_doc,
)

__all__ = ["AdaGO"]


@register_optimizer(
    "adago",
    family="orthogonalized",
    paper="AdaGrad Meets Muon: Adaptive Stepsizes for Orthogonal Updates (Zhang, Liu & Schaeffer, 2025)",
    summary="Muon's orthogonal direction times an AdaGrad-norm step size (one extra scalar per matrix)",
    default_lr=0.05,
    grouping="matrix",
)
@with_common_args_doc
class AdaGO(OrthogonalOptimizer):
    r"""AdaGO: AdaGrad-norm step sizes for orthogonalized updates.

    Paper: *AdaGrad Meets Muon: Adaptive Stepsizes for Orthogonal Updates*, Minxin Zhang, Yuxuan
    Liu & Hayden Schaeffer, 2025 (arXiv:2509.02981).

    For every matrix with gradient :math:`G_t` (Frobenius norm :math:`\lVert G_t\rVert`):

    .. math::
        M_t &= \mu M_{t-1} + (1-\mu) G_t, \qquad O_t = \mathrm{NS}_k(M_t) \\
        v_t^2 &= v_{t-1}^2 + \min(\lVert G_t\rVert, \gamma)^2 \\
        \alpha_t &= \eta\,\max\!\Big(\epsilon,\ \frac{\min(\lVert G_t\rVert, \gamma)}{v_t}\Big) \\
        \theta_t &= (1 - \eta\lambda)\,\theta_{t-1} - \alpha_t\, s(m, n)\, O_t

    The paper's floor is an absolute :math:`\epsilon_{\text{paper}}`; we write it relative to the
    learning rate (:math:`\epsilon_{\text{paper}} = \eta\epsilon`) so that a learning-rate
    schedule, or ``lr=0``, scales the whole step. :math:`v_t^2` (``sum_sq`` in the state, one
    number per matrix, float32 for half-precision parameters) is the only extra state.

    Under FSDP2 the gradient norm is taken on the matrix's owner rank over the whole gradient
    (which travels to the owner with the momentum, so AdaGO communicates about 1.5x Muon's bytes),
    and ``sum_sq`` is a regular tensor replicated on every rank (the owner sends its new value with
    the result), equal to the one-process value.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (default 0.05).
        momentum: :math:`\mu` (default 0.95).
        nesterov: orthogonalize the Nesterov form instead of :math:`M_t` (default False, as the paper).
        weight_decay: decoupled :math:`\lambda` (default 0).
        gamma: :math:`\gamma`, the cap on the gradient norm (default 10).
        eps: relative floor :math:`\epsilon` of the step size (default 0.01, i.e. the absolute
            5e-4 of common implementations at ``lr=0.05``).
        v0: initial :math:`v_0 > 0` (default 1e-3).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_coefficients: Newton-Schulz coefficients (default ``"quintic"``).
        ns_eps: added to the Frobenius norm before the iteration (default 1e-7).
        ns_dtype: Newton-Schulz dtype (default None: the parameter's, at least float32).
        ns_method: ``"auto"`` (default), ``"standard"`` or ``"gram"``.
        adjust_lr: shape factor ``"original"`` (default), ``"match_rms_adamw"`` or ``"none"``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.05,
        momentum: float = 0.95,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        gamma: float = 10.0,
        eps: float = 0.01,
        v0: float = 1e-3,
        ns_steps: int = 5,
        ns_coefficients: Any = "quintic",
        ns_eps: float = 1e-7,
        ns_dtype: Any = None,
        ns_method: str = "auto",
        adjust_lr: str = "original",
        *,
        adam_lr: float = 3e-4,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-10,
        adam_weight_decay: float = 0.0,
        layerwise_noise_adaptive: bool = False,
        noise_beta: float = 0.99,
        noise_clip: float = 4.0,
        distributed: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        defaults = dict(
            lr=lr,
            weight_decay=check_non_negative("weight_decay", weight_decay),
            gamma=check_positive("gamma", gamma),
            eps=check_non_negative("eps", eps),
            v0=check_positive("v0", v0),
            **momentum_defaults(momentum, nesterov),
            **ns_group_defaults(ns_steps, ns_coefficients, ns_eps, ns_dtype, ns_method),
        )
        super().__init__(params, defaults, **shared_kwargs(locals()))

    matrix_stat_keys = ("sum_sq",)
    finish_needs_grad = True

    def _init_matrix_state(self, p, state, group):
        super()._init_matrix_state(p, state, group)
        view = self._view(p, group)
        shape = view[:1] if len(view) == 3 else ()
        state["sum_sq"] = torch.full(shape, group["v0"] ** 2, dtype=_state_dtype(p), device=p.device)

    def _matrix_state_ready(self, state):
        return "momentum_buffer" in state and "sum_sq" in state

    def _finish(self, group, params, grads, states, mats, outs):
        gamma, eps = group["gamma"], group["eps"]
        dirs = []
        for p, g, st, o in zip(params, grads, states, outs):
            acc = st["sum_sq"]
            gm = g.reshape(self._view(p, group))
            s = torch.linalg.vector_norm(gm.to(acc.dtype), dim=(-2, -1)).clamp_max(gamma)
            acc.add_(s.square())
            alpha = (s / acc.sqrt()).clamp_min(eps)
            dirs.append(o * alpha.to(o.dtype).reshape(alpha.shape + (1, 1)))
        return dirs
