"""AdaBelief."""

from __future__ import annotations

import math

from ..registry import register_optimizer
from ._base import ELEMENTWISE_BLOCK_NUMEL, LitOptimizer, apply_weight_decay, check_betas, check_lr, check_non_negative
from ._precision import Float32Math, PositiveEps, check_eps_positive

__all__ = ["AdaBelief"]

_EPS_WHY = "AdaBelief divides 0 by 0 (NaN) where a gradient has always been exactly zero when eps is 0"


@register_optimizer(
    "adabelief",
    family="Adam family",
    paper="AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients (Zhuang et al., NeurIPS 2020)",
    summary="Adam whose step shrinks when the gradient departs from its EMA; a drop-in AdamW replacement",
    default_lr=1e-3,
)
class AdaBelief(Float32Math, PositiveEps, LitOptimizer):
    r"""AdaBelief: Adam with the second moment of the gradient's deviation from its EMA.

    Paper: *AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients*,
    Zhuang et al., NeurIPS 2020 (arXiv:2010.07468).

    Update, at step :math:`t` with gradient :math:`g_t`:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        s_t &= \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon \\
        \theta_t &= \theta_{t-1}(1 - \eta\lambda) - \eta\,
            \frac{m_t / (1-\beta_1^t)}{\sqrt{s_t/(1-\beta_2^t)} + \epsilon}

    The "belief" :math:`s_t` is small when the observed gradient agrees with its prediction
    :math:`m_t`, which gives a large step, and large when it disagrees. With ``amsgrad=True`` the
    running maximum of :math:`s_t` is used in the denominator. The RAdam-style rectification of
    the authors' package is not implemented.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta` (paper default 1e-3).
        betas: :math:`(\beta_1, \beta_2)`, EMA rates of the gradient and of the belief
            (paper default (0.9, 0.999)); each in [0, 1).
        eps: :math:`\epsilon`, added to the belief and to the denominator (default 1e-16, the
            authors' recommended value; it enters both places as in their reference code). Must be
            > 0: with ``eps=0`` a coordinate whose gradient has always been zero gives 0/0.
        weight_decay: :math:`\lambda` (default 0).
        decoupled_weight_decay: True (default, as in the authors' package) applies
            :math:`\theta \leftarrow \theta(1-\eta\lambda)`; False adds :math:`\lambda\theta` to the
            gradient (L2).
        amsgrad: use the maximum of past beliefs (default False).
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`.

    float16 / bfloat16 parameters: the state is kept and the update computed in float32
    (:mod:`lit_optim.optim._precision`).
    """

    eps_zero_reason = _EPS_WHY
    elementwise = True
    block_numel = ELEMENTWISE_BLOCK_NUMEL

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        amsgrad: bool = False,
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
            amsgrad=bool(amsgrad),
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    @property
    def state_keys(self):  # type: ignore[override]
        if any(g["amsgrad"] for g in self.param_groups):
            return ("exp_avg", "exp_avg_var", "max_exp_avg_var")
        return ("exp_avg", "exp_avg_var")

    def _update_math(self, group, params, grads, state, step, ops):
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        grads = apply_weight_decay(ops, params, grads, lr, group["weight_decay"], group["decoupled_weight_decay"])
        m, s = state["exp_avg"], state["exp_avg_var"]
        ops.lerp_(m, grads, 1.0 - beta1)
        diff = ops.sub(grads, m)
        ops.mul_(diff, diff)
        ops.mul_(s, beta2)
        ops.add_(s, diff, alpha=1.0 - beta2)
        ops.add_(s, eps)
        if group["amsgrad"]:
            ops.maximum_(state["max_exp_avg_var"], s)
            s = state["max_exp_avg_var"]
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        # reuse the squared-difference buffer for the denominator
        denom = diff
        ops.copy_(denom, s)
        ops.sqrt_(denom)
        ops.add_(denom, eps * math.sqrt(bc2))
        # m/bc1 / (sqrt(s)/sqrt(bc2) + eps) == (sqrt(bc2)/bc1) * m / (sqrt(s) + eps*sqrt(bc2))
        ops.addcdiv_(params, m, denom, value=-lr * math.sqrt(bc2) / bc1)
