from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lit_optim
from lit_optim.factory import LRSchedule


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)


def test_create_optimizer_splits_weight_decay():
    net = Net()
    opt = lit_optim.create_optimizer(net, "adabelief", lr=3e-3, weight_decay=0.1)
    assert isinstance(opt, lit_optim.AdaBelief)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    free = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(net.fc.weight) in decayed and id(net.emb.weight) in decayed
    assert {id(net.fc.bias), id(net.norm.weight), id(net.norm.bias), id(net.head.bias)} <= free
    assert all(g["lr"] == 3e-3 for g in opt.param_groups)


def test_create_optimizer_defaults_and_torch_baselines():
    net = Net()
    assert lit_optim.create_optimizer(net, "lion").defaults["lr"] == 1e-4
    assert isinstance(lit_optim.create_optimizer(net.parameters(), "AdamW"), torch.optim.AdamW)
    assert isinstance(lit_optim.create_optimizer(net, "sgd", momentum=0.9), torch.optim.SGD)
    groups = [{"params": [net.fc.weight], "lr": 0.5}]
    opt = lit_optim.create_optimizer(groups, "adan")
    assert opt.param_groups[0]["lr"] == 0.5
    for name in lit_optim.available_optimizers():
        assert name == name.lower()


def test_tied_and_frozen_parameters():
    net = Net()
    net.head.weight = net.emb.weight  # tied
    net.norm.weight.requires_grad_(False)
    opt = lit_optim.create_optimizer(net, "adamw")
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert id(net.norm.weight) not in ids


def test_no_weight_decay_hook_is_respected():
    net = Net()
    net.no_weight_decay = lambda: {"emb.weight"}
    opt = lit_optim.create_optimizer(net, "adamw", weight_decay=0.1)
    free = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(net.emb.weight) in free


def test_matrix_groups_split():
    net = Net()
    groups = lit_optim.param_groups.matrix_groups(net, 0.01)
    muon = {id(p) for g in groups if g["use_muon"] for p in g["params"]}
    assert muon == {id(net.fc.weight)}


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "wsd"])
def test_schedules_shape(kind):
    s = LRSchedule(kind, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    # transformers' warm-up: step / warmup_steps, 1.0 reached at step warmup_steps (wsd ramps from min_lr_ratio)
    assert s(0) == pytest.approx(0.1 if kind == "wsd" else 0.0)
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.9 if kind == "wsd" else 0.9)
    assert s(10) == pytest.approx(1.0)
    end = s(100)
    assert end == pytest.approx(1.0 if kind == "constant" else 0.1)
    assert s(150) == pytest.approx(end)  # stays at its final value after total_steps
    if kind == "cosine":
        assert s(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    if kind == "wsd":
        assert s(79) == pytest.approx(1.0) and s(90) == pytest.approx(0.55)


SCHEDULE_CASES = [
    ("constant", 10, 0.0),
    ("constant", 0, 0.0),
    ("cosine", 10, 0.0),
    ("cosine", 7, 0.1),
    ("cosine", 0, 0.0),
    ("linear", 10, 0.0),
    ("linear", 1, 0.0),
    ("wsd", 10, 0.0),
    ("wsd", 5, 0.2),
]


@pytest.mark.parametrize("kind,warmup,floor", SCHEDULE_CASES)
def test_schedules_equal_transformers_step_by_step(kind, warmup, floor):
    """One convention for both routes: LRSchedule gives transformers.get_scheduler's multiplier at
    every step (the HF route builds its schedule with get_scheduler)."""
    transformers = pytest.importorskip("transformers")
    total = 40
    s = LRSchedule(kind, total_steps=total, warmup_steps=warmup, min_lr_ratio=floor, decay_fraction=0.25)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = transformers.get_scheduler(optimizer=opt, **s.hf_scheduler_args())
    for step in range(total + 1):
        assert s(step) == pytest.approx(hf.lr_lambdas[0](step), abs=1e-12), step


def test_lightning_and_hf_routes_give_the_same_learning_rates(tmp_path):
    """configure_optimizers (Lightning) and create_optimizer_and_scheduler (HF, from
    TrainingArguments) step through the same learning rates."""
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from lit_optim.integrations.hf import create_optimizer_and_scheduler

    total, warmup = 20, 10
    ours = lit_optim.configure_optimizers(Net(), "adamw", lr=1e-3, scheduler="cosine", warmup_steps=warmup,
                                          total_steps=total)
    args = TrainingArguments(str(tmp_path), learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=warmup,
                             max_steps=total, report_to=[])
    _, hf_sched = create_optimizer_and_scheduler(Net(), "adamw", args)
    sched = ours["lr_scheduler"]["scheduler"]
    for _ in range(total):
        assert sched.get_last_lr()[0] == pytest.approx(hf_sched.get_last_lr()[0], abs=1e-15)
        sched.optimizer.step()
        hf_sched.optimizer.step()
        sched.step()
        hf_sched.step()
    # warm-up reaches the peak at step `warmup`, as in transformers
    assert LRSchedule("cosine", total, warmup)(warmup) == 1.0


def test_schedule_state_dict_resumes():
    """The schedule travels in LambdaLR's state_dict and resumes at the same multiplier."""

    def make():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
        return torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule("wsd", 30, 5, min_lr_ratio=0.1))

    a = make()
    for _ in range(12):
        a.optimizer.step()
        a.step()
    state = a.state_dict()
    assert state["lr_lambdas"][0]["kind"] == "wsd"
    b = torch.optim.lr_scheduler.LambdaLR(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5), LRSchedule("constant", None)
    )
    b.load_state_dict(state)
    for _ in range(20):
        assert b.get_last_lr() == a.get_last_lr()
        for s in (a, b):
            s.optimizer.step()
            s.step()


def test_schedule_errors():
    with pytest.raises(ValueError, match="scheduler must be one of"):
        LRSchedule("step", 10)
    with pytest.raises(ValueError, match="needs total_steps"):
        LRSchedule("cosine", None)
    with pytest.raises(ValueError, match="needs total_steps"):
        lit_optim.configure_optimizers(Net(), "adamw", scheduler="cosine")
    out = lit_optim.configure_optimizers(Net(), "adamw", scheduler="linear", total_steps=10, warmup_steps=2)
    assert out["lr_scheduler"]["interval"] == "step"
    with pytest.raises(TypeError, match="LightningModule"):
        lit_optim.configure_optimizers([nn.Parameter(torch.zeros(2))], "adamw")


def test_validation_messages_name_argument_and_value():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got 1.2"):
        lit_optim.AdaBelief(p, betas=(0.9, 1.2))
    with pytest.raises(TypeError, match="betas must be a tuple"):
        lit_optim.AdaBelief(p, betas=0.9)
    with pytest.raises(TypeError, match="lr must be a real number"):
        lit_optim.Lion(p, lr="fast")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        lit_optim.Lion(p, nonfinite="warn")
    with pytest.raises(TypeError, match="foreach must be None, True or False"):
        lit_optim.Lion(p, foreach="yes")
