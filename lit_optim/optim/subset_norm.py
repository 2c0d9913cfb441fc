"""Adam with Subset-Norm step sizes and Subspace-Momentum."""

from __future__ import annotations

from typing import Any

import torch

from ..functional.subset import SUBSET_REDUCTIONS, subset_shape, subset_sq
from ..registry import register_optimizer
from ._base import check_choice, check_in_range, check_lr, check_non_negative
from ._lowrank import (
    PROJECTIONS,
    Item,
    ProjectedOptimizer,
    check_gap,
    check_proj_dtype,
    check_projection,
    check_rank,
    lowrank_groups,
)

__all__ = ["SubsetNormAdam"]


def _check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a tuple of 2 floats, got {type(betas).__name__} {betas!r}")
    if len(betas) != 2:
        raise ValueError(f"betas must have 2 entries, got {len(betas)}: {tuple(betas)!r}")
    b1 = check_in_range("betas[0]", betas[0], 0.0, 1.0, high_closed=False)
    b2 = check_in_range("betas[1]", betas[1], 0.0, 1.0)
    return b1, b2


@register_optimizer(
    "subset_norm",
    family="memory-reduced",
    paper="Lean and Mean Adaptive Optimization via Subset-Norm and Subspace-Momentum with Convergence Guarantees "
    "(Nguyen & Nguyen, ICML 2025)",
    summary="Adam whose second moment is shared per row/column and whose momentum lives in a rank-r subspace: "
    "~1/8 of Adam's state",
    default_lr=1e-3,
    grouping=lowrank_groups,
)
class SubsetNormAdam(ProjectedOptimizer):
    r"""Adam with a Subset-Norm second moment and Subspace-Momentum (AdamSNSM).

    Paper: *Lean and Mean Adaptive Optimization via Subset-Norm and Subspace-Momentum with
    Convergence Guarantees* (first version: *Efficient Adaptive Optimization via Subset-Norm and
    Subspace-Momentum*), Thien Hang Nguyen & Huy Le Nguyen, ICML 2025 (arXiv:2411.07120).

    **Subset-Norm**: one second-moment entry per subset of coordinates. For a matrix gradient
    :math:`G\in\mathbb{R}^{m\times n}` the subsets are the columns when :math:`m\le n` and the rows
    otherwise (the paper's heuristic: reduce over the smaller side), so the second moment holds
    :math:`\max(m,n)` numbers instead of :math:`mn`. **Subspace-Momentum**: momentum kept only for
    the projection :math:`R_t = \mathcal{P}^{\top}(G_t)` on a rank-``r`` subspace refreshed every
    :math:`T` steps; the orthogonal complement gets plain (subset-normed) SGD:

    .. math::
        v_{t,S} &= \beta_2 v_{t-1,S} + (1-\beta_2)\,\operatorname{red}_{i\in S} g_{t,i}^2
            \quad(\beta_2 = 1:\ v_{t,S} = v_{t-1,S} + \operatorname{red}_{i\in S} g_{t,i}^2,
            \text{ AdaGrad})\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) R_t \\
        N_t &= \mathcal{P}\big(m_t / (1-\beta_1^{s})\big) + \big(G_t - \mathcal{P}\mathcal{P}^{\top}(G_t)\big)\\
        \theta_t &= \theta_{t-1}(1-\eta\lambda) - \eta\, \frac{N_t}{\sqrt{v_t/(1-\beta_2^{t})} + \epsilon}
            \quad\text{(each coordinate divided by its subset's entry)}

    where :math:`s` counts the steps since the last refresh (the momentum is reset when the
    subspace changes, ``reset_momentum=True``, as in the authors' code) and ``red`` is the mean
    (default) or the sum (the paper's :math:`\|g_S\|^2`) over the subset. With the sum, the update
    is smaller by :math:`\sqrt{|S|}` and the learning rate must grow accordingly (the authors use
    about 10x Adam's); with the mean the same ``lr`` suits the subset-normed matrices and the
    coordinate-wise vectors, and AdamW's learning rate is a good start. ``subspace_momentum=False``
    keeps a full momentum (AdamSN, the paper's first method).

    Subspace rules (``projection``): ``"topk"`` (default: the ``r`` rows/columns of largest
    gradient norm, one of the authors' projectors; no matmul, only indices stored), ``"svd"`` (top
    singular vectors, the paper's main choice), ``"random"``, ``"randk"``, ``"dct"``, or a callable
    ``fn(grad_2d, r, side)`` returning a ``(d, r)`` orthonormal basis or ``r`` int64 indices; see
    :class:`~lit_optim.optim.FRUGAL`. ``"topk"`` is the default because on the comparison task of
    ``benchmarks/memory.py`` it reached a lower loss than ``"svd"`` (see ``docs/memory.md``) at the
    cost of an AdamW step instead of two rank-``r`` matmuls. Vectors (and groups with
    ``project=False``) get Adam (coordinate-wise second moment, full momentum).

    Args:
        params: parameters or parameter groups (a group may set ``project=False``).
        lr: learning rate :math:`\eta` (default 1e-3, with ``subset_reduction="mean"``).
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)); :math:`\beta_2=1` accumulates the
            second moment as AdaGrad does (AdaGradSNSM).
        eps: :math:`\epsilon` (default 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda` (default 0).
        rank: subspace size of the momentum: an int or a fraction of :math:`\min(m, n)` (default
            0.25; the paper uses rank 128 for hidden size 512).
        update_proj_gap: :math:`T` (default 200).
        projection: subspace rule (default ``"topk"``).
        subspace_momentum: keep the momentum in the subspace (default True).
        reset_momentum: zero the momentum when the subspace changes (default True).
        subset_reduction: ``"mean"`` (default) or ``"sum"`` of the squared gradient over a subset.
        seed: seed of the random subspace rules (default 0).
        proj_dtype: dtype of the projection matrix products, or None (default: the parameter's).
            ``torch.bfloat16`` makes them 3-4x faster on CPUs with bfloat16 units and on GPUs; the
            moments and the weights stay in the parameter's dtype. No effect on index subspaces
            (``"randk"``, ``"topk"``, ``"blockwise"``), which need no product.
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int | float = 0.25,
        update_proj_gap: int = 200,
        projection: Any = "topk",
        subspace_momentum: bool = True,
        reset_momentum: bool = True,
        subset_reduction: str = "mean",
        seed: int = 0,
        *,
        proj_dtype: Any = None,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        defaults = dict(
            lr=check_lr(lr),
            betas=_check_betas(betas),
            eps=check_non_negative("eps", eps),
            weight_decay=check_non_negative("weight_decay", weight_decay),
            rank=check_rank(rank),
            update_proj_gap=check_gap(update_proj_gap),
            projection=check_projection(projection, PROJECTIONS),
            subspace_momentum=bool(subspace_momentum),
            reset_momentum=bool(reset_momentum),
            subset_reduction=check_choice("subset_reduction", subset_reduction, SUBSET_REDUCTIONS),
            seed=seed,
            proj_dtype=check_proj_dtype(proj_dtype),
            project=None,
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    @staticmethod
    def _bc2(beta2: float, step: int) -> float:
        return 1.0 if beta2 >= 1.0 else 1.0 - beta2**step

    def _update_dense(self, group, params, grads, states, step, ops):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        for p, s in zip(params, states):
            if "exp_avg" not in s:
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["weight_decay"]:
            ops.mul_(params, 1.0 - lr * group["weight_decay"])
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        ops.lerp_(m, grads, 1.0 - beta1)
        if beta2 < 1.0:
            ops.mul_(v, beta2)
            ops.addcmul_(v, grads, grads, 1.0 - beta2)
        else:
            ops.addcmul_(v, grads, grads, 1.0)
        bc1 = 1.0 - beta1**step
        bc2 = self._bc2(beta2, step)
        denom = ops.sqrt(v)
        ops.add_(denom, group["eps"] * bc2**0.5)
        ops.addcdiv_(params, m, denom, -lr * bc2**0.5 / bc1)

    def _phase_a(self, group, it: Item, step: int) -> None:
        st = it.state
        beta2 = group["betas"][1]
        lr = group["lr"]
        if group["weight_decay"]:
            it.p.mul_(1.0 - lr * group["weight_decay"])
        if "exp_avg_sq" not in st:
            st["exp_avg_sq"] = it.g.new_zeros(subset_shape(it.m, it.n))
        sq = subset_sq(it.g, group["subset_reduction"])
        v = st["exp_avg_sq"]
        if beta2 < 1.0:
            v.mul_(beta2).add_(sq, alpha=1.0 - beta2)
        else:
            v.add_(sq)
        if not group["subspace_momentum"]:
            if "exp_avg" not in st:
                st["exp_avg"] = it.g.new_zeros(it.m, it.n)
            return
        low, changed = self._project(group, it, self.refresh_due(step, group["update_proj_gap"]))
        if "exp_avg" not in st or st["exp_avg"].shape != low.shape:
            st["exp_avg"] = torch.zeros_like(low)
        elif changed and group["reset_momentum"]:
            st["exp_avg"].zero_()
        it.low = low

    def _phase_b(self, group, items, step, ops):
        beta1 = group["betas"][0]
        m = [it.state["exp_avg"] for it in items]
        if not group["subspace_momentum"]:
            ops.lerp_(m, [it.g for it in items], 1.0 - beta1)
            return
        lows = [it.low for it in items]
        ops.lerp_(m, lows, 1.0 - beta1)
        s = self.local_step(step, group["update_proj_gap"]) if group["reset_momentum"] else step
        # low <- m / bc1 - R : the momentum's correction of the projected gradient
        ops.mul_(lows, -1.0)
        ops.add_(lows, m, alpha=1.0 / (1.0 - beta1**s))

    def _phase_c(self, group, it: Item, step: int) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        bc2 = self._bc2(beta2, step)
        denom = (it.state["exp_avg_sq"] / bc2).sqrt_().add_(group["eps"])
        p = it.p
        if not group["subspace_momentum"]:
            num, value = it.state["exp_avg"], -lr / (1.0 - beta1**step)
        else:
            num, value = it.g, -lr
        if p.is_contiguous():
            p.view(it.m, it.n).addcdiv_(num, denom, value=value)
        else:
            p.add_((num / denom).view(p.shape), alpha=value)
        if group["subspace_momentum"]:
            # N = G + back(m/bc1 - R); the subset denominators broadcast along the projected side
            self.add_to_param(group, it, it.low.div_(denom), -lr)
