"""AdaBound and AMSBound."""

from __future__ import annotations

import math

from ..registry import register_optimizer
from ._base import (
    ELEMENTWISE_BLOCK_NUMEL,
    LitOptimizer,
    apply_weight_decay,
    check_betas,
    check_lr,
    check_non_negative,
    check_positive,
)
from ._precision import Float32Math

__all__ = ["AdaBound"]


@register_optimizer(
    "adabound",
    family="Adam family",
    paper="Adaptive Gradient Methods with Dynamic Bound of Learning Rate (Luo et al., ICLR 2019)",
    summary="Adam whose per-coordinate step is clipped into bounds that close in on SGD's final_lr",
    default_lr=1e-3,
)
class AdaBound(Float32Math, LitOptimizer):
    r"""AdaBound (and AMSBound with ``amsbound=True``): Adam that turns into SGD.

    Paper: *Adaptive Gradient Methods with Dynamic Bound of Learning Rate*, Luo, Xiong, Liu & Sun,
    ICLR 2019 (arXiv:1902.09843).

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \quad (\text{AMSBound: } v_t \leftarrow \max(v_{t-1}^{\max}, v_t)) \\
        \alpha^\ast &= \eta^\ast \cdot \eta / \eta_0, \qquad
        l_t = \alpha^\ast\Big(1 - \frac{1}{\gamma t + 1}\Big), \qquad
        u_t = \alpha^\ast\Big(1 + \frac{1}{\gamma t}\Big) \\
        \theta_t &= \theta_{t-1} - \operatorname{clip}\Big(\frac{\eta\sqrt{1-\beta_2^t}/(1-\beta_1^t)}{\sqrt{v_t}+\epsilon},
            l_t, u_t\Big) \odot m_t

    :math:`\eta_0` is the group's learning rate at construction (kept as ``group["base_lr"]``), so
    an LR scheduler scales the bounds with the learning rate, as in the authors' code.

    Args:
        params: parameters or parameter groups.
        lr: Adam learning rate :math:`\eta` (paper default 1e-3).
        betas: :math:`(\beta_1, \beta_2)` (paper default (0.9, 0.999)); each in [0, 1).
        final_lr: :math:`\eta^\ast`, the SGD learning rate the bounds converge to (default 0.1).
        gamma: :math:`\gamma`, speed of convergence of the bounds (default 1e-3).
        eps: :math:`\epsilon` (default 1e-8). ``eps=0`` is allowed: where :math:`v_t = 0` the
            unclipped step is infinite, the clip bounds it by :math:`u_t` and :math:`m_t = 0` there.
        weight_decay: L2 penalty added to the gradient (default 0, as in the paper).
        amsbound: use the running maximum of :math:`v_t` (AMSBound; default False).
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`.

    float16 / bfloat16 parameters: the state is kept and the update computed in float32
    (:mod:`lit_optim.optim._precision`); ``foreach=True`` and ``foreach=False`` then give identical
    results in every dtype.
    """

    elementwise = True
    block_numel = ELEMENTWISE_BLOCK_NUMEL

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsbound: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        defaults = dict(
            lr=check_lr(lr),
            betas=check_betas(betas),
            final_lr=check_non_negative("final_lr", final_lr),
            gamma=check_positive("gamma", gamma),
            eps=check_non_negative("eps", eps),
            weight_decay=check_non_negative("weight_decay", weight_decay),
            amsbound=bool(amsbound),
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("base_lr", group["lr"])

    @property
    def state_keys(self):  # type: ignore[override]
        if any(g["amsbound"] for g in self.param_groups):
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def _update_math(self, group, params, grads, state, step, ops):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        grads = apply_weight_decay(ops, params, grads, lr, group["weight_decay"], False)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        ops.lerp_(m, grads, 1.0 - beta1)
        ops.mul_(v, beta2)
        ops.addcmul_(v, grads, grads, value=1.0 - beta2)
        if group["amsbound"]:
            ops.maximum_(state["max_exp_avg_sq"], v)
            v = state["max_exp_avg_sq"]
        step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        if step_size == 0.0:
            # lr 0: the bounds are 0 too and nothing moves (with eps=0, inf * 0 would give NaN)
            return
        base_lr = group["base_lr"]
        final_lr = group["final_lr"] * lr / base_lr if base_lr > 0 else 0.0
        lower = final_lr * (1.0 - 1.0 / (group["gamma"] * step + 1.0))
        upper = final_lr * (1.0 + 1.0 / (group["gamma"] * step))
        t = ops.sqrt(v)
        ops.add_(t, group["eps"])
        ops.reciprocal_(t)
        ops.mul_(t, step_size)
        ops.clamp_min_(t, lower)
        ops.clamp_max_(t, upper)
        ops.mul_(t, m)
        ops.sub_(params, t)
