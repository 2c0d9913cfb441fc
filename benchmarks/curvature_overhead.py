"""Curvature overhead and steps-to-loss of Sophia / AdaHessian with HessianDiagCallback, against
AdamW, on a small GPT trained with Lightning on CPU (automatic optimization).

    .venv/bin/python -m benchmarks.curvature_overhead                 # ~4 minutes on an idle CPU
    .venv/bin/python -m benchmarks.curvature_overhead --parts timing  # only the step-time table
    .venv/bin/python -m benchmarks.curvature_overhead --sweep         # the learning-rate sweep behind LRS
    .venv/bin/python -m benchmarks.curvature_overhead --quick         # a smoke run

1. **Time per training step** (forward, backward, estimate, optimizer step; the data loader is
   outside the window), wall and process CPU time, each configuration timed in turn (A, B, C, A,
   B, C, ...) in one process with one intra-op thread, reported as ratios of medians to AdamW:
   Sophia + GNB every 10 steps, AdaHessian + Hutchinson every 10 steps (the estimator's forward
   on the math attention backend; also with the estimate on half of the batch), AdamW.
2. **Steps to AdamW's final loss**: AdamW trains ``--steps`` steps; Sophia-G trains up to twice as
   many; the held-out loss is evaluated every 10 steps and the first Sophia evaluation at or below
   AdamW's final one is reported.

The model is a 4-layer GPT (d=128, 4 heads, context 64, vocabulary 96) written here, with fused
``F.scaled_dot_product_attention``; the data are token sequences from a fixed random order-1
Markov chain (no download). Learning rates (constant after 20 warm-up steps, so that runs of
different lengths follow the same schedule): picked by a small sweep on this task for each
optimizer (see ``LRS``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_optim
from lit_optim.callbacks import HessianDiagCallback

LRS = {"adamw": 3e-3, "sophia": 5e-4, "adahessian": 0.03}
OPT_KWARGS: dict[str, dict] = {}


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 96, d: int = 128, heads: int = 4, layers: int = 4, block: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(block, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def markov_tokens(n: int, block: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)  # the chain is fixed; seed picks the sequences
    trans = torch.softmax(2.5 * torch.randn(vocab, vocab, generator=g), -1)
    g.manual_seed(seed)
    seq = torch.zeros(n, block + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(block):
        seq[:, t + 1] = torch.multinomial(trans[seq[:, t]], 1, generator=g).squeeze(1)
    return seq


class LitGPT(L.LightningModule):
    def __init__(
        self,
        optimizer: str,
        lr: float,
        steps: int,
        batch_size: int = 16,
        block: int = 64,
        vocab: int = 96,
        opt_kwargs: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(vocab=vocab, block=block)

    def forward(self, x):
        return self.model(x)

    def loss_fn(self, logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self):
        hp = self.hparams
        return lit_optim.configure_optimizers(
            self, hp.optimizer, lr=hp.lr, scheduler="constant", warmup_steps=20, **(hp.opt_kwargs or {})
        )

    def train_dataloader(self):
        hp = self.hparams
        seq = markov_tokens(hp.steps * hp.batch_size, hp.block, hp.vocab, seed=0)
        return DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=hp.batch_size, shuffle=False)


class StepTimer(L.Callback):
    """Wall time and process CPU time of each training step: on_train_batch_start ->
    on_train_batch_end (put first in the callback list so that other callbacks' end-of-step work is
    not counted). With one intra-op thread the CPU time is the step's own work even on a busy
    machine, where wall time also counts the time other processes hold the cores."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._t0 = self._c0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


class HeldOutLoss(L.Callback):
    def __init__(self, every: int = 10, n: int = 64):
        self.every = every
        seq = markov_tokens(n, 64, 96, seed=99)
        self.x, self.y = seq[:, :-1], seq[:, 1:]
        self.curve: list[tuple[int, float]] = []

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0:
            was = pl_module.training
            pl_module.eval()
            self.curve.append((step, float(pl_module.loss_fn(pl_module(self.x), self.y))))
            pl_module.train(was)


CONFIGS = {
    "adamw": ("adamw", None),
    "sophia+gnb/10": ("sophia", {"estimator": "gnb", "every_n_steps": 10}),
    "adahessian+hutchinson/10": (
        "adahessian",
        {"estimator": "hutchinson", "every_n_steps": 10, "math_attention": True},
    ),
    # the estimate on half of the batch (HessianDiagCallback(max_samples=8)): half its cost
    "adahessian+hutchinson/10 half": (
        "adahessian",
        {"estimator": "hutchinson", "every_n_steps": 10, "math_attention": True, "max_samples": 8},
    ),
}


def fit(config: str, steps: int, extra_callbacks=(), lr: float | None = None, opt_kwargs=None) -> StepTimer:
    name, cb_kwargs = CONFIGS[config]
    L.seed_everything(0, verbose=False)
    module = LitGPT(
        name, LRS[name] if lr is None else lr, steps, opt_kwargs={**OPT_KWARGS.get(name, {}), **(opt_kwargs or {})}
    )
    timer = StepTimer()
    callbacks = [timer]
    if cb_kwargs is not None:
        callbacks.append(HessianDiagCallback(log_stats=False, **cb_kwargs))
    callbacks.extend(extra_callbacks)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module)
    return timer


def step_time(steps: int, reps: int, warmup: int) -> dict[str, tuple[float, float]]:
    """(wall, cpu) seconds per step: median over repetitions of the mean over steps
    [warmup, steps) (a multiple of 10 steps, so each window holds the same number of estimates),
    configurations interleaved."""
    wall: dict[str, list[float]] = {c: [] for c in CONFIGS}
    cpu: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(reps):
        for config in CONFIGS:
            timer = fit(config, steps)
            t, c = timer.times[warmup:steps], timer.cpu[warmup:steps]
            wall[config].append(sum(t) / len(t))
            cpu[config].append(sum(c) / len(c))
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in CONFIGS}


def steps_to_loss(steps: int) -> tuple[float, int | None, list, list]:
    adam = HeldOutLoss()
    fit("adamw", steps, [adam])
    target = adam.curve[-1][1]
    sophia = HeldOutLoss()
    fit("sophia+gnb/10", 2 * steps, [sophia])
    reached = next((s for s, v in sophia.curve if v <= target), None)
    return target, reached, adam.curve, sophia.curve


def sweep(steps: int, grid: dict[str, list[tuple[float, dict]]]) -> None:
    """Held-out loss after ``steps`` steps for each (lr, extra optimizer kwargs): how ``LRS`` and
    ``OPT_KWARGS`` were picked."""
    for config, values in grid.items():
        for lr, kw in values:
            curve = HeldOutLoss()
            fit(config, steps, [curve], lr=lr, opt_kwargs=kw)
            print(
                f"  sweep {config:16s} lr {lr:<8g} {kw!s:20s} final held-out loss {curve.curve[-1][1]:.4f}", flush=True
            )


SWEEP = {
    "adamw": [(1e-3, {}), (3e-3, {}), (6e-3, {})],
    "sophia+gnb/10": [(5e-4, {}), (1e-3, {}), (2e-3, {}), (5e-3, {}), (2e-3, {"rho": 0.01}), (2e-3, {"rho": 0.2})],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="AdamW steps of the steps-to-loss run")
    ap.add_argument("--time-steps", type=int, default=50, help="steps per timing run (warm-up included)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions of the timing runs")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    ap.add_argument("--sweep", action="store_true", help="only run the learning-rate sweep behind LRS")
    ap.add_argument("--parts", default="timing,loss", help="comma-separated: timing, loss (default both)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.time_steps, args.reps = 30, 30, 1
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.sweep:
        sweep(args.steps, SWEEP)
        return 0
    parts = set(args.parts.split(","))
    warmup = 10
    if "timing" in parts:
        report_timing(args, warmup)
    if "loss" in parts:
        report_loss(args)
    return 0


def report_timing(args, warmup: int) -> None:
    times = step_time(args.time_steps, args.reps, warmup)
    base_wall, base_cpu = times["adamw"]
    print(
        f"\nTime per training step, small GPT (4 layers, d=128, context 64, batch 16), Lightning, CPU, "
        f"{args.threads} thread(s), median of {args.reps} interleaved runs of {args.time_steps - warmup} steps:"
    )
    print(f"{'configuration':32s} {'wall ms':>8s} {'vs AdamW':>9s} {'CPU ms':>8s} {'vs AdamW':>9s}")
    for config, (w, c) in times.items():
        print(f"{config:32s} {1e3 * w:8.1f} {w / base_wall:8.2f}x {1e3 * c:8.1f} {c / base_cpu:8.2f}x")


def report_loss(args) -> None:
    target, reached, adam_curve, sophia_curve = steps_to_loss(args.steps)
    print(f"\nSteps to AdamW's final held-out loss ({target:.4f} after {args.steps} steps, lr {LRS['adamw']}):")
    if reached is None:
        print(
            f"  Sophia-G (lr {LRS['sophia']}) did not reach it in {2 * args.steps} steps "
            f"(best {min(v for _, v in sophia_curve):.4f})"
        )
    else:
        print(f"  Sophia-G (lr {LRS['sophia']}, GNB every 10): {reached} steps = {reached / args.steps:.2f}x AdamW's")
    print("  AdamW curve :", " ".join(f"{s}:{v:.3f}" for s, v in adam_curve[:: max(1, len(adam_curve) // 8)]))
    print("  Sophia curve:", " ".join(f"{s}:{v:.3f}" for s, v in sophia_curve[:: max(1, len(sophia_curve) // 8)]))


if __name__ == "__main__":
    raise SystemExit(main())
