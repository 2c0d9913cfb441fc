"""One set of logged names for both routes: a lit_optim callback logs the same keys under
Lightning and as its Hugging Face twin (both build them with lit_optim.functional.log_keys)."""

from __future__ import annotations

import pytest

from lit_optim.callbacks import AdaptiveBatchSizeCallback, GradClipMedianCallback
from lit_optim.functional.log_keys import ADAPTIVE_BATCH_KEYS, GRAD_CLIP_KEYS

from ..helpers import TinyClassifier, quiet_trainer
from .test_adaptive_batch_size import Regressor
from .test_stability_gap import CaptureLogger


def _lightning_keys(module, callback, prefix: str, **trainer_kw) -> set[str]:
    logger = CaptureLogger()
    quiet_trainer(max_epochs=1, callbacks=[callback], logger=logger, log_every_n_steps=1, **trainer_kw).fit(module)
    return {k for _, m in logger.logged for k in m if k.startswith(prefix)}


def _hf_keys(tmp_path, callback, prefix: str, **args_kw) -> set[str]:
    pytest.importorskip("transformers")
    from transformers import Trainer

    from lit_optim.integrations import hf as lhf

    from ..integrations._hf_utils import TokenData, hf_args, tiny_gpt2

    model = tiny_gpt2()
    args = hf_args(tmp_path, logging_strategy="steps", logging_steps=1, **args_kw)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenData(32),
        callbacks=[callback],
        optimizers=lhf.create_optimizer_and_scheduler(model, "adan", args),
    )
    trainer.train()
    return {k for h in trainer.state.log_history for k in h if k.startswith(prefix)}


def test_adaptive_batch_size_logs_the_same_keys_in_lightning_and_hf(tmp_path):
    ours = _lightning_keys(
        Regressor(), AdaptiveBatchSizeCallback(eta=0.1, initial_accumulation=2, max_batch_size=64), "adaptive_batch/"
    )
    assert ours == set(ADAPTIVE_BATCH_KEYS)
    from lit_optim.integrations import hf as lhf

    theirs = _hf_keys(
        tmp_path,
        lhf.AdaptiveBatchSizeCallback(eta=1e-3, max_batch_size=16),
        "adaptive_batch/",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=0.0,
    )
    assert theirs == ours


@pytest.mark.parametrize("mode", ["norm", "coordinate"])
def test_median_clipping_logs_the_same_keys_in_lightning_and_hf(mode, tmp_path):
    ours = _lightning_keys(TinyClassifier(), GradClipMedianCallback(mode, min_history=1), "grad_clip/")
    expected = (
        set(GRAD_CLIP_KEYS) if mode == "coordinate" else set(GRAD_CLIP_KEYS) - {"grad_clip/clipped_coord_fraction"}
    )
    assert ours == expected
    from lit_optim.integrations import hf as lhf

    theirs = _hf_keys(tmp_path, lhf.GradClipMedianCallback(mode, min_history=1), "grad_clip/", max_grad_norm=0.0)
    assert theirs == ours


def test_hf_stability_gap_logs_the_last_task_switch(tmp_path):
    """The HF twin logs the gap rows of the switch into the last task when its train() ends."""
    pytest.importorskip("transformers")
    from lit_optim.integrations import hf as lhf

    from ..integrations._hf_utils import PatternData
    from ..integrations.test_hf_stability_gap import TASK_STEPS, _run_tasks

    evals = [PatternData(s, 16, seed=10 + i) for i, s in enumerate(TASK_STEPS)]
    cb = lhf.StabilityGapCallback(evals, every_n_steps=2, batch_size=8, windows=(5,))
    _, trainer = _run_tasks(tmp_path, cb)
    rows = [h for h in trainer.state.log_history if "stability/gap_task0_at_task1/depth" in h]
    assert len(rows) == 1 and rows[0]["iteration"] == 12
    gap = next(g for g in cb.tracker.gaps() if g["switch_to"] == 1)
    assert rows[0]["stability/gap_task0_at_task1/depth"] == pytest.approx(gap["depth"])
    assert rows[0]["stability/wf5"] == pytest.approx(cb.tracker.windowed_forgetting(5))
