"""`lit-optim compare` on the user's own model: a LightningModule + LightningDataModule defined
here (imported by path, as a user's package would be), given on the command line or in a config
file, and a Hugging Face causal LM built from a tiny local GPT-2 config trained on a text file."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_optim.cli import main


class TinyModule(L.LightningModule):
    """A user's classifier with its own configure_optimizers (which the comparison replaces)."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        raise AssertionError("lit-optim compare must replace configure_optimizers")


class TinyData(L.LightningDataModule):
    def __init__(self, n: int = 96):
        super().__init__()
        self.n = n

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, 6, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        self.train_set, self.val_set = TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=32)


class NotAModule:
    pass


FAST = ["--steps", "6", "--seeds", "2", "--jobs", "1", "--timing-reps", "2", "--timing-steps", "1", "--tune", "none"]


def test_own_module_and_datamodule_with_sophia_gets_its_curvature_callback(tmp_path, capsys):
    rc = main(["compare", "--module", f"{__name__}:TinyModule", "--module-args", '{"hidden": 12}',
               "--datamodule", f"{__name__}:TinyData", "--optimizers", "adamw,sophia", "--out", str(tmp_path),
               "--name", "mine", *FAST])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "[4/4]" in out and "FAILED" not in out
    res = json.loads((tmp_path / "mine" / "results.json").read_text())
    assert res["problem"]["module_args"] == {"hidden": 12}
    runs = [r for r in res["runs"] if r["phase"] == "eval"]
    assert len(runs) == 4 and all(len(r["train_loss"]) == 6 and r["val_loss"] for r in runs)
    assert runs[0]["num_params"] == 6 * 12 + 12 + 12 * 3 + 3
    assert res["timing"]["optimizers"]["sophia"]["curvature_ms"] > 0  # estimates ran, so the callback was there
    report = (tmp_path / "mine" / "report.md").read_text()
    assert "lit-optim compare: TinyModule" in report and "| sophia | 0.0001 | default | 2/2 |" in report


def test_own_module_from_a_config_file_without_validation_ranks_on_train_loss(tmp_path, capsys):
    cfg = tmp_path / "compare.json"
    cfg.write_text(json.dumps({"module": {"class_path": f"{__name__}.TinyModule", "init_args": {"hidden": 4}},
                               "optimizers": ["adamw", "muon"], "steps": 5, "seeds": 2, "val-every": 0,
                               "val_metric": "not_logged", "tune": "none", "jobs": 1, "timing_reps": 0}))
    # the module's own dataloaders: none, so give the datamodule on the command line (it wins over the file)
    rc = main(["compare", "--config", str(cfg), "--datamodule", f"{__name__}:TinyData", "--out", str(tmp_path),
               "--name", "cfg", "--steps", "4"])
    assert rc == 0, capsys.readouterr()
    res = json.loads((tmp_path / "cfg" / "results.json").read_text())
    assert res["settings"]["steps"] == 4 and res["optimizers"] == ["adamw", "muon"]
    assert "ranked on the final training loss" in (tmp_path / "cfg" / "report.md").read_text()


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--module", "nosuch_pkg.mod:Model"], "--module nosuch_pkg.mod:Model: cannot import 'nosuch_pkg.mod'"),
        (["--module", f"{__name__}:Missing"], "has no attribute 'Missing'"),
        (["--module", f"{__name__}:NotAModule"], "gives a NotAModule, not a LightningModule"),
        (["--module", f"{__name__}:TinyModule", "--module-args", "{bad"], "--module-args must be a JSON object"),
        (["--module", f"{__name__}:TinyModule", "--module-args", '{"width": 3}'], "building it failed (TypeError"),
        (["--module", f"{__name__}:TinyModule", "--datamodule", f"{__name__}:TinyModule"], "not a LightningDataModule"),
        (["--module", f"{__name__}:TinyModule", "--batch-size", "8"], "--batch-size does not apply to --module"),
        (["--module", f"{__name__}:TinyModule", "--task", "digits"], "--task does not apply to --module"),
        (["--datamodule", f"{__name__}:TinyData"], "--datamodule without --module"),
        (["--module", f"{__name__}:TinyModule", "--hf-model", "x.json"], "exclude each other"),
        (["--module", f"{__name__}:TinyModule"], "cannot build the model/data"),  # no dataloader at all
    ],
)
def test_own_module_errors_before_training(argv, msg, tmp_path, capsys):
    assert main(["compare", *argv, "--out", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing was created


@pytest.fixture
def hf_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=64)
    path = tmp_path / "tiny-gpt2.json"
    cfg.to_json_file(str(path))
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 60)
    return path, text


def test_hf_causal_lm_from_a_local_config_on_a_text_file(hf_files, tmp_path, capsys):
    cfg, text = hf_files
    rc = main(["compare", "--hf-model", str(cfg), "--dataset", str(text), "--optimizers", "adamw,muon",
               "--block-size", "16", "--batch-size", "4", "--out", str(tmp_path / "o"), "--name", "hf", *FAST])
    out = capsys.readouterr().out
    assert rc == 0, out
    res = json.loads((tmp_path / "o" / "hf" / "results.json").read_text())
    assert res["problem"]["kind"] == "hf" and res["meta"]["label"] == "hf-tiny-gpt2"
    assert all(not r["error"] and len(r["train_loss"]) == 6 for r in res["runs"])
    assert "character tokens" in res["meta"]["data"] and "random init" in res["meta"]["model"]


def test_hf_errors_before_training(hf_files, tmp_path, capsys):
    cfg, text = hf_files
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    wide = tmp_path / "wide.txt"
    wide.write_text("".join(chr(0x4E00 + i) for i in range(200)) * 5)
    for argv, msg in [
        (["--hf-model", str(cfg)], "--hf-model needs --dataset FILE"),
        (["--hf-model", str(tmp_path / "nope.json"), "--dataset", str(text)], "cannot load a config"),
        (["--hf-model", str(cfg), "--dataset", str(short)], "too short for block size"),
        (["--hf-model", str(cfg), "--dataset", str(wide)], "distinct characters but the model's vocab_size is 64"),
        (["--hf-model", str(cfg), "--dataset", str(text), "--block-size", "64"], "exceeds the model's 32 positions"),
        (["--hf-model", str(cfg), "--dataset", str(text), "--text", str(text)], "--text applies to the built-in"),
    ]:
        assert main(["compare", *argv, "--out", str(tmp_path / "o2"), *FAST]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (argv, err)
