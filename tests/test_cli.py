"""`lit-optim list`, `lit-optim compare` (tiny settings) and LightningCLI with every optimizer."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

import lit_optim
from lit_optim.cli import main

from .helpers import classification_data


def test_list_names_every_optimizer_with_its_paper(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in lit_optim.available_optimizers():
        assert f"  {name} " in out
    assert out.count("paper:") >= len(lit_optim.available_optimizers())


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["compare", "--optimizers", "adamw,nosuch"], "unknown optimizer 'nosuch'"),
        (["compare", "--optimizers", "adamw", "--steps", "0"], "--steps must be >= 1"),
        (["compare", "--optimizers", "adamw", "--text", "/nonexistent/file.txt"], "--text file not found"),
        (["compare", "--optimizers", "adamw", "--lr", "adamw=fast"], "not a number"),
        (["compare", "--optimizers", "adamw", "--task", "digits", "--text", __file__], "--text applies to --task charlm only"),
        (["compare", "--optimizers", "adamw", "--lr-sweep", "0.5,x"], "--lr-sweep expects comma-separated numbers"),
        (["compare", "--optimizers", "adamw", "--lr-sweep", "0,1"], "--lr-sweep multipliers must be finite and > 0"),
    ],
)
def test_bad_arguments_give_one_line_error(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_task_is_an_argparse_error(capsys):
    assert main(["compare", "--task", "imagenet"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "lit_optim.cli", "compare", "--optimizers", "adamw", "--steps", "-3"], capture_output=True, text=True)
    assert out.returncode == 2 and "--steps must be >= 1" in out.stderr


@pytest.mark.parametrize("task", ["digits", "charlm"])
def test_compare_writes_report_plot_and_tensorboard(task, tmp_path):
    out = tmp_path / "cmp"
    rc = main(["compare", "--task", task, "--optimizers", "adamw,adan", "--steps", "12", "--batch-size", "16",
               "--model-size", "tiny", "--out", str(out), "--no-progress", "--lr", "adan=0.003"])
    assert rc == 0
    report = (out / "report.md").read_text()
    assert "| adamw |" in report and "| adan | 0.003 |" in report
    assert "steps to adamw loss" in report
    row = next(line for line in report.splitlines() if line.startswith("| adamw |"))
    assert "1.00x" in row and "| 8.0 |" in row  # AdamW: two fp32 states per parameter
    assert (out / "loss.png").stat().st_size > 1000
    assert glob.glob(str(out / "tensorboard" / "adan" / "*" / "events.out.tfevents.*"))


def test_compare_lr_sweep_reports_each_optimizers_best_run(tmp_path):
    out = tmp_path / "sweep"
    rc = main(["compare", "--task", "digits", "--optimizers", "adamw,lion", "--steps", "10", "--batch-size", "16",
               "--model-size", "tiny", "--out", str(out), "--no-progress", "--lr-sweep", "0.1,1,10"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    for r in results:
        lrs = [row[0] for row in r["sweep"]]
        base = lit_optim.get_optimizer_info(r["optimizer"]).default_lr
        assert lrs == pytest.approx([base * 0.1, base, base * 10])
        vals = [row[1] for row in r["sweep"]]
        assert r["lr"] == lrs[vals.index(min(vals))]  # the reported run is the best one
        assert r["val_loss"][-1] == min(vals)
        # one TensorBoard run per swept lr
        assert len(glob.glob(str(out / "tensorboard" / r["optimizer"] / "*" / "events.out.tfevents.*"))) == 3
    report = (out / "report.md").read_text()
    assert "Learning-rate sweep" in report and "**lr sweep**: x0.1,1,10" in report
    for r in results:  # the chosen lr is the bold cell of its sweep row
        row = next(line for line in report.splitlines() if line.startswith(f"| {r['optimizer']} | ") and ": " in line)
        assert f"**{r['lr']:g}: " in row and row.count("**") == 2


def test_compare_with_user_text(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    rc = main(["compare", "--text", str(text), "--optimizers", "adamw", "--steps", "5", "--model-size", "tiny",
               "--batch-size", "8", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0
    assert "user text" in (tmp_path / "o" / "report.md").read_text()


class CLIModule(L.LightningModule):
    """A small classifier without its own configure_optimizers (LightningCLI supplies it)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, hidden), torch.nn.LayerNorm(hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 4)
        )

    def forward(self, x):
        return self.net(x)

    def loss_fn(self, logits, y):
        return torch.nn.functional.cross_entropy(logits, y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(classification_data(), batch_size=16)


LIT_CLASSES = sorted(
    {info.cls for info in lit_optim.OPTIMIZERS.values() if info.cls.__module__.startswith("lit_optim")},
    key=lambda c: c.__name__,
)


@pytest.mark.parametrize("cls", LIT_CLASSES, ids=lambda c: c.__name__)
def test_lightning_cli_drives_every_optimizer(cls, tmp_path):
    info = next(i for i in lit_optim.OPTIMIZERS.values() if i.cls is cls)
    args = ["fit", f"--optimizer=lit_optim.{cls.__name__}", f"--optimizer.lr={info.default_lr}",
            "--trainer.max_steps=3", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}"]
    if info.curvature is not None:
        args += ["--trainer.callbacks=lit_optim.callbacks.HessianDiagCallback",
                 f"--trainer.callbacks.estimator={info.curvature}", "--trainer.callbacks.every_n_steps=1"]
    cli = LightningCLI(CLIModule, args=args, save_config_kwargs={"overwrite": True})
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["lr"] == pytest.approx(info.default_lr)
    assert cli.trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
