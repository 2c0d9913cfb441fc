"""SVD-free low-rank Adam with a Discrete Cosine Transform basis."""

from __future__ import annotations

from typing import Any

import torch

from ..functional.dct import dct_basis, dct_cache_bytes
from ..registry import register_optimizer
from ._base import check_betas, check_choice, check_lr, check_non_negative
from ._lowrank import Item, ProjectedOptimizer, check_gap, check_proj_dtype, check_rank, lowrank_groups

__all__ = ["DCTLowRank"]


@register_optimizer(
    "dct_lowrank",
    family="memory-reduced",
    paper="SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language Models "
    "(Modoranu, Safaryan, Schultheis & Alistarh, 2025)",
    summary="GaLore-style low-rank AdamW whose subspace is picked from a fixed DCT basis by one matmul and a sort; "
    "stores only indices",
    default_lr=2e-3,
    grouping=lowrank_groups,
)
class DCTLowRank(ProjectedOptimizer):
    r"""Low-rank AdamW in a subspace spanned by DCT basis vectors chosen from the gradient (DCT-AdamW).

    Paper: *SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language Models*,
    Modoranu, Safaryan, Schultheis & Alistarh, 2025 (arXiv:2505.17967; later versions titled
    *FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of Large Language
    Models*).

    The orthonormal DCT-II basis :math:`Q\in\mathbb{R}^{d\times d}` of each size :math:`d` is built
    once (:func:`lit_optim.functional.dct.dct_basis`) and shared by all layers of that size. For a
    matrix gradient :math:`G\in\mathbb{R}^{m\times n}` projected on its smaller side
    :math:`d=\min(m,n)` (shown for :math:`m\le n`; for :math:`m>n` everything is transposed), every
    :math:`T` steps:

    .. math::
        S = Q^{\top} G, \qquad
        \mathcal{I} = \operatorname{top}_r\big(\lVert S_{j,:}\rVert_{1}\big), \qquad
        P = Q_{:,\mathcal{I}}

    (one matmul and a sort; only the ``r`` indices :math:`\mathcal{I}` are stored). Every step:

    .. math::
        R_t &= P^{\top} G_t, \quad m_t = \beta_1 m_{t-1} + (1-\beta_1) R_t, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) R_t^2 \\
        \theta_t &= \theta_{t-1}(1-\eta\lambda) - \eta\, P\,\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}

    When the indices change, ``on_refresh`` decides what happens to the moments: ``"rotate"``
    (default) maps them to the new subspace with :math:`P_{new}^{\top}P_{old}`, which for subsets of
    one orthonormal basis keeps the entries of the basis vectors selected before and after and
    zeroes the new ones (the paper's optional subspace rotation, free here); ``"keep"`` leaves them
    as they are (the authors' default); ``"reset"`` zeroes them. Like GaLore, the update has rank
    ``r``; there is no update outside the subspace (use :class:`~lit_optim.optim.FRUGAL` with
    ``projection="dct"`` for a full-rank update). Error feedback, also in the paper, is not
    implemented. Vectors (and groups with ``project=False``) get AdamW.

    Args:
        params: parameters or parameter groups (a group may set ``project=False``).
        lr: learning rate :math:`\eta` (default 2e-3: a rank-``r`` update moves in fewer directions
            than AdamW's, and low-rank methods take a larger rate; GaLore's effective rate is
            2.5x Adam's).
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)).
        eps: :math:`\epsilon` (default 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda` (default 0).
        rank: an int, or a float in (0, 1] read as a fraction of :math:`\min(m, n)` (default 0.25).
        update_proj_gap: :math:`T`, steps between index selections (default 10: the selection costs
            one ``d x d`` matmul, so it can be frequent; the authors' code defaults to every step,
            GaLore's SVD to 200; on the comparison task T = 10 reached a much lower loss than 200).
        dct_norm: norm ranking the alignment rows, 1 (default, the authors') or 2.
        on_refresh: ``"rotate"`` (default), ``"keep"`` or ``"reset"``, see above.
        proj_dtype: dtype of the projection matrix products, or None (default: the parameter's).
            ``torch.bfloat16`` makes them 3-4x faster on CPUs with bfloat16 units and on GPUs; the
            moments and the weights stay in the parameter's dtype. No effect on index subspaces
            (``"randk"``, ``"topk"``, ``"blockwise"``), which need no product.
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`.
    """

    def __init__(
        self,
        params,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int | float = 0.25,
        update_proj_gap: int = 10,
        dct_norm: int = 1,
        on_refresh: str = "rotate",
        *,
        proj_dtype: Any = None,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        defaults = dict(
            lr=check_lr(lr),
            betas=check_betas(betas),
            eps=check_non_negative("eps", eps),
            weight_decay=check_non_negative("weight_decay", weight_decay),
            rank=check_rank(rank),
            update_proj_gap=check_gap(update_proj_gap),
            dct_norm=check_choice("dct_norm", dct_norm, (1, 2)),
            on_refresh=check_choice("on_refresh", on_refresh, ("rotate", "keep", "reset")),
            projection="dct",
            seed=0,
            proj_dtype=check_proj_dtype(proj_dtype),
            project=None,
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    def basis_bytes(self) -> int:
        """Bytes of the shared DCT bases currently built (not in ``optimizer.state``; one per size,
        dtype and device, shared by every layer and optimizer)."""
        return dct_cache_bytes()

    def _update_dense(self, group, params, grads, states, step, ops):
        self.adamw_dense(group, params, grads, states, step, ops)

    def _phase_a(self, group, it: Item, step: int) -> None:
        st = it.state
        old = st.get("dct_indices")
        low, changed = self._project(group, it, self.refresh_due(step, group["update_proj_gap"]))
        if "exp_avg" not in st or st["exp_avg"].shape != low.shape:
            st["exp_avg"] = torch.zeros_like(low)
            st["exp_avg_sq"] = torch.zeros_like(low)
        elif changed and old is not None:
            mode = group["on_refresh"]
            if mode == "reset":
                st["exp_avg"].zero_()
                st["exp_avg_sq"].zero_()
            elif mode == "rotate":
                new = st["dct_indices"]
                match = new.unsqueeze(1) == old.unsqueeze(0)  # (r_new, r_old)
                found = match.any(1)
                pos = match.to(torch.int64).argmax(1)
                dim = 0 if it.side == "left" else 1
                shape = [1, 1]
                shape[dim] = -1
                keep = found.view(shape).to(low.dtype)
                for key in ("exp_avg", "exp_avg_sq"):
                    st[key] = st[key].index_select(dim, pos).mul_(keep)
        if group["weight_decay"]:
            it.p.mul_(1.0 - group["lr"] * group["weight_decay"])
        it.low = low

    def _phase_b(self, group, items, step, ops):
        scale = self.adam_lowrank(items, group, step, ops)
        for it in items:
            it.scale = scale

    def _phase_c(self, group, it: Item, step: int) -> None:
        self.add_to_param(group, it, it.low, -group["lr"] * it.scale)

    @staticmethod
    def dct_basis(d: int, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
        """The shared ``(d, d)`` orthonormal DCT-II basis (see :func:`lit_optim.functional.dct.dct_basis`)."""
        return dct_basis(d, dtype, device)
