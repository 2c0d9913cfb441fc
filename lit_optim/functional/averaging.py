"""Trainer-free weight averaging: several running averages of one model at once, and the
averaging of several runs' weights (DiWA).

* :class:`MultiEMA` keeps K running averages (EMA with K decays, or one uniform SWA average) of a
  module's parameters and buffers. The update maths is torch's own
  (:func:`torch.optim.swa_utils.get_ema_multi_avg_fn` / :func:`~torch.optim.swa_utils.get_swa_multi_avg_fn`,
  one ``_foreach_lerp_`` per average and per device/dtype group). Unlike
  :class:`torch.optim.swa_utils.AveragedModel` it keeps no module copy: only tensors, each a copy
  of the *local* tensor of a parameter. Under FSDP2 / DTensor sharding every rank therefore
  averages its own shard and nothing is gathered.
* :func:`average_state_dicts` averages the weights of several fine-tuned runs (Diverse Weight
  Averaging, Ramé et al., NeurIPS 2022, arXiv:2205.09739) after checking that they have the same
  structure and share an initialization (:func:`init_fingerprint`, or a weight-similarity test).

The Lightning shell is :class:`lit_optim.callbacks.WeightAveragingCallback`; a Hugging Face
``TrainerCallback`` can drive :class:`MultiEMA` the same way (``update()`` after each optimizer
step, ``swapped(i)`` around evaluation, ``state_dict()`` in checkpoints).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn, get_swa_multi_avg_fn

__all__ = [
    "AverageIndexError",
    "MultiEMA",
    "average_state_dicts",
    "check_shared_init",
    "init_fingerprint",
    "resolve_average",
    "weight_similarity",
]

_KINDS = ("ema", "uniform")


class AverageIndexError(IndexError, ValueError):
    """An average index out of range (both an ``IndexError`` and a ``ValueError``)."""


def resolve_average(which: float | str | None, decays: Sequence[float], labels: Sequence[str]) -> int:
    """Position of an average named by an index (negative counts from the end), a decay value
    (``0.999``) or a label (``"ema_0.999"``, ``"uniform"``); None names the first average.

    A float that is not one of the decays but a whole number is read as an index: configuration
    files and command-line parsers turn an index into a float (jsonargparse parses the ``0`` of a
    ``float | str`` argument as ``0.0``), and a decay is never a whole number other than 0."""
    n = len(labels)
    if which is None:
        return 0
    if isinstance(which, bool):
        raise TypeError(f"average must be an index, a decay or a label, got {which!r}")
    if isinstance(which, float):
        if which in decays:
            return list(decays).index(which)
        if not which.is_integer():
            raise ValueError(f"no average with decay {which}; decays are {tuple(decays)}")
        if not -n <= which < n:
            raise ValueError(
                f"no average with decay {which} and no average index {int(which)}; decays are {tuple(decays)}"
            )
        which = int(which)
    if isinstance(which, int):
        if not -n <= which < n:
            raise AverageIndexError(f"average index must be in [0, {n}), got {which}")
        return which % n
    if isinstance(which, str):
        if which in labels:
            return list(labels).index(which)
        raise ValueError(f"no average labelled {which!r}; labels are {list(labels)}")
    raise TypeError(f"average must be an index, a decay or a label, got {type(which).__name__}")


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t: Tensor) -> Tensor:
    """The tensor this rank owns: a DTensor's local shard (an alias, writes go through), else ``t``."""
    t = t.detach()
    return t.to_local() if _is_dtensor(t) else t


def _check_decays(decays: Any) -> tuple[float, ...]:
    if isinstance(decays, (int, float)) and not isinstance(decays, bool):
        decays = (decays,)
    if not isinstance(decays, (tuple, list)) or len(decays) == 0:
        raise TypeError(f"decays must be a non-empty tuple of floats in [0, 1), got {decays!r}")
    out = []
    for i, d in enumerate(decays):
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            raise TypeError(f"decays[{i}] must be a float in [0, 1), got {type(d).__name__} {d!r}")
        d = float(d)
        if not (0.0 <= d < 1.0) or not math.isfinite(d):
            raise ValueError(f"decays[{i}] must be in [0, 1), got {d}")
        out.append(d)
    if len(set(out)) != len(out):
        raise ValueError(f"decays must be distinct, got {tuple(out)}")
    return tuple(out)


class MultiEMA:
    r"""Several running averages of one module's weights, updated together.

    For ``kind="ema"`` average :math:`k` with decay :math:`\beta_k` follows torch's
    :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`:

    .. math::
        \bar\theta^{(k)}_1 = \theta_1, \qquad
        \bar\theta^{(k)}_n = \beta_k\,\bar\theta^{(k)}_{n-1} + (1-\beta_k)\,\theta_n

    where :math:`\theta_n` are the weights at the :math:`n`-th call of :meth:`update`.
    (EMA of SGD iterates: Li & Gu, arXiv:2502.14123.) ``kind="uniform"`` keeps one equal-weight
    (SWA, Izmailov et al., arXiv:1803.05407) average
    :math:`\bar\theta_n = \frac1n\sum_{i\le n}\theta_i`. Floating buffers (BatchNorm running
    statistics) are averaged like parameters when ``use_buffers=True``; integer buffers
    (``num_batches_tracked``) take the latest value.

    Args:
        module: the model (an ``nn.Module``), or an iterable of tensors to track.
        decays: EMA decays, each in [0, 1) (default ``(0.999,)``). Ignored-forbidden for ``uniform``.
        kind: ``"ema"`` (one average per decay) or ``"uniform"`` (one SWA average).
        device: where to keep the averages (e.g. ``"cpu"`` to save accelerator memory); default:
            next to each tensor.
        dtype: floating dtype of the averages (e.g. ``torch.float32`` for a bf16 model, where an
            EMA with decay 0.9999 would otherwise not move); default: each tensor's dtype.
        use_buffers: also average the module's buffers (default True). When False the buffers
            are not tracked: evaluation with an average uses the model's current buffers.

    Sharded models: each tracked tensor that is a DTensor (FSDP2, tensor parallel) is averaged
    through its local shard, so memory and work per rank are ``1/world_size`` of the model and no
    collective runs. :meth:`state_dict` returns local shards (see ``dtensor_specs`` to rebuild
    DTensors).
    """

    def __init__(
        self,
        module: nn.Module | Iterable[Tensor],
        decays: Sequence[float] | float | None = None,
        kind: str = "ema",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        use_buffers: bool = True,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {list(_KINDS)}, got {kind!r}")
        if kind == "uniform":
            if decays is not None:
                raise ValueError(f"decays are only used with kind='ema'; kind='uniform' got decays={decays!r}")
            self.decays: tuple[float, ...] = ()
        else:
            self.decays = _check_decays((0.999,) if decays is None else decays)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.kind = kind
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.use_buffers = bool(use_buffers)

        if isinstance(module, nn.Module):
            self.module: nn.Module | None = module
            self._fixed: list[Tensor] | None = None
            self.names = [n for n, _ in module.named_parameters()]
            n_params = len(self.names)
            if self.use_buffers:
                self.names += [n for n, _ in module.named_buffers()]
            self._is_buffer = [i >= n_params for i in range(len(self.names))]
        else:
            tensors = list(module)
            if not all(isinstance(t, Tensor) for t in tensors):
                raise TypeError("module must be an nn.Module or an iterable of tensors")
            self.module = None
            self._fixed = tensors
            self.names = [str(i) for i in range(len(tensors))]
            self._is_buffer = [False] * len(tensors)

        current = self._tracked()
        self.dtensor_specs: list[tuple[Any, Any, torch.Size, tuple[int, ...]] | None] = [
            (t.device_mesh, tuple(t.placements), t.shape, t.stride()) if _is_dtensor(t) else None for t in current
        ]
        locals_ = [_local(t) for t in current]
        self._float = [t.is_floating_point() or t.is_complex() for t in locals_]
        self.averages: list[list[Tensor]] = [
            [self._new_average(t, f) for t, f in zip(locals_, self._float)] for _ in range(self.num_averages)
        ]
        self.n_averaged = 0
        self._fns = [get_ema_multi_avg_fn(d) for d in self.decays] if kind == "ema" else [get_swa_multi_avg_fn()]
        self._groups = self._build_groups(locals_)
        self._stash: list[Tensor] | None = None
        self._loaded: int | None = None
        self._aliases: list[list[str]] | None = None

    # ------------------------------------------------------------------ bookkeeping
    @property
    def num_averages(self) -> int:
        return len(self.decays) if self.kind == "ema" else 1

    @property
    def labels(self) -> list[str]:
        """Names of the averages: ``ema_0.999`` per decay, or ``uniform``."""
        return [f"ema_{d:g}" for d in self.decays] if self.kind == "ema" else ["uniform"]

    def index(self, which: float | str | None) -> int:
        """Position of an average given as an index, a decay value or a label (None: the first);
        see :func:`resolve_average`."""
        return resolve_average(which, self.decays if self.kind == "ema" else (), self.labels)

    def _new_average(self, t: Tensor, is_float: bool) -> Tensor:
        dtype = self.dtype if (is_float and self.dtype is not None and not t.is_complex()) else t.dtype
        device = self.device if self.device is not None else t.device
        return t.detach().to(device=device, dtype=dtype, copy=True)

    def _tracked(self) -> list[Tensor]:
        if self._fixed is not None:
            return self._fixed
        assert self.module is not None
        out = list(self.module.parameters())
        if self.use_buffers:
            out += list(self.module.buffers())
        if len(out) != len(self.names):
            raise RuntimeError(
                f"the module now has {len(out)} tracked tensors, {len(self.names)} when the averages were created; "
                "create the averages after the model is complete (and sharded)"
            )
        return out

    def state_dict_keys(self) -> list[list[str]]:
        """For each tracked tensor, the module ``state_dict()`` keys that hold it (tied weights have
        several; non-persistent buffers none). Names are used when averaging plain tensors."""
        if self._aliases is None:
            if self.module is None:
                self._aliases = [[n] for n in self.names]
            else:
                position = {id(t): i for i, t in enumerate(self._tracked())}
                aliases: list[list[str]] = [[] for _ in self.names]
                for key, v in self.module.state_dict(keep_vars=True).items():
                    i = position.get(id(v))
                    if i is not None:
                        aliases[i].append(key)
                self._aliases = aliases
        return self._aliases

    def _current(self) -> list[Tensor]:
        # plain tensors are used as they are (reads and in-place writes happen under no_grad);
        # DTensors through their local shard
        specs = self.dtensor_specs
        return [t.to_local() if specs[i] is not None else t for i, t in enumerate(self._tracked())]

    def _build_groups(self, locals_: list[Tensor]):
        """Indices of floating tensors grouped by (source device/dtype, average device/dtype)."""
        groups: dict[tuple, list[int]] = {}
        for i, (t, f) in enumerate(zip(locals_, self._float)):
            if not f:
                continue
            a = self.averages[0][i] if self.averages else t
            key = (t.device, t.dtype, a.device, a.dtype)
            groups.setdefault(key, []).append(i)
        out = []
        for (sdev, sdt, adev, adt), idx in groups.items():
            avgs = [[self.averages[k][i] for i in idx] for k in range(self.num_averages)]
            out.append((idx, (sdev, sdt) != (adev, adt), adev, adt, avgs))
        return out

    # ------------------------------------------------------------------ averaging
    @torch.no_grad()
    def update(self) -> None:
        """Fold the module's current weights into every average (the first call copies them)."""
        current = self._current()
        self._check_shapes(current)
        if self.n_averaged == 0:
            for avg in self.averages:
                for a, t in zip(avg, current):
                    a.copy_(t)
        else:
            for idx, convert, adev, adt, avgs in self._groups:
                src = [current[i] for i in idx]
                if convert:  # one transfer/cast shared by all averages
                    src = [t.to(device=adev, dtype=adt) for t in src]
                for fn, dst in zip(self._fns, avgs):
                    fn(dst, src, self.n_averaged)
            for i, f in enumerate(self._float):
                if not f:
                    for avg in self.averages:
                        avg[i].copy_(current[i])
        self.n_averaged += 1

    def update_parameters(self, model: nn.Module | None = None) -> None:
        """:class:`~torch.optim.swa_utils.AveragedModel`-style alias of :meth:`update`."""
        if model is not None and self.module is not None and model is not self.module:
            raise ValueError("update_parameters() got a different module than the one being averaged")
        self.update()

    def _check_shapes(self, current: list[Tensor]) -> None:
        ref = self.averages[0]
        if all(a.shape == t.shape for a, t in zip(ref, current)):
            return
        for name, a, t in zip(self.names, ref, current):
            if a.shape != t.shape:
                raise RuntimeError(
                    f"tensor {name!r} changed shape from {tuple(a.shape)} to {tuple(t.shape)} since the averages "
                    "were created"
                )

    # ------------------------------------------------------------------ using an average
    @torch.no_grad()
    def swap_in(self, which: float | str | None = None) -> None:
        """Write average ``which`` into the module, keeping its own weights aside for :meth:`swap_out`.

        Before the first :meth:`update` the average is undefined and the module keeps its weights.
        Calling again with another average switches without touching the kept weights."""
        k = self.index(which)
        current = self._current()
        if self._stash is None:
            self._stash = [t.clone() for t in current]
        if self.n_averaged == 0:
            for t, s in zip(current, self._stash):
                t.copy_(s)
        else:
            for t, a in zip(current, self.averages[k]):
                t.copy_(a)
        self._loaded = k

    @torch.no_grad()
    def swap_out(self) -> None:
        """Give the module its own weights back (no-op if nothing is swapped in)."""
        if self._stash is None:
            return
        for t, s in zip(self._current(), self._stash):
            t.copy_(s)
        self._stash = None
        self._loaded = None

    @property
    def swapped_in(self) -> int | None:
        """Index of the average now in the module, or None."""
        return self._loaded

    @contextlib.contextmanager
    def swapped(self, which: float | str | None = None) -> Iterator[None]:
        """``with ema.swapped(1): evaluate(model)``: average 1 in the module inside the block."""
        self.swap_in(which)
        try:
            yield
        finally:
            self.swap_out()

    def stashed(self) -> list[Tensor] | None:
        """The module's own (raw) local tensors while an average is swapped in, else None."""
        return self._stash

    def is_finite(self, which: float | str | None = None) -> bool:
        k = self.index(which)
        return all(bool(torch.isfinite(a).all()) for a, f in zip(self.averages[k], self._float) if f)

    @torch.no_grad()
    def copy_to(self, which: float | str | None = None) -> None:
        """Write average ``which`` into the module for good (e.g. at the end of training).

        Raises ``ValueError`` (and writes nothing) if the average holds NaN/Inf, or if no update
        has happened yet."""
        k = self.index(which)
        if self.n_averaged == 0:
            raise ValueError("no average to write: update() was never called")
        if not self.is_finite(k):
            raise ValueError(f"average {self.labels[k]} holds NaN/Inf values; refusing to write it into the weights")
        self.swap_out()
        for t, a in zip(self._current(), self.averages[k]):
            t.copy_(a)

    def averaged_state_dict(self, which: float | str | None = None) -> dict[str, Tensor]:
        """The module's ``state_dict()`` with average ``which`` in place of the tracked tensors.

        Under sharding the tracked entries hold this rank's local shards."""
        if self.module is None:
            k = self.index(which)
            return {n: a.detach().clone() for n, a in zip(self.names, self.averages[k])}
        k = self.index(which)
        sd = {
            n: (_local(v).detach().clone() if isinstance(v, Tensor) else v) for n, v in self.module.state_dict().items()
        }
        if self.n_averaged == 0:
            return sd
        # tied weights (two state_dict keys, one parameter) both get the average
        for i, keys in enumerate(self.state_dict_keys()):
            for n in keys:
                sd[n] = self.averages[k][i].detach().clone().to(device=sd[n].device, dtype=sd[n].dtype)
        return sd

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "decays": list(self.decays),
            "n_averaged": self.n_averaged,
            "names": list(self.names),
            "state_dict_keys": [list(k) for k in self.state_dict_keys()],
            "averages": [dict(zip(self.names, avg)) for avg in self.averages],
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != self.kind or tuple(state.get("decays", ())) != self.decays:
            raise ValueError(
                f"saved averages are kind={state.get('kind')!r} decays={tuple(state.get('decays', ()))}, "
                f"these are kind={self.kind!r} decays={self.decays}"
            )
        avgs = state["averages"]
        if len(avgs) != self.num_averages:
            raise ValueError(f"saved state has {len(avgs)} averages, expected {self.num_averages}")
        for k, saved in enumerate(avgs):
            missing = [n for n in self.names if n not in saved]
            if missing:
                raise ValueError(f"saved average {self.labels[k]} lacks tensors {missing[:5]}")
            for n, a in zip(self.names, self.averages[k]):
                v = saved[n]
                if _is_dtensor(v):
                    v = v.to_local()
                if tuple(v.shape) != tuple(a.shape):
                    raise ValueError(
                        f"saved average {self.labels[k]}: tensor {n!r} has shape {tuple(v.shape)}, "
                        f"expected {tuple(a.shape)}"
                    )
                a.copy_(v)
        self.n_averaged = int(state["n_averaged"])


# ---------------------------------------------------------------------------------------- DiWA


def _tensor_digest(t: Tensor) -> str:
    t = _local(t)
    if t.device.type == "meta":
        return "meta"
    data = t.detach().cpu().contiguous().reshape(-1)  # 1-D: a 0-dim tensor cannot be viewed as bytes
    h = hashlib.sha1()
    h.update(f"{data.dtype}{tuple(t.shape)}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()[:16]


def init_fingerprint(state: nn.Module | Mapping[str, Tensor]) -> dict[str, str]:
    """Short per-tensor digests of a model's weights (name -> 16 hex chars).

    Recorded at the start of training by :class:`~lit_optim.callbacks.WeightAveragingCallback`
    so that :func:`average_state_dicts` can verify that runs share an initialization exactly."""
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    return {k: _tensor_digest(v) for k, v in sd.items() if isinstance(v, Tensor)}


def _matrix_keys(sd: Mapping[str, Tensor]) -> list[str]:
    return [k for k, v in sd.items() if isinstance(v, Tensor) and v.is_floating_point() and v.dim() >= 2]


def weight_similarity(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Cosine similarity between two models' weight matrices (tensors with >= 2 dims, concatenated).

    Independently initialised networks give values near 0 (random matrices are nearly
    orthogonal); networks fine-tuned from one initialization stay close to 1."""
    keys = [k for k in _matrix_keys(a) if k in b]
    if not keys:
        keys = [k for k, v in a.items() if isinstance(v, Tensor) and v.is_floating_point() and k in b]
    if not keys:
        raise ValueError("the two state dicts share no floating tensors")
    dot = na = nb = 0.0
    for k in keys:
        x = a[k].detach().double().reshape(-1).cpu()
        y = b[k].detach().double().reshape(-1).cpu()
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return dot / math.sqrt(na * nb)


def _check_same_structure(sds: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> None:
    ref = sds[0]
    for sd, name in zip(sds[1:], names[1:]):
        missing = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref]
        if missing or extra:
            raise ValueError(
                f"{name} does not have the same tensors as {names[0]}: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for k, v in ref.items():
            w = sd[k]
            if isinstance(v, Tensor) != isinstance(w, Tensor):
                raise ValueError(f"{name}: entry {k!r} is a tensor in one state dict only")
            if isinstance(v, Tensor) and (v.shape != w.shape or v.dtype != w.dtype):
                raise ValueError(
                    f"{name}: tensor {k!r} is {tuple(w.shape)} {w.dtype}, but {tuple(v.shape)} {v.dtype} in {names[0]}"
                )


def check_shared_init(
    state_dicts: Sequence[Mapping[str, Tensor]],
    names: Sequence[str] | None = None,
    *,
    fingerprints: Sequence[Mapping[str, str] | None] | None = None,
    init: Mapping[str, Tensor] | None = None,
    min_similarity: float = 0.5,
) -> None:
    """Raise ``ValueError`` unless the runs share an initialization.

    Exact test when every run carries an :func:`init_fingerprint` (written by
    :class:`~lit_optim.callbacks.WeightAveragingCallback`): the fingerprints must be equal (and equal
    to ``init``'s if given). Otherwise a weight-space test: the cosine similarity
    (:func:`weight_similarity`) of each run to ``init`` (or to the first run) must be at least
    ``min_similarity``; runs from different random initializations score near 0."""
    names = list(names) if names is not None else [f"state_dicts[{i}]" for i in range(len(state_dicts))]
    if not 0.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be in [0, 1], got {min_similarity}")
    fps = list(fingerprints) if fingerprints is not None else [None] * len(state_dicts)
    if fps and all(fp is not None for fp in fps):
        ref_fp = init_fingerprint(init) if init is not None else fps[0]
        ref_name = "init" if init is not None else names[0]
        for fp, name in zip(fps, names):
            diff = sorted(k for k in set(ref_fp) | set(fp) if ref_fp.get(k) != fp.get(k))
            if diff:
                raise ValueError(
                    f"{name} and {ref_name} do not share an initialization: their starting weights differ in "
                    f"{len(diff)} tensor(s), e.g. {diff[:5]}. DiWA averages runs fine-tuned from one initialization "
                    "(pass check_init=False to average anyway)"
                )
        return
    ref = init if init is not None else state_dicts[0]
    ref_name = "init" if init is not None else names[0]
    for sd, name in zip(state_dicts, names):
        if sd is ref:
            continue
        sim = weight_similarity(sd, ref)
        if sim < min_similarity:
            raise ValueError(
                f"{name} and {ref_name} do not seem to share an initialization: the cosine similarity of their weight "
                f"matrices is {sim:.3f} < min_similarity={min_similarity}. Independently initialized networks cannot "
                "be averaged (DiWA needs one shared initialization; pass check_init=False to average anyway)"
            )


@torch.no_grad()
def average_state_dicts(
    state_dicts: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    names: Sequence[str] | None = None,
    check_init: bool = True,
    fingerprints: Sequence[Mapping[str, str] | None] | None = None,
    init: Mapping[str, Tensor] | None = None,
    min_similarity: float = 0.5,
) -> dict[str, Tensor]:
    r"""Weighted average of several runs' weights: :math:`\theta = \sum_i w_i \theta_i` with
    :math:`\sum_i w_i = 1` (uniform by default) -- Diverse Weight Averaging (DiWA).

    Floating tensors are averaged in float64 and cast back; other tensors (integer buffers such as
    ``num_batches_tracked``) are taken from the first run. Raises ``ValueError`` when the runs
    differ in structure (names, shapes, dtypes), when a weight is negative or they sum to 0, when
    an average is non-finite, or (``check_init=True``) when they do not share an initialization
    (see :func:`check_shared_init`)."""
    n = len(state_dicts)
    if n == 0:
        raise ValueError("need at least one state dict to average, got 0")
    names = list(names) if names is not None else [f"state_dicts[{i}]" for i in range(n)]
    if weights is None:
        w = [1.0 / n] * n
    else:
        w = [float(x) for x in weights]
        if len(w) != n:
            raise ValueError(f"weights must have one entry per run ({n}), got {len(w)}")
        if any((not math.isfinite(x)) or x < 0 for x in w):
            raise ValueError(f"weights must be finite and >= 0, got {w}")
        total = sum(w)
        if total <= 0:
            raise ValueError(f"weights must not all be 0, got {w}")
        w = [x / total for x in w]
    _check_same_structure(state_dicts, names)
    if check_init and n > 1:
        check_shared_init(state_dicts, names, fingerprints=fingerprints, init=init, min_similarity=min_similarity)
    out: dict[str, Tensor] = {}
    for k, v in state_dicts[0].items():
        if not isinstance(v, Tensor) or not (v.is_floating_point() or v.is_complex()):
            out[k] = v.clone() if isinstance(v, Tensor) else v
            continue
        acc_dtype = torch.complex128 if v.is_complex() else torch.float64
        acc = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        for sd, wi in zip(state_dicts, w):
            acc.add_(sd[k].to(device=v.device, dtype=acc_dtype), alpha=wi)
        if not bool(torch.isfinite(acc).all()):
            raise ValueError(f"the average of tensor {k!r} is not finite (a run holds NaN/Inf)")
        out[k] = acc.to(v.dtype)
    return out
