"""Lion."""

from __future__ import annotations

from ..registry import register_optimizer
from ._base import ELEMENTWISE_BLOCK_NUMEL, LitOptimizer, check_betas, check_lr, check_non_negative
from ._precision import Float32Math

__all__ = ["Lion"]


@register_optimizer(
    "lion",
    family="Adam family (sign update)",
    paper="Symbolic Discovery of Optimization Algorithms (Chen et al., NeurIPS 2023)",
    summary="sign of an interpolated momentum; half of Adam's state; use a 3-10x smaller lr than AdamW",
    default_lr=1e-4,
)
class Lion(Float32Math, LitOptimizer):
    r"""Lion (EvoLved Sign Momentum).

    Paper: *Symbolic Discovery of Optimization Algorithms*, Chen et al., NeurIPS 2023
    (arXiv:2302.06675), Algorithm 2.

    .. math::
        c_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta_t &= \theta_{t-1} - \eta\,(\operatorname{sign}(c_t) + \lambda\theta_{t-1}) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    Every coordinate moves by exactly :math:`\eta` (before weight decay), so the learning rate
    must be 3-10x smaller than AdamW's and the weight decay 3-10x larger to keep
    :math:`\eta\lambda` the same. Only the momentum is kept: half of Adam's state.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (default 1e-4, the paper's choice for language models).
        betas: :math:`(\beta_1, \beta_2)`: interpolation for the update and EMA rate of the momentum
            (paper default (0.9, 0.99)); each in [0, 1).
        weight_decay: decoupled :math:`\lambda` (default 0; the paper uses 3-10x AdamW's).
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`.

    float16 / bfloat16 parameters: the state is kept and the update computed in float32
    (:mod:`lit_optim.optim._precision`).
    """

    state_keys = ("exp_avg",)
    elementwise = True
    block_numel = ELEMENTWISE_BLOCK_NUMEL

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        defaults = dict(
            lr=check_lr(lr),
            betas=check_betas(betas),
            weight_decay=check_non_negative("weight_decay", weight_decay),
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    def _update_math(self, group, params, grads, state, step, ops):
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        m = state["exp_avg"]
        c = ops.lerp(m, grads, 1.0 - beta1)
        ops.sign_(c)
        if wd != 0.0:
            ops.mul_(params, 1.0 - lr * wd)
        ops.add_(params, c, alpha=-lr)
        ops.lerp_(m, grads, 1.0 - beta2)
