"""WeightAveragingCallback under 2-process DDP (DDPStrategy, gloo, CPU, processes spawned once): the averages equal the
closed form of the weights seen after each optimizer step, are identical on both ranks, validation
logs every target, and a run resumed from a checkpoint ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Subset

from lit_optim.callbacks import WeightAveragingCallback

from ..helpers import StopAtEpoch, TinyClassifier, classification_data, quiet_trainer

pytestmark = pytest.mark.ddp

DECAYS = (0.8, 0.95)


class RankSliced(TinyClassifier):
    """Each rank reads a fixed half of the data. (Lightning's own DistributedSampler reshuffles per
    epoch, and on resume from a checkpoint written at the end of a fit it does not replay the same
    permutation, so it cannot serve a bit-exact resume comparison.)"""

    def train_dataloader(self):
        data = classification_data(self.hparams.n)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(Subset(data, range(rank, len(data), world)), batch_size=self.hparams.batch_size)


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


class CheckInWorker(Callback):
    """Runs after the averaging callback in every worker; writes what it found to ``out/rank{r}.json``."""

    def __init__(self, out: str):
        self.out = out
        self.seen: list[torch.Tensor] = []
        self._last = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._last:
            self._last = trainer.global_step
            self.seen.append(_flat(list(pl_module.parameters()) + list(pl_module.buffers())))

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, WeightAveragingCallback))
        ema = cb.averager
        errors = []
        for k, decay in enumerate(DECAYS):
            ref = self.seen[0]
            for w in self.seen[1:]:
                ref = decay * ref + (1 - decay) * w
            errors.append((ref - _flat(ema.averages[k])).abs().max().item())
        mine = _flat(ema.averages[0]).to(pl_module.device)
        both = trainer.strategy.all_gather(mine)
        result = {
            "rank": trainer.global_rank,
            "n_averaged": ema.n_averaged,
            "steps": len(self.seen),
            "closed_form_error": max(errors),
            "rank_difference": (both[0] - both[1]).abs().max().item(),
            "metrics": sorted(trainer.callback_metrics),
        }
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(result, f)


class DumpAverages(Callback):
    """Rank 0 saves the averages and the final weights (the primary average, written at the end)."""

    def __init__(self, path: str):
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            cb = next(c for c in trainer.callbacks if isinstance(c, WeightAveragingCallback))
            torch.save(
                {
                    "averages": [[t.clone() for t in a] for a in cb.averager.averages],
                    "weights": [p.detach().clone() for p in pl_module.parameters()],
                },
                self.path,
            )


class SaveAtTrainEnd(Callback):
    """Saves after the averaging callback wrote its average into the model: the checkpoint must
    still hold the raw weights."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, port: int, fn, args) -> None:
    # what a cluster launcher (torchrun, SLURM) provides; Lightning then runs in this process
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )
    torch.set_num_threads(1)
    fn(*args)
    _teardown()
    # the work is done and its files are written: skip the interpreter's shutdown, where native
    # threads (gloo, OpenMP) have been seen to abort a finished worker
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _teardown() -> None:
    """Destroy the gloo process group before the interpreter exits: left to the interpreter's
    shutdown, gloo's threads sometimes abort the process ("terminate called without an active
    exception", SIGABRT) after all the work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_in_two_processes(fn, *args, timeout: float = 600.0) -> None:
    """Run ``fn(*args)`` in 2 spawned CPU processes that form one gloo process group, the way
    ``torchrun --nproc-per-node 2`` would. Each process can run several ``Trainer.fit`` calls
    (straight, interrupted, resumed) without re-spawning, which keeps these tests short. A worker's
    exception is re-raised here; a hang fails after ``timeout`` seconds."""
    ctx = torch.multiprocessing.spawn(_entry, args=(_free_port(), fn, args), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError(f"the 2 worker processes did not finish within {timeout:.0f} s")


def _trainer(callbacks, **kw):
    return quiet_trainer(strategy="ddp", devices=2, callbacks=callbacks, use_distributed_sampler=False, **kw)


def _make():
    return WeightAveragingCallback(decays=DECAYS, evaluate_with="both")


def _worker(out: str) -> None:
    L.seed_everything(0)
    _trainer([_make(), CheckInWorker(out), DumpAverages(os.path.join(out, "straight.pt"))], max_epochs=4).fit(
        RankSliced()
    )
    L.seed_everything(0)
    ckpt = os.path.join(out, "mid.ckpt")
    # saved from on_train_end, after the average was written into the model
    _trainer([_make(), StopAtEpoch(2), SaveAtTrainEnd(ckpt)], max_epochs=4).fit(RankSliced())
    L.seed_everything(123)
    _trainer([_make(), DumpAverages(os.path.join(out, "resumed.pt"))], max_epochs=4).fit(RankSliced(), ckpt_path=ckpt)


def test_ddp_averages_closed_form_identical_ranks_and_exact_resume(tmp_path):
    out = str(tmp_path)
    run_in_two_processes(_worker, out)
    for r in (0, 1):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            res = json.load(f)
        assert res["n_averaged"] == res["steps"] == 8  # 64 samples / (2 ranks x 16) = 2 steps x 4 epochs
        assert res["closed_form_error"] < 1e-6
        assert res["rank_difference"] == 0.0
        assert {"val_loss", "val_loss/ema_0.95", "val_loss/raw"} <= set(res["metrics"])
    a = torch.load(os.path.join(out, "straight.pt"))
    b = torch.load(os.path.join(out, "resumed.pt"))
    for x, y in zip(a["weights"], b["weights"]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for ax, bx in zip(a["averages"], b["averages"]):
        for x, y in zip(ax, bx):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
