"""Overhead per training step of AdaptiveBatchSizeCallback and GradClipMedianCallback on a small
Lightning model on CPU, as a ratio to the same run without the callback.

    .venv/bin/python -m benchmarks.callback_overhead_grad                 # ~3 minutes on 2 cores
    .venv/bin/python -m benchmarks.callback_overhead_grad --width 1024    # a ~1.1M-parameter model
    .venv/bin/python -m benchmarks.callback_overhead_grad --only abs_norm_micro,clip_median_norm

Model: an MLP 64-W-W-10 on scikit-learn's digits, micro-batch 32, AdamW (``--width`` W=256:
~85k parameters, a step dominated by Lightning's own per-step cost; W=1024: ~1.1M parameters).

Method (paired, in one run): each configuration trains ``--blocks`` blocks of ``--block`` optimizer
steps; the callback under test is in ``trainer.callbacks`` for every other block and absent for
the others (Lightning reads that list at every hook call), so the steps with and without it are
interleaved in the same process, on the same model and data stream, and noise from other
processes on a shared machine hits both alike. The time of a step is the process CPU time between
consecutive optimizer steps (one torch thread). The ratio is median(step with) / median(step
without) over all blocks after the first two, and the reported figure the median over ``--reps``
runs, with its spread. ``empty_callback`` is an empty ``L.Callback()``: Lightning's own cost of
dispatching one more callback, which every callback pays.

AdaptiveBatchSizeCallback runs with accumulation 2 and the paper's default eta/theta, but its
growth is disabled (the subclass below runs the statistics and the test, then keeps the batch):
every checked step pays for the statistics and the test, and both halves of the run train the
same batches. GradClipMedianCallback uses ``factor``/``threshold`` so large that nothing is
clipped (the work of deciding is timed; clipping itself is one multiply of the gradients).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_optim.callbacks import AdaptiveBatchSizeCallback, GradClipMedianCallback


def digits() -> TensorDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return TensorDataset(x, y)


class MLP(L.LightningModule):
    def __init__(self, data: TensorDataset, batch_size: int = 32, width: int = 256):
        super().__init__()
        torch.manual_seed(0)
        self.data = data
        self.batch_size = batch_size
        self.net = nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True, drop_last=True)


def ce_loss(module, batch):
    x, y = batch
    return F.cross_entropy(module.net(x), y)


class MeasuredABS(AdaptiveBatchSizeCallback):
    """Runs the statistics and the test of every checked step but never grows the batch."""

    def _observe(self, stats):
        self.last_result = self.controller.observe(stats)


class BuiltinClip:
    """Stands for Lightning's own ``Trainer(gradient_clip_val=...)`` (norm clipping): Toggle sets
    ``trainer.gradient_clip_val`` while it is "in", for comparison."""

    def __init__(self, value: float):
        self.value = value


class Toggle(L.Callback):
    """Puts ``targets`` into ``trainer.callbacks`` for one block of optimizer steps, takes them
    out for the next, and so on; records each step's CPU time under the state it ran in."""

    def __init__(self, targets: list, block: int):
        self.builtin = [t for t in targets if isinstance(t, BuiltinClip)]
        self.targets = [t for t in targets if not isinstance(t, BuiltinClip)]
        self.block = block
        self.on: list[float] = []
        self.off: list[float] = []
        self.enabled = False
        self._last_step = -1
        self._stamp = 0.0

    def on_train_start(self, trainer, pl_module):
        self._stamp = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step:
            return  # a micro-batch that did not step
        self._last_step = step
        now = time.process_time()
        block_index = (step - 1) // self.block
        if block_index >= 2:  # the first two blocks warm both states up
            (self.on if self.enabled else self.off).append(now - self._stamp)
        if step % self.block == 0:
            if self.enabled:
                for cb in self.targets:
                    trainer.callbacks.remove(cb)
            else:
                for cb in reversed(self.targets):
                    trainer.callbacks.insert(0, cb)
            self.enabled = not self.enabled
            for b in self.builtin:
                trainer.gradient_clip_val = b.value if self.enabled else None
        self._stamp = time.process_time()


def paired_ratio(data, accumulation: int, make_callbacks: Callable[[], list], args) -> tuple[float, float]:
    targets = make_callbacks()
    toggle = Toggle(targets, args.block)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.block * args.blocks,
        accumulate_grad_batches=accumulation,
        # the targets start outside trainer.callbacks (Toggle adds them after the first block);
        # their set-up hooks reach them through the relay
        callbacks=[_SetupRelay(toggle.targets), toggle],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(MLP(data, args.batch_size, args.width))
    on, off = statistics.median(toggle.on), statistics.median(toggle.off)
    return on / off, off


class _SetupRelay(L.Callback):
    """Forwards the set-up hooks to callbacks that are not (yet) in ``trainer.callbacks``."""

    def __init__(self, targets):
        self.targets = targets

    def setup(self, trainer, pl_module, stage):
        for cb in self.targets:
            cb.setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module):
        for cb in self.targets:
            cb.on_fit_start(trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        for cb in self.targets:
            cb.on_train_start(trainer, pl_module)


BIG = 1e9  # clipping factor / threshold that never clips


def configurations():
    abs_kw = {"max_batch_size": 1 << 20, "initial_accumulation": 2}
    return {
        # name: (accumulation, callbacks factory)
        "empty_callback_acc2": (2, lambda: [L.Callback()]),
        "abs_norm_micro": (2, lambda: [MeasuredABS("norm", **abs_kw)]),
        "abs_norm_micro_every10": (2, lambda: [MeasuredABS("norm", check_every_n_steps=10, **abs_kw)]),
        "abs_inner_product_micro": (2, lambda: [MeasuredABS("inner_product", **abs_kw)]),
        "abs_coordinate_micro": (2, lambda: [MeasuredABS("coordinate", **abs_kw)]),
        "abs_norm_per_example": (2, lambda: [MeasuredABS("norm", stats="per_example", loss_fn=ce_loss, **abs_kw)]),
        "empty_callback_acc1": (1, lambda: [L.Callback()]),
        "clip_median_norm": (1, lambda: [GradClipMedianCallback("norm", window=100, factor=BIG)]),
        "clip_median_norm_stochastic": (
            1,
            lambda: [GradClipMedianCallback("norm", estimator="stochastic", factor=BIG)],
        ),
        "clip_median_coordinate": (1, lambda: [GradClipMedianCallback("coordinate", factor=BIG)]),
        "clip_constant_norm": (1, lambda: [GradClipMedianCallback("constant", threshold=BIG)]),
        # for comparison: Lightning's built-in norm clipping, Trainer(gradient_clip_val=...)
        "lightning_gradient_clip_val": (1, lambda: [BuiltinClip(BIG)]),
    }


TARGETS = {
    "abs_norm_micro": 1.10,
    "abs_norm_micro_every10": 1.10,
    "abs_inner_product_micro": 1.10,
    "abs_coordinate_micro": 1.10,
    "clip_median_norm": 1.03,
    "clip_median_norm_stochastic": 1.03,
    "clip_median_coordinate": 1.03,
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--block", type=int, default=10, help="optimizer steps per block")
    ap.add_argument("--blocks", type=int, default=30, help="blocks per run (half with the callback)")
    ap.add_argument("--only", default="", help="comma-separated configuration names")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a small model)")
    ap.add_argument("--width", type=int, default=256, help="hidden width of the MLP (256: 85k parameters)")
    ap.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    args = ap.parse_args(argv)
    if args.blocks < 4:
        ap.error(f"--blocks must be >= 4 (the first two blocks are warm-up), got {args.blocks}")
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    data = digits()
    configs = configurations()
    if args.only:
        configs = {k: v for k, v in configs.items() if k in set(args.only.split(","))}
    ratios: dict[str, list[float]] = {k: [] for k in configs}
    base_ms: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.reps):
        for name, (acc, make) in configs.items():
            r, off = paired_ratio(data, acc, make, args)
            ratios[name].append(r)
            base_ms[name].append(1e3 * off)
    n_params = sum(p.numel() for p in MLP(data, args.batch_size, args.width).parameters())
    print(
        f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} thread(s), "
        f"MLP width {args.width} ({n_params / 1e3:.0f}k parameters), micro-batch {args.batch_size}, "
        f"{args.reps} runs x {args.blocks} blocks x {args.block} steps"
    )
    print(f"{'configuration':30s} {'ms/step without':>15s} {'ratio':>7s} {'min..max':>13s}  target")
    for name in configs:
        rs = ratios[name]
        target = TARGETS.get(name)
        print(
            f"{name:30s} {statistics.median(base_ms[name]):15.3f} {statistics.median(rs):7.3f} "
            f"{min(rs):6.3f}..{max(rs):5.3f}  {'' if target is None else f'<= {target:.2f}'}"
        )


if __name__ == "__main__":
    main()
