r"""Gradient clipping at a threshold that tracks the median of past gradient magnitudes.

Paper: *SGD with Clipping is Secretly Estimating the Median Gradient*, Fabian Schaipp, Guillaume
Garrigos, Umut Simsekli & Robert Gower, 2024 (arXiv:2402.12828). The constant-threshold baseline
is the norm clipping of *On the difficulty of training Recurrent Neural Networks*, Pascanu,
Mikolov & Bengio, ICML 2013. The maths lives in :class:`lit_optim.functional.grad_stats.MedianClipper`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from ..functional.log_keys import grad_clip_logs
from ..functional.median import MedianClipper

__all__ = ["GradClipMedianCallback"]

# FSDP1 and DeepSpeed hand the callback flattened local shards; FSDP2 (ModelParallelStrategy +
# fully_shard) hands DTensors, whose global norm MedianClipper reduces over the shards
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy")


def _log_metrics(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Write straight to the Trainer's loggers (TensorBoard by default), on rank 0.

    ``LightningModule.log`` costs about a millisecond per call on CPU, more than the clipping
    itself; these diagnostics need none of its reduction machinery."""
    if trainer.global_rank != 0 or not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


class GradClipMedianCallback(Callback):
    r"""Clip gradients at ``factor`` times a running median of past gradient magnitudes.

    In ``on_before_optimizer_step`` (after AMP has unscaled the gradients and after DDP has
    averaged them, before the optimizer reads them) the callback

    * ``mode="norm"``: rescales all gradients so that their global L2 norm is at most
      ``factor x median`` of the past global norms (exact median of the last ``window`` norms, or
      the across-iterations estimator with ``estimator="stochastic"``);
    * ``mode="coordinate"``: clamps every coordinate :math:`g_j` to :math:`\pm` ``factor`` times the
      across-iterations median estimate of :math:`|g_j|` (one float tensor per parameter);
    * ``mode="constant"`` / ``"constant_coordinate"``: clips the norm / every coordinate at the
      fixed ``threshold`` (the classical baseline, for comparison).

    The threshold of a step uses past steps only; no clipping during the first ``min_history``
    steps of a median mode. Steps whose gradients are not finite are left untouched and kept out
    of the history (with AMP the scaler then skips them).

    It replaces Lightning's built-in clipping, so it refuses ``Trainer(gradient_clip_val=...)``:
    Lightning would clip a second time, after this callback. Under DDP every rank holds the same
    averaged gradient, so every rank computes the same norm, median and threshold. Under FSDP2
    (``ModelParallelStrategy`` with ``fully_shard``) the gradients are DTensor shards: the global
    norm is reduced over the shards (one scalar all-reduce), so it equals the one-process norm and
    every rank clips alike; coordinate modes work on the local shards. FSDP1 (``FSDPStrategy``)
    and DeepSpeed, which hand over flattened shards, are not supported.

    Logs, straight to the Trainer's loggers on rank 0 (every ``trainer.log_every_n_steps`` steps,
    to keep the cost per step small):
    ``grad_clip/grad_norm`` (before clipping), ``grad_clip/threshold`` (in coordinate mode the
    mean over coordinates of the per-coordinate thresholds), ``grad_clip/clipped_fraction``
    (fraction of steps clipped so far), and in coordinate modes
    ``grad_clip/clipped_coord_fraction``. The last step's values are in
    :attr:`last_info`.

    Args:
        mode: ``"norm"``, ``"coordinate"``, ``"constant"`` or ``"constant_coordinate"``.
        window: number of past norms of the sliding-window median (default 100).
        factor: threshold = ``factor x median`` (default 2.0).
        threshold: the fixed threshold of the constant modes.
        estimator: ``"window"`` (exact sliding-window median, norm mode) or ``"stochastic"``.
        median_step: step :math:`\gamma` (log units) of the stochastic estimator (default 0.05).
        min_history: steps observed before clipping starts (default 10).
        log_stats: log the values above.
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
        log_stats: bool = True,
    ):
        # validation happens in MedianClipper; build one now so bad input fails at construction
        self._kwargs = {
            "mode": mode,
            "window": window,
            "factor": factor,
            "threshold": threshold,
            "estimator": estimator,
            "median_step": median_step,
            "min_history": min_history,
        }
        self.clippers: list[MedianClipper] = [MedianClipper(**self._kwargs)]
        self.mode = mode
        self.log_stats = bool(log_stats)
        self.last_info: dict[str, float] = {}
        self._param_cache: dict[int, tuple] = {}

    @property
    def clipper(self) -> MedianClipper:
        """The clipper of the first optimizer."""
        return self.clippers[0]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        clip_val = trainer.gradient_clip_val
        if clip_val is not None and float(clip_val) > 0:
            raise ValueError(
                f"GradClipMedianCallback replaces Lightning's gradient clipping, but Trainer(gradient_clip_val={clip_val}) "
                "is set: Lightning would clip the gradients a second time, after this callback, at a constant "
                "threshold. Remove gradient_clip_val (use mode='constant', threshold=... for constant clipping)"
            )
        name = type(trainer.strategy).__name__
        if name in _SHARDED:
            raise ValueError(
                f"GradClipMedianCallback needs the whole gradient on every rank (single device or DDP); {name} shards "
                "it, so the local norm is not the global one"
            )

    def _index(self, trainer: L.Trainer, optimizer: Any) -> int:
        if len(trainer.optimizers) <= 1:
            return 0
        raw = getattr(optimizer, "_optimizer", optimizer)
        for i, opt in enumerate(trainer.optimizers):
            if opt is raw or opt is optimizer:
                return i
        return 0

    def _params(self, i: int, optimizer: Any) -> list:
        raw = getattr(optimizer, "_optimizer", optimizer)
        sizes = tuple(len(g["params"]) for g in raw.param_groups)
        cached = self._param_cache.get(i)
        if cached is None or cached[0] is not raw or cached[1] != sizes:
            cached = (raw, sizes, [p for g in raw.param_groups for p in g["params"]])
            self._param_cache[i] = cached
        return cached[2]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        i = self._index(trainer, optimizer)
        while len(self.clippers) <= i:
            self.clippers.append(MedianClipper(**self._kwargs))
        info = self.clippers[i].clip_(self._params(i, optimizer))
        self.last_info = info
        if self.log_stats and trainer.loggers and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            # the same keys as the HF twin (lit_optim.functional.log_keys)
            _log_metrics(trainer, grad_clip_logs(info, self.clippers[i], "" if i == 0 else f"_opt{i}"))

    def state_dict(self) -> dict[str, Any]:
        return {"clippers": [c.state_dict() for c in self.clippers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.clippers = []
        for s in state_dict["clippers"]:
            c = MedianClipper(**self._kwargs)
            c.load_state_dict(s)
            self.clippers.append(c)
