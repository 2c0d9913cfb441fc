"""AdaptiveBatchSizeCallback in real Lightning runs on one process (DDP: test_adaptive_batch_size_ddp.py)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_optim
from lit_optim.callbacks import AdaptiveBatchSizeCallback
from tests.helpers import fit_resume_compare, quiet_trainer


def regression_data(n: int, jitter: float, noise: float, seed: int = 0) -> TensorDataset:
    """``jitter``: spread of the inputs around one point; ``noise``: label noise. Small values of
    both make every example's gradient almost the same (signal dominates the gradient noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(n, 4) + jitter * torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True) + noise * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class Regressor(L.LightningModule):
    def __init__(self, jitter=1.0, noise=10.0, batch_size=8, n=64, optimizer="adagrad", lr=0.05, scheduler="constant"):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.backwards = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def on_after_backward(self):
        self.backwards += 1

    def configure_optimizers(self):
        hp = self.hparams
        return lit_optim.configure_optimizers(self, hp.optimizer, lr=hp.lr, scheduler=hp.scheduler)

    def train_dataloader(self):
        hp = self.hparams
        return DataLoader(regression_data(hp.n, hp.jitter, hp.noise), batch_size=hp.batch_size, shuffle=False)


def mse_loss_fn(module, batch):
    x, y = batch
    return F.mse_loss(module(x), y)


class StepSpy(L.Callback):
    """Records, for every optimizer step, how many micro-batches were accumulated into it and
    the accumulation Lightning was using, plus the lr and effective batch size afterwards."""

    def __init__(self):
        self.micro = 0
        self.steps: list[dict] = []

    def on_after_backward(self, trainer, pl_module):
        self.micro += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(
            {"micro": self.micro, "accumulate": trainer.accumulate_grad_batches, "lr": optimizer.param_groups[0]["lr"]}
        )
        self.micro = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cb = next(c for c in trainer.callbacks if isinstance(c, AdaptiveBatchSizeCallback))
        if self.steps:
            self.steps[-1]["batch_size_after"] = cb.batch_size


def fit(module, callbacks, epochs=2, **kw):
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, **kw)
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize("test", ["norm", "inner_product", "coordinate"])
def test_grows_when_noise_dominates_and_stays_put_when_it_does_not(test):
    kw = {"test": test, "eta": 0.5, "theta": 0.5, "initial_accumulation": 2, "max_batch_size": 64}
    noisy = AdaptiveBatchSizeCallback(**kw)
    fit(Regressor(jitter=1.0, noise=10.0), [noisy])
    assert noisy.history, "noise-dominated problem: the batch must grow"
    assert noisy.batch_size > 16
    assert noisy.controller.last_result is not None

    quiet = AdaptiveBatchSizeCallback(**kw)
    fit(Regressor(jitter=1e-3, noise=1e-3, lr=0.01), [quiet])
    assert quiet.history == [], f"signal-dominated problem: the batch must stay, got {quiet.history}"
    assert quiet.batch_size == 16
    assert quiet.controller.num_observations > 0
    assert quiet.controller.last_result.passed


def test_accumulation_windows_stay_consistent_and_growth_is_capped():
    spy = StepSpy()
    cb = AdaptiveBatchSizeCallback(eta=0.1, initial_accumulation=2, max_batch_size=40)
    module = Regressor(n=96)  # 12 micro-batches of 8 per epoch
    trainer = fit(module, [cb, spy], epochs=3)
    assert cb.history and cb.batch_size <= 40
    assert cb.batch_size == 8 * trainer.accumulate_grad_batches
    assert max(h["batch_size"] for h in cb.history) <= 40
    # every optimizer step holds exactly `accumulate` micro-batches, except an epoch's last one
    per_epoch = 12
    seen = 0
    for s in spy.steps:
        assert s["micro"] <= s["accumulate"]
        seen += s["micro"]
        if s["micro"] < s["accumulate"]:
            assert seen % per_epoch == 0, "only the epoch's last step may hold fewer micro-batches"
    assert seen == module.backwards == 3 * per_epoch
    # the batch size never shrinks
    sizes = [s["batch_size_after"] for s in spy.steps]
    assert sizes == sorted(sizes)


@pytest.mark.parametrize("rule", ["none", "linear", "sqrt"])
def test_lr_follows_the_rule(rule):
    spy = StepSpy()
    cb = AdaptiveBatchSizeCallback(eta=0.1, initial_accumulation=2, max_batch_size=64, lr_scaling=rule)
    fit(Regressor(lr=0.05), [cb, spy])
    assert cb.history
    b0, b1 = 16, cb.batch_size
    expect = {"none": 1.0, "linear": b1 / b0, "sqrt": math.sqrt(b1 / b0)}[rule]
    assert cb.controller.lr_factor == pytest.approx(expect)
    assert spy.steps[-1]["lr"] == pytest.approx(0.05 * expect)
    before = [s for s in spy.steps if s["accumulate"] == 2]
    assert all(s["lr"] == pytest.approx(0.05) for s in before)


def test_lr_rescaling_composes_with_a_schedule():
    cb = AdaptiveBatchSizeCallback(eta=0.1, initial_accumulation=2, max_batch_size=64, lr_scaling="linear")
    trainer = fit(Regressor(lr=0.05, scheduler="cosine"), [cb])
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs == pytest.approx([0.05 * cb.controller.lr_factor] * len(sched.base_lrs))
    group = trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == pytest.approx(0.05 * cb.controller.lr_factor)
    assert group["lr"] == pytest.approx(sched.base_lrs[0] * sched.lr_lambdas[0](sched.last_epoch))


def test_rebuild_dataloader_turns_accumulation_into_a_larger_micro_batch():
    cb = AdaptiveBatchSizeCallback(
        eta=0.1, initial_accumulation=2, max_batch_size=64, rebuild_dataloader=True, max_micro_batch_size=16
    )
    module = Regressor(n=128)
    trainer = fit(module, [cb], epochs=3)
    assert cb.micro_batch_size == 16 and module.hparams.batch_size == 16
    assert trainer.train_dataloader.batch_size == 16
    assert cb.accumulation == trainer.accumulate_grad_batches == 4
    assert cb.batch_size == 64
    assert any(h["micro_batch_size"] == 16 for h in cb.history)


def test_per_example_statistics():
    cb = AdaptiveBatchSizeCallback(
        eta=0.5, max_batch_size=32, stats="per_example", loss_fn=mse_loss_fn, per_example_max=6, lr_scaling="sqrt"
    )
    fit(Regressor(noise=3.0), [cb])  # accumulation 1 on one process is fine with per-example statistics
    assert cb.history and cb.batch_size > 8
    assert cb.controller.last_result.batch_size == 6  # per_example_max examples of one micro-batch


def test_resume_continues_the_schedule(tmp_path):
    made = []

    def callbacks():
        cb = AdaptiveBatchSizeCallback(
            eta=2.0,
            initial_accumulation=2,
            max_batch_size=128,
            lr_scaling="sqrt",
            rebuild_dataloader=True,
            max_micro_batch_size=8,
        )
        made.append(cb)
        return [cb]

    straight, resumed, _ = fit_resume_compare(
        lambda: Regressor(jitter=0.3, noise=1.0, lr=0.1, n=128, batch_size=4, scheduler="cosine"),
        tmp_path,
        callbacks,
        stop_epoch=1,
        total_epochs=3,
    )
    assert torch.equal(straight, resumed)
    a, b = made[0], made[-1]
    epochs = [h["epoch"] for h in a.history]
    # the batch grew (and the loader was rebuilt) before the checkpoint, and grew again after it
    assert min(epochs) < 1 <= max(epochs), a.history
    assert any(h["micro_batch_size"] == 8 and h["epoch"] < 1 for h in a.history)
    assert a.state_dict() == b.state_dict()


def test_logs_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="abs")
    cb = AdaptiveBatchSizeCallback(eta=0.1, initial_accumulation=2, max_batch_size=64)
    fit(Regressor(), [cb], logger=logger, log_every_n_steps=1)
    ea = EventAccumulator(logger.log_dir)
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ("batch_size", "statistic", "required_batch_size", "lr", "lr_factor", "accumulation"):
        assert f"adaptive_batch/{tag}" in tags
    sizes = [e.value for e in ea.Scalars("adaptive_batch/batch_size")]
    assert sizes[0] == 16 and sizes[-1] == cb.batch_size


def test_configuration_errors():
    with pytest.raises(ValueError, match="stats must be one of"):
        AdaptiveBatchSizeCallback(max_batch_size=8, stats="per_sample")
    with pytest.raises(ValueError, match="test must be one of"):
        AdaptiveBatchSizeCallback(test="variance", max_batch_size=8)
    with pytest.raises(ValueError, match=r"eta must be in \(0, inf\)"):
        AdaptiveBatchSizeCallback(eta=-1.0, max_batch_size=8)
    with pytest.raises(TypeError, match="max_batch_size must be an int"):
        AdaptiveBatchSizeCallback(max_batch_size=8.0)
    with pytest.raises(ValueError, match="check_every_n_steps must be an integer >= 1, got 0"):
        AdaptiveBatchSizeCallback(max_batch_size=8, check_every_n_steps=0)

    # micro-batch statistics need >= 2 micro-batches per step on one process
    with pytest.raises(ValueError, match="at least 2 micro-batch gradients"):
        fit(Regressor(), [AdaptiveBatchSizeCallback(max_batch_size=64, stats="micro_batch")], epochs=1)
    with pytest.raises(ValueError, match="max_batch_size must be >= the initial effective batch size 16"):
        fit(Regressor(), [AdaptiveBatchSizeCallback(max_batch_size=8, initial_accumulation=2)], epochs=1)
    with pytest.raises(ValueError, match="GradientAccumulationScheduler"):
        fit(
            Regressor(),
            [AdaptiveBatchSizeCallback(max_batch_size=64), GradientAccumulationScheduler({0: 2})],
            epochs=1,
        )

    class NoAttr(Regressor):
        def train_dataloader(self):
            return DataLoader(regression_data(64, 1.0, 3.0), batch_size=8)

    module = NoAttr()
    del module.hparams["batch_size"]
    with pytest.raises(ValueError, match="attribute 'batch_size'"):
        fit(module, [AdaptiveBatchSizeCallback(max_batch_size=64, initial_accumulation=2, rebuild_dataloader=True)])

    class Manual(Regressor):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()

    with pytest.raises(ValueError, match="manual optimization"):
        fit(Manual(), [AdaptiveBatchSizeCallback(max_batch_size=64)], epochs=1)


# ------------------------------------------------------------------ issue 15: defaults that work


def test_defaults_work_on_one_process_without_accumulation(monkeypatch):
    """``AdaptiveBatchSizeCallback(max_batch_size=...)`` alone, one process, accumulation 1: the
    statistics come from per-example gradients of training_step (as AdAdaGrad estimates them),
    the callback says so, and the micro-batch statistics take over once the batch has grown."""

    class Sources(L.Callback):
        def __init__(self):
            self.seen = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.seen.append((trainer.accumulate_grad_batches, cb.stats_source))

    cb = AdaptiveBatchSizeCallback(max_batch_size=256, eta=1.0)  # eta: grow in steps, not at once
    assert cb.stats == "auto"
    sources = Sources()
    import lit_optim.callbacks.adaptive_batch_size as abs_mod

    said: list[str] = []
    # the message itself (Lightning's logger may be silenced by other tests in the same process)
    monkeypatch.setattr(abs_mod, "rank_zero_info", lambda msg, *a, **k: said.append(str(msg)))
    fit(Regressor(noise=10.0, n=128), [cb, sources])
    assert any("stats='auto' estimates the gradient noise from per-example gradients" in m for m in said)
    assert cb.history and cb.batch_size > 8, "noise-dominated problem: the batch must grow"
    assert cb.history[0]["old_batch_size"] == 8
    assert sources.seen[0] == (1, "per_example")
    # the micro-batch statistics take over once the accumulation is >= 2
    assert {src for acc, src in sources.seen if acc >= 2} == {"micro_batch"}


def test_auto_per_example_statistics_equal_an_explicit_loss_fn():
    """The default per-example loss (training_step, logging muted) gives the statistics of the
    same loss passed explicitly."""

    class Logging(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return {"loss": loss}

    results = []
    for loss_fn in (None, mse_loss_fn):
        cb = AdaptiveBatchSizeCallback(max_batch_size=8 * 8, check_every_n_steps=100, loss_fn=loss_fn)
        fit(Logging(noise=10.0), [cb], epochs=1)
        assert cb.stats_source == "per_example"
        results.append(cb.controller.last_result)
    assert results[0].statistic == pytest.approx(results[1].statistic, rel=1e-5)


def test_auto_default_loss_that_vmap_cannot_run_names_the_fix():
    class ItemCall(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.last = loss.item()  # data-dependent Python: not vmap-able
            return loss

    with pytest.raises(RuntimeError, match=r"training_step on single examples under torch.func.vmap.*loss_fn="):
        fit(ItemCall(), [AdaptiveBatchSizeCallback(max_batch_size=64)], epochs=1)


# ------------------------------------------------------------------ issue 17: resume from a max_steps stop


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in checkpoints (Lightning's condition for
    a mid-epoch resume that sees the same batches)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip = 0
        self._served = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._served = skip
        for i, b in enumerate(super().__iter__()):
            if i >= skip:
                self._served += 1
                yield b

    def state_dict(self):
        return {"served": self._served}

    def load_state_dict(self, state):
        self._skip = state["served"]


class ResumableRegressor(Regressor):
    def train_dataloader(self):
        hp = self.hparams
        return ResumableLoader(regression_data(hp.n, hp.jitter, hp.noise), batch_size=hp.batch_size, shuffle=False)


@pytest.mark.parametrize(
    "stop,rebuild",
    [(3, False), (8, True)],  # before the growth to accumulation 12 is applied / after it, loader rebuilt
)
def test_resume_after_a_max_steps_stop_mid_epoch_matches_the_straight_run(stop, rebuild, tmp_path):
    """A fit stopped by max_steps in the middle of an epoch (Lightning still calls
    on_train_epoch_end) and resumed from its checkpoint ends with the optimizer steps and the
    weights of a fit that never stopped."""

    def module():
        return ResumableRegressor(jitter=1.0, noise=10.0, lr=0.05, n=192, batch_size=4)  # 48 micro-batches an epoch

    def callback():
        return AdaptiveBatchSizeCallback(
            eta=0.1, initial_accumulation=2, max_batch_size=48, rebuild_dataloader=rebuild, max_micro_batch_size=16
        )

    total = 15
    L.seed_everything(0, verbose=False)
    straight, cb = module(), callback()
    quiet_trainer(max_steps=total, callbacks=[cb]).fit(straight)
    assert any(h["accumulation"] == 12 for h in cb.history)

    L.seed_everything(0, verbose=False)
    first = module()
    t1 = quiet_trainer(max_steps=stop, callbacks=[callback()])
    t1.fit(first)
    assert t1.fit_loop.epoch_loop.batch_progress.current.ready % 48 != 0  # stopped inside the epoch
    ckpt = str(tmp_path / "stop.ckpt")
    t1.save_checkpoint(ckpt)

    L.seed_everything(123, verbose=False)
    resumed = module()
    t2 = quiet_trainer(max_steps=total, callbacks=[callback()])
    t2.fit(resumed, ckpt_path=ckpt)
    assert t2.global_step == total
    from tests.helpers import flat_params

    assert torch.equal(flat_params(straight), flat_params(resumed))
