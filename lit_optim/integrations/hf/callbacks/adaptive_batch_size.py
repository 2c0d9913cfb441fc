"""HF twin of :class:`lit_optim.callbacks.AdaptiveBatchSizeCallback`."""

from __future__ import annotations

import math
from typing import Any

import torch

from ....functional.log_keys import adaptive_batch_logs
from .._common import TrainingArguments, _dist_ready, _refuse_sharded, unwrap_optimizer
from .base import LitCallback


def _scale_lrs(optimizer: Any, scheduler: Any, factor: float) -> None:
    if factor == 1.0:
        return
    inner = unwrap_optimizer(optimizer)
    for group in inner.param_groups:
        for key in ("lr", "initial_lr", "max_lr"):
            v = group.get(key)
            if isinstance(v, torch.Tensor):
                v.mul_(factor)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                group[key] = v * factor
    inner_sched = getattr(scheduler, "scheduler", scheduler)
    for attr in ("base_lrs", "max_lrs"):
        vals = getattr(inner_sched, attr, None)
        if isinstance(vals, list):
            setattr(inner_sched, attr, [v * factor for v in vals])


class AdaptiveBatchSizeCallback(LitCallback):
    r"""HF twin of :class:`lit_optim.callbacks.AdaptiveBatchSizeCallback`: grow the effective batch
    during training as AdAdaGrad prescribes (Lau, Liu & Kolar, *AdAdaGrad: Adaptive Batch Size
    Schemes for Adaptive Gradient Methods*, arXiv:2402.11215), through HF's gradient accumulation;
    the maths is :mod:`lit_optim.functional.grad_stats` (tests, ``BatchSizeController``).

    Every ``check_every_n_steps`` optimizer steps the callback takes the gradients of the
    micro-batches of the step as samples, runs the test (``"norm"``, ``"inner_product"``,
    ``"coordinate"``) and, when it asks for a larger batch, raises
    ``args.gradient_accumulation_steps`` to ``ceil(b* / (micro_batch x processes))`` (capped by
    ``max_batch_size``; the batch never shrinks) and multiplies the learning rates by
    ``lr_scaling`` (``"none"``, ``"linear"`` for SGD, ``"sqrt"`` for Adam-type; Granziol et al.,
    JMLR 2022), base rates of the scheduler included.

    **Samples.** Every micro-batch of a checked step on every process, read by
    :class:`~lit_optim.functional.grad_stats.MicroBatchGradStats`'s gradient hooks, which see each
    micro-batch's gradient before it is accumulated, clipped or all-reduced (one norm per
    parameter while the gradient is in cache; no copy for the norm test). The mean gradient is
    read in ``on_pre_optimizer_step`` (times the number of processes under DDP). The tests are
    invariant to the loss scaling common to all samples (1/accumulation, token normalisation,
    AMP's loss scale, which is taken out when the gradients were unscaled). HF clips *before*
    ``on_pre_optimizer_step``: a step whose gradient HF clipped (``max_grad_norm > 0``) no longer
    holds the mean gradient, so it is not tested (counted in ``clipped_steps_skipped``, warned
    once); with ``max_grad_norm=0`` every checked step is tested.
    ``gradient_accumulation_steps x processes >= 2`` is required.

    **When the batch grows.** HF decides whether a micro-batch ends an accumulation by the
    micro-batch's index in the epoch modulo ``gradient_accumulation_steps``, so a new value is
    applied right after an optimizer step whose epoch position is a multiple of it (at the latest
    at the next epoch start). HF fixed the number of epochs from the *initial* batch when training
    began, so with a grown batch the run ends after that many passes over the data, with fewer
    optimizer steps than ``max_steps``. Resuming restores the accumulation, the controller and
    (through the optimizer and scheduler state) the scaled learning rates; HF positions the data
    of a resumed epoch with the initial accumulation, so after a growth the resumed run does not
    replay exactly the same batches. The micro-batch (``per_device_train_batch_size``) never
    changes: HF cannot rebuild its loader mid-training. DeepSpeed, FSDP and per-example statistics
    are not supported.

    Logged (at checked steps and when the accumulation changes): ``adaptive_batch/batch_size``,
    ``/micro_batch_size``, ``/accumulation``, ``/lr``, ``/lr_factor``, ``/statistic``,
    ``/required_batch_size``: the keys of the Lightning callback
    (:mod:`lit_optim.functional.log_keys`).
    """

    name = "adaptive_batch_size"

    def __init__(
        self,
        test: str = "norm",
        eta: float = 0.1,
        theta: float = 0.1,
        nu: float | None = None,
        coordinate_quantile: float = 1.0,
        *,
        max_batch_size: int,
        lr_scaling: str = "none",
        check_every_n_steps: int = 1,
        log_stats: bool = True,
    ):
        from ....functional.grad_stats import BatchSizeController

        super().__init__()
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise TypeError(f"max_batch_size must be an int, got {type(max_batch_size).__name__} {max_batch_size!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int):
            raise TypeError(f"check_every_n_steps must be an int >= 1, got {check_every_n_steps!r}")
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be an int >= 1, got {check_every_n_steps}")
        self._ctl_kwargs = {
            "test": test,
            "eta": eta,
            "theta": theta,
            "nu": nu,
            "coordinate_quantile": coordinate_quantile,
            "lr_scaling": lr_scaling,
        }
        BatchSizeController(1, 1, **self._ctl_kwargs)  # validates
        self.test = test
        self.max_batch_size = max_batch_size
        self.check_every_n_steps = check_every_n_steps
        self.log_stats = bool(log_stats)
        self.controller: Any = None
        self.micro_batch_size: int | None = None
        self.accumulation: int | None = None
        self.world_size: int | None = None
        self.pending_accumulation: int | None = None
        self.history: list[dict[str, float]] = []
        self.last_result: Any = None
        self._params: list[torch.Tensor] = []
        self._stats: Any = None  # MicroBatchGradStats, reused across steps
        self._active: Any = None  # the stats collecting during the current step
        self._epoch_micro = 0
        self._args: TrainingArguments | None = None
        #: checked steps not tested because HF had clipped their gradient (max_grad_norm > 0)
        self.clipped_steps_skipped = 0

    @property
    def batch_size(self) -> int | None:
        if self.micro_batch_size is None:
            return None
        return self.micro_batch_size * self.accumulation * self.world_size

    def _controller(self, batch_size: int) -> Any:
        from ....functional.grad_stats import BatchSizeController

        return BatchSizeController(batch_size, max(self.max_batch_size, batch_size), **self._ctl_kwargs)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        _refuse_sharded(args, "AdaptiveBatchSizeCallback")
        self._args = args
        hf_accumulation = int(args.gradient_accumulation_steps)  # what HF positions a resumed epoch with
        self._params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        self.micro_batch_size = int(args.per_device_train_batch_size)
        self.world_size = int(args.world_size)
        self.accumulation = int(args.gradient_accumulation_steps)
        if self.accumulation * self.world_size < 2:
            raise ValueError(
                "AdaptiveBatchSizeCallback estimates the gradient noise from the spread of at least 2 micro-batch "
                f"gradients per step, but gradient_accumulation_steps={self.accumulation} on {self.world_size} "
                "process(es) gives fewer: use gradient_accumulation_steps >= 2 on one process, or lit_optim's LitTrainer, "
                "which runs an even per_device_train_batch_size as 2 micro-batches of half the size"
            )
        if self.batch_size > self.max_batch_size:
            raise ValueError(
                f"max_batch_size must be >= the initial effective batch size {self.batch_size} (micro-batch "
                f"{self.micro_batch_size} x accumulation {self.accumulation} x {self.world_size} process(es)), "
                f"got {self.max_batch_size}"
            )
        self.controller = self._controller(self.batch_size)
        if self._restore_if_resuming(args, state):
            args.gradient_accumulation_steps = self.accumulation
        # where HF starts in the current epoch (it skips the batches already trained on)
        self._epoch_micro = 0
        if state.global_step > 0 and train_dataloader is not None and hasattr(train_dataloader, "__len__"):
            n = len(train_dataloader)
            per_epoch = max(n // hf_accumulation + int(n % hf_accumulation > 0), 1)
            self._epoch_micro = (state.global_step % per_epoch) * hf_accumulation

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch_micro = 0
        self._apply_pending(args, force=True)

    def on_step_begin(self, args, state, control, **kwargs):
        from ....functional.grad_stats import MicroBatchGradStats

        if self._active is not None:  # a step that never reached the optimizer
            self._active.stop()
        self._active = None
        if (
            self.controller is not None
            and state.global_step % self.check_every_n_steps == 0
            and self.controller.batch_size < self.max_batch_size
        ):
            if self._stats is None:
                self._stats = MicroBatchGradStats(
                    self._params,
                    unit_size=self.micro_batch_size,
                    scale=1.0,
                    track_inner=self.test == "inner_product",
                    track_coordinate=self.test == "coordinate",
                )
            self._stats.start()
            self._active = self._stats

    def on_substep_end(self, args, state, control, **kwargs):
        self._epoch_micro += 1
        if self._active is not None:
            self._active.after_backward()

    def _was_clipped(self, args: TrainingArguments) -> bool:
        if not args.max_grad_norm or args.max_grad_norm <= 0:
            return False
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return False
        norm = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))
        return norm >= args.max_grad_norm * (1 - 1e-4)

    @staticmethod
    def _unscaled_factor(optimizer: Any) -> float:
        """The AMP loss scale when the gradients were unscaled before this hook (the samples the
        hooks saw are still scaled), else 1."""
        scaler = getattr(optimizer, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        try:
            st = scaler._per_optimizer_states[id(unwrap_optimizer(optimizer))]
            unscaled = getattr(st.get("stage"), "name", "") == "UNSCALED"
        except (AttributeError, KeyError, TypeError):  # pragma: no cover - GradScaler internals changed
            unscaled = False
        return float(scaler.get_scale()) if unscaled else 1.0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        from ....functional.grad_stats import flat_grads

        mb, self._active = self._active, None
        if mb is None:
            return
        mb.after_backward()  # the last micro-batch of the step
        if self._was_clipped(args):
            mb.stop()
            self.clipped_steps_skipped += 1
            if self.clipped_steps_skipped == 1:
                import warnings

                warnings.warn(
                    "AdaptiveBatchSizeCallback: HF clipped the gradient of a checked step (max_grad_norm="
                    f"{args.max_grad_norm}), so the step's mean gradient is unknown and the step is not tested; "
                    "set max_grad_norm=0 (or use GradClipMedianCallback) to test every step",
                    stacklevel=2,
                )
            return
        factor = self._unscaled_factor(optimizer)
        if self.world_size > 1 and _dist_ready():
            # DDP averaged the accumulated gradients: the sum over every sample of every rank
            total = flat_grads(self._params, torch.float64).mul_(self.world_size * factor)
            stats = mb.finalize(all_reduce=torch.distributed.all_reduce, total=total)
        elif factor != 1.0:
            stats = mb.finalize(total=flat_grads(self._params, torch.float64).mul_(factor))
        else:
            stats = mb.finalize()
        result = self.controller.observe(stats)
        self.last_result = result
        if result is None:
            return
        target = self.controller.decide()
        if target > self.controller.batch_size:
            unit = self.micro_batch_size * self.world_size
            new_acc = max(self.accumulation, math.ceil(target / unit))
            new_acc = min(new_acc, max(self.accumulation, self.max_batch_size // unit))
            if new_acc > self.accumulation and new_acc != self.pending_accumulation:
                factor = self.controller.grow_to(unit * new_acc)
                _scale_lrs(optimizer, lr_scheduler, factor)
                self.pending_accumulation = new_acc
                self.history.append(
                    {
                        "step": float(state.global_step),
                        "batch_size": float(unit * new_acc),
                        "accumulation": float(new_acc),
                        "lr_factor": float(self.controller.lr_factor),
                    }
                )
        if self.log_stats:
            self._pending = self._logs(unwrap_optimizer(optimizer) if optimizer is not None else None)

    def _logs(self, optimizer: Any = None) -> dict[str, float]:
        # the same keys as the Lightning callback (lit_optim.functional.log_keys)
        return adaptive_batch_logs(
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size,
            accumulation=self.accumulation,
            lr_factor=self.controller.lr_factor,
            lr=optimizer.param_groups[0]["lr"] if optimizer is not None else None,
            result=self.controller.last_result,
        )

    def on_step_end(self, args, state, control, **kwargs):
        self._epoch_micro += 1  # the last micro-batch of the step
        self._apply_pending(args, force=False)

    def _apply_pending(self, args: TrainingArguments, force: bool) -> None:
        new = self.pending_accumulation
        if new is None:
            return
        if force or self._epoch_micro % new == 0:
            self.accumulation = new
            self.pending_accumulation = None
            args.gradient_accumulation_steps = new
            if self.log_stats:
                self._pending.update(self._logs())

    def on_train_end(self, args, state, control, **kwargs):
        if self._active is not None:
            self._active.stop()
            self._active = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "micro_batch_size": self.micro_batch_size,
            "accumulation": self.accumulation,
            "world_size": self.world_size,
            "pending_accumulation": self.pending_accumulation,
            "controller": None if self.controller is None else self.controller.state_dict(),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accumulation = int(state["accumulation"])
        self.pending_accumulation = state["pending_accumulation"]
        self.history = [dict(h) for h in state["history"]]
        if state["controller"] is not None:
            self.controller = self._controller(int(state["controller"]["batch_size"]))
            self.controller.load_state_dict(state["controller"])
        if int(state["world_size"]) != self.world_size or int(state["micro_batch_size"]) != self.micro_batch_size:
            # keep at least the effective batch reached before the restart
            unit = self.micro_batch_size * self.world_size
            self.accumulation = max(2 if self.world_size == 1 else 1, math.ceil(self.controller.batch_size / unit))
            self.pending_accumulation = None
            self.controller.batch_size = unit * self.accumulation
