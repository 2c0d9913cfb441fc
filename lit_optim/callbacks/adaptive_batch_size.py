r"""AdAdaGrad's adaptive batch sizes as a Lightning callback.

Paper: *AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods*, Tim Tsz-Kit Lau,
Han Liu & Mladen Kolar, 2024 (arXiv:2402.11215). Learning-rate rescaling from *Learning Rates as a
Function of Batch Size: A Random Matrix Theory Approach to Neural Network Training*, Granziol,
Zohren & Roberts, JMLR 2022. The maths lives in :mod:`lit_optim.functional.grad_stats`.

How the batch grows inside Lightning 2.x
----------------------------------------
Lightning counts gradient accumulation from the start of each epoch: it zeroes the gradients at
batches whose epoch index is a multiple of ``trainer.accumulate_grad_batches``, steps when the
count of batches seen this epoch is a multiple of it (or at the epoch's last batch), and divides
the loss by it. Changing ``accumulate_grad_batches`` is therefore only consistent right after an
optimizer step whose epoch position is a multiple of the *new* value. The callback applies a
growth decided by the test at the first optimizer step where that holds (at the latest at the
next epoch start; at most ``A_new / gcd(A_old, A_new) - 1`` steps later). Lightning has no
public way to rebuild the training loader mid-epoch, so a larger *micro-batch* is only taken at
epoch boundaries, with ``rebuild_dataloader=True``: the callback writes the new size into the
module's (or datamodule's, or hparams') ``batch_size_attr`` attribute and asks Lightning to call
``train_dataloader()`` again (the mechanism Lightning's own batch-size finder uses).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr
from torch import Tensor

from .._validation import check_choice, check_positive_int
from ..functional.batch_size import LR_SCALING_RULES, BatchSizeController
from ..functional.log_keys import adaptive_batch_logs
from ..functional.per_example import flat_grads, per_example_grads
from ..functional.sampling_tests import (
    SAMPLING_TESTS,
    GradSampleAccumulator,
    GradSampleStats,
    MicroBatchGradStats,
    SamplingTestResult,
)
from ..functional.sharded_sampling import ShardedMicroBatchGradStats
from .grad_clip_median import _log_metrics

__all__ = ["STATS_SOURCES", "AdaptiveBatchSizeCallback", "training_step_loss"]

STATS_SOURCES = ("auto", "micro_batch", "per_example")


def training_step_loss(pl_module: L.LightningModule, batch: Any) -> Tensor:
    """The default ``loss_fn`` of the per-example statistics: the loss ``training_step(batch, 0)``
    returns (a tensor, or the ``"loss"`` entry of a dict), with ``self.log`` / ``self.log_dict``
    muted (the callback calls it under ``torch.func.vmap``, once per example)."""
    had = {k: k in pl_module.__dict__ for k in ("log", "log_dict")}
    saved = {k: pl_module.__dict__.get(k) for k in had}
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        out = pl_module.training_step(batch, 0)
    finally:
        for k, present in had.items():
            if present:
                setattr(pl_module, k, saved[k])
            else:
                delattr(pl_module, k)
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise TypeError(
            "AdaptiveBatchSizeCallback: per-example statistics need a loss, but training_step returned "
            f"{type(out).__name__}; pass loss_fn=<callable(module, batch) -> mean loss>"
        )
    return out


def _positive_int_or_none(name: str, value: Any) -> int | None:
    return None if value is None else check_positive_int(name, value)


def _scale_lr(trainer: L.Trainer, factor: float) -> None:
    """Multiply every optimizer's learning rates by ``factor``, including the base values that
    learning-rate schedulers recompute the lr from (``initial_lr``/``base_lrs``/``max_lrs``)."""
    if factor == 1.0:
        return
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            for key in ("lr", "initial_lr", "max_lr"):
                if key not in group:
                    continue
                v = group[key]
                if isinstance(v, Tensor):
                    v.mul_(factor)
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    group[key] = v * factor
    for cfg in trainer.lr_scheduler_configs:
        sched = cfg.scheduler
        for attr in ("base_lrs", "max_lrs"):
            vals = getattr(sched, attr, None)
            if isinstance(vals, list):
                setattr(sched, attr, [v * factor for v in vals])


def _ddp_module(trainer: L.Trainer) -> torch.nn.parallel.DistributedDataParallel | None:
    model = getattr(trainer.strategy, "model", None)
    return model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None


class AdaptiveBatchSizeCallback(Callback):
    r"""Grow the effective batch size during training as AdAdaGrad prescribes.

    Every ``check_every_n_steps`` optimizer steps the callback gathers gradient statistics of the
    current step, runs a test of adaptive sampling (``test``), and, when the test fails, grows the
    effective batch (``micro_batch_size x accumulate_grad_batches x world_size``) to the size the
    test asks for, capped at ``max_batch_size``. The batch never shrinks. On growth the learning
    rate of every parameter group is multiplied by the chosen rule (``lr_scaling``).

    Tests (see :mod:`lit_optim.functional.grad_stats` for the formulas):
    ``"norm"`` (Byrd et al. 2012; AdAdaGrad-Norm), ``"inner_product"`` (Bollapragada et al.
    2018; with ``nu`` the augmented test with the orthogonality condition) and ``"coordinate"``
    (AdAdaGrad's coordinate-wise norm test for coordinate-wise AdaGrad). Designed for
    :class:`lit_optim.AdaGrad` (AdAdaGrad) and :class:`lit_optim.AdaGradNorm` (AdAdaGrad-Norm),
    works with any optimizer.

    Where the statistics come from (``stats``):

    * ``"auto"`` (default): ``"micro_batch"`` on every checked step that has at least 2
      micro-batch gradients (accumulation x processes >= 2), ``"per_example"`` on the others. In
      the most common set-up, one process without accumulation, that means per-example
      gradients, which is how AdAdaGrad's authors estimate the variance (from per-sample
      gradients of the mini-batch); once the batch has grown through accumulation the cheaper
      micro-batch statistics take over. The choice is reported at the start of training
      (``rank_zero_info``) and each checked step's source is in :attr:`stats_source`.
    * ``"micro_batch"`` (cheap): the gradients of the micro-batches of the gradient
      accumulation and of the DDP ranks are the samples; their spread, times the micro-batch
      size, estimates the per-example variance. Needs at least 2 samples per step (2
      micro-batches on one process, or 2 ranks). Cost on a checked step: one flat copy of the
      gradients per micro-batch (plus, for ``"inner_product"``, the flat gradient of every
      micro-batch until the step ends; for ``"coordinate"``, one more flat vector). Under DDP the
      callback turns off DDP's own gradient all-reduce for the last micro-batch of a checked step
      and all-reduces the gradients itself, so that each rank's local gradient can be read: one
      gradient-sized all-reduce that does not overlap with the backward pass, plus a few scalars
      (``"coordinate"``: one more gradient-sized vector). Callbacks listed *before* this one see
      rank-local gradients in ``on_after_backward`` of a checked step; everything from
      ``on_before_optimizer_step`` on sees the synchronised gradients.
    * ``"per_example"``: per-example gradients of the first micro-batch of the step from
      ``torch.func`` (``vmap`` over ``grad``) with ``loss_fn(module, batch) -> mean loss``
      (default :func:`training_step_loss`: the module's own ``training_step`` with logging muted;
      pass ``loss_fn`` when ``training_step`` cannot run under ``vmap``, e.g. it calls
      ``.item()``, or holds BatchNorm in training mode). Cost:
      an extra vectorised forward and backward of that micro-batch and ``B x P`` memory (cap
      ``B`` with ``per_example_max``); under DDP one extra gradient-sized all-reduce. Random
      number generators are forked so the training trajectory does not see the extra draws.

    Args:
        test: ``"norm"``, ``"inner_product"`` or ``"coordinate"``.
        eta: :math:`\eta` of the norm and coordinate tests (default 0.1).
        theta: :math:`\theta` of the inner-product test (default 0.1).
        nu: :math:`\nu` of the orthogonality test; None runs the plain inner-product test.
        coordinate_quantile: quantile over coordinates for ``"coordinate"`` (1.0 = the paper's max).
        max_batch_size: cap of the effective batch size (all ranks, all micro-batches).
        initial_micro_batch_size: per-rank micro-batch to start from (written into
            ``batch_size_attr`` before the loaders are built); None keeps the loader's.
        max_micro_batch_size: largest per-rank micro-batch when ``rebuild_dataloader=True``
            (default: no limit below ``max_batch_size``).
        initial_accumulation: ``accumulate_grad_batches`` to start from (default: the Trainer's).
        lr_scaling: ``"none"``, ``"linear"`` (SGD) or ``"sqrt"`` (Adam-type) rescaling on growth.
        check_every_n_steps: run the test on optimizer steps ``0, n, 2n, ...`` (default 1).
        stats: ``"auto"`` (default), ``"micro_batch"`` or ``"per_example"`` (see above).
        loss_fn: ``loss_fn(module, batch) -> Tensor`` for the per-example statistics (picklable
            for ``ddp_spawn``); default :func:`training_step_loss`.
        per_example_max: at most this many examples for the per-example statistics.
        rebuild_dataloader: at epoch ends, turn accumulation into a larger micro-batch (up to
            ``max_micro_batch_size``) by rebuilding the training loader.
        batch_size_attr: the module/datamodule/hparams attribute ``train_dataloader()`` reads.
        log_stats: log ``adaptive_batch/batch_size``, ``micro_batch_size``, ``accumulation``,
            ``lr``, ``lr_factor``, ``statistic`` (the latest test statistic) and
            ``required_batch_size`` every ``log_every_n_steps`` steps: the keys of the HF twin
            (:mod:`lit_optim.functional.log_keys`).

    State (``state_dict``): the micro-batch, accumulation, world size, the pending growth, the
    controller (batch size, requests, lr factor) and the history of growths; resuming from a
    checkpoint continues the schedule. The learning rates themselves travel in the optimizer and
    scheduler state.

    FSDP2 (``ModelParallelStrategy`` with ``fully_shard``): every micro-batch gradient is
    reduce-scattered, so the samples are the rank-averaged micro-batch gradients of the accumulation
    (``micro_batch_size x world_size`` examples each; ``initial_accumulation >= 2`` is required) and
    every statistic is reduced over the shards, giving the numbers one process computes from the
    same micro-batches (:class:`~lit_optim.functional.sharded_sampling.ShardedMicroBatchGradStats`).

    Not supported: manual optimization, strategies that handle accumulation themselves
    (DeepSpeed), and ``GradientAccumulationScheduler`` alongside (both set the accumulation).
    """

    def __init__(
        self,
        test: str = "norm",
        eta: float = 0.1,
        theta: float = 0.1,
        nu: float | None = None,
        coordinate_quantile: float = 1.0,
        *,
        max_batch_size: int,
        initial_micro_batch_size: int | None = None,
        max_micro_batch_size: int | None = None,
        initial_accumulation: int | None = None,
        lr_scaling: str = "none",
        check_every_n_steps: int = 1,
        stats: str = "auto",
        loss_fn: Callable[[torch.nn.Module, Any], Tensor] | None = None,
        per_example_max: int | None = None,
        rebuild_dataloader: bool = False,
        batch_size_attr: str = "batch_size",
        log_stats: bool = True,
    ):
        check_choice("test", test, SAMPLING_TESTS)
        check_choice("lr_scaling", lr_scaling, LR_SCALING_RULES)
        check_choice("stats", stats, STATS_SOURCES)
        check_positive_int("max_batch_size", max_batch_size)
        # validates eta/theta/nu/quantile with the controller's messages
        BatchSizeController(
            1, 1, test=test, eta=eta, theta=theta, nu=nu, coordinate_quantile=coordinate_quantile, lr_scaling=lr_scaling
        )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.test = test
        self.eta = eta
        self.theta = theta
        self.nu = nu
        self.coordinate_quantile = coordinate_quantile
        self.max_batch_size = max_batch_size
        self.initial_micro_batch_size = _positive_int_or_none("initial_micro_batch_size", initial_micro_batch_size)
        self.max_micro_batch_size = _positive_int_or_none("max_micro_batch_size", max_micro_batch_size)
        self.initial_accumulation = _positive_int_or_none("initial_accumulation", initial_accumulation)
        self.lr_scaling = lr_scaling
        self.check_every_n_steps = check_positive_int("check_every_n_steps", check_every_n_steps)
        self.stats = stats
        self.loss_fn = loss_fn
        self.per_example_max = _positive_int_or_none("per_example_max", per_example_max)
        self.rebuild_dataloader = bool(rebuild_dataloader)
        if not isinstance(batch_size_attr, str) or not batch_size_attr:
            raise TypeError(f"batch_size_attr must be a non-empty str, got {batch_size_attr!r}")
        self.batch_size_attr = batch_size_attr
        self.log_stats = bool(log_stats)

        # schedule state (saved)
        self.micro_batch_size: int | None = None
        self.accumulation: int | None = None
        self.world_size: int | None = None
        self.pending_accumulation: int | None = None
        self.controller: BatchSizeController | None = None
        self.history: list[dict[str, float]] = []
        self._restored: dict[str, Any] | None = None
        # per-step scratch (not saved)
        #: where the statistics of the current (or last) checked step come from:
        #: ``"micro_batch"`` or ``"per_example"`` (``stats="auto"`` decides per step)
        self.stats_source: str | None = None
        self.last_result: SamplingTestResult | None = None
        self._collect = False
        self._is_final = False
        self._micro: MicroBatchGradStats | ShardedMicroBatchGradStats | None = None
        #: FSDP2 (DTensor parameters): micro-batch statistics from the reduce-scattered gradients
        self._sharded = False
        self._manual_sync = False
        self._params: list[torch.nn.Parameter] = []
        self._named: list[tuple[str, torch.nn.Parameter]] = []

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int | None:
        """The current effective batch size (micro-batch x accumulation x world size)."""
        if self.micro_batch_size is None:
            return None
        return self.micro_batch_size * self.accumulation * self.world_size

    @property
    def _min_accumulation(self) -> int:
        """Smallest accumulation a rebuilt loader may leave on one process: 2 while the statistics
        come from micro-batches (``"auto"`` keeps the cheap micro-batch statistics once it has them)."""
        if self._sharded:  # FSDP2: the samples are micro-batches of the accumulation only
            return 2
        if (self.world_size or 1) > 1 or self.stats == "per_example":
            return 1
        if self.stats == "micro_batch" or (self.accumulation or 1) >= 2:
            return 2
        return 1

    def _source(self) -> str:
        """The statistics of a step with the current accumulation and world size."""
        if self.stats != "auto" or self._sharded:
            return "micro_batch" if self._sharded else self.stats
        return "micro_batch" if self.accumulation * self.world_size >= 2 else "per_example"

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "AdaptiveBatchSizeCallback grows the batch through Lightning's gradient accumulation, which manual "
                "optimization (automatic_optimization=False) does not use"
            )
        if any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks):
            raise ValueError(
                "AdaptiveBatchSizeCallback and GradientAccumulationScheduler both set trainer.accumulate_grad_batches; "
                "use one of them"
            )
        if trainer.strategy.handles_gradient_accumulation:
            raise ValueError(
                f"AdaptiveBatchSizeCallback does not support {type(trainer.strategy).__name__}, which handles gradient "
                "accumulation itself"
            )
        if self.initial_accumulation is not None:
            trainer.accumulate_grad_batches = self.initial_accumulation
        if self.initial_micro_batch_size is not None:
            self._require_attr(pl_module, "initial_micro_batch_size")
            lightning_setattr(pl_module, self.batch_size_attr, self.initial_micro_batch_size)

    def _require_attr(self, pl_module: L.LightningModule, why: str) -> None:
        if not lightning_hasattr(pl_module, self.batch_size_attr):
            raise ValueError(
                f"AdaptiveBatchSizeCallback({why}=...) sets the micro-batch through the attribute "
                f"{self.batch_size_attr!r} that train_dataloader() must read, but neither the LightningModule, its "
                "hparams nor the datamodule has it; add it or pass batch_size_attr=<name>"
            )

    def _loader_batch_size(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        loader = trainer.train_dataloader
        bs = getattr(loader, "batch_size", None)
        if isinstance(bs, int) and bs > 0:
            return bs
        if lightning_hasattr(pl_module, self.batch_size_attr):
            v = lightning_getattr(pl_module, self.batch_size_attr)
            if isinstance(v, int) and v > 0:
                return v
        raise ValueError(
            "AdaptiveBatchSizeCallback could not read the micro-batch size: the training loader has no integer "
            f"batch_size and the module has no {self.batch_size_attr!r} attribute; pass initial_micro_batch_size and "
            "batch_size_attr"
        )

    def _reload_loader(self, trainer: L.Trainer) -> None:
        # the same mechanism as Lightning's batch-size finder: the fit loop rebuilds the loader
        # from train_dataloader() at its next setup_data()
        trainer.fit_loop._combined_loader = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self._params = [p for _, p in self._named]
        self._micro = None
        self._sharded = any(type(p).__name__ == "DTensor" for p in self._params)
        world = trainer.world_size
        loader_micro = self._loader_batch_size(trainer, pl_module)
        if self._restored is not None:
            st = self._restored
            self._restored = None
            self.micro_batch_size = int(st["micro_batch_size"])
            self.accumulation = int(st["accumulation"])
            self.pending_accumulation = st["pending_accumulation"]
            self.history = [dict(h) for h in st["history"]]
            self.controller = self._make_controller(int(st["controller"]["batch_size"]))
            self.controller.load_state_dict(st["controller"])
            if int(st["world_size"]) != world:
                # keep at least the effective batch reached before the restart
                target = self.controller.batch_size
                self.world_size = world
                self.accumulation = max(self._min_accumulation, math.ceil(target / (self.micro_batch_size * world)))
                self.pending_accumulation = None
                self.controller.batch_size = self.batch_size
                rank_zero_warn(
                    f"AdaptiveBatchSizeCallback: resumed with world size {world} instead of {st['world_size']}; "
                    f"accumulation set to {self.accumulation} (effective batch {self.batch_size})"
                )
            self.world_size = world
            trainer.accumulate_grad_batches = self.accumulation
            if loader_micro != self.micro_batch_size:
                self._require_attr(pl_module, "rebuild_dataloader")
                lightning_setattr(pl_module, self.batch_size_attr, self.micro_batch_size)
                self._reload_loader(trainer)
        else:
            self.micro_batch_size = loader_micro
            self.accumulation = int(trainer.accumulate_grad_batches)
            self.world_size = world
            if self.batch_size > self.max_batch_size:
                raise ValueError(
                    f"max_batch_size must be >= the initial effective batch size {self.batch_size} "
                    f"(micro-batch {self.micro_batch_size} x accumulation {self.accumulation} x world size {world}), "
                    f"got {self.max_batch_size}"
                )
            self.controller = self._make_controller(self.batch_size)
        if self.rebuild_dataloader:
            self._require_attr(pl_module, "rebuild_dataloader")
        if self._sharded and (self.stats == "per_example" or self.accumulation < 2):
            raise ValueError(
                "AdaptiveBatchSizeCallback under FSDP2 (sharded DTensor parameters) estimates the gradient noise from "
                "the micro-batches of the gradient accumulation: FSDP2 reduce-scatters every micro-batch, so no rank "
                "sees its own gradient, and per-example gradients (torch.func) cannot run through fully_shard. Pass "
                f"initial_accumulation>=2 and stats='auto' or 'micro_batch' (got accumulation {self.accumulation}, "
                f"stats={self.stats!r})"
            )
        if self.stats == "micro_batch" and self.accumulation * world < 2:
            raise ValueError(
                "AdaptiveBatchSizeCallback(stats='micro_batch') estimates the gradient noise from the spread of at "
                f"least 2 micro-batch gradients per step, but this run has accumulation {self.accumulation} on "
                f"{world} process(es): pass initial_accumulation>=2, train on >=2 DDP ranks, or use "
                "stats='auto' / 'per_example' (per-example gradients)"
            )
        if self.stats == "auto":
            if self._source() == "micro_batch":
                how = f"micro-batch gradients ({self.accumulation} micro-batch(es) x {world} process(es) per step)"
            else:
                how = (
                    "per-example gradients of each checked step's micro-batch (one micro-batch per optimizer step on "
                    "one process; loss: " + ("loss_fn" if self.loss_fn is not None else "training_step") + "), "
                    "micro-batch gradients once the accumulation reaches 2"
                )
            rank_zero_info(f"AdaptiveBatchSizeCallback: stats='auto' estimates the gradient noise from {how}")

    def _make_controller(self, batch_size: int) -> BatchSizeController:
        return BatchSizeController(
            batch_size,
            max(self.max_batch_size, batch_size),
            test=self.test,
            eta=self.eta,
            theta=self.theta,
            nu=self.nu,
            coordinate_quantile=self.coordinate_quantile,
            lr_scaling=self.lr_scaling,
        )

    # ------------------------------------------------------------------ per step
    @staticmethod
    def _should_accumulate(trainer: L.Trainer, batch_idx: int) -> bool:
        fn = getattr(trainer.fit_loop, "_should_accumulate", None)
        if fn is not None:
            return bool(fn())
        last = batch_idx + 1 >= trainer.num_training_batches
        return not ((batch_idx + 1) % trainer.accumulate_grad_batches == 0 or last)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.controller is None:
            return
        acc = self.accumulation
        window_start = batch_idx % acc == 0
        self._is_final = not self._should_accumulate(trainer, batch_idx)
        if window_start:
            self._collect = (
                trainer.global_step % self.check_every_n_steps == 0 and self.controller.batch_size < self.max_batch_size
            )
            if self._collect:
                self.stats_source = self._source()
                if self.stats_source == "per_example":
                    self._per_example(trainer, pl_module, batch)
                elif self._sharded:
                    # FSDP2: samples are the rank-averaged micro-batch gradients of micro x world examples
                    if self._micro is None:
                        self._micro = ShardedMicroBatchGradStats(
                            self._params,
                            unit_size=self.micro_batch_size * self.world_size,
                            track_inner=self.test == "inner_product",
                            track_coordinate=self.test == "coordinate",
                        )
                    self._micro.unit_size = float(self.micro_batch_size * self.world_size)
                    self._micro.scale = float(self.accumulation)
                    self._micro.start()
                else:
                    if self._micro is None:
                        self._micro = MicroBatchGradStats(
                            self._params,
                            unit_size=self.micro_batch_size,
                            track_inner=self.test == "inner_product",
                            track_coordinate=self.test == "coordinate",
                        )
                    self._micro.unit_size = float(self.micro_batch_size)
                    # Lightning divides each micro-batch loss by the accumulation
                    self._micro.scale = float(self.accumulation)
                    self._micro.start()
        if not self._collect or self.stats_source != "micro_batch":
            return
        if self._is_final and self.world_size > 1 and not self._sharded:
            ddp = _ddp_module(trainer)
            if ddp is None:
                raise RuntimeError(
                    "AdaptiveBatchSizeCallback(stats='micro_batch') on several processes needs DistributedDataParallel "
                    f"(strategy 'ddp'/'ddp_spawn'), got {type(trainer.strategy).__name__}"
                )
            ddp.require_backward_grad_sync = False
            self._manual_sync = True

    def _per_example(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        devices = [p.device for p in self._params if p.device.type == "cuda"][:1]
        loss_fn = self.loss_fn or training_step_loss
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                g = per_example_grads(pl_module, loss_fn, batch, params=self._named, max_examples=self.per_example_max)
        except Exception as err:
            if self.loss_fn is not None:
                raise
            raise RuntimeError(
                "AdaptiveBatchSizeCallback: per-example statistics run training_step on single examples under "
                f"torch.func.vmap, which failed ({type(err).__name__}: {err}); pass loss_fn=<callable(module, batch) "
                "-> mean loss> that vmap can run, or use gradient accumulation (initial_accumulation>=2) for "
                "micro-batch statistics"
            ) from err
        acc = GradSampleAccumulator(
            1, track_inner=self.test == "inner_product", track_coordinate=self.test == "coordinate"
        )
        acc.add(g)
        del g
        stats = acc.finalize(all_reduce=self._all_reduce if self.world_size > 1 else None)
        self._observe(stats)

    @staticmethod
    def _all_reduce(t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mb = self._micro
        if not self._collect or self.stats_source != "micro_batch" or mb is None:
            return
        mb.after_backward()
        if not self._is_final:
            return
        if self._manual_sync:
            total = self._sync_grads(flat_grads(self._params))
            self._manual_sync = False
            ddp = _ddp_module(trainer)
            if ddp is not None:
                ddp.require_backward_grad_sync = True
            stats = mb.finalize(all_reduce=self._all_reduce, total=total)
        else:
            stats = mb.finalize()
        self._observe(stats)

    def _sync_grads(self, local: Tensor) -> Tensor:
        """All-reduce the rank-local accumulated gradients as DDP would (mean over ranks), write
        them back, and return the sum over every micro-batch sample of every rank."""
        world = self.world_size
        flags = torch.tensor([0.0 if p.grad is None else 1.0 for p in self._params], device=local.device)
        buf = torch.cat([local / world, flags])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        mean = buf[: local.numel()]
        has = buf[local.numel() :]
        offset = 0
        for p, h in zip(self._params, has.tolist()):
            n = p.numel()
            if h > 0:
                piece = mean[offset : offset + n].view_as(p)
                if p.grad is None:
                    p.grad = piece.to(p.dtype).clone()
                else:
                    p.grad.copy_(piece)
            offset += n
        return mean * float(world * self.accumulation)

    def _observe(self, stats: GradSampleStats) -> None:
        ctl = self.controller
        result = ctl.observe(stats)
        self.last_result = result
        target = ctl.decide()
        unit = self.micro_batch_size * self.world_size
        wanted = min(math.ceil(target / unit), self.max_batch_size // unit)
        if wanted > max(self.accumulation, self.pending_accumulation or 0):
            self.pending_accumulation = wanted

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._manual_sync:  # backward was skipped: give DDP its sync back
            ddp = _ddp_module(trainer)
            if ddp is not None:
                ddp.require_backward_grad_sync = True
            self._manual_sync = False
        if self.controller is None or not self._is_final:
            return
        pending = self.pending_accumulation
        if pending is not None and pending > self.accumulation:
            last = batch_idx + 1 >= trainer.num_training_batches
            if (batch_idx + 1) % pending == 0 or last:
                self._grow(trainer, self.micro_batch_size, pending)
        # every ``log_every_n_steps`` steps, straight to the loggers: Lightning's self.log costs
        # about a millisecond per call on CPU, more than the statistics
        if self.log_stats and trainer.loggers and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            _log_metrics(trainer, self._describe(trainer))

    def _describe(self, trainer: L.Trainer) -> dict[str, float]:
        # the same keys as the HF twin (lit_optim.functional.log_keys)
        return adaptive_batch_logs(
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size,
            accumulation=self.accumulation,
            lr_factor=self.controller.lr_factor,
            lr=trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,
            result=self.controller.last_result,  # the latest test (run every check_every_n_steps steps)
        )

    def _grow(self, trainer: L.Trainer, micro: int, accumulation: int) -> None:
        old = self.batch_size
        self.micro_batch_size = micro
        self.accumulation = accumulation
        trainer.accumulate_grad_batches = accumulation
        if self.pending_accumulation is not None and self.pending_accumulation <= accumulation:
            self.pending_accumulation = None
        new = self.batch_size
        factor = self.controller.grow_to(new)
        _scale_lr(trainer, factor)
        self.history.append(
            {
                "step": float(trainer.global_step),
                "epoch": float(trainer.current_epoch),
                "old_batch_size": float(old),
                "batch_size": float(new),
                "micro_batch_size": float(micro),
                "accumulation": float(accumulation),
                "lr_factor": float(self.controller.lr_factor),
            }
        )

    @staticmethod
    def _epoch_finished(trainer: L.Trainer) -> bool:
        """Whether the training epoch really ended. Lightning also calls ``on_train_epoch_end`` when
        ``max_steps`` (or ``should_stop``) ends the fit in the middle of an epoch, and a resumed
        run then continues that epoch: applying an epoch-boundary growth there would misalign the
        accumulation windows (or rebuild the loader) of the rest of the epoch."""
        loop = trainer.fit_loop.epoch_loop
        fn = getattr(loop, "_num_ready_batches_reached", None)
        if fn is not None:
            return bool(fn())
        return bool(loop.batch_progress.is_last_batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.controller is None or not self._epoch_finished(trainer):
            return
        micro, acc = self.micro_batch_size, self.accumulation
        if self.pending_accumulation is not None and self.pending_accumulation > acc:
            acc = self.pending_accumulation  # the next epoch starts aligned: any accumulation is valid
        if self.rebuild_dataloader and acc > self._min_accumulation:
            world = self.world_size
            effective = micro * acc * world
            cap_micro = self.max_micro_batch_size or self.max_batch_size // world
            if cap_micro > micro:
                new_acc = max(self._min_accumulation, math.ceil(effective / (world * cap_micro)))
                new_micro = math.ceil(effective / (world * new_acc))
                if new_micro * new_acc * world > self.max_batch_size:
                    new_micro = self.max_batch_size // (world * new_acc)
                if new_micro > micro and new_micro * new_acc * world >= effective and new_acc < acc:
                    micro, acc = new_micro, new_acc
        if (micro, acc) != (self.micro_batch_size, self.accumulation):
            rebuild = micro != self.micro_batch_size
            self._grow(trainer, micro, acc)
            self.pending_accumulation = None
            if rebuild:
                lightning_setattr(pl_module, self.batch_size_attr, micro)
                self._reload_loader(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._micro is not None:
            self._micro.stop()
        if self._manual_sync:
            ddp = _ddp_module(trainer)
            if ddp is not None:
                ddp.require_backward_grad_sync = True
            self._manual_sync = False

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        if self.controller is None:
            return dict(self._restored) if self._restored is not None else {}
        return {
            "micro_batch_size": self.micro_batch_size,
            "accumulation": self.accumulation,
            "world_size": self.world_size,
            "pending_accumulation": self.pending_accumulation,
            "controller": self.controller.state_dict(),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._restored = dict(state_dict)
