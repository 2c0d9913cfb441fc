"""The optimizer comparison behind ``lit-optim compare``: the same model, data order, seed and
schedule shape trained once per optimizer with Lightning, then a report (table + loss curves)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
import torch

from .optim._base import optimizer_state_bytes
from .registry import get_optimizer_info
from .tasks import TaskModule, build_task

__all__ = ["RunResult", "run_comparison", "run_one", "steps_to_reach", "write_report"]


@dataclass
class RunResult:
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
    #: with an lr sweep: (lr, final validation loss, final train loss) of every run of this optimizer
    sweep: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def final_train_loss(self) -> float:
        """Mean training loss over the last 10% of steps (at least 5)."""
        if not self.train_loss:
            return math.nan
        tail = self.train_loss[-_window(len(self.train_loss)):]
        return sum(tail) / len(tail)

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1] if self.val_loss else math.nan

    @property
    def bytes_per_param(self) -> float:
        return self.state_bytes / max(1, self.num_params)


class _Recorder(L.Callback):
    """Records the training loss of every step, validation losses, and the time spent in
    training steps (forward, backward, optimizer; validation excluded)."""

    def __init__(self, result: RunResult):
        self.r = result
        self._t0 = 0.0
        self.train_time = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_time += time.perf_counter() - self._t0
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.r.train_loss.append(float(loss.detach()))

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        v = trainer.callback_metrics.get("val_loss")
        if v is not None:
            self.r.val_steps.append(int(trainer.global_step))
            self.r.val_loss.append(float(v))


def _ema(xs: list[float], beta: float = 0.9) -> list[float]:
    out: list[float] = []
    m = None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


def _window(n: int) -> int:
    return max(5, n // 10)


def steps_to_reach(losses: list[float], target: float, window: int | None = None) -> int | None:
    """First step (1-based) at which the mean training loss over the trailing ``window`` steps
    (default: 10% of the run, at least 5, the window of :attr:`RunResult.final_train_loss`) is
    <= ``target``."""
    w = window or _window(len(losses))
    acc = 0.0
    for i, v in enumerate(losses):
        acc += v
        if i >= w:
            acc -= losses[i - w]
        if i + 1 >= w and acc / w <= target + 1e-12:
            return i + 1
    return None


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
    progress_bar: bool = True,
    optimizer_kwargs: dict[str, Any] | None = None,
    curvature_every: int = 10,
    tb_version: str | None = None,
) -> RunResult:
    """Train the task's model with optimizer ``name`` for ``steps`` optimizer steps."""
    from lightning.pytorch.loggers import TensorBoardLogger

    info = get_optimizer_info(name)
    lr = info.default_lr if lr is None else lr
    # Hutchinson needs double backward through attention: fused SDPA kernels have none
    attention = "math" if info.curvature == "hutchinson" else "sdpa"
    L.seed_everything(seed, verbose=False)
    model, train_set, val_set, _ = build_task(
        task, steps=steps, batch_size=batch_size, seed=seed, text=text, model_size=model_size, attention=attention
    )
    module = TaskModule(
        model,
        train_set,
        val_set,
        optimizer=name,
        lr=lr,
        batch_size=batch_size,
        scheduler="cosine",
        warmup_steps=max(1, steps // 20),
        total_steps=steps,
        seed=seed,
        optimizer_kwargs=optimizer_kwargs,
    )
    result = RunResult(optimizer=name, lr=lr, steps=steps, num_params=sum(p.numel() for p in model.parameters()))
    recorder = _Recorder(result)
    callbacks: list[L.Callback] = [recorder]
    if info.curvature is not None:
        from .callbacks import HessianDiagCallback

        callbacks.append(HessianDiagCallback(estimator=info.curvature, every_n_steps=curvature_every))
    val_every = val_every or max(1, steps // 10)
    steps_per_epoch = len(train_set) // batch_size
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="gpu" if device == "cuda" else device,
        devices=1,
        logger=TensorBoardLogger(os.path.join(out, "tensorboard"), name=name, version=tb_version or f"seed{seed}"),
        callbacks=callbacks,
        val_check_interval=min(val_every, steps_per_epoch),
        check_val_every_n_epoch=None if val_every < steps_per_epoch else 1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        log_every_n_steps=max(1, min(10, steps // 20)),
    )
    t0 = time.perf_counter()
    try:
        trainer.fit(module)
    except Exception as e:  # noqa: BLE001 - one optimizer failing must not lose the others' results
        result.error = f"{type(e).__name__}: {e}"
    result.wall_time_s = time.perf_counter() - t0
    result.step_time_s = recorder.train_time / max(1, len(result.train_loss))
    if trainer.optimizers:
        result.state_bytes = optimizer_state_bytes(trainer.optimizers[0])
    if not result.val_loss or result.val_steps[-1] != trainer.global_step:
        if result.error is None:
            metrics = trainer.validate(module, verbose=False)
            if metrics:
                result.val_steps.append(int(trainer.global_step))
                result.val_loss.append(float(metrics[0]["val_loss"]))
    return result


def run_comparison(
    optimizers: list[str],
    *,
    out: str,
    lrs: dict[str, float] | None = None,
    lr_sweep: list[float] | None = None,
    **kwargs: Any,
) -> list[RunResult]:
    """Run :func:`run_one` for each optimizer (at ``lrs[name]``, else its registry default lr).

    ``lr_sweep``: multipliers of that lr; each optimizer is trained once per multiplier (same seed,
    data order and schedule) and its run with the lowest final validation loss is the one reported,
    with every run's losses in :attr:`RunResult.sweep`. The choice is made on the validation loss
    it reports, so a swept figure is an optimistic estimate for every optimizer alike."""
    lrs = lrs or {}
    os.makedirs(out, exist_ok=True)
    results = []
    seed = kwargs.get("seed", 0)
    for name in optimizers:
        base = lrs.get(name, get_optimizer_info(name).default_lr)
        runs = []
        for mult in lr_sweep or [1.0]:
            lr = base * mult
            print(f"\n=== {name}{f' lr {lr:g}' if lr_sweep else ''} ===", flush=True)
            version = f"seed{seed}-lr{lr:g}" if lr_sweep else None
            runs.append(run_one(name, out=out, lr=lr, tb_version=version, **kwargs))
        ok = [r for r in runs if r.error is None and math.isfinite(r.final_val_loss)]
        best = min(ok, key=lambda r: r.final_val_loss) if ok else runs[0]
        if lr_sweep:
            best.sweep = [(r.lr, r.final_val_loss, r.final_train_loss) for r in runs]
        results.append(best)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return results


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_report(results: list[RunResult], out: str, meta: dict[str, Any], baseline: str = "adamw") -> str:
    """Write ``out/report.md`` and ``out/loss.png``; return the report text."""
    base = next((r for r in results if r.optimizer == baseline and r.error is None), None)
    target = base.final_train_loss if base else None
    lines = [
        "# lit-optim compare",
        "",
        " ".join(f"**{k}**: {v}" for k, v in meta.items()),
        "",
        f"Final train loss: mean of the last 10% of steps. Steps to reach {baseline}'s final train loss: first "
        "step where the mean train loss over the same trailing window gets there. Time/step: forward + backward + optimizer, "
        "validation excluded. State: bytes of optimizer-state tensors per model parameter.",
        "",
        f"| optimizer | lr | final train loss | final val loss | steps to {baseline} loss | ms/step | time vs {baseline} | state bytes/param |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.optimizer} | {r.lr:g} | failed: {r.error.splitlines()[0][:120]} | | | | | |")
            continue
        reach = steps_to_reach(r.train_loss, target) if target is not None else None
        ratio = r.step_time_s / base.step_time_s if base else math.nan
        lines.append(
            f"| {r.optimizer} | {r.lr:g} | {_fmt(r.final_train_loss)} | {_fmt(r.final_val_loss)} | "
            f"{reach if reach is not None else 'not reached'} | {r.step_time_s * 1e3:.1f} | {_fmt(ratio, 2)}x | "
            f"{r.bytes_per_param:.1f} |"
        )
    swept = [r for r in results if r.sweep]
    if swept:
        lines += [
            "",
            "Learning-rate sweep: each optimizer was trained at every lr below (same seed, data and schedule); "
            "the table above shows its run with the lowest final validation loss (bold here).",
            "",
            "| optimizer | lr: final val loss (final train loss) |",
            "|---|---|",
        ]
        for r in swept:
            cells = []
            for lr, val, train in r.sweep:
                cell = f"{lr:g}: {_fmt(val)} ({_fmt(train)})"
                cells.append(f"**{cell}**" if lr == r.lr else cell)
            lines.append(f"| {r.optimizer} | {'; '.join(cells)} |")
    lines += ["", "![loss curves](loss.png)", "", f"TensorBoard: `tensorboard --logdir {os.path.join(out, 'tensorboard')}`", ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    _plot(results, os.path.join(out, "loss.png"))
    return text


def _plot(results: list[RunResult], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib is not installed (pip install 'lit-optim[plot]'): loss.png not written")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        if r.error or not r.train_loss:
            continue
        a1.plot(range(1, len(r.train_loss) + 1), _ema(r.train_loss), label=r.optimizer, lw=1.2)
        if r.val_loss:
            a2.plot(r.val_steps, r.val_loss, marker="o", ms=3, label=r.optimizer)
    a1.set(title="training loss (EMA 0.9)", xlabel="optimizer step", ylabel="loss")
    a2.set(title="validation loss", xlabel="optimizer step", ylabel="loss")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    finite = [v for r in results if not r.error for v in r.train_loss if math.isfinite(v)]
    if finite:
        lo = min(finite)
        hi = sorted(finite)[int(0.95 * (len(finite) - 1))]
        a1.set_ylim(lo * 0.95, hi * 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_available(device: str) -> bool:
    return device == "cpu" or (device == "cuda" and torch.cuda.is_available())
