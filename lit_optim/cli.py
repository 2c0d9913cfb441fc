"""``lit-optim``: list what the package offers, and compare optimizers on a real task.

    lit-optim list
    lit-optim compare                                  # the default comparison (charlm)
    lit-optim compare --task digits --optimizers adamw,adan,lion --steps 300 --out runs/digits
    lit-optim compare --text my_corpus.txt --model-size base --device cuda
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time

from .registry import OPTIMIZERS, available_optimizers, get_optimizer_info

#: the default comparison: AdamW and lit_optim optimizers from different families
DEFAULT_OPTIMIZERS = ("adamw", "adan", "lion", "muon", "normuon", "auon", "sophia", "frugal")

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
    """A bad argument: reported in one line with a non-zero exit."""


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


def _parse_lrs(spec: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    if not spec:
        return out
    for item in spec.split(","):
        if "=" not in item:
            raise CLIError(f"--lr expects NAME=VALUE pairs separated by commas, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip().lower()] = float(v)
        except ValueError:
            raise CLIError(f"--lr value for {k!r} is not a number: {v!r}") from None
        if out[k.strip().lower()] <= 0:
            raise CLIError(f"--lr value for {k!r} must be > 0, got {v}")
    return out


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import device_available, run_comparison, write_report

    names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    if not names:
        raise CLIError("--optimizers is empty")
    for n in names:
        try:
            get_optimizer_info(n)
        except ValueError as e:
            raise CLIError(str(e)) from None
    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    lrs = _parse_lrs(args.lr)
    unknown = set(lrs) - set(names)
    if unknown:
        raise CLIError(f"--lr names optimizers that are not compared: {sorted(unknown)}")
    sweep = None
    if args.lr_sweep:
        try:
            sweep = [float(v) for v in args.lr_sweep.split(",") if v.strip()]
        except ValueError:
            raise CLIError(f"--lr-sweep expects comma-separated numbers, got {args.lr_sweep!r}") from None
        if not sweep or any(not (v > 0 and math.isfinite(v)) for v in sweep):
            raise CLIError(f"--lr-sweep multipliers must be finite and > 0, got {args.lr_sweep!r}")
    text = None
    if args.text is not None:
        if args.task != "charlm":
            raise CLIError("--text applies to --task charlm only")
        if not os.path.isfile(args.text):
            raise CLIError(f"--text file not found: {args.text}")
        with open(args.text, encoding="utf-8", errors="replace") as f:
            text = f.read()
    if not device_available(args.device):
        raise CLIError(f"--device {args.device} is not available on this machine")
    if "adamw" not in names:
        print("note: adamw is not in --optimizers; the report's 'steps to AdamW loss' column needs it", file=sys.stderr)
    t0 = time.perf_counter()
    results = run_comparison(
        names,
        out=args.out,
        lrs=lrs,
        lr_sweep=sweep,
        task=args.task,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        text=text,
        device=args.device,
        model_size=args.model_size,
        progress_bar=not args.no_progress,
    )
    if args.task == "digits":
        data = "scikit-learn's bundled handwritten digits"
    else:
        data = f"user text {args.text}" if args.text else "Python standard library source (character level)"
    meta = {
        "task": args.task,
        "data": data,
        "steps": args.steps,
        "batch size": args.batch_size,
        "seed": args.seed,
        "device": args.device,
        "model size": args.model_size,
        **({"lr sweep": "x" + ",".join(f"{v:g}" for v in sweep)} if sweep else {}),
        "total time": f"{time.perf_counter() - t0:.0f} s",
    }
    report = write_report(results, args.out, meta)
    print("\n" + report)
    print(f"report: {os.path.join(args.out, 'report.md')}  plot: {os.path.join(args.out, 'loss.png')}")
    failed = [r.optimizer for r in results if r.error]
    if failed:
        print(f"failed runs: {failed}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-optim", description="lit_optim command line")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every optimizer and callback with its paper and when to use it")
    c = sub.add_parser("compare", help="train the same model with several optimizers and write a report")
    c.add_argument("--task", default="charlm", choices=["charlm", "digits"])
    c.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS), help="comma-separated names (lit-optim list)")
    c.add_argument("--steps", type=int, default=400)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--text", default=None, help="charlm: train on this text file instead of the stdlib source")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    c.add_argument("--model-size", default="small", choices=["tiny", "small", "base"])
    c.add_argument("--lr", default=None, help="per-optimizer learning rates, e.g. adamw=3e-3,muon=0.02")
    c.add_argument(
        "--lr-sweep",
        default=None,
        help="multipliers of each optimizer's lr, e.g. 0.3,1,3: train each at every one and report its best "
        "(lowest final validation loss); multiplies the time by their number",
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed a one-line usage error
        return int(e.code or 0)
    try:
        if args.command == "list":
            return _cmd_list(args)
        return _cmd_compare(args)
    except CLIError as e:
        print(f"lit-optim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lit-optim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
