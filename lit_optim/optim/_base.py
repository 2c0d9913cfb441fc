"""Shared machinery for every lit_optim optimizer.

* Validation helpers whose messages name the argument, the allowed range and the value received
  (``betas[1] must be in [0, 1), got 1.2``).
* :class:`TensorListOps`: one algorithm written against lists of tensors runs either on the
  multi-tensor ``torch._foreach_*`` kernels (the default) or on a plain per-tensor loop.
* :class:`LitOptimizer`: the ``torch.optim.Optimizer`` base with ``step(closure)``, ``maximize``,
  ``foreach``, refusal of sparse and complex gradients, skipping of parameters whose grad is None,
  detection of non-finite gradients before anything is written into the weights, lazy state
  creation and grouping of tensors by device, dtype and step count for the multi-tensor path.
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _dtensor
from .._validation import (
    check_betas,
    check_choice,
    check_in_range,
    check_lr,
    check_non_negative,
    check_positive,
    check_positive_int,
)

__all__ = [
    "NONFINITE_MODES",
    "LitOptimizer",
    "NonFiniteGradientError",
    "TensorListOps",
    "check_betas",
    "check_choice",
    "check_in_range",
    "check_lr",
    "check_non_negative",
    "check_positive",
    "check_positive_int",
]

NONFINITE_MODES = ("raise", "skip", "ignore")


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf; the optimizer refused to write it into the weights."""


# ----------------------------------------------------------------------------- tensor-list ops


class _LoopOp:
    """Per-tensor fallback for a ``torch._foreach_<name>`` kernel."""

    __slots__ = ("inplace", "name")

    def __init__(self, name: str):
        self.name = name
        self.inplace = name.endswith("_")

    def __call__(self, xs: Sequence[Tensor], *args: Any, **kwargs: Any):
        out = []
        for i, x in enumerate(xs):
            a = [arg[i] if isinstance(arg, (list, tuple)) else arg for arg in args]
            kw = {k: (v[i] if isinstance(v, (list, tuple)) else v) for k, v in kwargs.items()}
            out.append(self._apply(x, a, kw))
        return None if self.inplace else out

    def _apply(self, x: Tensor, a: list, kw: dict) -> Tensor:
        name = self.name
        if name == "norm":
            return torch.linalg.vector_norm(x, *a, **kw)
        if name in ("maximum_", "minimum_"):
            fn = torch.maximum if name == "maximum_" else torch.minimum
            return fn(x, a[0], out=x)
        if name in ("maximum", "minimum"):
            return getattr(torch, name)(x, *a)
        if name in ("addcmul_", "addcdiv_", "addcmul", "addcdiv") and len(a) == 3:
            # foreach takes the scalar positionally (scalars list); the method wants value=
            return getattr(x, name)(a[0], a[1], value=a[2])
        if name in ("add_", "add", "sub_", "sub") and len(a) == 2:
            return getattr(x, name)(a[0], alpha=a[1])
        return getattr(x, name)(*a, **kw)


class TensorListOps:
    """Elementwise operations on lists of tensors.

    ``TensorListOps(True).lerp_(xs, ys, 0.1)`` calls ``torch._foreach_lerp_``;
    ``TensorListOps(False)`` runs the same operation tensor by tensor. An optimizer writes its update
    once against this interface and gets both paths; arguments that are lists are matched up
    element by element, scalars are broadcast.
    """

    __slots__ = ("foreach",)

    def __init__(self, foreach: bool):
        self.foreach = bool(foreach)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if self.foreach:
            return getattr(torch, "_foreach_" + name)
        return _LoopOp(name)

    def mul_(self, xs: Sequence[Tensor], other: Any) -> None:
        """``x *= other``. On CPU, ``torch._foreach_mul_(tensors, python_scalar)`` first rounds the
        scalar to the tensors' dtype (for bfloat16 a factor 0.9975 becomes 0.99609375) while
        ``Tensor.mul_`` multiplies in float32; half-precision lists therefore take the overload
        with a 0-d float32 tensor, which rounds like ``Tensor.mul_``, so the multi-tensor and the
        per-tensor paths give identical results in every dtype."""
        if not self.foreach:
            _LoopOp("mul_")(xs, other)
            return
        if isinstance(other, (int, float)) and not isinstance(other, bool) and xs:
            half = [x for x in xs if x.dtype in (torch.bfloat16, torch.float16)]
            if half:
                rest = [x for x in xs if x.dtype not in (torch.bfloat16, torch.float16)]
                if rest:
                    torch._foreach_mul_(rest, other)
                for idx in group_by_key(len(half), lambda i: half[i].device).values():
                    hs = [half[i] for i in idx]
                    torch._foreach_mul_(hs, torch.tensor(float(other), dtype=torch.float32, device=hs[0].device))
                return
        torch._foreach_mul_(xs, other)


FOREACH_OPS = TensorListOps(True)
LOOP_OPS = TensorListOps(False)


def group_by_key(n: int, key: Callable[[int], Any]) -> dict[Any, list[int]]:
    """Indices 0..n-1 grouped by key(i), keeping first-seen order."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for i in range(n):
        groups[key(i)].append(i)
    return groups


# ----------------------------------------------------------------------------- base optimizer


def _check_group_betas(value: Any, default: Any) -> tuple[float, ...]:
    return check_betas(value, len(default) if isinstance(default, (tuple, list)) else 2)


def _check_group_bool(key: str) -> Callable[[Any, Any], bool]:
    def check(value: Any, default: Any) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"{key} must be a bool, got {type(value).__name__} {value!r}")
        return value

    return check


def _check_group_foreach(value: Any, default: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"foreach must be None, True or False, got {value!r}")
    return value


def _check_group_fused(value: Any, default: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"fused must be None, True or False, got {value!r}")
    return value


def _check_fused_foreach(fused: Any, foreach: Any, where: str = "") -> None:
    if fused and foreach is False:
        raise ValueError(
            f"fused=True and foreach=False{where} cannot be combined: the fused (compiled) update is built "
            "from the multi-tensor kernels; pass foreach=None or True with fused=True"
        )


#: "not given" marker of the ``fused`` keyword that LitOptimizer adds to subclass constructors
_UNSET: Any = object()


#: checks applied to hyperparameters given in a parameter-group dict (the constructor's checks)
_GROUP_CHECKS: dict[str, Callable[[Any, Any], Any]] = {
    "lr": lambda v, d: check_lr(v),
    "betas": _check_group_betas,
    "eps": lambda v, d: check_non_negative("eps", v),
    "weight_decay": lambda v, d: check_non_negative("weight_decay", v),
    "momentum": lambda v, d: check_in_range("momentum", v, 0.0, 1.0, high_closed=False),
    "maximize": _check_group_bool("maximize"),
    "foreach": _check_group_foreach,
    "fused": _check_group_fused,
    "nonfinite": lambda v, d: check_choice("nonfinite", v, NONFINITE_MODES),
}


#: block size of the cache-blocked multi-tensor path: 2**19 elements (2 MiB per float32 tensor, so
#: a block's parameter, gradient and states stay in the last-level cache); on the 2-core
#: development CPU 2**19 stepped 10-25% faster than 2**17 for every elementwise optimizer (fewer
#: Python-level dispatches) and as fast as or faster than 2**18 and 2**20
ELEMENTWISE_BLOCK_NUMEL = 1 << 19


class LitOptimizer(torch.optim.Optimizer):
    """Base class of the lit_optim optimizers.

    A subclass sets ``state_keys`` (the per-parameter state tensors created as zeros like the
    parameter) or overrides :meth:`_init_state`, and implements :meth:`_update`, which receives
    lists of parameters, gradients and state tensors that share device, dtype and step count, plus
    a :class:`TensorListOps` selecting the multi-tensor or per-tensor path.

    Every optimizer accepts these keyword arguments, stored per parameter group:

    * ``maximize`` (default False): maximize the objective instead of minimizing it.
    * ``foreach`` (default None, meaning True): use the ``torch._foreach_*`` multi-tensor kernels;
      ``False`` runs a per-tensor loop with identical results.
    * ``nonfinite`` (default ``"raise"``): what to do when a gradient holds NaN or Inf:
      ``"raise"`` raises :class:`NonFiniteGradientError` before any weight is touched,
      ``"skip"`` skips the whole step (counted in ``optimizer.skipped_steps``) and ``"ignore"``
      does no check (saves one reduction over the gradients per step).
    * ``fused`` (default None, meaning False on every device): run the update of elementwise
      optimizers as compiled (``torch.compile``) kernels (see :mod:`lit_optim.optim._compiled`); the first
      step compiles (seconds to a minute), later steps make one pass over memory. ``fused=True``
      with ``foreach=False`` is refused. Optimizers without a fused update accept the flag and
      run their multi-tensor update.
    """

    state_keys: tuple[str, ...] = ()
    #: True when the update of each element depends only on that element (Adam-like); the
    #: multi-tensor path then runs the update block by block over cache-sized slices.
    elementwise: bool = False
    #: elements per block for elementwise optimizers on the multi-tensor path (0: no blocking);
    #: elementwise subclasses use :data:`ELEMENTWISE_BLOCK_NUMEL`
    block_numel: int = 0
    #: gradients of complex parameters are refused unless a subclass supports them
    supports_complex: bool = False
    #: DTensor (FSDP2 / tensor-parallel) parameters: None means "when ``elementwise``" (the base
    #: then runs the update on local shards, which is exact for any placement); a subclass whose
    #: update is shard-aware sets True; False refuses DTensor parameters with a clear message
    supports_dtensor: bool | None = None
    #: the update depends on each parameter's matrix shape (orthogonalized, low-rank projections):
    #: parameters flattened by DeepSpeed ZeRO / FSDP1 are refused (see :meth:`_check_not_flattened`)
    needs_matrix_shapes: bool = False
    #: float16 parameters are refused (the orthogonalized and memory-reduced families; the
    #: elementwise family computes 16-bit updates in float32 instead)
    refuses_float16: bool = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
        fused: bool | None = _UNSET,
    ):
        if not isinstance(maximize, bool):
            raise TypeError(f"maximize must be a bool, got {type(maximize).__name__} {maximize!r}")
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
        check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        if fused is _UNSET:  # given to a subclass constructor that does not forward it
            fused = self.__dict__.pop("_fused_arg", None)
        _check_group_fused(fused, None)
        _check_fused_foreach(fused, foreach)
        defaults = dict(defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite, fused=fused)
        self.skipped_steps = 0
        super().__init__(params, defaults)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give every subclass constructor the ``fused`` keyword: a subclass whose ``__init__`` does
        not take it (and forward it to this class) gets it through a thin wrapper."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_takes_fused", False):
            return
        try:
            if "fused" in inspect.signature(init).parameters:
                return
        except (TypeError, ValueError):  # pragma: no cover - builtin or odd callables
            return

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, fused: bool | None = _UNSET, **kw: Any) -> None:
            if fused is not _UNSET:
                self.__dict__["_fused_arg"] = fused
            try:
                init(self, *args, **kw)
            finally:
                self.__dict__.pop("_fused_arg", None)

        __init__._takes_fused = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]

    # -- parameter groups ----------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, and further:

        * a parameter listed twice in one group is refused (torch only warns, and the update would
          then be applied twice);
        * hyperparameters given in the group dict are validated and converted exactly as the
          constructor's arguments are (a 0-d tensor ``lr`` becomes a float, ``betas`` are
          range-checked, ...);
        * the state of the group's parameters is created at once (zeros, ``step`` 0), so that every
          rank holds the same state keys before the first step: a distributed checkpoint
          (``torch.distributed.checkpoint``) then saves and loads complete state, and torch's
          ``get_optimizer_state_dict`` does not initialize it with a zero-learning-rate step that
          would advance the step count.
        """
        if isinstance(param_group, dict):
            param_group = self._normalize_group(dict(param_group))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if self.refuses_float16:
            for pi, p in enumerate(group["params"]):
                if p.dtype == torch.float16:
                    raise TypeError(
                        f"{type(self).__name__} does not support float16 parameters (parameter {pi} of param group "
                        f"{len(self.param_groups) - 1}, shape {tuple(p.shape)}): its state and matrix arithmetic would "
                        "overflow or underflow in float16. Use bfloat16 or float32 parameters (float16 mixed "
                        "precision, as in Lightning's precision='16-mixed' or HF's fp16=True, keeps float32 weights)"
                    )
        if any(p.ndim >= 2 for p in group["params"]):
            self.__dict__.setdefault("_group_had_matrix", {})[len(self.param_groups) - 1] = True
        _check_fused_foreach(group.get("fused"), group.get("foreach"), f" in param group {len(self.param_groups) - 1}")
        for p in group["params"]:
            if p.requires_grad:
                self._ensure_state(p, group)

    def _normalize_group(self, group: dict[str, Any]) -> dict[str, Any]:
        params = group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif params is not None and not isinstance(params, (set, str)):
            params = list(params)
            group["params"] = params
        if isinstance(params, list):
            seen: dict[int, int] = {}
            for i, p in enumerate(params):
                if id(p) in seen:
                    raise ValueError(
                        f"{type(self).__name__}: parameter {i} of a parameter group (shape "
                        f"{tuple(getattr(p, 'shape', ()))}) is the same tensor as parameter {seen[id(p)]}; "
                        "pass each parameter once (a duplicate would be updated twice per step)"
                    )
                seen[id(p)] = i
        defaults = getattr(self, "defaults", {})
        for key, value in list(group.items()):
            if key == "params":
                continue
            check = _GROUP_CHECKS.get(key)
            if check is not None and key in defaults:
                group[key] = check(value, defaults[key])
            elif key in defaults and isinstance(defaults[key], float) and isinstance(value, Tensor):
                group[key] = check_in_range(key, value)
        return group

    # -- state ---------------------------------------------------------------------------------

    def _ensure_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The state of ``p``, created (``step`` 0 and :meth:`_init_state`) when missing."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            self._init_state(p, state, group)
            if len(self.state) > sum(len(g["params"]) for g in self.param_groups):
                self._drop_stale_state()
        return state

    def _drop_stale_state(self) -> None:
        """Forget the state of tensors that are no longer in any parameter group, and create the
        state of those that lack it.

        accelerate's FSDP2 preparation (Hugging Face ``Trainer`` with ``fsdp_version: 2``) builds the
        optimizer on the whole parameters, then replaces every parameter in ``param_groups`` by its
        sharded DTensor. The whole-size state created at construction would otherwise stay alive on
        every rank (and ``state_dict`` could not name it); the replacements get fresh state, laid out
        like them. Called when state is created for a parameter never seen before and by
        :meth:`state_dict`."""
        current = {id(p) for g in self.param_groups for p in g["params"]}
        stale = [k for k in self.state if isinstance(k, Tensor) and id(k) not in current]
        for k in stale:
            del self.state[k]
        if stale:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        self._ensure_state(p, group)

    # -- hooks for subclasses ------------------------------------------------------------------

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        for key in self.state_keys:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        state: dict[str, list[Tensor]],
        step: int,
        ops: TensorListOps,
    ) -> None:  # pragma: no cover - abstract
        """Apply one update to ``params`` in place.

        ``state[key]`` is the list of state tensors named ``key`` (one per parameter, from
        ``state_keys``); ``step`` is the 1-based step count shared by all of them.
        Elementwise optimizers (``elementwise = True``) may be handed contiguous slices of large
        tensors, so that the whole update of one slice runs while it is in cache.
        """
        raise NotImplementedError

    def _group_key(self, p: Tensor, state: dict[str, Any]) -> Any:
        """Tensors with equal keys are updated together by one multi-tensor call."""
        return (p.device, p.dtype, state["step"])

    # -- public API ----------------------------------------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "skipped_steps"):
            self.skipped_steps = 0

    def _collect(self, group: dict[str, Any], gi: int) -> tuple[list[Tensor], list[Tensor]]:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        name = type(self).__name__
        for pi, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise TypeError(
                    f"{name} does not support sparse gradients (param group {gi}, parameter {pi}); "
                    "use dense gradients, e.g. nn.Embedding(sparse=False)"
                )
            if torch.is_complex(p) and not self.supports_complex:
                raise TypeError(
                    f"{name} does not support complex parameters (param group {gi}, parameter {pi}); "
                    "optimize torch.view_as_real(param) instead"
                )
            if _dtensor.is_dtensor(p) or _dtensor.is_dtensor(g):
                self._check_dtensor(p, g, f"{pi} of param group {gi}")
            params.append(p)
            grads.append(g)
        return params, grads

    def _dtensor_supported(self) -> bool:
        return self.elementwise if self.supports_dtensor is None else bool(self.supports_dtensor)

    def _check_dtensor(self, p: Tensor, g: Tensor, where: str) -> None:
        name = type(self).__name__
        if not self._dtensor_supported():
            raise TypeError(
                f"{name} does not support DTensor parameters (parameter {where}: {_dtensor.describe_placements(p)}); "
                "its update is not shard-aware"
            )
        _dtensor.check_same_placement(name, p, g, where)

    def _grads_are_finite(self, all_grads: list[list[Tensor]]) -> tuple[bool, tuple[int, int] | None]:
        """Whether every gradient is finite (NaN/Inf), and where the first non-finite one is.

        Finiteness is checked with a max-abs reduction per tensor in its own dtype, so large finite
        gradients (a float16 gradient of 2100, float32 entries of 1e19) are never reported as
        non-finite; with DTensor gradients the answer is agreed over the shards, so every rank
        raises or skips together."""
        flat = [g for gs in all_grads for g in gs]
        if _dtensor.all_finite(flat):
            return True, None
        for gi, gs in enumerate(all_grads):
            for j, g in enumerate(gs):
                lg = _dtensor.local(g)
                if lg.numel() and not bool(torch.isfinite(lg).all()):
                    return False, (gi, j)
        return False, None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it is
                called with gradients enabled and its return value is returned.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_groups()
        return loss

    def _check_not_flattened(self) -> None:
        """Refuse parameters that a wrapper replaced by flattened 1-D buffers.

        DeepSpeed ZeRO (Lightning's ``DeepSpeedStrategy``, HF's ``deepspeed=``) and FSDP1 with
        ``use_orig_params=False`` hand the wrapped optimizer flat 1-D partitions of the model in
        place of its parameters. An optimizer whose update needs each matrix's shape
        (``needs_matrix_shapes``: the orthogonalized and memory-reduced families) would then treat
        every matrix as a vector and silently degrade (Muon into momentum SGD); it raises instead."""
        if not self.needs_matrix_shapes:
            return
        seen = self.__dict__.setdefault("_seen_param_lists", {})
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            key = gi
            if seen.get(key) is params:
                continue
            had_matrix = self.__dict__.get("_group_had_matrix", {}).get(gi, False)
            new_flat = [p for p in params if p.ndim <= 1 and not self.state.get(p)]
            if had_matrix and new_flat and not any(p.ndim >= 2 for p in params):
                raise TypeError(
                    f"{type(self).__name__}: the parameters of param group {gi} were replaced by flattened 1-D "
                    f"buffers (shapes {[tuple(p.shape) for p in params[:3]]}...), as DeepSpeed ZeRO and FSDP1 "
                    "(use_orig_params=False) do; this optimizer needs each matrix's shape and would silently "
                    "degrade. Use FSDP2 (Lightning's ModelParallelStrategy, torch.distributed.fsdp.fully_shard, "
                    "HF/accelerate fsdp_version 2), DDP, or one process"
                )
            seen[key] = params

    def _step_groups(self) -> None:
        self._check_not_flattened()
        collected = [self._collect(group, gi) for gi, group in enumerate(self.param_groups)]
        modes = {group["nonfinite"] for group in self.param_groups}
        if modes != {"ignore"}:
            ok, where = self._grads_are_finite([g for _, g in collected])
            if not ok:
                skip = all(group["nonfinite"] != "raise" for group in self.param_groups)
                if skip:
                    self.skipped_steps += 1
                    return
                loc = ""
                if where is not None:
                    p = collected[where[0]][0][where[1]]
                    pi = next(i for i, q in enumerate(self.param_groups[where[0]]["params"]) if q is p)
                    loc = f" in param group {where[0]}, parameter {pi} (shape {tuple(p.shape)})"
                    if _dtensor.is_dtensor(p) and torch.distributed.is_initialized():
                        loc += f" on rank {torch.distributed.get_rank()}"
                elif any(_dtensor.is_dtensor(g) for _, gs in collected for g in gs):
                    loc = " on another rank"
                raise NonFiniteGradientError(
                    f"{type(self).__name__}: non-finite gradient (NaN or Inf){loc}; the step was not "
                    "applied and the weights are unchanged. Check the loss for overflow, lower the "
                    "learning rate, or pass nonfinite='skip' to skip such steps."
                )
        for group, (params, grads) in zip(self.param_groups, collected):
            if params:
                self._step_group(group, params, grads)

    def _prepare_states(self, group: dict[str, Any], params: list[Tensor]) -> list[dict[str, Any]]:
        states = []
        keys = self.state_keys
        for p in params:
            state = self._ensure_state(p, group)
            if state["step"] == 0:
                # state keys that depend on another group's settings (amsgrad in a later group)
                for key in keys:
                    if key not in state:
                        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            states.append(state)
        return states

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = self._prepare_states(group, params)
        # DTensor parameters (FSDP2): the elementwise update runs on the local shards, in place
        local = _dtensor.local
        params = [local(p) for p in params]
        grads = [local(g) for g in grads]
        keys = self.state_keys
        foreach = group["foreach"] is None or group["foreach"]
        fused = foreach and bool(group.get("fused")) and self.elementwise
        if group["maximize"] and not fused:  # the fused update negates inside its kernels
            grads = torch._foreach_neg(grads)
        if not foreach:
            for p, g, s in zip(params, grads, states):
                self._update(group, [p], [g], {k: [local(s[k])] for k in keys}, s["step"], LOOP_OPS)
            return
        buckets = group_by_key(len(params), lambda i: self._group_key(params[i], states[i]))
        for idx in buckets.values():
            ps = [params[i] for i in idx]
            gs = [grads[i] for i in idx]
            st = {k: [local(states[i][k]) for i in idx] for k in keys}
            step = states[idx[0]]["step"]
            if fused:
                _compiled.fused_update(self, group, ps, gs, st, step, group["maximize"])
            elif self.elementwise and self.block_numel:
                for bp, bg, bst in _blocks(ps, gs, st, self.block_numel):
                    self._update(group, bp, bg, bst, step, FOREACH_OPS)
            else:
                self._update(group, ps, gs, st, step, FOREACH_OPS)

    # -- checkpoints ---------------------------------------------------------------------------

    #: top-level key of :meth:`state_dict` naming the optimizer class (checked at load)
    STATE_DICT_CLASS_KEY = "lit_optim_optimizer"

    def state_dict(self) -> dict[str, Any]:
        self._drop_stale_state()
        sd = super().state_dict()
        sd[self.STATE_DICT_CLASS_KEY] = type(self).__name__
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, after checking that ``state_dict`` was saved
        by this optimizer class with this state layout: the class recorded in it (when present),
        every hyperparameter of each group, every state key of each parameter and the shapes of its
        state tensors. A mismatch raises ``ValueError`` naming the optimizer, the parameter and what
        is wrong, before anything is loaded."""
        self._validate_state_dict(state_dict)
        sd = {k: v for k, v in state_dict.items() if k != self.STATE_DICT_CLASS_KEY}
        given = {
            _dtensor.local(v).data_ptr()
            for st in state_dict["state"].values()
            if isinstance(st, dict)
            for v in st.values()
            if isinstance(v, Tensor) and _dtensor.local(v).numel()
        }
        super().load_state_dict(sd)
        # torch keeps the given tensors when device and dtype already match: the optimizer would then
        # share (and step) the caller's state dict, e.g. another optimizer's live state
        for st in self.state.values():
            for k, v in st.items():
                if isinstance(v, Tensor) and _dtensor.local(v).numel() and _dtensor.local(v).data_ptr() in given:
                    st[k] = v.clone()
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._ensure_state(p, group)

    def _validate_state_dict(self, state_dict: Any) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(
                f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups' (from optimizer.state_dict()), "
                f"got {type(state_dict).__name__}"
                + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else "")
            )
        saved_cls = state_dict.get(self.STATE_DICT_CLASS_KEY)
        if saved_cls is not None and saved_cls != name:
            raise ValueError(f"{name}.load_state_dict: the state dict was saved by {saved_cls}, not by {name}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"{name}.load_state_dict: the state dict has {len(groups)} parameter groups, the optimizer "
                f"{len(self.param_groups)}"
            )
        # torch.optim adds "differentiable" to self.defaults in __setstate__; "fused" is new: state dicts
        # saved before it existed load
        required = set(self.defaults) - {"fused", "differentiable", "capturable"}
        saved_state = state_dict["state"]
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            missing = sorted(required - set(saved))
            if missing:
                raise ValueError(
                    f"{name}.load_state_dict: param group {gi} of the state dict lacks the hyperparameters {missing} "
                    f"of {name}; it was saved by another optimizer (its keys: {sorted(k for k in saved if k != 'params')})"
                )
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{name}.load_state_dict: param group {gi} has {len(saved['params'])} parameters in the state "
                    f"dict and {len(group['params'])} in the optimizer"
                )
            for pi, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                st = saved_state.get(pid)
                if st is None:
                    continue
                where = f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
                if not isinstance(st, dict):
                    raise ValueError(f"{name}.load_state_dict: the state of {where} is not a dict")
                cur = self.state.get(p, {})
                lacking = sorted(k for k in cur if k not in st)
                if lacking:
                    raise ValueError(
                        f"{name}.load_state_dict: the state of {where} lacks {lacking} "
                        f"(it has {sorted(st)}); it was saved by another optimizer or another configuration"
                    )
                for k, v in st.items():
                    c = cur.get(k)
                    if isinstance(v, Tensor) and isinstance(c, Tensor) and tuple(v.shape) != tuple(c.shape):
                        raise ValueError(
                            f"{name}.load_state_dict: state {k!r} of {where} has shape {tuple(v.shape)}, "
                            f"expected {tuple(c.shape)}"
                        )

    @staticmethod
    def state_list(states: list[dict[str, Any]], key: str) -> list[Tensor]:
        return [s[key] for s in states]

    def state_bytes(self) -> int:
        """Bytes held in tensors of the optimizer state (what ``benchmarks/memory.py`` reports)."""
        return optimizer_state_bytes(self)


def _blocks(
    params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]], block: int
):
    """Yield (params, grads, state) lists holding about ``block`` elements each. Tensors larger than
    a block are cut into contiguous slices when the parameter, its gradient and its state tensors
    are all contiguous; other tensors travel whole."""
    keys = list(state)
    cur_p: list[Tensor] = []
    cur_g: list[Tensor] = []
    cur_s: dict[str, list[Tensor]] = {k: [] for k in keys}
    size = 0

    def flush():
        nonlocal cur_p, cur_g, cur_s, size
        out = (cur_p, cur_g, cur_s)
        cur_p, cur_g, cur_s, size = [], [], {k: [] for k in keys}, 0
        return out

    for i, (p, g) in enumerate(zip(params, grads)):
        n = p.numel()
        tensors = [p, g] + [state[k][i] for k in keys]
        if n > block and all(t.is_contiguous() for t in tensors):
            flats = [t.view(-1) for t in tensors]
            for a in range(0, n, block):
                if cur_p:
                    yield flush()
                b = min(a + block, n)
                yield [flats[0][a:b]], [flats[1][a:b]], {k: [flats[2 + j][a:b]] for j, k in enumerate(keys)}
            continue
        cur_p.append(p)
        cur_g.append(g)
        for k in keys:
            cur_s[k].append(state[k][i])
        size += n
        if size >= block:
            yield flush()
    if cur_p:
        yield flush()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of the tensors in ``optimizer.state`` (each storage counted once); a DTensor
    (FSDP2) counts its local shard, the bytes this rank holds."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(v: Any) -> None:
        nonlocal total
        if isinstance(v, Tensor):
            v = _dtensor.local(v)
            key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
            if key not in seen and v.device.type != "meta":
                seen.add(key)
                total += v.untyped_storage().nbytes()
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)

    for st in optimizer.state.values():
        visit(st)
    return total


def apply_weight_decay(
    ops: TensorListOps,
    params: list[Tensor],
    grads: list[Tensor],
    lr: float,
    weight_decay: float,
    decoupled: bool,
) -> list[Tensor]:
    """Decoupled: ``p <- p * (1 - lr * wd)`` (AdamW). Coupled (L2): ``g <- g + wd * p``, returning new
    gradient tensors (the user's ``.grad`` is never modified)."""
    if weight_decay == 0.0:
        return grads
    if decoupled:
        ops.mul_(params, 1.0 - lr * weight_decay)
        return grads
    return ops.add(grads, params, alpha=weight_decay)


# last: _compiled imports FOREACH_OPS from this module
from . import _compiled
