r"""DTensor (FSDP2, HSDP, 2-D tensor-parallel) layout of the memory-reduced optimizers' matrix
updates (:class:`~lit_optim.optim.FRUGAL`, :class:`~lit_optim.optim.SubsetNormAdam`,
:class:`~lit_optim.optim.DCTLowRank`).

These optimizers see a parameter as a matrix ``G`` of shape ``(m, n)`` and work on its smaller side
``d = min(m, n)`` (the *projected* dimension: rows when ``m <= n``, columns otherwise), keeping the
larger one (the *kept* dimension). Every per-step quantity of theirs is computed line by line along
the kept dimension: the projection ``P^T G`` (or ``G P``), the back-projection, the residual
``G - P P^T G``, its sign, the Subset-Norm statistics (one per line of the projected dimension), the
low-rank moments. So the update is **exact on shards of the kept dimension**, with the projected
dimension whole on every rank. The sharded path computes it in that layout:

* ``m > n`` (``"right"``): FSDP2's ``Shard(0)`` already shards the kept rows: nothing moves.
* ``m <= n`` (``"left"``): the gradient is re-sharded from rows to columns by one
  ``all_to_all_single`` (:func:`reshard`), the update computed on the column shard and sent back
  by a second one, then added to the parameter's row shard. Each element crosses the network at
  most once each way: ``2 (W - 1) / W`` times the matrix bytes per step over ``W`` ranks in total,
  ``2 (W - 1) / W^2`` per rank, which falls as ranks are added (an all-reduce of the rank-``r``
  projection would cost every rank about ``2 r n`` whatever ``W``).

Only the subspace selection, every ``update_proj_gap`` steps, needs the whole kept dimension, and it
needs it only through sums over that dimension, which are all-reduced: the ``d x d`` Gram matrix
(SVD rule, summed onto an owner rank that computes the eigenvectors and broadcasts the ``(d, r)``
basis; owners are spread over the ranks with the balancing of
:func:`lit_optim.optim._distributed.assign_owners`), the ``d`` squared line norms (top-k rule), the
``d`` DCT alignment scores (DCT rule). Random rules draw from generators seeded identically on
every rank. Selections made from identical reduced sums are identical on every rank.

State layout (every rank holds the same keys from construction): tensors with a kept dimension
(low-rank moments, Subset-Norm second moments, a full momentum) are DTensors sharded along their
kept dimension over the mesh dimension that shards the parameter (``Shard(1)`` for ``"left"``,
``Shard(0)`` for ``"right"``); a dense ``(d, r)`` basis is a DTensor sharded along ``d`` and
all-gathered (``d x r`` elements) when used; index vectors (``r`` int64) are replicated regular
tensors. :func:`torch.distributed.checkpoint` saves and loads all of them.

Supported placements (:data:`SUPPORTED_PLACEMENTS`): a matrix parameter sharded over at most one
mesh dimension, on dim 0 (any number of dimensions) or on dim 1 (2-D parameters), and replicated
over the others. Anything else raises ``TypeError`` at construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._distributed import row_split
from ._dtensor import is_dtensor

try:  # torch >= 2.4 public location
    from torch.distributed.tensor import zeros as dtensor_zeros
    from torch.distributed.tensor.placement_types import Replicate, Shard
except ImportError:  # pragma: no cover - builds without distributed
    dtensor_zeros = None  # type: ignore[assignment]
    Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "SUPPORTED_PLACEMENTS",
    "MatrixLayout",
    "all_reduce",
    "broadcast",
    "local_part",
    "matrix_layout",
    "reduce_to",
    "reshard",
    "sharded_zeros",
]

#: what the memory-reduced optimizers accept for DTensor matrix parameters (quoted in refusals)
SUPPORTED_PLACEMENTS = (
    "a DTensor matrix parameter must be sharded over at most one mesh dimension and replicated over the "
    "others, on dim 0 (FSDP2's (Shard(0),) on a 1-D mesh, HSDP's (Replicate(), Shard(0))) or, for a 2-D "
    "parameter, on dim 1 (tensor-parallel (Shard(1),)); fully replicated DTensors are accepted too"
)


@dataclass(frozen=True)
class MatrixLayout:
    """How one matrix parameter (viewed as ``(m, n)``) is sharded, and the layout of its update.

    ``param_dim``: the matrix dimension the parameter is sharded on; ``kept_dim``: the one sharded
    in the compute layout (1 for ``"left"``, 0 for ``"right"``). ``mesh_dim`` of ``mesh`` shards
    it over the ``world`` ranks of ``group`` (this rank is ``rank`` there); collectives run on
    ``device`` (the CPU for gloo)."""

    mesh: Any
    mesh_dim: int
    param_dim: int
    kept_dim: int
    group: Any
    world: int
    rank: int
    device: torch.device

    @property
    def resharded(self) -> bool:
        """True when the update is computed on another shard layout than the parameter's."""
        return self.param_dim != self.kept_dim

    def part(self, size: int) -> tuple[int, int]:
        """``(offset, length)`` of this rank's part of a dimension of ``size`` (``torch.chunk``)."""
        return row_split(size, self.world)[self.rank]

    def placements(self, shard_dim: int) -> tuple:
        """Placements of a state tensor sharded on ``shard_dim`` like the parameter's sharding."""
        out = [Replicate()] * self.mesh.ndim
        out[self.mesh_dim] = Shard(shard_dim)
        return tuple(out)


def matrix_layout(p: Tensor, side: str, name: str) -> MatrixLayout | None:
    """The layout of matrix parameter ``p`` (projected on ``side``), or None when this rank holds
    it whole (a regular tensor, a replicated DTensor, a sharding over a mesh dimension of size 1).
    Unsupported placements raise ``TypeError`` naming the supported ones."""
    if not is_dtensor(p):
        return None
    mesh = p.device_mesh
    placements = tuple(p.placements)
    sharded: list[tuple[int, int]] = []
    ok = True
    for i, pl in enumerate(placements):
        if type(pl) is Replicate or mesh.size(i) == 1:
            continue
        if type(pl) is Shard and (pl.dim == 0 or (pl.dim == 1 and p.ndim == 2)):
            sharded.append((i, pl.dim))
            continue
        ok = False
    if not ok or len(sharded) > 1:
        raise TypeError(
            f"{name}: a parameter of shape {tuple(p.shape)} is a DTensor with placements {placements} on a mesh of "
            f"shape {tuple(mesh.shape)}; {SUPPORTED_PLACEMENTS}. Shard such parameters on dim 0, or put them in a "
            "parameter group with project=False, whose AdamW update works on any placement"
        )
    if not sharded:
        return None
    mesh_dim, param_dim = sharded[0]
    group = mesh.get_group(mesh_dim)
    local = p.to_local()
    backend = str(dist.get_backend(group))
    device = local.device if (local.device.type != "cpu" and backend != "gloo") else torch.device("cpu")
    return MatrixLayout(
        mesh=mesh,
        mesh_dim=mesh_dim,
        param_dim=param_dim,
        kept_dim=1 if side == "left" else 0,
        group=group,
        world=mesh.size(mesh_dim),
        rank=mesh.get_local_rank(mesh_dim),
        device=device,
    )


def sharded_zeros(layout: MatrixLayout, shape: Sequence[int], dtype: torch.dtype, shard_dim: int) -> Tensor:
    """A zero DTensor of global ``shape`` sharded on ``shard_dim`` like the parameter's sharding."""
    return dtensor_zeros(tuple(shape), dtype=dtype, device_mesh=layout.mesh, placements=layout.placements(shard_dim))


def local_part(full: Tensor, layout: MatrixLayout, dim: int) -> Tensor:
    """This rank's part of ``full`` along ``dim`` (``torch.chunk`` layout)."""
    off, length = layout.part(full.shape[dim])
    return full.narrow(dim, off, length)


def reshard(x: Tensor, layout: MatrixLayout, from_dim: int, to_dim: int, from_size: int) -> Tensor:
    """Re-shard a 2-D tensor from ``from_dim`` to ``to_dim`` with one ``all_to_all_single``.

    ``x`` is this rank's part along ``from_dim`` (whole matrix size ``from_size`` there) and whole
    along ``to_dim``; the result is whole along ``from_dim`` and this rank's part along ``to_dim``.
    Runs on gloo and NCCL (uneven and empty parts included)."""
    world, me = layout.world, layout.rank
    to_parts = row_split(x.shape[to_dim], world)
    from_parts = row_split(from_size, world)
    pieces = [x.narrow(to_dim, off, n).contiguous().reshape(-1) for off, n in to_parts]
    send = torch.cat(pieces).to(layout.device)
    mine = to_parts[me][1]
    shapes = []
    for s in range(world):
        shape = [0, 0]
        shape[from_dim] = from_parts[s][1]
        shape[to_dim] = mine
        shapes.append(shape)
    out_splits = [math.prod(s) for s in shapes]
    recv = torch.empty(sum(out_splits), dtype=x.dtype, device=layout.device)
    dist.all_to_all_single(recv, send, out_splits, [p.numel() for p in pieces], group=layout.group)
    blocks = [b.view(s) for b, s in zip(torch.split(recv, out_splits), shapes)]
    return torch.cat(blocks, dim=from_dim).to(x.device)


def all_reduce(t: Tensor, layout: MatrixLayout) -> Tensor:
    """The sum of ``t`` over the ranks that shard the parameter (a new tensor on ``t``'s device)."""
    buf = t.to(layout.device, copy=True)
    dist.all_reduce(buf, group=layout.group)
    return buf.to(t.device)


def reduce_to(t: Tensor, layout: MatrixLayout, owner: int) -> Tensor:
    """The sum of ``t`` over the sharding ranks, complete on rank ``owner`` of the group only."""
    buf = t.to(layout.device, copy=True)
    dist.reduce(buf, dst=dist.get_global_rank(layout.group, owner), group=layout.group)
    return buf.to(t.device)


def broadcast(t: Tensor, layout: MatrixLayout, owner: int) -> Tensor:
    """``t`` of rank ``owner`` of the group, on every sharding rank (in place where possible)."""
    buf = t if t.device == layout.device else t.to(layout.device)
    dist.broadcast(buf, src=dist.get_global_rank(layout.group, owner), group=layout.group)
    return buf if buf is t else buf.to(t.device)
