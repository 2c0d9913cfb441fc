"""Muon: momentum, then Newton-Schulz orthogonalization of every hidden matrix."""

from __future__ import annotations

from typing import Any

from ..registry import register_optimizer
from ._base import check_non_negative
from ._orthogonal import OrthogonalOptimizer, momentum_defaults, ns_group_defaults, shared_kwargs, with_common_args_doc

__all__ = ["Muon"]


@register_optimizer(
    "muon",
    family="orthogonalized",
    paper="Muon: An optimizer for hidden layers in neural networks (Jordan et al., 2024); "
    "Muon is Scalable for LLM Training (Liu et al., 2025)",
    summary="Nesterov momentum orthogonalized by batched Newton-Schulz; AdamW for embeddings, head and 1-D; any ndim",
    default_lr=0.02,
    grouping="matrix",
)
@with_common_args_doc
class Muon(OrthogonalOptimizer):
    r"""Muon: MomentUm Orthogonalized by Newton-Schulz, for whole models.

    Papers: *Muon: An optimizer for hidden layers in neural networks*, Keller Jordan, Yuchen Jin,
    Vlado Boza, Jiacheng You, Franz Cesista, Laker Newhouse & Jeremy Bernstein, 2024
    (kellerjordan.github.io/posts/muon); learning-rate matching to AdamW from *Muon is Scalable for
    LLM Training*, Liu et al., 2025 (arXiv:2502.16982).

    For every matrix parameter (see :mod:`lit_optim.optim._orthogonal` for which parameters are
    matrices and how conv kernels and stacked 3-D weights are viewed), with gradient :math:`G_t`:

    .. math::
        M_t &= \mu M_{t-1} + (1-\mu) G_t \\
        \tilde M_t &= (1-\mu) G_t + \mu M_t \ \text{(Nesterov)} \quad\text{or}\quad M_t \\
        O_t &= \mathrm{NS}_k^{(a,b,c)}(\tilde M_t) \approx UV^\top \ \ (\tilde M_t = U\Sigma V^\top) \\
        \theta_t &= (1 - \eta\lambda)\,\theta_{t-1} - \eta\, s(m, n)\, O_t

    with :math:`s(m, n)` the shape factor of ``adjust_lr`` (:func:`~lit_optim.optim._orthogonal.lr_adjustment`)
    for an ``m x n`` (out x in) matrix. Other parameters take the internal AdamW.
    Same-shape matrices are orthogonalized by one batched call; under DDP the work is divided
    among the ranks (each orthogonalizes its share, results all-gathered); under FSDP2 (DTensor
    ``Shard(0)`` parameters, uneven and empty shards included) momentum and AdamW run on the local
    shards and each matrix is gathered to one owner rank, orthogonalized there and scattered back
    as rows (one ``all_to_all_single`` each way, about 2x the matrix bytes per step in total), equal
    to the one-process update to float rounding; tensor-parallel placements are refused (see
    :mod:`lit_optim.optim._orthogonal`). Unlike ``torch.optim.Muon``, any number of dimensions is
    accepted.

    Args:
        params: parameters or parameter groups (``use_muon`` and ``matrix_view`` may be set per group).
        lr: :math:`\eta` for the matrices (default 0.02, Keller Jordan's).
        momentum: :math:`\mu` (default 0.95).
        nesterov: use the Nesterov form :math:`\tilde M_t` (default True).
        weight_decay: decoupled :math:`\lambda` for the matrices (default 0; Moonlight uses 0.1
            with ``adjust_lr="match_rms_adamw"``).
        ns_steps: Newton-Schulz iterations :math:`k` (default 5).
        ns_coefficients: ``"quintic"`` (default, (3.4445, -4.7750, 2.0315)), ``"cubic"``,
            ``"root"``, a triple or a per-step list (see :mod:`lit_optim.functional.newton_schulz`).
        ns_eps: added to the Frobenius norm before the iteration (default 1e-7).
        ns_dtype: dtype of the iteration: None (default) = the parameter's, at least float32;
            ``"bfloat16"`` is the fast choice on GPUs (as in Keller Jordan's and torch's Muon) and
            on CPUs with bf16 matrix units.
        ns_method: ``"auto"`` (default), ``"standard"`` or ``"gram"`` (same polynomial, fewer flops
            for matrices with aspect ratio >= 2).
        adjust_lr: ``"original"`` (default, :math:`\sqrt{\max(1, m/n)}`), ``"match_rms_adamw"``
            (:math:`0.2\sqrt{\max(m, n)}`, reuse AdamW's lr) or ``"none"``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients: Any = "quintic",
        ns_eps: float = 1e-7,
        ns_dtype: Any = None,
        ns_method: str = "auto",
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
        defaults = dict(
            lr=lr,
            weight_decay=check_non_negative("weight_decay", weight_decay),
            **momentum_defaults(momentum, nesterov),
            **ns_group_defaults(ns_steps, ns_coefficients, ns_eps, ns_dtype, ns_method),
        )
        super().__init__(params, defaults, **shared_kwargs(locals()))
