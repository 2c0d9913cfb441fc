"""lit_optim: optimizers, curvature tools and callbacks from recent optimization research, for
PyTorch Lightning and Hugging Face training.

The subpackages are reachable as attributes of the package without importing them first
(``import lit_optim; lit_optim.callbacks.HessianDiagCallback(...)``): those not already loaded are
imported on first access (PEP 562), so ``import lit_optim`` stays light (no Lightning callbacks, no
transformers; ``lit_optim.integrations.hf`` imports transformers only when it is touched)."""

from __future__ import annotations

import importlib
from typing import Any

from . import optim, param_groups
from .factory import LRSchedule, configure_optimizers, create_optimizer, create_scheduler
from .optim import *  # noqa: F401,F403
from .optim import __all__ as _optim_all
from .registry import OPTIMIZERS, available_optimizers, get_optimizer_info, register_optimizer

__version__ = "0.1.0"

#: submodules imported on first attribute access (``lit_optim.callbacks`` ...)
_LAZY_SUBMODULES = (
    "callbacks",
    "cli",
    "compare",
    "curvature",
    "factory",
    "functional",
    "integrations",
    "optim",
    "param_groups",
    "registry",
    "tasks",
)

__all__ = [
    *_optim_all,
    "optim",
    "param_groups",
    "create_optimizer",
    "configure_optimizers",
    "create_scheduler",
    "LRSchedule",
    "available_optimizers",
    "get_optimizer_info",
    "register_optimizer",
    "OPTIMIZERS",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        # import_module also binds the submodule as an attribute of this package, so this runs once
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
