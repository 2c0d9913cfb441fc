"""Plumbing shared by the memory-reduced optimizers (:class:`~lit_optim.optim.FRUGAL`,
:class:`~lit_optim.optim.SubsetNormAdam`, :class:`~lit_optim.optim.DCTLowRank`).

* :func:`lowrank_groups`: the parameter groups the factory builds for them (``project=True`` for
  every parameter with >= 2 dimensions, embeddings and output head included by default;
  ``project=False`` for vectors).
* :class:`ProjectedOptimizer`: splits each group into projected matrices and the rest, keeps the
  per-matrix subspace (a dense basis, coordinate indices or DCT indices) in the parameter's state,
  refreshes it every ``update_proj_gap`` steps from the current gradient, and runs the subclass's
  update in three phases so that the elementwise part runs on the multi-tensor (``foreach``) path:
  (A) per matrix: weight decay, subspace refresh, projection and whatever needs the full gradient;
  (B) on lists of low-rank tensors: the optimizer's moment updates;
  (C) per matrix: the update projected back and added to the weights.
  The matrix products are the same on both paths, so ``foreach=True`` and ``foreach=False`` agree to
  rounding of the elementwise kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..functional.dct import dct_basis, dct_indices
from ..functional.lowrank import (
    add_back_,
    matrix_shape,
    project,
    projection_side,
    random_basis,
    random_indices,
    resolve_rank,
    seeded_generator,
    svd_basis,
    topk_indices,
)
from ._base import FOREACH_OPS, LOOP_OPS, LitOptimizer, TensorListOps, check_positive_int, group_by_key

__all__ = [
    "PROJECTIONS",
    "Item",
    "ProjectedOptimizer",
    "check_proj_dtype",
    "check_projection",
    "check_rank",
    "lowrank_groups",
]

#: built-in subspace rules (FRUGAL adds "blockwise")
PROJECTIONS = ("svd", "random", "randk", "topk", "dct")

#: state keys holding int64 tensors, which torch's load_state_dict would cast to the parameter dtype
_INDEX_KEYS = ("indices", "dct_indices")


def check_rank(rank: Any) -> int | float:
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rank must be an int >= 1 or a float in (0, 1], got {type(rank).__name__} {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"rank must be an int >= 1 or a float in (0, 1], got {rank!r}")
        return rank
    if not 0.0 < rank <= 1.0:
        raise ValueError(f"rank must be an int >= 1 or a float in (0, 1], got {rank!r}")
    return float(rank)


def check_proj_dtype(proj_dtype: Any) -> str | None:
    """``None`` or a floating torch dtype (or its name), stored in the group by name (picklable)."""
    if proj_dtype is None:
        return None
    d = getattr(torch, proj_dtype, None) if isinstance(proj_dtype, str) else proj_dtype
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise ValueError(
            f"proj_dtype must be None or a floating torch dtype (e.g. torch.bfloat16 or 'bfloat16'), got {proj_dtype!r}"
        )
    return str(d).replace("torch.", "")


def check_projection(projection: Any, allowed: tuple[str, ...]) -> str | Callable:
    if callable(projection):
        return projection
    if projection not in allowed:
        raise ValueError(
            f"projection must be one of {list(allowed)} or a callable fn(grad_2d, rank, side) -> basis, "
            f"got {projection!r}"
        )
    return projection


def lowrank_groups(
    model_or_params: Any, weight_decay: float | None = None, project_embeddings: bool = True
) -> list[dict[str, Any]]:
    """Parameter groups for the memory-reduced optimizers.

    * ``project=True``: every parameter with >= 2 dimensions (conv kernels are flattened to
      ``(shape[0], -1)``). With ``project_embeddings=True`` (the default) embeddings and the output
      head are projected too: in a small GPT they hold a large share of the weights, and keeping
      their Adam states would eat most of the memory saving. ``project_embeddings=False`` gives the
      papers' split (GaLore, FRUGAL): embeddings and head get the optimizer's full-state AdamW.
    * ``project=False``: vectors (biases, norm weights), which get the full-state AdamW update
      without weight decay.

    Names returned by a timm-style ``model.no_weight_decay()`` get no weight decay. Parameter groups
    given as a list of dicts are returned unchanged (set ``project`` in them to choose).
    """
    from ..param_groups import _is_groups, _no_decay_names, named_trainable_parameters, output_head_parameters

    if _is_groups(model_or_params):
        return list(model_or_params)
    full_ids: set[int] = set()
    skip: set[str] = set()
    if isinstance(model_or_params, nn.Module):
        skip = _no_decay_names(model_or_params)
        if not project_embeddings:
            for mod in model_or_params.modules():
                if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
                    full_ids.update(id(p) for p in mod.parameters())
            full_ids |= output_head_parameters(model_or_params)
    buckets: dict[tuple[bool, bool], list[Tensor]] = {}
    for name, p in named_trainable_parameters(model_or_params):
        proj = p.ndim >= 2 and id(p) not in full_ids
        decay = p.ndim >= 2 and name not in skip
        buckets.setdefault((proj, decay), []).append(p)
    groups: list[dict[str, Any]] = []
    for (proj, decay), ps in sorted(buckets.items(), key=lambda kv: (not kv[0][0], not kv[0][1])):
        g: dict[str, Any] = {"params": ps, "project": proj}
        if not decay:
            g["weight_decay"] = 0.0
        elif weight_decay is not None:
            g["weight_decay"] = weight_decay
        groups.append(g)
    return groups


@dataclass
class Item:
    """One projected matrix during a step."""

    p: Tensor
    g: Tensor  # the (m, n) view (or copy) of the gradient
    state: dict[str, Any]
    m: int
    n: int
    side: str
    r: int
    proj: Tensor | None = None  # the basis used this step: dense (d, r) or int64 indices
    low: Tensor | None = None  # projected gradient / low-rank work tensor
    scale: float = 1.0  # multiplier of the back-projected update (bias corrections)


class ProjectedOptimizer(LitOptimizer):
    """Base of the optimizers that keep their statistics in a per-matrix subspace.

    Group options read here: ``rank``, ``update_proj_gap``, ``projection``, ``seed``, ``project``
    (``None``: project every parameter with >= 2 dimensions, ``False``: none of the group's).
    Subclasses implement :meth:`_update_dense` (vectors: AdamW), :meth:`_phase_a`,
    :meth:`_phase_b`, :meth:`_phase_c`.
    """

    projections: tuple[str, ...] = PROJECTIONS

    # -- layout and subspaces --------------------------------------------------------------------

    def _projects(self, p: Tensor, group: dict[str, Any]) -> bool:
        return not (group.get("project") is False or p.ndim < 2 or p.numel() == 0)

    def _param_index(self, p: Tensor) -> int:
        i = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return i
                i += 1
        return i

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["pindex"] = self._param_index(p)

    @staticmethod
    def refresh_due(step: int, gap: int) -> bool:
        return (step - 1) % gap == 0

    @staticmethod
    def local_step(step: int, gap: int) -> int:
        """Steps since the last subspace refresh, counting the refresh step as 1."""
        return (step - 1) % gap + 1

    def _new_subspace(self, group: dict[str, Any], it: Item) -> Tensor | None:
        """Compute the subspace of ``it`` from its gradient, store it in the state and set
        ``it.proj``; returns the projected gradient when the rule computes it on the way (DCT)."""
        st = it.state
        rule = group["projection"]
        d = it.m if it.side == "left" else it.n
        k = (st["step"] - 1) // group["update_proj_gap"]
        for key in ("basis", "indices", "dct_indices"):
            st.pop(key, None)
        low = None
        if callable(rule):
            b = rule(it.g, it.r, it.side)
            if not isinstance(b, Tensor):
                raise TypeError(f"projection callable must return a tensor, got {type(b).__name__}")
            if b.dtype in (torch.int64, torch.int32):
                if b.shape != (it.r,):
                    raise ValueError(f"projection callable returned indices of shape {tuple(b.shape)}, expected ({it.r},)")
                if b.unique().numel() != it.r or int(b.min()) < 0 or int(b.max()) >= d:
                    raise ValueError(
                        f"projection callable must return {it.r} distinct indices in [0, {d}), got {b.tolist()}"
                    )
                st["indices"] = b.to(device=it.g.device, dtype=torch.int64)
            elif b.is_floating_point():
                if b.shape != (d, it.r):
                    raise ValueError(f"projection callable returned a basis of shape {tuple(b.shape)}, expected ({d}, {it.r})")
                st["basis"] = b.to(device=it.g.device, dtype=it.g.dtype).contiguous()
            else:
                raise TypeError(f"projection callable must return a float basis or int64 indices, got dtype {b.dtype}")
        elif rule == "svd":
            st["basis"] = svd_basis(it.g, it.r, it.side)
        elif rule == "random":
            gen = seeded_generator(group["seed"], st["pindex"], k)
            st["basis"] = random_basis(d, it.r, gen, it.g.dtype, it.g.device)
        elif rule == "randk":
            gen = seeded_generator(group["seed"], st["pindex"], k)
            st["indices"] = random_indices(d, it.r, gen, it.g.device)
        elif rule == "topk":
            st["indices"] = topk_indices(it.g, it.r, it.side)
        elif rule == "dct":
            idx, low = dct_indices(it.g, it.r, it.side, norm=group.get("dct_norm", 1), dtype=self.mm_dtype(group))
            st["dct_indices"] = idx
        else:  # pragma: no cover - validated in __init__
            raise ValueError(f"unknown projection {rule!r}")
        it.proj = self._projector(group, it)
        return low

    @staticmethod
    def mm_dtype(group: dict[str, Any]) -> torch.dtype | None:
        """The dtype of the projection products (the group's ``proj_dtype``; None: the gradient's)."""
        name = group.get("proj_dtype")
        return getattr(torch, name) if name else None

    def _projector(self, group: dict[str, Any], it: Item) -> Tensor:
        st = it.state
        if "basis" in st:
            return st["basis"]
        if "indices" in st:
            return st["indices"]
        d = it.m if it.side == "left" else it.n
        return dct_basis(d, self.mm_dtype(group) or it.g.dtype, it.g.device).index_select(1, st["dct_indices"])

    def _project(self, group: dict[str, Any], it: Item, refresh: bool) -> tuple[Tensor, bool]:
        """Projected gradient of ``it`` (refreshing the subspace when due); the bool says whether
        the subspace changed this step."""
        st = it.state
        has = any(k in st for k in ("basis", "indices", "dct_indices"))
        if refresh or not has:
            low = self._new_subspace(group, it)
            if low is None:
                low = project(it.g, it.proj, it.side, self.mm_dtype(group))
            return low, True
        it.proj = self._projector(group, it)
        return project(it.g, it.proj, it.side, self.mm_dtype(group)), False

    def add_to_param(self, group: dict[str, Any], it: Item, x: Tensor, alpha: float) -> None:
        """``p += alpha * back(x)`` without a full-size temporary when ``p`` is contiguous (and the
        products run in the parameter's dtype)."""
        p = it.p
        dtype = self.mm_dtype(group)
        if p.is_contiguous():
            add_back_(p.view(it.m, it.n), x, it.proj, it.side, alpha=alpha, dtype=dtype)
        else:
            tmp = x.new_zeros(it.m, it.n)
            add_back_(tmp, x, it.proj, it.side, dtype=dtype)
            p.add_(tmp.view(p.shape), alpha=alpha)

    # -- step orchestration ----------------------------------------------------------------------

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        states = self._prepare_states(group, params)
        foreach = group["foreach"] is None or group["foreach"]
        dense_idx = [i for i, p in enumerate(params) if not self._projects(p, group)]
        proj_idx = [i for i, p in enumerate(params) if self._projects(p, group)]
        items: list[Item] = []
        for i in proj_idx:
            p, g = params[i], grads[i]
            m, n = matrix_shape(p.shape)
            side = projection_side(m, n)
            r = resolve_rank(group["rank"], min(m, n))
            items.append(Item(p, g.reshape(m, n), states[i], m, n, side, r))
        if not foreach:
            for i in dense_idx:
                s = states[i]
                self._update_dense(group, [params[i]], [grads[i]], [s], s["step"], LOOP_OPS)
            for it in items:
                self._update_projected(group, [it], it.state["step"], LOOP_OPS)
            return
        key = lambda p, s: (p.device, p.dtype, s["step"])
        buckets = group_by_key(len(dense_idx), lambda j: key(params[dense_idx[j]], states[dense_idx[j]]))
        for js in buckets.values():
            ii = [dense_idx[j] for j in js]
            self._update_dense(
                group, [params[i] for i in ii], [grads[i] for i in ii], [states[i] for i in ii], states[ii[0]]["step"], FOREACH_OPS
            )
        buckets = group_by_key(len(items), lambda j: key(items[j].p, items[j].state))
        for js in buckets.values():
            its = [items[j] for j in js]
            self._update_projected(group, its, its[0].state["step"], FOREACH_OPS)

    def _update_projected(self, group: dict[str, Any], items: list[Item], step: int, ops: TensorListOps) -> None:
        for it in items:
            self._phase_a(group, it, step)
        self._phase_b(group, items, step, ops)
        for it in items:
            self._phase_c(group, it, step)
            it.low = None

    # -- hooks -----------------------------------------------------------------------------------

    def _update_dense(self, group, params, grads, states, step, ops) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _phase_a(self, group: dict[str, Any], it: Item, step: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _phase_b(self, group: dict[str, Any], items: list[Item], step: int, ops: TensorListOps) -> None:  # pragma: no cover
        raise NotImplementedError

    def _phase_c(self, group: dict[str, Any], it: Item, step: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared pieces ---------------------------------------------------------------------------

    @staticmethod
    def adamw_dense(group, params, grads, states, step, ops) -> None:
        """AdamW with state keys ``exp_avg`` / ``exp_avg_sq`` created on demand."""
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
        ops.mul_(v, beta2)
        ops.addcmul_(v, grads, grads, 1.0 - beta2)
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        denom = ops.sqrt(v)
        ops.add_(denom, group["eps"] * bc2**0.5)
        ops.addcdiv_(params, m, denom, -lr * bc2**0.5 / bc1)

    @staticmethod
    def adam_lowrank(items: list[Item], group, step: int, ops: TensorListOps) -> float:
        """Adam moments on the projected gradients ``it.low`` (states ``exp_avg``/``exp_avg_sq`` of
        the low-rank shape); replaces ``it.low`` by ``m / (sqrt(v) + eps')`` and returns the scalar
        ``sqrt(bc2) / bc1`` the update must be multiplied by."""
        beta1, beta2 = group["betas"]
        lows = [it.low for it in items]
        m = [it.state["exp_avg"] for it in items]
        v = [it.state["exp_avg_sq"] for it in items]
        ops.lerp_(m, lows, 1.0 - beta1)
        ops.mul_(v, beta2)
        ops.addcmul_(v, lows, lows, 1.0 - beta2)
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        # reuse the projected-gradient buffers for the direction m / (sqrt(v) + eps * sqrt(bc2))
        ops.copy_(lows, v)
        ops.sqrt_(lows)
        ops.add_(lows, group["eps"] * bc2**0.5)
        ops.reciprocal_(lows)
        ops.mul_(lows, m)
        return bc2**0.5 / bc1

    # -- checkpoints -----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, keeping the integer index tensors of the
        subspaces integer (torch casts every state tensor to the parameter's dtype)."""
        saved_state = state_dict.get("state", {})
        saved_groups = state_dict.get("param_groups", [])
        keep: dict[Any, dict[str, Tensor]] = {}
        for pid, st in saved_state.items():
            idx = {k: v for k, v in st.items() if k in _INDEX_KEYS and isinstance(v, Tensor)}
            if idx:
                keep[pid] = idx
        super().load_state_dict(state_dict)
        if not keep:
            return
        for sg, g in zip(saved_groups, self.param_groups):
            for pid, p in zip(sg["params"], g["params"]):
                if pid in keep and p in self.state:
                    for k, v in keep[pid].items():
                        self.state[p][k] = v.detach().to(device=p.device, dtype=torch.int64).clone()


def check_gap(update_proj_gap: Any) -> int:
    return check_positive_int("update_proj_gap", update_proj_gap)
