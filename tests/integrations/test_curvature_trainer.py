"""Sophia and AdaHessian in HF training through CurvatureTrainer: the Hessian estimate every k
steps, handed to the optimizer, with no change to the user's loop."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import Trainer, TrainerCallback

import lit_optim
from lit_optim.curvature import gnb_diagonal, hutchinson_diagonal
from lit_optim.functional.hutchinson import make_generator, probe_seed
from lit_optim.integrations import hf as lhf

from ._hf_utils import TokenData, flat, hf_args, tiny_gpt2, tiny_lora


def _record_updates(trainer):
    """Wrap the optimizer's update_hessian to record (global_step, estimates)."""
    calls = []

    def install():
        opt = lhf.unwrap_optimizer(trainer.optimizer)
        orig = opt.update_hessian

        def spy(diag):
            calls.append((trainer.state.global_step, [None if d is None else d.clone() for d in diag]))
            return orig(diag)

        opt.update_hessian = spy

    return calls, install


class _Install(TrainerCallback):
    def __init__(self, install):
        self.install = install

    def on_train_begin(self, args, state, control, **kw):
        self.install()


def _sophia_trainer(model, args, **kw):
    return lhf.CurvatureTrainer(
        model=model,
        args=args,
        train_dataset=TokenData(),
        optimizers=lhf.create_optimizer_and_scheduler(model, "sophia", args),
        curvature_every_n_steps=2,
        **kw,
    )


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_sophia_gets_the_estimate_every_k_steps(estimator, tmp_path):
    model = tiny_lora()
    args = hf_args(tmp_path, max_steps=5, learning_rate=1e-3, max_grad_norm=1.0)
    trainer = _sophia_trainer(model, args, curvature_estimator=estimator, curvature_seed=7)
    calls, install = _record_updates(trainer)
    trainer.add_callback(_Install(install))
    before = flat(model)
    trainer.train()
    assert [s for s, _ in calls] == [0, 2, 4]
    assert trainer.num_curvature_estimates == 3
    opt = lhf.unwrap_optimizer(trainer.optimizer)
    params = opt.hessian_params()
    # frozen base weights get no estimate, LoRA weights get one of their shape
    for p, d in zip(params, calls[0][1]):
        assert (d is None) == (not p.requires_grad)
        if d is not None:
            assert d.shape == p.shape and torch.isfinite(d).all()
    if estimator == "gnb":
        assert all((d >= 0).all() for d in calls[0][1] if d is not None)
    # the curvature EMA in Sophia's state is built from the estimates
    assert any(float(opt.state[p]["hessian"].abs().sum()) > 0 for p in params if p.requires_grad)
    assert not torch.equal(flat(model), before)


def test_estimate_equals_the_estimator_on_the_same_batch(tmp_path):
    """One step, k=1: what the optimizer received is gnb_diagonal of the step's micro-batch with
    the generator seeded by (seed, step, rank)."""
    model = tiny_gpt2()
    args = hf_args(tmp_path, max_steps=1, per_device_train_batch_size=4, learning_rate=0.0)
    ds = TokenData(4)
    trainer = lhf.CurvatureTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        optimizers=lhf.create_optimizer_and_scheduler(model, "sophia", args),
        curvature_every_n_steps=1,
        curvature_seed=3,
    )
    calls, install = _record_updates(trainer)
    trainer.add_callback(_Install(install))
    trainer.train()
    ((_step, got),) = calls
    opt = lhf.unwrap_optimizer(trainer.optimizer)
    params = opt.hessian_params()
    # the training sampler shuffles: rebuild the same batch from the dataloader's order
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    logits = model(input_ids=batch["input_ids"]).logits
    ref = gnb_diagonal(logits, params, generator=make_generator(probe_seed(3, 0, 0)))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-8)


def test_adahessian_hutchinson_runs_through_sdpa_models(tmp_path):
    """HF's GPT-2 uses fused SDPA attention; the estimate's forward runs on the math kernel,
    which has a double backward."""
    model = tiny_gpt2()
    assert model.config._attn_implementation == "sdpa"
    args = hf_args(tmp_path, max_steps=2, learning_rate=1e-2)
    trainer = lhf.CurvatureTrainer(
        model=model,
        args=args,
        train_dataset=TokenData(),
        optimizer_cls_and_kwargs=lhf.optimizer_cls_and_kwargs("adahessian", args),
        curvature_every_n_steps=1,
    )
    trainer.train()
    assert trainer.num_curvature_estimates == 2
    # the same estimate as hutchinson_diagonal under the math kernel
    x = TokenData(2).x
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        d = hutchinson_diagonal(model(input_ids=x, labels=x).loss, list(model.parameters()))
    assert all(t is None or torch.isfinite(t).all() for t in d)


def test_once_per_step_under_gradient_accumulation(tmp_path):
    model = tiny_gpt2()
    args = hf_args(tmp_path, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=3)
    trainer = lhf.CurvatureTrainer(
        model=model,
        args=args,
        train_dataset=TokenData(48),
        optimizers=lhf.create_optimizer_and_scheduler(model, "sophia", args),
        curvature_every_n_steps=1,
    )
    trainer.train()
    assert trainer.num_curvature_estimates == 2


def test_custom_logits_hook(tmp_path):
    seen = []

    class MyTrainer(lhf.CurvatureTrainer):
        def curvature_logits(self, model, inputs):
            seen.append(sorted(inputs))
            return model(**inputs).logits[:, :-1], None  # e.g. drop the last position

    model = tiny_gpt2()
    args = hf_args(tmp_path, max_steps=1)
    MyTrainer(
        model=model,
        args=args,
        train_dataset=TokenData(),
        optimizers=lhf.create_optimizer_and_scheduler(model, "sophia", args),
        curvature_every_n_steps=1,
    ).train()
    assert seen == [["input_ids"]]  # labels removed before the GNB forward


def test_refusals(tmp_path):
    model = tiny_gpt2()
    args = hf_args(tmp_path)
    with pytest.raises(TypeError, match="needs an optimizer that consumes Hessian estimates .* got Adan"):
        lhf.CurvatureTrainer(
            model=model,
            args=args,
            train_dataset=TokenData(),
            optimizers=lhf.create_optimizer_and_scheduler(model, "adan", args),
        ).train()
    with pytest.raises(
        ValueError, match=r"curvature_estimator must be one of \['gnb', 'hutchinson', None\], got 'exact'"
    ):
        lhf.CurvatureTrainer(model=model, args=args, curvature_estimator="exact")
    with pytest.raises(ValueError, match="curvature_every_n_steps must be an integer >= 1, got 0"):
        lhf.CurvatureTrainer(model=model, args=args, curvature_every_n_steps=0)
    with pytest.raises(TypeError, match="curvature_samples must be an integer >= 1, got float"):
        lhf.CurvatureTrainer(model=model, args=args, curvature_samples=1.5)


def test_mixin_composes_with_other_trainer_subclasses(tmp_path):
    calls = []

    class Base(Trainer):
        def compute_loss(self, model, inputs, *a, **kw):
            calls.append(model.training)
            return super().compute_loss(model, inputs, *a, **kw)

    class Mixed(lhf.CurvatureTrainerMixin, Base):
        pass

    model = tiny_gpt2()
    args = hf_args(tmp_path, max_steps=2)
    t = Mixed(
        model=model,
        args=args,
        train_dataset=TokenData(),
        optimizers=lhf.create_optimizer_and_scheduler(model, "adahessian", args),
        curvature_every_n_steps=1,
    )
    t.train()
    assert t.num_curvature_estimates == 2
    assert len(calls) == 4  # 2 training steps + 2 Hutchinson estimates through the user's compute_loss
    assert lit_optim.get_optimizer_info("adahessian").curvature == "hutchinson"


def test_logs_the_curvature_keys_of_the_lightning_callback(tmp_path):
    """Issue 15 item 19: CurvatureTrainer logs what HessianDiagCallback logs, under the same keys,
    and the values are those of the estimate handed to the optimizer."""
    from lit_optim.callbacks import HessianDiagCallback

    model = tiny_lora()
    args = hf_args(tmp_path, max_steps=4, logging_strategy="steps", logging_steps=1, max_grad_norm=0.0)
    trainer = _sophia_trainer(model, args, curvature_log_top_eigenvalue=True, curvature_eigen_iters=3)
    calls, install = _record_updates(trainer)
    trainer.add_callback(_Install(install))
    trainer.train()
    # the keys HessianDiagCallback documents as logged (its docstring is the reference)
    lightning_keys = set(re.findall(r"``(curvature/[a-z_0-9]+)``", HessianDiagCallback.__doc__))
    assert lightning_keys == {
        "curvature/trace",
        "curvature/diag_mean",
        "curvature/trace_lr_over_2",
        "curvature/clip_fraction",
        "curvature/top_eigenvalue",
        "curvature/top_eigenvalue_lr_over_2",
    }
    logged = [h for h in trainer.state.log_history if any(k.startswith("curvature/") for k in h)]
    assert [h["step"] for h in logged] == [1, 3]  # the log after each estimate (steps 0 and 2)
    for h, (_, diag) in zip(logged, calls):
        assert {k for k in h if k.startswith("curvature/")} == lightning_keys
        trace = float(sum(d.double().sum() for d in diag if d is not None))
        assert h["curvature/trace"] == pytest.approx(trace, rel=1e-5)
        numel = sum(d.numel() for d in diag if d is not None)
        assert h["curvature/diag_mean"] == pytest.approx(trace / numel, rel=1e-5)
        assert h["curvature/trace_lr_over_2"] == pytest.approx(trace * args.learning_rate / 2, rel=1e-5)
        assert 0.0 <= h["curvature/clip_fraction"] <= 1.0
        assert h["curvature/top_eigenvalue_lr_over_2"] == pytest.approx(
            h["curvature/top_eigenvalue"] * args.learning_rate / 2, rel=1e-6
        )
    assert trainer.last_curvature_stats.keys() == lightning_keys
    # curvature_log_stats=False: nothing logged
    trainer = _sophia_trainer(tiny_lora(), args, curvature_log_stats=False)
    trainer.train()
    assert not any(k.startswith("curvature/") for h in trainer.state.log_history for k in h)
    assert trainer.num_curvature_estimates == 2
