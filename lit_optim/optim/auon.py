"""AuON and Hybrid-AuON: normalized momentum under a spectral-norm trust region in linear time."""

from __future__ import annotations

from typing import Any

import torch

from ..functional.normalize import cosh_rms_normalize, cosh_rms_scale
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


def _cosh_dirs(mats: list[torch.Tensor], gamma: float, eps: float, normalize: bool = True) -> list[torch.Tensor]:
    """AuON's direction of each matrix (``normalize=False``: the brake alone, Hybrid-AuON), computed
    in at least float32 whatever the path (``foreach`` or not) and the parameter dtype."""
    out = []
    for x in mats:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if not x.numel():
            out.append(x.clone())
        else:
            out.append(cosh_rms_normalize(x, gamma, eps) if normalize else cosh_rms_scale(x, gamma, eps))
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
    (arXiv:2509.24320); authors' code: github.com/ryyzn9/AuON (``auon/optimizer.py``).

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
    :math:`O(mn)`, no matrix products). Entries far above the RMS raise :math:`r_t` and brake the
    whole step (the paper's "emergency brake").

    What comes from where:

    * **Paper**: the update :math:`U_t = X_t / (r_t + \epsilon)` of the Frobenius-normalized
      momentum (so :math:`\lVert U_t\rVert_F \le 1`), the cosh-RMS :math:`r_t`, momentum before
      the normalization, and the shape factor :math:`s(m, n) = \sqrt{\max(1, m/n)}` (Muon's).
    * **Authors' code**: the defaults :math:`\gamma = 1.5`, ``lr=0.24``, ``momentum=0.95``, the
      Nesterov form (``grad.lerp_(m, momentum)``), the constants :math:`10^{-7}` (in the norm) and
      :math:`\epsilon = 10^{-8}`, and decoupled weight decay :math:`\eta\lambda`. The code differs
      from the paper in two places, where we follow the paper: it divides the *raw* momentum
      :math:`\tilde M_t` by :math:`r_t + 10^{-8}` (so its step scales with
      :math:`\lVert\tilde M_t\rVert_F`), and it has no shape factor. Its ``lr=0.24`` is therefore
      not calibrated for the paper's normalized update; we keep it as the default (on the project's
      GPT task 0.072 trained better, see the README's comparison).
    * **Ours**: ``adjust_lr`` (``"match_rms_adamw"``/``"none"`` as alternatives to the shape
      factor), the ``nesterov`` switch, the internal AdamW for non-matrix parameters, the
      noise-adaptive layerwise rates, float32 computation of the direction for half-precision
      parameters, and the distribution under FSDP2: the norm and cosh-RMS need the whole matrix, so
      each matrix is assembled on its owner rank (about 2x the matrix bytes communicated per
      step, no Newton-Schulz; see :mod:`lit_optim.optim._orthogonal`).

    **Precision and paths.** The direction :math:`U_t` is computed per matrix in float32 (float64
    for float64 parameters) on both paths, and ``foreach=True`` and ``foreach=False`` give
    bit-identical parameters in float64, float32, bfloat16 and float16 (tested, with weight decay
    on both parts and noise-adaptive rates). Before this was fixed the bf16 paths differed by the
    rounding of the weight-decay factor: torch's CPU ``_foreach_mul_(tensors, scalar)`` rounds the
    scalar to bf16 first (0.9975 becomes 0.99609375), ``Tensor.mul_`` does not; the family now
    multiplies half-precision lists by a float32 0-d tensor, which rounds like ``Tensor.mul_``.
    (Hybrid-AuON and the Newton-Schulz optimizers batch same-shape matrices on the multi-tensor
    path, so there the two paths differ by the rounding of batched vs single matrix products;
    their elementwise parts are identical.)

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (default 0.24, the authors' code).
        momentum: :math:`\mu` (default 0.95).
        nesterov: Nesterov form (default True, as the authors' code).
        weight_decay: decoupled :math:`\lambda` (default 0).
        gamma: :math:`\gamma` inside the hyperbolic cosine (default 1.5, the authors' code).
        eps: :math:`\epsilon` added to :math:`r_t` (default 1e-8, the authors' code).
        adjust_lr: shape factor ``"original"`` (default, the paper's :math:`\sqrt{\max(1, m/n)}`),
            ``"match_rms_adamw"`` or ``"none"``.
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
    summary="one Newton-Schulz step, then AuON's cosh-RMS brake Y / (rms(cosh Y) + delta): partial orthogonalization at 1/5 of Muon's matmuls",
    default_lr=0.24,
    grouping="matrix",
)
class HybridAuON(AuON):
    r"""Hybrid-AuON: one Newton-Schulz iteration, then AuON's cosh-RMS brake.

    Paper: *AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates*, Dipan Maity, 2025
    (arXiv:2509.24320), Sec. 3.2, the hybrid variant.

    .. math::
        Y_t = \mathrm{NS}_1^{(a,b,c)}(\tilde M_t), \qquad
        U_t = \frac{Y_t}{\mathrm{rms}\big(\cosh(\gamma Y_t)\big) + \delta}, \qquad
        \theta_t = (1 - \eta\lambda)\,\theta_{t-1} - \eta\, s(m, n)\, U_t

    with :math:`\tilde M_t` the (Nesterov) momentum as in :class:`AuON`,
    :math:`\mathrm{rms}(Z) = \sqrt{\operatorname{mean}(Z^2)}`, and :math:`\mathrm{NS}_1` one quintic
    Newton-Schulz step, which first divides by :math:`\lVert\tilde M_t\rVert_F + 10^{-7}` (as the
    authors' Newton-Schulz helper does). As in the paper (and the authors' code, which also divides
    the raw Newton-Schulz output), :math:`Y_t` is **not** normalized again before the brake: the
    single step lifts the small singular values by up to :math:`a = 3.4445` (partial
    decorrelation) at a fifth of Muon's matrix products, and the brake divides by
    :math:`\mathrm{rms}(\cosh(\gamma Y_t)) \ge 1`, close to 1 for matrices with small entries.
    The paper writes :math:`\cosh(Y_t)`: ``gamma=1.0`` (the default) is the paper's rule;
    ``gamma`` is our knob to brake harder. Under DDP and FSDP2 the Newton-Schulz step is shared
    between ranks like Muon's. ``ns_steps`` may be raised for a stronger (costlier)
    orthogonalization.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (default 0.24, AuON's).
        momentum: :math:`\mu` (default 0.95).
        nesterov: Nesterov form (default True).
        weight_decay: decoupled :math:`\lambda` (default 0).
        gamma: :math:`\gamma` inside the hyperbolic cosine (default 1.0, the paper's
            :math:`\cosh(Y)`).
        eps: :math:`\delta` added to the cosh RMS (default 1e-8).
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
        gamma: float = 1.0,
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
        # the paper's Y / (rms(cosh(gamma Y)) + delta): no second Frobenius normalization
        return _cosh_dirs(ys, group["gamma"], group["eps"], normalize=False), []


with_common_args_doc(HybridAuON)
