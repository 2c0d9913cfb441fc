"""Helpers shared by the modules of :mod:`lit_optim.integrations.hf`, and the one place that
imports transformers (with the message that names the extra when it is missing)."""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import transformers  # noqa: F401  (re-exported for the sibling modules)
    from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "lit_optim.integrations.hf needs transformers, peft and accelerate: install the hf extra "
        "(pip install '.[hf]' in a clone of lit_optim; see the README's install section)"
    ) from exc


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    seen = 0
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def _ckpt_dir(args: TrainingArguments, state: Any) -> str:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _refuse_sharded(args: TrainingArguments, what: str) -> None:
    fsdp = getattr(args, "fsdp", None)
    if fsdp or getattr(args, "deepspeed", None):
        raise ValueError(
            f"{what} needs the whole gradient on every process (one device or DDP); FSDP / DeepSpeed shard it "
            "(TrainingArguments(fsdp=...) / deepspeed=... is set)"
        )
