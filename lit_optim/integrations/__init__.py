"""Integrations with Hugging Face: ``hf`` (Trainer: optimizers, TrainerCallbacks, CurvatureTrainer)
and ``peft`` (LoRA-aware parameter groups). Both need the ``hf`` extra
(``pip install ".[hf]"`` in a clone); they are imported on first use so that ``import lit_optim``
does not import transformers."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["hf", "peft"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
