"""The protocol of `lit-optim compare` without training: optimizer specs (WRAPPER:BASE), shipped
learning rates, the successive-halving sweep, and optimizer injection into a user's module."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

import lit_optim
from lit_optim import compare_protocol as cp
from lit_optim.registry import OPTIMIZERS, register_optimizer


class _Wrap(torch.optim.SGD):
    """A stand-in wrapper optimizer: takes a base optimizer name like the flatness methods will."""

    def __init__(self, params, lr=0.1, base="adamw"):
        super().__init__(params, lr=lr)
        self.base_name = base


@pytest.fixture
def wrapper_registered():
    register_optimizer("testwrap", family="test", paper="-", summary="-", default_lr=0.1)(_Wrap)
    yield "testwrap"
    OPTIMIZERS.pop("testwrap")


def test_plain_names_and_errors():
    assert cp.parse_optimizer_spec(" AdamW ").text == "adamw"
    assert cp.parse_optimizer_spec("dct-lowrank").name == "dct_lowrank"
    for text, msg in [
        ("nosuch", "unknown optimizer 'nosuch'"),
        ("sam:adamw", "unknown optimizer wrapper 'sam'"),
        ("adan:adamw", "'adan' in 'adan:adamw' is not a wrapper optimizer"),
        ("a:b:c", "expected NAME or WRAPPER:BASE"),
        ("adamw:", "expected NAME or WRAPPER:BASE"),
    ]:
        with pytest.raises(ValueError, match=msg):
            cp.parse_optimizer_spec(text)
    with pytest.raises(ValueError, match="listed twice"):
        cp.parse_optimizer_list("adamw,muon,AdamW")
    with pytest.raises(ValueError, match="empty"):
        cp.parse_optimizer_list(" , ")


def test_wrapper_specs_parse_inject_and_inherit_curvature(wrapper_registered):
    assert "testwrap" in cp.wrapper_optimizers()
    spec = cp.parse_optimizer_spec("testwrap:Sophia")
    assert (spec.text, spec.name, spec.base, spec.kwargs) == ("testwrap:sophia", "testwrap", "sophia", {"base": "sophia"})
    assert spec.curvature == "gnb"  # the base's Hessian estimator: HessianDiagCallback is added
    with pytest.raises(ValueError, match="unknown base optimizer 'nosuch'"):
        cp.parse_optimizer_spec("testwrap:nosuch")
    with pytest.raises(ValueError, match="must not be a wrapper"):
        cp.parse_optimizer_spec("testwrap:testwrap")
    module = _Module()
    cp.inject_optimizer(module, cp.parse_optimizer_spec("testwrap:adamw"), lr=0.05, scheduler="linear",
                        warmup_steps=2, total_steps=10)
    out = module.configure_optimizers()
    assert isinstance(out["optimizer"], _Wrap) and out["optimizer"].base_name == "adamw"
    ramp = lit_optim.LRSchedule("linear", 10, warmup_steps=2)(0)  # the comparison's schedule, warm-up included
    assert out["optimizer"].param_groups[0]["lr"] == pytest.approx(0.05 * ramp)
    assert out["lr_scheduler"]["interval"] == "step"


class _Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):  # the user's own: replaced by the comparison
        raise AssertionError("not called")


def test_inject_optimizer_overrides_only_configure_optimizers():
    module = _Module()
    cp.inject_optimizer(module, cp.parse_optimizer_spec("muon"), lr=0.02, scheduler="cosine", warmup_steps=0,
                        total_steps=100)
    assert isinstance(module, _Module) and type(module).__name__ == "_Module"
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, lit_optim.Muon)
    cp.inject_optimizer(module, cp.parse_optimizer_spec("adamw"), lr=1e-3, scheduler="constant", warmup_steps=0,
                        total_steps=100)  # a second injection replaces the first
    assert type(module).__mro__[1] is _Module
    assert isinstance(module.configure_optimizers()["optimizer"], torch.optim.AdamW)


def test_shipped_lrs_apply_to_their_task_and_nearby_step_counts(monkeypatch):
    from lit_optim import _tuned_lrs

    entry = {"steps": 400, "scheduler": "cosine", "seed": 1000, "lrs": {"adamw": 3e-3}, "trials": {"adamw": [[3e-3, 400, 1, 1.7]]}}
    monkeypatch.setattr(_tuned_lrs, "TUNED", {"charlm/small/b32": [entry]})
    task = cp.Problem(task="charlm", model_size="small", batch_size=32)
    s = cp.Settings(steps=400)
    assert cp.shipped_lr(task, s, "adamw")[0] == 3e-3
    assert cp.shipped_lr(task, cp.Settings(steps=200), "adamw") is not None  # within 2x
    assert cp.shipped_lr(task, cp.Settings(steps=1000), "adamw") is None
    assert cp.shipped_lr(task, cp.Settings(steps=400, scheduler="linear"), "adamw") is None
    assert cp.shipped_lr(task, s, "muon") is None
    assert cp.shipped_lr(cp.Problem(task="charlm", model_size="small", batch_size=32, text_path="x.txt"), s, "adamw") is None
    adamw, muon = cp.parse_optimizer_spec("adamw"), cp.parse_optimizer_spec("muon")
    assert cp.lr_plan(task, s, adamw, {})["source"] == "shipped"
    assert cp.lr_plan(task, s, muon, {})["source"] == "sweep"  # auto: no record, so it is tuned here
    assert cp.lr_plan(task, cp.Settings(tune="shipped"), muon, {}) == {"source": "default", "lr": 0.02,
                                                                       "note": "no shipped lr for this task"}
    assert cp.lr_plan(task, cp.Settings(tune="none"), adamw, {})["source"] == "default"
    assert cp.lr_plan(task, s, adamw, {"adamw": 5e-4}) == {"source": "given", "lr": 5e-4}


def _drive(plan, settings, score):
    """Run the plan's generator with fake records whose score is ``score(lr, steps)``."""
    gen = cp._plan(cp.parse_optimizer_spec("adamw"), plan, settings)
    waves = []
    wave = next(gen)
    while True:
        waves.append(wave)
        recs = []
        for run in wave:
            v = score(run.lr, run.steps)
            recs.append({"error": None if math.isfinite(v) else "diverged", "final_val_loss": v, "final_train_loss": v})
        try:
            wave = gen.send(recs)
        except StopIteration:
            return waves


def test_successive_halving_picks_the_interior_minimum():
    s = cp.Settings(steps=100, seeds=[0, 1, 2])
    plan = {"source": "sweep", "lr": None, "base_lr": 1e-3}
    waves = _drive(plan, s, lambda lr, steps: (math.log10(lr) - math.log10(3e-3)) ** 2 + 100 / steps)
    assert [len(w) for w in waves] == [5, 3, 3]  # 5 short runs, the best 3 at full length, 3 seeds
    assert {r.steps for r in waves[0]} == {25} and all(r.seed == 1000 and r.phase == "tune" for r in waves[0])
    assert sorted(r.lr for r in waves[1]) == pytest.approx([1e-3, 3e-3, 1e-2]) and {r.steps for r in waves[1]} == {100}
    assert plan["lr"] == pytest.approx(3e-3) and "note" not in plan
    assert [(r.seed, r.phase, r.lr) for r in waves[2]] == [(0, "eval", plan["lr"]), (1, "eval", plan["lr"]), (2, "eval", plan["lr"])]
    assert plan["runs_tuning"] == 8 and plan["tuning_steps"] == 5 * 25 + 3 * 100


def test_sweep_extends_beyond_an_edge_winner_and_says_so():
    s = cp.Settings(steps=100, seeds=[0], tune_extend=2)
    plan = {"source": "sweep", "lr": None, "base_lr": 1e-3}
    waves = _drive(plan, s, lambda lr, steps: -math.log10(lr))  # larger is always better
    assert [len(w) for w in waves] == [5, 1, 1, 3, 1]
    assert waves[1][0].lr == pytest.approx(3e-2, rel=0.01) and waves[2][0].lr == pytest.approx(9e-2, rel=0.01)
    assert plan["lr"] == pytest.approx(9e-2, rel=0.01) and "edge" in plan["note"]


def test_sweep_where_every_run_fails_falls_back_to_the_default():
    plan = {"source": "sweep", "lr": None, "base_lr": 1e-3}
    waves = _drive(plan, cp.Settings(steps=100, seeds=[0]), lambda lr, steps: math.inf)
    assert plan["lr"] == 1e-3 and "failed" in plan["note"]
    assert waves[-1][0].phase == "eval"


def test_steps_to_reach_and_final_loss():
    losses = [3.0] * 10 + [1.0] * 10
    assert cp.final_loss(losses) == 1.0
    assert cp.steps_to_reach(losses, 1.0) == 15  # trailing window of 5
    assert cp.steps_to_reach(losses, 0.5) is None
    assert cp.steps_to_reach(losses, math.nan) is None
