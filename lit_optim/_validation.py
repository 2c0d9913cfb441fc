"""Argument validation shared by the optimizers, the functional code, the callbacks and the
integrations: every check raises a ``ValueError`` (value out of range) or ``TypeError`` (wrong
type) whose message names the argument, the allowed range and the value received
(``betas[1] must be in [0, 1), got 1.2``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = [
    "check_betas",
    "check_choice",
    "check_in_range",
    "check_lr",
    "check_non_negative",
    "check_positive",
    "check_positive_int",
]



def _fmt_interval(low: float, high: float, low_closed: bool, high_closed: bool) -> str:
    def f(x: float) -> str:
        if x == math.inf:
            return "inf"
        if x == -math.inf:
            return "-inf"
        return f"{x:g}"

    return f"{'[' if low_closed else '('}{f(low)}, {f(high)}{']' if high_closed else ')'}"


#: torch.optim's wording for the arguments it validates itself (appended to our message so that code
#: matching torch's errors matches ours too)
_TORCH_WORDING = {
    "lr": "Invalid learning rate",
    "eps": "Invalid epsilon value",
    "weight_decay": "Invalid weight_decay value",
    "momentum": "Invalid momentum value",
    "dampening": "Invalid dampening value",
    "lr_decay": "Invalid lr_decay value",
    "initial_accumulator_value": "Invalid initial_accumulator_value value",
}


def _torch_wording(name: str, value: Any) -> str:
    if name.startswith("betas[") and name.endswith("]"):
        return f" (Invalid beta parameter at index {name[6:-1]}: {value})"
    if name in _TORCH_WORDING:
        return f" ({_TORCH_WORDING[name]}: {value})"
    return ""


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            # torch.optim: ValueError("Tensor lr must be 1-element")
            raise ValueError(
                f"Tensor {name} must be 1-element: {name} must be a number or a one-element tensor, "
                f"got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    return float(value)


def check_in_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_closed: bool = True,
    high_closed: bool = True,
) -> float:
    """Return ``value`` as a float after checking it lies in the interval; otherwise raise
    ``ValueError("<name> must be in [low, high), got <value>")``."""
    v = _check_real(name, value)
    ok_low = v >= low if low_closed else v > low
    ok_high = v <= high if high_closed else v < high
    if not (ok_low and ok_high):
        raise ValueError(
            f"{name} must be in {_fmt_interval(low, high, low_closed, high_closed)}, got {value!r}"
            + _torch_wording(name, v)
        )
    return v


def check_lr(value: Any, name: str = "lr") -> float:
    """Learning rate: a finite number >= 0 (a 0-dim tensor is accepted, as in torch.optim)."""
    return check_in_range(name, value, 0.0, math.inf, high_closed=False)


def check_non_negative(name: str, value: Any) -> float:
    return check_in_range(name, value, 0.0, math.inf, high_closed=False)


def check_positive(name: str, value: Any) -> float:
    return check_in_range(name, value, 0.0, math.inf, low_closed=False, high_closed=False)


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_betas(betas: Any, n: int = 2, name: str = "betas") -> tuple[float, ...]:
    """Each beta must be in [0, 1)."""
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of {n} floats in [0, 1), got {type(betas).__name__} {betas!r}")
    if len(betas) != n:
        raise ValueError(f"{name} must have {n} entries, got {len(betas)}: {tuple(betas)!r}")
    return tuple(check_in_range(f"{name}[{i}]", b, 0.0, 1.0, high_closed=False) for i, b in enumerate(betas))


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
