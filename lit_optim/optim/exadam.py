"""EXAdam."""

from __future__ import annotations

import math

import torch

from ..registry import register_optimizer
from ._base import ELEMENTWISE_BLOCK_NUMEL, LitOptimizer, check_betas, check_lr, check_non_negative
from ._precision import Float32Math, PositiveEps, check_eps_positive

__all__ = ["EXAdam"]

_EPS_WHY = (
    "EXAdam divides 0 by 0 (NaN) in its debiasing term where a gradient has always been exactly zero when eps is 0"
)


@register_optimizer(
    "exadam",
    family="Adam family",
    paper="EXAdam: The Power of Adaptive Cross-Moments (Adly, 2024)",
    summary="Adam with cross-moment debiasing and a gradient-accelerated numerator",
    default_lr=1e-3,
)
class EXAdam(Float32Math, PositiveEps, LitOptimizer):
    r"""EXAdam: Adam with adaptive cross-moment debiasing, gradient acceleration and a growing step
    size.

    Paper: *EXAdam: The Power of Adaptive Cross-Moments*, A. M. Adly, 2024 (arXiv:2412.20302,
    version 1, Algorithm 1; the author's reference code at its first release).

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        d_1 &= 1 + \beta_2^t \frac{v_t}{v_t+\epsilon}, \qquad d_2 = 1 + \beta_1^t \frac{m_t^2}{m_t^2+\epsilon} \\
        \tilde m_t &= \frac{m_t}{1-\beta_1^t} d_1, \qquad \tilde g_t = \frac{g_t}{1-\beta_1^t} d_1, \qquad
        \tilde v_t = \frac{v_t}{1-\beta_2^t} d_2 \\
        \alpha_t &= \eta \ln\!\big(\sqrt{2}\,\sqrt{t+1}\big)
            \quad (\alpha_t = \eta \text{ with dynamic\_step\_size=False}) \\
        \theta_t &= \theta_{t-1}(1-\eta\lambda) - \alpha_t\,\frac{\tilde m_t + \tilde g_t}{\sqrt{\tilde v_t} + \epsilon}

    with :math:`t` the 1-based step count. The dynamic step size :math:`\alpha_t` is the paper's
    (version 1) and its code's: it starts at :math:`\eta\ln 2 \approx 0.69\eta` and keeps growing,
    slowly (:math:`\approx 3.8\eta` at step 1,000, :math:`\approx 5.3\eta` at step 20,000), so that a
    schedule that decays :math:`\eta` still sees steps that do not vanish early. A later revision of
    the author's code and of the paper dropped it, and pytorch_optimizer's EXAdam does not have it;
    ``dynamic_step_size=False`` gives that rule (a constant :math:`\eta`). The decoupled weight
    decay uses :math:`\eta`, not :math:`\alpha_t`, as in the author's code (the paper has none).

    Once :math:`\beta^t` is below half the dtype's machine epsilon the corresponding factor is
    exactly 1 in floating point and its computation is skipped.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (default 1e-3, the paper's; the author recommends 3e-4 for NLP).
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)); each in [0, 1).
        eps: :math:`\epsilon` (default 1e-8). Must be > 0: with ``eps=0`` a coordinate whose
            gradient has always been zero gives 0/0 in :math:`d_1`.
        weight_decay: decoupled :math:`\lambda` (default 0).
        dynamic_step_size: scale the learning rate by :math:`\ln(\sqrt{2}\sqrt{t+1})` (default True,
            the paper's); False keeps :math:`\eta` constant (the later code, pytorch_optimizer).
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`.

    float16 / bfloat16 parameters: the state is kept and the update computed in float32
    (:mod:`lit_optim.optim._precision`).
    """

    eps_zero_reason = _EPS_WHY
    state_keys = ("exp_avg", "exp_avg_sq")
    elementwise = True
    block_numel = ELEMENTWISE_BLOCK_NUMEL

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        dynamic_step_size: bool = True,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        if not isinstance(dynamic_step_size, bool):
            raise TypeError(
                f"dynamic_step_size must be a bool, got {type(dynamic_step_size).__name__} {dynamic_step_size!r}"
            )
        defaults = dict(
            lr=check_lr(lr),
            betas=check_betas(betas),
            eps=check_eps_positive(eps, _EPS_WHY),
            weight_decay=check_non_negative("weight_decay", weight_decay),
            dynamic_step_size=dynamic_step_size,
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    def __setstate__(self, state):
        super().__setstate__(state)
        # optimizers pickled before the switch existed followed the rule without it
        for group in self.param_groups:
            group.setdefault("dynamic_step_size", False)

    def load_state_dict(self, state_dict):
        """As ``LitOptimizer.load_state_dict``; a state dict saved before ``dynamic_step_size``
        existed continues with the rule it was trained with (``dynamic_step_size=False``)."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(groups, list) and any(isinstance(g, dict) and "dynamic_step_size" not in g for g in groups):
            groups = [
                {**g, "dynamic_step_size": False} if isinstance(g, dict) and "dynamic_step_size" not in g else g
                for g in groups
            ]
            state_dict = {**state_dict, "param_groups": groups}
        super().load_state_dict(state_dict)

    @staticmethod
    def step_size_factor(step: int) -> float:
        r""":math:`\ln(\sqrt{2}\sqrt{t+1})`, the paper's growth of the step size at 1-based step ``t``."""
        # ln(x) written as ln(2) * log2(x): torch.compile keeps math.log2 of a traced step symbolic,
        # while math.log would bake the step in and recompile the fused path at every step
        return 0.5 * math.log(2.0) * math.log2(2.0 * (step + 1))

    def _update_math(self, group, params, grads, state, step, ops):
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if wd != 0.0:
            ops.mul_(params, 1.0 - lr * wd)
        ops.lerp_(m, grads, 1.0 - beta1)
        ops.mul_(v, beta2)
        ops.addcmul_(v, grads, grads, value=1.0 - beta2)
        b1t, b2t = beta1**step, beta2**step
        bc1, bc2 = 1.0 - b1t, 1.0 - b2t
        tiny = torch.finfo(params[0].dtype).eps / 2 if params[0].is_floating_point() else 0.0
        num = ops.add(m, grads)  # (m + g); the common factor d1 / bc1 is applied below
        if b2t >= tiny:
            # d1 = 1 + b2t * v / (v + eps) = (1 + b2t) - b2t * eps / (v + eps)
            d1 = ops.add(v, eps)
            ops.reciprocal_(d1)
            ops.mul_(d1, -b2t * eps)
            ops.add_(d1, 1.0 + b2t)
            ops.mul_(num, d1)
        if b1t >= tiny:
            # d2 = 1 + b1t * m^2 / (m^2 + eps) = (1 + b1t) - b1t * eps / (m^2 + eps)
            d2 = ops.mul(m, m)
            ops.add_(d2, eps)
            ops.reciprocal_(d2)
            ops.mul_(d2, -b1t * eps)
            ops.add_(d2, 1.0 + b1t)
            ops.mul_(d2, v)
            ops.sqrt_(d2)
        else:
            d2 = ops.sqrt(v)
        # (m+g) d1 / bc1 / (sqrt(v d2 / bc2) + eps) == (sqrt(bc2)/bc1) (m+g) d1 / (sqrt(v d2) + eps sqrt(bc2))
        sbc2 = math.sqrt(bc2)
        alpha = lr * self.step_size_factor(step) if group["dynamic_step_size"] else lr
        ops.add_(d2, eps * sbc2)
        ops.addcdiv_(params, num, d2, value=-alpha * sbc2 / bc1)
