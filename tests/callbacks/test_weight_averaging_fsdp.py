"""WeightAveragingCallback under FSDP2 sharding on CPU: Lightning's ``ModelParallelStrategy`` with
``fully_shard`` over 2 gloo processes (spawned once, several fits each). Each rank averages only its own shards (nothing is
gathered during training); the gathered averages equal the closed form of the gathered weights;
validation swaps shards; a run resumed from a distributed (sharded) or a full checkpoint ends bit
for bit where an uninterrupted run ends.

(Lightning's ``FSDPStrategy`` -- FSDP1 -- refuses CPU, so FSDP2 is the sharded path tested here.)"""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_optim.callbacks import WeightAveragingCallback, extract_average

from ..distributed._spawn import FSDP2_MARKS
from ..helpers import StopAtEpoch, quiet_trainer
from .test_weight_averaging_ddp import RankSliced, SaveAtTrainEnd, run_in_two_processes

pytestmark = FSDP2_MARKS

DECAYS = (0.8, 0.95)


class Sharded(RankSliced):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class CheckShards(Callback):
    """In every worker: gathers the weights after each averaging update (test-only collective) and
    compares the gathered averages with the closed form; checks the averages are local shards."""

    def __init__(self, out: str):
        self.out = out
        self.seen = []
        self._last = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._last:
            self._last = trainer.global_step
            self.seen.append({n: _full(p.detach()).double().clone() for n, p in pl_module.named_parameters()})

    def on_fit_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, WeightAveragingCallback))
        ema = cb.averager
        i = ema.names.index("net.0.weight")
        param = dict(pl_module.named_parameters())["net.0.weight"]
        errors = []
        for k, decay in enumerate(DECAYS):
            avg = cb.averaged_state_dict(k)  # gathered (collective)
            for name in self.seen[0]:
                ref = self.seen[0][name]
                for w in self.seen[1:]:
                    ref = decay * ref + (1 - decay) * w[name]
                errors.append((ref - avg[name].double()).abs().max().item())
        final = {n: _full(p.detach()) for n, p in pl_module.named_parameters()}
        primary = cb.averaged_state_dict(0)
        res = {
            "local_shape": list(ema.averages[0][i].shape),
            "param_shape": list(param.shape),
            "is_dtensor": type(param).__name__ == "DTensor",
            "closed_form_error": max(errors),
            "written_error": max((final[n] - primary[n]).abs().max().item() for n in final),
            "metrics": sorted(trainer.callback_metrics),
            "final": {n: v.tolist() for n, v in final.items()},
            "averages": [{n: v.tolist() for n, v in cb.averaged_state_dict(k).items()} for k in range(2)],
        }
        with open(os.path.join(self.out, f"{os.path.basename(self.out)}_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(res, f)


def _trainer(callbacks, distributed_ckpt):
    strategy = ModelParallelStrategy(
        data_parallel_size=2,
        tensor_parallel_size=1,
        process_group_backend="gloo",
        save_distributed_checkpoint=distributed_ckpt,
    )
    return quiet_trainer(max_epochs=4, strategy=strategy, devices=2, callbacks=callbacks, use_distributed_sampler=False)


def _make():
    return WeightAveragingCallback(decays=DECAYS, evaluate_with="both")


def _worker(tmp: str, distributed_ckpt: bool) -> None:
    L.seed_everything(0)
    _trainer([_make(), CheckShards(os.path.join(tmp, "straight"))], distributed_ckpt).fit(Sharded())
    ckpt = os.path.join(tmp, "mid.ckpt")
    L.seed_everything(0)
    _trainer([_make(), StopAtEpoch(2), SaveAtTrainEnd(ckpt)], distributed_ckpt).fit(Sharded())
    L.seed_everything(123)
    _trainer([_make(), CheckShards(os.path.join(tmp, "resumed"))], distributed_ckpt).fit(Sharded(), ckpt_path=ckpt)


@pytest.mark.parametrize("distributed_ckpt", [True, False], ids=["sharded_ckpt", "full_ckpt"])
def test_fsdp2_shard_local_averages_and_exact_resume(tmp_path, distributed_ckpt):
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    run_in_two_processes(_worker, str(tmp_path), distributed_ckpt)
    ckpt = str(tmp_path / "mid.ckpt")
    assert os.path.isdir(ckpt) == distributed_ckpt
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    for rank in (0, 1):
        with open(straight_dir / f"straight_rank{rank}.json") as f:
            a = json.load(f)
        with open(resumed_dir / f"resumed_rank{rank}.json") as f:
            b = json.load(f)
        # each rank holds half of net.0.weight (16 x 8) in its averages: shard-local, nothing gathered
        assert a["is_dtensor"] and a["param_shape"] == [16, 8] and a["local_shape"] == [8, 8]
        assert a["closed_form_error"] < 1e-6
        assert a["written_error"] == 0.0
        assert {"val_loss", "val_loss/ema_0.95", "val_loss/raw"} <= set(a["metrics"])
        assert b["final"] == a["final"]
        assert b["averages"] == a["averages"]
    if not distributed_ckpt:
        # a full checkpoint holds gathered averages that extract_average() reads without a Trainer
        sd = extract_average(ckpt, 0.95)
        assert tuple(sd["net.0.weight"].shape) == (16, 8)
