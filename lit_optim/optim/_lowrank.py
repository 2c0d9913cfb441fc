"""Plumbing shared by the memory-reduced optimizers (:class:`~lit_optim.optim.FRUGAL`,
:class:`~lit_optim.optim.SubsetNormAdam`, :class:`~lit_optim.optim.DCTLowRank`).

* :func:`lowrank_groups`: the parameter groups the factory builds for them (``project=True`` for
  every parameter with >= 2 dimensions, embeddings and output head included by default;
  ``project=False`` for vectors).
* :class:`ProjectedOptimizer`: splits each group into projected matrices and the rest, keeps the
  per-matrix subspace (a dense basis, coordinate indices or DCT indices) in the parameter's state,
  refreshes it every ``update_proj_gap`` steps from the current gradient, and runs the subclass's
  update, after the decoupled weight decay of all matrices, in three phases so that the elementwise
  part runs on the multi-tensor (``foreach``) path:
  (A) per matrix: subspace refresh, projection and whatever needs the full gradient;
  (B) on lists of low-rank tensors: the optimizer's moment updates;
  (C) per matrix: the update projected back and added to the weights.
  The matrix products are the same on both paths, so ``foreach=True`` and ``foreach=False`` agree to
  rounding of the elementwise kernels. All state is created at construction
  (:meth:`ProjectedOptimizer._matrix_state_spec`), with the shapes of the low-rank method.
* DTensor parameters (FSDP2): the update is computed in a layout where each matrix's projected
  dimension is whole and its kept dimension sharded, exact and with sharded state; see
  :mod:`lit_optim.optim._lowrank_shard`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..functional.dct import dct_basis, dct_indices
from ..functional.lowrank import (
    add_back_,
    basis_from_gram,
    gram,
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
from ._distributed import assign_owners
from ._dtensor import describe_placements, is_dtensor, local
from ._lowrank_shard import (
    MatrixLayout,
    all_reduce,
    broadcast,
    local_part,
    matrix_layout,
    reduce_to,
    reshard,
    sharded_zeros,
)
from ._precision import PositiveEps

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
_INDEX_KEYS = ("indices", "dct_indices", "dir_step")


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
    """One projected matrix during a step.

    ``g`` and ``out`` are in the *compute layout*: the whole matrix for a regular parameter, this
    rank's shard of the kept dimension for a sharded DTensor (see :mod:`._lowrank_shard`); ``m``,
    ``n`` are their sizes, ``M``, ``N`` those of the whole matrix."""

    p: Tensor  # the parameter as given (a DTensor under FSDP2)
    g: Tensor  # the (m, n) gradient in the compute layout
    state: dict[str, Any]
    m: int
    n: int
    side: str
    r: int
    out: Tensor  # (m, n) tensor the update is added into: the parameter's view, or a buffer
    M: int = 0
    N: int = 0
    layout: MatrixLayout | None = None
    buffered: bool = False  # out is a buffer, added into the parameter at the end of the step
    owner: int = 0  # rank (of the layout's group) that computes an SVD basis
    proj: Tensor | None = None  # the basis used this step: dense (d, r) or int64 indices
    low: Tensor | None = None  # projected gradient / low-rank work tensor
    scale: float = 1.0  # multiplier of the back-projected update (bias corrections)
    local: dict[str, Tensor] = field(default_factory=dict)  # local views of the state tensors in use

    @property
    def low_shape(self) -> tuple[int, int]:
        """Global shape of the low-rank tensors: ``(r, N)`` (left) or ``(M, r)`` (right)."""
        return (self.r, self.N) if self.side == "left" else (self.M, self.r)


class ProjectedOptimizer(PositiveEps, LitOptimizer):
    """Base of the optimizers that keep their statistics in a per-matrix subspace.

    Group options read here: ``rank``, ``update_proj_gap``, ``projection``, ``seed``, ``project``
    (``None``: project every parameter with >= 2 dimensions, ``False``: none of the group's).
    Subclasses implement :meth:`_update_dense` (vectors: AdamW), :meth:`_phase_a`,
    :meth:`_phase_b`, :meth:`_phase_c`, and list their state in :meth:`_matrix_state_spec` and
    :meth:`_dense_keys`, from which the state is created at construction.

    DTensor parameters (FSDP2 and the placements of :data:`._lowrank_shard.SUPPORTED_PLACEMENTS`)
    are updated exactly, with the state sharded; see :mod:`._lowrank_shard`.
    """

    needs_matrix_shapes = True
    refuses_float16 = True

    projections: tuple[str, ...] = PROJECTIONS
    #: the update is shard-aware (see :mod:`._lowrank_shard`)
    supports_dtensor = True

    # -- hyperparameters ------------------------------------------------------------------------

    #: what eps = 0 would divide (quoted when it is refused, in the constructor and, through
    #: :class:`PositiveEps`, in parameter-group dicts)
    EPS_WHY = "a direction or coordinate whose gradient has always been exactly zero would divide 0 by 0 (NaN)"
    eps_zero_reason = EPS_WHY

    # -- layout and subspaces --------------------------------------------------------------------

    def _projects(self, p: Tensor, group: dict[str, Any]) -> bool:
        return not (group.get("project") is False or p.ndim < 2 or p.numel() == 0)

    @staticmethod
    def _geometry(p: Tensor, group: dict[str, Any]) -> tuple[int, int, str, int]:
        """``(M, N, side, r)`` of a projected parameter (global sizes for a DTensor)."""
        M, N = matrix_shape(p.shape)
        return M, N, projection_side(M, N), resolve_rank(group["rank"], min(M, N))

    def _param_index(self, p: Tensor) -> int:
        i = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return i
                i += 1
        return i

    def _subspace_key(self, group: dict[str, Any]) -> str | None:
        """State key of the subspace of the group's rule (None: a callable's, known at its first call)."""
        rule = group["projection"]
        if callable(rule):
            return None
        return {"svd": "basis", "random": "basis", "randk": "indices", "topk": "indices", "dct": "dct_indices"}.get(rule)

    def _matrix_state_spec(
        self, group: dict[str, Any], M: int, N: int, side: str, r: int
    ) -> list[tuple[str, tuple[int, ...], str]]:
        """``(key, global shape, kind)`` of the state of a projected matrix; ``kind`` is ``"kept"``
        (a float tensor with the matrix's kept dimension, sharded along it), ``"basis"`` (the
        ``(d, r)`` float basis, sharded along ``d``) or ``"index"`` (int64, replicated). The base
        lists the subspace; subclasses add their moments."""
        key = self._subspace_key(group)
        if key is None:
            return []
        d = min(M, N)
        return [(key, (d, r) if key == "basis" else (r,), "basis" if key == "basis" else "index")]

    def _dense_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """State keys (shaped like the parameter) of the parameters that are not projected."""
        return ("exp_avg", "exp_avg_sq")

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["pindex"] = self._param_index(p)
        if not self._projects(p, group):
            for key in self._dense_keys(group):
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return
        M, N, side, r = self._geometry(p, group)
        layout = matrix_layout(p, side, type(self).__name__)
        if is_dtensor(p) and callable(group["projection"]):
            raise TypeError(
                f"{type(self).__name__}: a callable projection needs the whole gradient of each matrix, and the "
                f"parameter of shape {tuple(p.shape)} is a DTensor ({describe_placements(p)}); use one of the "
                f"built-in rules {list(self.projections)}, which are exact on shards"
            )
        for key, shape, kind in self._matrix_state_spec(group, M, N, side, r):
            state[key] = self._new_state(p, layout, shape, kind, side)

    @staticmethod
    def _new_state(p: Tensor, layout: MatrixLayout | None, shape: tuple[int, ...], kind: str, side: str) -> Tensor:
        device = local(p).device
        if kind == "index":
            return torch.zeros(shape, dtype=torch.int64, device=device)
        if layout is None:
            return torch.zeros(shape, dtype=p.dtype, device=device)
        return sharded_zeros(layout, shape, p.dtype, 0 if kind == "basis" else layout.kept_dim)

    def _matrix_state(self, it: Item, key: str, shape: tuple[int, ...], kind: str = "kept") -> Tensor:
        """The local view of state ``key`` of ``it`` (global ``shape``), created as zeros when it is
        missing or has another shape (the group's rank was changed)."""
        st = it.state
        t = st.get(key)
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape):
            t = st[key] = self._new_state(it.p, it.layout, shape, kind, it.side)
        loc = local(t)
        it.local[key] = loc
        return loc

    def _dense_states(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
        """Per parameter, the local views of its dense state (created when missing)."""
        keys = self._dense_keys(group)
        out = []
        for p, s in zip(params, states):
            for k in keys:
                if k not in s:
                    s[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append({k: local(s[k]) for k in keys})
        return out

    @staticmethod
    def refresh_due(step: int, gap: int) -> bool:
        return (step - 1) % gap == 0

    @staticmethod
    def local_step(step: int, gap: int) -> int:
        """Steps since the last subspace refresh, counting the refresh step as 1."""
        return (step - 1) % gap + 1

    def _store_basis(self, it: Item, basis: Tensor) -> None:
        """Store a new dense ``(d, r)`` basis (this rank's rows of it for a sharded parameter)."""
        st = it.state
        if it.layout is None:
            st["basis"] = basis.to(device=it.g.device, dtype=it.g.dtype).contiguous()
            return
        loc = self._matrix_state(it, "basis", tuple(basis.shape), "basis")
        loc.copy_(local_part(basis, it.layout, 0))

    def _new_subspace(self, group: dict[str, Any], it: Item) -> Tensor | None:
        """Compute the subspace of ``it`` from its gradient, store it in the state and set
        ``it.proj``; returns the projected gradient when the rule computes it on the way (DCT)."""
        st = it.state
        rule = group["projection"]
        lay = it.layout
        d = it.m if it.side == "left" else it.n  # the projected dimension is whole on every rank
        k = (st["step"] - 1) // group["update_proj_gap"]
        reduce = None if lay is None else (lambda t: all_reduce(t, lay))
        low = None
        mine = self._subspace_key(group)
        for key in ("basis", "indices", "dct_indices"):
            if key != mine:
                st.pop(key, None)  # the rule was changed in the group: drop the old kind of subspace
        if callable(rule):
            self._callable_subspace(it, rule(it.g, it.r, it.side), d)
        elif rule == "svd":
            if lay is None:
                basis = svd_basis(it.g, it.r, it.side)
            else:
                full = reduce_to(gram(it.g, it.side), lay, it.owner)
                if lay.rank == it.owner:
                    basis = basis_from_gram(full, it.r, it.g.dtype)
                else:
                    basis = torch.empty(d, it.r, dtype=it.g.dtype, device=it.g.device)
                basis = broadcast(basis, lay, it.owner)
            self._store_basis(it, basis)
            it.proj = basis
            return None
        elif rule == "random":
            gen = seeded_generator(group["seed"], st["pindex"], k)
            basis = random_basis(d, it.r, gen, it.g.dtype, it.g.device)
            self._store_basis(it, basis)
            it.proj = basis
            return None
        elif rule == "randk":
            gen = seeded_generator(group["seed"], st["pindex"], k)
            st["indices"] = random_indices(d, it.r, gen, it.g.device)
        elif rule == "topk":
            st["indices"] = topk_indices(it.g, it.r, it.side, reduce=reduce)
        elif rule == "dct":
            idx, low = dct_indices(
                it.g, it.r, it.side, norm=group.get("dct_norm", 1), dtype=self.mm_dtype(group), reduce=reduce
            )
            st["dct_indices"] = idx
        else:  # pragma: no cover - validated in __init__
            raise ValueError(f"unknown projection {rule!r}")
        it.proj = self._projector(group, it)
        return low

    def _callable_subspace(self, it: Item, b: Any, d: int) -> None:
        st = it.state
        if not isinstance(b, Tensor):
            raise TypeError(f"projection callable must return a tensor, got {type(b).__name__}")
        for key in ("basis", "indices"):
            st.pop(key, None)
        if b.dtype in (torch.int64, torch.int32):
            if b.shape != (it.r,):
                raise ValueError(f"projection callable returned indices of shape {tuple(b.shape)}, expected ({it.r},)")
            if b.unique().numel() != it.r or int(b.min()) < 0 or int(b.max()) >= d:
                raise ValueError(f"projection callable must return {it.r} distinct indices in [0, {d}), got {b.tolist()}")
            st["indices"] = b.to(device=it.g.device, dtype=torch.int64)
        elif b.is_floating_point():
            if b.shape != (d, it.r):
                raise ValueError(f"projection callable returned a basis of shape {tuple(b.shape)}, expected ({d}, {it.r})")
            st["basis"] = b.to(device=it.g.device, dtype=it.g.dtype).contiguous()
        else:
            raise TypeError(f"projection callable must return a float basis or int64 indices, got dtype {b.dtype}")

    @staticmethod
    def mm_dtype(group: dict[str, Any]) -> torch.dtype | None:
        """The dtype of the projection products (the group's ``proj_dtype``; None: the gradient's)."""
        name = group.get("proj_dtype")
        return getattr(torch, name) if name else None

    def _projector(self, group: dict[str, Any], it: Item) -> Tensor:
        st = it.state
        if "basis" in st:
            b = st["basis"]
            # a sharded basis is all-gathered (d x r elements) for this step
            return b.full_tensor() if is_dtensor(b) else b
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
        """``out += alpha * back(x)`` into the update target of ``it`` (the parameter's matrix view,
        or the step's buffer), without a full-size temporary for an index basis."""
        add_back_(it.out, x, it.proj, it.side, alpha=alpha, dtype=self.mm_dtype(group))

    # -- step orchestration ----------------------------------------------------------------------

    def _make_item(self, group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any]) -> Item:
        M, N, side, r = self._geometry(p, group)
        layout = matrix_layout(p, side, type(self).__name__)
        pl, gl = local(p), local(g)
        if layout is None:
            g2 = gl.reshape(M, N)
            out = pl.view(M, N) if pl.is_contiguous() else None
        else:
            g2 = gl.reshape(-1, N) if layout.param_dim == 0 else gl
            if layout.resharded:
                g2 = reshard(g2, layout, layout.param_dim, layout.kept_dim, (M, N)[layout.param_dim])
                out = None
            else:
                out = pl.view(g2.shape) if pl.is_contiguous() else None
        if group["maximize"]:
            g2 = g2.neg()
        m, n = g2.shape
        buffered = out is None
        if buffered:
            out = torch.zeros(m, n, dtype=pl.dtype, device=pl.device)
        return Item(p, g2, state, m, n, side, r, out, M=M, N=N, layout=layout, buffered=buffered)

    def _flush(self, it: Item) -> None:
        """Add a buffered update into the parameter (re-sharded back to its layout first)."""
        if not it.buffered:
            return
        u = it.out
        lay = it.layout
        if lay is not None and lay.resharded:
            u = reshard(u, lay, lay.kept_dim, lay.param_dim, (it.M, it.N)[lay.kept_dim])
        pl = local(it.p)
        pl.add_(u.view(pl.shape))

    def _assign_owners(self, group: dict[str, Any], items: list[Item]) -> None:
        """Spread the eigen-decompositions of a refresh of SVD subspaces over the ranks."""
        if group["projection"] != "svd":
            return
        by_group: dict[int, list[Item]] = {}
        for it in items:
            if it.layout is not None and self.refresh_due(it.state["step"], group["update_proj_gap"]):
                by_group.setdefault(id(it.layout.group), []).append(it)
        for its in by_group.values():
            costs = [float(min(it.M, it.N)) ** 3 for it in its]
            for it, owner in zip(its, assign_owners(costs, its[0].layout.world)):
                it.owner = owner

    def _decay(self, group: dict[str, Any], params: list[Tensor], ops: TensorListOps) -> None:
        """Decoupled weight decay ``p <- p (1 - lr wd)`` of projected matrices (before their update,
        which does not depend on ``p``)."""
        wd, lr = float(group["weight_decay"]), float(group["lr"])
        if wd and params:
            ops.mul_([local(p) for p in params], 1.0 - lr * wd)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = self._prepare_states(group, params)
        foreach = group["foreach"] is None or group["foreach"]
        ops = FOREACH_OPS if foreach else LOOP_OPS
        dense_idx = [i for i, p in enumerate(params) if not self._projects(p, group)]
        items = [self._make_item(group, p, grads[i], states[i]) for i, p in enumerate(params) if self._projects(p, group)]
        dp = [local(params[i]) for i in dense_idx]
        dg = [local(grads[i]) for i in dense_idx]
        if group["maximize"] and dg:
            dg = torch._foreach_neg(dg)
        ds = self._dense_states(group, [params[i] for i in dense_idx], [states[i] for i in dense_idx])
        steps = [states[i]["step"] for i in dense_idx]
        self._assign_owners(group, items)
        self._decay(group, [it.p for it in items], ops)
        if not foreach:
            for p, g, s, t in zip(dp, dg, ds, steps):
                self._update_dense(group, [p], [g], [s], t, LOOP_OPS)
            for it in items:
                self._update_projected(group, [it], it.state["step"], LOOP_OPS)
        else:
            buckets = group_by_key(len(dp), lambda j: (dp[j].device, dp[j].dtype, steps[j]))
            for js in buckets.values():
                self._update_dense(group, [dp[j] for j in js], [dg[j] for j in js], [ds[j] for j in js], steps[js[0]], FOREACH_OPS)
            key = lambda it: (it.out.device, it.out.dtype, it.state["step"])
            buckets = group_by_key(len(items), lambda j: key(items[j]))
            for js in buckets.values():
                its = [items[j] for j in js]
                self._update_projected(group, its, its[0].state["step"], FOREACH_OPS)
        for it in items:
            self._flush(it)

    def _update_projected(self, group: dict[str, Any], items: list[Item], step: int, ops: TensorListOps) -> None:
        for it in items:
            self._phase_a(group, it, step)
        self._phase_b(group, items, step, ops)
        for it in items:
            self._phase_c(group, it, step)
            it.low = None

    # -- hooks -----------------------------------------------------------------------------------

    def _update_dense(self, group, params, grads, states, step, ops) -> None:  # pragma: no cover - abstract
        """Update of non-projected parameters; ``params``, ``grads`` are local tensors and
        ``states`` dicts of local views of the keys of :meth:`_dense_keys`."""
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
        """AdamW on ``exp_avg`` / ``exp_avg_sq`` (dicts of local tensors)."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        if wd:
            ops.mul_(params, 1.0 - lr * wd)
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        ops.lerp_(m, grads, 1.0 - beta1)
        ops.mul_(v, beta2)
        ops.addcmul_(v, grads, grads, 1.0 - beta2)
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        denom = ops.sqrt(v)
        ops.add_(denom, eps * bc2**0.5)
        ops.addcdiv_(params, m, denom, -lr * bc2**0.5 / bc1)

    @staticmethod
    def update_lowrank_moments(items: list[Item], group, ops: TensorListOps) -> tuple[list[Tensor], list[Tensor]]:
        """Adam's moment EMAs on the projected gradients ``it.low``; returns the local ``exp_avg`` and
        ``exp_avg_sq`` lists."""
        beta1, beta2 = group["betas"]
        lows = [it.low for it in items]
        m = [it.local["exp_avg"] for it in items]
        v = [it.local["exp_avg_sq"] for it in items]
        ops.lerp_(m, lows, 1.0 - beta1)
        ops.mul_(v, beta2)
        ops.addcmul_(v, lows, lows, 1.0 - beta2)
        return m, v

    @staticmethod
    def adam_lowrank(items: list[Item], group, step: int, ops: TensorListOps) -> float:
        """Adam moments on the projected gradients ``it.low`` (local states ``exp_avg``/``exp_avg_sq``
        of the low-rank shape); replaces ``it.low`` by ``m / (sqrt(v) + eps')`` and returns the scalar
        ``sqrt(bc2) / bc1`` the update must be multiplied by."""
        beta1, beta2 = group["betas"]
        lows = [it.low for it in items]
        m, v = ProjectedOptimizer.update_lowrank_moments(items, group, ops)
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        # reuse the projected-gradient buffers for the direction m / (sqrt(v) + eps * sqrt(bc2))
        ops.copy_(lows, v)
        ops.sqrt_(lows)
        ops.add_(lows, float(group["eps"]) * bc2**0.5)
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
                        self.state[p][k] = v.detach().to(device=local(p).device, dtype=torch.int64).clone()


def check_gap(update_proj_gap: Any) -> int:
    return check_positive_int("update_proj_gap", update_proj_gap)
