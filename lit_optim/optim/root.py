"""ROOT: robust orthogonalized optimizer (size-adapted Newton-Schulz + outlier suppression)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..registry import register_optimizer
from ._base import check_in_range, check_non_negative
from ._orthogonal import OrthogonalOptimizer, momentum_defaults, ns_group_defaults, shared_kwargs, with_common_args_doc

__all__ = ["ROOT", "soft_threshold_clip"]


def soft_threshold_clip(x: torch.Tensor, quantile: float, floor: float = 1e-9) -> torch.Tensor:
    r"""Robust part :math:`B = X - \mathcal{T}_\tau(X) = \mathrm{clip}(X, -\tau, \tau)` of each matrix
    of ``x`` (shape ``(m, n)`` or ``(B, m, n)``), where :math:`\mathcal{T}_\tau(x) =
    \mathrm{sign}(x)\max(|x| - \tau, 0)` is soft-thresholding (the proximal operator of
    :math:`\tau\lVert\cdot\rVert_1`, which takes the outliers) and :math:`\tau` is the ``quantile``
    of :math:`|X|` in each matrix (linear interpolation between order statistics) plus ``floor``.
    A new tensor; ``x`` is not modified."""
    if x.numel() == 0:
        return x.clone()
    mats = x.reshape(-1, x.shape[-2] * x.shape[-1]) if x.ndim == 3 else x.reshape(1, -1)
    a = mats.abs().to(torch.promote_types(x.dtype, torch.float32))
    n = a.shape[-1]
    pos = quantile * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    tau = a.kthvalue(lo + 1, dim=-1).values
    if hi != lo and pos != lo:
        tau = tau + (pos - lo) * (a.kthvalue(hi + 1, dim=-1).values - tau)
    tau = (tau + floor).to(x.dtype)
    shape = (-1, 1, 1) if x.ndim == 3 else (1, 1)
    tau = tau.reshape(shape)
    return torch.maximum(torch.minimum(x, tau), -tau)


@register_optimizer(
    "root",
    family="orthogonalized (robust)",
    paper="ROOT: Robust Orthogonalized Optimizer for Neural Network Training (He et al., 2025)",
    summary="outlier-clipped momentum orthogonalized with Newton-Schulz coefficients fitted to the matrix size",
    default_lr=1e-3,
    grouping="matrix",
)
@with_common_args_doc
class ROOT(OrthogonalOptimizer):
    r"""ROOT: Robust Orthogonalized OpTimizer.

    Paper: *ROOT: Robust Orthogonalized Optimizer for Neural Network Training*, Wei He, Kai Han,
    Hang Zhou, Hanting Chen, Zhicheng Liu, Xinghao Chen & Yunhe Wang, 2025 (arXiv:2511.20626).

    .. math::
        M_t &= \mu M_{t-1} + (1-\mu) G_t, \qquad
        \tilde M_t = (1-\mu) G_t + \mu M_t \ \text{(Nesterov) or } M_t \\
        O_t &= \mathcal{T}_{\tau_t}(\tilde M_t), \quad B_t = \tilde M_t - O_t
            = \mathrm{clip}(\tilde M_t, -\tau_t, \tau_t),
            \quad \tau_t = \operatorname{quantile}_q |\tilde M_t| \\
        X_K &= \mathrm{NS}_K^{(a^{(m,n)}, b^{(m,n)}, c^{(m,n)})}(B_t) \\
        \theta_t &= (1 - \eta\lambda)\,\theta_{t-1} - \eta\, s(m, n)\, X_K

    Two robustness mechanisms: (1) *dimension-robust orthogonalization*: the quintic coefficients
    depend on the matrix size (``ns_coefficients="root"``: the authors' published coefficients for
    their sizes, others by nearest aspect ratio, see
    :func:`~lit_optim.functional.newton_schulz.root_coefficients`; ``"fit"`` fits a per-step
    schedule to each size with :func:`~lit_optim.functional.newton_schulz.fit_coefficient_schedule`);
    (2) *proximal outlier suppression*: soft-thresholding splits the momentum into outliers
    :math:`O_t` and a clipped robust part :math:`B_t`; only :math:`B_t` is orthogonalized.

    Where the abstract leaves details open we follow the authors' public code: the threshold
    :math:`\tau_t` is the 0.9-quantile of :math:`|\tilde M_t|` in each matrix (plus 1e-9), and the
    shape factor is Moonlight's :math:`0.2\sqrt{\max(m, n)}` (``adjust_lr="match_rms_adamw"``), so
    learning rates are AdamW-like. The authors accumulate :math:`M_t = \mu M_{t-1} + G_t`; the EMA
    form used here differs only by the factor :math:`1-\mu`, which the quantile threshold and the
    normalization inside Newton-Schulz cancel.

    The threshold is a quantile of the whole matrix, so the clipping runs with the
    orthogonalization on whole matrices (on the matrix's owner rank under FSDP2, see
    :mod:`lit_optim.optim._orthogonal`); the result equals the one-process update.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (default 1e-3, the authors').
        momentum: :math:`\mu` (default 0.95).
        nesterov: Nesterov form (default True).
        weight_decay: decoupled :math:`\lambda` (default 0; the authors use 0.1).
        threshold_quantile: :math:`q` (default 0.9); 1.0 disables the outlier clipping.
        ns_steps: Newton iterations :math:`K` (default 5).
        ns_coefficients: ``"root"`` (default), ``"fit"``, a preset, a triple or a per-step list.
        ns_eps: added to the Frobenius norm before the iteration (default 1e-7).
        ns_dtype: Newton-Schulz dtype (default None: the parameter's, at least float32).
        ns_method: ``"auto"`` (default), ``"standard"`` or ``"gram"``.
        adjust_lr: shape factor, default ``"match_rms_adamw"``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        threshold_quantile: float = 0.9,
        ns_steps: int = 5,
        ns_coefficients: Any = "root",
        ns_eps: float = 1e-7,
        ns_dtype: Any = None,
        ns_method: str = "auto",
        adjust_lr: str = "match_rms_adamw",
        *,
        adam_lr: float = 1e-3,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        adam_weight_decay: float = 0.0,
        layerwise_noise_adaptive: bool = False,
        noise_beta: float = 0.99,
        noise_clip: float = 4.0,
        distributed: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        fit = ns_coefficients == "fit"
        defaults = dict(
            lr=lr,
            weight_decay=check_non_negative("weight_decay", weight_decay),
            threshold_quantile=check_in_range("threshold_quantile", threshold_quantile, 0.0, 1.0),
            **momentum_defaults(momentum, nesterov),
            **ns_group_defaults(ns_steps, "root" if fit else ns_coefficients, ns_eps, ns_dtype, ns_method),
        )
        if fit:
            defaults["ns_coefficients"] = "fit"
        super().__init__(params, defaults, **shared_kwargs(locals()))

    def _ns_settings(self, group):
        settings = super()._ns_settings(group)
        if settings["coefficients"] == "fit":
            from ..functional.newton_schulz import fit_coefficient_schedule

            steps = settings["steps"]
            settings["coefficients"] = lambda m, n: fit_coefficient_schedule(m, n, steps)
        return settings

    def _transform(self, group, mats, foreach, extra=None):
        # the threshold is a quantile of the whole matrix: applied here, to whole matrices (on the
        # owner rank under FSDP2), not in the elementwise momentum step
        q = group["threshold_quantile"]
        if q < 1.0:
            mats = [soft_threshold_clip(x, q) for x in mats]
        return super()._transform(group, mats, foreach, extra=extra)
