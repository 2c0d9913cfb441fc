"""Float32 arithmetic and float32 state for float16 / bfloat16 parameters.

The elementwise optimizers (AdaBelief, AdaBound, AdaGrad, AdaHessian, Adan, diffGrad, EXAdam, Lion,
Sophia) keep their state in float32 for a float16 or bfloat16 parameter and compute the whole update
in float32, rounding into the parameter once per step:

* float16 cannot hold the quantities of an Adam-type update: a squared gradient of 1e-4 (1e-8) and
  the default ``eps`` values (1e-8, 1e-16) underflow to zero, so a zero denominator turns a finite
  gradient into an infinite weight (AdaBelief, lr 1e-2, gradient 1e-4); squared gradients above 256
  overflow.
* bfloat16 has float32's range but 8 significant bits: ``v * 0.999`` rounds back to ``v``, so an EMA
  with ``beta2 = 0.999`` kept in bfloat16 stops decaying.
* with float32 arithmetic the multi-tensor path (``foreach=True``) and the per-tensor loop
  (``foreach=False``) round identically; in bfloat16 they do not (``torch._foreach_mul_`` with a
  Python scalar on CPU rounds the scalar to bfloat16 first, ``Tensor.mul_`` does not).

The cost is float32 state memory (4 bytes per element per state tensor, as for a float32
parameter) and one float32 copy of each parameter slice and gradient slice during its update.
``torch.optim`` optimizers keep the state in the parameter's dtype instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._validation import check_positive

__all__ = ["LOW_PRECISION", "Float32Math", "PositiveEps", "check_eps_positive", "state_dtype"]

#: parameter dtypes whose optimizer state and update arithmetic are float32
LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(p: Tensor) -> torch.dtype:
    """dtype of the optimizer state of parameter ``p``: float32 for float16/bfloat16, else ``p``'s."""
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def _upcast_state(p: Tensor, state: dict[str, Any]) -> None:
    if p.dtype not in LOW_PRECISION:
        return
    for k, v in state.items():
        if k != "step" and isinstance(v, Tensor) and v.dtype in LOW_PRECISION:
            state[k] = v.float()


def check_eps_positive(value: Any, why: str) -> float:
    """``eps`` in (0, inf); ``why`` says what a zero ``eps`` would divide (appended to the message)."""
    try:
        return check_positive("eps", value)
    except ValueError as e:
        raise ValueError(f"{e}; {why}") from None


class PositiveEps:
    """Mixin for optimizers whose denominator is 0 where a gradient (or curvature estimate) has
    always been zero unless ``eps > 0``: ``eps`` given in a parameter-group dict is checked like the
    constructor's (the constructor calls :func:`check_eps_positive` with :attr:`eps_zero_reason`)."""

    #: what a zero eps would divide, appended to the error message
    eps_zero_reason: str = "it would divide 0 by 0 (NaN)"

    def _normalize_group(self, group: dict[str, Any]) -> dict[str, Any]:
        group = super()._normalize_group(group)  # type: ignore[misc]
        if "eps" in group:
            group["eps"] = check_eps_positive(group["eps"], self.eps_zero_reason)
        return group


class Float32Math:
    """Mixin for :class:`~lit_optim.optim.LitOptimizer` subclasses (listed before it in the bases):
    float32 state and float32 update arithmetic for float16/bfloat16 parameters (see the module
    docstring). The subclass writes its update as ``_update_math`` (the signature of
    ``LitOptimizer._update``); it receives float32 copies of the parameters and gradients of
    low-precision parameters and the results are copied back into the parameters."""

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        super()._init_state(p, state, group)  # type: ignore[misc]
        _upcast_state(p, state)

    def _prepare_states(self, group: dict[str, Any], params: list[Tensor]) -> list[dict[str, Any]]:
        states = super()._prepare_states(group, params)  # type: ignore[misc]
        for p, st in zip(params, states):
            _upcast_state(p, st)
        return states

    def _update(self, group, params, grads, state, step, ops) -> None:
        # the base hands one dtype per call (its groups are keyed by device, dtype and step)
        if not params or params[0].dtype not in LOW_PRECISION:
            self._update_math(group, params, grads, state, step, ops)
            return
        p32 = [p.float() for p in params]
        g32 = [g.float() for g in grads]
        self._update_math(group, p32, g32, state, step, ops)
        ops.copy_(params, p32)

    def _update_math(self, group, params, grads, state, step, ops) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``LitOptimizer.load_state_dict``; the state of float16/bfloat16 parameters is kept in
        float32 (torch.optim would cast it to the parameter's dtype)."""
        super().load_state_dict(state_dict)  # type: ignore[misc]
        saved_state = state_dict["state"]
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]  # type: ignore[attr-defined]
        for pid, p in zip(ids, params):
            if p.dtype not in LOW_PRECISION or p not in self.state:  # type: ignore[attr-defined]
                continue
            st = self.state[p]  # type: ignore[attr-defined]
            saved = saved_state.get(pid)
            for k, v in list(st.items()):
                if k == "step" or not isinstance(v, Tensor) or not v.is_floating_point():
                    continue
                src = saved.get(k) if isinstance(saved, dict) else None
                if isinstance(src, Tensor) and src.is_floating_point():
                    st[k] = src.detach().to(device=v.device, dtype=torch.float32, copy=True)
                elif v.dtype != torch.float32:
                    st[k] = v.float()
