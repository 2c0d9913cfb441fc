"""The memory-reduced optimizers in real Lightning runs: a run interrupted at a checkpoint resumes
exactly across subspace refreshes (random subspaces included), and under DDP (ddp_spawn, 2 CPU
processes, gloo) the replicas pick the same subspaces and match a single-process run."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import lit_optim

from ..helpers import TinyClassifier, classification_data, fit_resume_compare, flat_params, quiet_trainer

# update_proj_gap=3: 16 steps refresh at 1, 4, 7, 10, 13, 16; the run is interrupted after step 8
RESUME_CASES = [
    ("frugal", {"projection": "random", "update_proj_gap": 3}),
    ("frugal", {"projection": "blockwise", "update_proj_gap": 3, "rank": 0.5}),
    ("frugal", {"projection": "randk", "update_proj_gap": 3, "rank": 0.5}),
    ("subset_norm", {"projection": "svd", "update_proj_gap": 3, "rank": 0.5}),
    ("subset_norm", {"projection": "randk", "update_proj_gap": 3}),
    ("dct_lowrank", {"update_proj_gap": 3, "rank": 0.5}),
]


@pytest.mark.parametrize("name,kw", RESUME_CASES, ids=lambda v: v if isinstance(v, str) else v.get("projection", ""))
def test_resume_across_subspace_refreshes_is_exact(name, kw, tmp_path):
    def factory():
        return TinyClassifier(optimizer=name, opt_kwargs={"lr": 1e-2, **kw})

    straight, resumed, module = fit_resume_compare(factory, tmp_path)
    assert module.trainer.global_step == 16
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)
    L.seed_everything(0, verbose=False)
    assert not torch.equal(straight, flat_params(factory()))  # it trained


# ----------------------------------------------------------------------------- DDP

DDP_CASES = [
    ("frugal", {"projection": "random", "update_proj_gap": 2}),
    ("subset_norm", {"update_proj_gap": 2}),
    ("dct_lowrank", {"update_proj_gap": 2, "rank": 0.5}),
]


class ThreeMLPs(L.LightningModule):
    """One MLP per optimizer of DDP_CASES, each stepped by its own optimizer (manual optimization)."""

    def __init__(self, batch_size: int, out_dir: str):
        super().__init__()
        self.automatic_optimization = False
        self.batch_size = batch_size
        self.out_dir = out_dir
        torch.manual_seed(0)
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)) for _ in DDP_CASES
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(sum(F.cross_entropy(net(x), y) for net in self.nets))
        for opt in opts:
            opt.step()

    def configure_optimizers(self):
        return [
            lit_optim.configure_optimizers(net, name, lr=1e-2, **kw)["optimizer"] for net, (name, kw) in zip(self.nets, DDP_CASES)
        ]

    def train_dataloader(self):
        # rank r takes rows r, r + world, ... of each global batch of 2 * batch_size (no shuffling)
        data = classification_data(64)
        world = self.trainer.world_size
        rank = self.trainer.global_rank
        idx = [i for i in range(len(data)) if i % world == rank]
        return DataLoader(torch.utils.data.Subset(data, idx), batch_size=self.batch_size, shuffle=False)

    def on_train_end(self):
        torch.save(flat_params(self), os.path.join(self.out_dir, f"rank{self.global_rank}.pt"))


@pytest.mark.ddp
def test_ddp_spawn_replicas_agree_and_match_single_process(tmp_path):
    single = ThreeMLPs(batch_size=16, out_dir=str(tmp_path))
    L.seed_everything(0, verbose=False)
    quiet_trainer(max_steps=8).fit(single)
    ddp = ThreeMLPs(batch_size=8, out_dir=str(tmp_path))
    L.seed_everything(0, verbose=False)
    quiet_trainer(max_steps=8, strategy="ddp_spawn", devices=2, use_distributed_sampler=False).fit(ddp)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0, r1), "the DDP replicas diverged"
    torch.testing.assert_close(r0, flat_params(single), atol=1e-5, rtol=0)
    assert not torch.equal(r0, flat_params(ThreeMLPs(16, str(tmp_path))))
