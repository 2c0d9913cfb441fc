"""`lit-optim list`, `lit-optim compare` arguments, run folders, resume and report regeneration (tiny
settings), and LightningCLI with every optimizer."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

import lit_optim
from lit_optim.cli import build_parser, main

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
        (["--optimizers", "adamw,nosuch"], "unknown optimizer 'nosuch'"),
        (["--optimizers", "adamw,sam:adamw"], "unknown optimizer wrapper 'sam' in 'sam:adamw'"),
        (["--optimizers", "adan:adamw"], "'adan' in 'adan:adamw' is not a wrapper optimizer"),
        (["--optimizers", "adamw,adamw"], "listed twice"),
        (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
        (["--steps", "ten"], "--steps must be an integer, got 'ten'"),
        (["--seeds", "0"], "--seeds must be an integer >= 1"),
        (["--text", "/nonexistent/file.txt"], "--text file not found"),
        (["--lr", "adamw=fast"], "not a number"),
        (["--lr", "muon=0.02"], "--lr names optimizers that are not compared: muon"),
        (["--lr", "adamw=-1"], "must be finite and > 0"),
        (["--task", "digits", "--text", __file__], "--text applies to --task charlm only"),
        (["--lr-sweep", "0.5,x"], "--lr-sweep expects comma-separated numbers"),
        (["--lr-sweep", "0,1"], "--lr-sweep multipliers must be finite and > 0"),
        (["--tune-grid", "1,-3"], "--tune-grid multipliers must be finite and > 0"),
        (["--tune", "always"], "--tune must be auto, shipped, sweep or none"),
        (["--tune-fraction", "1.5"], "--tune-fraction must be in (0, 1]"),
        (["--scheduler", "exponential"], "--scheduler must be one of"),
        (["--warmup", "1"], "--warmup must be a fraction of the steps in [0, 1)"),
        (["--precision", "8-bit"], "--precision must be one of"),
        (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
        (["--jobs", "0"], "--jobs must be an integer >= 1"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--steps", "-1"], "is not available on this machine"
         if not torch.cuda.is_available() else "--steps must be"),
        (["--name", "a/b"], "--name must be a plain folder name"),
        (["--dataset", __file__], "--dataset goes with --hf-model"),
        (["--config", "/nonexistent.yaml"], "--config file not found"),
        (["--resume"], "--resume: no earlier comparison in"),
    ],
)
def test_bad_arguments_give_one_line_error_before_anything_is_written(argv, msg, capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["compare", "--optimizers", "adamw", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["compare", "--task", "imagenet"], "invalid choice: 'imagenet'"),
        (["compare", "--steps"], "expected one argument"),
        (["compare", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_argparse_errors_are_one_line_too(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1 and err.endswith("--help)")


def test_unwritable_out_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["compare", "--optimizers", "adamw", "--out", str(blocker / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lit-optim compare: error: --out ") and "cannot write there" in err
    assert len(err.splitlines()) == 1


def test_help_describes_the_protocol_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["compare", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "say which to use" in out and "successive-halving" in out
    for text in ["--module PKG.MOD:CLASS", "--hf-model CONFIG_OR_DIR", "--resume", "(default: 400; --quick: 200)",
                 "(default: 3; --quick: 2)", "WRAPPER:BASE", "--timing-reps N"]:
        assert text in out, text
    opts = [a for a in build_parser()._subparsers._group_actions[0].choices["compare"]._actions if a.option_strings]
    assert all(a.help for a in opts)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "lit_optim.cli", "compare", "--optimizers", "adamw", "--steps", "-3"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "--steps must be an integer >= 1" in out.stderr


TINY = ["--task", "digits", "--model-size", "tiny", "--batch-size", "16", "--steps", "8", "--seeds", "2",
        "--tune", "none", "--jobs", "1", "--timing-reps", "2", "--timing-steps", "1"]


def test_compare_run_folder_report_tensorboard_resume_and_regeneration(tmp_path, capsys):
    args = ["compare", *TINY, "--optimizers", "adamw,lion", "--lr", "lion=3e-4", "--out", str(tmp_path), "--name", "exp"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1/4] adamw lr=0.001 seed 0: val " in out and "[4/4] lion lr=0.0003 seed 1" in out
    assert "GPU available" not in out and "Tip:" not in out
    run = tmp_path / "exp"
    assert os.path.realpath(tmp_path / "latest") == os.path.realpath(run)
    for f in ["report.md", "report.html", "results.json", "loss.png"]:
        assert (run / f).exists(), f
    assert not (run / "lr_sweep.png").exists()  # nothing was swept
    report = (run / "report.md").read_text()
    assert "## Recommendation" in report and "| lion | 0.0003 | given | 2/2 |" in report
    assert "| adamw | 0.001 | default | 2/2 |" in report and "optimizer step ms (spread)" in report
    assert "base64," in (run / "report.html").read_text()
    events = glob.glob(str(run / "tensorboard" / "lion" / "lr0.0003-seed1" / "events.out.tfevents.*"))
    assert events and any(b"hparams" in Path(e).read_bytes() for e in events)  # hparams of the run
    results = json.loads((run / "results.json").read_text())
    assert len(results["runs"]) == 4 and results["timing"]["optimizers"]["lion"]["step_ratio"] > 0
    # --resume skips every finished run and rewrites the report
    (run / "report.md").unlink()
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped (--resume)") == 4 and (run / "report.md").exists()
    # a different protocol cannot resume into the same folder; the same name without --resume is refused
    assert main([*args, "--resume", "--steps", "9"]) == 2
    assert "was run with a different steps (8, now 9)" in capsys.readouterr().err
    assert main(args) == 2
    assert "already holds a comparison; pass --resume" in capsys.readouterr().err
    # the report comes back from results.json alone
    (run / "report.md").unlink()
    assert main(["report", str(tmp_path)]) == 0  # OUT means OUT/latest
    assert "## Recommendation" in (run / "report.md").read_text()


def test_each_invocation_gets_its_own_folder(tmp_path, capsys):
    args = ["compare", *TINY, "--steps", "3", "--seeds", "1", "--optimizers", "adamw", "--timing-reps", "0", "--out", str(tmp_path)]
    assert main(args) == 0 and main(args) == 0
    folders = sorted(p.name for p in tmp_path.iterdir() if p.name != "latest")
    assert len(folders) == 2 and all(f.startswith("digits-") for f in folders)
    assert "No recommendation from one seed" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_preset_on_worker_processes(tmp_path, capsys):
    """The --quick preset (4 optimizers x 2 seeds) trained by 2 worker processes, on the tiny digits model."""
    rc = main(["compare", "--quick", "--task", "digits", "--model-size", "tiny", "--steps", "20", "--tune", "none",
               "--jobs", "2", "--timing-reps", "2", "--out", str(tmp_path), "--name", "q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "8 runs on 2 processes x " in out and "[8/8]" in out
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    assert results["optimizers"] == ["adamw", "muon", "lion", "frugal"] and results["settings"]["seeds"] == [0, 1]
    assert len({r["id"] for r in results["runs"]}) == 8 and not any(r["error"] for r in results["runs"])


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
