r"""Owner-rank distribution of whole-matrix work, shared by the DDP and the FSDP2 paths of the
orthogonalized family (:mod:`lit_optim.optim._orthogonal`).

The matrix function of the family (Newton-Schulz, AuON's cosh-RMS brake, SinkGD's row/column
normalizations, NorMuon's per-neuron moments) needs each matrix whole. The work is divided by
assigning every matrix an *owner* rank (:func:`assign_owners`: largest first onto the least-loaded
rank, with costs from :func:`matrix_cost`), the same assignment on every rank:

* **DDP** (replicated parameters and gradients): each rank transforms the matrices it owns and the
  results are all-gathered.
* **FSDP2** (DTensor parameters sharded on dim 0, ``Shard(0)``): each matrix's rows are spread over
  the ranks of one mesh dimension (:class:`RowSharding`, ``torch.chunk`` layout: ranks past the end
  hold an empty shard). One ``all_to_all_single`` sends every rank's shards to the owners
  (:func:`exchange`), the owners transform whole matrices, and a second ``all_to_all_single`` sends
  each rank its rows of the results. Every byte of a matrix crosses the network at most once each
  way: about ``2 (W - 1) / W`` times the matrix bytes per step in total over ``W`` ranks.

``all_to_all_single`` with uneven split sizes runs on gloo (CPU) and NCCL; everything is packed
into one ``uint8`` buffer per exchange, so tensors of different dtypes travel together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional.newton_schulz import _compute_dtype, ns_flops
from ._dtensor import is_dtensor

try:  # torch >= 2.4 public location
    from torch.distributed.tensor.placement_types import Replicate, Shard
except ImportError:  # pragma: no cover - builds without distributed
    Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "SUPPORTED_PLACEMENTS",
    "RowSharding",
    "assign_owners",
    "exchange",
    "from_bytes",
    "matrix_cost",
    "nbytes",
    "row_sharding",
    "row_split",
    "to_bytes",
]

#: what the family accepts for matrix parameters that are DTensors (quoted in refusals)
SUPPORTED_PLACEMENTS = (
    "a DTensor matrix parameter must be sharded on dim 0 over at most one mesh dimension and "
    "replicated over the others: FSDP2's (Shard(0),) on a 1-D mesh, HSDP's (Replicate(), Shard(0)), "
    "or fully replicated"
)

_ALIGN = 8  # every packed segment starts at a multiple of 8 bytes (so it can be viewed as any dtype)


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item: largest first onto the least-loaded rank (deterministic, ties by
    index and rank, so every rank computes the same assignment)."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += costs[i]
    return owner


def matrix_cost(view: Sequence[int], dtype: torch.dtype, settings: dict[str, Any] | None) -> float:
    """Cost of transforming one parameter viewed as ``view`` ((m, n) or (B, m, n)): the Newton-Schulz
    flops under ``settings`` (the group's ``steps``/``method``/``dtype``), or the number of entries
    for linear-time transforms (``settings`` None); plus 1 so that empty matrices still count."""
    b = view[0] if len(view) == 3 else 1
    m, n = view[-2], view[-1]
    if settings is None:
        return float(b * m * n) + 1.0
    cdt = _compute_dtype(torch.empty((), dtype=dtype), settings["dtype"])
    return float(b * ns_flops(m, n, settings["steps"], settings["method"], cdt)) + 1.0


def row_split(n: int, world: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each rank's rows when ``n`` rows are sharded like DTensor's
    ``Shard(0)`` (``torch.chunk``: chunks of ``ceil(n / world)`` rows, ranks past the end empty)."""
    chunk = -(-n // world) if n else 0
    out = []
    for r in range(world):
        lo = min(r * chunk, n)
        out.append((lo, min(lo + chunk, n) - lo))
    return out


@dataclass(frozen=True)
class RowSharding:
    """Dim 0 of a tensor is sharded over the ``world`` ranks of ``group``; this rank is ``rank``."""

    group: Any
    world: int
    rank: int
    device: torch.device

    def rows(self, n: int) -> list[tuple[int, int]]:
        return row_split(n, self.world)


def row_sharding(p: Tensor, name: str) -> RowSharding | None:
    """How a matrix parameter is laid out: None when this rank holds it whole (a regular tensor, or
    a DTensor replicated on every mesh dimension), a :class:`RowSharding` for dim-0 sharding over
    one mesh dimension. Any other placement (``Shard(1)``, a 2-D sharding, ``Partial``, strided
    shards) raises ``TypeError`` naming the supported placements."""
    if not is_dtensor(p):
        return None
    mesh = p.device_mesh
    placements = tuple(p.placements)
    shard_dims = []
    ok = True
    for d, pl in enumerate(placements):
        if type(pl) is Replicate:
            continue
        if type(pl) is Shard and pl.dim == 0:
            shard_dims.append(d)
            continue
        ok = False
    if not ok or len(shard_dims) > 1:
        raise TypeError(
            f"{name}: a matrix parameter of shape {tuple(p.shape)} is a DTensor with placements {placements} on a "
            f"mesh of shape {tuple(mesh.shape)}; {SUPPORTED_PLACEMENTS} (tensor-parallel placements such as "
            "Shard(1), or sharding over two mesh dimensions, are not supported: shard such parameters with "
            "Shard(0), or give them a use_muon=False group, whose AdamW update works on any placement)"
        )
    if not shard_dims or mesh.size(shard_dims[0]) == 1:
        return None
    d = shard_dims[0]
    group = mesh.get_group(d)
    local = p.to_local()
    backend = str(dist.get_backend(group))
    device = local.device if (local.device.type != "cpu" and backend != "gloo") else torch.device("cpu")
    return RowSharding(group=group, world=mesh.size(d), rank=mesh.get_local_rank(d), device=device)


def nbytes(numel: int, dtype: torch.dtype) -> int:
    """Packed size of ``numel`` elements of ``dtype`` (rounded up to the segment alignment)."""
    raw = numel * torch.empty((), dtype=dtype).element_size()
    return -(-raw // _ALIGN) * _ALIGN


def to_bytes(t: Tensor) -> Tensor:
    """``t`` as a flat ``uint8`` tensor padded to the segment alignment."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = nbytes(t.numel(), t.dtype) - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat


def from_bytes(
    buf: Tensor, offset: int, dtype: torch.dtype, shape: Sequence[int], device: torch.device
) -> tuple[Tensor, int]:
    """The tensor of ``dtype`` and ``shape`` packed at ``buf[offset:]``, and the offset after it."""
    numel = math.prod(shape)
    size = nbytes(numel, dtype)
    raw = numel * torch.empty((), dtype=dtype).element_size()
    t = buf[offset : offset + raw].view(dtype).reshape(tuple(shape)).to(device)
    return t, offset + size


def exchange(sharding: RowSharding, send: list[list[Tensor]], recv_sizes: list[int]) -> tuple[list[Tensor], int, int]:
    """One ``all_to_all_single`` over ``sharding.group``: ``send[r]`` (``uint8`` tensors, from
    :func:`to_bytes`) goes to rank ``r``; ``recv_sizes[s]`` bytes arrive from rank ``s``. Nothing is
    sent to or received from this rank itself (the caller keeps its own data). Returns the received
    buffer of each rank (empty for this rank) and the bytes sent and received."""
    world, me, device = sharding.world, sharding.rank, sharding.device
    chunks = []
    in_splits = []
    for r in range(world):
        parts = [] if r == me else [t.to(device) for t in send[r]]
        size = sum(t.numel() for t in parts)
        in_splits.append(size)
        chunks.extend(parts)
    out_splits = [0 if s == me else int(recv_sizes[s]) for s in range(world)]
    inp = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=device)
    out = torch.empty(sum(out_splits), dtype=torch.uint8, device=device)
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=sharding.group)
    bufs = list(torch.split(out, out_splits))
    return bufs, sum(in_splits), sum(out_splits)
