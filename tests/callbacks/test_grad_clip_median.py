"""GradClipMedianCallback in real Lightning runs on one process (DDP: test_adaptive_batch_size_ddp.py)."""

from __future__ import annotations

import math
import statistics

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_optim.callbacks import GradClipMedianCallback
from tests.helpers import TinyClassifier, fit_resume_compare, quiet_trainer


# gradient scale of each optimizer step: a phase of large gradients, a phase of small ones with
# one planted spike, and a phase of very large ones
PHASE1, PHASE2, PHASE3 = 20, 20, 20
SPIKE_STEP = PHASE1 + 12
SCALES = [1.0] * PHASE1 + [0.01] * PHASE2 + [10.0] * PHASE3
SCALES[SPIKE_STEP] = 0.5  # 50x the surrounding gradients, half the size of phase-1 gradients
STEPS = len(SCALES)


class Phased(L.LightningModule):
    """Linear regression whose loss is scaled per optimizer step by ``SCALES`` (lr tiny, so the
    gradient distribution within a phase stays put)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return SCALES[self.global_step] * F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(STEPS * 8, 6, generator=g)
        y = x.sum(1, keepdim=True) + 3.0 + torch.randn(STEPS * 8, 1, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8)


class NormSpy(L.Callback):
    """Placed after the clipping callback: records the gradient norm the optimizer receives."""

    def __init__(self):
        self.pre: list[float] = []
        self.post: list[float] = []
        self.clipped: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        clip = next(c for c in trainer.callbacks if isinstance(c, GradClipMedianCallback))
        self.pre.append(clip.last_info["grad_norm"])
        self.clipped.append(clip.last_info["clipped"])
        self.post.append(float(torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()]).norm()))


def run_phased(callback):
    spy = NormSpy()
    L.seed_everything(0, verbose=False)
    quiet_trainer(max_epochs=1, callbacks=[callback, spy]).fit(Phased())
    assert len(spy.pre) == STEPS
    return spy


def test_median_clipping_limits_a_spike_that_constant_clipping_misses_and_does_not_over_clip():
    median = run_phased(GradClipMedianCallback("norm", window=10, factor=2.0, min_history=5))
    raw = median.pre
    # constant clipping "at the same median": 2 x the median gradient norm of the first phase
    c = 2.0 * statistics.median(raw[:PHASE1])
    const = run_phased(GradClipMedianCallback("constant", threshold=c))
    assert const.pre == pytest.approx(raw, rel=1e-3)  # (almost) the same gradients before clipping

    typical2 = statistics.median(raw[PHASE1 : PHASE1 + 10])
    assert raw[SPIKE_STEP] > 20 * typical2  # the planted spike
    # median clipping cuts the spike to ~2x the recent median ...
    assert median.clipped[SPIKE_STEP] == 1.0
    assert median.post[SPIKE_STEP] <= 2.0 * 1.5 * typical2
    # ... constant clipping at the phase-1 median lets it through untouched
    assert raw[SPIKE_STEP] < c
    assert const.clipped[SPIKE_STEP] == 0.0 and const.post[SPIKE_STEP] == pytest.approx(raw[SPIKE_STEP])

    # when the gradients grow for good, constant clipping clips every step (over-clips), the
    # median threshold follows them within a window and then leaves ordinary steps alone
    late = slice(PHASE1 + PHASE2 + 10, STEPS)
    assert all(x == 1.0 for x in const.clipped[late])
    assert sum(median.clipped[late]) <= 2
    assert max(const.post[late]) <= c * (1 + 1e-5)
    assert statistics.median(median.post[late]) > 3 * c  # phase-3 gradients are ~5c and pass


@pytest.mark.parametrize("mode", ["norm", "coordinate"])
def test_resume_is_bit_identical(mode, tmp_path):
    made = []

    def callbacks():
        cb = GradClipMedianCallback(mode, window=5, factor=1.0, min_history=2)
        made.append(cb)
        return [cb]

    straight, resumed, _ = fit_resume_compare(
        lambda: TinyClassifier(optimizer="adamw", scheduler="constant"),
        tmp_path,
        callbacks,
        trainer_kwargs={"limit_val_batches": 0},
    )
    assert torch.equal(straight, resumed)
    a, b = made[0], made[-1]
    assert a.clipper.clipped_steps > 0
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["clippers"][0]["steps"] == sb["clippers"][0]["steps"] == 16
    if mode == "coordinate":
        assert sa["clippers"][0]["coord_count"] == sb["clippers"][0]["coord_count"] == 16
        for ma, mb in zip(sa["clippers"][0]["coord_medians"], sb["clippers"][0]["coord_medians"]):
            assert torch.equal(ma, mb)
    else:
        assert sa == sb


def test_acts_on_unscaled_amp_gradients():
    def run(plugins):
        L.seed_everything(0, verbose=False)
        cb = GradClipMedianCallback("norm", window=8, factor=1.0, min_history=2)
        spy = NormSpy()
        trainer = quiet_trainer(max_epochs=2, callbacks=[cb, spy], plugins=plugins, limit_val_batches=0)
        trainer.fit(TinyClassifier(optimizer="adamw", scheduler="constant"))
        return cb, spy, trainer

    _, fp32, _ = run(None)
    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    cb, spy, trainer = run([amp])
    assert trainer.precision_plugin.scaler.get_scale() >= 2.0**10  # gradients were scaled in backward
    # the history holds unscaled norms (fp16 forward: close to the fp32 run, nowhere near 65536x)
    assert spy.pre[:3] == pytest.approx(fp32.pre[:3], rel=0.05)
    assert all(x < 100 for x in cb.clipper.window_median.values)
    # and the clipped gradient the optimizer sees respects the threshold in unscaled units
    for pre, post, clipped in zip(spy.pre, spy.post, spy.clipped):
        if clipped:
            assert post < pre


def test_refuses_trainer_gradient_clip_val():
    trainer = quiet_trainer(max_epochs=1, callbacks=[GradClipMedianCallback()], gradient_clip_val=1.0)
    with pytest.raises(ValueError, match=r"replaces Lightning's gradient clipping.*gradient_clip_val=1.0.*second time"):
        trainer.fit(TinyClassifier())


def test_logs_threshold_and_clipped_fraction_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="clip")
    cb = GradClipMedianCallback("coordinate", factor=1.0, min_history=2)
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb], logger=logger, log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(TinyClassifier())
    ea = EventAccumulator(logger.log_dir)
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ("threshold", "clipped_fraction", "grad_norm", "clipped_coord_fraction"):
        assert f"grad_clip/{tag}" in tags
    last = ea.Scalars("grad_clip/clipped_fraction")[-1].value
    assert last == pytest.approx(cb.clipper.clipped_fraction) and 0 < last <= 1
    assert math.isfinite(ea.Scalars("grad_clip/threshold")[-1].value)
