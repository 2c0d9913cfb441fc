r"""Across-iterations median estimators and median gradient clipping, without a Trainer (the
Lightning and Hugging Face ``GradClipMedianCallback`` share :class:`MedianClipper`).

Median clipping
---------------
Paper: *SGD with Clipping is Secretly Estimating the Median Gradient*, Schaipp, Garrigos,
Simsekli & Gower, 2024. The median of a stream :math:`z_1, z_2,\dots` minimises
:math:`\mathbb{E}|m - z|`; a stochastic proximal-point step on that objective is
:math:`m_{t+1} = m_t + \operatorname{clip}_{[-\gamma,\gamma]}(z_t - m_t)`: an estimate *across
iterations* that moves towards each new observation by at most :math:`\gamma`. Clipping the
gradient itself is the special case that restarts from :math:`m=0` at every step. We run this
recursion on :math:`\log|z|` (the median commutes with monotone maps, and a step in log units makes
the estimator scale-free), or keep the exact median of a sliding window of gradient norms, and
clip the gradient at ``factor`` times the estimate (:class:`MedianClipper`).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._validation import check_choice, check_positive, check_positive_int
from ..optim import _dtensor

__all__ = ["CLIP_MODES", "LogMedianEstimator", "MedianClipper", "WindowMedian"]

CLIP_MODES = ("norm", "coordinate", "constant", "constant_coordinate")


class WindowMedian:
    """Exact median of the last ``window`` observations (a sliding window of scalars, kept sorted:
    O(window) memmove per update, O(1) median)."""

    def __init__(self, window: int):
        self.window = check_positive_int("window", window)
        self.values: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self.values)

    def update(self, value: float) -> None:
        value = float(value)
        if len(self.values) == self.window:
            old = self.values.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self.values.append(value)
        bisect.insort(self._sorted, value)

    def median(self) -> float:
        s = self._sorted
        k = len(s)
        if not k:
            return math.nan
        return s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "values": list(self.values)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values = deque()
        self._sorted = []
        for v in list(state["values"])[-self.window :]:
            self.update(v)


class LogMedianEstimator:
    r"""Across-iterations median estimate by stochastic proximal point on :math:`\mathbb{E}|u-\log z|`:
    :math:`u \leftarrow u + \operatorname{clip}_{[-\gamma,\gamma]}(\log z - u)` (elementwise for tensors).

    The first observation initialises :math:`u`. ``step`` is :math:`\gamma` in log units: the
    estimate moves by at most a factor :math:`e^{\gamma}` per observation. Values are floored at
    ``floor`` before the logarithm (a coordinate that stays 0 has median ``floor``).
    """

    def __init__(self, step: float = 0.05, floor: float = 1e-12):
        self.step = check_positive("median_step", step)
        self.floor = check_positive("floor", floor)
        self.log_median: Tensor | None = None
        self.count = 0

    def update(self, value: Tensor) -> None:
        z = value.detach().float().abs().clamp_min(self.floor).log()
        if self.log_median is None:
            self.log_median = z.clone()
        else:
            self.log_median.add_((z - self.log_median).clamp_(-self.step, self.step))
        self.count += 1

    def median(self) -> Tensor | None:
        return None if self.log_median is None else self.log_median.exp()

    def state_dict(self) -> dict[str, Any]:
        return {"log_median": None if self.log_median is None else self.log_median.clone(), "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        lm = state["log_median"]
        self.log_median = None if lm is None else lm.clone()
        self.count = int(state["count"])


class MedianClipper:
    r"""Gradient clipping at ``factor`` times a median of past gradient magnitudes.

    Modes:

    * ``"norm"``: clip the global L2 norm of all gradients at ``factor * median`` of the past
      global norms (exact median of the last ``window`` norms with ``estimator="window"``, or the
      across-iterations estimator :class:`LogMedianEstimator` with ``estimator="stochastic"``).
    * ``"coordinate"``: clip every coordinate :math:`g_j` to :math:`\pm` ``factor`` times the
      across-iterations median of :math:`|g_j|` (one float tensor per parameter: the memory of a
      momentum buffer).
    * ``"constant"``: clip the global norm at the fixed ``threshold`` (Pascanu et al., 2013);
      ``"constant_coordinate"``: clamp every coordinate to :math:`\pm` ``threshold``. For
      comparison with the median modes.

    The threshold of a step comes from *past* observations only; the current (unclipped)
    magnitude enters the history afterwards. Nothing is clipped during the first
    ``min_history`` steps of a median mode. A step whose gradients hold NaN/Inf is left untouched
    and kept out of the history (with AMP the scaler then skips it).

    Usage without any Trainer::

        clipper = MedianClipper("norm", window=100, factor=2.0)
        loss.backward()
        info = clipper.clip_(model.parameters())   # {"grad_norm", "threshold", "clipped", ...}
        optimizer.step()

    Args:
        mode: one of ``"norm"``, ``"coordinate"``, ``"constant"``, ``"constant_coordinate"``.
        window: sliding-window length for ``estimator="window"`` (default 100).
        factor: threshold = ``factor * median`` (default 2.0).
        threshold: the constant threshold of the constant modes.
        estimator: ``"window"`` or ``"stochastic"`` for ``"norm"`` (``"coordinate"`` always uses
            the stochastic estimator).
        median_step: :math:`\gamma` of the stochastic estimator, in log units (default 0.05).
        min_history: steps observed before clipping starts (default 10).
    """

    def __init__(
        self,
        mode: str = "norm",
        window: int = 100,
        factor: float = 2.0,
        *,
        threshold: float | None = None,
        estimator: str = "window",
        median_step: float = 0.05,
        min_history: int = 10,
    ):
        self.mode = check_choice("mode", mode, CLIP_MODES)
        self.window = check_positive_int("window", window)
        self.factor = check_positive("factor", factor)
        self.estimator = check_choice("estimator", estimator, ("window", "stochastic"))
        self.median_step = check_positive("median_step", median_step)
        self.min_history = check_positive_int("min_history", min_history, minimum=0)
        if self.mode.startswith("constant"):
            if threshold is None:
                raise ValueError(f"mode={self.mode!r} needs threshold=<positive float>, got None")
            self.threshold: float | None = check_positive("threshold", threshold)
        else:
            if threshold is not None:
                raise ValueError(
                    f"threshold is only used by the constant modes, got threshold={threshold} with mode={mode!r}"
                )
            self.threshold = None
        self.steps = 0
        self.clipped_steps = 0
        self.window_median = WindowMedian(self.window)
        # the stochastic norm estimator on a Python float (log domain; no tensor round trips)
        self.norm_log_median: float | None = None
        self.norm_count = 0
        self.floor = 1e-12
        self.coord_medians: list[Tensor | None] = []
        self.coord_count = 0

    # -- helpers
    @property
    def clipped_fraction(self) -> float:
        return self.clipped_steps / self.steps if self.steps else 0.0

    def _norm_median(self) -> float | None:
        if self.estimator == "window":
            return self.window_median.median() if len(self.window_median) >= max(self.min_history, 1) else None
        if self.norm_count < max(self.min_history, 1):
            return None
        return math.exp(self.norm_log_median)

    def _observe_norm(self, norm: float) -> None:
        if self.estimator == "window":
            self.window_median.update(norm)
        else:
            z = math.log(max(norm, self.floor))
            if self.norm_log_median is None:
                self.norm_log_median = z
            else:
                self.norm_log_median += min(max(z - self.norm_log_median, -self.median_step), self.median_step)
            self.norm_count += 1

    def mean_threshold(self) -> float:
        """Coordinate mode: the mean over all coordinates of the current per-coordinate threshold
        (``factor x`` median estimate); nan before the first observation."""
        if self.mode == "constant_coordinate":
            return float(self.threshold)
        ms = [m for m in self.coord_medians if m is not None]
        if not ms:
            return math.nan
        total = float(_dtensor.sum_over_shards(ms))  # DTensor medians (FSDP2): summed over the shards
        return self.factor * total / sum(m.numel() for m in ms)

    @staticmethod
    def _total_norm(grads: list[Tensor]) -> float:
        if any(_dtensor.is_dtensor(g) for g in grads):  # FSDP2: the global norm, reduced over the shards
            return math.sqrt(float(_dtensor.sum_over_shards(grads, square=True)))
        norms = torch._foreach_norm(grads, 2.0)
        if grads[0].device.type == "cpu":
            return math.hypot(*map(float, norms))  # no tensor round trips on CPU
        if len({n.dtype for n in norms}) > 1:
            norms = [n.float() for n in norms]
        return float(torch.linalg.vector_norm(torch.stack(norms), 2.0))

    @torch.no_grad()
    def _clip_coordinates(self, params: list[Tensor], info: dict[str, float]) -> None:
        r"""Per-coordinate median estimate :math:`m` (linear domain): with the ratio
        :math:`r = \max(|g|, \text{floor}) / m`, clip where :math:`r >` ``factor`` and update
        :math:`m \leftarrow m\,\operatorname{clip}(r, e^{-\gamma}, e^{\gamma})`, i.e. the proximal step
        :math:`\log m \leftarrow \log m + \operatorname{clip}(\log|g| - \log m, \pm\gamma)`."""
        if len(self.coord_medians) != len(params):
            self.coord_medians = [None] * len(params)
            self.coord_count = 0
        active = self.mode == "constant_coordinate" or self.coord_count >= max(self.min_history, 1)
        lo, hi = math.exp(-self.median_step), math.exp(self.median_step)
        clipped = numel = 0
        sharded = []
        for i, p in enumerate(params):
            g = p.grad
            if g is None:
                continue
            numel += g.numel()
            if _dtensor.is_dtensor(g):
                # FSDP2: clip the local shard; the medians stay DTensors laid out like the gradient
                # (sharded checkpoints save every rank's part); counts are summed over the shards
                sharded.append(g)
                dg = g
                g = g.to_local()
                m = self.coord_medians[i]
                if m is None and self.mode != "constant_coordinate":
                    a = g.detach().abs().float().clamp_min_(self.floor)
                    self.coord_medians[i] = _dtensor.DTensor.from_local(
                        a, dg.device_mesh, dg.placements, run_check=False, shape=dg.shape, stride=dg.stride()
                    )
                    continue
            if self.mode == "constant_coordinate":
                t = self.threshold
                clipped += int((g.abs() > t).sum())
                g.clamp_(-t, t)
                continue
            m = _dtensor.local(self.coord_medians[i]) if self.coord_medians[i] is not None else None
            a = g.detach().abs().float().clamp_min_(self.floor)
            if m is None:
                self.coord_medians[i] = a
                continue
            if m.device != g.device and not _dtensor.is_dtensor(self.coord_medians[i]):
                m = self.coord_medians[i] = m.to(g.device)
            a.div_(m)  # r = |g| / m, from past observations only
            if active:
                over = a > self.factor
                n = int(over.sum())
                if n:
                    clipped += n
                    g.mul_(torch.where(over, self.factor / a, 1.0).to(g.dtype))
            m.mul_(a.clamp_(lo, hi))
        if sharded:
            groups = _dtensor.sharded_mesh_groups(sharded)
            count = torch.tensor(float(clipped), dtype=torch.float64)
            clipped = round(float(_dtensor.all_reduce_over_shards(count, groups)))
        if self.mode == "coordinate":
            self.coord_count += 1
        if self.mode == "constant_coordinate":
            info["threshold"] = float(self.threshold)
        if clipped:
            info["clipped"] = 1.0
        info["clipped_coord_fraction"] = clipped / numel if numel else 0.0

    @torch.no_grad()
    def clip_(self, params: Iterable[Tensor] | Tensor) -> dict[str, float]:
        """Clip the gradients of ``params`` in place and update the median estimate. Returns
        ``grad_norm`` (before clipping), ``threshold`` (norm modes; nan while warming up and in
        the coordinate modes, see :meth:`mean_threshold`), ``clipped`` (1.0 if anything was
        clipped), ``clipped_coord_fraction`` (coordinate modes), ``clipped_fraction`` (running
        fraction of clipped steps) and ``nonfinite``."""
        if isinstance(params, Tensor):
            params = [params]
        params = list(params)
        grads = [p.grad for p in params if p.grad is not None]
        info = {"grad_norm": 0.0, "threshold": math.nan, "clipped": 0.0, "clipped_coord_fraction": 0.0}
        info["nonfinite"] = 0.0
        if not grads:
            info["clipped_fraction"] = self.clipped_fraction
            return info
        if any(g.is_sparse for g in grads):
            raise TypeError("MedianClipper does not support sparse gradients")
        total = self._total_norm(grads)
        info["grad_norm"] = total
        if not math.isfinite(total):
            info["nonfinite"] = 1.0
            info["clipped_fraction"] = self.clipped_fraction
            return info
        self.steps += 1
        if self.mode in ("norm", "constant"):
            thr = self.threshold if self.mode == "constant" else self._norm_median()
            if thr is not None and self.mode == "norm":
                thr = self.factor * thr
            if thr is not None:
                info["threshold"] = thr
                if total > thr:
                    torch._foreach_mul_(_dtensor.locals_(grads), thr / total)  # DTensors: their local shards
                    info["clipped"] = 1.0
            if self.mode == "norm":
                self._observe_norm(total)
        else:
            self._clip_coordinates(params, info)
        if info["clipped"]:
            self.clipped_steps += 1
        info["clipped_fraction"] = self.clipped_fraction
        return info

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "steps": self.steps,
            "clipped_steps": self.clipped_steps,
            "window_median": self.window_median.state_dict(),
            "norm_log_median": self.norm_log_median,
            "norm_count": self.norm_count,
            "coord_medians": [None if m is None else m.clone() for m in self.coord_medians],
            "coord_count": self.coord_count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"state was saved with mode={state['mode']!r}, this clipper has mode={self.mode!r}")
        self.steps = int(state["steps"])
        self.clipped_steps = int(state["clipped_steps"])
        self.window_median.load_state_dict(state["window_median"])
        self.norm_log_median = state["norm_log_median"]
        self.norm_count = int(state["norm_count"])
        self.coord_medians = [None if m is None else m.clone() for m in state["coord_medians"]]
        self.coord_count = int(state["coord_count"])
