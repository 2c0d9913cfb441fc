"""``Trainer`` subclasses: :class:`LitTrainer` (forwards the callbacks' logs to ``report_to`` and
tells them which checkpoint a run resumes from) and :class:`CurvatureTrainer` (plus the curvature
estimates of :class:`~lit_optim.integrations.hf.curvature.CurvatureTrainerMixin`)."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

from ._common import Trainer, TrainingArguments
from .callbacks.base import LitCallback
from .curvature import CurvatureTrainerMixin


class LitTrainerMixin:
    """Merges the values the lit_optim callbacks want logged (:meth:`LitCallback.pop_logs`) into
    every ``Trainer.log`` call before the reporting integrations see it, reports the evaluation
    metrics of averaged weights after ``evaluate``, and tells the callbacks which checkpoint
    ``train(resume_from_checkpoint=...)`` resumes from.

    With a :class:`~lit_optim.integrations.hf.GradClipMedianCallback` among the callbacks, HF's own
    norm clipping is switched off for this Trainer (the callback replaces it; HF would otherwise
    clip first, at a constant threshold): ``train()`` runs on a copy of ``args`` with
    ``max_grad_norm=0`` (the caller's ``TrainingArguments`` object is left as it is). HF's default
    ``max_grad_norm=1.0`` is replaced silently; any other value > 0 with a warning. A plain
    ``transformers.Trainer`` cannot do this and the callback raises there instead.

    With an :class:`~lit_optim.integrations.hf.AdaptiveBatchSizeCallback` on one process without
    gradient accumulation, an even ``per_device_train_batch_size`` B runs as 2 micro-batches of B/2
    with ``gradient_accumulation_steps=2`` (same effective batch), which the callback's statistics
    need."""

    def _lit_callbacks(self) -> list[LitCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, LitCallback)]  # type: ignore[attr-defined]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        path = resume_from_checkpoint
        if path is True:
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
        for cb in self._lit_callbacks():
            cb.resume_dir = path if isinstance(path, (str, os.PathLike)) else None
        self._median_clipping_replaces_hf_clipping()
        self._two_micro_batches_for_adaptive_batch_size()
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def _median_clipping_replaces_hf_clipping(self) -> None:
        from .callbacks.grad_clip_median import GradClipMedianCallback

        args = self.args  # type: ignore[attr-defined]
        value = args.max_grad_norm
        if (
            value is None
            or value <= 0
            or not any(isinstance(cb, GradClipMedianCallback) for cb in self._lit_callbacks())
        ):
            return
        if value != TrainingArguments.__dataclass_fields__["max_grad_norm"].default:
            warnings.warn(
                f"GradClipMedianCallback replaces HF's gradient clipping: TrainingArguments(max_grad_norm={value}) is "
                "ignored by this Trainer (max_grad_norm=0 for its training loop); use "
                f"GradClipMedianCallback('constant', threshold={value}) to clip at a constant threshold",
                stacklevel=3,
            )
        args = copy.copy(args)  # the caller's object (maybe shared with other Trainers) stays as given
        args.max_grad_norm = 0.0
        self.args = args

    def _two_micro_batches_for_adaptive_batch_size(self) -> None:
        """AdaptiveBatchSizeCallback estimates the gradient noise from >= 2 micro-batch gradients per
        step. With one process and no accumulation (HF's default) an even per-device batch B is run
        as 2 micro-batches of B/2 with accumulation 2: the same effective batch and the same
        gradient, and the callback's default works. An odd B is left as is (the callback then
        explains what to pass)."""
        from .callbacks.adaptive_batch_size import AdaptiveBatchSizeCallback

        args = self.args  # type: ignore[attr-defined]
        if not any(isinstance(cb, AdaptiveBatchSizeCallback) for cb in self._lit_callbacks()):
            return
        bs = int(args.per_device_train_batch_size)
        if int(args.gradient_accumulation_steps) * int(args.world_size) >= 2 or bs < 2 or bs % 2:
            return
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger(__name__).info(
            "AdaptiveBatchSizeCallback: per_device_train_batch_size=%d without accumulation runs as 2 micro-batches "
            "of %d (gradient_accumulation_steps=2; same effective batch) so the gradient noise can be estimated",
            bs,
            bs // 2,
        )
        args = copy.copy(args)  # the caller's object stays as given
        args.per_device_train_batch_size = bs // 2
        args.gradient_accumulation_steps = 2 * int(args.gradient_accumulation_steps)
        self.args = args

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        for cb in self._lit_callbacks():
            logs.update(cb.pop_logs())
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)  # type: ignore[misc]
        extra: dict[str, float] = {}
        for cb in self._lit_callbacks():
            extra.update(cb.pop_eval_logs())
        if extra:
            # already in metrics and state.log_history (the callback put them there); report them
            self.control = self.callback_handler.on_log(self.args, self.state, self.control, dict(extra))  # type: ignore[attr-defined]
        return metrics


class LitTrainer(LitTrainerMixin, Trainer):
    """``transformers.Trainer`` that forwards what the lit_optim callbacks log to ``report_to``
    integrations (see :class:`LitCallback`). Otherwise identical to ``Trainer``."""


class CurvatureTrainer(CurvatureTrainerMixin, LitTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`CurvatureTrainerMixin` (and :class:`LitTrainerMixin`):
    Sophia / AdaHessian in HF training without touching the loop::

        args = TrainingArguments("out", learning_rate=2e-4, max_steps=1000, max_grad_norm=1.0)
        trainer = CurvatureTrainer(model=model, args=args, train_dataset=ds,
                                   optimizers=create_optimizer_and_scheduler(model, "sophia", args),
                                   curvature_every_n_steps=10)
        trainer.train()
    """
