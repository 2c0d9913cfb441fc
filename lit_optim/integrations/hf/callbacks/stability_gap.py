"""HF twin of :class:`lit_optim.callbacks.StabilityGapEvaluator` (continual evaluation and the
stability-gap metrics; ``summary``, ``table`` and ``plot`` come from
:class:`~lit_optim.functional.continual_metrics.StabilityGapReport`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ....functional.continual_metrics import StabilityGapReport
from ....functional.log_keys import stability_eval_logs, stability_task_end_logs
from .._common import TrainingArguments, _dist_ready
from .base import LitCallback


def _hf_forward(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(preds, target)`` of an HF model on a batch with ``labels``: classification logits
    ``(B, C)`` against ``labels (B,)``; for causal LM logits ``(B, T, V)`` the next-token
    predictions ``logits[:, :-1]`` against ``labels[:, 1:]`` (``-100`` is ignored by the metric)."""
    if "labels" not in batch:
        raise ValueError("StabilityGapCallback's default forward_fn needs 'labels' in the evaluation batches")
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = out["logits"] if isinstance(out, dict) else out.logits
    labels = batch["labels"]
    if logits.dim() == labels.dim() + 1 and logits.dim() >= 3:  # token-level: shift for causal LM
        return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    return logits, labels


class StabilityGapCallback(StabilityGapReport, LitCallback):
    r"""HF twin of :class:`lit_optim.callbacks.StabilityGapEvaluator`: continual evaluation of a
    task sequence every ``every_n_steps`` optimizer steps and the stability-gap metrics (De Lange,
    van de Ven & Tuytelaars, *Continual evaluation for lifelong learning: Identifying the stability
    gap*, ICLR 2023, arXiv:2205.13452); the maths is
    :class:`lit_optim.functional.continual_metrics.StabilityGapTracker`.

    .. code-block:: python

        cb = StabilityGapCallback([eval_ds_task0, eval_ds_task1], every_n_steps=5)
        for train_ds in (train_ds_task0, train_ds_task1):     # one train() per task
            Trainer(model, args, train_dataset=train_ds, callbacks=[cb]).train()
        print(cb.table()); cb.plot("gap.png")

    **Tasks.** ``task_fn(args, state) -> int`` names the task being trained; without it each
    ``train()`` call (that does not resume a checkpoint) is the next task. The iteration count runs
    across ``train()`` calls and Trainers.

    **When.** At the start of each task, every ``every_n_steps`` optimizer steps and at the end of
    each ``train()``; over the tasks seen so far (``eval_future=True``: all). The model is put in
    eval mode without gradients and its modes are restored.

    **Metric.** ``metric`` (a torchmetrics ``Metric``, cloned per task; default micro accuracy
    ignoring ``-100``) on ``forward_fn(model, batch) -> (preds, target)``; the default handles
    sequence classification and causal LM (next-token accuracy). ``task_data`` holds one
    ``DataLoader`` or dataset per task (datasets are batched with ``batch_size`` and
    ``collate_fn``, default HF's ``default_data_collator``, without shuffling). Under DDP each
    process evaluates every ``world_size``-th batch and torchmetrics synchronises the result; under
    FSDP / DeepSpeed (collective forward passes) every process runs every batch.

    **Output.** Each evaluation is appended to ``trainer.state.log_history`` as
    ``{prefix}/acc_task{k}``, ``avg_acc``, ``min_acc``, ``wc_acc`` with its ``step``; the latest
    values join the next ``Trainer.log`` (reaching ``report_to`` under :class:`LitTrainer`); the end
    of a task (the switch to the next one, and for the last task the end of ``train()``) adds the
    windowed forgetting and the gap rows; the keys are those of the Lightning callback
    (:mod:`lit_optim.functional.log_keys`). :meth:`summary`, :meth:`table`,
    :meth:`plot` report the whole run; the history is saved with the checkpoints.
    """

    name = "stability_gap"

    def __init__(
        self,
        task_data: Any,
        every_n_steps: int = 10,
        metric: Any = None,
        *,
        eval_future: bool = False,
        windows: Any = None,
        recovery_fraction: float = 0.9,
        task_fn: Any = None,
        forward_fn: Any = None,
        log_prefix: str = "stability",
        batch_size: int = 32,
        collate_fn: Any = None,
    ):
        from torch.utils.data import DataLoader

        from ....functional.continual_metrics import StabilityGapTracker

        super().__init__()
        if isinstance(task_data, (DataLoader, torch.utils.data.Dataset)) or not isinstance(task_data, (list, tuple)):
            raise TypeError("task_data must be a list with one DataLoader or dataset per task")
        if len(task_data) == 0:
            raise ValueError("task_data must hold at least one task, got 0")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        windows = tuple(windows) if windows is not None else (10 * every_n_steps,)
        for w in windows:
            if isinstance(w, bool) or not isinstance(w, int) or w <= every_n_steps:
                raise ValueError(
                    f"windows must be integers > every_n_steps={every_n_steps} (a window must hold 2 evaluations), "
                    f"got {w!r}"
                )
        if metric is not None:
            from torchmetrics import Metric

            if not isinstance(metric, Metric):
                raise TypeError(f"metric must be a torchmetrics.Metric, got {type(metric).__name__}")
        for fn_name, fn in (("task_fn", task_fn), ("forward_fn", forward_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{fn_name} must be callable, got {type(fn).__name__}")
        if collate_fn is None:
            from transformers import default_data_collator as collate_fn
        self.loaders = []
        for i, d in enumerate(task_data):
            if isinstance(d, DataLoader):
                self.loaders.append(d)
            elif hasattr(d, "__getitem__") and hasattr(d, "__len__"):
                self.loaders.append(DataLoader(d, batch_size=batch_size, shuffle=False, collate_fn=collate_fn))
            else:
                raise TypeError(f"task_data[{i}] must be a DataLoader or a map-style dataset, got {type(d).__name__}")
        self.every_n_steps = every_n_steps
        self.metric = metric
        self.eval_future = bool(eval_future)
        self.task_fn = task_fn
        self.forward_fn = forward_fn or _hf_forward
        self.log_prefix = log_prefix
        self.tracker = StabilityGapTracker(windows=windows, recovery_fraction=recovery_fraction)
        self.iteration = 0
        self._offset = 0
        self._fit_count = -1
        self._last_eval: int | None = None
        self._task_end_logged: tuple[int, int] | None = None
        self._provisional: int | None = None
        self._metrics: list[Any] | None = None
        self._model: nn.Module | None = None
        self._state: Any = None
        self._args: TrainingArguments | None = None
        self._shard_batches = True
        self.eval_seconds: list[float] = []

    @property
    def num_tasks(self) -> int:
        return len(self.loaders)

    def _task(self, args: TrainingArguments, state: Any) -> int:
        task = self.task_fn(args, state) if self.task_fn is not None else self._fit_count
        task = int(task)
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"the current task is {task}, but task_data holds {self.num_tasks} tasks")
        return task

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model, self._state, self._args = model, state, args
        # a sharded model's forward is collective: every process then runs every batch
        self._shard_batches = not (getattr(args, "fsdp", None) or getattr(args, "deepspeed", None))
        restored = self._restore_if_resuming(args, state)
        if restored:
            if self._provisional is not None and self._task(args, state) == self.tracker.current_task:
                # an end-of-train evaluation that an uninterrupted run would not have made
                self.tracker.records = [r for r in self.tracker.records if r[0] != self._provisional]
                self._last_eval = self.tracker.records[-1][0] if self.tracker.records else None
        else:
            self._fit_count += 1
        self._provisional = None
        self._offset = self.iteration - state.global_step
        self._switch_if_needed(args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._switch_if_needed(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        self.iteration = self._offset + state.global_step
        if self.iteration % self.every_n_steps == 0:
            self._evaluate(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self._last_eval != self.iteration:
            self._evaluate(state)
            self._provisional = self.iteration
        if self.tracker.current_task is not None:  # the last task has no switch after it
            self._log_task_end(state, self.tracker.current_task)

    def _switch_if_needed(self, args: TrainingArguments, state: Any) -> None:
        task = self._task(args, state)
        current = self.tracker.current_task
        if current == task:
            return
        self.iteration = self._offset + state.global_step
        self.tracker.start_task(task, self.iteration)
        if current is not None:
            self._log_task_end(state, current)
        if self._last_eval != self.iteration:
            self._evaluate(state)
        elif not self.eval_future:
            self._evaluate(state, tasks=[task])

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, tasks: Any) -> dict[int, float]:
        """Metric of ``model`` on the evaluation data of ``tasks`` (synchronised across processes)."""
        import copy

        world = torch.distributed.get_world_size() if (_dist_ready() and self._shard_batches) else 1
        rank = torch.distributed.get_rank() if (_dist_ready() and self._shard_batches) else 0
        device = next(model.parameters()).device
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        out: dict[int, float] = {}
        try:
            for task in tasks:
                metric = None if self._metrics is None else self._metrics[task]
                if metric is not None:
                    metric.reset()
                for i, batch in enumerate(self.loaders[task]):
                    if world > 1 and i % world != rank:
                        continue
                    if isinstance(batch, dict):
                        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                    preds, target = self.forward_fn(model, batch)
                    if metric is None:
                        template = self.metric
                        if template is None:
                            from torchmetrics.classification import MulticlassAccuracy

                            template = MulticlassAccuracy(
                                num_classes=int(preds.shape[-1]), average="micro", ignore_index=-100
                            )
                        self._metrics = [copy.deepcopy(template) for _ in range(self.num_tasks)]
                        metric = self._metrics[task]
                    metric.to(preds.device)
                    metric.update(preds, target)
                if metric is None:
                    raise RuntimeError(f"task_data[{task}] yielded fewer batches than processes ({world})")
                value = metric.compute()
                out[task] = float(value.float().mean().item()) if isinstance(value, torch.Tensor) else float(value)
        finally:
            for m, mode in modes:
                m.training = mode
        return out

    def _evaluate(self, state: Any, tasks: Any = None) -> None:
        import time

        if self.tracker.current_task is None or self._model is None:
            return
        if tasks is None:
            tasks = list(range(self.num_tasks)) if self.eval_future else sorted(set(self.tracker.seen_tasks))
        t0 = time.perf_counter()
        accs = self.evaluate(self._model, tasks)
        self.eval_seconds.append(time.perf_counter() - t0)
        step = self.iteration
        for task, acc in accs.items():
            self.tracker.record(step, task, acc)
        self._last_eval = step
        self._emit(state, stability_eval_logs(self.log_prefix, self.tracker, step, accs))

    def _log_task_end(self, state: Any, finished: int) -> None:
        # once per (task, iteration): at the switch to the next task or at the end of train()
        if self._task_end_logged == (finished, self.iteration):
            return
        self._task_end_logged = (finished, self.iteration)
        self._emit(state, stability_task_end_logs(self.log_prefix, self.tracker, finished))

    def on_log(self, args, state, control, logs=None, **kwargs):
        # every evaluation already has its own log_history entry; only the logged dict gets them
        extra = self.pop_logs()
        if extra and logs is not None:
            logs.update(extra)

    def _emit(self, state: Any, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        if state is not None:
            state.log_history.append({**metrics, "step": state.global_step, "iteration": self.iteration})
        self._pending.update(metrics)

    # summary(), table(), plot(path), state_dict() and load_state_dict() come from StabilityGapReport
