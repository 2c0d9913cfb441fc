"""Sophia: clipped diagonal-Hessian preconditioning."""

from __future__ import annotations

import torch

from ..curvature.consumer import HessianConsumer
from ..registry import register_optimizer
from . import _dtensor
from ._base import (
    ELEMENTWISE_BLOCK_NUMEL,
    apply_weight_decay,
    check_betas,
    check_lr,
    check_non_negative,
    check_positive,
)
from ._precision import Float32Math

__all__ = ["Sophia"]


@register_optimizer(
    "sophia",
    family="Second order (diagonal Hessian)",
    paper="Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training "
    "(Liu, Li, Hall, Liang & Ma, ICLR 2024)",
    summary="EMA of gradients over an EMA of a diagonal Hessian estimate, clipped per coordinate; "
    "estimates every k steps from HessianDiagCallback (GNB by default)",
    default_lr=1e-4,
    curvature="gnb",
)
class Sophia(Float32Math, HessianConsumer):
    r"""Sophia: EMA of the gradients divided by an EMA of a diagonal Hessian estimate, then
    element-wise clipping.

    Paper: *Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
    Pre-training*, Hong Liu, Zhiyuan Li, David Hall, Percy Liang & Tengyu Ma, ICLR 2024
    (arXiv:2305.14342), Algorithm 3.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        h_t &= \beta_2 h_{t-k} + (1-\beta_2)\hat h_t \quad\text{on the steps that receive an estimate }
            \hat h_t\text{ (every } k\text{ steps), else } h_t = h_{t-1},\ h_0 = 0 \\
        \theta_t &= \theta_{t-1}(1-\eta\lambda) - \eta\,
            \operatorname{clip}\!\Big(\frac{m_t}{\max(\rho\, h_t,\ \epsilon)},\ 1\Big)

    where :math:`\operatorname{clip}(z, 1) = \max(\min(z, 1), -1)` element-wise, so no coordinate
    moves by more than :math:`\eta` per step; coordinates with tiny or negative curvature take the
    sign step :math:`\eta\,\operatorname{sign}(m_t)`. :math:`\hat h_t` is Sophia-G's
    Gauss-Newton-Bartlett estimate (:func:`lit_optim.curvature.gnb_diagonal`, which already
    multiplies by the number of outputs :math:`B`, as the paper's Algorithm 2 does) or Sophia-H's
    Hutchinson estimate (:func:`lit_optim.curvature.hutchinson_diagonal`). The paper's :math:`\gamma`
    is ``rho`` here (the name of the authors' code).

    Estimates arrive through :meth:`update_hessian` (one list of tensors aligned with
    :meth:`hessian_params`, or a dict ``{param: tensor}``): in Lightning add
    ``lit_optim.callbacks.HessianDiagCallback(estimator="gnb", every_n_steps=10)``; in plain
    PyTorch either call ``update_hessian`` every ``k`` steps yourself, or pass a closure that
    returns the loss without calling ``backward()`` and Sophia estimates the Hutchinson diagonal
    itself every ``update_period`` steps (see :mod:`lit_optim.curvature.consumer`).
    :meth:`clip_fraction` reports the share of coordinates clipped at the last step.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta`, the largest per-coordinate step (default 1e-4, the authors' code; the
            paper tunes it per model size, e.g. 2e-4 to 6e-4 for GPT-2 small/medium).
        betas: :math:`(\beta_1, \beta_2)`, EMA rates of the gradient and of the Hessian estimate
            (default (0.965, 0.99), the authors' code; the paper's table lists (0.96, 0.99)).
        rho: :math:`\rho` (the paper's :math:`\gamma`), scales the curvature in the denominator and so
            sets how many coordinates are clipped (default 0.04, the authors' code; the paper
            uses 0.01 to 0.05).
        weight_decay: decoupled weight decay :math:`\lambda` (default 0.1; the paper uses 0.2 for
            GPT-2).
        eps: :math:`\epsilon`, floor of the denominator (default 1e-12, the paper's).
        update_period: :math:`k`, steps between Hessian estimates in closure mode (default 10, the
            paper's). With the callback, its ``every_n_steps`` sets :math:`k` instead.
        n_probes: Hutchinson probes per estimate in closure mode (default 1).
        probe: ``"rademacher"`` (default) or ``"gaussian"`` probes in closure mode.
        seed: seed of the closure-mode probes (default 0; probes depend only on it and the step, so
            resumed runs draw the same probes).
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`; ``nonfinite`` also
            governs estimates passed to :meth:`update_hessian`.

    float16 / bfloat16 parameters: the state is kept and the update computed in float32
    (:mod:`lit_optim.optim._precision`).
    """

    hessian_estimator = "gnb"
    state_keys = ("exp_avg", "hessian")
    elementwise = True
    block_numel = ELEMENTWISE_BLOCK_NUMEL

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-12,
        update_period: int = 10,
        n_probes: int = 1,
        probe: str = "rademacher",
        seed: int = 0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        defaults = dict(
            lr=check_lr(lr),
            betas=check_betas(betas),
            rho=check_non_negative("rho", rho),
            weight_decay=check_non_negative("weight_decay", weight_decay),
            eps=check_positive("eps", eps),
            **self._hessian_defaults(update_period, n_probes, probe, seed),
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    def _apply_hessian(self, group, p, state, diag):
        state["hessian"].lerp_(diag, 1.0 - group["betas"][1])

    def _update_math(self, group, params, grads, state, step, ops):
        beta1 = group["betas"][0]
        lr, rho, eps = group["lr"], group["rho"], group["eps"]
        grads = apply_weight_decay(ops, params, grads, lr, group["weight_decay"], True)
        m, h = state["exp_avg"], state["hessian"]
        ops.lerp_(m, grads, 1.0 - beta1)
        denom = ops.mul(h, rho)
        ops.clamp_min_(denom, eps)
        ratio = ops.div(m, denom)
        ops.clamp_min_(ratio, -1.0)
        ops.clamp_max_(ratio, 1.0)
        ops.add_(params, ratio, alpha=-lr)

    @torch.no_grad()
    def clip_fraction(self) -> float:
        r"""Share of coordinates whose last update was clipped,
        :math:`|m_t| \ge \max(\rho h_t, \epsilon)` (nan before the first step). A fraction near 1
        means Sophia is taking sign steps (curvature estimate small or stale); near 0, Newton-like
        steps :math:`m_t/(\rho h_t)`."""
        clipped = []
        total = 0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                # the state exists from construction; a parameter counts once it has been stepped
                if not st or "exp_avg" not in st or p.numel() == 0 or st.get("step", 0) == 0:
                    continue
                # DTensor state (FSDP2): counted on the local shards, summed over the mesh
                h, m = _dtensor.local(st["hessian"]), _dtensor.local(st["exp_avg"])
                mask = m.abs() >= (h * group["rho"]).clamp_min_(group["eps"])
                if _dtensor.is_dtensor(p):
                    mask = _dtensor.DTensor.from_local(mask, p.device_mesh, p.placements, run_check=False)
                clipped.append(mask)
                total += p.numel()
        return float(_dtensor.sum_over_shards(clipped)) / total if total else float("nan")
