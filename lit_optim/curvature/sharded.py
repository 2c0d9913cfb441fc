"""Curvature estimates with FSDP2 (``torch.distributed.fsdp.fully_shard``) parameters.

Under FSDP2 each parameter is a ``DTensor`` whose rank-local shard is all the rank holds. The
forward pass all-gathers the shards into separate unsharded tensors outside autograd, and the
backward pass reduce-scatters their gradients back into ``param.grad`` in a post-backward hook,
also outside autograd. Two consequences:

* ``torch.autograd.grad(loss, params)`` does not reach the sharded parameters (it returns None for
  every one of them). The gradient of a loss is only available through ``loss.backward()``, which
  leaves the *global* gradient (averaged over the data-parallel ranks) in ``param.grad``, sharded.
  The Gauss-Newton-Bartlett estimator (:func:`~lit_optim.curvature.gnb_diagonal`) needs nothing
  more: it is the square of a gradient, so it is computed on the shards, from the gradient over
  the global batch, which is exactly the estimate one process would compute on that batch (same
  sampled labels given). :func:`sharded_gnb_diagonal` does this; ``gnb_diagonal`` calls it when it
  is given DTensor parameters.
* Double backward (Hutchinson's Hessian-vector products, power iteration for the top eigenvalue,
  Sophia's / AdaHessian's closure mode) is impossible through ``fully_shard``: the reduce-scattered
  gradient carries no graph (``backward(create_graph=True)`` yields sharded gradients with
  ``requires_grad=False``). Those estimators refuse DTensor parameters with
  :class:`ShardedDoubleBackwardError`, which names the working alternative (GNB).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional.hutchinson import DoubleBackwardError
from ..optim._dtensor import describe_placements, is_dtensor, local, sum_over_shards

__all__ = [
    "ShardedDoubleBackwardError",
    "any_sharded",
    "refuse_sharded_double_backward",
    "sharded_gnb_diagonal",
    "stashed_grads",
    "sum_over_shards",
]


class ShardedDoubleBackwardError(DoubleBackwardError):
    """A double-backward estimator (Hutchinson, power iteration, closure mode) was asked to run on
    FSDP2 / DTensor parameters, where the gradient carries no graph to differentiate again."""


def any_sharded(params: Iterable[Tensor]) -> bool:
    """True when one of ``params`` is a DTensor (FSDP2 / tensor-parallel parameter)."""
    return any(is_dtensor(p) for p in params)


def refuse_sharded_double_backward(params: Iterable[Tensor], what: str) -> None:
    """Raise :class:`ShardedDoubleBackwardError` for ``what`` when a parameter is a DTensor."""
    params = list(params)
    p = next((q for q in params if is_dtensor(q)), None)
    if p is None:
        return
    raise ShardedDoubleBackwardError(
        f"{what} needs Hessian-vector products (a double backward through the gradient), which cannot run through "
        f"FSDP2's fully_shard: the parameters are sharded DTensors ({describe_placements(p)}), torch.autograd.grad "
        "does not reach them (FSDP2 all-gathers them outside autograd) and their reduce-scattered gradients carry "
        "no graph. Use the Gauss-Newton-Bartlett estimator instead, which needs one ordinary backward and is "
        "computed on the shards: estimator='gnb' in HessianDiagCallback, or "
        "optimizer.update_hessian(lit_optim.curvature.gnb_diagonal(logits, params)) in a plain loop (this also "
        "feeds AdaHessian); or train without sharding (single process or DDP) to use Hutchinson."
    )


@contextlib.contextmanager
def stashed_grads(tensors: Iterable[Tensor]) -> Iterator[list[Tensor]]:
    """Set ``.grad`` of ``tensors`` to None for the duration of the block and put the previous
    gradients back afterwards (whatever the block left in ``.grad`` is dropped). Yields the list of
    tensors, deduplicated."""
    seen: set[int] = set()
    ts = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            ts.append(t)
    saved = [t.grad for t in ts]
    for t in ts:
        t.grad = None
    try:
        yield ts
    finally:
        for t, g in zip(ts, saved):
            t.grad = g


def _data_parallel_mesh(params: Sequence[Tensor]):
    """The 1-D device mesh over which the DTensor parameters are sharded (FSDP2's data-parallel
    mesh); other layouts are refused with a message naming the supported one."""
    meshes = []
    for p in params:
        if not is_dtensor(p):
            raise TypeError(
                "gnb_diagonal: the parameters mix DTensors (FSDP2) and regular tensors; under FSDP2 pass the sharded "
                "parameters only (e.g. the optimizer's parameters after fully_shard)"
            )
        mesh = p.device_mesh
        if mesh.ndim != 1:
            raise TypeError(
                f"gnb_diagonal on DTensor parameters supports a 1-D data-parallel mesh (FSDP2 with Shard(0) or "
                f"Replicate()); got {describe_placements(p)}. Tensor-parallel or 2-D (HSDP) layouts are not supported "
                "by the sharded estimate."
            )
        if all(m != mesh for m in meshes):
            meshes.append(mesh)
    if len(meshes) != 1:
        raise TypeError("gnb_diagonal: the DTensor parameters live on different device meshes; pass one mesh's")
    return meshes[0]


def sharded_gnb_diagonal(
    losses: Iterable[tuple[Tensor, int, bool]],
    params: Sequence[Tensor],
    n_samples: int,
    loss_scale: float = 1.0,
) -> list[Tensor | None]:
    r"""The GNB diagonal :math:`N\,\nabla\hat L \odot \nabla \hat L` on FSDP2 shards.

    ``losses`` yields, per label sample, this rank's sampled loss *summed* over its outputs, the
    number of those outputs :math:`n_r` (the same number for every sample) and whether to keep the
    graph for a further sample (``retain_graph``). The loss is rescaled
    to :math:`\frac{W}{N}\sum_{\text{rank}}\ell` (:math:`N=\sum_r n_r` over the :math:`W` ranks of the
    data-parallel mesh), so that FSDP2's averaging reduce-scatter leaves the gradient of the mean
    sampled loss over the *global* batch in ``param.grad``; its square times :math:`N` is taken on
    the local shards. Each sample runs one ``backward()`` (the ``.grad`` the caller had is put back
    afterwards). Returns DTensors laid out like ``params`` (None where no gradient arrived on any
    rank).

    Every parameter the loss depends on and that receives a gradient must be in ``params`` (or its
    ``.grad`` be stashed by the caller with :func:`stashed_grads`): the backward writes into it.
    """
    params = list(params)
    mesh = _data_parallel_mesh(params)
    group = mesh.get_group(0)
    world = mesh.size(0)
    diag: list[Tensor | None] = [None] * len(params)
    got = torch.zeros(len(params), dtype=torch.float32)
    n_total = None
    it = iter(losses)
    with stashed_grads(params):
        for _ in range(n_samples):
            loss_sum, n_local, retain = next(it)
            if n_total is None:
                count = torch.tensor([float(n_local)], dtype=torch.float64, device=mesh.device_type)
                dist.all_reduce(count, group=group)
                n_total = float(count.item())
                if n_total == 0:
                    raise ValueError("gnb_diagonal: no outputs to sample labels for on any rank")
            for p in params:
                p.grad = None
            (loss_sum * (world * loss_scale / n_total)).backward(retain_graph=retain)
            with torch.no_grad():
                for i, p in enumerate(params):
                    g = p.grad
                    if g is None:
                        continue
                    if not is_dtensor(g) or g.placements != p.placements:
                        raise TypeError(
                            f"gnb_diagonal: the gradient of a DTensor parameter is {describe_placements(g)}, expected "
                            f"{describe_placements(p)} (FSDP2's reduce-scattered gradient)"
                        )
                    got[i] = 1.0
                    if diag[i] is None:
                        diag[i] = torch.zeros_like(p)
                    local(diag[i]).addcmul_(local(g), local(g))
    # a parameter whose shard is empty on this rank, or unused here, must still agree with the others
    buf = got.to(mesh.device_type)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    got = buf.cpu()
    factor = n_total / (n_samples * loss_scale * loss_scale)
    out: list[Tensor | None] = []
    with torch.no_grad():
        for p, d, flag in zip(params, diag, got.tolist()):
            if d is None and flag:
                d = torch.zeros_like(p)
            if d is not None:
                local(d).mul_(factor)
            out.append(d)
    return out
