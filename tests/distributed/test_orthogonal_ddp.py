"""The orthogonalized family under DDP: the Newton-Schulz work is divided among 2 CPU processes
(gloo) and the parameters equal those of a single-process run."""

from __future__ import annotations

import json
import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lit_optim

from ..helpers import flat_params, quiet_trainer
from ..optim.test_orthogonal_lightning import LR, NAMES, TinyGPT, lm_data, ordered_loader

NS_NAMES = {"muon", "normuon", "root", "adago", "hybrid_auon"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- exact sharding check


def _shapes():
    return [(24, 40), (40, 24), (24, 40), (16, 16), (3, 8, 12), (8, 3, 3, 3), (30,), (0, 5)]


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in _shapes()]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in _shapes()] for _ in range(3)]
    return params, grads


CASES = [
    (lit_optim.Muon, {}),
    (lit_optim.Muon, {"layerwise_noise_adaptive": True, "ns_method": "gram"}),
    (lit_optim.NorMuon, {}),
    (lit_optim.ROOT, {}),
    (lit_optim.AdaGO, {}),
    (lit_optim.HybridAuON, {}),
    (lit_optim.AuON, {}),
    (lit_optim.SinkGD, {}),
]


def _run_cases(distributed):
    """Final parameters and NS statistics of every case on the same problem."""
    out = []
    for cls, kw in CASES:
        p0, grads = _problem()
        ps = [nn.Parameter(p.clone()) for p in p0]
        opt = cls([{"params": ps[:-2]}, {"params": ps[-2:], "use_muon": True}], lr=0.05, distributed=distributed, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        out.append(([p.detach().clone() for p in ps], dict(opt.last_ns_stats)))
    return out


def _worker(rank, world, port, path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_run_cases(None), os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_newton_schulz_equals_the_single_process_result(tmp_path):
    port = _free_port()
    # fork: the children inherit the imported modules instead of importing torch and Lightning again
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    single = _run_cases(False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for (cls, kw), ref, r0, r1 in zip(CASES, single, *ranks):
        for a, b, c in zip(ref[0], r0[0], r1[0]):
            torch.testing.assert_close(b, a, atol=1e-12, rtol=0, msg=f"{cls.__name__}{kw}")
            assert torch.equal(b, c), "the ranks disagree"
        if cls.__name__.lower() in NS_NAMES or cls is lit_optim.HybridAuON:
            total = r0[1]["matrices"]
            assert r1[1]["matrices"] == total and r0[1]["world_size"] == 2
            assert 0 < r0[1]["local_matrices"] < total and r0[1]["local_matrices"] + r1[1]["local_matrices"] == total
            # the results of each rank's share are all-gathered: bytes are counted on both ranks
            assert r0[1]["sent_bytes"] > 0 and r1[1]["received_bytes"] > 0
        else:
            assert r0[1]["matrices"] == 0  # linear-time: nothing to share


# --------------------------------------------------------------------------- Lightning DDP


class NSStatsRecorder(L.Callback):
    """Writes each rank's Newton-Schulz statistics of every step to ``path/rank<r>.json``."""

    def __init__(self, path):
        self.path = str(path)
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opts = trainer.optimizers
        self.rows.append([dict(getattr(o, "last_ns_stats", {})) for o in opts])

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(self.path, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.rows, f)


class AllOptimizersGPT(L.LightningModule):
    """One small GPT per optimizer of the family, each trained by its own optimizer from
    ``lit_optim.configure_optimizers`` (manual optimization: one Lightning run covers all)."""

    def __init__(self, batch_size=16):
        super().__init__()
        self.automatic_optimization = False
        self.batch_size = batch_size
        torch.manual_seed(0)
        self.models = nn.ModuleList([TinyGPT(name, d=16, layers=1, bias=False) for name in NAMES])

    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad()
        # the models are independent: one backward of the summed losses gives each its own gradient
        self.manual_backward(sum(model.loss_on(batch[0]) for model in self.models))
        for opt in opts:
            opt.step()

    def configure_optimizers(self):
        return [
            lit_optim.configure_optimizers(m, name, lr=LR[name], adam_lr=3e-3)["optimizer"]
            for m, name in zip(self.models, NAMES)
        ]

    def train_dataloader(self):
        return ordered_loader(lm_data(), self.batch_size, self.trainer)


def _fit(module, tmp_path, **kw):
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_steps=6, callbacks=[NSStatsRecorder(tmp_path)], **kw)
    trainer.fit(module)
    return module


@pytest.mark.parametrize("module_factory", ["single_gpt_muon", "all_optimizers"])
def test_lightning_ddp_spawn_matches_single_process(module_factory, tmp_path):
    if module_factory == "single_gpt_muon":

        def make(bs):
            return TinyGPT(
                "muon", {"lr": 0.02, "adam_lr": 3e-3, "layerwise_noise_adaptive": True}, batch_size=bs, bias=False
            )
    else:

        def make(bs):
            return AllOptimizersGPT(batch_size=bs)

    # (no biases: the key bias of attention has a zero gradient up to rounding, which AdamW's
    # normalization turns into rounding-dependent steps of size lr)
    (tmp_path / "single").mkdir()
    (tmp_path / "ddp").mkdir()
    L.seed_everything(0, verbose=False)
    single = _fit(make(16), tmp_path / "single")
    L.seed_everything(0, verbose=False)
    # 2 ranks x 8 sequences = the single process's batch of 16, in the same order
    ddp = _fit(make(8), tmp_path / "ddp", strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
    torch.testing.assert_close(flat_params(ddp), flat_params(single), atol=2e-5, rtol=0)
    assert not torch.equal(flat_params(ddp), flat_params(make(16)))  # it trained
    rows = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    names = ["muon"] if module_factory == "single_gpt_muon" else NAMES
    for step0, step1 in zip(*rows):
        for name, s0, s1 in zip(names, step0, step1):
            if name in NS_NAMES:
                assert s0["world_size"] == 2 and s0["matrices"] == s1["matrices"] > 0
                assert 0 < s0["local_matrices"] < s0["matrices"], (name, s0)
                assert s0["local_matrices"] + s1["local_matrices"] == s0["matrices"]
