"""Every lit_optim optimizer in Hugging Face training, through ``Trainer(optimizers=...)`` and
through ``Trainer(optimizer_cls_and_kwargs=...)`` (the optimizer-factory form)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from transformers import Trainer, TrainingArguments

import lit_optim
from lit_optim.integrations import hf as lhf
from lit_optim.registry import OptimizerInfo

from ._hf_utils import TokenData, flat, hf_args, tiny_gpt2, tiny_lora

NAMES = lit_optim.available_optimizers()


def _families() -> dict[str, str]:
    """One representative optimizer per registry family (the first name in sorted order)."""
    fam: dict[str, list[str]] = defaultdict(list)
    for name in NAMES:
        fam[lit_optim.get_optimizer_info(name).family].append(name)
    return {f: min(ns) for f, ns in sorted(fam.items())}


FAMILIES = _families()


def _trainer_cls(name):
    if lit_optim.get_optimizer_info(name).curvature is not None:
        return lhf.CurvatureTrainer
    return Trainer


def _lr(name):
    # the registered default, small enough for 3 steps on the tiny model for every optimizer
    return min(lit_optim.get_optimizer_info(name).default_lr, 1e-2)


@pytest.mark.parametrize("route", ["optimizers", "optimizer_cls_and_kwargs"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_trains_in_hf_trainer(family, route, tmp_path):
    name = FAMILIES[family]
    info = lit_optim.get_optimizer_info(name)
    model = tiny_gpt2()
    before = flat(model)
    args = hf_args(tmp_path, learning_rate=_lr(name), weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=1)
    if route == "optimizers":
        kw = {"optimizers": lhf.create_optimizer_and_scheduler(model, name, args)}
    else:
        kw = {"optimizer_cls_and_kwargs": lhf.optimizer_cls_and_kwargs(name, args)}
    trainer = _trainer_cls(name)(model=model, args=args, train_dataset=TokenData(), **kw)
    out = trainer.train()
    assert trainer.state.global_step == 3
    assert torch.isfinite(torch.tensor(out.training_loss))
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)  # accelerate wraps it in AcceleratedOptimizer
    assert type(inner) is info.cls
    after = flat(model)
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    # HF's weight-decay rule: biases and LayerNorm weights never decay, matrices get args.weight_decay
    names = {id(p): n for n, p in model.named_parameters()}
    for g in inner.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            expect = 0.0 if ("bias" in n or ".ln_" in n) else 0.01
            assert g["weight_decay"] == expect, n
    # HF's cosine schedule ran: after the last step lr is back to ~0
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_builds_through_both_routes_and_steps(name):
    """Both routes give the same groups for every registered optimizer, on a plain and on a PEFT
    model, and one real step on the model's loss changes only trainable parameters."""
    info = lit_optim.get_optimizer_info(name)
    args = TrainingArguments(
        "unused", use_cpu=True, report_to=[], learning_rate=_lr(name), weight_decay=0.05, max_steps=5
    )
    for model in (tiny_gpt2(), tiny_lora()):
        opt_a, _sched = lhf.create_optimizer_and_scheduler(model, name, args)
        factory, kwargs = lhf.optimizer_cls_and_kwargs(name, args)
        from transformers.trainer_optimizer import is_optimizer_factory

        assert is_optimizer_factory(factory)
        opt_b = factory()(model, **kwargs)
        assert type(opt_a) is type(opt_b) is info.cls
        shape = lambda o: [
            (len(g["params"]), g["lr"], g["weight_decay"], g.get("use_muon"), g["lit_group"]) for g in o.param_groups
        ]
        assert shape(opt_a) == shape(opt_b)
        ids = [id(p) for g in opt_a.param_groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
        frozen = [p.detach().clone() for p in model.parameters() if not p.requires_grad]
        trainable = flat(model)
        x = TokenData(4).x
        model(input_ids=x, labels=x).loss.backward()
        if info.curvature is not None:  # Hessian-based optimizers are stepped by CurvatureTrainer tests
            continue
        opt_a.step()
        opt_a.zero_grad()
        assert not torch.equal(flat(model), trainable)
        assert all(torch.equal(a, p) for a, p in zip(frozen, [p for p in model.parameters() if not p.requires_grad]))


def test_both_routes_train_identically(tmp_path):
    """Same seed, same data: the optimizers= route and the factory route end bit-identical."""
    finals = []
    for route in ("optimizers", "factory"):
        model = tiny_gpt2()
        args = hf_args(tmp_path / route, learning_rate=3e-3, weight_decay=0.1, lr_scheduler_type="linear", max_steps=4)
        if route == "optimizers":
            kw = {"optimizers": lhf.create_optimizer_and_scheduler(model, "adan", args)}
        else:
            kw = {"optimizer_cls_and_kwargs": lhf.optimizer_cls_and_kwargs("adan", args)}
        Trainer(model=model, args=args, train_dataset=TokenData(), **kw).train()
        finals.append(flat(model))
    torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=0)


def test_adamw_through_our_route_matches_hf_default(tmp_path):
    """lit_optim's "adamw" through create_optimizer_and_scheduler reproduces HF's own default
    optimizer (torch AdamW, HF decay groups, HF scheduler) exactly: the grouping and schedule
    follow HF's semantics."""
    finals = []
    for ours in (True, False):
        model = tiny_gpt2()
        args = hf_args(
            tmp_path / str(ours),
            learning_rate=3e-3,
            weight_decay=0.1,
            lr_scheduler_type="cosine",
            warmup_steps=1,
            max_steps=4,
            optim="adamw_torch",
        )
        kw = (
            {"optimizers": lhf.create_optimizer_and_scheduler(model, "adamw", args, betas=(0.9, 0.999), eps=1e-8)}
            if ours
            else {}
        )
        Trainer(model=model, args=args, train_dataset=TokenData(), **kw).train()
        finals.append(flat(model))
    torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=1e-7)


def test_scheduler_length_from_dataset_and_errors(tmp_path):
    model = tiny_gpt2()
    args = TrainingArguments(
        str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=8,
        num_train_epochs=2,
        gradient_accumulation_steps=2,
        lr_scheduler_type="linear",
    )
    # 33 samples -> 5 batches -> 3 updates per epoch -> 6 steps
    assert lhf.estimate_training_steps(args, TokenData(33)) == 6
    opt, sched = lhf.create_optimizer_and_scheduler(model, "lion", args, train_dataset=TokenData(33))
    for _ in range(6):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == 0.0
    with pytest.raises(ValueError, match="needs the number of training steps"):
        lhf.create_optimizer_and_scheduler(model, "lion", args)
    const = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], lr_scheduler_type="constant")
    lhf.create_optimizer_and_scheduler(model, "lion", const)  # constant needs no length
    with pytest.raises(ValueError, match="num_training_steps must be an integer >= 1, got 0"):
        lhf.create_optimizer_and_scheduler(model, "lion", args, num_training_steps=0)


def test_bad_inputs_name_the_argument(tmp_path):
    model = tiny_gpt2()
    args = hf_args(tmp_path)
    with pytest.raises(ValueError, match="unknown optimizer 'adamz'; known optimizers: .*adan"):
        lhf.optimizer_cls_and_kwargs("adamz", args)
    with pytest.raises(ValueError, match="unknown optimizer"):
        lhf.create_optimizer_and_scheduler(model, "adamz", args)
    with pytest.raises(TypeError, match="args must be a transformers.TrainingArguments, got dict"):
        lhf.create_optimizer_and_scheduler(model, "adan", {"lr": 1})
    with pytest.raises(ValueError, match=r"lr must be in \[0, inf\), got -1"):
        lhf.optimizer_cls_and_kwargs("adan", args, lr=-1)
    with pytest.raises(ValueError, match=r"weight_decay must be in \[0, inf\), got -0.1"):
        lhf.create_optimizer(model, "adan", args, weight_decay=-0.1)
    with pytest.raises(ValueError, match="lora_plus_ratio / embedding_lr apply to PEFT models only"):
        lhf.create_optimizer(model, "adan", args, lora_plus_ratio=4.0)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got 1.2"):
        lhf.create_optimizer(model, "adan", args, betas=(0.9, 1.2, 0.99))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        lhf.create_optimizer(model, "adan", args)


def test_trainer_refuses_both_forms_together(tmp_path):
    """The two routes are alternatives; HF says so when both are given."""
    model = tiny_gpt2()
    args = hf_args(tmp_path)
    with pytest.raises(RuntimeError, match="incompatible"):
        Trainer(
            model=model,
            args=args,
            train_dataset=TokenData(),
            optimizers=lhf.create_optimizer_and_scheduler(model, "adan", args),
            optimizer_cls_and_kwargs=lhf.optimizer_cls_and_kwargs("adan", args),
        )


MATRIX = OptimizerInfo("fake_matrix", torch.optim.AdamW, "test", "-", "-", 1e-3, grouping="matrix")


def test_whole_model_split_for_orthogonalized_optimizers():
    """grouping="matrix": hidden matrices get use_muon=True; embeddings, the tied head and every
    1-D parameter use_muon=False; HF's no-decay rule on top."""
    model = tiny_gpt2(n_layer=2)
    groups = lhf.optimizer_param_groups(model, MATRIX, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            seen.add(n)
            if "wte" in n or "wpe" in n or p.ndim < 2:
                assert g["use_muon"] is False, n
            else:
                assert g["use_muon"] is True, n
            assert g["weight_decay"] == (0.0 if p.ndim < 2 else 0.1), n
    assert seen == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("name", [n for n in NAMES if lit_optim.get_optimizer_info(n).grouping == "matrix"])
def test_registered_orthogonalized_optimizers_get_the_split(name):
    model = tiny_gpt2()
    groups = lhf.optimizer_param_groups(model, name, weight_decay=0.0)
    assert {g["use_muon"] for g in groups} == {True, False}


def test_fsdp1_is_refused_for_orthogonalized_optimizers(monkeypatch):
    model = tiny_gpt2()
    monkeypatch.setattr(lhf.optimizers, "_is_fsdp1", lambda m: True)
    with pytest.raises(ValueError, match="FSDP1 .* flattened 1-D shards. Use FSDP2"):
        lhf.optimizer_param_groups(model, MATRIX)
    lhf.optimizer_param_groups(model, "adan")  # elementwise optimizers do not care


def test_decay_rule_fallback_matches_hf(monkeypatch):
    """If a future Trainer.get_decay_parameter_names needs an instance, the fallback applies the
    same documented rule."""
    model = tiny_gpt2()
    names = {n for n, _ in model.named_parameters()}
    ours = lhf.hf_decay_parameter_names(model) & names
    assert "transformer.h.0.attn.c_attn.bias" not in ours and "transformer.ln_f.weight" not in ours

    def needs_instance(self, model):
        raise TypeError("get_decay_parameter_names() missing self")

    monkeypatch.setattr(Trainer, "get_decay_parameter_names", needs_instance)
    assert lhf.hf_decay_parameter_names(model) == ours
