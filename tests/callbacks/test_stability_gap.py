"""StabilityGapTracker metrics on a hand-computed sequence, and StabilityGapEvaluator in real
Lightning runs whose accuracies are scripted (known min-ACC / WC-ACC / gaps): one fit per task, a
datamodule that switches tasks, resume, logging and the plot."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_optim.callbacks import StabilityGapEvaluator
from lit_optim.functional import StabilityGapTracker

from ..helpers import StopAtEpoch, quiet_trainer


# ----------------------------------------------------------------------------- the tracker alone

SCRIPT = {  # evaluated task -> {step: accuracy}; tasks start at steps 0, 10, 20
    0: {
        0: 0.1,
        2: 0.5,
        4: 0.7,
        6: 0.8,
        8: 0.9,
        10: 0.95,
        12: 0.4,
        14: 0.6,
        16: 0.8,
        18: 0.9,
        20: 0.92,
        22: 0.5,
        24: 0.7,
        26: 0.85,
        28: 0.88,
        30: 0.9,
    },
    1: {10: 0.0, 12: 0.5, 14: 0.7, 16: 0.8, 18: 0.85, 20: 0.9, 22: 0.3, 24: 0.6, 26: 0.8, 28: 0.85, 30: 0.87},
    2: {20: 0.0, 22: 0.6, 24: 0.8, 26: 0.85, 28: 0.9, 30: 0.93},
}


def _scripted_tracker() -> StabilityGapTracker:
    tr = StabilityGapTracker(windows=(5,), recovery_fraction=0.9)
    for step in range(0, 31, 2):
        for task, start in ((0, 0), (1, 10), (2, 20)):
            if step == start:
                tr.start_task(task, step)
        for task in (0, 1, 2):
            if step in SCRIPT[task]:
                tr.record(step, task, SCRIPT[task][step])
    return tr


def test_tracker_metrics_on_a_hand_computed_sequence():
    tr = _scripted_tracker()
    # min-ACC: task 0's lowest after step 10 is 0.4, task 1's lowest after step 20 is 0.3
    assert tr.task_min_acc(0) == pytest.approx(0.4)
    assert tr.task_min_acc(1) == pytest.approx(0.3)
    assert tr.min_acc() == pytest.approx(0.35)
    # WC-ACC at the end (3 tasks): 0.93 / 3 + 2/3 * 0.35
    assert tr.wc_acc() == pytest.approx(0.93 / 3 + 2 / 3 * 0.35)
    # ... and during task 1 at step 14: 0.7 / 2 + 0.4 / 2 (task 0's minimum so far is 0.4)
    assert tr.wc_acc(14) == pytest.approx(0.55)
    assert tr.avg_acc() == pytest.approx((0.9 + 0.87 + 0.93) / 3)
    assert tr.avg_acc(10) == pytest.approx(0.95)  # at the boundary only task 0 has been trained
    # WF^5: largest drop within 5 iterations after the task ended: 0.95 -> 0.4 and 0.9 -> 0.3
    assert tr.task_windowed_forgetting(0, 5) == pytest.approx(0.55)
    assert tr.task_windowed_forgetting(1, 5) == pytest.approx(0.6)
    assert tr.windowed_forgetting(5) == pytest.approx(0.575)
    gaps = {(g["switch_to"], g["task"]): g for g in tr.gaps()}
    g = gaps[(1, 0)]
    assert (g["acc_before"], g["acc_min"], g["steps_to_min"], g["steps_to_recover"]) == (0.95, 0.4, 2, 8)
    assert g["depth"] == pytest.approx(0.55)
    g = gaps[(2, 0)]
    assert (g["acc_before"], g["acc_min"], g["steps_to_min"], g["steps_to_recover"]) == (0.92, 0.5, 2, 8)
    g = gaps[(2, 1)]
    assert (g["acc_before"], g["acc_min"], g["steps_to_min"], g["steps_to_recover"]) == (0.9, 0.3, 2, 8)
    assert tr.phase_of(10) == 0 and tr.phase_of(11) == 1 and tr.task_end(0) == 10 and tr.task_end(2) is None
    table = tr.table()
    assert "| min-ACC | 0.3500 |" in table and "| 2 | 20 | 1 | 0.9000 | 0.3000 | 0.6000 | 2 | 8 |" in table
    clone = StabilityGapTracker(windows=(5,))
    clone.load_state_dict(tr.state_dict())
    assert clone.summary() == tr.summary()


def test_tracker_rejects_bad_input():
    with pytest.raises(ValueError, match="windows must be integers >= 2"):
        StabilityGapTracker(windows=(1,))
    with pytest.raises(ValueError, match=r"recovery_fraction must be in \(0, 1\], got 0"):
        StabilityGapTracker(recovery_fraction=0)
    tr = StabilityGapTracker()
    tr.start_task(0, 0)
    with pytest.raises(ValueError, match="acc must be finite, got nan"):
        tr.record(1, 0, float("nan"))
    tr.record(4, 0, 0.5)
    with pytest.raises(ValueError, match="steps must not decrease: got 3 after 4"):
        tr.record(3, 0, 0.5)
    tr.start_task(1, 5)
    with pytest.raises(ValueError, match="already trained"):
        tr.start_task(0, 6)


# ----------------------------------------------------------------------------- scripted Lightning runs

N_VAL = 20  # validation samples per task: accuracies are multiples of 0.05
STEPS_PER_TASK = 10


def scripted_acc(task: int, step: int) -> float:
    """Accuracy of ``task`` after ``step`` optimizer steps (tasks start at 0, 10, 20):
    0 before its own task, 1 while and after learning it, except right after each later switch:
    0.5 for 2 iterations, then a bottom (0.25 after the switch to task 1, 0.4 after the switch to
    task 2) for 2 more, then 1 again."""
    start = task * STEPS_PER_TASK
    if step <= start:
        return 0.0
    switch = (step - 1) // STEPS_PER_TASK * STEPS_PER_TASK  # start of the task being trained
    if switch <= start:
        return 1.0
    d = step - switch
    if d <= 2:
        return 0.5
    if d <= 4:
        return {10: 0.25, 20: 0.4}[switch]
    return 1.0


class Scripted(L.LightningModule):
    """Predictions follow ``scripted_acc`` for the number of optimizer steps taken so far."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # saved with the weights

    def forward(self, x):
        task, idx = x[:, 0].long(), x[:, 1].long()
        acc = torch.tensor([scripted_acc(int(t), int(self.steps)) for t in task])
        correct = idx < (acc * N_VAL).round().long()
        label = idx % 2
        pred = torch.where(correct, label, 1 - label)
        return nn.functional.one_hot(pred, 2).float() + 0 * self.w

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return (self.w**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def val_loaders(tasks: int = 3, batch_size: int = 5):
    out = []
    for t in range(tasks):
        idx = torch.arange(N_VAL)
        x = torch.stack([torch.full((N_VAL,), float(t)), idx.float()], 1)
        out.append(DataLoader(TensorDataset(x, idx % 2), batch_size=batch_size))
    return out


def train_loader(batches: int = STEPS_PER_TASK):
    return DataLoader(torch.zeros(batches, 1), batch_size=1)


class CaptureLogger(Logger):
    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


EXPECTED_MIN_ACC = (0.25 + 0.4) / 2
EXPECTED_WC_ACC = 1 / 3 + 2 / 3 * EXPECTED_MIN_ACC


def _check_scripted_history(ev: StabilityGapEvaluator):
    tr = ev.tracker
    assert tr.task_starts == [(0, 0), (1, 10), (2, 20)]
    for task in range(3):
        steps, accs = tr.history(task)
        assert steps == list(range(task * 10, 31, 2))
        assert accs == pytest.approx([scripted_acc(task, s) for s in steps])
    s = ev.summary()
    assert s["task_min_acc"] == {0: pytest.approx(0.25), 1: pytest.approx(0.4)}
    assert s["min_acc"] == pytest.approx(EXPECTED_MIN_ACC)
    assert s["wc_acc"] == pytest.approx(EXPECTED_WC_ACC)
    assert s["avg_acc"] == pytest.approx(1.0)
    gaps = {(g["switch_to"], g["task"]): g for g in s["gaps"]}
    assert gaps[(1, 0)]["depth"] == pytest.approx(0.75)
    assert (gaps[(1, 0)]["steps_to_min"], gaps[(1, 0)]["steps_to_recover"]) == (4, 6)
    assert gaps[(2, 1)]["depth"] == pytest.approx(0.6)


def test_one_fit_per_task_metrics_logging_and_plot(tmp_path):
    ev = StabilityGapEvaluator(val_loaders(), every_n_steps=2, windows=(5,), verbose=True)
    model = Scripted()
    loggers = []
    for _ in range(3):
        logger = CaptureLogger()
        loggers.append(logger)
        quiet_trainer(max_epochs=1, callbacks=[ev], logger=logger).fit(model, train_loader())
    _check_scripted_history(ev)
    # logged at the cumulative iteration, to the Trainer of the fit that ran it
    first = dict(loggers[0].logged)
    assert first[0] == {"stability/acc_task0": 0.0, "stability/avg_acc": 0.0, "stability/wc_acc": 0.0}
    last_step, last = [(s, m) for s, m in loggers[2].logged if "stability/wc_acc" in m][-1]
    assert last_step == 30
    assert last["stability/wc_acc"] == pytest.approx(EXPECTED_WC_ACC)
    assert last["stability/min_acc"] == pytest.approx(EXPECTED_MIN_ACC)
    # task 1 ends with its fit: its rows go to that fit's logger
    switch = next(m for _, m in loggers[1].logged if "stability/gap_task0_at_task1/depth" in m)
    assert switch["stability/gap_task0_at_task1/depth"] == pytest.approx(0.75)
    assert switch["stability/gap_task0_at_task1/steps_to_recover"] == 6.0
    assert ev.summary()["evaluations"] == len(ev.eval_seconds) > 0
    path = ev.plot(tmp_path / "gap.png")
    assert os.path.getsize(path) > 10_000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


class TaskSwitchingData(L.LightningDataModule):
    """One fit; the task changes every epoch (dataloaders reloaded each epoch)."""

    def __init__(self, epochs_per_task: int = 1):
        super().__init__()
        self.epochs_per_task = epochs_per_task

    @property
    def current_task(self) -> int:
        return self.trainer.current_epoch // self.epochs_per_task

    def train_dataloader(self):
        return train_loader()


def test_datamodule_that_switches_tasks_within_one_fit(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    ev = StabilityGapEvaluator(val_loaders(), every_n_steps=2, windows=(5,), plot_path=tmp_path / "p.png")
    logger = TensorBoardLogger(tmp_path / "tb", name="", version="")
    quiet_trainer(max_epochs=3, callbacks=[ev], reload_dataloaders_every_n_epochs=1, logger=logger).fit(
        Scripted(), datamodule=TaskSwitchingData()
    )
    _check_scripted_history(ev)
    assert os.path.exists(tmp_path / "p.png")  # written at the end of fit
    # TensorBoard (Lightning's default logger) got the curves and the summary table
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("stability/acc_task0")] == list(range(0, 31, 2))
    assert acc.Scalars("stability/wc_acc")[-1].value == pytest.approx(EXPECTED_WC_ACC)
    assert "stability/summary/text_summary" in acc.Tags()["tensors"]


def test_resumed_task_sequence_matches_the_uninterrupted_one(tmp_path):
    straight = StabilityGapEvaluator(val_loaders(), every_n_steps=2, windows=(5,), verbose=False)
    model = Scripted()
    for _ in range(3):
        quiet_trainer(max_epochs=2, callbacks=[straight]).fit(model, train_loader(5))

    # interrupted in the middle of task 1 (after 1 of its 2 epochs), resumed by a new process
    first = StabilityGapEvaluator(val_loaders(), every_n_steps=2, windows=(5,), verbose=False)
    model = Scripted()
    quiet_trainer(max_epochs=2, callbacks=[first]).fit(model, train_loader(5))
    trainer = quiet_trainer(max_epochs=2, callbacks=[first, StopAtEpoch(1)])
    trainer.fit(model, train_loader(5))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    resumed = StabilityGapEvaluator(val_loaders(), every_n_steps=2, windows=(5,), verbose=False)
    model = Scripted()
    quiet_trainer(max_epochs=2, callbacks=[resumed]).fit(model, train_loader(5), ckpt_path=tmp_path / "mid.ckpt")
    quiet_trainer(max_epochs=2, callbacks=[resumed]).fit(model, train_loader(5))
    assert resumed.tracker.records == straight.tracker.records
    assert resumed.tracker.task_starts == straight.tracker.task_starts == [(0, 0), (1, 10), (2, 20)]
    assert resumed.summary()["wc_acc"] == pytest.approx(EXPECTED_WC_ACC)


def test_gradient_accumulation_counts_optimizer_steps():
    ev = StabilityGapEvaluator(val_loaders(1), every_n_steps=2, windows=(5,), verbose=False)
    quiet_trainer(max_epochs=1, callbacks=[ev], accumulate_grad_batches=2).fit(Scripted(), train_loader(8))
    steps, _ = ev.tracker.history(0)
    assert steps == [0, 2, 4]  # 8 batches = 4 optimizer steps


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"task_dataloaders": []}, ValueError, "at least one DataLoader, got 0"),
        ({"task_dataloaders": [[1, 2]]}, TypeError, r"task_dataloaders\[0\] must be a DataLoader, got list"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps must be an integer >= 1, got 0"),
        ({"every_n_steps": 5, "windows": (5,)}, ValueError, "windows must be integers > every_n_steps=5"),
        ({"metric": "accuracy"}, TypeError, "metric must be a torchmetrics.Metric, got str"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    kw = {"task_dataloaders": val_loaders(1)}
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        StabilityGapEvaluator(**kw)


def test_more_fits_than_tasks_is_an_error():
    ev = StabilityGapEvaluator(val_loaders(1), every_n_steps=2, verbose=False)
    model = Scripted()
    quiet_trainer(max_epochs=1, callbacks=[ev]).fit(model, train_loader(2))
    with pytest.raises(ValueError, match="the current task is 1, but task_dataloaders holds 1 tasks"):
        quiet_trainer(max_epochs=1, callbacks=[ev]).fit(model, train_loader(2))


def test_the_last_task_switch_is_logged_at_the_end_of_training():
    """The gap rows of the switch into the last task and the windowed forgetting during it have no
    later switch to be logged at: they are logged at the end of the last fit, once."""
    ev = StabilityGapEvaluator(val_loaders(), every_n_steps=2, windows=(5,), verbose=False)
    model = Scripted()
    loggers = []
    for _ in range(3):
        loggers.append(CaptureLogger())
        quiet_trainer(max_epochs=1, callbacks=[ev], logger=loggers[-1]).fit(model, train_loader())
    final = [(step, m) for step, m in loggers[2].logged if "stability/gap_task1_at_task2/depth" in m]
    assert len(final) == 1
    step, m = final[0]
    assert step == 30
    assert m["stability/gap_task1_at_task2/depth"] == pytest.approx(0.6)
    assert m["stability/gap_task0_at_task2/depth"] == pytest.approx(ev.tracker.gaps()[-2]["depth"])
    assert m["stability/wf5"] == pytest.approx(ev.tracker.windowed_forgetting(5))
    # each task's rows once, when it ends (end of its fit; the switch at the same iteration does
    # not log them again)
    for k, end in ((1, 20), (2, 30)):
        rows = [s for lg in loggers for s, m in lg.logged if f"stability/gap_task0_at_task{k}/depth" in m]
        assert rows == [end]
