"""Adam with Subset-Norm step sizes and Subspace-Momentum."""

from __future__ import annotations

from typing import Any

from ..functional.subset import SUBSET_REDUCTIONS, subset_shape, subset_sq
from ..registry import register_optimizer
from ._base import check_betas, check_choice, check_lr, check_non_negative
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
from ._precision import check_eps_positive

__all__ = ["SubsetNormAdam"]


def _check_betas(betas: Any) -> tuple[float, ...]:
    """The standard ``[0, 1)`` check, with a pointer to ``adagrad=True`` for ``betas[1] = 1``."""
    try:
        return check_betas(betas)
    except ValueError as e:
        if isinstance(betas, (tuple, list)) and len(betas) == 2 and betas[1] == 1:
            raise ValueError(
                f"{e}; for the AdaGrad-style accumulation of the second moment (AdaGrad-Subset-Norm, "
                "v <- v + red(g^2)) pass adagrad=True"
            ) from None
        raise


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
            \quad(\texttt{adagrad=True}:\ v_{t,S} = v_{t-1,S} + \operatorname{red}_{i\in S} g_{t,i}^2,
            \ 1-\beta_2^{t} \to 1)\\
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
    keeps a full momentum (AdamSN, the paper's first method). ``adagrad=True`` accumulates the
    second moment without decay or bias correction, as AdaGrad does (AdaGrad-Subset-Norm, the
    AdaGrad-type step size of the paper's analysis). (It used to be spelled ``betas[1] = 1.0``;
    ``betas`` now follow torch's ``[0, 1)`` like every other optimizer here, so that a typo is not
    silently read as a different algorithm.)

    FSDP2 / DTensor parameters: exact, with sharded state. The subsets are the lines of the
    projected (smaller) dimension, which is whole on every rank in the layout of
    :mod:`lit_optim.optim._lowrank_shard` (the kept dimension sharded; a matrix with
    :math:`m \le n` is re-sharded from rows to columns by one all-to-all and its update sent back by
    another); the subset statistics, the momentum and the update are then local, and only the
    subspace selection all-reduces sums over the kept dimension (top-k line norms, DCT scores; the
    SVD rule's Gram matrix goes to an owner rank, which broadcasts the basis). State: the subset
    second moment and the momentum are DTensors sharded along the kept dimension, a dense basis
    sharded along its rows, index vectors replicated.

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
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)`` (default (0.9, 0.999)).
        eps: :math:`\epsilon` (default 1e-8); must be > 0: with ``eps=0`` a subset whose gradient
            has always been exactly zero would divide 0 by 0.
        weight_decay: decoupled weight decay :math:`\lambda` (default 0).
        rank: subspace size of the momentum: an int or a fraction of :math:`\min(m, n)` (default
            0.25; the paper uses rank 128 for hidden size 512).
        update_proj_gap: :math:`T` (default 200).
        projection: subspace rule (default ``"topk"``).
        subspace_momentum: keep the momentum in the subspace (default True).
        reset_momentum: zero the momentum when the subspace changes (default True).
        subset_reduction: ``"mean"`` (default) or ``"sum"`` of the squared gradient over a subset.
        adagrad: accumulate the second moment as AdaGrad (default False; see above).
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
        adagrad: bool = False,
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
            eps=check_eps_positive(eps, self.EPS_WHY),
            weight_decay=check_non_negative("weight_decay", weight_decay),
            rank=check_rank(rank),
            update_proj_gap=check_gap(update_proj_gap),
            projection=check_projection(projection, PROJECTIONS),
            subspace_momentum=bool(subspace_momentum),
            reset_momentum=bool(reset_momentum),
            subset_reduction=check_choice("subset_reduction", subset_reduction, SUBSET_REDUCTIONS),
            adagrad=bool(adagrad),
            seed=seed,
            proj_dtype=check_proj_dtype(proj_dtype),
            project=None,
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    # -- state ----------------------------------------------------------------------------------

    def _matrix_state_spec(self, group, M, N, side, r):
        # the subset second moment, one entry per line of the projected dimension: (1, N) or (M, 1)
        spec = [("exp_avg_sq", subset_shape(M, N), "kept")]
        if group["subspace_momentum"]:
            spec = super()._matrix_state_spec(group, M, N, side, r) + spec
            spec.append(("exp_avg", (r, N) if side == "left" else (M, r), "kept"))
        else:
            spec.append(("exp_avg", (M, N), "kept"))
        return spec

    def _bc2(self, group, step: int) -> float:
        return 1.0 if group["adagrad"] else 1.0 - group["betas"][1] ** step

    def _accumulate(self, group, v, sq, ops=None) -> None:
        """``v <- beta2 v + (1 - beta2) sq`` (``v <- v + sq`` with ``adagrad=True``)."""
        if group["adagrad"]:
            v.add_(sq)
        else:
            beta2 = group["betas"][1]
            v.mul_(beta2).add_(sq, alpha=1.0 - beta2)

    def _update_dense(self, group, params, grads, states, step, ops):
        beta1, beta2 = group["betas"]
        lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        if wd:
            ops.mul_(params, 1.0 - lr * wd)
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        ops.lerp_(m, grads, 1.0 - beta1)
        if group["adagrad"]:
            ops.addcmul_(v, grads, grads, 1.0)
        else:
            ops.mul_(v, beta2)
            ops.addcmul_(v, grads, grads, 1.0 - beta2)
        bc1 = 1.0 - beta1**step
        bc2 = self._bc2(group, step)
        denom = ops.sqrt(v)
        ops.add_(denom, eps * bc2**0.5)
        ops.addcdiv_(params, m, denom, -lr * bc2**0.5 / bc1)

    def _phase_a(self, group, it: Item, step: int) -> None:
        # the subsets are the lines of the projected dimension, whole on every rank under FSDP2
        v = self._matrix_state(it, "exp_avg_sq", subset_shape(it.M, it.N))
        sq = subset_sq(it.g, group["subset_reduction"], dim=0 if it.side == "left" else 1)
        self._accumulate(group, v, sq)
        if not group["subspace_momentum"]:
            self._matrix_state(it, "exp_avg", (it.M, it.N))
            return
        low, changed = self._project(group, it, self.refresh_due(step, group["update_proj_gap"]))
        m = self._matrix_state(it, "exp_avg", it.low_shape)
        if changed and group["reset_momentum"]:
            m.zero_()
        it.low = low

    def _phase_b(self, group, items, step, ops):
        beta1 = group["betas"][0]
        m = [it.local["exp_avg"] for it in items]
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
        beta1 = group["betas"][0]
        lr = float(group["lr"])
        bc2 = self._bc2(group, step)
        denom = (it.local["exp_avg_sq"] / bc2).sqrt_().add_(float(group["eps"]))
        if not group["subspace_momentum"]:
            num, value = it.local["exp_avg"], -lr / (1.0 - beta1**step)
        else:
            num, value = it.g, -lr
        it.out.addcdiv_(num, denom, value=value)
        if group["subspace_momentum"]:
            # N = G + back(m/bc1 - R); the subset denominators broadcast along the projected side
            self.add_to_param(group, it, it.low.div_(denom), -lr)
