"""The compiled (fused) update path: ``fused=True``.

Every elementwise optimizer writes its update once, as ``_update(group, params, grads, state, step,
ops)`` against a :class:`~lit_optim.optim._base.TensorListOps`. With ``fused=True`` the base runs
that same method inside one ``torch.compile``\\ d function per update rule, with a
:class:`FusedOps` in place of the ``torch._foreach_*`` kernels, so that Inductor fuses the whole
update of every tensor of a bucket into one pass over memory (C++/OpenMP kernels on CPU, Triton
kernels on CUDA). Nothing is written differently per optimizer.

How a changing learning rate avoids recompilation
    The function is compiled with ``dynamic=True``: the group's float hyperparameters (``lr``,
    ``betas``, ``eps``, ``weight_decay``, ...) and the integer ``step`` are traced as symbols, not
    burnt in as constants. The Python arithmetic of ``_update`` (bias corrections such as
    ``math.sqrt(1 - beta2**step) / (1 - beta1**step)``) is then evaluated by the compiled wrapper
    from the symbols at each call (on the host: no device synchronisation, no ``.item()``), and
    :class:`FusedOps` hands every scalar to the kernels as a 0-d tensor in the parameters' compute
    precision (``float32`` for 16-bit parameters), because Inductor would otherwise specialise a
    symbolic scalar passed to a ``torch._foreach_*`` op and recompile for every new value. Python
    branches on hyperparameters (``if weight_decay != 0``, Adan's ``if step == 1``) become guards:
    they recompile only when the branch taken changes.

One compiled function per update rule
    Each ``(optimizer class, method)`` gets its own compiled function (a distinct code object, so
    that its recompile budget is its own), shared by every instance and parameter group: the update
    runs on a stand-in object of the class rather than on the optimizer, since torch.compile guards
    on the identity of the objects a graph reads. On CPU every tensor is flattened to 1-D and a
    bucket is cut into lists of :data:`CHUNK_BY_DEVICE` ``["cpu"]`` tensors, so that one graph with
    symbolic sizes serves every list of every bucket (a graph over a whole 100-tensor bucket took
    minutes to compile there); on CUDA a bucket is one graph. A new graph is compiled only for a
    new structure (dtype, device, list length, which hyperparameter branches are taken).
    :func:`compile_report` lists the graphs compiled and the seconds spent compiling, per
    optimizer. A class that needs more than :data:`RECOMPILE_LIMIT` graphs falls back (below).

What stays outside the compiled function
    The non-finite check (before anything is written), state creation and the step counter,
    bucketing by device/dtype/step, and DTensor unwrapping (the compiled code sees the local
    shards as plain tensors) run in the base as on the multi-tensor path. ``maximize`` is applied
    inside (the negation fuses into the update instead of costing a pass over the gradients).
    The cache-blocked slicing of the multi-tensor path (``block_numel``) is not used: a fused
    kernel already reads each element once.

If compilation fails (no C++ compiler on CPU, no Triton on CUDA, an update Inductor cannot trace),
the step runs on the multi-tensor path, once with a :class:`FusedFallbackWarning` naming the error,
and that optimizer class stays on the multi-tensor path for the rest of the process.
"""

from __future__ import annotations

import importlib
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._base import FOREACH_OPS

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "FusedFallbackWarning",
    "FusedOps",
    "compile_report",
    "compiled_newton_schulz",
    "fused_update",
    "newton_schulz_iteration",
    "reset",
]


class FusedFallbackWarning(RuntimeWarning):
    """``fused=True`` could not compile an update; the step ran on the multi-tensor path."""


# ----------------------------------------------------------------------------- scalar handling

#: binary ops whose second operand may be a scalar; the scalar is passed as a list of 0-d tensors
_BINARY = frozenset({"mul", "div", "maximum", "minimum", "clamp_min", "clamp_max", "pow"})


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision scalars are applied in: float32 for 16-bit floats (torch's opmath type)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype if dtype.is_floating_point else torch.float32


def _is_scalar(x: Any) -> bool:
    return not isinstance(x, (Tensor, list, tuple)) and x is not None


def _scalar(v: Any, ref: Tensor, sink: list[Tensor]) -> Tensor:
    """``v`` (a number, possibly a traced symbol) as a 0-d tensor on ``ref``'s device. Built as
    ``zeros + v``: Inductor then keeps ``v`` a runtime input instead of specialising on its value.
    The tensor is also appended to ``sink``, which the compiled function returns: as a graph output
    it is computed once per call into a buffer, instead of being recomputed (``pow``, ``sqrt`` of
    the bias corrections) for every vector of every element loop."""
    if isinstance(v, Tensor):
        return v
    t = torch.zeros((), dtype=_compute_dtype(ref.dtype), device=ref.device) + v
    sink.append(t)
    return t


def _as_list(v: Any, xs: list[Tensor], sink: list[Tensor]) -> Any:
    if isinstance(v, (list, tuple)):
        return v
    t = _scalar(v, xs[0], sink)
    return [t] * len(xs)


def _is_one(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 1


def _fe(name: str) -> Callable[..., Any]:
    return getattr(torch, "_foreach_" + name)


def _call(sink: list[Tensor], name: str, xs: list[Tensor], *args: Any, **kwargs: Any) -> Any:
    """One :class:`TensorListOps` operation with its scalars turned into 0-d tensors."""
    inplace = name.endswith("_")
    base = name[:-1] if inplace else name
    if not xs:
        return None if inplace else []
    if base in ("addcmul", "addcdiv"):
        a, b = args[0], args[1]
        value = args[2] if len(args) > 2 else kwargs.get("value", 1)
        if _is_scalar(value) and not _is_one(value):
            # as torch's CPU kernels: self + value * t1 * t2 and self + value * t1 / t2
            a = torch._foreach_mul(a, _as_list(value, xs, sink))
        elif not _is_scalar(value):
            a = torch._foreach_mul(a, list(value) if not isinstance(value, Tensor) else list(value.unbind()))
        q = torch._foreach_mul(a, b) if base == "addcmul" else torch._foreach_div(a, b)
        if inplace:
            torch._foreach_add_(xs, q)
            return None
        return torch._foreach_add(xs, q)
    if base in ("add", "sub"):
        other = args[0]
        alpha = args[1] if len(args) > 1 else kwargs.get("alpha", 1)
        if _is_scalar(other):
            other = _as_list(other if _is_one(alpha) else other * alpha, xs, sink)
        elif not _is_one(alpha):
            other = torch._foreach_mul(other, _as_list(alpha, xs, sink))
        return _fe(name)(xs, other)
    if base == "lerp":
        end, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        if not _is_scalar(w):
            return _fe(name)(xs, end, w)
        # torch's lerp, written out so the weight can be a runtime scalar in compute precision:
        # w < 0.5: self + w * (end - self), else end - (end - self) * (1 - w)
        d = torch._foreach_sub(end, xs)
        if abs(w) < 0.5:
            out = torch._foreach_add(xs, torch._foreach_mul(d, _as_list(w, xs, sink)))
        else:
            out = torch._foreach_sub(end, torch._foreach_mul(d, _as_list(1.0 - w, xs, sink)))
        if inplace:
            torch._foreach_copy_(xs, out)
            return None
        return out
    if base in _BINARY and args and _is_scalar(args[0]):
        return _fe(name)(xs, _as_list(args[0], xs, sink), *args[1:], **kwargs)
    return _fe(name)(xs, *args, **kwargs)


class FusedOps:
    """The :class:`~lit_optim.optim._base.TensorListOps` interface seen by ``_update`` inside the
    compiled function: the same ``torch._foreach_*`` operations, with every scalar argument
    (``alpha=``, ``value=``, a lerp weight, a clamp bound, a factor) passed as a 0-d tensor so that
    new values do not recompile. Only meaningful inside ``torch.compile`` (eagerly it is correct
    but slower than the plain kernels).

    Deliberately not a subclass of ``TensorListOps``: every operation, including any that class
    implements as a method, must come through :func:`_call`. (``torch._foreach_mul_(xs, s)`` with
    a traced float ``s`` has been seen to bake the first value of ``s`` into an Inductor graph
    without a guard, torch 2.13.)"""

    __slots__ = ("sink",)
    #: like ``TensorListOps(True)``: the multi-tensor path
    foreach = True

    def __init__(self, sink: list[Tensor] | None = None) -> None:
        #: the 0-d scalar tensors made so far (returned by the compiled function)
        self.sink = [] if sink is None else sink

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)
        sink = self.sink

        def op(xs: list[Tensor], *args: Any, **kwargs: Any) -> Any:
            return _call(sink, name, xs, *args, **kwargs)

        return op


# ----------------------------------------------------------------------------- compiled functions

_lock = threading.Lock()
#: (optimizer class, method name, chunked, backend) -> compiled function
_RUNNERS: dict[tuple[Any, ...], Callable[..., Any]] = {}
#: optimizer classes whose compilation failed in this process (they run the multi-tensor path)
_BROKEN: dict[type, str] = {}
#: per optimizer class name: graphs compiled, seconds of the calls that compiled, calls
_STATS: dict[str, dict[str, float]] = {}
#: graphs one update rule may compile (torch's default limit is 8 per function; one rule here
#: serves every group, dtype and instance of a class). Past it the class falls back to the
#: multi-tensor path with a FusedFallbackWarning: an update that recompiles at every step (a
#: hyperparameter torch.compile cannot keep symbolic) then costs 16 compilations, not a run.
RECOMPILE_LIMIT = 16
#: torch.compile backend: "inductor" (the fused kernels); the tests also use "aot_eager", which
#: traces and guards exactly alike but runs the traced operations one by one (no C++/Triton
#: compilation)
BACKEND = "inductor"

#: Tensors per compiled call, by device type; 0: the whole bucket in one call.
#:
#: * CPU, 16: every tensor is flattened to 1-D and the bucket is cut into lists of 16 tensors
#:   (the last padded with scratch tensors), so that one graph with symbolic sizes serves every
#:   list of every bucket. On the 2-core development machine a graph over a whole GPT bucket
#:   (98 tensors) took 80-260 s to compile, one over 16 tensors 5-10 s; each extra call costs
#:   ~0.1-0.3 ms of guards and wrappers (16 steps 3-8% faster than 8 at ~30M parameters, 32 no
#:   faster than 16 and twice the compile time).
#: * CUDA and others, 0: one graph per bucket, whose kernels Inductor fuses horizontally; one
#:   launch sequence per step matters more there than compile time.
CHUNK_BY_DEVICE: dict[str, int] = {"cpu": 16}


def chunk_size(device: torch.device) -> int:
    return CHUNK_BY_DEVICE.get(device.type, 0)


#: plain attribute values of an optimizer copied onto its stand-in before a compiled call
_PLAIN = (bool, int, float, str, type(None))


def _stand_in(cls: type) -> Any:
    """One object per optimizer class that ``_update`` runs on inside the compiled function, in
    place of the optimizer: torch.compile guards on the identity of the objects a graph reads, so
    passing each optimizer would compile a graph per instance. It is an instance of a subclass of
    the optimizer class made without running any constructor (so ``isinstance`` and ``super()``
    work in ``_update``); :func:`_sync` copies the optimizer's plain instance attributes (numbers,
    strings, flags: AdaHessian's ``_hessian_step``) onto it before each call."""
    shell_cls = type(f"Fused{cls.__name__}", (cls,), {"__module__": __name__})
    return object.__new__(shell_cls)


def _sync(shell: Any, opt: Any) -> None:
    d = shell.__dict__
    for k, v in opt.__dict__.items():
        if isinstance(v, _PLAIN) and d.get(k, _MISSING) is not v:
            d[k] = v


_MISSING = object()


def _make_runner(cls: type, method: str, chunked: bool, backend: str) -> Callable[..., Any]:
    def run(shell, hp, params, grads, state, step, maximize):
        if maximize:
            grads = torch._foreach_neg(grads)
        scalars = []
        getattr(shell, method)(hp, params, grads, state, step, FusedOps(scalars))
        return scalars

    # a code object of its own: torch.compile keeps compiled graphs, and counts recompilations,
    # per code object
    name = f"fused_{cls.__name__}_{method.lstrip('_')}{'_chunked' if chunked else ''}"
    code = run.__code__.replace(co_name=name, co_qualname=name)
    fn = types.FunctionType(code, run.__globals__, name, run.__defaults__, run.__closure__)
    if backend != "inductor":
        compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=backend)
    else:
        options = dict(CHUNKED_INDUCTOR_OPTIONS) if chunked else None
        compiled = torch.compile(fn, fullgraph=True, dynamic=True, options=options)
    shell = _stand_in(cls)

    def call(opt: Any, *args: Any) -> Any:
        _sync(shell, opt)
        return compiled(shell, *args)

    return call


#: Inductor options of the chunked (symbolic-size) graphs
CHUNKED_INDUCTOR_OPTIONS: dict[str, Any] = {"cpp.enable_loop_tail_vec": False}


def _runner(cls: type, method: str, chunked: bool) -> Callable[..., Any]:
    key = (cls, method, chunked, BACKEND)
    fn = _RUNNERS.get(key)
    if fn is None:
        with _lock:
            fn = _RUNNERS.get(key)
            if fn is None:
                fn = _RUNNERS[key] = _make_runner(cls, method, chunked, BACKEND)
    return fn


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _forget_float_specializations() -> None:
    """torch 2.13 keeps the names of the traced floats it had to specialise (``TensorifyState``)
    from one compilation to the next, and names are reused: after a graph for
    ``weight_decay == 0`` (where the float is specialised to 0), every later compilation
    specialised ``weight_decay`` too, recompiling for each new value. The set only matters within
    one compilation's restarts, so it is emptied before each compiled call."""
    try:
        from torch._dynamo.symbolic_convert import TensorifyState
    except ImportError:  # pragma: no cover - other torch versions
        return
    if not TensorifyState.empty():
        TensorifyState.clear()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# scratch tensors that pad the last list of a bucket: (device, dtype, tensors per slot, numel) ->
# one list of tensors per padding slot (never aliased: the compiled code writes them in place)
_PADS: dict[tuple[Any, ...], list[list[Tensor]]] = {}


def _pads(ref: Tensor, per_slot: int, numel: int, count: int) -> list[list[Tensor]]:
    key = (ref.device, ref.dtype, per_slot, numel)
    have = _PADS.setdefault(key, [])
    while len(have) < count:
        have.append([torch.zeros(numel, dtype=ref.dtype, device=ref.device) for _ in range(per_slot)])
    return have[:count]


#: flat aliases of parameters and state tensors, reused from step to step: id -> (weakref, alias)
_FLAT: dict[int, tuple[weakref.ref, Tensor]] = {}


def _flat(t: Tensor, keep: bool) -> Tensor:
    """A 1-D tensor on ``t``'s (contiguous) memory, made with ``set_`` rather than ``view``: a view
    carries its base, and torch.compile guards on the base's shape, which differs from list to
    list. Not tracked by autograd (like ``detach``)."""
    if keep:
        hit = _FLAT.get(id(t))
        if hit is not None and hit[0]() is t:
            a = hit[1]
            if a.data_ptr() == t.data_ptr() and a.numel() == t.numel() and a.dtype == t.dtype:
                return a
    a = t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))
    if keep:
        key = id(t)
        _FLAT[key] = (weakref.ref(t, lambda _r, key=key: _FLAT.pop(key, None)), a)
    return a


def _chunks(
    params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]], k: int
) -> list[tuple[list[Tensor], list[Tensor], dict[str, list[Tensor]]]]:
    """The bucket as lists of exactly ``k`` tensors: each tensor flattened to 1-D (a view; the
    gradient is reshaped, a copy only when it is not contiguous), empty tensors dropped (their
    update is empty), one-element tensors in lists of their own (torch.compile specialises size
    1), the last lists padded with scratch tensors of the same size class."""
    keys = list(state)
    rows: dict[bool, list[list[Tensor]]] = {False: [], True: []}
    for i, (p, g) in enumerate(zip(params, grads)):
        n = p.numel()
        if n == 0:
            continue
        written = [p] + [state[key][i] for key in keys]
        if all(t.is_contiguous() for t in written):
            row = [_flat(p, True), _flat(g if g.is_contiguous() else g.contiguous(), False)]
            row += [_flat(t, True) for t in written[1:]]
        else:
            row = [p.detach(), g.detach()] + [t.detach() for t in written[1:]]
        rows[n == 1].append(row)
    out = []
    for single, rs in rows.items():
        if not rs:
            continue
        missing = -len(rs) % k
        if missing:
            rs = rs + _pads(rs[0][0], 2 + len(keys), 1 if single else 2, missing)
        for a in range(0, len(rs), k):
            part = rs[a : a + k]
            out.append(([r[0] for r in part], [r[1] for r in part], {key: [r[2 + j] for r in part] for j, key in enumerate(keys)}))
    return out


def fused_update(
    opt: Any,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, list[Tensor]],
    step: int,
    maximize: bool,
    method: str = "_update",
) -> None:
    """Run ``opt.<method>(group, params, grads, state, step, ops)`` compiled. ``grads`` are the
    user's gradients (not yet negated for ``maximize``); every list holds plain (local) tensors
    sharing device and dtype, and the update must be elementwise."""
    cls = type(opt)
    if cls in _BROKEN or not params:
        _eager(opt, group, params, grads, state, step, maximize, method)
        return
    k = chunk_size(params[0].device)
    parts = _chunks(params, grads, state, k) if k else [(params, grads, state)]
    hp = _hyperparameters(group)
    fn = _runner(cls, method, bool(k))
    st = _STATS.setdefault(cls.__name__, {"graphs": 0, "compile_s": 0.0, "calls": 0})
    j = 0
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), _no_duck_shapes():
            for j, (ps, gs, ss) in enumerate(parts):
                before = _graphs()
                _forget_float_specializations()
                t0 = time.perf_counter()
                fn(opt, hp, ps, gs, ss, step, maximize)
                st["calls"] += 1
                if _graphs() > before:
                    st["graphs"] += _graphs() - before
                    st["compile_s"] += time.perf_counter() - t0
    except (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError) as e:  # type: ignore[attr-defined]
        # raised while tracing or compiling, before list j was updated: the lists not yet updated
        # take the multi-tensor path
        text = str(e).strip()
        msg = text.splitlines()[0] if text else type(e).__name__
        _BROKEN[cls] = msg
        warnings.warn(
            f"{cls.__name__}(fused=True): torch.compile failed ({type(e).__name__}: {msg}); running the "
            "multi-tensor (foreach) update instead for this optimizer class",
            FusedFallbackWarning,
            stacklevel=4,
        )
        for ps, gs, ss in parts[j:]:
            _eager(opt, group, ps, gs, ss, step, maximize, method)


def _no_duck_shapes() -> Any:
    """Every tensor size its own symbol: without it, two lists whose tensors are equal in size at
    different positions would compile different graphs."""
    from torch.fx.experimental import _config as fx_config

    return fx_config.patch(use_duck_shape=False)


def _eager(opt, group, params, grads, state, step, maximize, method) -> None:
    if not params:
        return
    if maximize:
        grads = torch._foreach_neg(grads)
    getattr(opt, method)(group, params, grads, state, step, FOREACH_OPS)


def compile_report() -> dict[str, dict[str, float]]:
    """Per optimizer class name: ``graphs`` compiled by the fused path in this process,
    ``compile_s`` (wall seconds of the calls that compiled, i.e. compile time plus one call) and
    ``calls`` (compiled calls: one per list of tensors); ``fallback`` when compilation failed."""
    out = {k: dict(v) for k, v in _STATS.items()}
    for cls, msg in _BROKEN.items():
        out.setdefault(cls.__name__, {"graphs": 0, "compile_s": 0.0, "calls": 0})["fallback"] = msg  # type: ignore[assignment]
    return out


def reset() -> None:
    """Forget every compiled function, statistic and fallback (``torch._dynamo.reset()`` too)."""
    with _lock:
        _RUNNERS.clear()
        _BROKEN.clear()
        _STATS.clear()
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- Newton-Schulz

#: Whether :func:`compiled_newton_schulz` compiles, by device type. CPU: no. On the 2-core
#: development machine the compiled iteration ran as fast as the eager one (bf16 and fp32,
#: (8, 512, 512) to (8, 2048, 512) stacks: every difference within +-4%, i.e. noise), since the
#: iteration is matrix products that stay oneDNN calls and the elementwise work between them is
#: already folded into ``baddbmm``'s ``beta``/``alpha``. CUDA: yes (Inductor fuses the
#: normalisation and the casts around the cuBLAS calls); to be confirmed by scripts/gpu_check.sh.
COMPILE_NS_BY_DEVICE: dict[str, bool] = {"cuda": True}

_NS_COMPILED: dict[Any, Callable[..., Any]] = {}


def _ns_module() -> Any:
    # the package re-exports a function of the same name: import the module by its full name
    return importlib.import_module("lit_optim.functional.newton_schulz")


def newton_schulz_iteration(device: torch.device | str) -> Callable[..., Any]:
    """The Newton-Schulz iteration of :mod:`lit_optim.functional.newton_schulz` (its
    ``_iterate_owned(x, schedule, steps, eps, method)``, which normalises and iterates a stack of
    matrices in place) for ``device``: compiled with ``torch.compile(dynamic=False)`` where
    :data:`COMPILE_NS_BY_DEVICE` says so (one graph per stack shape, dtype and schedule), the
    eager function elsewhere."""
    ns = _ns_module()

    eager = ns.__dict__.get("_eager_iterate_owned", ns._iterate_owned)
    if not COMPILE_NS_BY_DEVICE.get(torch.device(device).type, False):
        return eager
    fn = _NS_COMPILED.get(eager)
    if fn is None:
        fn = _NS_COMPILED[eager] = torch.compile(eager, dynamic=False)
    return fn


class compiled_newton_schulz:
    """Context manager: inside it, :func:`lit_optim.functional.newton_schulz.orthogonalize` and
    ``newton_schulz`` (and so every orthogonalized optimizer) iterate with the compiled iteration
    for ``device`` (see :func:`newton_schulz_iteration`). Used by the benchmarks; an optimizer can
    wrap its orthogonalization in it."""

    def __init__(self, device: torch.device | str = "cuda", force: bool = False):
        self.device = torch.device(device)
        self.force = force
        self._prev: Any = None

    def __enter__(self) -> Self:
        ns = _ns_module()

        eager = ns.__dict__.get("_eager_iterate_owned", ns._iterate_owned)
        ns._eager_iterate_owned = eager
        self._prev = ns._iterate_owned
        if self.force:
            fn = _NS_COMPILED.get(eager)
            if fn is None:
                fn = _NS_COMPILED[eager] = torch.compile(eager, dynamic=False)
        else:
            fn = newton_schulz_iteration(self.device)
        ns._iterate_owned = fn
        return self

    def __exit__(self, *exc: object) -> None:
        ns = _ns_module()

        ns._iterate_owned = self._prev
