"""Python entry points of the optimizer comparison behind ``lit-optim compare``.

The protocol (problems, learning-rate tuning, seeded runs, interleaved timing) lives in
:mod:`lit_optim.compare_protocol`, the report in :mod:`lit_optim.report`. This module keeps the
single-run helper :func:`run_one` (used by the benchmarks) and :func:`compare`, the protocol as a
function call::

    from lit_optim.compare import compare
    results = compare(["adamw", "muon"], out_dir="runs/mine", task="digits", steps=300, seeds=3)
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .compare_protocol import (
    Problem,
    RunSpec,
    Settings,
    execute_run,
    final_loss,
    parse_optimizer_list,
    parse_optimizer_spec,
    run_protocol,
    steps_to_reach,
)

__all__ = ["RunResult", "compare", "device_available", "run_one", "steps_to_reach"]


@dataclass
class RunResult:
    """One training run (see :func:`run_one`)."""

    optimizer: str
    lr: float
    steps: int
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    step_time_s: float = 0.0
    state_bytes: int = 0
    num_params: int = 0
    error: str | None = None

    @property
    def final_train_loss(self) -> float:
        """Mean training loss over the last 10% of steps (at least 5)."""
        return final_loss(self.train_loss)

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1] if self.val_loss else math.nan

    @property
    def bytes_per_param(self) -> float:
        return self.state_bytes / max(1, self.num_params)


def run_one(
    name: str,
    *,
    task: str = "charlm",
    steps: int = 300,
    batch_size: int = 32,
    seed: int = 0,
    out: str = "runs/compare",
    lr: float | None = None,
    text: str | None = None,
    device: str = "cpu",
    model_size: str = "small",
    val_every: int | None = None,
    progress_bar: bool = False,
    optimizer_kwargs: dict[str, Any] | None = None,
    curvature_every: int = 10,
    scheduler: str = "cosine",
) -> RunResult:
    """Train a built-in task's model with optimizer ``name`` (registry default lr unless ``lr``)
    for ``steps`` steps, cosine schedule with 5% warm-up. ``text``: charlm training text (the text
    itself). ``optimizer_kwargs``: extra constructor arguments of the optimizer."""
    spec = parse_optimizer_spec(name)
    lr = spec.default_lr if lr is None else lr
    if text is not None:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "text.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        text = path
    problem = Problem(kind="task", task=task, model_size=model_size, text_path=text, batch_size=batch_size)
    settings = Settings(steps=steps, seeds=[seed], scheduler=scheduler, val_every=val_every, device=device,
                        curvature_every=curvature_every, optimizer_kwargs=dict(optimizer_kwargs or {}))
    run = RunSpec(spec.text, lr, seed, steps)
    rec = execute_run(asdict(problem), asdict(settings), asdict(run), out)
    return RunResult(
        optimizer=name, lr=lr, steps=steps, train_loss=rec["train_loss"], val_steps=rec["val_steps"],
        val_loss=rec["val_loss"], wall_time_s=rec["wall_s"],
        step_time_s=rec["train_step_s"] if math.isfinite(rec["train_step_s"]) else 0.0,
        state_bytes=rec["state_bytes"], num_params=rec["num_params"], error=rec["error"],
    )


def compare(
    optimizers: list[str] | str,
    out_dir: str,
    *,
    task: str = "charlm",
    model_size: str = "small",
    steps: int = 400,
    seeds: int = 3,
    batch_size: int = 32,
    lrs: dict[str, float] | None = None,
    tune: str = "auto",
    report: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """The ``lit-optim compare`` protocol on a built-in task, as a function; returns the results
    dict (also ``out_dir/results.json``) and writes the report unless ``report=False``."""
    specs = parse_optimizer_list(optimizers if isinstance(optimizers, str) else ",".join(optimizers))
    problem = Problem(kind="task", task=task, model_size=model_size, batch_size=batch_size)
    s = Settings(steps=steps, seeds=list(range(seeds)), tune=tune, **settings)
    os.makedirs(out_dir, exist_ok=True)
    results = run_protocol(problem, s, specs, out_dir, given_lrs=lrs, meta={"label": task}, log=print)
    if report:
        from .report import write_report

        write_report(out_dir, results)
    return results


def device_available(device: str) -> bool:
    return device == "cpu" or (device == "cuda" and torch.cuda.is_available())
