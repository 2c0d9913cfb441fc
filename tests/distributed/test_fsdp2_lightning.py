"""lit_optim's Lightning callbacks and sharded-checkpoint resume under FSDP2: Lightning's
``ModelParallelStrategy`` with ``fully_shard`` on every layer, 2 gloo CPU processes, ONE launch
for every case (each a ``Trainer.fit``, or three for a resume):

* ``callbacks``: AdamW with GradClipMedianCallback (norm mode, clipping from the second step),
  HessianDiagCallback (GNB, monitoring: it runs a backward per estimate, which must leave the
  training gradients alone), StabilityGapEvaluator (2 tasks) and AdaptiveBatchSizeCallback
  (inner-product test on the micro-batches of an accumulation of 2), all in one fit; compared
  with one process on the same global batches (each rank reads a fixed half of every global batch):
  the global gradient norms, the adaptive-sampling statistics, the evaluated accuracies and the
  final parameters equal the one-process values.
* ``coordinate``: AdaGrad with GradClipMedianCallback in coordinate mode and the coordinate test
  of AdaptiveBatchSizeCallback (per-coordinate statistics gathered over the shards); the same
  comparison.
* ``sophia_gnb``: Sophia fed by HessianDiagCallback(estimator="gnb") every step: estimates on the
  shards (DTensor curvature state), identical statistics on both ranks.
* ``hutchinson``: HessianDiagCallback(estimator="hutchinson") refuses FSDP2 with
  ShardedDoubleBackwardError when training starts (no double backward runs through fully_shard).
* ``resume_<name>`` for adamw, adan, muon, normuon, frugal and sophia (+ HessianDiagCallback, GNB):
  a run that saves a distributed (sharded) checkpoint after 1 of 3 epochs and resumes in fresh
  objects ends at exactly the parameters of a run that never stopped.

WeightAveragingCallback under FSDP2 (shard-local averages, sharded and full checkpoints) is tested
in tests/callbacks/test_weight_averaging_fsdp.py.
"""

from __future__ import annotations

import os
import time

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lit_optim.callbacks import (
    AdaptiveBatchSizeCallback,
    GradClipMedianCallback,
    HessianDiagCallback,
    StabilityGapEvaluator,
)

from ..callbacks.test_weight_averaging_ddp import RankSliced, SaveAtTrainEnd
from ..helpers import StopAtEpoch, TinyClassifier, classification_data, quiet_trainer
from ._spawn import FSDP2_MARKS, launch_once, read_results, shard, write_result

pytestmark = FSDP2_MARKS

RESUME_NAMES = ("adamw", "adan", "muon", "normuon", "frugal", "sophia")
N = 128  # examples; each rank reads every other one, 16 per micro-batch


class Sharded(RankSliced):
    """TinyClassifier with every layer and the network ``fully_shard``-ed on the data-parallel mesh."""

    def configure_model(self):
        shard(self.net, self.device_mesh["data_parallel"])


def _val_loaders():
    return [DataLoader(classification_data(32, seed=s), batch_size=16) for s in (1, 2)]


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


class Recorder(Callback):
    """Runs after the callbacks under test; records what they computed at each optimizer step and
    the gathered final parameters (a collective: every rank runs it)."""

    def __init__(self):
        self.norms, self.stats, self.traces, self.batch_sizes = [], [], [], []
        self.final: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for cb in trainer.callbacks:
            if isinstance(cb, GradClipMedianCallback):
                self.norms.append(cb.last_info.get("grad_norm"))
            if isinstance(cb, HessianDiagCallback) and cb.last_stats:
                self.traces.append(cb.last_stats.get("curvature/trace"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for cb in trainer.callbacks:
            if isinstance(cb, AdaptiveBatchSizeCallback) and cb.last_result is not None:
                if not self.stats or self.stats[-1] != cb.last_result.statistic:
                    self.stats.append(cb.last_result.statistic)
                self.batch_sizes.append(cb.batch_size)

    def on_fit_end(self, trainer, pl_module):
        self.final = [_full(p).reshape(-1).tolist() for p in pl_module.parameters()]

    def result(self, trainer, extra=None):
        out = {
            "norms": self.norms,
            "stats": self.stats,
            "traces": self.traces,
            "batch_sizes": self.batch_sizes,
            "final": self.final,
        }
        for cb in trainer.callbacks:
            if isinstance(cb, StabilityGapEvaluator):
                out["accuracies"] = [list(r) for r in cb.tracker.records]
        out.update(extra or {})
        return out


def _callbacks_case():
    return [
        GradClipMedianCallback(mode="norm", window=8, factor=1.0, min_history=1),
        HessianDiagCallback(estimator="gnb", every_n_steps=1),
        StabilityGapEvaluator(_val_loaders(), every_n_steps=1, verbose=False),
        AdaptiveBatchSizeCallback(
            test="inner_product", max_batch_size=4 * N, initial_accumulation=2, stats="micro_batch", theta=0.5
        ),
    ]


def _coordinate_case():
    return [
        GradClipMedianCallback(mode="coordinate", factor=1.5, min_history=1),
        AdaptiveBatchSizeCallback(
            test="coordinate", coordinate_quantile=0.9, max_batch_size=4 * N, initial_accumulation=2, eta=2.0
        ),
    ]


#: name -> (optimizer, callbacks factory, epochs)
COMPARED = {
    "callbacks": ("adamw", _callbacks_case, 3),
    "coordinate": ("adagrad", _coordinate_case, 3),
}


def _trainer(callbacks, epochs, distributed_ckpt=True):
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(
        data_parallel_size=2,
        tensor_parallel_size=1,
        process_group_backend="gloo",
        save_distributed_checkpoint=distributed_ckpt,
    )
    return quiet_trainer(
        max_epochs=epochs, strategy=strategy, devices=2, callbacks=callbacks, use_distributed_sampler=False
    )


def _module(optimizer, **kw):
    return Sharded(optimizer=optimizer, n=N, batch_size=16, **kw)


def _worker(out: str) -> None:
    rank = int(os.environ["RANK"])  # Lightning forms the process group in the first fit
    timings = {}

    def run(key, fn):
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - reported per case by the tests
            res = {"error": f"{type(e).__name__}: {e}"[:2000]}
        timings[key] = round(time.perf_counter() - t0, 2)
        write_result(out, rank, key, res)

    # -- callbacks compared with one process
    for key, (opt, make, epochs) in COMPARED.items():

        def fit(opt=opt, make=make, epochs=epochs):
            L.seed_everything(0, verbose=False)
            rec = Recorder()
            trainer = _trainer([*make(), rec], epochs)
            trainer.fit(_module(opt))
            return rec.result(trainer)

        run(key, fit)

    # -- Sophia fed by the GNB estimate on the shards
    def sophia_gnb():
        L.seed_everything(0, verbose=False)
        rec = Recorder()
        cb = HessianDiagCallback(estimator="gnb", every_n_steps=1)
        trainer = _trainer([cb, rec], 1)
        module = _module("sophia")
        trainer.fit(module)
        opt = trainer.optimizers[0]
        h = [opt.state[p]["hessian"] for p in opt.hessian_params()]
        return rec.result(
            trainer,
            {
                "num_estimates": cb.num_estimates,
                "steps": trainer.global_step,
                "hessian_is_dtensor": all(type(t).__name__ == "DTensor" for t in h),
                "hessian_abs_sum": float(sum(_full(t).abs().sum() for t in h)),
                "clip_fraction": cb.last_stats.get("curvature/clip_fraction"),
            },
        )

    run("sophia_gnb", sophia_gnb)

    # -- Hutchinson cannot run through fully_shard: a clear error when training starts
    def hutchinson():
        L.seed_everything(0, verbose=False)
        trainer = _trainer([HessianDiagCallback(estimator="hutchinson", every_n_steps=1)], 1)
        try:
            trainer.fit(_module("adamw"))
        except Exception as e:  # noqa: BLE001
            return {"raised": type(e).__name__, "message": str(e)}
        return {"raised": None}

    run("hutchinson", hutchinson)

    # -- sharded (distributed) checkpoint resume
    ckpt_root = out
    for name in RESUME_NAMES:

        def resume(name=name):
            def callbacks():
                return [HessianDiagCallback(estimator="gnb", every_n_steps=2)] if name == "sophia" else []

            L.seed_everything(0, verbose=False)
            rec = Recorder()
            _trainer([*callbacks(), rec], 3).fit(_module(name))
            straight = rec.final
            ckpt = os.path.join(ckpt_root, f"{name}.ckpt")
            L.seed_everything(0, verbose=False)
            _trainer([*callbacks(), StopAtEpoch(1), SaveAtTrainEnd(ckpt)], 3).fit(_module(name))
            L.seed_everything(123, verbose=False)
            rec2 = Recorder()
            _trainer([*callbacks(), rec2], 3).fit(_module(name), ckpt_path=ckpt)
            diff = max(max((abs(a - b) for a, b in zip(x, y)), default=0.0) for x, y in zip(straight, rec2.final))
            return {"is_dir": os.path.isdir(ckpt), "diff": diff}

        run(f"resume_{name}", resume)
    write_result(out, rank, "timings", timings)


# ----------------------------------------------------------------------------- one process


class _Reference(TinyClassifier):
    """One process on the whole global batch (the union of the two ranks' micro-batches)."""


def _reference(key: str) -> dict:
    opt, make, epochs = COMPARED[key]
    L.seed_everything(0, verbose=False)
    rec = Recorder()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[*make(), rec])
    trainer.fit(_Reference(optimizer=opt, n=N, batch_size=32))
    return rec.result(trainer)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp2_lightning"))
    error = launch_once(_worker, out, timeout=900)
    return [read_results(out, r) for r in (0, 1)], error


def _case(launched, key):
    results, error = launched
    if key not in results[0] or key not in results[1]:
        pytest.fail(f"{key}: no result from the 2-process launch" + (f"; the launch failed:\n{error}" if error else ""))
    for res in (results[0][key], results[1][key]):
        assert "error" not in res, f"{key} under ModelParallelStrategy: {res['error']}"
    return results[0][key], results[1][key]


def _close(a, b, rel=1e-5, what=""):
    assert len(a) == len(b), f"{what}: {len(a)} values vs {len(b)}"
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * max(abs(y), 1e-12), f"{what}: {x} vs one process {y}"


@pytest.mark.parametrize("key", sorted(COMPARED))
def test_callbacks_equal_one_process(launched, key):
    ref = _reference(key)
    for res in _case(launched, key):
        _close(res["norms"], ref["norms"], what="global gradient norm (GradClipMedianCallback)")
        # the inner-product variance is a small difference of large sums (2 samples): float32 noise of the
        # reduce-scattered gradients (~1e-7) is amplified to ~1e-4 in it
        _close(res["stats"], ref["stats"], rel=2e-3, what="adaptive-sampling statistic")
        assert res["batch_sizes"] == ref["batch_sizes"]
        if "accuracies" in ref:
            assert res["accuracies"] == ref["accuracies"]
        if ref["traces"]:
            assert len(res["traces"]) == len(ref["traces"]) and all(t > 0 for t in res["traces"])
        flat = [x for p in res["final"] for x in p]
        flat_ref = [x for p in ref["final"] for x in p]
        scale = max(abs(x) for x in flat_ref)
        assert max(abs(x - y) for x, y in zip(flat, flat_ref)) <= 1e-5 * scale, "final parameters differ"
    assert ref["norms"] and ref["stats"]


def test_sophia_with_gnb_estimates_on_shards(launched):
    a, b = _case(launched, "sophia_gnb")
    for res in (a, b):
        assert res["num_estimates"] == res["steps"] > 0
        assert res["hessian_is_dtensor"] and res["hessian_abs_sum"] > 0
    assert a["traces"] == b["traces"] and all(t > 0 for t in a["traces"])
    assert a["clip_fraction"] == b["clip_fraction"] and a["final"] == b["final"]


def test_hutchinson_refused_with_a_clear_error(launched):
    for res in _case(launched, "hutchinson"):
        assert res["raised"] == "ShardedDoubleBackwardError", res
        assert "fully_shard" in res["message"] and "estimator='gnb'" in res["message"]


@pytest.mark.parametrize("name", RESUME_NAMES)
def test_sharded_checkpoint_resume(launched, name):
    for res in _case(launched, f"resume_{name}"):
        assert res["is_dir"], "the checkpoint is not a distributed (sharded) one"
        assert res["diff"] == 0.0, f"{name}: the resumed run ends {res['diff']:.3g} away from the straight run"
