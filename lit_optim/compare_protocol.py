"""The protocol behind ``lit-optim compare``: what is trained, how each optimizer gets its learning
rate, the seeded runs, and the interleaved step-time measurement.

* **What is trained** (:class:`Problem`): a built-in task (``charlm``, ``digits``), the user's own
  ``LightningModule`` (+ optional ``LightningDataModule``), or a Hugging Face causal LM built from a
  config and trained on the user's text file.
* **How the optimizer gets in** (:func:`inject_optimizer`): the module's ``configure_optimizers`` is
  replaced by ``lit_optim.configure_optimizers(module, NAME, lr=LR, scheduler=..., warmup_steps=...,
  total_steps=STEPS)``, so every optimizer gets the same parameter-group rules, schedule and horizon.
  Sophia and AdaHessian (any optimizer whose registry entry names a curvature estimator) get a
  :class:`~lit_optim.callbacks.HessianDiagCallback` automatically.
* **Learning rates** (:func:`lr_plan`): given (``--lr``), shipped (recorded per built-in task from a
  successive-halving sweep, :mod:`lit_optim._tuned_lrs`), swept at run time (successive halving on a
  separate tuning seed), or the registry default.
* **Runs**: each (optimizer, lr, seed, steps) is one Lightning run in a worker process; its record is
  saved in ``runs/<id>.json`` as soon as it ends, so ``--resume`` skips it.
* **Time** (:func:`measure_step_times`): after training, in one process, every optimizer's model
  takes real steps in blocks, the blocks interleaved across optimizers and repeated; the optimizer
  step and the whole step (forward + backward + curvature estimate amortized + step) are timed
  separately, with the spread over repeats.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from statistics import median, quantiles
from typing import Any

__all__ = [
    "OptimizerSpec",
    "Problem",
    "RunSpec",
    "Settings",
    "execute_run",
    "inject_optimizer",
    "load_object",
    "lr_plan",
    "measure_step_times",
    "parse_optimizer_list",
    "parse_optimizer_spec",
    "quiet",
    "run_protocol",
    "shipped_lr",
    "wrapper_optimizers",
]

#: constructor parameters that mark an optimizer class as a wrapper around a base optimizer
WRAPPER_PARAMETERS = ("base", "base_optimizer", "base_optimizer_or_params")

RESULTS_VERSION = 2


# ----------------------------------------------------------------------------- quiet Lightning


_NOISY_WARNINGS = (
    r".*does not have many workers.*",
    r".*The number of training batches.*",
    r".*GPU available but not used.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*You are trying to `self.log\(\)` but the `self.trainer` reference is not registered.*",
    r".*val_check_interval.*was configured so validation will run.*",
    r".*Trainer.fit. stopped.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*Starting from v1.9.0, `tensorboardX` has been removed.*",
    r".*The `srun` command is available on your system.*",
)


def quiet() -> None:
    """Silence Lightning's banners, tips and routine warnings (GPU available, LitLogger tips,
    "does not have many workers", ...) in this process; the user's own warnings still show."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"lightning.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "Loading weights" bars from transformers
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        with contextlib.suppress(Exception):
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
    try:
        from lightning.fabric.utilities.warnings import PossibleUserWarning

        warnings.filterwarnings("ignore", category=PossibleUserWarning)
    except ImportError:  # pragma: no cover
        pass


# ----------------------------------------------------------------------------- optimizer specs


@dataclass(frozen=True)
class OptimizerSpec:
    """``NAME`` or ``WRAPPER:BASE`` (e.g. ``sam:adamw``): ``create_optimizer(model, WRAPPER, base=BASE)``."""

    text: str
    name: str
    base: str | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"base": self.base} if self.base else {}

    @property
    def curvature(self) -> str | None:
        """The Hessian estimator the run needs (the wrapper's own, else its base optimizer's)."""
        from .registry import get_optimizer_info

        own = get_optimizer_info(self.name).curvature
        if own is None and self.base:
            return get_optimizer_info(self.base).curvature
        return own

    @property
    def attention(self) -> str:
        """Hutchinson estimates need double backward, which fused attention kernels lack."""
        return "math" if self.curvature == "hutchinson" else "sdpa"

    @property
    def default_lr(self) -> float:
        from .registry import get_optimizer_info

        return get_optimizer_info(self.name).default_lr


def wrapper_optimizers() -> list[str]:
    """Registered optimizers that wrap a base optimizer (usable as ``WRAPPER:BASE``)."""
    from .registry import OPTIMIZERS

    return sorted(n for n, info in OPTIMIZERS.items() if _is_wrapper(info))


def _is_wrapper(info: Any) -> bool:
    if getattr(info, "wrapper", False):
        return True
    try:
        params = inspect.signature(info.cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return any(p in params for p in WRAPPER_PARAMETERS)


def parse_optimizer_spec(text: str) -> OptimizerSpec:
    """Parse ``NAME`` or ``WRAPPER:BASE``; raise ``ValueError`` with a one-line message."""
    from .registry import OPTIMIZERS, available_optimizers

    raw = text.strip().lower().replace("-", "_")
    if not raw:
        raise ValueError("empty optimizer name")
    parts = [p.strip() for p in raw.split(":")]
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"optimizer {text!r}: expected NAME or WRAPPER:BASE (e.g. adamw or sam:adamw)")
    known = ", ".join(available_optimizers())
    if len(parts) == 1:
        if raw not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {text!r}; known optimizers: {known}")
        return OptimizerSpec(raw, raw)
    wrapper, base = parts
    wrappers = wrapper_optimizers()
    if wrapper not in OPTIMIZERS:
        have = ", ".join(wrappers) if wrappers else "none is registered in this version"
        raise ValueError(f"unknown optimizer wrapper {wrapper!r} in {text!r}; wrappers: {have}")
    if wrapper not in wrappers:
        raise ValueError(f"{wrapper!r} in {text!r} is not a wrapper optimizer (it takes no base optimizer)")
    if base not in OPTIMIZERS:
        raise ValueError(f"unknown base optimizer {base!r} in {text!r}; known optimizers: {known}")
    if base in wrappers:
        raise ValueError(f"{text!r}: the base optimizer must not be a wrapper itself")
    return OptimizerSpec(f"{wrapper}:{base}", wrapper, base)


def parse_optimizer_list(text: str) -> list[OptimizerSpec]:
    specs = [parse_optimizer_spec(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise ValueError("--optimizers is empty")
    seen: set[str] = set()
    for s in specs:
        if s.text in seen:
            raise ValueError(f"optimizer {s.text!r} is listed twice")
        seen.add(s.text)
    return specs


# ----------------------------------------------------------------------------- what is trained


def load_object(path: str) -> Any:
    """``pkg.mod:Attr`` (or ``pkg.mod.Attr``) -> the object. The current directory is importable,
    as with ``python -m``."""
    if ":" in path:
        mod_name, _, attr = path.partition(":")
    else:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"{path!r} is not an import path like my_pkg.my_module:MyClass")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import {mod_name!r} ({e})") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


@dataclass
class Problem:
    """What every run trains; a plain, JSON-able description (it is sent to worker processes)."""

    kind: str = "task"  # "task", "module" or "hf"
    task: str = "charlm"
    model_size: str = "small"
    text_path: str | None = None
    module: str | None = None
    module_args: dict[str, Any] = field(default_factory=dict)
    datamodule: str | None = None
    datamodule_args: dict[str, Any] = field(default_factory=dict)
    hf_model: str | None = None
    dataset: str | None = None
    block_size: int | None = None
    tokenizer: str | None = None
    batch_size: int = 32
    val_metric: str = "val_loss"

    @property
    def label(self) -> str:
        """Short name for folders and titles."""
        if self.kind == "module":
            return self.module.replace(":", ".").rsplit(".", 1)[-1]
        if self.kind == "hf":
            base = os.path.basename(os.path.normpath(self.hf_model))
            return "hf-" + (os.path.splitext(base)[0] if base.endswith(".json") else base)
        return self.task


@dataclass
class Built:
    module: Any
    datamodule: Any
    description: dict[str, Any]


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def build_problem(problem: Problem, *, seed: int, steps: int, attention: str = "sdpa") -> Built:
    """The LightningModule (and datamodule) of one run, seeded."""
    import lightning as L

    from .tasks import TaskModule, build_task, hf_causal_lm_task

    L.seed_everything(seed, verbose=False)
    if problem.kind == "module":
        factory = load_object(problem.module)
        module = factory(**problem.module_args)
        dm = None
        if problem.datamodule:
            dm = load_object(problem.datamodule)(**problem.datamodule_args)
        desc = {"model": f"{type(module).__name__} from {problem.module}"}
        if problem.module_args:
            desc["module args"] = json.dumps(problem.module_args)
        if dm is not None:
            desc["data"] = f"{type(dm).__name__} from {problem.datamodule}"
        else:
            desc["data"] = "the module's own dataloaders"
        return Built(module, dm, desc)
    if problem.kind == "hf":
        import transformers  # noqa: F401 - imported before quiet() silences its progress bars

        quiet()
        model, train, val, desc = hf_causal_lm_task(
            problem.hf_model,
            _read_text(problem.dataset),
            steps=steps,
            batch_size=problem.batch_size,
            seed=seed,
            block_size=problem.block_size,
            tokenizer=problem.tokenizer,
            attention=attention,
        )
        desc["data"] = f"text file {problem.dataset}"
    else:
        text = _read_text(problem.text_path) if problem.text_path else None
        model, train, val, desc = build_task(
            problem.task,
            steps=steps,
            batch_size=problem.batch_size,
            seed=seed,
            text=text,
            model_size=problem.model_size,
            attention=attention,
        )
        if problem.task == "digits":
            desc["data"] = "scikit-learn's bundled 8x8 handwritten digits"
        else:
            desc["data"] = f"text file {problem.text_path}" if problem.text_path else "Python standard library source"
    module = TaskModule(model, train, val, batch_size=problem.batch_size, seed=seed)
    return Built(module, None, desc)


def inject_optimizer(
    module: Any,
    spec: OptimizerSpec,
    *,
    lr: float,
    scheduler: str,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float | None = None,
    optimizer_kwargs: dict[str, Any] | None = None,
) -> None:
    """Replace ``module.configure_optimizers`` by ``lit_optim.configure_optimizers(module, NAME, ...)``.

    The module's class is swapped for a subclass that overrides only ``configure_optimizers`` (so
    Lightning sees an ordinary override); nothing else of the module changes."""
    from .factory import configure_optimizers

    def _configure_optimizers(self):
        return configure_optimizers(
            self,
            spec.name,
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            **spec.kwargs,
            **(optimizer_kwargs or {}),
        )

    cls = type(module)
    base = getattr(cls, "_lit_optim_user_class", cls)
    sub = type(
        base.__name__,
        (base,),
        {
            "configure_optimizers": _configure_optimizers,
            "_lit_optim_user_class": base,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
        },
    )
    module.__class__ = sub


# ----------------------------------------------------------------------------- settings and runs


@dataclass
class Settings:
    """The protocol's knobs (JSON-able)."""

    steps: int = 400
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    scheduler: str = "cosine"
    warmup_fraction: float = 0.05
    val_every: int | None = None
    device: str = "cpu"
    precision: str | None = None
    weight_decay: float | None = None
    curvature_every: int = 10
    tune: str = "auto"  # auto | shipped | sweep | none
    tune_grid: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0])
    tune_fraction: float = 0.25
    tune_keep: int = 3
    tune_extend: int = 2
    tune_seed: int = 1000
    timing_reps: int = 7
    timing_steps: int = 5
    jobs: int = 1
    threads: int | None = None
    #: extra constructor arguments for every optimizer (Python API only)
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)

    def warmup_steps(self, steps: int) -> int:
        return max(1, int(round(self.warmup_fraction * steps))) if self.warmup_fraction > 0 else 0

    def protocol_key(self) -> dict[str, Any]:
        """Settings that change what a finished run means (a resumed comparison must match them)."""
        keep = ("steps", "scheduler", "warmup_fraction", "val_every", "device", "precision", "weight_decay",
                "curvature_every", "optimizer_kwargs", "tune_grid", "tune_fraction", "tune_keep", "tune_extend", "tune_seed")
        return {k: getattr(self, k) for k in keep}


@dataclass(frozen=True)
class RunSpec:
    optimizer: str
    lr: float
    seed: int
    steps: int
    phase: str = "eval"  # "eval" or "tune"
    rung: int = 0

    @property
    def id(self) -> str:
        safe = self.optimizer.replace(":", "+")
        return f"{self.phase}-{safe}-lr{self.lr:.6g}-seed{self.seed}-steps{self.steps}"

    def describe(self) -> str:
        if self.phase == "tune":
            return f"tune {self.optimizer} lr={self.lr:.3g} ({self.steps} steps, seed {self.seed})"
        return f"{self.optimizer} lr={self.lr:.3g} seed {self.seed}"


def _window(n: int) -> int:
    return max(5, n // 10)


def final_loss(losses: list[float]) -> float:
    """Mean training loss over the last 10% of steps (at least 5)."""
    if not losses:
        return math.nan
    tail = losses[-_window(len(losses)):]
    return sum(tail) / len(tail)


def steps_to_reach(losses: list[float], target: float, window: int | None = None) -> int | None:
    """First step (1-based) at which the mean training loss over the trailing ``window`` steps
    (default: 10% of the run, at least 5, the window of :func:`final_loss`) is <= ``target``."""
    if target is None or not math.isfinite(target):
        return None
    w = window or _window(len(losses))
    acc = 0.0
    for i, v in enumerate(losses):
        acc += v
        if i >= w:
            acc -= losses[i - w]
        if i + 1 >= w and acc / w <= target + 1e-12:
            return i + 1
    return None


def run_score(rec: dict[str, Any]) -> float:
    """What tuning ranks runs by: the final validation loss, else the final training loss; inf
    when the run failed or is not finite."""
    if rec.get("error"):
        return math.inf
    v = rec.get("final_val_loss")
    if v is None or not math.isfinite(v):
        v = rec.get("final_train_loss")
    return v if v is not None and math.isfinite(v) else math.inf


def _round(xs: list[float]) -> list[float]:
    return [float(f"{x:.6g}") if math.isfinite(x) else x for x in xs]


def _recorder_class():
    import lightning as L

    class _Recorder(L.Callback):
        """Training loss of every step, validation losses, and the time spent in training steps
        (forward, backward, optimizer; validation excluded)."""

        def __init__(self, val_metric: str):
            self.val_metric = val_metric
            self.train_loss: list[float] = []
            self.val_steps: list[int] = []
            self.val_loss: list[float] = []
            self.train_time = 0.0
            self._t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.train_time += time.perf_counter() - self._t0
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is not None:
                self.train_loss.append(float(loss.detach()))

        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            v = trainer.callback_metrics.get(self.val_metric)
            if v is not None:
                self.val_steps.append(int(trainer.global_step))
                self.val_loss.append(float(v))

    return _Recorder


def execute_run(problem: dict[str, Any], settings: dict[str, Any], run: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Train one run and return its record (a JSON-able dict). Never raises for a failing run:
    the error is in ``record["error"]``."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from .optim._base import optimizer_state_bytes

    quiet()
    p, s, r = Problem(**problem), Settings(**settings), RunSpec(**run)
    spec = parse_optimizer_spec(r.optimizer)
    rec: dict[str, Any] = {**asdict(r), "id": r.id, "error": None, "train_loss": [], "val_steps": [], "val_loss": [],
                           "final_train_loss": math.nan, "final_val_loss": math.nan, "wall_s": 0.0,
                           "train_step_s": math.nan, "state_bytes": 0, "num_params": 0}
    t0 = time.perf_counter()
    trainer = None
    recorder = _recorder_class()(p.val_metric)
    try:
        built = build_problem(p, seed=r.seed, steps=r.steps, attention=spec.attention)
        module, dm = built.module, built.datamodule
        inject_optimizer(module, spec, lr=r.lr, scheduler=s.scheduler, warmup_steps=s.warmup_steps(r.steps),
                         total_steps=r.steps, weight_decay=s.weight_decay, optimizer_kwargs=s.optimizer_kwargs)
        seen: set[int] = set()
        rec["num_params"] = sum(
            q.numel() for q in module.parameters() if q.requires_grad and id(q) not in seen and not seen.add(id(q))
        )
        callbacks: list[Any] = [recorder]
        if spec.curvature is not None:
            from .callbacks import HessianDiagCallback

            callbacks.append(HessianDiagCallback(estimator=spec.curvature, every_n_steps=s.curvature_every,
                                                 math_attention=spec.curvature == "hutchinson"))
        label = spec.text.replace(":", "+")
        tb_name = f"tune/{label}" if r.phase == "tune" else label
        tb_version = f"lr{r.lr:.4g}-seed{r.seed}" + (f"-steps{r.steps}" if r.phase == "tune" else "")
        stale = os.path.join(out_dir, "tensorboard", tb_name, tb_version)
        if os.path.isdir(stale):  # an interrupted earlier attempt of this run (finished ones are not re-run)
            shutil.rmtree(stale, ignore_errors=True)
        logger = TensorBoardLogger(os.path.join(out_dir, "tensorboard"), name=tb_name, version=tb_version,
                                   default_hp_metric=False)
        val_every = s.val_every if s.val_every is not None else max(1, r.steps // 10)
        val_every = r.steps if val_every <= 0 else min(val_every, r.steps)
        kw: dict[str, Any] = {}
        if s.precision:
            kw["precision"] = s.precision
        trainer = L.Trainer(
            max_steps=r.steps,
            accelerator="gpu" if s.device == "cuda" else s.device,
            devices=1,
            logger=logger,
            callbacks=callbacks,
            val_check_interval=val_every,
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            log_every_n_steps=max(1, min(10, r.steps // 20)),
            **kw,
        )
        trainer.fit(module, datamodule=dm)
        last = recorder.val_steps[-1] if recorder.val_steps else None
        if last != trainer.global_step:
            with contextlib.suppress(Exception):  # no validation loop: train loss only
                metrics = trainer.validate(module, datamodule=dm, verbose=False)
                if metrics and p.val_metric in metrics[0]:
                    recorder.val_steps.append(int(trainer.global_step))
                    recorder.val_loss.append(float(metrics[0][p.val_metric]))
    except Exception as e:  # noqa: BLE001 - one failing run must not lose the others
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    rec["wall_s"] = time.perf_counter() - t0
    rec["train_loss"] = _round(recorder.train_loss)
    rec["val_steps"] = recorder.val_steps
    rec["val_loss"] = _round(recorder.val_loss)
    if recorder.train_loss:
        rec["train_step_s"] = recorder.train_time / len(recorder.train_loss)
    rec["final_train_loss"] = final_loss(recorder.train_loss)
    rec["final_val_loss"] = recorder.val_loss[-1] if recorder.val_loss else math.nan
    if rec["error"] is None and not math.isfinite(rec["final_train_loss"]):
        rec["error"] = "non-finite training loss"
    if trainer is not None and trainer.optimizers:
        rec["state_bytes"] = optimizer_state_bytes(trainer.optimizers[0])
    if trainer is not None and trainer.logger is not None:
        with contextlib.suppress(Exception):
            hp = {"optimizer": r.optimizer, "lr": r.lr, "seed": r.seed, "steps": r.steps, "phase": r.phase,
                  "scheduler": s.scheduler, "warmup_fraction": s.warmup_fraction}
            metrics = {"hp/final_train_loss": rec["final_train_loss"]}
            if math.isfinite(rec["final_val_loss"]):
                metrics["hp/final_val_loss"] = rec["final_val_loss"]
            trainer.logger.log_hyperparams(hp, metrics)
            trainer.logger.finalize("success" if rec["error"] is None else "failed")
        rec["tensorboard"] = os.path.relpath(trainer.logger.log_dir, out_dir)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rec


# ----------------------------------------------------------------------------- learning rates


def shipped_lr(problem: Problem, settings: Settings, name: str) -> tuple[float, dict[str, Any]] | None:
    """The learning rate recorded for ``name`` on this built-in task (same model size, batch size,
    scheduler and a step count within 2x), with its record; None when there is none."""
    if problem.kind != "task" or problem.text_path:
        return None
    from ._tuned_lrs import TUNED

    key = f"{problem.task}/{problem.model_size}/b{problem.batch_size}"
    best = None
    for entry in TUNED.get(key, []):
        if entry.get("scheduler") != settings.scheduler or name not in entry.get("lrs", {}):
            continue
        ratio = settings.steps / entry["steps"]
        if not 0.5 <= ratio <= 2.0:
            continue
        if best is None or abs(math.log(ratio)) < abs(math.log(settings.steps / best["steps"])):
            best = entry
    return (best["lrs"][name], best) if best else None


def lr_plan(problem: Problem, settings: Settings, spec: OptimizerSpec, given: dict[str, float]) -> dict[str, Any]:
    """How ``spec`` gets its learning rate: ``{"source": given|shipped|sweep|default, "lr": ..., ...}``."""
    if spec.text in given:
        return {"source": "given", "lr": given[spec.text]}
    if settings.tune in ("auto", "shipped"):
        hit = shipped_lr(problem, settings, spec.text)
        if hit is not None:
            lr, entry = hit
            return {"source": "shipped", "lr": lr, "record": {k: v for k, v in entry.items() if k not in ("lrs", "trials")},
                    "trials": entry.get("trials", {}).get(spec.text, [])}
        if settings.tune == "shipped":
            return {"source": "default", "lr": spec.default_lr, "note": "no shipped lr for this task"}
    if settings.tune in ("auto", "sweep"):
        return {"source": "sweep", "lr": None, "base_lr": spec.default_lr}
    return {"source": "default", "lr": spec.default_lr}


def _plan(spec: OptimizerSpec, plan: dict[str, Any], s: Settings) -> Iterator[list[RunSpec]]:
    """The runs of one optimizer, wave by wave (a generator that receives each wave's records).

    Sweep (successive halving): every lr of ``base_lr * tune_grid`` trained for ``tune_fraction`` of
    the steps on the tuning seed; while the best one is at an edge of the grid, one more lr beyond it
    (at most ``tune_extend`` times); then the best ``tune_keep`` at the full step count; the best of
    those is the chosen lr. Then one run per seed at the chosen lr."""
    if plan["source"] == "sweep":
        trials: list[dict[str, Any]] = []
        plan["trials"] = trials
        base = plan["base_lr"]
        grid = sorted(s.tune_grid)
        short = max(min(20, s.steps), int(round(s.steps * s.tune_fraction)))
        lrs = [base * m for m in grid]
        ratio = grid[1] / grid[0] if len(grid) > 1 else 3.0
        scored: dict[float, float] = {}
        wave = [RunSpec(spec.text, lr, s.tune_seed, short, "tune", 0) for lr in lrs]
        for extension in range(s.tune_extend + 1):
            recs = yield wave
            for run, rec in zip(wave, recs):
                scored[run.lr] = run_score(rec)
                trials.append({"lr": run.lr, "steps": run.steps, "rung": 0, "score": scored[run.lr], "error": rec.get("error")})
            if extension == s.tune_extend or len(grid) < 2:
                break
            ordered = sorted(scored)
            finite = [lr for lr in ordered if math.isfinite(scored[lr])]
            best = min(finite, key=lambda lr: scored[lr]) if finite else None
            if best is None or best == ordered[0]:  # best at the low edge (or all failed): one lower
                nxt = ordered[0] / ratio
            elif best == ordered[-1]:
                nxt = ordered[-1] * ratio
            else:
                break
            wave = [RunSpec(spec.text, nxt, s.tune_seed, short, "tune", 0)]
            plan["extensions"] = plan.get("extensions", 0) + 1
        finite = sorted((lr for lr in scored if math.isfinite(scored[lr])), key=lambda lr: scored[lr])
        ordered = sorted(scored)
        if not finite:
            plan["lr"] = base
            plan["note"] = "every sweep run failed; the registry default lr is used"
        else:
            top = finite[: max(1, s.tune_keep)]
            if short < s.steps:
                wave = [RunSpec(spec.text, lr, s.tune_seed, s.steps, "tune", 1) for lr in top]
                recs = yield wave
                full = {}
                for run, rec in zip(wave, recs):
                    full[run.lr] = run_score(rec)
                    trials.append({"lr": run.lr, "steps": run.steps, "rung": 1, "score": full[run.lr], "error": rec.get("error")})
                ok = [lr for lr in top if math.isfinite(full[lr])]
                plan["lr"] = min(ok, key=lambda lr: full[lr]) if ok else top[0]
            else:
                plan["lr"] = top[0]
            if plan["lr"] in (ordered[0], ordered[-1]) and len(ordered) > 1:
                plan["note"] = "the chosen lr is at the edge of the swept range"
        plan["runs_tuning"] = len(trials)
        plan["tuning_steps"] = sum(t["steps"] for t in trials)
    yield [RunSpec(spec.text, plan["lr"], seed, s.steps, "eval") for seed in s.seeds]


def expected_runs(plan: dict[str, Any], s: Settings) -> int:
    n = len(s.seeds)
    if plan["source"] == "sweep":
        short = max(min(20, s.steps), int(round(s.steps * s.tune_fraction)))
        n += len(s.tune_grid) + (max(1, s.tune_keep) if short < s.steps else 0)
    return n


# ----------------------------------------------------------------------------- running


def _worker_init(threads: int | None) -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers

    if threads:
        torch.set_num_threads(threads)
    quiet()


def _load_record(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "final_train_loss" in rec else None


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


def _fmt_loss(rec: dict[str, Any]) -> str:
    if rec.get("error"):
        return f"FAILED: {rec['error'][:120]}"
    parts = []
    if math.isfinite(rec.get("final_val_loss", math.nan)):
        parts.append(f"val {rec['final_val_loss']:.4f}")
    parts.append(f"train {rec['final_train_loss']:.4f}")
    return " ".join(parts)


class RunsFailing(RuntimeError):
    """Every run so far failed: something systematic is wrong, so the comparison stops."""


class _Driver:
    """Runs the plans' waves on a pool of worker processes (or in this process with one job),
    saving each record as it arrives and skipping finished ones on resume."""

    def __init__(self, problem: Problem, s: Settings, out_dir: str, resume: bool, log: Callable[[str], None]):
        self.problem, self.s, self.out_dir, self.resume, self.log = problem, s, out_dir, resume, log
        self.runs_dir = os.path.join(out_dir, "runs")
        os.makedirs(self.runs_dir, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        self.done = 0
        self.total = 0
        self.skipped = 0
        self.failed = 0
        self.succeeded = 0

    def run(self, plans: dict[str, Iterator[list[RunSpec]]], total: Callable[[], int]) -> dict[str, dict[str, Any]]:
        waves: dict[str, tuple[list[RunSpec], dict[str, dict[str, Any]]]] = {}
        pending: deque[tuple[str, RunSpec]] = deque()

        def advance(name: str, sent: list[dict[str, Any]] | None) -> None:
            gen = plans[name]
            try:
                wave = next(gen) if sent is None else gen.send(sent)
            except StopIteration:
                waves.pop(name, None)
                return
            waves[name] = (wave, {})
            pending.extend((name, r) for r in wave)

        def finish(name: str, run: RunSpec, rec: dict[str, Any], skipped: bool) -> None:
            self.done += 1
            if rec.get("error"):
                self.failed += 1
            else:
                self.succeeded += 1
            self.total = max(total(), self.done + len(pending))
            self.records[run.id] = rec
            if not skipped:
                _write_json(os.path.join(self.runs_dir, f"{run.id}.json"), rec)
            tag = "finished earlier, skipped (--resume)" if skipped else f"{_fmt_loss(rec)} ({rec['wall_s']:.0f} s)"
            self.log(f"[{self.done}/{self.total}] {run.describe()}: {tag}")
            if not self.succeeded and self.failed >= min(3, self.total):
                raise RunsFailing(f"the first {self.failed} runs all failed (last: {rec['error']}); stopping")
            wave, got = waves[name]
            got[run.id] = rec
            if len(got) == len({r.id for r in wave}):
                advance(name, [got[r.id] for r in wave])

        def cached(run: RunSpec) -> dict[str, Any] | None:
            if run.id in self.records:
                return self.records[run.id]
            if self.resume:
                rec = _load_record(os.path.join(self.runs_dir, f"{run.id}.json"))
                if rec is not None:
                    self.skipped += 1
                return rec
            return None

        for name in plans:
            advance(name, None)
        args = (asdict(self.problem), asdict(self.s))
        if self.s.jobs <= 1:
            while pending:
                name, run = pending.popleft()
                rec = cached(run)
                if rec is not None:
                    finish(name, run, rec, True)
                    continue
                finish(name, run, execute_run(*args, asdict(run), self.out_dir), False)
            return self.records
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        futures: dict[Any, tuple[str, RunSpec]] = {}
        pool = ProcessPoolExecutor(self.s.jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                   initargs=(self.s.threads,))
        try:
            while pending or futures:
                while pending and len(futures) < self.s.jobs:
                    name, run = pending.popleft()
                    rec = cached(run)
                    if rec is not None:
                        finish(name, run, rec, True)
                        continue
                    futures[pool.submit(execute_run, *args, asdict(run), self.out_dir)] = (name, run)
                if not futures:
                    continue
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for f in done:
                    name, run = futures.pop(f)
                    try:
                        rec = f.result()
                    except Exception as e:  # noqa: BLE001 - a worker that died
                        rec = {**asdict(run), "id": run.id, "error": f"worker failed: {type(e).__name__}: {e}",
                               "train_loss": [], "val_steps": [], "val_loss": [], "final_train_loss": math.nan,
                               "final_val_loss": math.nan, "wall_s": 0.0, "train_step_s": math.nan,
                               "state_bytes": 0, "num_params": 0}
                    finish(name, run, rec, False)
        except BaseException:
            # Ctrl-C (or a failure here): stop the workers now instead of waiting for their runs
            for f in futures:
                f.cancel()
            for proc in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(Exception):
                    proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return self.records


# ----------------------------------------------------------------------------- timing


class _PlainPrecision:
    scaler = None

    @staticmethod
    def train_step_context():
        return contextlib.nullcontext()


class _FakeTrainer:
    """What HessianDiagCallback.estimate reads from a Trainer, outside of one."""

    def __init__(self, optimizer: Any):
        self.global_step = 0
        self.global_rank = 0
        self.world_size = 1
        self.precision_plugin = _PlainPrecision()
        self.optimizers = [optimizer]


def _sample_batches(built: Built, n: int, device: Any) -> list[Any]:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    dm = built.datamodule
    if dm is not None:
        with contextlib.suppress(Exception):
            dm.prepare_data()
        dm.setup("fit")
        loader = dm.train_dataloader()
    else:
        loader = built.module.train_dataloader()
    out = []
    for b in loader:
        out.append(move_data_to_device(b, device))
        if len(out) == n:
            break
    if not out:
        raise RuntimeError("the training dataloader is empty")
    return out


def _loss_of(module: Any, batch: Any):
    out = module.training_step(batch, 0)
    return out["loss"] if isinstance(out, dict) else out


def _iqr(xs: list[float]) -> float:
    """Interquartile range relative to the median (0 for fewer than 2 values)."""
    if len(xs) < 2:
        return 0.0
    q1, _, q3 = quantiles(xs, n=4, method="inclusive")
    m = median(xs)
    return (q3 - q1) / m if m > 0 else math.nan


def _spread(xs: list[float]) -> float:
    m = median(xs)
    return (max(xs) - min(xs)) / m if m > 0 else math.nan


def measure_step_times(
    problem: Problem,
    s: Settings,
    entries: list[tuple[OptimizerSpec, float]],
    log: Callable[[str], None] = print,
    baseline: str = "adamw",
) -> dict[str, Any]:
    """Time every optimizer in this process, interleaved.

    Each optimizer gets its own copy of the model (the same initialization) and the same
    ``timing_steps`` batches. After two warm-up steps each, ``timing_reps`` rounds run; in every
    round each optimizer takes ``timing_steps`` real training steps (forward + backward + step) in
    turn, the order rotating between rounds. The optimizer step and forward + backward are timed
    separately; curvature optimizers also time one Hessian estimate per round, counted in the whole
    step divided by its interval. Reported: the median over rounds and the spread (max - min) /
    median; ratios to ``baseline`` are taken round by round (neighbours in time) and summarized by
    their median, min and max."""
    import torch

    device = torch.device("cuda" if s.device == "cuda" else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    quiet()
    threads_before = torch.get_num_threads()
    if s.threads:  # time with the thread count the runs trained with (one per worker on a small machine)
        torch.set_num_threads(s.threads)
    try:
        return _measure(problem, s, entries, log, baseline, device, sync)
    finally:
        torch.set_num_threads(threads_before)


def _measure(problem, s, entries, log, baseline, device, sync) -> dict[str, Any]:
    import torch

    items = []
    batches = None
    for spec, lr in entries:
        try:
            built = build_problem(problem, seed=s.seeds[0], steps=s.steps, attention=spec.attention)
            module = built.module
            if not getattr(module, "automatic_optimization", True):
                raise RuntimeError("the module uses manual optimization")
            inject_optimizer(module, spec, lr=lr, scheduler="constant", warmup_steps=0, total_steps=s.steps,
                             weight_decay=s.weight_decay, optimizer_kwargs=s.optimizer_kwargs)
            module.to(device).train()
            cfg = module.configure_optimizers()
            opt = cfg["optimizer"] if isinstance(cfg, dict) else cfg
            if batches is None:
                batches = _sample_batches(built, max(1, s.timing_steps), device)
            cb = None
            if spec.curvature is not None:
                from .callbacks import HessianDiagCallback

                cb = HessianDiagCallback(estimator=spec.curvature, every_n_steps=s.curvature_every,
                                         math_attention=spec.curvature == "hutchinson", log_stats=False)
                mark = getattr(opt, "expect_external_hessian", None)
                if callable(mark):
                    mark()
            items.append({"spec": spec, "module": module, "opt": opt, "cb": cb, "fb": [], "step": [], "curv": []})
        except Exception as e:  # noqa: BLE001
            log(f"timing: {spec.text} skipped ({type(e).__name__}: {e})")
    if not items:
        return {"error": "no optimizer could be timed"}

    def params_of(opt):
        return [p for g in opt.param_groups for p in g["params"] if p.grad is not None]

    def estimate(it, batch):
        trainer = _FakeTrainer(it["opt"])
        params = params_of(it["opt"])
        diag = it["cb"].estimate(trainer, it["module"], batch, params)
        it["opt"].update_hessian({p: d for p, d in zip(params, diag) if d is not None})

    def steps(it, record: bool):
        fb = st = 0.0
        for b in batches:
            sync()
            t0 = time.perf_counter()
            loss = _loss_of(it["module"], b)
            loss.backward()
            sync()
            t1 = time.perf_counter()
            if it["cb"] is not None and not it["curv_ready"]:
                estimate(it, b)
                it["curv_ready"] = True
                t1 = time.perf_counter()
            it["opt"].step()
            sync()
            t2 = time.perf_counter()
            it["opt"].zero_grad(set_to_none=True)
            fb += t1 - t0
            st += t2 - t1
        if record:
            it["fb"].append(fb / len(batches))
            it["step"].append(st / len(batches))
        if it["cb"] is not None:  # one estimate per round, timed alone
            loss = _loss_of(it["module"], batches[0])
            loss.backward()
            sync()
            t0 = time.perf_counter()
            estimate(it, batches[0])
            sync()
            if record:
                it["curv"].append(time.perf_counter() - t0)
            it["opt"].zero_grad(set_to_none=True)

    load0 = _loadavg()
    t_start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for it in items:
            it["curv_ready"] = False
            try:
                steps(it, record=False)
            except Exception as e:  # noqa: BLE001
                it["error"] = f"{type(e).__name__}: {e}"
        items_ok = [it for it in items if "error" not in it]
        for rep in range(s.timing_reps):
            k = rep % max(1, len(items_ok))
            order = items_ok[k:] + items_ok[:k]
            for it in order:
                steps(it, record=True)
    out: dict[str, Any] = {
        "method": (f"{s.timing_reps} rounds x {s.timing_steps} training steps per optimizer in one process on "
                   f"{device.type} ({torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}), interleaved (order rotated each round), after "
                   "a warm-up round; median over rounds, spread = (max - min) / median"),
        "reps": s.timing_reps,
        "steps_per_rep": s.timing_steps,
        "threads": torch.get_num_threads(),
        "device": device.type,
        "seconds": time.perf_counter() - t_start,
        "loadavg_before": load0,
        "loadavg_after": _loadavg(),
        "optimizers": {},
    }
    base = next((it for it in items_ok if it["spec"].text == baseline), None)
    for it in items:
        name = it["spec"].text
        if "error" in it:
            out["optimizers"][name] = {"error": it["error"]}
            continue
        every = s.curvature_every
        whole = [fb + st + (it["curv"][i] / every if it["curv"] else 0.0) for i, (fb, st) in enumerate(zip(it["fb"], it["step"]))]
        row = {
            "step_ms": 1e3 * median(it["step"]),
            "step_spread": _spread(it["step"]),
            "whole_ms": 1e3 * median(whole),
            "whole_spread": _spread(whole),
            "fwd_bwd_ms": 1e3 * median(it["fb"]),
            "curvature_ms": 1e3 * median(it["curv"]) if it["curv"] else None,
            "curvature_every": every if it["curv"] else None,
            "state_bytes": _state_bytes(it["opt"]),
        }
        if base is not None:
            bwhole = [fb + st for fb, st in zip(base["fb"], base["step"])]
            r_step = [a / b for a, b in zip(it["step"], base["step"]) if b > 0]
            r_whole = [a / b for a, b in zip(whole, bwhole) if b > 0]
            row.update(step_ratio=median(r_step), step_ratio_min=min(r_step), step_ratio_max=max(r_step),
                       whole_ratio=median(r_whole), whole_ratio_min=min(r_whole), whole_ratio_max=max(r_whole),
                       step_ratio_iqr=_iqr(r_step), whole_ratio_iqr=_iqr(r_whole))
        out["optimizers"][name] = row
    for it in items:  # free the copies
        it.clear()
    return out


def _state_bytes(opt: Any) -> int:
    from .optim._base import optimizer_state_bytes

    return optimizer_state_bytes(opt)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ----------------------------------------------------------------------------- the whole protocol


def run_protocol(
    problem: Problem,
    settings: Settings,
    optimizers: list[OptimizerSpec],
    out_dir: str,
    *,
    given_lrs: dict[str, float] | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    timing: bool = True,
) -> dict[str, Any]:
    """Tune (or look up) each optimizer's lr, train every seed, time the steps; return the results
    (also written to ``out_dir/results.json`` as runs finish)."""
    given_lrs = given_lrs or {}
    t0 = time.perf_counter()
    plans = {spec.text: lr_plan(problem, settings, spec, given_lrs) for spec in optimizers}
    def total() -> int:
        return sum(expected_runs(p, settings) + p.get("extensions", 0) for p in plans.values())

    driver = _Driver(problem, settings, out_dir, resume, log)
    results: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "meta": dict(meta or {}),
        "problem": asdict(problem),
        "settings": asdict(settings),
        "optimizers": [s.text for s in optimizers],
        "baseline": "adamw",
        "lr": plans,
        "runs": [],
        "timing": None,
        "times": {},
    }
    gens = {spec.text: _plan(spec, plans[spec.text], settings) for spec in optimizers}
    try:
        records = driver.run(gens, total)
    finally:
        results["runs"] = list(driver.records.values())
        results["times"]["training_s"] = time.perf_counter() - t0
        results["times"]["skipped_runs"] = driver.skipped
        _write_json(os.path.join(out_dir, "results.json"), results)
    del records
    if timing and settings.timing_reps > 0:
        log(f"timing: {len(optimizers)} optimizers, {settings.timing_reps} interleaved rounds of {settings.timing_steps} steps ...")
        t1 = time.perf_counter()
        try:
            results["timing"] = measure_step_times(problem, settings, [(spec, plans[spec.text]["lr"]) for spec in optimizers], log)
        except Exception as e:  # noqa: BLE001 - timing is a bonus; the losses stand without it
            results["timing"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"timing failed: {results['timing']['error']}")
        results["times"]["timing_s"] = time.perf_counter() - t1
    results["times"]["total_s"] = time.perf_counter() - t0
    _write_json(os.path.join(out_dir, "results.json"), results)
    return results


def settings_replace(s: Settings, **kw: Any) -> Settings:
    return replace(s, **kw)
