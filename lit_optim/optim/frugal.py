"""FRUGAL: full-rank updates with gradient splitting."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..functional.lowrank import add_back_
from ..registry import register_optimizer
from ._base import FOREACH_OPS, LOOP_OPS, check_betas, check_choice, check_lr, check_non_negative
from ._dtensor import local
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

__all__ = ["FRUGAL"]


@register_optimizer(
    "frugal",
    family="memory-reduced",
    paper="FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training "
    "(Zmushko, Beznosikov, Takáč & Horváth, ICML 2025)",
    summary="AdamW in a rank-r subspace of each matrix, state-free signSGD on the rest: full-rank updates, ~1/4 of Adam's state",
    default_lr=1e-3,
    grouping=lowrank_groups,
)
class FRUGAL(ProjectedOptimizer):
    r"""FRUGAL: AdamW on a low-dimensional subspace of each matrix, state-free signSGD (or SGD) on
    the remaining directions, so the update stays full-rank while the optimizer state is that of a
    rank-``r`` method.

    Paper: *FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training*,
    Zmushko, Beznosikov, Takáč & Horváth, ICML 2025 (arXiv:2411.07837).

    For a matrix gradient :math:`G \in \mathbb{R}^{m\times n}` (conv kernels flattened to
    ``(shape[0], -1)``) and a subspace :math:`\mathcal{P}_k` chosen at the last refresh (every
    :math:`T` steps), with :math:`s` the number of steps since that refresh:

    .. math::
        R_t &= \mathcal{P}_k^{\top}(G_t) \quad\text{(the state-full part, } r\times n \text{ or } m\times r)\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) R_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) R_t^2\\
        \theta_t &= \theta_{t-1}(1-\eta\lambda)
            - \eta\,\mathcal{P}_k\Big(\frac{m_t/(1-\beta_1^{s})}{\sqrt{v_t/(1-\beta_2^{s})}+\epsilon}\Big)
            - \eta\,\gamma\,\operatorname{sign}\big(G_t - \mathcal{P}_k\mathcal{P}_k^{\top}(G_t)\big)

    The moments are reset to zero when the subspace changes (``reset_state=True``, as in the
    paper). ``state_free="sgd"`` replaces the sign by the residual itself; ``state_full="sgdm"``
    replaces the Adam step by momentum SGD (:math:`m_t` only, the variant of the paper's
    convergence proof).

    Subspace rules (``projection``): ``"svd"`` top singular vectors of the gradient (GaLore),
    ``"random"`` random orthonormal basis, ``"randk"`` random coordinates (rows or columns),
    ``"topk"`` the rows/columns with the largest gradient norms, ``"dct"`` gradient-aligned DCT
    basis vectors, ``"blockwise"`` whole matrices in turn (BAdam): the group's matrices are split in
    ``ceil(1/rank)`` contiguous blocks of about equal size, one block at a time gets AdamW (its
    state is created at activation and freed afterwards) and the others signSGD, cycling every
    :math:`T` steps; or a callable ``fn(grad_2d, r, side) -> basis`` returning a ``(d, r)``
    orthonormal float basis or ``r`` int64 row/column indices (``side`` is ``"left"`` when
    ``m <= n``). Projections act on the smaller side :math:`d=\min(m,n)`. Random rules draw from
    a generator seeded by ``(seed, parameter index, refresh count)``, so resumed runs pick the same
    subspaces. ``"randk"``, ``"topk"`` and ``"blockwise"`` need no matrix product per step.

    Parameters with fewer than 2 dimensions, and groups with ``project=False``, get AdamW. The
    factory (``create_optimizer(model, "frugal")``) projects every matrix including embeddings and
    the output head; see :func:`~lit_optim.optim.lowrank_groups` for the paper's split.

    FSDP2 / DTensor parameters (``fully_shard``'s ``Shard(0)``, HSDP, 2-D ``Shard(1)``): exact (the
    result of one process on the whole batch) with sharded state, by shard-aware maths rather than
    gathering matrices to owner ranks, so that every rank keeps about ``1/W`` of each matrix's
    state and per-step traffic falls with the number of ranks. Every quantity of the update is
    computed line by line along the kept (larger) dimension of the matrix, so the update is
    computed in a layout where the projected dimension is whole and the kept one sharded
    (:mod:`lit_optim.optim._lowrank_shard`): a matrix with :math:`m > n` is already laid out so by
    ``Shard(0)``; one with :math:`m \le n` is re-sharded from rows to columns by one all-to-all and
    its update sent back by another (:math:`2(W-1)/W` times the matrix bytes per step in total).
    The subspace refresh all-reduces sums over the kept dimension: the top-k line norms (``d``
    numbers), the DCT scores (``d``), or the ``d x d`` Gram matrix of the SVD rule, which is summed
    onto one owner rank (owners balanced over the ranks) that computes the eigenvectors and
    broadcasts the basis. Random rules are seeded identically on every rank. State: the moments
    are DTensors sharded along the kept dimension, a dense basis is sharded along its ``d`` rows
    (all-gathered when used), index vectors are replicated; all of it exists from construction.
    ``"blockwise"`` is elementwise and runs on the local shards. A callable projection needs the
    whole gradient and is refused for DTensor parameters.

    Args:
        params: parameters or parameter groups (a group may set ``project=False``).
        lr: learning rate :math:`\eta` (default 1e-3).
        betas: :math:`(\beta_1, \beta_2)` of the state-full Adam (default (0.9, 0.999)).
        eps: :math:`\epsilon` (default 1e-8); must be > 0: with ``eps=0`` a direction whose projected
            gradient has always been exactly zero would divide 0 by 0.
        weight_decay: decoupled weight decay :math:`\lambda` (default 0).
        rank: subspace size: an int, or a float in (0, 1] read as a fraction of :math:`\min(m, n)`
            (default 0.25, the paper's density :math:`\rho=0.25`); for ``"blockwise"`` the fraction
            of the group's matrix elements that are state-full at a time.
        update_proj_gap: :math:`T`, steps between subspace refreshes (default 200, the paper's).
        projection: subspace rule, see above (default ``"randk"``: no matmul, no basis to store).
        state_full: ``"adamw"`` (default) or ``"sgdm"``.
        state_free: ``"signsgd"`` (default, the paper's main choice), ``"sgd"`` or ``"none"``
            (no update outside the subspace: a GaLore-style low-rank method).
        state_free_lr_scale: :math:`\gamma`, the state-free learning rate relative to ``lr``
            (default 1.0).
        reset_state: zero the moments when the subspace changes (default True); with ``False``
            they carry over as in GaLore. Blockwise blocks always start from a fresh state.
        seed: seed of the random subspace rules (default 0).
        proj_dtype: dtype of the projection matrix products, or None (default: the parameter's).
            ``torch.bfloat16`` makes them 3-4x faster on CPUs with bfloat16 units and on GPUs; the
            moments and the weights stay in the parameter's dtype. No effect on index subspaces
            (``"randk"``, ``"topk"``, ``"blockwise"``), which need no product.
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`.
    """

    projections = PROJECTIONS + ("blockwise",)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int | float = 0.25,
        update_proj_gap: int = 200,
        projection: Any = "randk",
        state_full: str = "adamw",
        state_free: str = "signsgd",
        state_free_lr_scale: float = 1.0,
        reset_state: bool = True,
        seed: int = 0,
        *,
        proj_dtype: Any = None,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        projection = check_projection(projection, self.projections)
        rank = check_rank(rank)
        if projection == "blockwise" and not isinstance(rank, float):
            raise ValueError(f"projection='blockwise' needs rank as a fraction in (0, 1], got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        defaults = dict(
            lr=check_lr(lr),
            betas=check_betas(betas),
            eps=check_eps_positive(eps, self.EPS_WHY),
            weight_decay=check_non_negative("weight_decay", weight_decay),
            rank=rank,
            update_proj_gap=check_gap(update_proj_gap),
            projection=projection,
            state_full=check_choice("state_full", state_full, ("adamw", "sgdm")),
            state_free=check_choice("state_free", state_free, ("signsgd", "sgd", "none")),
            state_free_lr_scale=check_non_negative("state_free_lr_scale", state_free_lr_scale),
            reset_state=bool(reset_state),
            seed=seed,
            proj_dtype=check_proj_dtype(proj_dtype),
            project=None,
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    # -- state ----------------------------------------------------------------------------------

    def _dense_keys(self, group):
        return ("exp_avg", "exp_avg_sq") if group["state_full"] == "adamw" else ("exp_avg",)

    def _matrix_state_spec(self, group, M, N, side, r):
        if group["projection"] == "blockwise":
            # the active block's moments are shaped like the parameter and live only while it is
            # active (state_dict lists them for every matrix, see below)
            return []
        shape = (r, N) if side == "left" else (M, r)
        return super()._matrix_state_spec(group, M, N, side, r) + [
            (k, shape, "kept") for k in self._dense_keys(group)
        ]

    # -- vectors and blockwise -------------------------------------------------------------------

    def _update_dense(self, group, params, grads, states, step, ops):
        if group["state_full"] == "adamw":
            self.adamw_dense(group, params, grads, states, step, ops)
            return
        beta1 = group["betas"][0]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        if wd:
            ops.mul_(params, 1.0 - lr * wd)
        m = [s["exp_avg"] for s in states]
        ops.lerp_(m, grads, 1.0 - beta1)
        ops.add_(params, m, alpha=-lr / (1.0 - beta1**step))

    def _blocks(self, group) -> tuple[dict[int, int], int]:
        """id(param) -> block number for the group's projected matrices (blockwise rule)."""
        mats = [p for p in group["params"] if self._projects(p, group)]
        nblocks = max(1, math.ceil(1.0 / group["rank"] - 1e-9))
        total = sum(p.numel() for p in mats)
        out, cum = {}, 0
        for p in mats:
            mid = cum + p.numel() / 2.0
            out[id(p)] = min(nblocks - 1, int(mid * nblocks / max(total, 1)))
            cum += p.numel()
        return out, nblocks

    def _active_block(self, group, step: int, nblocks: int) -> int:
        """The block that is state-full at ``step`` (1-based)."""
        return ((step - 1) // group["update_proj_gap"]) % nblocks

    def _step_group(self, group, params, grads):
        if group["projection"] != "blockwise":
            return super()._step_group(group, params, grads)
        # blockwise (BAdam): the active block's matrices are ordinary AdamW parameters whose state
        # lives only while the block is active (so their Adam step counts from the activation);
        # the other matrices get the state-free step. Everything is elementwise, so a DTensor
        # parameter is updated on its local shard.
        states = self._prepare_states(group, params)
        blocks, nblocks = self._blocks(group)
        gap = group["update_proj_gap"]
        keys = self._dense_keys(group)
        full: list[tuple] = []
        free_p, free_g = [], []
        for p, g, s in zip(params, grads, states):
            if not self._projects(p, group):
                full.append((p, g, s, s["step"]))
                continue
            if blocks[id(p)] == self._active_block(group, s["step"], nblocks):
                if self.refresh_due(s["step"], gap):
                    for k in keys:
                        s.pop(k, None)
                full.append((p, g, s, self.local_step(s["step"], gap)))
            else:
                for k in ("exp_avg", "exp_avg_sq"):
                    s.pop(k, None)
                free_p.append(local(p)), free_g.append(local(g))
        ops = FOREACH_OPS if (group["foreach"] is None or group["foreach"]) else LOOP_OPS
        if group["maximize"]:
            free_g = [g.neg() for g in free_g]
        if ops.foreach:
            keyed: dict[tuple, list[tuple]] = {}
            for e in full:
                keyed.setdefault((e[0].device, e[0].dtype, e[3]), []).append(e)
            batches = [(es, key[2]) for key, es in keyed.items()]
        else:
            batches = [([e], e[3]) for e in full]
        for es, st in batches:
            gs = [local(e[1]) for e in es]
            if group["maximize"]:
                gs = [g.neg() for g in gs]
            sts = self._dense_states(group, [e[0] for e in es], [e[2] for e in es])
            self._update_dense(group, [local(e[0]) for e in es], gs, sts, st, ops)
        if free_p:
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            if wd:
                ops.mul_(free_p, 1.0 - lr * wd)
            self._state_free(group, free_p, free_g, ops)

    def _state_free(self, group, params, grads, ops):
        if group["state_free"] == "none":
            return
        lr = float(group["lr"]) * group["state_free_lr_scale"]
        if group["state_free"] == "sgd":
            ops.add_(params, grads, alpha=-lr)
            return
        # one sign temporary at a time: a list-wide sign would hold a copy of all these gradients
        for p, g in zip(params, grads):
            p.add_(torch.sign(g), alpha=-lr)

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self):
        """As ``torch.optim.Optimizer.state_dict``. With ``projection="blockwise"`` the state of every
        projected matrix lists the moments of the state-full AdamW (zeros for the matrices outside
        the active block), so that the keys and shapes of the state do not depend on the step: a
        distributed checkpoint (``torch.distributed.checkpoint``) loads into the state dict of a
        freshly built optimizer, which must have the keys of the saved one. The optimizer itself
        keeps only the active block's moments (:meth:`load_state_dict` drops the others); a saved
        checkpoint is as large as AdamW's."""
        sd = super().state_dict()
        pid = 0
        for group in self.param_groups:
            blockwise = group["projection"] == "blockwise"
            for p in group["params"]:
                st = sd["state"].get(pid)
                if blockwise and st is not None and self._projects(p, group):
                    missing = [k for k in ("exp_avg", "exp_avg_sq") if k not in st]
                    if missing:
                        st = sd["state"][pid] = dict(st)  # torch's state_dict shares our state dicts
                        for k in missing:
                            st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
                pid += 1
        return sd

    def load_state_dict(self, state_dict):
        """As ``torch.optim.Optimizer.load_state_dict``; with ``projection="blockwise"`` only the
        moments of the block that was active at the saved step are kept (see :meth:`state_dict`)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group["projection"] != "blockwise":
                continue
            blocks, nblocks = self._blocks(group)
            for p in group["params"]:
                s = self.state.get(p)
                if not s or not self._projects(p, group):
                    continue
                t = s.get("step", 0)
                if t < 1 or blocks[id(p)] != self._active_block(group, t, nblocks):
                    for k in ("exp_avg", "exp_avg_sq"):
                        s.pop(k, None)

    # -- projected matrices ----------------------------------------------------------------------

    def _phase_a(self, group, it: Item, step: int) -> None:
        gap = group["update_proj_gap"]
        low, changed = self._project(group, it, self.refresh_due(step, gap))
        for k in self._dense_keys(group):
            mom = self._matrix_state(it, k, it.low_shape)
            if changed and group["reset_state"]:
                mom.zero_()
        lr = float(group["lr"])
        if group["state_free"] != "none" and group["state_free_lr_scale"] and lr:
            sign = group["state_free"] == "signsgd"
            if it.proj.dtype == torch.int64:
                # the residual is the gradient with the selected rows/columns zeroed
                res = torch.sign(it.g) if sign else it.g.clone()
                res.index_fill_(0 if it.side == "left" else 1, it.proj, 0.0)
            else:
                res = it.g.clone(memory_format=torch.contiguous_format)
                add_back_(res, low, it.proj, it.side, alpha=-1.0, dtype=self.mm_dtype(group))
                if sign:
                    res.sign_()
            it.out.add_(res, alpha=-lr * group["state_free_lr_scale"])
            del res
        it.low = low

    def _phase_b(self, group, items, step, ops):
        gap = group["update_proj_gap"]
        s = self.local_step(step, gap) if group["reset_state"] else step
        if group["state_full"] == "adamw":
            scale = self.adam_lowrank(items, group, s, ops)
        else:
            beta1 = group["betas"][0]
            m = [it.local["exp_avg"] for it in items]
            ops.lerp_(m, [it.low for it in items], 1.0 - beta1)
            ops.copy_([it.low for it in items], m)
            scale = 1.0 / (1.0 - beta1**s)
        for it in items:
            it.scale = scale

    def _phase_c(self, group, it: Item, step: int) -> None:
        self.add_to_param(group, it, it.low, -float(group["lr"]) * it.scale)
