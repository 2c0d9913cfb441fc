"""Every ```python snippet of README.md and docs/*.md runs (issue 15 item 13), and so do the
README's ``lit-optim`` and LightningCLI command lines (items 12, 20).

A snippet runs as a reader would run it after the snippets above it in the same file: the
imports of the earlier snippets of its file are executed first, then the snippet itself. The
objects a snippet takes as given (``model``, ``train_ds``, ``args``, ``loader`` ...) are small
stand-ins (:func:`_standins`; a Hugging Face model for snippets that use transformers or
``lit_optim.integrations``, a Lightning MLP classifier otherwise), created only when the
snippet names them. Three substitutions keep each snippet to a few seconds on one core, without
downloads and on the CPU:

* ``import lightning`` gives the real module with a ``Trainer`` that stops after 2 optimizer
  steps on one CPU process without logger, checkpoints or progress bar, and a
  ``LightningModule`` that brings a tiny model and its data (a snippet's ``class
  LitGPT(L.LightningModule): ...`` elides exactly that);
* ``import transformers`` gives the real module whose ``TrainingArguments`` caps the run at 2
  steps (evaluation / save / logging intervals too; CPU, no reporting) and whose
  ``AutoModelForCausalLM.from_pretrained`` builds a 1-layer GPT-2 from a config;
* files a snippet reads (``last.ckpt``, ``run_a.ckpt`` ...) are made beforehand from a tiny run;
* a snippet that uses ``torch.distributed`` / ``fully_shard`` runs in a one-process gloo group.

Whatever a snippet defines but does not run is run afterwards: a ``LightningModule`` subclass is
fitted (with the snippet's ``trainer`` when it made one), an HF ``Trainer`` that was built but not
trained is trained. A snippet may opt out only with a line ``# not executed: <reason>``.
"""

from __future__ import annotations

import ast
import builtins
import re
import shlex
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"^\s*#\s*not executed:(.*)$", re.MULTILINE)
HF_MARKERS = ("transformers", "lit_optim.integrations", "lhf.", "peft")


# ------------------------------------------------------------------------------------ extraction


def _blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced block of ``lang`` in ``path``."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(rf"^```{lang}[ \t]*\n(.*?)^```[ \t]*$", text, re.DOTALL | re.MULTILINE):
        out.append((text[: m.start()].count("\n") + 1, m.group(1)))
    return out


def _snippets() -> list[Any]:
    params = []
    for path in DOCS:
        for k, (line, code) in enumerate(_blocks(path, "python")):
            rel = path.relative_to(ROOT).as_posix()
            params.append(pytest.param(path, k, id=f"{rel}:{line}"))
    return params


def _imports_of(code: str) -> list[str]:
    """The top-level import statements of ``code`` (source text)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:  # that snippet's own test reports it
        return []
    return [ast.get_source_segment(code, node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_every_doc_with_code_has_snippets_collected():
    counts = {p.name: len(_blocks(p, "python")) for p in DOCS}
    assert counts["README.md"] >= 4 and counts["hf_peft.md"] >= 5, counts
    assert sum(counts.values()) >= 20, counts


# ------------------------------------------------------------------------------------ stand-ins

_STATE: dict[str, Any] = {}


def _real_lightning():
    import lightning

    return lightning


def _lightning_standin() -> types.ModuleType:
    """``lightning`` with the stand-in Trainer and LightningModule (see the module docstring)."""
    if "lightning" in _STATE:
        return _STATE["lightning"]
    L = _real_lightning()
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from tests.helpers import classification_data

    class LightningModule(L.LightningModule):
        """A tiny MLP classifier with its data: batches ``(x, y)``, ``forward(x)`` -> logits."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__()
            torch.manual_seed(0)
            self.model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
            self.train_set = classification_data(64)
            self.val_set = classification_data(32, seed=1)

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(-1) == y).float().mean())

        def train_dataloader(self):
            return DataLoader(self.train_set, batch_size=int(self.hparams.get("batch_size", 16)))

        def val_dataloader(self):
            return DataLoader(self.val_set, batch_size=16)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Trainer(L.Trainer):
        """At most 2 optimizer steps per ``fit``, one CPU process, nothing written but what the
        snippet asks for."""

        def __init__(self, *args: Any, **kwargs: Any):
            kwargs.update(max_steps=2, accelerator="cpu", devices=1, strategy="auto", num_sanity_val_steps=0)
            for key in ("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary"):
                kwargs.setdefault(key, False)
            super().__init__(*args, **kwargs)
            self.standin_fits = 0
            _STATE.setdefault("trainers", []).append(self)

        def fit(self, model, *args: Any, **kwargs: Any):
            self.standin_fits += 1
            _STATE.setdefault("fitted", set()).add(type(model))
            return super().fit(model, *args, **kwargs)

    mod = types.ModuleType("lightning")
    mod.__getattr__ = lambda name: getattr(L, name)  # type: ignore[method-assign]
    mod.LightningModule, mod.Trainer = LightningModule, Trainer
    _STATE["lightning"] = mod
    return mod


def _transformers_standin() -> types.ModuleType:
    """``transformers`` with a 2-step ``TrainingArguments`` and an offline ``AutoModelForCausalLM``."""
    if "transformers" in _STATE:
        return _STATE["transformers"]
    import transformers

    from tests.integrations._hf_utils import tiny_gpt2

    real_args = transformers.TrainingArguments

    def TrainingArguments(output_dir: str | None = None, *args: Any, **kw: Any):
        base = {
            "use_cpu": True,
            "report_to": [],
            "disable_tqdm": True,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 16,
            "dataloader_num_workers": 0,
            "logging_strategy": "no",
        }
        base.update(kw)
        base["max_steps"] = 2 if base.get("max_steps", -1) <= 0 else min(base["max_steps"], 2)
        for key in ("eval_steps", "save_steps", "logging_steps"):
            if key in kw:
                base[key] = min(kw[key], base["max_steps"])
        if "logging_steps" in kw:
            base["logging_strategy"] = kw.get("logging_strategy", "steps")
        return real_args(output_dir or "out", *args, **base)

    class AutoModelForCausalLM:
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any):
            return tiny_gpt2()

    class Trainer(transformers.Trainer):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            _STATE.setdefault("hf_trainers", []).append(self)

    mod = types.ModuleType("transformers")
    mod.__getattr__ = lambda name: getattr(transformers, name)  # type: ignore[method-assign]
    mod.TrainingArguments, mod.AutoModelForCausalLM, mod.Trainer = TrainingArguments, AutoModelForCausalLM, Trainer
    _STATE["transformers"] = mod
    return mod


_real_import = builtins.__import__


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name == "lightning":
        return _lightning_standin()
    if level == 0 and name == "transformers":
        return _transformers_standin()
    return _real_import(name, globals, locals, fromlist, level)


def _checkpoint(path: Path) -> None:
    """A Lightning checkpoint of the stand-in module trained with EMA 0.99 / 0.999 / 0.9999."""
    if "ckpt" not in _STATE:
        from lit_optim.callbacks import WeightAveragingCallback

        L = _lightning_standin()
        cb = WeightAveragingCallback(decays=(0.99, 0.999, 0.9999))
        trainer = L.Trainer(callbacks=[cb], default_root_dir=str(path.parent))
        trainer.fit(L.LightningModule())
        trainer.save_checkpoint(path.parent / "_standin.ckpt")
        _STATE["ckpt"] = (path.parent / "_standin.ckpt").read_bytes()
    path.write_bytes(_STATE["ckpt"])


def _standins(names: set[str], hf: bool, cwd: Path) -> dict[str, Any]:
    """The stand-in objects among ``names`` (the snippet's names; see the module docstring)."""
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    ns: dict[str, Any] = {}
    if hf:
        from transformers import Trainer

        from tests.integrations._hf_utils import PatternData, TokenData, tiny_gpt2, tiny_lora

        makers = {
            "model": tiny_gpt2,
            "base": tiny_gpt2,
            "peft_model": tiny_lora,
            "ds": TokenData,
            "train_ds": TokenData,
            "eval_ds": lambda: TokenData(16, seed=1),
            "ev": lambda: TokenData(16, seed=1),
            "args": lambda: _transformers_standin().TrainingArguments("out"),
            "SomeTrainerSubclass": lambda: type("SomeTrainerSubclass", (Trainer,), {}),
            "train_ds_task0": lambda: PatternData(1),
            "train_ds_task1": lambda: PatternData(2),
            "eval_ds_task0": lambda: PatternData(1, n=16, seed=1),
            "eval_ds_task1": lambda: PatternData(2, n=16, seed=1),
        }
    else:
        from tests.helpers import classification_data

        L = _lightning_standin()

        def model():
            return L.LightningModule()

        def loaders(k):
            return [DataLoader(classification_data(32, seed=s), batch_size=16) for s in range(k)]

        def ckpts():
            out = []
            for name in ("run_a.ckpt", "run_b.ckpt", "run_c.ckpt"):
                _checkpoint(cwd / name)
                out.append(name)
            return out

        makers = {
            "model": model,
            "loader": lambda: loaders(1)[0],
            "train_loaders": lambda: loaders(2),
            "val_loaders": lambda: loaders(2),
            "micro_bs": lambda: 16,
            "accumulation": lambda: 2,
            "paths": ckpts,
        }
        if {"params", "loss", "micro_batches", "blocks_a", "blocks_b"} & names:
            m = ns["model"] = model()
            makers.update(
                params=lambda: [p for p in m.parameters() if p.requires_grad],
                blocks_a=lambda: list(m.model[0].parameters()),  # parameter groups of a model
                blocks_b=lambda: list(m.model[2].parameters()),
                micro_batches=lambda: list(loaders(1)[0]),
                loss=lambda: lambda batch: F.cross_entropy(m(batch[0]), batch[1]),
            )
    for name in sorted(names & set(makers)):
        if name not in ns:
            ns[name] = makers[name]()
    return ns


def _files_for(code: str, cwd: Path) -> None:
    for name in ("last.ckpt", "run_a.ckpt", "run_b.ckpt", "run_c.ckpt"):
        if f'"{name}"' in code and not (cwd / name).exists():
            _checkpoint(cwd / name)


def _run_what_was_defined(ns: dict[str, Any], module_name: str) -> None:
    """Fit the LightningModule classes and train the HF Trainers the snippet left unused."""
    if "lightning" in _STATE:
        L = _STATE["lightning"]
        fitted = _STATE.get("fitted", set())
        idle = [t for t in _STATE.get("trainers", []) if t.standin_fits == 0]
        for obj in list(ns.values()):
            if (
                isinstance(obj, type)
                and issubclass(obj, L.LightningModule)
                and obj.__module__ == module_name
                and obj not in fitted
            ):
                (idle.pop(0) if idle else L.Trainer()).fit(obj())
        for trainer in idle:  # a Trainer the snippet configured (callbacks ...) but did not fit
            trainer.fit(L.LightningModule())
    try:
        import transformers
    except ImportError:  # pragma: no cover
        return
    pending = [*_STATE.get("hf_trainers", []), *(v for v in ns.values() if isinstance(v, transformers.Trainer))]
    seen = set()
    for trainer in pending:
        if id(trainer) in seen:
            continue
        seen.add(id(trainer))
        if trainer.state.global_step == 0:
            trainer.train()


# ------------------------------------------------------------------------------------ the tests


@pytest.fixture
def snippet_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("fitted", "hf_trainers", "trainers"):
        _STATE.pop(key, None)
    yield tmp_path
    for key in ("fitted", "hf_trainers", "trainers"):
        _STATE.pop(key, None)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("path,index", _snippets())
def test_snippet_runs(path, index, snippet_env):
    blocks = _blocks(path, "python")
    line, code = blocks[index]
    skip = SKIP_MARK.search(code)
    if skip:
        reason = skip.group(1).strip()
        assert reason, f"{path.name}:{line}: '# not executed:' needs a reason"
        pytest.skip(reason)
    earlier = [imp for _, c in blocks[:index] for imp in _imports_of(c)]
    source = "\n".join([*earlier, code])
    hf = any(m in source for m in HF_MARKERS)
    if hf:
        pytest.importorskip("transformers")
        pytest.importorskip("peft")
    names = {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}
    module_name = f"snippet_{path.stem}_{index}"
    ns: dict[str, Any] = {
        "__name__": module_name,
        "__builtins__": {**vars(builtins), "__import__": _import},
    }
    _files_for(code, snippet_env)
    ns.update(_standins(names, hf, snippet_env))
    # a module object for the snippet, so that classes it defines can be pickled / inspected
    mod = types.ModuleType(module_name)
    sys.modules[module_name] = mod
    mod.__dict__.update(ns)
    group = bool(re.search(r"\bfully_shard\b|torch\.distributed", code)) and not torch.distributed.is_initialized()
    if group:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{snippet_env / '_process_group'}", rank=0, world_size=1
        )
    try:
        for i, part in enumerate(earlier):
            exec(compile(part, f"{path.name}:<import {i}>", "exec"), mod.__dict__)  # noqa: S102
        exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), mod.__dict__)  # noqa: S102
        _run_what_was_defined(mod.__dict__, module_name)
    finally:
        sys.modules.pop(module_name, None)
        if group:
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------ shell lines


def _readme_command_lines(prefix: str) -> list[list[str]]:
    out = []
    for path in DOCS:
        for _, block in _blocks(path, "bash"):
            # a command continued over several lines with a trailing backslash is one line
            for raw in re.sub(r"\\\n\s*", " ", block).splitlines():
                cmd = raw.split(" #", 1)[0].strip()
                if cmd.startswith(prefix):
                    out.append(shlex.split(cmd))
    return out


def test_lit_optim_command_lines_parse(capsys):
    """Every ``lit-optim`` line of the docs parses with the command's own parser (flags, choices,
    types); ``lit-optim list`` runs. Training runs of ``compare`` are tested in tests/test_cli.py."""
    from lit_optim.cli import build_parser, main

    lines = _readme_command_lines("lit-optim ")
    assert any(argv[1:] == ["list"] for argv in lines), lines
    for argv in lines:
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as e:
            if e.code == 0:  # --help
                capsys.readouterr()
                continue
            raise AssertionError(f"{shlex.join(argv)}: {capsys.readouterr().err.strip()}") from e
    assert main(["list"]) == 0
    assert "sophia" in capsys.readouterr().out


def test_readme_lightning_cli_lines_run(tmp_path, monkeypatch):
    """The README's ``python train.py fit ...`` lines (item 12: they need the ``cli`` extra), run
    in-process with LightningCLI over a stand-in module, 2 steps."""
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    L = _lightning_standin()

    class CLIModule(L.LightningModule):
        configure_optimizers = _real_lightning().LightningModule.configure_optimizers

    lines = _readme_command_lines("python train.py ")
    assert len(lines) >= 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    tiny = [
        "--trainer.max_steps=2",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    for argv in lines:
        cli = LightningCLI(CLIModule, args=[*argv[2:], *tiny], save_config_kwargs={"overwrite": True})
        assert cli.trainer.global_step == 2, argv
        opt_cls = argv[argv.index("--optimizer") + 1].rsplit(".", 1)[-1]
        assert type(cli.trainer.optimizers[0]).__name__ == opt_cls
        if "--trainer.callbacks" in argv:
            cb_cls = argv[argv.index("--trainer.callbacks") + 1].rsplit(".", 1)[-1]
            (cb,) = [c for c in cli.trainer.callbacks if type(c).__name__ == cb_cls]
            if cb_cls == "HessianDiagCallback":
                assert cb.num_estimates >= 1


def test_lazy_submodules_of_the_package():
    """Issue 15 item 11: ``import lit_optim`` then ``lit_optim.callbacks...`` (as the README's
    Sophia snippet does) works, in a fresh interpreter, without importing transformers first."""
    import subprocess

    code = (
        "import sys, lit_optim\n"
        "assert 'transformers' not in sys.modules and 'lit_optim.callbacks' not in sys.modules\n"
        "cb = lit_optim.callbacks.HessianDiagCallback(estimator='gnb', every_n_steps=10)\n"
        "assert 'lit_optim.integrations.hf' not in sys.modules\n"
        "for name in ('callbacks', 'curvature', 'functional', 'integrations', 'param_groups', 'optim',\n"
        "             'factory', 'registry', 'tasks', 'compare', 'cli'):\n"
        "    assert getattr(lit_optim, name).__name__ == 'lit_optim.' + name, name\n"
        "    assert name in dir(lit_optim), name\n"
        "try:\n"
        "    lit_optim.no_such_thing\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_thing' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
