"""The lit_optim TrainerCallback twins in a real HF Trainer: median gradient clipping, weight
averaging (EMA), adaptive batch size through gradient accumulation; logging and checkpoints."""

from __future__ import annotations

import math
import os
import statistics

import pytest
import torch
from transformers import Trainer, TrainerCallback

from lit_optim.integrations import hf as lhf

from ._hf_utils import TokenData, flat, hf_args, tiny_gpt2, tiny_lora


def _trainer(model, args, callbacks, name="adan", cls=Trainer, n=32, eval_ds=None):
    return cls(
        model=model,
        args=args,
        train_dataset=TokenData(n),
        eval_dataset=eval_ds,
        callbacks=callbacks,
        optimizers=lhf.create_optimizer_and_scheduler(model, name, args),
    )


class _GradSpy(TrainerCallback):
    """Placed after the clipping callback: the gradient norm the optimizer will see."""

    def __init__(self):
        self.norms = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        params = [p for g in lhf.unwrap_optimizer(optimizer).param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))


class _Pre(TrainerCallback):
    """Placed before the clipping callback: the gradient norm before clipping."""

    def __init__(self):
        self.norms = []

    on_pre_optimizer_step = _GradSpy.on_pre_optimizer_step


# ------------------------------------------------------------------------------------ clipping


def test_median_clipping_requires_max_grad_norm_zero(tmp_path):
    model = tiny_gpt2()
    args = hf_args(tmp_path, max_grad_norm=1.0)
    with pytest.raises(
        ValueError, match=r"max_grad_norm=1.0\) is set: HF clips .* before on_pre_optimizer_step.*max_grad_norm=0"
    ):
        _trainer(model, args, [lhf.GradClipMedianCallback()]).train()
    with pytest.raises(ValueError, match="window must be"):
        lhf.GradClipMedianCallback(window=0)


def test_lit_trainer_switches_hf_clipping_off_for_median_clipping(tmp_path):
    """Issue 15 item 13: the README's LitTrainer + GradClipMedianCallback with HF's default
    max_grad_norm=1.0 trains, HF does not clip, and the caller's args are left as given."""
    import warnings

    for value, warns in ((1.0, False), (0.5, True)):
        args = hf_args(tmp_path / str(value), max_grad_norm=value, max_steps=3, learning_rate=3e-2)
        pre, cb, post = _Pre(), lhf.GradClipMedianCallback(factor=1e-3, min_history=1), _GradSpy()
        trainer = _trainer(tiny_gpt2(), args, [pre, cb, post], cls=lhf.LitTrainer)
        hf_clip = []
        orig = trainer.accelerator.clip_grad_norm_
        trainer.accelerator.clip_grad_norm_ = lambda *a, _log=hf_clip, _orig=orig, **k: _log.append(a) or _orig(*a, **k)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            trainer.train()
        assert any("replaces HF's gradient clipping" in str(x.message) for x in w) == warns
        # HF only measures the norm (max_norm=inf) once its clipping is off
        assert all(math.isinf(c[1]) for c in hf_clip) and trainer.args.max_grad_norm == 0.0
        assert args.max_grad_norm == value  # the caller's object is unchanged
        assert len(pre.norms) == 3
        # steps 1, 2: clipped by the callback alone, at 1e-3 x the past median (far below HF's threshold)
        for t in (1, 2):
            thr = 1e-3 * statistics.median(pre.norms[:t])
            assert post.norms[t] == pytest.approx(min(pre.norms[t], thr), rel=1e-5)
    # a plain Trainer cannot switch it off: the callback still refuses (tested above)


def test_median_clipping_clips_at_factor_times_past_median(tmp_path):
    model = tiny_gpt2()
    args = hf_args(
        tmp_path, max_grad_norm=0.0, max_steps=8, learning_rate=3e-2, logging_steps=1, logging_strategy="steps"
    )
    pre, cb, post = _Pre(), lhf.GradClipMedianCallback(window=3, factor=0.5, min_history=2), _GradSpy()
    trainer = _trainer(model, args, [pre, cb, post])
    trainer.train()
    assert len(pre.norms) == len(post.norms) == 8
    clipped = 0
    for t in range(8):
        if t < 2:  # warm-up: untouched
            assert post.norms[t] == pytest.approx(pre.norms[t], rel=1e-6)
            continue
        thr = 0.5 * statistics.median(pre.norms[max(0, t - 3) : t])
        assert post.norms[t] == pytest.approx(min(pre.norms[t], thr), rel=1e-5)
        clipped += pre.norms[t] > thr
    assert clipped > 0
    # the stats reached the log history (plain Trainer: added by the callback's on_log)
    logged = [h for h in trainer.state.log_history if "grad_clip/grad_norm" in h]
    assert len(logged) == 8
    assert logged[-1]["grad_clip/grad_norm"] == pytest.approx(pre.norms[-1], rel=1e-6)
    assert logged[-1]["grad_clip/clipped_fraction"] == pytest.approx(clipped / 8)


class _Reporter(TrainerCallback):
    """Stands in for TensorBoard/W&B: HF puts reporting callbacks before user callbacks."""

    def __init__(self):
        self.keys = set()

    def on_log(self, args, state, control, logs=None, **kw):
        self.keys.update(logs or {})


def test_lit_trainer_forwards_callback_logs_to_reporters(tmp_path):
    args = hf_args(
        tmp_path,
        max_grad_norm=0.0,
        max_steps=2,
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
    )
    seen = {}
    for cls in (Trainer, lhf.LitTrainer):
        model = tiny_gpt2()
        rep = _Reporter()
        trainer = _trainer(
            model,
            args,
            [lhf.GradClipMedianCallback(min_history=1), lhf.WeightAveragingCallback(decays=0.5)],
            cls=cls,
            eval_ds=TokenData(16, seed=3),
        )
        trainer.callback_handler.callbacks.insert(0, rep)  # where HF puts report_to integrations
        trainer.train()
        seen[cls] = rep.keys
    assert "grad_clip/grad_norm" not in seen[Trainer]
    assert {"grad_clip/grad_norm", "grad_clip/threshold", "eval_loss_ema_0.5"} <= seen[lhf.LitTrainer]


def test_median_clipping_state_resumes(tmp_path):
    args = hf_args(tmp_path, max_grad_norm=0.0, max_steps=4, save_strategy="steps", save_steps=2)
    cb = lhf.GradClipMedianCallback(min_history=1)
    _trainer(tiny_gpt2(), args, [cb]).train()
    ckpt = os.path.join(tmp_path, "checkpoint-2")
    assert os.path.isfile(os.path.join(ckpt, "lit_optim_grad_clip_median.pt"))
    # LitTrainer tells the callback where it resumes from (here: outside the new output_dir)
    resumed = lhf.GradClipMedianCallback(min_history=1)
    _trainer(tiny_gpt2(), hf_args(tmp_path / "r", max_grad_norm=0.0, max_steps=4), [resumed], cls=lhf.LitTrainer).train(
        resume_from_checkpoint=ckpt
    )
    assert resumed.clipper.steps == cb.clipper.steps == 4
    assert resumed.clipper.window_median.state_dict() == cb.clipper.window_median.state_dict()
    # a plain Trainer finds it through args.resume_from_checkpoint, and warns when it cannot
    plain = lhf.GradClipMedianCallback(min_history=1)
    _trainer(
        tiny_gpt2(), hf_args(tmp_path / "p", max_grad_norm=0.0, max_steps=4, resume_from_checkpoint=ckpt), [plain]
    ).train(resume_from_checkpoint=ckpt)
    assert plain.clipper.steps == 4
    lost = lhf.GradClipMedianCallback(min_history=1)
    with pytest.warns(UserWarning, match="no lit_optim_grad_clip_median state was found"):
        _trainer(tiny_gpt2(), hf_args(tmp_path / "q", max_grad_norm=0.0, max_steps=4), [lost]).train(
            resume_from_checkpoint=ckpt
        )
    assert lost.clipper.steps == 2


# ------------------------------------------------------------------------------- averaging


class _ParamSpy(TrainerCallback):
    def __init__(self):
        self.snaps = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.snaps.append([p.detach().clone() for p in model.parameters() if p.requires_grad])


def test_ema_of_lora_weights_matches_the_definition_and_is_evaluated(tmp_path):
    model = tiny_lora()
    args = hf_args(tmp_path, max_steps=4, learning_rate=1e-2, eval_strategy="no")
    spy = _ParamSpy()
    cb = lhf.WeightAveragingCallback(decays=(0.5, 0.9), write_at_end=False)
    trainer = _trainer(model, args, [cb, spy], eval_ds=TokenData(16, seed=3))
    trainer.train()
    # EMA by hand: first update copies, then avg = d * avg + (1 - d) * theta
    for k, d in enumerate((0.5, 0.9)):
        ref = [t.clone() for t in spy.snaps[0]]
        for snap in spy.snaps[1:]:
            ref = [d * r + (1 - d) * s for r, s in zip(ref, snap)]
        for r, a in zip(ref, cb.ema.averages[k]):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
    assert len(cb.ema.averages[0]) == sum(p.requires_grad for p in model.parameters())  # LoRA weights only
    raw = flat(model)
    metrics = trainer.evaluate()
    torch.testing.assert_close(flat(model), raw, rtol=0, atol=0)  # raw weights back in place
    # the reported EMA loss is the loss of the model with the EMA weights
    with torch.no_grad():
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p, a in zip(trainable, cb.ema.averages[1]):
            p.copy_(a)
        x = TokenData(16, seed=3).x
        model.eval()
        expect = float(model(input_ids=x, labels=x).loss)
    assert metrics["eval_loss_ema_0.9"] == pytest.approx(expect, rel=1e-5)
    assert "eval_loss_ema_0.5" in metrics and "eval_loss" in metrics


def test_ema_written_at_end_and_resumed_exactly(tmp_path):
    def run(out, resume=None, steps_file=None):
        model = tiny_lora()
        args = hf_args(out, max_steps=4, learning_rate=1e-2, save_strategy="steps", save_steps=2)
        cb = lhf.WeightAveragingCallback(decays=0.8)
        _trainer(model, args, [cb], cls=lhf.LitTrainer).train(resume_from_checkpoint=resume)
        return model, cb

    straight_model, straight = run(tmp_path / "a")
    ckpt = os.path.join(tmp_path, "a", "checkpoint-2")
    assert os.path.isfile(os.path.join(ckpt, "lit_optim_weight_averaging.pt"))
    resumed_model, resumed = run(tmp_path / "b", resume=ckpt)
    assert resumed.ema.n_averaged == straight.ema.n_averaged == 4
    for a, b in zip(resumed.ema.averages[0], straight.ema.averages[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # write_at_end: the trainable weights are now the average
    for p, a in zip([p for p in straight_model.parameters() if p.requires_grad], straight.ema.averages[0]):
        torch.testing.assert_close(p.detach(), a, rtol=0, atol=0)
    torch.testing.assert_close(flat(resumed_model), flat(straight_model), rtol=0, atol=0)


def test_ema_bad_inputs():
    with pytest.raises(ValueError, match=r"decays\[0\] must be in \[0, 1\), got 1.5"):
        lhf.WeightAveragingCallback(decays=1.5)
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1, got 0"):
        lhf.WeightAveragingCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="no average with decay 0.5"):
        lhf.WeightAveragingCallback(decays=0.9, primary=0.5)


# --------------------------------------------------------------------------- adaptive batch


class _MicroCounter(TrainerCallback):
    """Micro-batches per optimizer step, as HF ran them."""

    def __init__(self):
        self.per_step = []
        self._n = 0

    def on_substep_end(self, args, state, control, **kw):
        self._n += 1

    def on_step_end(self, args, state, control, **kw):
        self.per_step.append(self._n + 1)
        self._n = 0


def test_adaptive_batch_grows_through_accumulation(tmp_path):
    model = tiny_gpt2()
    # eta tiny: the norm test always asks for a bigger batch; cap at 6 micro-batches of 4
    args = hf_args(
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        max_steps=6,
        learning_rate=1e-3,
        logging_strategy="steps",
        logging_steps=1,
        num_train_epochs=1,
    )
    cb = lhf.AdaptiveBatchSizeCallback(eta=1e-3, max_batch_size=24, lr_scaling="sqrt")
    counter = _MicroCounter()
    trainer = _trainer(model, args, [cb, counter], n=96)
    trainer.train()
    assert cb.accumulation == 6 and args.gradient_accumulation_steps == 6
    assert cb.controller.batch_size == 24 and cb.batch_size == 24
    assert counter.per_step[0] == 3 and counter.per_step[-1] == 6
    # the change happened at a point where HF's (index in epoch) % accumulation stays aligned
    assert sum(counter.per_step[: counter.per_step.index(6)]) % 6 == 0
    assert cb.controller.lr_factor == pytest.approx(math.sqrt(2))
    inner = lhf.unwrap_optimizer(trainer.optimizer)
    assert inner.param_groups[0]["lr"] == pytest.approx(1e-3 * math.sqrt(2))
    assert trainer.lr_scheduler.base_lrs[0] == pytest.approx(1e-3 * math.sqrt(2))
    logged = [h for h in trainer.state.log_history if "adaptive_batch/batch_size" in h]
    assert logged and logged[-1]["adaptive_batch/accumulation"] == 6
    assert cb.history and cb.history[0]["batch_size"] == 24


def test_adaptive_batch_keeps_batch_when_the_test_passes(tmp_path):
    model = tiny_gpt2()
    args = hf_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=3, max_steps=3)
    cb = lhf.AdaptiveBatchSizeCallback(eta=1e6, max_batch_size=64)
    _trainer(model, args, [cb], n=48).train()
    assert cb.accumulation == 3 and cb.controller.num_observations == 3
    assert cb.last_result is not None and cb.last_result.passed


def test_adaptive_batch_statistic_equals_the_norm_test_of_the_micro_batches(tmp_path):
    """One step, accumulation 2, lr 0: the test the callback ran is the norm test of the two
    micro-batch gradients, recomputed here by hand from the Trainer's own batches."""
    from lit_optim.functional.grad_stats import GradSampleAccumulator, norm_test

    model = tiny_gpt2()
    args = hf_args(
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.0,
        max_grad_norm=0.0,
    )
    cb = lhf.AdaptiveBatchSizeCallback(eta=0.5, max_batch_size=10**6)
    trainer = _trainer(model, args, [cb], n=8)
    trainer.train()
    acc = GradSampleAccumulator(unit_size=4)
    params = [p for p in model.parameters() if p.requires_grad]
    for batch in trainer.get_train_dataloader():  # the same seeded order as the run
        model.zero_grad()
        model(**batch).loss.backward()
        acc.add(torch.cat([p.grad.reshape(-1) for p in params]))
    ref = norm_test(acc.finalize(), eta=0.5)
    assert cb.last_result.required_batch_size == pytest.approx(ref.required_batch_size, rel=1e-4)


def test_adaptive_batch_skips_steps_hf_clipped(tmp_path):
    args = hf_args(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3, max_grad_norm=1e-6
    )
    cb = lhf.AdaptiveBatchSizeCallback(eta=1e-3, max_batch_size=64)
    with pytest.warns(UserWarning, match="HF clipped the gradient of a checked step"):
        _trainer(tiny_gpt2(), args, [cb], n=48).train()
    assert cb.clipped_steps_skipped == 3 and cb.controller.num_observations == 0 and cb.accumulation == 2


def test_adaptive_batch_needs_two_samples_and_resumes(tmp_path):
    with pytest.raises(ValueError, match="use gradient_accumulation_steps >= 2 on one process"):
        _trainer(
            tiny_gpt2(),
            hf_args(tmp_path, gradient_accumulation_steps=1, per_device_train_batch_size=4),
            [lhf.AdaptiveBatchSizeCallback(max_batch_size=64)],
        ).train()
    with pytest.raises(ValueError, match=r"max_batch_size must be >= the initial effective batch size 12"):
        _trainer(
            tiny_gpt2(),
            hf_args(tmp_path, gradient_accumulation_steps=3, per_device_train_batch_size=4),
            [lhf.AdaptiveBatchSizeCallback(max_batch_size=8)],
        ).train()
    with pytest.raises(ValueError, match="test must be one of"):
        lhf.AdaptiveBatchSizeCallback(test="nope", max_batch_size=8)
    args = hf_args(
        tmp_path / "a",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
    )
    cb = lhf.AdaptiveBatchSizeCallback(eta=1e-3, max_batch_size=24)
    _trainer(tiny_gpt2(), args, [cb], n=96).train()
    ckpt = os.path.join(tmp_path, "a", "checkpoint-2")
    saved = torch.load(os.path.join(ckpt, "lit_optim_adaptive_batch_size.pt"), weights_only=False)
    # the resumed run starts with the grown accumulation (eta huge: it would never grow by itself)
    resumed = lhf.AdaptiveBatchSizeCallback(eta=1e6, max_batch_size=24)
    seen = []

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen.append(args.gradient_accumulation_steps)

    args2 = hf_args(tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=3, max_steps=4)
    _trainer(tiny_gpt2(), args2, [resumed, Spy()], n=96, cls=lhf.LitTrainer).train(resume_from_checkpoint=ckpt)
    assert saved["controller"]["batch_size"] == 24 and saved["accumulation"] == 6
    assert seen == [6]
    assert resumed.controller.batch_size == 24 and args2.gradient_accumulation_steps == 6
    assert resumed.history == saved["history"]


def test_lit_trainer_runs_adaptive_batch_size_at_hf_defaults(tmp_path):
    """One process, no accumulation (HF's default): LitTrainer runs an even per-device batch as 2
    micro-batches of half the size, so the callback's default statistics work; the effective batch
    and the caller's TrainingArguments stay as given."""
    model = tiny_gpt2()
    args = hf_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=2)
    cb = lhf.AdaptiveBatchSizeCallback(eta=1e6, max_batch_size=64)
    trainer = _trainer(model, args, [cb], cls=lhf.LitTrainer, n=16)
    trainer.train()
    assert cb.micro_batch_size == 2 and cb.accumulation == 2 and cb.batch_size == 4
    assert cb.controller.num_observations == 2
    assert args.per_device_train_batch_size == 4 and args.gradient_accumulation_steps == 1
    with pytest.raises(ValueError, match="LitTrainer"):
        _trainer(tiny_gpt2(), hf_args(tmp_path / "plain", per_device_train_batch_size=4, max_steps=1), [
            lhf.AdaptiveBatchSizeCallback(eta=1e6, max_batch_size=64)
        ]).train()
