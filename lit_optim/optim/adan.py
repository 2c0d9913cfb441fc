"""Adan."""

from __future__ import annotations

import math

from ..registry import register_optimizer
from ._base import ELEMENTWISE_BLOCK_NUMEL, LitOptimizer, check_betas, check_lr, check_non_negative
from ._precision import Float32Math, PositiveEps, check_eps_positive

__all__ = ["Adan"]

_EPS_WHY = "Adan divides 0 by 0 (NaN) where a gradient has always been exactly zero when eps is 0"


@register_optimizer(
    "adan",
    family="Adam family",
    paper="Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models (Xie et al., TPAMI 2024)",
    summary="Nesterov momentum estimation from gradient differences; robust to large batches and lrs",
    default_lr=1e-3,
)
class Adan(Float32Math, PositiveEps, LitOptimizer):
    r"""Adan: adaptive Nesterov momentum estimation.

    Paper: *Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models*,
    Xie, Zhou, Li, Lin & Yan (arXiv:2208.06677), Algorithm 1. As in the authors' reference code the
    ``betas`` are the EMA *decay* rates, i.e. the paper's :math:`1-\beta_i`.

    With :math:`\Delta_t = g_t - g_{t-1}` (:math:`\Delta_1 = 0`):

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        n_t &= \beta_2 n_{t-1} + (1-\beta_2) \Delta_t \\
        v_t &= \beta_3 v_{t-1} + (1-\beta_3) (g_t + \beta_2 \Delta_t)^2 \\
        u_t &= \frac{m_t/(1-\beta_1^t) + \beta_2\, n_t/(1-\beta_2^t)}{\sqrt{v_t/(1-\beta_3^t)} + \epsilon} \\
        \theta_t &= \frac{\theta_{t-1} - \eta\, u_t}{1 + \eta\lambda}
            \quad\text{(proximal weight decay; with ``no_prox=True``:}\;
            \theta_t = \theta_{t-1}(1-\eta\lambda) - \eta u_t)

    The paper's optional restart condition is not implemented.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (default 1e-3; the paper uses 1e-3 to 1.5e-2 with large batches).
        betas: :math:`(\beta_1, \beta_2, \beta_3)` decay rates of the gradient, gradient-difference
            and squared-update EMAs (paper default (0.98, 0.92, 0.99)); each in [0, 1).
        eps: :math:`\epsilon` in the denominator (default 1e-8). Must be > 0: with ``eps=0`` a
            coordinate whose gradient has always been zero gives 0/0.
        weight_decay: :math:`\lambda` (default 0; the paper uses 0.02 for vision transformers).
        no_prox: False (default) applies the proximal form of weight decay above; True the
            AdamW-style decoupled form.
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`.

    float16 / bfloat16 parameters: the state is kept and the update computed in float32
    (:mod:`lit_optim.optim._precision`).
    """

    eps_zero_reason = _EPS_WHY
    state_keys = ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")
    elementwise = True
    block_numel = ELEMENTWISE_BLOCK_NUMEL

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        no_prox: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        defaults = dict(
            lr=check_lr(lr),
            betas=check_betas(betas, 3),
            eps=check_eps_positive(eps, _EPS_WHY),
            weight_decay=check_non_negative("weight_decay", weight_decay),
            no_prox=bool(no_prox),
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    def _update_math(self, group, params, grads, state, step, ops):
        beta1, beta2, beta3 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        m, n, v, prev = state["exp_avg"], state["exp_avg_diff"], state["exp_avg_sq"], state["prev_grad"]
        if step == 1:
            ops.copy_(prev, grads)
        diff = ops.sub(grads, prev)
        ops.lerp_(n, diff, 1.0 - beta2)
        # diff <- g + beta2 (g - g_prev), one extrapolating lerp from the previous gradient
        diff = ops.lerp(prev, grads, 1.0 + beta2)
        ops.copy_(prev, grads)
        ops.lerp_(m, grads, 1.0 - beta1)
        ops.mul_(v, beta3)
        ops.addcmul_(v, diff, diff, value=1.0 - beta3)
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        sbc3 = math.sqrt(1.0 - beta3**step)
        # numerator (m/bc1 + beta2 n/bc2) = (m + (beta2 bc1/bc2) n) / bc1, the 1/bc1 folded into the step
        num = ops.add(m, n, alpha=beta2 * bc1 / bc2)
        denom = ops.sqrt(v)
        ops.add_(denom, eps * sbc3)
        if wd != 0.0 and group["no_prox"]:
            ops.mul_(params, 1.0 - lr * wd)
        ops.addcdiv_(params, num, denom, value=-lr * sbc3 / bc1)
        if wd != 0.0 and not group["no_prox"]:
            ops.mul_(params, 1.0 / (1.0 + lr * wd))
