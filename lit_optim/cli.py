"""``lit-optim``: list what the package offers, compare optimizers on a task or on your own model,
and regenerate a comparison's report.

    lit-optim list
    lit-optim compare                                   # fair default comparison on charlm
    lit-optim compare --quick                           # the same protocol, smaller: under 2 minutes on 2 cores
    lit-optim compare --module my_pkg.models:MyModule --datamodule my_pkg.data:MyData --steps 1000
    lit-optim compare --hf-model ./gpt2-small-config.json --dataset corpus.txt
    lit-optim report runs/compare/latest
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shlex
import sys
import time
from typing import Any

from .registry import OPTIMIZERS, available_optimizers

#: the default comparison: AdamW and lit_optim optimizers from different families
DEFAULT_OPTIMIZERS = ("adamw", "adan", "lion", "muon", "normuon", "auon", "sophia", "frugal")
#: ``--quick``: four families (baseline, orthogonalized, sign, memory-reduced)
QUICK_OPTIMIZERS = ("adamw", "muon", "lion", "frugal")

#: defaults of ``lit-optim compare`` (``QUICK`` replaces some with ``--quick``)
DEFAULTS: dict[str, Any] = {
    "task": "charlm",
    "model_size": "small",
    "optimizers": ",".join(DEFAULT_OPTIMIZERS),
    "steps": 400,
    "seeds": 3,
    "seed": 0,
    "batch_size": 32,
    "scheduler": "cosine",
    "warmup": 0.05,
    "tune": "auto",
    "tune_grid": "0.1,0.3,1,3,10",
    "tune_fraction": 0.25,
    "tune_keep": 3,
    "timing_reps": 7,
    "timing_steps": 5,
    "out": os.path.join("runs", "compare"),
    "device": "cpu",
    "jobs": "auto",
    "val_metric": "val_loss",
}
QUICK: dict[str, Any] = {
    "optimizers": ",".join(QUICK_OPTIMIZERS),
    "steps": 200,
    "seeds": 2,
    "timing_reps": 5,
    "timing_steps": 3,
}
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true")

#: callbacks listed by ``lit-optim list``: (import path, paper, when to use it)
CALLBACKS = (
    ("lit_optim.callbacks.HessianDiagCallback", "Sophia (Liu et al. 2023); ADAHESSIAN (Yao et al. 2021)",
     "feeds Sophia/AdaHessian curvature under automatic optimization; logs trace(H) vs 2/lr"),
    ("lit_optim.callbacks.AdaptiveBatchSizeCallback", "AdAdaGrad (Lau et al. 2024)",
     "grow the batch size when gradient noise dominates, with linear/sqrt lr scaling"),
    ("lit_optim.callbacks.GradClipMedianCallback", "SGD with Clipping is Secretly Estimating the Median Gradient (Schaipp et al. 2024)",
     "clip at a threshold that tracks the median gradient norm instead of a hand-tuned constant"),
    ("lit_optim.callbacks.WeightAveragingCallback", "Understanding SGD with EMA (2024); DiWA (Rame et al. 2022)",
     "several EMA/uniform weight averages at once, validated side by side"),
    ("lit_optim.callbacks.StabilityGapEvaluator", "Continual evaluation for lifelong learning (De Lange et al. 2023)",
     "evaluate earlier tasks every few steps to see the stability gap; min-ACC, WC-ACC"),
)


class CLIError(Exception):
    """A bad argument: reported in one line with exit code 2, before any training."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``lit-optim compare: error: ... (see --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34, width=min(110, max(80, _term_width())))


def _term_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


# ----------------------------------------------------------------------------- list


def _cmd_list(args: argparse.Namespace) -> int:
    print("Optimizers (lit_optim.create_optimizer(model, NAME) / configure_optimizers(self, NAME)):\n")
    for name in available_optimizers():
        info = OPTIMIZERS[name]
        print(f"  {name:<14} {info.cls.__name__:<16} [{info.family}] default lr {info.default_lr:g}")
        print(f"  {'':<14} paper: {info.paper}")
        print(f"  {'':<14} use: {info.summary}\n")
    print("Callbacks (lightning.Trainer(callbacks=[...])):\n")
    for path, paper, use in CALLBACKS:
        mod, _, cls = path.rpartition(".")
        try:
            getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError):
            continue
        print(f"  {cls}\n      paper: {paper}\n      use: {use}\n")
    return 0


# ----------------------------------------------------------------------------- argument checks


def _parse_lrs(spec: str | None, names: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    if not spec:
        return out
    for item in spec.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise CLIError(f"--lr expects NAME=VALUE pairs separated by commas, got {item!r}")
        k, v = item.split("=", 1)
        key = k.strip().lower().replace("-", "_")
        try:
            val = float(v)
        except ValueError:
            raise CLIError(f"--lr value for {k!r} is not a number: {v!r}") from None
        if not (val > 0 and math.isfinite(val)):
            raise CLIError(f"--lr value for {k!r} must be finite and > 0, got {v}")
        out[key] = val
    unknown = sorted(set(out) - set(names))
    if unknown:
        raise CLIError(f"--lr names optimizers that are not compared: {', '.join(unknown)}")
    return out


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{flag} expects comma-separated numbers, got {text!r}") from None
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise CLIError(f"{flag} multipliers must be finite and > 0, got {text!r}")
    return sorted(set(vals))


def _json_arg(text: Any, flag: str) -> dict[str, Any]:
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return text
    try:
        val = json.loads(text)
    except ValueError as e:
        raise CLIError(f"{flag} must be a JSON object like '{{\"hidden\": 64}}': {e}") from None
    if not isinstance(val, dict):
        raise CLIError(f"{flag} must be a JSON object, got {type(val).__name__}")
    return val


def _int_arg(name: str, value: Any, minimum: int = 1) -> int:
    try:
        v = int(str(value).strip())
    except (TypeError, ValueError):
        raise CLIError(f"--{name} must be an integer, got {value!r}") from None
    _need(v >= minimum, f"--{name} must be an integer >= {minimum}, got {value}")
    return v


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise CLIError(msg)


def _load_config(path: str, dests: set[str]) -> dict[str, Any]:
    """Options from a JSON or YAML file: keys are option names (``steps``, ``batch-size`` or
    ``batch_size``); ``module``/``datamodule`` may be LightningCLI-style ``{class_path, init_args}``."""
    if not os.path.isfile(path):
        raise CLIError(f"--config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is a bad argument
        raise CLIError(f"--config {path}: cannot parse ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CLIError(f"--config {path}: expected a mapping of option names to values")
    out: dict[str, Any] = {}
    for key, val in data.items():
        dest = str(key).replace("-", "_")
        if dest in ("module", "datamodule") and isinstance(val, dict):
            if "class_path" not in val:
                raise CLIError(f"--config {path}: {key} needs class_path")
            out[dest] = val["class_path"]
            if val.get("init_args"):
                out[f"{dest}_args"] = val["init_args"]
            continue
        if dest not in dests or dest == "config":
            raise CLIError(f"--config {path}: unknown option {key!r}")
        if isinstance(val, list):
            val = ",".join(str(v) for v in val)
        out[dest] = val
    return out


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- compare


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Config file values where the command line gave none, then ``--quick`` and the defaults."""
    if args.config:
        dests = {a.dest for a in parser._actions}
        for k, v in _load_config(args.config, dests).items():
            if getattr(args, k, None) in (None, False):
                setattr(args, k, v)
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def _problem_and_checks(args: argparse.Namespace):
    from .compare_protocol import Problem, load_object
    from .tasks import CHARLM_SIZES

    kinds = [k for k, v in (("--module", args.module), ("--hf-model", args.hf_model)) if v]
    _need(len(kinds) <= 1, "--module and --hf-model exclude each other")
    if args.module:
        for flag, val in (("--text", args.text), ("--batch-size", args.batch_size_given), ("--dataset", args.dataset)):
            _need(not val, f"{flag} does not apply to --module (your module or datamodule loads its data)")
        _need(not args.task_given, "--task does not apply to --module")
        margs = _json_arg(args.module_args, "--module-args")
        dargs = _json_arg(args.datamodule_args, "--datamodule-args")
        import lightning as L

        try:
            factory = load_object(args.module)
        except ValueError as e:
            raise CLIError(f"--module {args.module}: {e}") from None
        _need(callable(factory), f"--module {args.module}: not a class or function")
        if args.datamodule:
            try:
                dm_factory = load_object(args.datamodule)
            except ValueError as e:
                raise CLIError(f"--datamodule {args.datamodule}: {e}") from None
            _need(callable(dm_factory), f"--datamodule {args.datamodule}: not a class or function")
        else:
            _need(not dargs, "--datamodule-args without --datamodule")
        problem = Problem(kind="module", module=args.module, module_args=margs, datamodule=args.datamodule,
                          datamodule_args=dargs, val_metric=args.val_metric)
        # build once here, so that a module that cannot be built fails before any training
        try:
            inst = factory(**margs)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"--module {args.module}: building it failed ({type(e).__name__}: {e})") from None
        _need(isinstance(inst, L.LightningModule), f"--module {args.module}: gives a {type(inst).__name__}, not a LightningModule")
        from lightning.pytorch.utilities.model_helpers import is_overridden

        _need(is_overridden("training_step", inst, L.LightningModule), f"--module {args.module}: has no training_step")
        if args.datamodule:
            try:
                dm = dm_factory(**dargs)
            except Exception as e:  # noqa: BLE001
                raise CLIError(f"--datamodule {args.datamodule}: building it failed ({type(e).__name__}: {e})") from None
            _need(isinstance(dm, L.LightningDataModule),
                  f"--datamodule {args.datamodule}: gives a {type(dm).__name__}, not a LightningDataModule")
        return problem
    _need(not args.module_args, "--module-args without --module")
    _need(not args.datamodule, "--datamodule without --module")
    if args.hf_model:
        _need(not args.text, "--text applies to the built-in charlm task; with --hf-model use --dataset FILE")
        _need(not args.task_given, "--task does not apply to --hf-model")
        _need(bool(args.dataset), "--hf-model needs --dataset FILE (a text file to train on)")
        _need(os.path.isfile(args.dataset), f"--dataset file not found: {args.dataset}")
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise CLIError("--hf-model needs transformers: pip install -e '.[hf]' in the lit_optim clone (or pip install transformers peft accelerate)") from None
        from .tasks import hf_max_positions, hf_token_ids, load_hf_config

        try:
            config = load_hf_config(args.hf_model)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"--hf-model {args.hf_model}: cannot load a config ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        _need(type(config) in MODEL_FOR_CAUSAL_LM_MAPPING,
              f"--hf-model {args.hf_model}: {type(config).__name__} has no causal-LM model class")
        max_pos = hf_max_positions(config)
        block = args.block_size or min(128, max_pos or 128)
        _need(block >= 2, f"--block-size must be >= 2, got {block}")
        _need(max_pos is None or block <= max_pos, f"--block-size {block} exceeds the model's {max_pos} positions")
        with open(args.dataset, encoding="utf-8", errors="replace") as f:
            text = f.read()
        try:
            ids, _ = hf_token_ids(text, config, args.hf_model, args.tokenizer)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"--dataset {args.dataset}: {str(e).splitlines()[0]}") from None
        _need(len(ids) >= 10 * (block + 1),
              f"--dataset {args.dataset}: {len(ids)} tokens is too short for block size {block} (needs {10 * (block + 1)})")
        return Problem(kind="hf", hf_model=args.hf_model, dataset=args.dataset, block_size=args.block_size,
                       tokenizer=args.tokenizer, batch_size=args.batch_size, val_metric=args.val_metric)
    _need(not args.dataset, "--dataset goes with --hf-model (for the charlm task use --text FILE)")
    _need(not args.tokenizer and not args.block_size, "--tokenizer and --block-size go with --hf-model")
    if args.text is not None:
        _need(args.task == "charlm", "--text applies to --task charlm only")
        _need(os.path.isfile(args.text), f"--text file not found: {args.text}")
        need = 10 * (CHARLM_SIZES[args.model_size]["block_size"] + 1)
        _need(os.path.getsize(args.text) >= need, f"--text file {args.text} is too short (needs at least {need} characters)")
    if args.task == "digits":
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise CLIError("--task digits needs scikit-learn: pip install -e '.[data]' in the lit_optim clone (or pip install scikit-learn)") from None
    return Problem(kind="task", task=args.task, model_size=args.model_size, text_path=args.text,
                   batch_size=args.batch_size, val_metric=args.val_metric)


def _settings_and_checks(args: argparse.Namespace, n_optimizers: int):
    from .compare_protocol import Settings
    from .factory import SCHEDULES

    positive_int = _int_arg

    def number(name: str, value: Any) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise CLIError(f"--{name} must be a number, got {value!r}") from None
        _need(math.isfinite(v), f"--{name} must be finite, got {value}")
        return v

    steps = positive_int("steps", args.steps)
    n_seeds = positive_int("seeds", args.seeds)
    first = positive_int("seed", args.seed, 0)
    _need(args.scheduler in SCHEDULES, f"--scheduler must be one of {', '.join(SCHEDULES)}, got {args.scheduler!r}")
    warm = number("warmup", args.warmup)
    _need(0.0 <= warm < 1.0, f"--warmup must be a fraction of the steps in [0, 1), got {args.warmup}")
    val_every = None if args.val_every is None else positive_int("val-every", args.val_every, 0)
    wd = None if args.weight_decay is None else number("weight-decay", args.weight_decay)
    _need(wd is None or wd >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    _need(args.precision is None or args.precision in PRECISIONS,
          f"--precision must be one of {', '.join(PRECISIONS)}, got {args.precision!r}")
    _need(args.tune in ("auto", "shipped", "sweep", "none"), f"--tune must be auto, shipped, sweep or none, got {args.tune!r}")
    grid = _floats(args.tune_grid, "--tune-grid")
    if args.lr_sweep:
        grid = _floats(args.lr_sweep, "--lr-sweep")
        _need(args.tune in ("auto", "sweep"), "--lr-sweep means --tune sweep; it conflicts with --tune " + str(args.tune))
        args.tune = "sweep"
    frac = number("tune-fraction", args.tune_fraction)
    _need(0.0 < frac <= 1.0, f"--tune-fraction must be in (0, 1], got {args.tune_fraction}")
    keep = positive_int("tune-keep", args.tune_keep)
    reps = positive_int("timing-reps", args.timing_reps, 0)
    tsteps = positive_int("timing-steps", args.timing_steps)
    from .compare import device_available

    _need(args.device in ("cpu", "cuda"), f"--device must be cpu or cuda, got {args.device!r}")
    _need(device_available(args.device), f"--device {args.device} is not available on this machine")
    cores = _cpu_count()
    if args.jobs == "auto":
        jobs = 1 if args.device == "cuda" else max(1, min(cores, 4))
    else:
        jobs = positive_int("jobs", args.jobs)
    threads = positive_int("threads", args.threads) if args.threads is not None else (
        max(1, cores // jobs) if jobs > 1 else None)
    return Settings(
        steps=steps, seeds=list(range(first, first + n_seeds)), scheduler=args.scheduler, warmup_fraction=warm,
        val_every=val_every, device=args.device, precision=args.precision,
        weight_decay=wd,
        tune=args.tune, tune_grid=grid, tune_fraction=frac, tune_keep=keep, timing_reps=reps, timing_steps=tsteps,
        jobs=jobs, threads=threads,
    )


def _run_dir(args: argparse.Namespace, label: str, problem, settings) -> tuple[str, str]:
    """The run folder (created and checked writable) and its name."""
    from dataclasses import asdict

    root = args.out
    if args.name is not None:
        name = args.name
        _need(bool(name) and name not in (".", "..", "latest") and "/" not in name and os.sep not in name,
              f"--name must be a plain folder name, got {name!r}")
    elif args.resume:
        latest = os.path.join(root, "latest")
        _need(os.path.exists(latest), f"--resume: no earlier comparison in {root} (pass --name NAME of the one to resume)")
        name = os.path.basename(os.path.realpath(latest))
    else:
        name = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
        k = 2
        while os.path.exists(os.path.join(root, name)):
            name = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}-{k}"
            k += 1
    run_dir = os.path.join(root, name)
    saved = os.path.join(run_dir, "results.json")
    if args.resume:
        _need(os.path.isdir(os.path.join(run_dir, "runs")), f"--resume: nothing to resume in {run_dir}")
        if os.path.exists(saved):
            try:
                with open(saved) as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = None
            if old:
                now = {"problem": asdict(problem), **settings.protocol_key()}
                before = {"problem": old.get("problem"), **{k: old.get("settings", {}).get(k) for k in settings.protocol_key()}}
                for k, v in now.items():
                    if json.loads(json.dumps(v)) != before.get(k):
                        raise CLIError(f"--resume: {run_dir} was run with a different {k} ({before.get(k)!r}, now {v!r}); "
                                       "use another --name")
    else:
        _need(not os.path.exists(saved) and not os.path.isdir(os.path.join(run_dir, "runs")),
              f"{run_dir} already holds a comparison; pass --resume to continue it, or another --name")
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CLIError(f"--out {root}: cannot write there ({e.strerror or e})") from None
    latest = os.path.join(root, "latest")
    try:
        tmp = os.path.join(root, f".latest-{os.getpid()}")
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(name, tmp)
        os.replace(tmp, latest)
    except OSError:
        pass  # no symlinks here: the printed path is enough
    return run_dir, name


def _cmd_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .compare_protocol import RunsFailing, parse_optimizer_list, quiet, run_protocol

    t_start = time.perf_counter()
    args.task_given = args.task is not None
    args.batch_size_given = args.batch_size is not None
    args = _resolve(args, parser)
    try:
        specs = parse_optimizer_list(args.optimizers)
    except ValueError as e:
        raise CLIError(str(e)) from None
    names = [s.text for s in specs]
    args.batch_size = _int_arg("batch-size", args.batch_size)
    if args.block_size is not None:
        args.block_size = _int_arg("block-size", args.block_size, 2)
    problem = _problem_and_checks(args)
    settings = _settings_and_checks(args, len(specs))
    given = _parse_lrs(args.lr, names)
    quiet()
    from .compare_protocol import _sample_batches, build_problem

    try:  # builds the seed-0 model and one batch: anything that cannot be built fails here, before training
        built = build_problem(problem, seed=settings.seeds[0], steps=settings.steps)
        _sample_batches(built, 1, "cpu")
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"cannot build the model/data: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    seen: set[int] = set()
    n_params = sum(p.numel() for p in built.module.parameters() if p.requires_grad and id(p) not in seen and not seen.add(id(p)))
    del built
    run_dir, name = _run_dir(args, problem.label, problem, settings)
    import platform

    import torch

    from . import __version__

    desc = _describe(problem, args)
    meta = {
        "label": problem.label,
        "model": desc["model"],
        "data": desc["data"],
        "parameters": f"{n_params:,}",
        "batch size": problem.batch_size if problem.kind != "module" else "set by your data",
        "device": settings.device + (f" ({settings.precision})" if settings.precision else ""),
        "machine": f"{platform.machine()}, {_cpu_count()} CPU cores" + (
            f", {torch.cuda.get_device_name(0)}" if settings.device == "cuda" else ""),
        "cpu cores": _cpu_count(),
        "workers": f"{settings.jobs} process{'es' if settings.jobs > 1 else ''}"
                   + (f" x {settings.threads} thread{'s' if settings.threads != 1 else ''}" if settings.threads else ""),
        "software": f"lit_optim {__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "run folder": run_dir,
        "command": "lit-optim " + " ".join(shlex.quote(a) for a in args.argv),
    }
    say = (lambda msg: None) if args.no_progress else (lambda msg: print(msg, flush=True))
    from .compare_protocol import expected_runs, lr_plan

    plans = {s.text: lr_plan(problem, settings, s, given) for s in specs}
    srcs: dict[str, list[str]] = {}
    for n, p in plans.items():
        srcs.setdefault(p["source"], []).append(n)
    total = sum(expected_runs(p, settings) for p in plans.values())
    print(f"lit-optim compare: {problem.label} ({desc['model']}, {n_params:,} parameters) -- {len(specs)} optimizers x "
          f"{len(settings.seeds)} seeds x {settings.steps} steps, {total} runs on {meta['workers']}", flush=True)
    print("learning rates: " + "; ".join(f"{k} ({', '.join(v)})" for k, v in srcs.items()), flush=True)
    print(f"output: {run_dir}" + (" (resuming)" if args.resume else ""), flush=True)
    if "adamw" not in names:
        print("note: adamw is not in --optimizers; the report compares against AdamW when it is", file=sys.stderr)
    import signal

    def _terminate(signum, frame):  # SIGTERM stops the workers and keeps finished runs, like Ctrl-C
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        signal.signal(signal.SIGTERM, _terminate)
    try:
        results = run_protocol(problem, settings, specs, run_dir, given_lrs=given, resume=args.resume, meta=meta, log=say)
    except RunsFailing as e:
        print(f"lit-optim compare: {e}. Records: {run_dir}/runs", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished runs are kept in {run_dir}/runs. Continue with the same command plus "
              f"--resume --name {name}", file=sys.stderr)
        return 130
    results["times"]["wall_s"] = time.perf_counter() - t_start
    t = results["times"]
    results["meta"]["time"] = (f"{t['wall_s'] / 60:.1f} min in all: {t['training_s']:.0f} s of training runs, "
                               f"{t.get('timing_s', 0):.0f} s of step timing"
                               + (f"; {t['skipped_runs']} runs done earlier (--resume)" if t.get("skipped_runs") else ""))
    from .compare_protocol import _write_json
    from .report import recommendation, write_report

    _write_json(os.path.join(run_dir, "results.json"), results)
    write_report(run_dir, results)
    from .report import aggregate

    stats, metric = aggregate(results)
    rec = recommendation(stats, metric, task=problem.label)
    print("\n" + "\n\n".join(rec) + "\n")
    print(f"report: {os.path.join(run_dir, 'report.md')} (and report.html, loss.png); {results['meta']['time']}")
    failed = sorted({r["optimizer"] for r in results["runs"] if r.get("error") and r.get("phase") == "eval"})
    if failed:
        print(f"note: runs of {', '.join(failed)} failed (diverged or raised); the report says how", file=sys.stderr)
    if not any(s.ok for s in stats):
        return 1  # nothing to compare
    return 0


def _describe(problem, args) -> dict[str, str]:
    if problem.kind == "module":
        return {"model": f"{problem.module}", "data": problem.datamodule or "the module's own dataloaders"}
    if problem.kind == "hf":
        from .tasks import hf_has_weights, hf_tokenizer_path

        init = "pretrained weights" if hf_has_weights(problem.hf_model) else "random init from its config"
        tok = hf_tokenizer_path(problem.hf_model, problem.tokenizer)
        return {"model": f"{problem.hf_model} ({init})",
                "data": f"{problem.dataset} ({'tokenizer ' + tok if tok else 'character tokens'})"}
    if problem.task == "digits":
        return {"model": f"DigitsCNN ({problem.model_size})", "data": "scikit-learn's bundled 8x8 digits"}
    return {"model": f"TinyGPT ({problem.model_size})",
            "data": f"{problem.text_path} (characters)" if problem.text_path else "Python standard library source (characters)"}


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import load_results, write_report

    path = args.dir
    if not os.path.exists(os.path.join(path, "results.json")) and os.path.exists(os.path.join(path, "latest", "results.json")):
        path = os.path.join(path, "latest")
    _need(os.path.exists(os.path.join(path, "results.json")), f"no results.json in {args.dir}")
    try:
        results = load_results(path)
    except (OSError, ValueError) as e:
        raise CLIError(f"{path}/results.json cannot be read: {e}") from None
    _need(isinstance(results, dict) and results.get("version") == 2,
          f"{path}/results.json is not from this version of lit-optim compare")
    try:
        write_report(path, results)
    except OSError as e:
        raise CLIError(f"cannot write the report into {path}: {e.strerror or e}") from None
    print(f"report: {os.path.join(path, 'report.md')} (and report.html, loss.png)")
    return 0


# ----------------------------------------------------------------------------- parser

_COMPARE_DESCRIPTION = """\
Train the same model with several optimizers under one protocol and say which to use.

Protocol: every optimizer trains for --steps optimizer steps with the same model initialization,
data order and schedule (--scheduler with --warmup), once per seed (--seeds), each at a learning rate
tuned for the task: shipped for the built-in tasks (recorded from the same sweep), otherwise found
by a short successive-halving sweep on a separate seed (--tune). The report gives mean and spread of
the final losses over seeds, the steps each optimizer needs to reach AdamW's final loss, optimizer
state memory, step times measured interleaved in one process, and a recommendation written from
those numbers.

Each invocation writes its own folder OUT/NAME (NAME: the task and a timestamp, or --name) with
report.md, report.html, results.json and TensorBoard logs; OUT/latest points to the newest.

Your own model:  --module my_pkg.my_module:MyLightningModule [--datamodule my_pkg.data:MyDataModule]
  The module's configure_optimizers is replaced by lit_optim.configure_optimizers(module, NAME,
  lr=LR, scheduler=..., warmup_steps=..., total_steps=STEPS); everything else is yours.
Hugging Face:    --hf-model CONFIG.json|MODEL_DIR --dataset corpus.txt
"""


def build_parser() -> argparse.ArgumentParser:
    from .factory import SCHEDULES

    p = _Parser(prog="lit-optim", description="lit_optim: optimizers for Lightning and Hugging Face users; compare "
                "them on your task.", formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="every optimizer and callback with its paper and when to use it", formatter_class=_Formatter)
    c = sub.add_parser("compare", help="fair, seeded, tuned optimizer comparison with a recommendation",
                       description=_COMPARE_DESCRIPTION, formatter_class=_Formatter)
    d = DEFAULTS
    g = c.add_argument_group("what to train (default: the built-in charlm task)")
    g.add_argument("--task", choices=["charlm", "digits"], default=None,
                   help=f"built-in task: charlm (a small GPT on Python's own source, character level) or digits "
                        f"(scikit-learn's 8x8 digits, small CNN) (default: {d['task']})")
    g.add_argument("--model-size", choices=["tiny", "small", "base"], default=None,
                   help=f"size of the built-in task's model (default: {d['model_size']})")
    g.add_argument("--text", metavar="FILE", help="charlm: train on this text file instead of the Python source")
    g.add_argument("--module", metavar="PKG.MOD:CLASS",
                   help="your LightningModule class (or a function returning one), imported from the current directory "
                        "or the installed packages")
    g.add_argument("--module-args", metavar="JSON", help="keyword arguments for --module, a JSON object")
    g.add_argument("--datamodule", metavar="PKG.MOD:CLASS", help="your LightningDataModule (default: the module's own dataloaders)")
    g.add_argument("--datamodule-args", metavar="JSON", help="keyword arguments for --datamodule, a JSON object")
    g.add_argument("--hf-model", metavar="CONFIG_OR_DIR",
                   help="a Hugging Face causal LM: a config.json (random init) or a local model folder (its weights "
                        "and tokenizer when present)")
    g.add_argument("--dataset", metavar="FILE", help="--hf-model: the text file to train on (90%% train, 10%% validation)")
    g.add_argument("--tokenizer", metavar="DIR", help="--hf-model: tokenizer folder (default: the model folder's, else characters)")
    g.add_argument("--block-size", type=int, metavar="N", help="--hf-model: tokens per sequence (default: min(128, model positions))")
    g.add_argument("--batch-size", metavar="N", default=None, help=f"built-in tasks and --hf-model (default: {d['batch_size']})")
    g.add_argument("--val-metric", metavar="NAME", default=None,
                   help=f"the logged validation loss to rank by, lower is better (default: {d['val_metric']}; without it: "
                        "the training loss)")
    g.add_argument("--config", metavar="FILE",
                   help="JSON or YAML file of these options (keys like steps, optimizers, module: {class_path, init_args}); "
                        "the command line wins")
    g = c.add_argument_group("protocol")
    g.add_argument("--optimizers", metavar="LIST", default=None,
                   help=f"comma-separated names from `lit-optim list`, or WRAPPER:BASE for wrapper methods (e.g. sam:adamw) "
                        f"(default: {d['optimizers']}; --quick: {QUICK['optimizers']})")
    g.add_argument("--steps", metavar="N", default=None, help=f"optimizer steps per run (default: {d['steps']}; --quick: {QUICK['steps']})")
    g.add_argument("--seeds", metavar="N", default=None, help=f"seeds per optimizer (default: {d['seeds']}; --quick: {QUICK['seeds']})")
    g.add_argument("--seed", metavar="S", default=None, help=f"first seed; the seeds are S, S+1, ... (default: {d['seed']})")
    g.add_argument("--scheduler", metavar="NAME", default=None,
                   help=f"learning-rate schedule from lit_optim.factory: {', '.join(SCHEDULES)} (default: {d['scheduler']})")
    g.add_argument("--warmup", metavar="FRACTION", default=None, help=f"linear warm-up as a fraction of the steps (default: {d['warmup']})")
    g.add_argument("--val-every", metavar="N", default=None, help="validate every N steps, 0 = only at the end (default: steps/10)")
    g.add_argument("--weight-decay", metavar="WD", default=None, help="weight decay for every optimizer (default: each optimizer's own)")
    g.add_argument("--precision", metavar="P", default=None, help=f"Lightning precision: {', '.join(PRECISIONS)} (default: Lightning's)")
    g.add_argument("--quick", action="store_true", default=False,
                   help=f"a smaller run of the same protocol: {QUICK['optimizers']}, {QUICK['steps']} steps, {QUICK['seeds']} seeds "
                        "(under 2 minutes on 2 CPU cores)")
    g = c.add_argument_group("learning rates")
    g.add_argument("--tune", metavar="MODE", default=None,
                   help="auto: shipped lrs where recorded for this task, else a sweep; shipped: shipped or the registry default; "
                        f"sweep: always sweep; none: registry defaults (default: {d['tune']})")
    g.add_argument("--lr", metavar="NAME=LR,...", help="fix these optimizers' learning rates (not tuned), e.g. adamw=3e-3,muon=0.02")
    g.add_argument("--tune-grid", metavar="M,...", default=None,
                   help=f"sweep: multipliers of the registry default lr tried first (default: {d['tune_grid']})")
    g.add_argument("--tune-fraction", metavar="F", default=None,
                   help=f"sweep: length of the first-round runs as a fraction of --steps (default: {d['tune_fraction']})")
    g.add_argument("--tune-keep", metavar="K", default=None,
                   help=f"sweep: lrs kept for the full-length round (default: {d['tune_keep']})")
    g.add_argument("--lr-sweep", metavar="M,...", help="same as --tune sweep --tune-grid M,...")
    g = c.add_argument_group("step timing (interleaved, in one process, after training)")
    g.add_argument("--timing-reps", metavar="N", default=None,
                   help=f"interleaved rounds, 0 = no timing (default: {d['timing_reps']}; --quick: {QUICK['timing_reps']})")
    g.add_argument("--timing-steps", metavar="N", default=None,
                   help=f"training steps per optimizer per round (default: {d['timing_steps']}; --quick: {QUICK['timing_steps']})")
    g = c.add_argument_group("output and execution")
    g.add_argument("--out", metavar="DIR", default=None, help=f"parent folder of the run folders (default: {d['out']})")
    g.add_argument("--name", metavar="NAME", help="run folder name (default: TASK-YYYYmmdd-HHMMSS)")
    g.add_argument("--resume", action="store_true", default=False,
                   help="continue the comparison in OUT/NAME (default NAME: OUT/latest), skipping finished runs")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help=f"(default: {d['device']})")
    g.add_argument("--jobs", metavar="N", default=None,
                   help="runs trained at once in worker processes (default: auto = CPU cores up to 4 on cpu, 1 on cuda)")
    g.add_argument("--threads", metavar="N", default=None, help="torch threads per worker (default: cores / jobs)")
    g.add_argument("--no-progress", action="store_true", default=False, help="no per-run progress lines")
    r = sub.add_parser("report", help="regenerate report.md/report.html/plots of a comparison from its results.json",
                       formatter_class=_Formatter)
    r.add_argument("dir", metavar="DIR", help="a run folder (or OUT, meaning OUT/latest)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed a one-line error, or --help
        return int(e.code or 0)
    args.argv = argv
    try:
        if args.command == "list":
            return _cmd_list(args)
        if args.command == "report":
            return _cmd_report(args)
        compare = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["compare"]
        return _cmd_compare(args, compare)
    except CLIError as e:
        print(f"lit-optim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lit-optim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
