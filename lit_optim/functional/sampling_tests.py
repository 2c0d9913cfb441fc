r"""Tests of adaptive sampling on gradient samples, without a Trainer: the statistics of
gradient samples (:class:`GradSampleStats`, gathered by :class:`GradSampleAccumulator` from flat
samples or by :class:`MicroBatchGradStats` from the micro-batches of an accumulated step) and the
norm, inner-product and coordinate-wise tests that drive AdAdaGrad's batch-size schedule
(:mod:`lit_optim.functional.batch_size`).

Adaptive sampling tests
-----------------------
Papers: *Sample size selection in optimization methods for machine learning*, Byrd, Chin, Nocedal
& Wu, Math. Programming 2012 (norm test); *Adaptive sampling strategies for stochastic
optimization*, Bollapragada, Byrd & Nocedal, SIAM J. Optim. 2018 (inner-product and orthogonality
tests); *AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods*, Lau, Liu & Kolar,
2024 (arXiv:2402.11215), which brings both to AdaGrad / AdaGrad-Norm and adds a coordinate-wise
variant of the norm test for coordinate-wise AdaGrad.

The statistics come from :math:`n` gradient *samples* :math:`x_1,\dots,x_n`, each the mean
gradient of ``unit_size`` :math:`= m` examples: per-example gradients (:math:`m=1`, from
``torch.func``), or the gradients of the micro-batches of a gradient accumulation and of the DDP
ranks (:math:`m` = micro-batch size). Their mean :math:`\bar x` is the mini-batch gradient of the
batch of :math:`b = n m` examples, and a sample covariance of the :math:`x_u` estimates the
per-example covariance divided by :math:`m`. With :math:`\operatorname{Var}` the per-example
variance estimate (:math:`m` times the unbiased sample variance of the :math:`x_u`):

* norm test (Byrd et al.): :math:`\operatorname{Var}(\lVert g_i\rVert)/b \le \eta^2\lVert\bar x\rVert^2`,
  i.e. the batch size it asks for is :math:`b^\star = \operatorname{tr}\operatorname{Var}(g_i) /
  (\eta^2 \lVert\bar x\rVert^2)`;
* inner-product test (Bollapragada et al.): :math:`b^\star = \operatorname{Var}(\langle g_i,\bar x\rangle) /
  (\theta^2 \lVert\bar x\rVert^4)`; with ``nu`` the *augmented* test also requires the
  orthogonality test :math:`b^\star_\perp = \operatorname{tr}\operatorname{Var}(g_i - \frac{\langle
  g_i,\bar x\rangle}{\lVert\bar x\rVert^2}\bar x) / (\nu^2\lVert\bar x\rVert^2)` and takes the larger;
* coordinate-wise norm test (AdAdaGrad): the norm test for every coordinate :math:`j`,
  :math:`\operatorname{Var}(g_{i,j})/b \le \eta^2 \bar x_j^2`, so :math:`b^\star = \max_j
  \operatorname{Var}(g_{i,j}) / (\eta^2 \bar x_j^2)`. Summing over :math:`j` gives the norm test, so
  it is the stricter of the two. A coordinate whose mean is exactly zero and whose variance is not
  asks for an infinite batch (the controller caps it); ``coordinate_quantile < 1`` takes that
  quantile over coordinates instead of the maximum (our relaxation, not in the paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._validation import check_choice, check_in_range, check_positive

__all__ = [
    "SAMPLING_TESTS",
    "GradSampleAccumulator",
    "GradSampleStats",
    "MicroBatchGradStats",
    "SamplingTestResult",
    "coordinate_test",
    "inner_product_test",
    "norm_test",
    "run_sampling_test",
]

SAMPLING_TESTS = ("norm", "inner_product", "coordinate")


def _chunks(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


@dataclass
class GradSampleStats:
    r"""Sufficient statistics of :math:`n` gradient samples, each the mean gradient of
    ``unit_size`` examples (see the module docstring).

    Attributes:
        count: :math:`n`, the number of samples (>= 2 for a variance).
        unit_size: :math:`m`, examples per sample (1 for per-example gradients).
        sum_sq_norm: :math:`\sum_u \lVert x_u\rVert^2`.
        mean_sq_norm: :math:`\lVert\bar x\rVert^2`.
        mean: :math:`\bar x` as a flat vector or a list of per-parameter tensors, or None when
            the test at hand does not need it (norm and inner-product tests).
        sum_sq_inner: :math:`\sum_u \langle x_u,\bar x\rangle^2`, or None when not tracked.
        coord_sum_sq: :math:`\sum_u x_u\odot x_u` in the layout of ``mean``, or None when not
            tracked.
    """

    count: int
    unit_size: float
    sum_sq_norm: float
    mean_sq_norm: float
    mean: Tensor | list[Tensor] | None = None
    sum_sq_inner: float | None = None
    coord_sum_sq: Tensor | list[Tensor] | None = None

    @property
    def batch_size(self) -> float:
        """:math:`b = n m`, the number of examples behind :math:`\\bar x`."""
        return self.count * self.unit_size

    def _check_count(self) -> None:
        if self.count < 2:
            raise ValueError(f"a sample variance needs count >= 2 gradient samples, got {self.count}")

    def variance_trace(self) -> float:
        r"""Per-example :math:`\operatorname{tr}\operatorname{Var}(g_i)` estimate:
        :math:`m\,(\sum_u\lVert x_u\rVert^2 - n\lVert\bar x\rVert^2)/(n-1)`."""
        self._check_count()
        n = self.count
        v = (self.sum_sq_norm - n * self.mean_sq_norm) / (n - 1)
        return self.unit_size * max(v, 0.0)

    def inner_product_variance(self) -> float:
        r"""Per-example :math:`\operatorname{Var}(\langle g_i,\bar x\rangle)` estimate."""
        self._check_count()
        if self.sum_sq_inner is None:
            raise ValueError("these statistics were gathered without inner products (track_inner=False)")
        n = self.count
        v = (self.sum_sq_inner - n * self.mean_sq_norm**2) / (n - 1)
        return self.unit_size * max(v, 0.0)

    def orthogonal_variance(self) -> float:
        r"""Per-example trace of the variance of the component of :math:`g_i` orthogonal to
        :math:`\bar x`: :math:`m(\sum_u\lVert x_u\rVert^2 - \sum_u\langle x_u,\bar x\rangle^2/\lVert\bar x\rVert^2)/(n-1)`."""
        self._check_count()
        if self.sum_sq_inner is None:
            raise ValueError("these statistics were gathered without inner products (track_inner=False)")
        sq = self.mean_sq_norm
        if sq == 0.0:
            return self.variance_trace()
        v = (self.sum_sq_norm - self.sum_sq_inner / sq) / (self.count - 1)
        return self.unit_size * max(v, 0.0)

    def coordinate_variance(self) -> Tensor | list[Tensor]:
        """Per-example, per-coordinate variance estimates (in the layout of ``mean``: one flat
        tensor, or one tensor per parameter)."""
        self._check_count()
        if self.coord_sum_sq is None or self.mean is None:
            raise ValueError("these statistics were gathered without coordinates (track_coordinate=False)")
        n = self.count
        out = [
            ((c - n * m.square()) / (n - 1)).clamp_min_(0.0).mul_(self.unit_size)
            for c, m in zip(_chunks(self.coord_sum_sq), _chunks(self.mean))
        ]
        return out[0] if isinstance(self.mean, Tensor) else out


class GradSampleAccumulator:
    r"""Gathers gradient samples and produces :class:`GradSampleStats`.

    Samples come as flat vectors (:meth:`add`; one, or a ``[k, P]`` stack) or, when only the norm
    test is wanted, as their squared norms alone (:meth:`add_sq_norm`; the sum of the samples
    must then be given to :meth:`finalize`, e.g. the accumulated gradient).

    Memory: one flat sum vector; plus one flat vector for ``track_coordinate``; plus every
    sample for ``track_inner`` (the inner products need the final mean). Call :meth:`finalize`,
    optionally with ``all_reduce`` (an in-place SUM over processes, e.g.
    ``torch.distributed.all_reduce``) so that the statistics cover the samples of every rank
    and every rank computes the same numbers.

    Args:
        unit_size: examples behind each sample (micro-batch size, or 1 for per-example gradients).
        track_inner: keep the samples to compute :math:`\sum_u\langle x_u,\bar x\rangle^2`.
        track_coordinate: keep :math:`\sum_u x_u\odot x_u`.
    """

    def __init__(self, unit_size: float = 1, *, track_inner: bool = False, track_coordinate: bool = False):
        self.unit_size = check_positive("unit_size", unit_size)
        self.track_inner = bool(track_inner)
        self.track_coordinate = bool(track_coordinate)
        self.count = 0
        self.sum: Tensor | None = None
        self.sum_sq_norm = 0.0
        self.coord_sum_sq: Tensor | None = None
        self.samples: list[Tensor] = []
        self._norm_only = False

    def add(self, sample: Tensor) -> None:
        """Add one flat gradient sample, or a 2-D stack ``[k, P]`` of ``k`` samples."""
        x = sample.detach()
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2:
            raise ValueError(f"sample must be a flat vector or a [k, P] stack, got shape {tuple(sample.shape)}")
        x = x.double()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            if self.track_coordinate:
                self.coord_sum_sq = torch.zeros_like(self.sum)
        elif x.shape[1] != self.sum.numel():
            raise ValueError(f"sample has {x.shape[1]} entries, earlier samples had {self.sum.numel()}")
        self.sum += x.sum(0)
        sq = x.square()
        self.sum_sq_norm += float(sq.sum())
        if self.track_coordinate:
            self.coord_sum_sq += sq.sum(0)
        if self.track_inner:
            self.samples.append(x)
        self.count += x.shape[0]

    def add_sq_norm(self, sq_norm: float, count: int = 1) -> None:
        """Add ``count`` samples known only through the sum of their squared norms (norm test)."""
        if self.track_inner or self.track_coordinate:
            raise ValueError("add_sq_norm: inner products and coordinates need the samples themselves (use add)")
        self._norm_only = True
        self.sum_sq_norm += float(sq_norm)
        self.count += int(count)

    def finalize(
        self, all_reduce: Callable[[Tensor], Any] | None = None, total: Tensor | None = None
    ) -> GradSampleStats:
        """Return the statistics of every sample added (on every rank when ``all_reduce`` is
        given; it must sum a tensor in place across processes).

        ``total``: the sum of all samples (of every rank) when already known, for instance
        ``accumulation x`` the accumulated gradient; then the sum is not reduced again.
        Required after :meth:`add_sq_norm`.
        """
        if total is None and self._norm_only:
            raise ValueError("finalize(total=...) is required when samples were added with add_sq_norm")
        if self.count == 0:
            raise ValueError("no gradient samples were added")
        device = total.device if total is not None else self.sum.device
        parts = []
        if total is None:
            parts.append(self.sum)
        if self.track_coordinate:
            parts.append(self.coord_sum_sq)
        parts.append(torch.tensor([float(self.count), self.sum_sq_norm], dtype=torch.float64, device=device))
        buf = torch.cat(parts)
        if all_reduce is not None:
            all_reduce(buf)
        offset = 0
        if total is None:
            p = self.sum.numel()
            total, offset = buf[:p], p
        total = total.double()
        coord = None
        if self.track_coordinate:
            coord = buf[offset : offset + total.numel()]
        count = round(float(buf[-2]))
        ssn = float(buf[-1])
        mean = total / max(count, 1)
        sum_sq_inner = None
        if self.track_inner:
            local = sum((float((s @ mean).square().sum()) for s in self.samples), 0.0)
            if all_reduce is not None:
                t = torch.tensor([local], dtype=torch.float64, device=mean.device)
                all_reduce(t)
                local = float(t.item())
            sum_sq_inner = local
        return GradSampleStats(
            count=count,
            unit_size=self.unit_size,
            sum_sq_norm=ssn,
            mean_sq_norm=float(mean.square().sum()),
            mean=mean,
            sum_sq_inner=sum_sq_inner,
            coord_sum_sq=coord,
        )


class MicroBatchGradStats:
    r"""Statistics of the micro-batch gradients of one accumulated optimizer step.

    Between :meth:`start` and :meth:`finalize` a gradient hook on every parameter sees each
    micro-batch's gradient *before* it is added to ``.grad`` (and, under DDP, before any
    all-reduce): it adds its squared norm (and, for ``track_coordinate``, its squared entries;
    for ``track_inner``, keeps a copy). The micro-batch gradient is ``scale`` times what the hook
    sees (``scale`` = the accumulation when each micro-batch loss is divided by it, as Lightning
    and HF do). The sum of the samples is ``scale x`` the accumulated gradient, read at the end.

    Usage without any Trainer (one process)::

        mb = MicroBatchGradStats(params, unit_size=micro_batch_size, scale=accumulation)
        mb.start()                           # before the first backward of the step
        for batch in micro_batches:
            (loss(batch) / accumulation).backward()
            mb.after_backward()
        stats = mb.finalize()                # GradSampleStats of `accumulation` samples

    Cost for the norm test: one norm of each gradient while it is hot in cache, no extra
    memory. ``track_coordinate`` keeps one float32 buffer per parameter (``P`` in all);
    ``track_inner`` a float32 copy of every micro-batch gradient until :meth:`finalize`
    (``accumulation x P``, buffers reused from step to step).

    Under DDP, :meth:`finalize` needs ``all_reduce`` and ``total`` = the sum of every sample of
    every rank (``scale x world_size x`` the averaged gradient); see ``AdaptiveBatchSizeCallback``.
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
        self.params = [p for p in params]
        self.unit_size = check_positive("unit_size", unit_size)
        self.scale = check_positive("scale", scale)
        self.track_inner = bool(track_inner)
        self.track_coordinate = bool(track_coordinate)
        self._coord: list[Tensor] | None = None
        self._current: list[Tensor | None] = []
        self._norms: list[Tensor] = []
        self._slots: list[list[Tensor | None]] = []
        self._handles: list[Any] = []
        self._sq: Tensor | None = None
        self.samples: list[Tensor] = []
        self.count = 0

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> None:
        """Begin a new optimizer step: reset and hook the parameters."""
        self.stop()
        self.samples = []
        self.count = 0
        self._sq = None
        if self.track_coordinate:
            if self._coord is None:
                self._coord = [
                    torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format) for p in self.params
                ]
            else:
                torch._foreach_zero_(self._coord)
        self._current = [None] * len(self.params)
        self._norms = []
        self._handles = [p.register_hook(self._make_hook(i)) for i, p in enumerate(self.params) if p.requires_grad]

    def stop(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, i: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            # no reference to ``grad`` may outlive the hook: autograd adopts the incoming gradient
            # as .grad without a copy only when nobody else holds it
            with torch.no_grad():
                g = grad if grad.dtype == torch.float32 else grad.float()
                self._norms.append(torch.linalg.vector_norm(g))
                if self._coord is not None:
                    self._coord[i].addcmul_(g, g, value=self.scale**2)
                if self.track_inner:
                    prev = self._current[i]
                    if prev is None:
                        # persistent buffers, one set per micro-batch of the step (no allocation)
                        while len(self._slots) <= self.count:
                            self._slots.append([None] * len(self.params))
                        buf = self._slots[self.count][i]
                        if buf is None or buf.shape != g.shape or buf.device != g.device:
                            buf = self._slots[self.count][i] = torch.empty_like(g, dtype=torch.float32)
                        self._current[i] = buf.copy_(g)
                    else:
                        prev.add_(g)

        return hook

    @torch.no_grad()
    def after_backward(self) -> None:
        """Close the micro-batch whose backward just ran."""
        if not self._handles:
            raise RuntimeError("call start() before the first backward of the step")
        self.count += 1
        if self._norms:
            sq = torch.stack(self._norms).double().square().sum()
            self._sq = sq if self._sq is None else self._sq + sq
            self._norms = []
        if self.track_inner:
            self.samples.append(self._current)  # one float32 tensor (or None) per parameter
            self._current = [None] * len(self.params)

    @torch.no_grad()
    def finalize(
        self, all_reduce: Callable[[Tensor], Any] | None = None, total: Tensor | None = None
    ) -> GradSampleStats:
        """Statistics of the micro-batches recorded since :meth:`start` (removes the hooks).
        ``total``: the flat sum of all samples of all ranks when known (required with
        ``all_reduce``); default ``scale x`` the accumulated gradient."""
        self.stop()
        if self.count == 0:
            raise ValueError("no micro-batch was recorded")
        if all_reduce is not None and total is None:
            raise ValueError("finalize(all_reduce=...) needs total=<sum of the samples of every rank>")
        scale = self.scale
        scalars = torch.tensor(
            [float(self.count), 0.0 if self._sq is None else float(self._sq) * scale**2], dtype=torch.float64
        )
        coord = None
        if self._coord is not None:
            coord = self._coord
            if all_reduce is not None:
                flat = torch.cat([c.reshape(-1) for c in self._coord])
                all_reduce(flat)
                coord = [c.view_as(q) for c, q in zip(flat.split([q.numel() for q in self._coord]), self._coord)]
        if all_reduce is not None:
            scalars = scalars.to(total.device)
            all_reduce(scalars)
        count = round(float(scalars[0]))
        # the sum of the samples, one chunk per parameter (None: no gradient), times ``factor``
        if total is None:
            sums: list[Tensor | None] = [p.grad for p in self.params]
            factor = scale
        else:
            flat_total = total if total.dtype == torch.float32 else total.float()
            pieces = flat_total.split([p.numel() for p in self.params])
            sums = [t.view_as(p) for t, p in zip(pieces, self.params)]
            factor = 1.0
        present = [t for t in sums if t is not None]
        sq = sum(float(n) ** 2 for n in torch._foreach_norm([t.float() for t in present])) if present else 0.0
        mean_sq_norm = sq * (factor / count) ** 2
        sum_sq_inner = None
        if self.track_inner:
            local = 0.0
            for sample in self.samples:
                dot = 0.0
                for x, t in zip(sample, sums):
                    if x is not None and t is not None:
                        dot += float(torch.dot(x.reshape(-1), t.reshape(-1).float()))
                local += (dot * scale * factor / count) ** 2  # <x_u, mean>, x_u = scale x hooked gradient
            if all_reduce is not None:
                t = torch.tensor([local], dtype=torch.float64, device=total.device)
                all_reduce(t)
                local = float(t.item())
            sum_sq_inner = local
        mean = None
        if coord is not None:
            mean = [
                torch.zeros_like(q) if t is None else t.float() * (factor / count) for t, q in zip(sums, self._coord)
            ]
        self.samples = []
        return GradSampleStats(
            count=count,
            unit_size=self.unit_size,
            sum_sq_norm=float(scalars[1]),
            mean_sq_norm=mean_sq_norm,
            mean=mean,
            sum_sq_inner=sum_sq_inner,
            coord_sum_sq=coord,
        )


@dataclass
class SamplingTestResult:
    """Outcome of a test of adaptive sampling.

    Attributes:
        test: ``"norm"``, ``"inner_product"`` or ``"coordinate"``.
        required_batch_size: :math:`b^\\star`, the smallest batch that passes (may be ``inf``).
        batch_size: the batch size the statistics came from.
        statistic: ``required_batch_size / batch_size``; the test passes when it is <= 1.
        details: the estimated variances and squared mean norm (for logging).
    """

    test: str
    required_batch_size: float
    batch_size: float
    statistic: float
    details: dict[str, float]

    @property
    def passed(self) -> bool:
        return self.statistic <= 1.0


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num <= 0 else math.inf


def _result(test: str, required: float, stats: GradSampleStats, details: dict[str, float]) -> SamplingTestResult:
    b = stats.batch_size
    return SamplingTestResult(test, required, b, _ratio(required, b), details)


def norm_test(stats: GradSampleStats, eta: float) -> SamplingTestResult:
    r"""Norm test: :math:`b^\star = \operatorname{tr}\operatorname{Var}(g_i)/(\eta^2\lVert\bar x\rVert^2)`."""
    eta = check_positive("eta", eta)
    var = stats.variance_trace()
    sq = stats.mean_sq_norm
    return _result("norm", _ratio(var, eta**2 * sq), stats, {"variance": var, "mean_sq_norm": sq})


def inner_product_test(stats: GradSampleStats, theta: float, nu: float | None = None) -> SamplingTestResult:
    r"""Inner-product test :math:`b^\star = \operatorname{Var}(\langle g_i,\bar x\rangle)/(\theta^2\lVert\bar x\rVert^4)`;
    with ``nu`` the augmented test also applies the orthogonality test and takes the larger size."""
    theta = check_positive("theta", theta)
    var_ip = stats.inner_product_variance()
    sq = stats.mean_sq_norm
    required = _ratio(var_ip, theta**2 * sq**2)
    details = {"variance_inner": var_ip, "mean_sq_norm": sq}
    if nu is not None:
        nu = check_positive("nu", nu)
        var_orth = stats.orthogonal_variance()
        details["variance_orthogonal"] = var_orth
        required = max(required, _ratio(var_orth, nu**2 * sq))
    return _result("inner_product", required, stats, details)


def coordinate_test(stats: GradSampleStats, eta: float, quantile: float = 1.0) -> SamplingTestResult:
    r"""Coordinate-wise norm test (AdAdaGrad): :math:`b^\star = \max_j \operatorname{Var}(g_{i,j})/(\eta^2\bar x_j^2)`;
    ``quantile < 1`` replaces the maximum by that quantile over coordinates."""
    eta = check_positive("eta", eta)
    quantile = check_in_range("coordinate_quantile", quantile, 0.0, 1.0, low_closed=False)
    stats._check_count()
    if stats.coord_sum_sq is None or stats.mean is None:
        raise ValueError("these statistics were gathered without coordinates (track_coordinate=False)")
    # Var_j / (eta^2 mean_j^2) = m / ((n - 1) eta^2) * (q_j - n) with q_j = sum_u x_uj^2 / mean_j^2:
    # a monotone map of q, so the maximum (or a quantile) of q is all that is needed (few passes)
    n, unit = stats.count, stats.unit_size
    coef = unit / ((n - 1) * eta**2)
    qs, var_total = [], 0.0
    for c, m in zip(_chunks(stats.coord_sum_sq), _chunks(stats.mean)):
        m2 = m.square()
        var_total += unit * (float(c.sum()) - n * float(m2.sum())) / (n - 1)
        q = torch.div(c, m2, out=m2)
        qs.append(q.nan_to_num_(nan=0.0, posinf=math.inf))  # 0/0: no variance, no mean -> passes
    numel = sum(q.numel() for q in qs)
    if numel == 0:
        q_star = float(n)
    elif quantile >= 1.0:
        q_star = max(float(q.max()) for q in qs if q.numel())
    else:
        flat = torch.cat([q.reshape(-1).cpu() for q in qs])
        q_star = float(torch.kthvalue(flat, max(1, math.ceil(quantile * numel))).values)
    required = coef * max(q_star - n, 0.0) if math.isfinite(q_star) else math.inf
    q_fail = n + stats.batch_size / coef  # q_j above this: coordinate j asks for more than the batch
    failing = sum(int((q > q_fail).sum()) for q in qs)
    frac = failing / numel if numel else 0.0
    var_total = max(var_total, 0.0)
    return _result(
        "coordinate",
        required,
        stats,
        {"variance": var_total, "mean_sq_norm": stats.mean_sq_norm, "failing_fraction": frac},
    )


def run_sampling_test(
    stats: GradSampleStats,
    test: str = "norm",
    *,
    eta: float = 0.1,
    theta: float = 0.1,
    nu: float | None = None,
    coordinate_quantile: float = 1.0,
) -> SamplingTestResult:
    """Dispatch to :func:`norm_test`, :func:`inner_product_test` or :func:`coordinate_test`."""
    test = check_choice("test", test, SAMPLING_TESTS)
    if test == "norm":
        return norm_test(stats, eta)
    if test == "inner_product":
        return inner_product_test(stats, theta, nu)
    return coordinate_test(stats, eta, coordinate_quantile)
