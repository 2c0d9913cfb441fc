"""Factories: an optimizer by name with sensible parameter groups, and Lightning's
``configure_optimizers`` return value with a learning-rate schedule stepped every optimizer step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import param_groups as _pg
from ._validation import check_in_range
from .registry import available_optimizers, get_optimizer_info

__all__ = [
    "SCHEDULES",
    "LRSchedule",
    "available_optimizers",
    "configure_optimizers",
    "create_optimizer",
    "create_scheduler",
]

SCHEDULES = ("constant", "cosine", "linear", "wsd")


def _groups(info, model_or_params, weight_decay):
    grouping = info.grouping
    if callable(grouping):
        return grouping(model_or_params, weight_decay)
    if grouping == "matrix":
        return _pg.matrix_groups(model_or_params, weight_decay)
    return _pg.decay_groups(model_or_params, weight_decay)


def create_optimizer(
    model_or_params: nn.Module | Any,
    name: str,
    lr: float | None = None,
    weight_decay: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` (see :func:`available_optimizers`).

    Args:
        model_or_params: an ``nn.Module`` (parameter groups are built from it: no weight decay on
            biases and norms; for the orthogonalized optimizers, matrices vs embeddings/head/1-D),
            an iterable of tensors, or a list of parameter-group dicts (used as given).
        name: lower-case optimizer name, e.g. ``"adabelief"``, ``"muon"``, ``"adamw"``.
        lr: learning rate; the optimizer's documented default when None.
        weight_decay: weight decay of the decayed group; the optimizer's default when None.
        **kwargs: further constructor arguments of the optimizer.
    """
    info = get_optimizer_info(name)
    if isinstance(model_or_params, torch.Tensor):
        model_or_params = [model_or_params]
    if not isinstance(model_or_params, nn.Module):
        model_or_params = list(model_or_params)
    groups = _groups(info, model_or_params, weight_decay)
    if not groups:
        raise ValueError(f"create_optimizer({name!r}): the model has no parameters that require grad")
    ctor = dict(info.defaults)
    ctor.update(kwargs)
    ctor["lr"] = info.default_lr if lr is None else lr
    return info.cls(groups, **ctor)


class LRSchedule:
    """Multiplier of the base learning rate at optimizer step ``step`` (a picklable ``LambdaLR``
    function, so the schedule is saved in checkpoints), with the conventions of
    ``transformers.get_scheduler``, so that the Lightning route (:func:`configure_optimizers`) and
    the Hugging Face route (``TrainingArguments(lr_scheduler_type=..., warmup_steps=...)``) give the
    same learning rate at every step. With ``T = total_steps``, ``W = warmup_steps`` and the
    progress ``p = (step - W) / max(1, T - W)``:

    * **warm-up** (every kind): ``step / W`` for ``step < W``: 0 at the first step, 1.0 from step
      ``W`` on (transformers' ``get_*_schedule_with_warmup``). ``wsd`` warms up from
      ``min_lr_ratio`` instead, as ``transformers.get_wsd_schedule`` does.
    * ``constant``: 1 after warm-up (``get_constant_schedule_with_warmup``).
    * ``cosine``: half-cosine from 1 to ``min_lr_ratio``:
      ``min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi p))`` (``get_cosine_schedule_with_warmup``;
      with ``min_lr_ratio > 0``, ``get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=...)``).
    * ``linear``: linear decay from 1 to ``min_lr_ratio``: ``1 - (1 - min_lr_ratio) p``
      (``get_linear_schedule_with_warmup`` when ``min_lr_ratio = 0``; transformers has no floor),
      the worst-case optimal schedule of "When, Why and How Much? Adaptive Learning Rate
      Scheduling by Refinement".
    * ``wsd``: warmup-stable-decay: constant, then a linear decay to ``min_lr_ratio`` over the
      last ``D = max(1, round(decay_fraction * T))`` steps
      (``get_wsd_schedule(num_warmup_steps=W, num_decay_steps=D, num_training_steps=T,
      decay_type="linear", min_lr_ratio=...)``).

    From step ``T`` on the multiplier stays at its final value (``min_lr_ratio``; 1 for
    ``constant``). The multiplier for ``step`` is the one ``LambdaLR`` applies to the update of
    optimizer step ``step`` (0-based), as in transformers.
    """

    def __init__(
        self,
        kind: str,
        total_steps: int | None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        decay_fraction: float = 0.2,
    ):
        if kind not in SCHEDULES:
            raise ValueError(f"scheduler must be one of {list(SCHEDULES)}, got {kind!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        min_lr_ratio = check_in_range("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
        decay_fraction = check_in_range("decay_fraction", decay_fraction, 0.0, 1.0, low_closed=False)
        if kind != "constant":
            if total_steps is None or total_steps < 1 or total_steps == math.inf:
                raise ValueError(
                    f"scheduler={kind!r} needs total_steps >= 1 (got {total_steps!r}); pass total_steps or "
                    "set Trainer(max_steps=...) / max_epochs so that trainer.estimated_stepping_batches is finite"
                )
            total_steps = int(total_steps)
        self.kind = kind
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = float(min_lr_ratio)
        self.decay_fraction = float(decay_fraction)

    @property
    def decay_steps(self) -> int | None:
        """``wsd``: the steps of the final decay (``D``; at most the steps after warm-up)."""
        if self.kind != "wsd":
            return None
        d = max(1, round(self.decay_fraction * self.total_steps))
        return max(0, min(d, self.total_steps - self.warmup_steps))

    def __call__(self, step: int) -> float:
        w, lo = self.warmup_steps, self.min_lr_ratio
        if step < w:
            ramp = step / max(1, w)
            return lo + (1.0 - lo) * ramp if self.kind == "wsd" else ramp
        if self.kind == "constant":
            return 1.0
        total = self.total_steps
        if self.kind == "wsd":
            decay = self.decay_steps
            start = total - decay
            if step < start:
                return 1.0
            if step >= total:
                return lo
            return lo + (1.0 - lo) * (1.0 - (step - start) / max(1, decay))
        p = min(1.0, (step - w) / max(1, total - w))
        if self.kind == "cosine":
            return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
        return 1.0 - (1.0 - lo) * p

    def __repr__(self) -> str:
        return (
            f"LRSchedule({self.kind!r}, total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
            f"min_lr_ratio={self.min_lr_ratio}, decay_fraction={self.decay_fraction})"
        )

    def hf_scheduler_args(self) -> dict[str, Any]:
        """The ``transformers.get_scheduler`` arguments of the same schedule: ``name``,
        ``num_warmup_steps``, ``num_training_steps`` and ``scheduler_specific_kwargs`` (for
        ``TrainingArguments``: ``lr_scheduler_type``, ``warmup_steps``, ``max_steps``,
        ``lr_scheduler_kwargs``). ``linear`` with ``min_lr_ratio > 0`` has no transformers twin."""
        kw: dict[str, Any] = {}
        if self.kind == "constant":
            name = "constant_with_warmup"
        elif self.kind == "cosine":
            name = "cosine_with_min_lr" if self.min_lr_ratio > 0 else "cosine"
            if self.min_lr_ratio > 0:
                kw["min_lr_rate"] = self.min_lr_ratio
        elif self.kind == "linear":
            if self.min_lr_ratio > 0:
                raise ValueError("transformers has no linear schedule with a floor (min_lr_ratio > 0)")
            name = "linear"
        else:
            name = "warmup_stable_decay"
            kw = {"num_decay_steps": self.decay_steps, "decay_type": "linear", "min_lr_ratio": self.min_lr_ratio}
        return {
            "name": name,
            "num_warmup_steps": self.warmup_steps,
            "num_training_steps": self.total_steps,
            "scheduler_specific_kwargs": kw,
        }


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    scheduler: str = "constant",
    total_steps: int | None = None,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.2,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :class:`LRSchedule`; step it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRSchedule(scheduler, total_steps, warmup_steps, min_lr_ratio, decay_fraction)
    )


def configure_optimizers(
    module: nn.Module,
    name: str,
    lr: float | None = None,
    weight_decay: float | None = None,
    scheduler: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.2,
    **optimizer_kwargs: Any,
) -> dict[str, Any]:
    """Return value for ``LightningModule.configure_optimizers``::

        def configure_optimizers(self):
            return lit_optim.configure_optimizers(self, "adan", lr=1e-3, scheduler="cosine")

    The optimizer comes from :func:`create_optimizer`; the schedule (:class:`LRSchedule`) is
    stepped every optimizer step. ``total_steps`` defaults to
    ``module.trainer.estimated_stepping_batches`` for the decaying schedules.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"configure_optimizers expects the LightningModule (self), got {type(module).__name__}")
    optimizer = create_optimizer(module, name, lr=lr, weight_decay=weight_decay, **optimizer_kwargs)
    if scheduler not in SCHEDULES:
        raise ValueError(f"scheduler must be one of {list(SCHEDULES)}, got {scheduler!r}")
    if total_steps is None and scheduler != "constant":
        trainer = getattr(module, "_trainer", None)
        if trainer is None:
            raise ValueError(
                f"scheduler={scheduler!r} needs total_steps: pass it, or call configure_optimizers from a "
                "LightningModule attached to a Trainer (its estimated_stepping_batches is used)"
            )
        total_steps = trainer.estimated_stepping_batches
    sched = create_scheduler(optimizer, scheduler, total_steps, warmup_steps, min_lr_ratio, decay_fraction)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1, "name": f"lr-{name.lower()}"},
    }
