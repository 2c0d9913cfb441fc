"""diffGrad."""

from __future__ import annotations

import math

from ..registry import register_optimizer
from ._base import ELEMENTWISE_BLOCK_NUMEL, LitOptimizer, apply_weight_decay, check_betas, check_lr, check_non_negative
from ._precision import Float32Math, PositiveEps, check_eps_positive

__all__ = ["DiffGrad"]

_EPS_WHY = "diffGrad divides 0 by 0 (NaN) where a gradient has always been exactly zero when eps is 0"


@register_optimizer(
    "diffgrad",
    family="Adam family",
    paper="diffGrad: An Optimization Method for Convolutional Neural Networks (Dubey et al., IEEE TNNLS 2020)",
    summary="Adam whose step is damped where the gradient changes little between steps (near optima)",
    default_lr=1e-3,
)
class DiffGrad(Float32Math, PositiveEps, LitOptimizer):
    r"""diffGrad: Adam with a friction coefficient from the change of the gradient.

    Paper: *diffGrad: An Optimization Method for Convolutional Neural Networks*, Dubey et al.,
    IEEE TNNLS 2020 (arXiv:1909.11015).

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \xi_t &= \operatorname{sigmoid}(|g_{t-1} - g_t|) \qquad (g_0 = 0) \\
        \theta_t &= \theta_{t-1} - \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
            \frac{\xi_t\, m_t}{\sqrt{v_t} + \epsilon}

    :math:`\xi_t \in [0.5, 1)`: a gradient that barely changes halves the step.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (paper default 1e-3).
        betas: :math:`(\beta_1, \beta_2)` (paper default (0.9, 0.999)); each in [0, 1).
        eps: :math:`\epsilon` (default 1e-8). Must be > 0: with ``eps=0`` a coordinate whose
            gradient has always been zero gives 0/0.
        weight_decay: :math:`\lambda` (default 0).
        decoupled_weight_decay: False (default, as in the paper's code) adds :math:`\lambda\theta` to
            the gradient; True applies :math:`\theta(1-\eta\lambda)`.
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`.

    float16 / bfloat16 parameters: the state is kept and the update computed in float32
    (:mod:`lit_optim.optim._precision`).
    """

    eps_zero_reason = _EPS_WHY
    state_keys = ("exp_avg", "exp_avg_sq", "prev_grad")
    elementwise = True
    block_numel = ELEMENTWISE_BLOCK_NUMEL

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        defaults = dict(
            lr=check_lr(lr),
            betas=check_betas(betas),
            eps=check_eps_positive(eps, _EPS_WHY),
            weight_decay=check_non_negative("weight_decay", weight_decay),
            decoupled_weight_decay=bool(decoupled_weight_decay),
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    def _update_math(self, group, params, grads, state, step, ops):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        grads = apply_weight_decay(ops, params, grads, lr, group["weight_decay"], group["decoupled_weight_decay"])
        m, v, prev = state["exp_avg"], state["exp_avg_sq"], state["prev_grad"]
        ops.lerp_(m, grads, 1.0 - beta1)
        ops.mul_(v, beta2)
        ops.addcmul_(v, grads, grads, value=1.0 - beta2)
        xi = ops.sub(prev, grads)
        ops.abs_(xi)
        ops.sigmoid_(xi)
        ops.mul_(xi, m)
        ops.copy_(prev, grads)
        denom = ops.sqrt(v)
        ops.add_(denom, group["eps"])
        step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        ops.addcdiv_(params, xi, denom, value=-step_size)
