"""The values the lit_optim callbacks log, named once for both routes: the Lightning callbacks
(:mod:`lit_optim.callbacks`) and their Hugging Face ``TrainerCallback`` twins
(:mod:`lit_optim.integrations.hf`) build their logged dicts with these functions, so the same
callback logs the same keys, computed the same way, in Lightning and in HF.

* ``AdaptiveBatchSizeCallback``: :data:`ADAPTIVE_BATCH_KEYS` (:func:`adaptive_batch_logs`).
* ``GradClipMedianCallback``: :data:`GRAD_CLIP_KEYS` (:func:`grad_clip_logs`).
* ``StabilityGapEvaluator`` / ``StabilityGapCallback``: ``{prefix}/acc_task{k}``,
  ``{prefix}/avg_acc``, ``{prefix}/min_acc``, ``{prefix}/wc_acc`` at each evaluation
  (:func:`stability_eval_logs`); ``{prefix}/wf{w}`` and
  ``{prefix}/gap_task{k}_at_task{t}/depth|steps_to_min|steps_to_recover`` when task ``t`` ends:
  at the switch to the next task and, for the last task, at the end of training
  (:func:`stability_task_end_logs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ADAPTIVE_BATCH_KEYS",
    "GRAD_CLIP_KEYS",
    "adaptive_batch_logs",
    "grad_clip_logs",
    "stability_eval_logs",
    "stability_task_end_logs",
]

#: keys of the adaptive batch size (``statistic`` and ``required_batch_size`` once a test ran;
#: ``lr`` when an optimizer is known). ``lr_factor`` is the product of the multipliers applied
#: on growth (``lr_scaling``), ``statistic`` the test statistic (``required / current``; the
#: test passes when <= 1).
ADAPTIVE_BATCH_KEYS = tuple(
    f"adaptive_batch/{k}"
    for k in (
        "batch_size",
        "micro_batch_size",
        "accumulation",
        "lr",
        "lr_factor",
        "statistic",
        "required_batch_size",
    )
)

#: keys of median clipping (``threshold``: in coordinate modes the mean over coordinates of the
#: per-coordinate thresholds; ``clipped_coord_fraction`` only in coordinate modes)
GRAD_CLIP_KEYS = tuple(
    f"grad_clip/{k}" for k in ("grad_norm", "threshold", "clipped_fraction", "clipped_coord_fraction")
)

#: cap of logged values that may be infinite (a test that asks for an infinite batch)
_CAP = 1e30


def adaptive_batch_logs(
    *,
    batch_size: float,
    micro_batch_size: float,
    accumulation: float,
    lr_factor: float,
    lr: Any = None,
    result: Any = None,
) -> dict[str, float]:
    """``adaptive_batch/*`` values; ``result`` is the latest
    :class:`~lit_optim.functional.sampling_tests.SamplingTestResult` (or None), ``lr`` the
    learning rate of the first parameter group (a number or a one-element tensor, or None)."""
    out = {
        "adaptive_batch/batch_size": float(batch_size),
        "adaptive_batch/micro_batch_size": float(micro_batch_size),
        "adaptive_batch/accumulation": float(accumulation),
        "adaptive_batch/lr_factor": float(lr_factor),
    }
    if lr is not None:
        out["adaptive_batch/lr"] = float(lr)
    if result is not None:
        out["adaptive_batch/statistic"] = float(min(result.statistic, _CAP))
        out["adaptive_batch/required_batch_size"] = float(min(result.required_batch_size, _CAP))
    return out


def grad_clip_logs(info: Mapping[str, float], clipper: Any, suffix: str = "") -> dict[str, float]:
    """``grad_clip/*`` values of one step from the ``info`` that
    :meth:`~lit_optim.functional.median.MedianClipper.clip_` returned; ``suffix`` tells optimizers
    apart (Lightning: ``_opt{i}`` for every optimizer after the first). Non-finite values (the
    threshold while the median warms up) are left out."""
    coordinate = clipper.mode in ("coordinate", "constant_coordinate")
    out = {
        "grad_clip/grad_norm": info["grad_norm"],
        "grad_clip/clipped_fraction": info["clipped_fraction"],
        # coordinate modes: the mean per-coordinate threshold, computed only when logged
        "grad_clip/threshold": clipper.mean_threshold() if coordinate else info["threshold"],
    }
    if coordinate:
        out["grad_clip/clipped_coord_fraction"] = info["clipped_coord_fraction"]
    return {f"{k}{suffix}": float(v) for k, v in out.items() if math.isfinite(v)}


def stability_eval_logs(prefix: str, tracker: Any, step: int, accs: Mapping[int, float]) -> dict[str, float]:
    """Values of one continual evaluation at ``step``: the accuracy of each evaluated task and
    avg-ACC, min-ACC, WC-ACC (those defined so far) of the
    :class:`~lit_optim.functional.continual_metrics.StabilityGapTracker`."""
    out = {f"{prefix}/acc_task{t}": float(a) for t, a in accs.items()}
    for name, value in (
        ("avg_acc", tracker.avg_acc(step)),
        ("min_acc", tracker.min_acc(step)),
        ("wc_acc", tracker.wc_acc(step)),
    ):
        if value is not None:
            out[f"{prefix}/{name}"] = float(value)
    return out


def stability_task_end_logs(prefix: str, tracker: Any, task: int) -> dict[str, float]:
    """Values logged when training on ``task`` ends: the windowed forgetting ``wf{w}`` of every
    window (over the tasks finished so far, through the training of ``task``), and the gap rows
    of the switch *into* ``task`` (one per earlier task: depth, iterations to the bottom and, if
    reached, to recovery)."""
    out: dict[str, float] = {}
    for w in tracker.windows:
        v = tracker.windowed_forgetting(w)
        if v is not None:
            out[f"{prefix}/wf{w}"] = float(v)
    for g in tracker.gaps():
        if g["switch_to"] == task:
            key = f"{prefix}/gap_task{g['task']}_at_task{task}"
            out[f"{key}/depth"] = float(g["depth"])
            out[f"{key}/steps_to_min"] = float(g["steps_to_min"])
            if g["steps_to_recover"] is not None:
                out[f"{key}/steps_to_recover"] = float(g["steps_to_recover"])
    return out
