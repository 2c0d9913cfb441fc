r"""Micro-batch gradient statistics for the tests of adaptive sampling when the parameters are
FSDP2 shards (``fully_shard``; DTensor parameters and gradients).

Under FSDP2 a rank never sees its own micro-batch gradient: the backward pass all-gathers the
parameters outside autograd (gradient hooks on the sharded parameters never fire) and
reduce-scatters every micro-batch's gradient into ``param.grad`` (the mean over the data-parallel
ranks, sharded). So the gradient *samples* here are the rank-averaged micro-batch gradients,

.. math::
    x_u = s\,(G_u - G_{u-1}),

with :math:`G_u` the accumulated sharded gradient after micro-batch :math:`u` and :math:`s` the
factor each micro-batch loss was divided by (the accumulation, as Lightning does). Each sample is
the mean gradient of ``micro_batch x world_size`` examples (``unit_size``), and an accumulated step
gives ``accumulation`` samples (at least 2 are needed for a variance). Every statistic is
reduced over the shards, so each rank computes the numbers one process would compute from the
same samples:

* squared norms and inner products: local partial sums, one all-reduce per layout;
* per-coordinate sums (``track_coordinate``, the coordinate test): the local vectors are gathered
  into full ones (``DTensor.full_tensor``; two parameter-sized float32 vectors on every rank, on
  checked steps only), since the coordinate test takes a maximum / quantile over all coordinates.

Memory: one float32 copy of the local gradient shards (the previous :math:`G_u`), plus the local
samples for ``track_inner``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .._validation import check_positive
from ..optim import _dtensor
from .sampling_tests import GradSampleStats

__all__ = ["ShardedMicroBatchGradStats"]


def _sum_over_shards(values: list[Tensor], like: list[Tensor]) -> Tensor:
    """Sum over parameters of per-parameter local float64 values (each a 0-d or 1-d tensor),
    reduced over the shards of each parameter's layout."""
    buckets: dict[tuple, tuple[list, Tensor]] = {}
    plain = None
    for v, p in zip(values, like):
        if not _dtensor.is_dtensor(p):
            plain = v if plain is None else plain + v
            continue
        groups = _dtensor.sharded_mesh_groups([p])
        key = tuple(id(g) for g, _ in groups)
        prev = buckets.get(key)
        buckets[key] = (groups, v if prev is None else prev[1] + v)
    total = plain
    for groups, v in buckets.values():
        r = _dtensor.all_reduce_over_shards(v, groups)
        total = r if total is None else total + r
    return total


class ShardedMicroBatchGradStats:
    r"""Statistics of the micro-batch gradients of one accumulated optimizer step under FSDP2
    (see the module docstring). Same protocol as
    :class:`~lit_optim.functional.sampling_tests.MicroBatchGradStats`: :meth:`start` before the first
    backward of the step, :meth:`after_backward` after each, :meth:`finalize` for the
    :class:`~lit_optim.functional.sampling_tests.GradSampleStats`. Call every method on every rank.

    Args:
        params: the (DTensor) parameters, in the same order on every rank.
        unit_size: examples behind each sample: micro-batch size x data-parallel world size.
        scale: the factor each micro-batch loss was divided by (the accumulation).
        track_inner: gather :math:`\sum_u\langle x_u,\bar x\rangle^2` (inner-product test).
        track_coordinate: gather per-coordinate sums (coordinate test).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        unit_size: float,
        scale: float = 1.0,
        *,
        track_inner: bool = False,
        track_coordinate: bool = False,
    ):
        self.params = list(params)
        self.unit_size = check_positive("unit_size", unit_size)
        self.scale = check_positive("scale", scale)
        self.track_inner = bool(track_inner)
        self.track_coordinate = bool(track_coordinate)
        self.count = 0
        self._prev: list[Tensor | None] = []
        self._sq: list[Tensor] = []
        self._coord: list[Tensor | None] = []
        self.samples: list[list[Tensor | None]] = []
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def start(self) -> None:
        """Begin a new optimizer step."""
        self.count = 0
        self.samples = []
        self._prev = [None] * len(self.params)
        self._sq = [torch.zeros((), dtype=torch.float64) for _ in self.params]
        self._coord = [None] * len(self.params)
        self._active = True

    def stop(self) -> None:
        self._active = False

    @torch.no_grad()
    def after_backward(self) -> None:
        """Close the micro-batch whose backward (and FSDP2 reduce-scatter) just ran."""
        if not self._active:
            raise RuntimeError("call start() before the first backward of the step")
        self.count += 1
        sample: list[Tensor | None] = []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                sample.append(None)
                continue
            cur = _dtensor.local(g).detach().float()
            prev = self._prev[i]
            x = (cur - prev if prev is not None else cur.clone()).mul_(self.scale)
            self._prev[i] = cur.clone() if prev is None else prev.copy_(cur)
            self._sq[i] += torch.linalg.vector_norm(x).double().square().cpu() if x.numel() else 0.0
            if self.track_coordinate:
                c = self._coord[i]
                self._coord[i] = x.square() if c is None else c.addcmul_(x, x)
            sample.append(x if self.track_inner else None)
        if self.track_inner:
            self.samples.append(sample)

    def _full(self, t: Tensor | None, p: Tensor) -> Tensor:
        """The full tensor of a local piece laid out like ``p`` (zeros where nothing arrived)."""
        loc = t if t is not None else torch.zeros_like(_dtensor.local(p), dtype=torch.float32)
        if not _dtensor.is_dtensor(p):
            return loc
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            loc.contiguous(), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        ).full_tensor()

    @torch.no_grad()
    def finalize(self) -> GradSampleStats:
        """Statistics of the micro-batches recorded since :meth:`start`, equal on every rank."""
        self.stop()
        if self.count == 0:
            raise ValueError("no micro-batch was recorded")
        n = self.count
        # the mean sample: s x the accumulated gradient / n
        means: list[Tensor | None] = [None if prev is None else prev * (self.scale / n) for prev in self._prev]
        zero = torch.zeros((), dtype=torch.float64)
        mean_sq = [
            zero if m is None or not m.numel() else torch.linalg.vector_norm(m).double().square().cpu() for m in means
        ]
        # one all-reduce per layout for [sum ||x_u||^2, ||mean||^2, <x_u, mean> for each u]
        per_param = []
        for i in range(len(self.params)):
            row = [self._sq[i], mean_sq[i]]
            if self.track_inner:
                m = means[i]
                for sample in self.samples:
                    x = sample[i]
                    row.append(
                        zero if x is None or m is None else torch.dot(x.reshape(-1), m.reshape(-1)).double().cpu()
                    )
            per_param.append(torch.stack([r.reshape(()) for r in row]))
        red = _sum_over_shards(per_param, self.params)
        sum_sq_norm, mean_sq_norm = float(red[0]), float(red[1])
        sum_sq_inner = float(red[2:].square().sum()) if self.track_inner else None
        mean = coord = None
        if self.track_coordinate:
            mean = [self._full(m, p) for m, p in zip(means, self.params)]
            coord = [self._full(c, p) for c, p in zip(self._coord, self.params)]
        self.samples = []
        return GradSampleStats(
            count=n,
            unit_size=self.unit_size,
            sum_sq_norm=sum_sq_norm,
            mean_sq_norm=mean_sq_norm,
            mean=mean,
            sum_sq_inner=sum_sq_inner,
            coord_sum_sq=coord,
        )
