"""Spatial / block averaging of a Hessian-diagonal estimate (ADAHESSIAN's variance reduction)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..optim._dtensor import is_dtensor

__all__ = ["block_average"]


def block_average(diag: Tensor, block_size: int = 1, spatial: bool = True) -> Tensor:
    r"""Average :math:`|\hat D|` over blocks of a parameter, returned with the parameter's shape.

    Paper: *ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning*, Yao et al.,
    AAAI 2021 (arXiv:2006.00719), "spatial averaging": the diagonal of a convolution kernel varies
    little across its spatial positions, so averaging the absolute estimate over them cuts the
    variance of the Hutchinson estimate by up to the kernel size at no cost.

    * ``spatial=True`` and ``diag.dim() >= 3`` (``Conv{1,2,3}d`` kernels ``(out, in, *k)``): mean
      of :math:`|\hat D|` over the kernel dimensions ``2..``, one value per (out, in) pair.
    * otherwise, ``block_size > 1``: mean of :math:`|\hat D|` over consecutive blocks of
      ``block_size`` entries along the last dimension (the last block may be shorter).
    * otherwise the estimate is returned unchanged (``block_size=1``: the estimate enters
      ADAHESSIAN squared, so its sign is irrelevant).

    A DTensor estimate (FSDP2) is averaged on its local shard when no averaged dimension is
    sharded (``Shard(0)`` of a kernel or of a matrix); otherwise it is gathered, averaged and cut
    back to the local shard, so the result always equals the one-process average.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if is_dtensor(diag):
        return _block_average_dtensor(diag, block_size, spatial)
    if spatial and diag.dim() >= 3:
        dims = tuple(range(2, diag.dim()))
        return diag.abs().mean(dim=dims, keepdim=True).expand_as(diag).clone()
    if block_size == 1 or diag.dim() == 0 or diag.numel() == 0:
        return diag
    x = diag.abs()
    n = x.shape[-1]
    full = (n // block_size) * block_size
    parts = []
    if full:
        head = x[..., :full].reshape(*x.shape[:-1], n // block_size, block_size)
        parts.append(head.mean(-1, keepdim=True).expand_as(head).reshape(*x.shape[:-1], full))
    if full < n:
        tail = x[..., full:]
        parts.append(tail.mean(-1, keepdim=True).expand_as(tail))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0].contiguous()


def _block_average_dtensor(diag: Tensor, block_size: int, spatial: bool) -> Tensor:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if spatial and diag.dim() >= 3:
        averaged = set(range(2, diag.dim()))
    elif block_size > 1 and diag.dim() >= 1 and diag.numel():
        averaged = {diag.dim() - 1}
    else:
        return diag
    sharded = {pl.dim for pl in diag.placements if isinstance(pl, Shard)}
    if not sharded & averaged:
        out = block_average(diag.to_local(), block_size, spatial)
        return DTensor.from_local(
            out, diag.device_mesh, diag.placements, run_check=False, shape=diag.shape, stride=diag.stride()
        )
    out = block_average(diag.full_tensor(), block_size, spatial)
    return distribute_tensor(out, diag.device_mesh, diag.placements, src_data_rank=None)
