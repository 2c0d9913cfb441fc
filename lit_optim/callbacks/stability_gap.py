"""Continual evaluation for Lightning: accuracy on every task's validation set every few optimizer
steps, and the stability-gap metrics (min-ACC, WC-ACC, windowed forgetting, gap depth/recovery).

A thin shell over :class:`lit_optim.functional.StabilityGapTracker`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from ..functional.continual_metrics import StabilityGapReport, StabilityGapTracker
from ..functional.log_keys import stability_eval_logs, stability_task_end_logs

__all__ = ["StabilityGapEvaluator"]

ForwardFn = Callable[[pl.LightningModule, Any], tuple[Tensor, Tensor]]
TaskFn = Callable[[pl.Trainer, pl.LightningModule], int]


def _default_forward(pl_module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        x, y = batch.get("x", batch.get("input")), batch.get("y", batch.get("target", batch.get("label")))
    else:
        x, y = batch[0], batch[1]
    return pl_module(x), y


def _is_sharded(module: torch.nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in module.parameters())


class StabilityGapEvaluator(StabilityGapReport, Callback):
    r"""Evaluate earlier (and current) tasks every ``every_n_steps`` optimizer steps during a
    task sequence, and report the stability gap.

    Paper: De Lange, van de Ven, Tuytelaars, *Continual evaluation for lifelong learning:
    Identifying the stability gap*, ICLR 2023 (arXiv:2205.13452). Metric definitions: see
    :mod:`lit_optim.functional.continual_metrics`.

    .. code-block:: python

        ev = StabilityGapEvaluator(val_loaders, every_n_steps=5)   # one DataLoader per task
        for t, loader in enumerate(train_loaders):                 # one fit per task ...
            L.Trainer(max_epochs=3, callbacks=[ev]).fit(model, loader)
        ev.plot("gap.png"); print(ev.table())

    **Which task is being trained.** ``task_fn(trainer, pl_module) -> int`` if given; else the
    datamodule's ``current_task`` attribute (a datamodule that switches tasks during one ``fit``,
    e.g. with ``reload_dataloaders_every_n_epochs=1``); else the LightningModule's
    ``current_task``; else one task per ``fit`` call (0, 1, 2, ...). A task switch is detected
    before the first step of the new task, so the evaluation that closes a task sees its final
    weights. The iteration count runs across fits (new Trainer per task or not).

    **When.** At the start of training, every ``every_n_steps`` optimizer steps, at each task
    switch, and at the end of each ``fit``. Each evaluation covers the tasks seen so far
    (``eval_future=True``: all tasks), in eval mode without gradients; the model's train/eval
    modes are restored.

    **Metric.** ``metric`` is a torchmetrics metric (cloned per task), default micro-averaged
    ``MulticlassAccuracy`` with ``num_classes`` from the first logits. ``forward_fn(pl_module,
    batch) -> (preds, target)`` defaults to ``pl_module(batch[0]), batch[1]``.

    **Distributed.** Under DDP every rank evaluates a disjoint share of each validation loader's
    batches and the torchmetrics states are synchronised on ``compute()``, so every rank gets the
    accuracy of the whole set (the loaders must not shuffle). Sharded models (DTensor
    parameters, FSDP2) run every batch on every rank, since their forward passes are collective.

    **Output.** Logged to the Trainer's loggers (TensorBoard by default) at the cumulative
    iteration: ``{prefix}/acc_task{k}``, ``{prefix}/avg_acc``, ``{prefix}/min_acc``,
    ``{prefix}/wc_acc``; when a task ends (at the switch to the next task, and for the last task at
    the end of the fit) ``{prefix}/wf{w}`` and the gap rows
    ``{prefix}/gap_task{k}_at_task{t}/depth|steps_to_min|steps_to_recover``: the keys of the HF
    twin (:mod:`lit_optim.functional.log_keys`). :meth:`plot` writes a
    PNG of per-task accuracy over iterations with task boundaries marked; :meth:`table` a Markdown
    summary, printed at the end of each fit (``verbose``) and added to TensorBoard as text.
    ``state_dict`` holds the whole history, so a resumed run continues it.

    Args:
        task_dataloaders: one validation ``DataLoader`` per task, in task order.
        every_n_steps: evaluation period in optimizer steps (default 10; 1 = per-iteration, as in
            the paper).
        metric: torchmetrics ``Metric`` (higher = better); default accuracy.
        eval_future: also evaluate tasks not trained yet (default False).
        windows: window sizes in iterations for windowed forgetting (default ``(10 * every_n_steps,)``);
            each must exceed ``every_n_steps``.
        recovery_fraction: share of a gap to regain to count as recovered (default 0.9).
        task_fn: returns the task being trained (see above).
        forward_fn: returns ``(preds, target)`` for a batch.
        log_prefix: logger key prefix (default ``"stability"``).
        plot_path: if set, :meth:`plot` is written there at the end of every fit.
        verbose: print the summary table at the end of every fit (rank 0).
    """

    def __init__(
        self,
        task_dataloaders: Sequence[DataLoader],
        every_n_steps: int = 10,
        metric: Any = None,
        *,
        eval_future: bool = False,
        windows: Sequence[int] | None = None,
        recovery_fraction: float = 0.9,
        task_fn: TaskFn | None = None,
        forward_fn: ForwardFn | None = None,
        log_prefix: str = "stability",
        plot_path: str | os.PathLike | None = None,
        verbose: bool = True,
    ) -> None:
        if isinstance(task_dataloaders, DataLoader) or not isinstance(task_dataloaders, Sequence):
            raise TypeError("task_dataloaders must be a sequence with one DataLoader per task")
        if len(task_dataloaders) == 0:
            raise ValueError("task_dataloaders must hold at least one DataLoader, got 0")
        for i, dl in enumerate(task_dataloaders):
            if not isinstance(dl, DataLoader):
                raise TypeError(f"task_dataloaders[{i}] must be a DataLoader, got {type(dl).__name__}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        windows = tuple(windows) if windows is not None else (10 * every_n_steps,)
        for w in windows:
            if isinstance(w, bool) or not isinstance(w, int) or w <= every_n_steps:
                raise ValueError(
                    f"windows must be integers > every_n_steps={every_n_steps} (a window must hold 2 evaluations), got {w!r}"
                )
        if metric is not None:
            from torchmetrics import Metric

            if not isinstance(metric, Metric):
                raise TypeError(f"metric must be a torchmetrics.Metric, got {type(metric).__name__}")
        self.task_dataloaders = list(task_dataloaders)
        self.every_n_steps = every_n_steps
        self.metric = metric
        self.eval_future = bool(eval_future)
        self.task_fn = task_fn
        self.forward_fn = forward_fn or _default_forward
        self.log_prefix = log_prefix
        self.plot_path = plot_path
        self.verbose = verbose
        self.tracker = StabilityGapTracker(windows=windows, recovery_fraction=recovery_fraction)

        self.iteration = 0  # optimizer steps across all fits
        self._offset = 0  # iteration - trainer.global_step during the current fit
        self._fit_count = -1  # automatic task index: one task per fit
        self._restored = False
        self._last_eval: int | None = None
        self._task_end_logged: tuple[int, int] | None = None
        self._last_step_seen = -1
        self._provisional: int | None = None  # step of an end-of-fit evaluation
        self._metrics: list[Any] | None = None
        self.eval_seconds: list[float] = []  # wall time of each evaluation (all tasks)

    # ------------------------------------------------------------------ task bookkeeping
    @property
    def state_key(self) -> str:
        return self._generate_state_key(num_tasks=len(self.task_dataloaders), log_prefix=self.log_prefix)

    @property
    def num_tasks(self) -> int:
        return len(self.task_dataloaders)

    def _task(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        if self.task_fn is not None:
            task = self.task_fn(trainer, pl_module)
        elif getattr(trainer, "datamodule", None) is not None and hasattr(trainer.datamodule, "current_task"):
            task = trainer.datamodule.current_task
        elif hasattr(pl_module, "current_task"):
            task = pl_module.current_task
        else:
            task = self._fit_count
        task = int(task)
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"the current task is {task}, but task_dataloaders holds {self.num_tasks} tasks")
        return task

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # runs after a checkpoint restored the loops (global_step) and this callback's state
        if self._restored:
            self._restored = False
            if self._provisional is not None and self._task(trainer, pl_module) == self.tracker.current_task:
                # the checkpoint was written after a fit that stopped inside a task: its end-of-fit
                # evaluation is not part of an uninterrupted run, so the resumed run drops it
                self.tracker.records = [r for r in self.tracker.records if r[0] != self._provisional]
                self._last_eval = self.tracker.records[-1][0] if self.tracker.records else None
        else:
            self._fit_count += 1
        self._provisional = None
        self._offset = self.iteration - trainer.global_step
        self._last_step_seen = trainer.global_step
        self._switch_if_needed(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._switch_if_needed(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step_seen:  # accumulating: no optimizer step yet
            return
        self._last_step_seen = trainer.global_step
        self.iteration = self._offset + trainer.global_step
        if self.iteration % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_eval != self.iteration:
            self._evaluate(trainer, pl_module)
            self._provisional = self.iteration
        if self.tracker.current_task is not None:
            # the last task has no switch after it: its gap rows and the forgetting during it
            # are logged now (a later switch at this iteration does not log them again)
            self._log_task_end(trainer, self.tracker.current_task)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            text = self.table()
            if self.verbose:
                rank_zero_info(f"Stability gap after {self.iteration} iterations:\n{text}")
            for logger in trainer.loggers:
                exp = getattr(logger, "experiment", None)
                if hasattr(exp, "add_text"):
                    exp.add_text(f"{self.log_prefix}/summary", text.replace("\n", "  \n"), self.iteration)
            if self.plot_path is not None:
                self.plot(self.plot_path)

    def _switch_if_needed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task = self._task(trainer, pl_module)
        current = self.tracker.current_task
        if current == task:
            return
        self.iteration = self._offset + trainer.global_step
        self.tracker.start_task(task, self.iteration)
        if current is not None:
            self._log_task_end(trainer, current)
        if self._last_eval != self.iteration:
            # closes the previous task (its final weights) and measures the new one before training
            self._evaluate(trainer, pl_module)
        elif not self.eval_future:
            self._evaluate(trainer, pl_module, tasks=[task])

    # ------------------------------------------------------------------ evaluation
    def _make_metric(self, preds: Tensor) -> Any:
        if self.metric is not None:
            return self.metric
        from torchmetrics.classification import MulticlassAccuracy

        return MulticlassAccuracy(num_classes=int(preds.shape[-1]), average="micro")

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tasks: Sequence[int]) -> dict[int, float]:
        """Metric of ``pl_module`` on the validation loaders of ``tasks`` (DDP-synchronised)."""
        world = trainer.world_size
        rank = trainer.global_rank
        shard_batches = world > 1 and not _is_sharded(pl_module)
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        out: dict[int, float] = {}
        try:
            for task in tasks:
                loader = self.task_dataloaders[task]
                if shard_batches and isinstance(loader.sampler, RandomSampler):
                    raise ValueError(
                        f"task_dataloaders[{task}] shuffles; under distributed training every rank must see the "
                        "same batch order (use shuffle=False)"
                    )
                metric = None if self._metrics is None else self._metrics[task]
                if metric is not None:
                    metric.reset()
                for i, batch in enumerate(loader):
                    if shard_batches and i % world != rank:
                        continue
                    batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                    preds, target = self.forward_fn(pl_module, batch)
                    if metric is None:
                        template = self._make_metric(preds)
                        self._metrics = [copy.deepcopy(template) for _ in range(self.num_tasks)]
                        metric = self._metrics[task]
                    metric.to(preds.device)
                    metric.update(preds, target)
                if metric is None:  # this rank got no batch before the metric existed
                    raise RuntimeError(
                        f"task_dataloaders[{task}] yielded fewer batches than processes; give it at least "
                        f"{world} batches"
                    )
                value = metric.compute()  # synchronised across processes by torchmetrics
                out[task] = float(value.float().mean().item()) if isinstance(value, Tensor) else float(value)
        finally:
            for m, mode in modes:
                m.training = mode
        return out

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tasks: Sequence[int] | None = None) -> None:
        import time

        if self.tracker.current_task is None:
            return
        if tasks is None:
            tasks = list(range(self.num_tasks)) if self.eval_future else sorted(set(self.tracker.seen_tasks))
        t0 = time.perf_counter()
        accs = self.evaluate(trainer, pl_module, tasks)
        self.eval_seconds.append(time.perf_counter() - t0)
        step = self.iteration
        for task, acc in accs.items():
            self.tracker.record(step, task, acc)
        self._last_eval = step
        self._log(trainer, stability_eval_logs(self.log_prefix, self.tracker, step, accs), step)

    def _log_task_end(self, trainer: pl.Trainer, finished: int) -> None:
        """Windowed forgetting and the gap rows of the switch into ``finished``, once per
        (task, iteration): at the switch to the next task, or at the end of a fit (the last task,
        or a fit stopped inside a task)."""
        if self._task_end_logged == (finished, self.iteration):
            return
        self._task_end_logged = (finished, self.iteration)
        self._log(trainer, stability_task_end_logs(self.log_prefix, self.tracker, finished), self.iteration)

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)  # rank-zero-only in Lightning's loggers

    # ------------------------------------------------------------------ reporting, checkpointing
    # summary(), table(), plot(path) and state_dict() come from StabilityGapReport

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._restored = True
