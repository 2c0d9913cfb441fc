"""Per-step overhead of the lit_optim ``TrainerCallback`` twins in Hugging Face's ``Trainer``, next
to the overhead of the Lightning callbacks they mirror, on the same model and data, as ratios to
the same run without the callback.

    .venv/bin/python -m benchmarks.hf_callback_overhead                 # a few minutes on 2 cores
    .venv/bin/python -m benchmarks.hf_callback_overhead --reps 3 --steps 40

Model: an MLP 64-256-256-10 (~85k parameters) on scikit-learn's digits, micro-batch 32, AdamW
(the model of ``benchmarks/callback_overhead_grad.py``). Pairs (configuration vs its baseline):

* median clipping: ``GradClipMedianCallback`` (norm mode, window 100) vs no callback, both with
  built-in clipping off (HF ``max_grad_norm=0``, Lightning ``gradient_clip_val=None``);
* EMA: ``WeightAveragingCallback`` (one EMA updated every step, no evaluation) vs no callback;
* adaptive batch size: ``AdaptiveBatchSizeCallback`` (norm test every step, ``eta`` so large that
  the batch never grows) vs no callback, both with gradient accumulation 3;
* Hessian estimates (HF only): ``CurvatureTrainer`` with Sophia and a GNB estimate every 10 steps
  vs ``Trainer`` with Sophia and no estimate.

The time per step is the median interval between consecutive optimizer steps after ``--warmup``
steps, measured in process CPU time by default (``--clock wall`` for wall time): on a machine
shared with other work, wall time mostly measures the others. Configurations run in turn (A, B, A, B, ...) in one process so that machine noise hits all
alike; the reported ratio is the median over repetitions of (configuration / its baseline).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

#: the clock the steps are timed with: process CPU time (``--clock cpu``, default) is robust to other
#: work on a shared machine and equals wall time on an idle one with one torch thread
CLOCK = time.process_time


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


class Digits(Dataset):
    def __init__(self):
        self.x, self.y = digits()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


#: hidden width of the MLP (``--width``; 256: ~85k parameters, 1024: ~1.1M)
WIDTH = 256


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        w = WIDTH
        self.net = nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


# ----------------------------------------------------------------------------------- HF side


def hf_time(kind: str, with_cb: bool, steps: int, warmup: int) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lit_optim.integrations import hf as lhf

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(CLOCK())

    ga = 3 if kind == "adaptive" else 1
    name = "sophia" if kind == "curvature" else "adamw"
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out,
            use_cpu=True,
            report_to=[],
            max_steps=steps,
            per_device_train_batch_size=32,
            gradient_accumulation_steps=ga,
            learning_rate=1e-3,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            max_grad_norm=0.0,
            seed=0,
        )
        model = MLP()
        cbs: list = [Clock()]
        cls = Trainer
        extra = {}
        if with_cb:
            if kind == "clip":
                cbs.insert(0, lhf.GradClipMedianCallback())
            elif kind == "ema":
                cbs.insert(0, lhf.WeightAveragingCallback(decays=0.999, write_at_end=False))
            elif kind == "adaptive":
                cbs.insert(0, lhf.AdaptiveBatchSizeCallback(eta=1e9, max_batch_size=10**6))
            elif kind == "curvature":
                cls, extra = lhf.CurvatureTrainer, {"curvature_every_n_steps": 10}
        trainer = cls(
            model=model,
            args=args,
            train_dataset=Digits(),
            callbacks=cbs,
            optimizers=lhf.create_optimizer_and_scheduler(model, name, args),
            **extra,
        )
        trainer.train()
    gaps = [b - a for a, b in zip(times[warmup:], times[warmup + 1 :])]
    return statistics.median(gaps)


# ---------------------------------------------------------------------------- Lightning side


def pl_time(kind: str, with_cb: bool, steps: int, warmup: int) -> float:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lit_optim.callbacks import AdaptiveBatchSizeCallback, GradClipMedianCallback, WeightAveragingCallback

    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append((trainer.global_step, CLOCK()))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()
            self.batch_size = 32

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.mlp(x, y)["loss"]

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            return DataLoader(TensorDataset(*digits()), batch_size=self.batch_size, shuffle=True)

    ga = 3 if kind == "adaptive" else 1
    cbs: list = [Clock()]
    if with_cb:
        if kind == "clip":
            cbs.insert(0, GradClipMedianCallback(log_stats=False))
        elif kind == "ema":
            cbs.insert(0, WeightAveragingCallback(decays=0.999, write_at_end=False, record_init=False))
        elif kind == "adaptive":
            cbs.insert(0, AdaptiveBatchSizeCallback(eta=1e9, max_batch_size=10**6, log_stats=False))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=ga,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=cbs,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(Module())
    # one timestamp per optimizer step: the last micro-batch of each step
    stamps = {}
    for step, t in times:
        stamps[step] = t
    ordered = [stamps[k] for k in sorted(stamps)]
    gaps = [b - a for a, b in zip(ordered[warmup:], ordered[warmup + 1 :])]
    return statistics.median(gaps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kinds", default="clip,ema,adaptive,curvature")
    ap.add_argument("--width", type=int, default=256, help="hidden width of the MLP (256: 85k parameters)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = ap.parse_args(argv)
    global CLOCK, WIDTH
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    WIDTH = args.width
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    kinds = args.kinds.split(",")
    ratios: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.reps):
        for kind in kinds:
            for side, fn in (("hf", hf_time), ("lightning", pl_time)):
                if side == "lightning" and kind == "curvature":
                    continue
                base = fn(kind, False, args.steps, args.warmup)
                cb = fn(kind, True, args.steps, args.warmup)
                ratios.setdefault((kind, side), []).append(cb / base)
    print(
        f"per-step {args.clock} time with the callback / without it (median of {args.reps} repetitions, {args.steps} steps, "
        f"{args.threads} thread(s))"
    )
    print("| callback | HF TrainerCallback twin | Lightning callback |")
    print("|---|---|---|")
    names = {
        "clip": "GradClipMedianCallback (norm, window 100)",
        "ema": "WeightAveragingCallback (1 EMA, every step)",
        "adaptive": "AdaptiveBatchSizeCallback (norm test every step, accumulation 3)",
        "curvature": "CurvatureTrainer, Sophia, GNB every 10 steps",
    }
    for kind in kinds:
        hf = statistics.median(ratios[(kind, "hf")])
        pl = ratios.get((kind, "lightning"))
        pl_s = f"{statistics.median(pl):.3f}" if pl else "-"
        print(f"| {names[kind]} | {hf:.3f} | {pl_s} |")


if __name__ == "__main__":
    main()
