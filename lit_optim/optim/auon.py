"""AuON and Hybrid-AuON: normalized momentum under a spectral-norm trust region in linear time."""

from __future__ import annotations

from typing import Any

import torch

from ..functional.normalize import cosh_rms_normalize
from ..registry import register_optimizer
from ._base import check_non_negative, check_positive
from ._orthogonal import OrthogonalOptimizer, momentum_defaults, ns_group_defaults, shared_kwargs, with_common_args_doc

__all__ = ["AuON", "HybridAuON"]

_PAPER = "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates (Maity, 2025)"


def _auon_defaults(lr, momentum, nesterov, weight_decay, gamma, eps) -> dict[str, Any]:
    return dict(
        lr=lr,
        weight_decay=check_non_negative("weight_decay", weight_decay),
        gamma=check_positive("gamma", gamma),
        eps=check_non_negative("eps", eps),
        **momentum_defaults(momentum, nesterov),
    )


def _cosh_dirs(mats: list[torch.Tensor], gamma: float, eps: float) -> list[torch.Tensor]:
    out = []
    for x in mats:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        out.append(cosh_rms_normalize(x, gamma, eps) if x.numel() else x.clone())
    return out


@register_optimizer(
    "auon",
    family="orthogonalized (linear time)",
    paper=_PAPER,
    summary="Frobenius-normalized momentum braked by its cosh-RMS: spectral norm <= 1, no matrix products",
    default_lr=0.24,
    grouping="matrix",
)
@with_common_args_doc
class AuON(OrthogonalOptimizer):
    r"""AuON: Alternative Unit-norm momentum updates by Normalized nonlinear scaling.

    Paper: *AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates*, Dipan Maity, 2025
    (arXiv:2509.24320).

    For every matrix with gradient :math:`G_t`:

    .. math::
        M_t &= \mu M_{t-1} + (1-\mu) G_t, \qquad
        \tilde M_t = (1-\mu) G_t + \mu M_t \ \text{(Nesterov) or } M_t \\
        X_t &= \tilde M_t / (\lVert \tilde M_t\rVert_F + 10^{-7}), \qquad
        r_t = \sqrt{\operatorname{mean}\big(\cosh(\gamma X_t)^2\big)} \\
        U_t &= X_t / (r_t + \epsilon), \qquad
        \theta_t = (1 - \eta\lambda)\,\theta_{t-1} - \eta\, s(m, n)\, U_t

    Since :math:`r_t \ge 1`, :math:`\lVert U_t\rVert_2 \le \lVert U_t\rVert_F \le 1`: the step stays
    in the spectral-norm trust region without a semi-orthogonal matrix being built (cost
    :math:`O(mn)`, no matrix products, nothing to share between ranks). Entries far above the RMS
    raise :math:`r_t` and brake the whole step (the paper's "emergency brake").

    The abstract leaves the exact transform open; we follow the paper's equations (normalization
    by the Frobenius norm, cosh-RMS scaling, shape factor :math:`\sqrt{\max(1, m/n)}`) and take
    :math:`\gamma = 1.5`, the default of the authors' public code. Because :math:`\lVert U_t\rVert_F
    \le 1` (where Muon's orthogonal update has :math:`\lVert O_t\rVert_F = \sqrt{\min(m, n)}`), the
    learning rate is larger than Muon's: the authors' default 0.24.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (default 0.24, the authors' code).
        momentum: :math:`\mu` (default 0.95).
        nesterov: Nesterov form (default True).
        weight_decay: decoupled :math:`\lambda` (default 0).
        gamma: :math:`\gamma` inside the hyperbolic cosine (default 1.5).
        eps: :math:`\epsilon` added to :math:`r_t` (default 1e-8).
        adjust_lr: shape factor ``"original"`` (default), ``"match_rms_adamw"`` or ``"none"``.
    """

    lmo_dual_norm = "frobenius"

    def __init__(
        self,
        params,
        lr: float = 0.24,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        gamma: float = 1.5,
        eps: float = 1e-8,
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
        defaults = _auon_defaults(lr, momentum, nesterov, weight_decay, gamma, eps)
        super().__init__(params, defaults, **shared_kwargs(locals()))

    def _transform(self, group, mats, foreach, extra=None):
        return _cosh_dirs(mats, group["gamma"], group["eps"]), []


@register_optimizer(
    "hybrid_auon",
    family="orthogonalized (one Newton-Schulz step)",
    paper=_PAPER,
    summary="AuON after a single Newton-Schulz iteration: partial orthogonalization at 1/5 of Muon's matmuls",
    default_lr=0.24,
    grouping="matrix",
)
class HybridAuON(AuON):
    r"""Hybrid-AuON: one Newton-Schulz iteration, then AuON's cosh-RMS normalization.

    Paper: *AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates*, Dipan Maity, 2025
    (arXiv:2509.24320), the hybrid variant.

    .. math::
        Y_t = \mathrm{NS}_1^{(a,b,c)}(\tilde M_t), \qquad U_t = \mathrm{AuON}(Y_t), \qquad
        \theta_t = (1 - \eta\lambda)\,\theta_{t-1} - \eta\, s(m, n)\, U_t

    with :math:`\tilde M_t` and the AuON normalization as in :class:`AuON`. A single quintic step
    lifts the small singular values by up to :math:`a = 3.4445` (partial decorrelation) at a fifth
    of Muon's matrix products; the step is shared between ranks under DDP like Muon's.
    ``ns_steps`` may be raised for a stronger (costlier) orthogonalization.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (default 0.24).
        momentum: :math:`\mu` (default 0.95).
        nesterov: Nesterov form (default True).
        weight_decay: decoupled :math:`\lambda` (default 0).
        gamma: :math:`\gamma` inside the hyperbolic cosine (default 1.5).
        eps: :math:`\epsilon` added to the cosh RMS (default 1e-8).
        ns_steps: Newton-Schulz iterations (default 1, the hybrid's single step).
        ns_coefficients: Newton-Schulz coefficients (default ``"quintic"``).
        ns_eps: added to the Frobenius norm before the iteration (default 1e-7).
        ns_dtype: Newton-Schulz dtype (default None: the parameter's, at least float32).
        adjust_lr: shape factor ``"original"`` (default), ``"match_rms_adamw"`` or ``"none"``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.24,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        gamma: float = 1.5,
        eps: float = 1e-8,
        ns_steps: int = 1,
        ns_coefficients: Any = "quintic",
        ns_eps: float = 1e-7,
        ns_dtype: Any = None,
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
        defaults = _auon_defaults(lr, momentum, nesterov, weight_decay, gamma, eps)
        defaults.update(ns_group_defaults(ns_steps, ns_coefficients, ns_eps, ns_dtype, "standard"))
        OrthogonalOptimizer.__init__(
            self,
            params,
            defaults,
            adjust_lr=adjust_lr,
            adam_lr=adam_lr,
            adam_betas=adam_betas,
            adam_eps=adam_eps,
            adam_weight_decay=adam_weight_decay,
            layerwise_noise_adaptive=layerwise_noise_adaptive,
            noise_beta=noise_beta,
            noise_clip=noise_clip,
            distributed=distributed,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
        )

    def _transform(self, group, mats, foreach, extra=None):
        ys, _ = self._orthogonalize(group, mats, foreach)
        return _cosh_dirs(ys, group["gamma"], group["eps"]), []


with_common_args_doc(HybridAuON)
