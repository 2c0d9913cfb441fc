"""Every lit_optim callback through LightningCLI (``--trainer.callbacks+=lit_optim.callbacks.X``),
with its defaults: the values jsonargparse produces (an int default parsed as a float, a config
round trip) must be accepted. The ``fit`` runs two steps of a tiny model."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

import lit_optim.callbacks

from ..helpers import classification_data
from ..test_cli import CLIModule  # a small classifier without configure_optimizers


class ToyTaskLoader(DataLoader):
    """The validation loader of one task, buildable from its class path on the command line."""

    def __init__(self, n: int = 32, seed: int = 1, batch_size: int = 16):
        super().__init__(classification_data(n, seed=seed), batch_size=batch_size)


_BASE = [
    "--trainer.max_steps=2",
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]

_LOADER = f"{__name__}.ToyTaskLoader"

#: callback -> (extra arguments after ``--trainer.callbacks+=...``, optimizer); every name in
#: ``lit_optim.callbacks.__all__`` that is a Callback must be here
CASES = {
    "AdaptiveBatchSizeCallback": (["--trainer.callbacks.max_batch_size=64"], "lit_optim.AdaGrad"),
    "GradClipMedianCallback": ([], "torch.optim.SGD"),
    "HessianDiagCallback": (["--trainer.callbacks.every_n_steps=1"], "lit_optim.Sophia"),
    "StabilityGapEvaluator": (
        [
            (
                f'--trainer.callbacks.task_dataloaders=[{{"class_path": "{_LOADER}"}}, '
                f'{{"class_path": "{_LOADER}", "init_args": {{"seed": 2}}}}]'
            ),
            "--trainer.callbacks.every_n_steps=1",
            "--trainer.callbacks.verbose=false",
        ],
        "torch.optim.SGD",
    ),
    "WeightAveragingCallback": ([], "torch.optim.SGD"),
}


def test_cases_cover_every_callback():
    exported = {
        name
        for name in lit_optim.callbacks.__all__
        if isinstance(getattr(lit_optim.callbacks, name), type)
        and issubclass(getattr(lit_optim.callbacks, name), L.Callback)
    }
    assert exported == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_lightning_cli_fits_with_each_callback_at_its_defaults(name, tmp_path):
    extra, optimizer = CASES[name]
    args = [
        "fit",
        f"--optimizer={optimizer}",
        "--optimizer.lr=0.01",
        f"--trainer.default_root_dir={tmp_path}",
        *_BASE,
        f"--trainer.callbacks+=lit_optim.callbacks.{name}",
        *extra,
    ]
    cli = LightningCLI(CLIModule, args=args, save_config_kwargs={"overwrite": True})
    cb = next(c for c in cli.trainer.callbacks if type(c).__name__ == name)
    assert cli.trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    if name == "WeightAveragingCallback":
        assert cb.primary == 0 and cb.averager is not None and cb.averager.n_averaged == 2
    if name == "AdaptiveBatchSizeCallback":
        assert cb.stats == "auto" and cb.stats_source == "per_example"
    if name == "StabilityGapEvaluator":
        assert cb.tracker.records


def test_weight_averaging_primary_survives_a_config_round_trip(tmp_path):
    """The saved config (``config.yaml``) of a run, read back, builds the same callback."""
    args = [
        "fit",
        "--optimizer=torch.optim.SGD",
        "--optimizer.lr=0.01",
        f"--trainer.default_root_dir={tmp_path}",
        *_BASE,
        "--trainer.callbacks+=lit_optim.callbacks.WeightAveragingCallback",
        "--trainer.callbacks.decays=[0.9, 0.99]",
        "--trainer.callbacks+=lit_optim.callbacks.WeightAveragingCallback",
        "--trainer.callbacks.decays=[0.5, 0.8]",
        "--trainer.callbacks.primary=1",
    ]
    cli = LightningCLI(CLIModule, args=args, save_config_kwargs={"overwrite": True})
    config = next(tmp_path.rglob("config.yaml"))
    again = LightningCLI(
        CLIModule,
        args=["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path / 'again'}"],
        save_config_kwargs={"overwrite": True},
    )
    for run in (cli, again):
        cbs = [c for c in run.trainer.callbacks if isinstance(c, lit_optim.callbacks.WeightAveragingCallback)]
        assert [(c.decays, c.primary) for c in cbs] == [((0.9, 0.99), 0), ((0.5, 0.8), 1)]
