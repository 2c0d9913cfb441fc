"""Weight averaging for Lightning: several EMA (or one uniform/SWA) averages at once, validation
with each of them (and the raw weights) in the same epoch, shard-local averaging under FSDP2, and
DiWA-style averaging of several runs' checkpoints.

Built on Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` (its update schedule:
after each *optimizer* step, so gradient accumulation is respected, with the overridable
``should_update(step_idx, epoch_idx)`` policy) and on torch's
:mod:`torch.optim.swa_utils` averaging functions (through :class:`lit_optim.functional.MultiEMA`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar, WeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from .._validation import check_positive_int
from ..functional.averaging import (
    MultiEMA,
    _check_decays,
    _is_dtensor,
    average_state_dicts,
    init_fingerprint,
    resolve_average,
)

__all__ = ["WeightAveragingCallback", "average_checkpoints", "extract_average"]

_EVALUATE_WITH = ("average", "both", "primary", "raw")
_DCP_PREFIX = "_lit_optim_average"


class WeightAveragingCallback(WeightAveraging):
    r"""Keep running averages of the weights during ``fit``; validate, checkpoint and export them.

    Papers: EMA of SGD iterates -- Li & Gu, *Understanding SGD with Exponential Moving Average: A
    Case Study in Linear Regression* (arXiv:2502.14123: lower variance than plain SGD, bias decaying
    exponentially in every eigen-subspace); uniform averaging -- Izmailov et al., *Averaging Weights
    Leads to Wider Optima and Better Generalization* (SWA, UAI 2018, arXiv:1803.05407).

    .. code-block:: python

        from lit_optim.callbacks import WeightAveragingCallback

        cb = WeightAveragingCallback(decays=(0.99, 0.999, 0.9999), evaluate_with="both")
        trainer = L.Trainer(callbacks=[cb], max_epochs=10)
        trainer.fit(model)          # logs val_loss (EMA 0.99), val_loss/ema_0.999, ..., val_loss/raw
        cb.export("ema.pt", which=0.999)

    **Averages.** ``kind="ema"`` keeps one exponential moving average per decay
    (:math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta`, first update copies);
    ``kind="uniform"`` keeps the equal-weight SWA average of all updates. An update happens after
    an optimizer step (not after every micro-batch under ``accumulate_grad_batches``) when
    :meth:`should_update` says so: from ``start_step`` on (zero-based index of the optimizer step),
    every ``every_n_steps`` steps -- or, with ``every_n_epochs``, at the end of every n-th epoch.

    **Validation.** Each target is validated by a full pass of Lightning's own validation loop,
    so ``validation_step``, ``self.log`` and torchmetrics objects work unchanged. The first target
    is the *primary* average (``decays[primary]``), logged under your metric names (so
    ``ModelCheckpoint``/``EarlyStopping`` monitor it); every other target is logged as
    ``<name>/<label>`` (``val_loss/ema_0.9999``, ``val_loss/raw``) with the other callbacks
    switched off for that pass. ``evaluate_with``: ``"average"`` (all averages), ``"both"``
    (all averages and the raw weights), ``"primary"`` (only the primary average, one pass),
    ``"raw"`` (no swap). An average that has not been updated yet evaluates the raw weights.

    **Buffers.** With ``use_buffers=True`` (default) floating buffers such as BatchNorm running
    statistics are averaged like the parameters and swapped in with them; integer buffers take the
    latest value. With ``False`` the averages use the model's current buffers (recompute BatchNorm
    statistics with :func:`torch.optim.swa_utils.update_bn` if needed).

    **Memory.** One copy of the (local) weights per average, on ``device`` (``"cpu"`` keeps them off
    the accelerator; each update then copies the weights to the host once for all averages) in
    ``dtype`` (``torch.float32`` for bf16 models). One more temporary copy during validation.

    **Sharded training.** The averages are created at ``on_train_start`` from the wrapped
    model's parameters. Under FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) the parameters are
    DTensors and every rank averages and swaps only its own shard: nothing is gathered. Checkpoints
    store the shards in the distributed checkpoint next to the model's (or gathered when the
    strategy saves a full checkpoint). DDP ranks hold identical averages.

    **Checkpoints.** ``state_dict()`` holds all averages, the update bookkeeping and a fingerprint
    of the weights at the start of the run (used by :func:`average_checkpoints` to check that
    runs share an initialization); a resumed run continues exactly as one that never stopped.
    The checkpoint's ``state_dict`` always holds the raw training weights (even after the average
    was written into the model), so resuming continues the training; get an averaged state dict
    with :func:`extract_average` or :meth:`export`.

    **End of fit.** With ``write_at_end=True`` (default) the primary average is written into the
    model when training ends (refused, with a warning, if it holds NaN/Inf).

    Args:
        kind: ``"ema"`` or ``"uniform"``.
        decays: EMA decays in [0, 1), default ``(0.999,)``; not allowed with ``"uniform"``.
        start_step: first (zero-based) optimizer step that updates the averages (default 0).
        every_n_steps: update every n optimizer steps (default 1).
        every_n_epochs: if set, update at the end of every n-th epoch instead of after steps.
        start_epoch: with ``every_n_epochs``, the first epoch (zero-based) that updates.
        evaluate_with: ``"average"`` (default), ``"both"``, ``"primary"`` or ``"raw"``.
        primary: which average is primary: index, decay value or label (default None: the first).
            A whole-number float that is not a decay is read as an index (a config file or the
            command line may turn ``0`` into ``0.0``).
        use_buffers: average floating buffers too (default True).
        device: where to keep the averages (default: with the weights).
        dtype: floating dtype of the averages (default: the weights' dtype).
        write_at_end: write the primary average into the model at the end of ``fit``.
        record_init: fingerprint the initial weights (one hash pass over the model at fit start).
    """

    def __init__(
        self,
        kind: str = "ema",
        decays: Sequence[float] | float | None = None,
        *,
        start_step: int = 0,
        every_n_steps: int = 1,
        every_n_epochs: int | None = None,
        start_epoch: int = 0,
        evaluate_with: str = "average",
        primary: int | float | str | None = None,  # noqa: PYI041 (int first: jsonargparse keeps 0 an int)
        use_buffers: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        write_at_end: bool = True,
        record_init: bool = True,
    ) -> None:
        super().__init__(device=device, use_buffers=use_buffers)
        if kind not in ("ema", "uniform"):
            raise ValueError(f"kind must be one of ['ema', 'uniform'], got {kind!r}")
        if kind == "uniform" and decays is not None:
            raise ValueError(f"decays are only used with kind='ema'; kind='uniform' got decays={decays!r}")
        self.kind = kind
        self.decays: tuple[float, ...] = (
            () if kind == "uniform" else _check_decays((0.999,) if decays is None else decays)
        )
        self.start_step = check_positive_int("start_step", start_step, 0)
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps, 1)
        self.every_n_epochs = (
            None if every_n_epochs is None else check_positive_int("every_n_epochs", every_n_epochs, 1)
        )
        self.start_epoch = check_positive_int("start_epoch", start_epoch, 0)
        if evaluate_with not in _EVALUATE_WITH:
            raise ValueError(f"evaluate_with must be one of {list(_EVALUATE_WITH)}, got {evaluate_with!r}")
        self.evaluate_with = evaluate_with
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.dtype = dtype
        self.write_at_end = bool(write_at_end)
        self.record_init = bool(record_init)
        self.labels = [f"ema_{d:g}" for d in self.decays] if kind == "ema" else ["uniform"]
        self.primary = resolve_average(primary, self.decays, self.labels)

        self._ema: MultiEMA | None = None
        self._pending: dict[str, Any] | None = None
        self._ckpt_path: str | None = None
        self._init_fp: dict[str, str] | None = None
        self._target: int | str | None = None
        self._orig_val_run: Any = None
        self._written = False
        self._trainer: pl.Trainer | None = None
        self._in_train = False

    # ------------------------------------------------------------------ helpers
    def _resolve(self, which: float | str | None) -> int:
        if which is None:
            return self.primary
        return resolve_average(which, self.decays, self.labels)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(kind=self.kind, decays=self.decays)

    @property
    def averager(self) -> MultiEMA | None:
        """The :class:`~lit_optim.functional.MultiEMA` of the current fit (None before it starts)."""
        return self._ema

    def _targets(self) -> list[tuple[str | None, int | str]]:
        if self.evaluate_with == "raw":
            return [(None, "raw")]
        out: list[tuple[str | None, int | str]] = [(None, self.primary)]
        if self.evaluate_with in ("average", "both"):
            out += [(label, k) for k, label in enumerate(self.labels) if k != self.primary]
        if self.evaluate_with == "both":
            out.append(("raw", "raw"))
        return out

    # ------------------------------------------------------------------ policy
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Update after optimizer step ``step_idx`` (zero-based) or at the end of epoch ``epoch_idx``."""
        if self.every_n_epochs is None:
            return (
                step_idx is not None
                and step_idx >= self.start_step
                and ((step_idx - self.start_step) % self.every_n_steps == 0)
            )
        return (
            epoch_idx is not None
            and epoch_idx >= self.start_epoch
            and ((epoch_idx - self.start_epoch + 1) % self.every_n_epochs == 0)
        )

    # ------------------------------------------------------------------ fit lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning's WeightAveraging deep-copies the (unsharded) module here; the averages are
        # created at on_train_start instead, from the wrapped/sharded model.
        self._trainer = trainer
        if stage == "fit":
            self._written = False
            self._init_fp = init_fingerprint(pl_module) if self.record_init else None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(self._targets()) > 1:
            loop = trainer.fit_loop.epoch_loop.val_loop
            self._orig_val_run = loop.run
            # an instance attribute shadowing the loop's run(), removed at teardown
            loop.run = functools.partial(self._run_validation_targets, trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ema = MultiEMA(
            pl_module,
            None if self.kind == "uniform" else self.decays,
            self.kind,
            device=self._device,
            dtype=self.dtype,
            use_buffers=self._use_buffers,
        )
        self._average_model = self._ema  # Lightning's update hooks call _average_model.update_parameters()
        self._in_train = True
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None
        else:
            self._latest_update_step = trainer.global_step
            self._latest_update_epoch = trainer.current_epoch - 1

    # on_train_batch_end / on_train_epoch_end: inherited from WeightAveraging (update once per
    # optimizer step, when should_update() agrees).

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_train = False
        ema = self._ema
        if not self.write_at_end or ema is None or ema.n_averaged == 0:
            return
        if not ema.is_finite(self.primary):
            rank_zero_warn(
                f"WeightAveragingCallback: the {self.labels[self.primary]} average holds NaN/Inf values; "
                "the model keeps its raw weights"
            )
            return
        # swap_in keeps the raw weights aside: checkpoints saved afterwards still hold them, so a
        # resumed fit continues the training and not the average
        ema.swap_in(self.primary)
        self._written = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._in_train = False
        if stage == "fit" and self._orig_val_run is not None:
            loop = trainer.fit_loop.epoch_loop.val_loop
            if isinstance(loop.__dict__.get("run"), functools.partial):
                del loop.run
            self._orig_val_run = None
        self._trainer = None  # no reference cycles, and picklable for the next (spawned) fit

    # ------------------------------------------------------------------ validation
    def _run_validation_targets(self, trainer: pl.Trainer) -> Any:
        run = self._orig_val_run
        if self._ema is None or trainer.sanity_checking:
            return run()
        targets = self._targets()
        try:
            self._target = targets[0][1]
            out = run()
            for label, target in targets[1:]:
                self._target = target
                with self._isolated(trainer, trainer.lightning_module, label):
                    run()
        finally:
            self._target = None
        return out

    @contextlib.contextmanager
    def _isolated(self, trainer: pl.Trainer, pl_module: pl.LightningModule, label: str | None) -> Iterator[None]:
        """Metric names get ``/label``; other callbacks (checkpointing, early stopping, ...) sit this
        pass out. Progress bars stay (they show the pass; Rich's refresh thread expects its bar to
        remain registered)."""
        callbacks = trainer.callbacks
        had = "log" in pl_module.__dict__
        previous = pl_module.__dict__.get("log")
        original = pl_module.log

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            return original(f"{name}/{label}", value, *args, **kwargs)

        pl_module.log = log  # type: ignore[method-assign]
        trainer.callbacks = [self] + [c for c in callbacks if isinstance(c, ProgressBar)]
        try:
            yield
        finally:
            trainer.callbacks = callbacks
            if had:
                pl_module.log = previous  # type: ignore[method-assign]
            else:
                del pl_module.log

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ema is None or trainer.sanity_checking or trainer.state.fn != "fit" or self._written:
            return
        target = self._target if self._target is not None else self._targets()[0][1]
        if target != "raw":
            self._ema.swap_in(target)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ema is not None and not self._written:
            self._ema.swap_out()

    # ------------------------------------------------------------------ export
    def averaged_state_dict(self, which: float | str | None = None) -> dict[str, Tensor]:
        """The model's ``state_dict()`` with an average (default: the primary) in place of the
        tracked tensors. Sharded (DTensor) entries are gathered into full tensors: under FSDP2
        every rank must call this."""
        if self._ema is None:
            raise RuntimeError("no averages yet: call this during or after trainer.fit()")
        ema = self._ema
        k = self._resolve(which)
        sd = ema.averaged_state_dict(k)
        assert ema.module is not None
        for name, v in ema.module.state_dict(keep_vars=True).items():
            if _is_dtensor(v):
                sd[name] = _from_local(sd[name], v).full_tensor()
        return sd

    def export(self, path: str | os.PathLike, which: float | str | None = None) -> dict[str, Tensor]:
        """Write an averaged ``state_dict`` (see :meth:`averaged_state_dict`) to ``path`` with
        ``torch.save`` (from global rank 0) and return it."""
        sd = self.averaged_state_dict(which)
        trainer = self._trainer
        if trainer is None or trainer.is_global_zero:
            torch.save({k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in sd.items()}, path)
        return sd

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "latest_update_step": self._latest_update_step,
            "latest_update_epoch": self._latest_update_epoch,
            "init_fingerprint": self._init_fp,
            "kind": self.kind,
            "decays": list(self.decays),
            "labels": list(self.labels),
            "primary": self.primary,
        }
        if self._ema is not None:
            avg = self._ema.state_dict()
            specs = self._ema.dtensor_specs
            # hand out DTensors for sharded entries; on_save_checkpoint decides how they are stored
            avg["averages"] = [
                {
                    n: (_from_local_spec(t, specs[i]) if specs[i] is not None else t)
                    for i, (n, t) in enumerate(a.items())
                }
                for a in avg["averages"]
            ]
            state["averager"] = avg
        elif self._pending is not None and "averager" in self._pending:
            state["averager"] = self._pending["averager"]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (
            state_dict.get("kind", self.kind) != self.kind
            or tuple(state_dict.get("decays", self.decays)) != self.decays
        ):
            raise ValueError(
                f"checkpointed averages are kind={state_dict.get('kind')!r} decays={tuple(state_dict.get('decays', ()))}, "
                f"this callback is kind={self.kind!r} decays={self.decays}"
            )
        self._latest_update_step = int(state_dict["latest_update_step"])
        self._latest_update_epoch = int(state_dict.get("latest_update_epoch", -1))
        self._init_fp = state_dict.get("init_fingerprint")
        if self._ema is not None and self._in_train:
            self._apply_state(state_dict)
        else:
            self._pending = dict(state_dict)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # no call to WeightAveraging.on_save_checkpoint: the model's weights stay in "state_dict"
        ema = self._ema
        sd = checkpoint.get("state_dict")
        # sharded (distributed) checkpoint: DTensor values; full checkpoint: plain tensors on rank 0
        # (possibly nothing on the other ranks). Every rank reaches the same answer.
        sharded = isinstance(sd, dict) and any(_is_dtensor(v) for v in sd.values())
        if ema is not None and isinstance(sd, dict):
            raw = ema.stashed()  # an average is in the model (validation or written at the end)
            if raw is not None:
                specs = ema.dtensor_specs
                for i, keys in enumerate(ema.state_dict_keys()):
                    value = raw[i].detach().clone()
                    if specs[i] is not None:
                        value = _from_local_spec(value, specs[i])
                        if not sharded:
                            value = value.full_tensor()  # collective: all ranks run this hook
                    for key in keys:
                        if key in sd and isinstance(sd[key], Tensor):
                            sd[key] = (
                                value if _is_dtensor(value) else value.to(device=sd[key].device, dtype=sd[key].dtype)
                            )
        cb_state = checkpoint.get("callbacks", {}).get(self.state_key)
        if cb_state is None or "averager" not in cb_state:
            return
        averages = cb_state["averager"]["averages"]
        if not any(_is_dtensor(t) for a in averages for t in a.values()):
            return
        new_averages = []
        for k, a in enumerate(averages):
            out = {}
            for name, t in a.items():
                if not _is_dtensor(t):
                    out[name] = t
                elif sharded:  # stored by the distributed checkpoint next to the model's shards
                    sd[f"{_DCP_PREFIX}.{self.state_key}.{k}.{name}"] = t
                    out[name] = None
                else:  # full checkpoint: gather (all ranks run this hook)
                    out[name] = t.full_tensor().cpu()
            new_averages.append(out)
        cb_state["averager"] = {**cb_state["averager"], "averages": new_averages, "in_state_dict": sharded}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # no call to WeightAveraging.on_load_checkpoint (it expects its own checkpoint layout)
        self._ckpt_path = trainer.ckpt_path

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        ema = self._ema
        assert ema is not None
        avg = state.get("averager")
        if avg is None:
            rank_zero_info("WeightAveragingCallback: the checkpoint holds no averages; they start afresh")
            return
        specs = ema.dtensor_specs
        averages = []
        dcp_request: dict[str, Tensor] = {}
        for k, saved in enumerate(avg["averages"]):
            local: dict[str, Tensor] = {}
            for i, name in enumerate(ema.names):
                v = saved.get(name)
                spec = specs[i]
                if v is None and avg.get("in_state_dict"):
                    if spec is None:
                        raise ValueError(f"checkpointed average entry {name!r} is missing")
                    target = ema.averages[k][i]
                    dcp_request[f"{_DCP_PREFIX}.{self.state_key}.{k}.{name}"] = _from_local_spec(target, spec)
                    local[name] = target  # filled in place by the distributed load below
                elif spec is not None and not _is_dtensor(v) and tuple(v.shape) == tuple(spec[2]):
                    # a gathered full tensor: keep this rank's shard
                    local[name] = _shard_like(v, spec).to(ema.averages[k][i].device)
                else:
                    local[name] = v
            averages.append(local)
        if dcp_request:
            import torch.distributed.checkpoint as dcp

            if self._ckpt_path is None:
                raise RuntimeError("cannot locate the distributed checkpoint holding the averages")
            dcp.load({"state_dict": dcp_request}, checkpoint_id=self._ckpt_path)
            # the requested DTensors alias the averages' storage; copy back in case the loader replaced them
            for key, t in dcp_request.items():
                k, name = key[len(_DCP_PREFIX) + len(self.state_key) + 2 :].split(".", 1)
                i = ema.names.index(name)
                if t.to_local().data_ptr() != ema.averages[int(k)][i].data_ptr():
                    averages[int(k)][name] = t.to_local()
        ema.load_state_dict({**avg, "averages": averages})


def _from_local_spec(local: Tensor, spec: tuple) -> Tensor:
    from torch.distributed.tensor import DTensor

    mesh, placements, shape, stride = spec
    if local.device.type != mesh.device_type:  # averages kept on another device (e.g. cpu)
        local = local.to(mesh.device_type)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)


def _from_local(local: Tensor, like: Tensor) -> Tensor:
    return _from_local_spec(local, (like.device_mesh, tuple(like.placements), like.shape, like.stride()))


def _shard_like(full: Tensor, spec: tuple) -> Tensor:
    from torch.distributed.tensor import distribute_tensor

    mesh, placements, _, _ = spec
    return distribute_tensor(full.to(mesh.device_type), mesh, placements, src_data_rank=None).to_local()


# ------------------------------------------------------------------------------ checkpoint tools


def _load(obj: str | os.PathLike | Mapping[str, Any], map_location: Any = "cpu") -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        return obj
    path = os.fspath(obj)
    if os.path.isdir(path):
        raise ValueError(
            f"{path} is a distributed (sharded) checkpoint directory; export the averaged weights with "
            "WeightAveragingCallback.export() or save a full checkpoint to average runs"
        )
    # checkpoints written by Lightning hold plain Python objects next to tensors; only load files you trust
    return torch.load(path, map_location=map_location, weights_only=False)


def _averaging_states(ckpt: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    callbacks = ckpt.get("callbacks") or {}
    return {
        k: v
        for k, v in callbacks.items()
        if isinstance(k, str) and k.startswith("WeightAveragingCallback") and isinstance(v, dict)
    }


def _one_state(ckpt: Mapping[str, Any], state_key: str | None, name: str) -> dict[str, Any] | None:
    states = _averaging_states(ckpt)
    if state_key is not None:
        if state_key not in states:
            raise ValueError(f"{name} has no WeightAveragingCallback state {state_key!r}; it has {list(states)}")
        return states[state_key]
    if len(states) > 1:
        raise ValueError(f"{name} holds several WeightAveragingCallback states {list(states)}; pass state_key=")
    return next(iter(states.values()), None)


def extract_average(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    which: float | str | None = None,
    *,
    state_key: str | None = None,
) -> dict[str, Tensor]:
    """The LightningModule ``state_dict`` of a checkpoint written with
    :class:`WeightAveragingCallback`, with average ``which`` (index, decay or label; default: the
    primary one) in place of the raw weights. Load it with ``model.load_state_dict(...)``."""
    ckpt = _load(checkpoint)
    name = str(checkpoint) if not isinstance(checkpoint, Mapping) else "the checkpoint"
    state = _one_state(ckpt, state_key, name)
    if state is None or "averager" not in state:
        raise ValueError(f"{name} holds no WeightAveragingCallback averages")
    avg = state["averager"]
    if avg.get("in_state_dict"):
        raise ValueError(f"{name} keeps its averages sharded in a distributed checkpoint; use export() instead")
    labels = state.get("labels") or [f"ema_{d:g}" for d in avg["decays"]] or ["uniform"]
    if which is None:
        k = int(state.get("primary", 0))
    else:
        k = resolve_average(which, tuple(avg["decays"]), labels)
    sd = dict(ckpt["state_dict"])
    if int(avg["n_averaged"]) == 0:
        rank_zero_warn(f"{name}: the averages were never updated; returning the raw weights")
        return sd
    keys = avg.get("state_dict_keys") or [[n] for n in avg["names"]]
    for n, ks in zip(avg["names"], keys):
        value = avg["averages"][k][n]
        for key in ks:
            if key in sd:
                sd[key] = value.to(dtype=sd[key].dtype) if isinstance(sd[key], Tensor) else value
    return sd


def average_checkpoints(
    paths: Sequence[str | os.PathLike | Mapping[str, Any]],
    weights: Sequence[float] | None = None,
    *,
    use_average: float | str | None = None,
    check_init: bool = True,
    init: str | os.PathLike | Mapping[str, Any] | None = None,
    min_similarity: float = 0.5,
) -> dict[str, Tensor]:
    r"""Average the weights of several runs that share an initialization (DiWA).

    Diverse Weight Averaging (Ramé, Kirchmeyer, Rahier, Rakotomamonjy, Gallinari, Cord;
    NeurIPS 2022, arXiv:2205.09739): fine-tune several runs from one initialization with
    different hyperparameters/seeds and average their weights,
    :math:`\theta = \sum_i w_i\theta_i` (uniform by default); no inference overhead.

    Args:
        paths: Lightning checkpoints (files or loaded dicts) or plain ``state_dict`` files/dicts.
        weights: non-negative weights, one per run (normalised to sum 1); default uniform.
        use_average: take each run's :class:`WeightAveragingCallback` average (index, decay or label)
            instead of its raw weights -- DiWA on top of a moving average.
        check_init: verify a shared initialization: exactly, from the fingerprints the callback
            records at the start of each run (and ``init`` if given), else by weight similarity
            (cosine of the weight matrices to ``init`` or to the first run >= ``min_similarity``).
        init: the shared initial weights (a ``state_dict``, module checkpoint or path), optional.

    Returns:
        the averaged ``state_dict`` (load it with ``model.load_state_dict``).

    Raises:
        ValueError: when the runs differ in structure, do not share an initialization, or when
            ``weights`` is invalid -- the message names the offending run and tensor.
    """
    if isinstance(paths, (str, os.PathLike, Mapping)):
        raise TypeError("paths must be a sequence of checkpoints (paths or dicts), got a single one")
    names = [str(p) if not isinstance(p, Mapping) else f"paths[{i}]" for i, p in enumerate(paths)]
    ckpts = [_load(p) for p in paths]
    sds, fps = [], []
    for ckpt, name in zip(ckpts, names):
        is_lightning = "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping)
        if use_average is not None:
            if not is_lightning:
                raise ValueError(f"use_average needs Lightning checkpoints with averages; {name} is a plain state dict")
            sds.append(extract_average(ckpt, use_average))
        else:
            sds.append(dict(ckpt["state_dict"]) if is_lightning else dict(ckpt))
        state = _one_state(ckpt, None, name) if is_lightning else None
        fps.append(state.get("init_fingerprint") if state else None)
    init_sd = None
    if init is not None:
        loaded = _load(init)
        init_sd = (
            dict(loaded["state_dict"])
            if "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping)
            else dict(loaded)
        )
    return average_state_dicts(
        sds,
        weights,
        names=names,
        check_init=check_init,
        fingerprints=fps if all(fp is not None for fp in fps) else None,
        init=init_sd,
        min_similarity=min_similarity,
    )
