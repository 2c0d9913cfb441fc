r"""Trainer-free continual-evaluation metrics: the stability gap.

De Lange, van de Ven, Tuytelaars, *Continual evaluation for lifelong learning: Identifying the
stability gap*, ICLR 2023 (arXiv:2205.13452). Evaluating earlier tasks only at task ends hides a
large but temporary drop in their accuracy right after a new task starts (the *stability gap*);
evaluating every few iterations exposes it, and worst-case metrics quantify it.

:class:`StabilityGapTracker` stores the accuracy history ``A(k, t)`` (task ``k`` evaluated after
``t`` optimizer steps) and the task boundaries, and computes (tasks are 0-based here, the paper's
:math:`T_k` is task ``k-1``; :math:`t_k` is the step at which task ``k`` ended):

* **per-task accuracy over iterations** -- :meth:`history`.
* **min-ACC** of an earlier task ``k``: :math:`\min_{t_k < t \le t} A(k, t)`, the lowest accuracy
  after it was learned; ``min_acc()`` averages it over the tasks before the current one.
* **WC-ACC** (worst-case accuracy) while learning task ``c`` (``c+1`` tasks seen):
  :math:`\frac{1}{c+1} A(c, t) + \left(1-\frac{1}{c+1}\right)\,\text{min-ACC}`.
* **avg-ACC**: mean of the latest accuracies over the tasks seen so far.
* **windowed forgetting** :math:`WF^{w}`: per task, the largest drop
  :math:`A(k, t_i) - A(k, t_j)` with :math:`t_i < t_j < t_i + w` (a window of ``w`` iterations),
  from the end of task ``k`` on; averaged over the finished tasks.
* **per task switch** (into task ``c``, for each earlier task ``k``): the accuracy just before the
  switch, the minimum during task ``c``, the gap *depth* (their difference), the iterations to the
  bottom, and the iterations to *recover* -- the first evaluation after the bottom whose accuracy
  is back above ``min + recovery_fraction * depth`` (None if never during task ``c``).

An evaluation at step ``t`` belongs to the task whose training produced those weights: the task
active during step ``t`` (so an evaluation at a boundary step closes the previous task).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["StabilityGapReport", "StabilityGapTracker"]


class StabilityGapTracker:
    """Accuracy history of a task sequence and the stability-gap metrics (no Trainer, no torch).

    .. code-block:: python

        tr = StabilityGapTracker()
        tr.start_task(0, step=0)
        tr.record(0, task=0, acc=0.1)            # before training
        ...                                      # train task 0, record(step, 0, acc) every n steps
        tr.start_task(1, step=100)               # task 1 starts after 100 steps
        tr.record(105, task=0, acc=0.4)          # the gap on task 0 ...
        tr.record(105, task=1, acc=0.6)
        tr.summary()                             # min-ACC, WC-ACC, WF^w, per-switch gap depth

    Args:
        windows: window sizes ``w`` (in iterations) for windowed forgetting (default ``(100,)``).
        recovery_fraction: share of the gap depth that must be regained to count as recovered
            (default 0.9).
    """

    def __init__(self, windows: Sequence[int] = (100,), recovery_fraction: float = 0.9) -> None:
        windows = tuple(windows)
        for w in windows:
            if isinstance(w, bool) or not isinstance(w, int) or w < 2:
                raise ValueError(f"windows must be integers >= 2 (iterations), got {w!r}")
        if not (0.0 < recovery_fraction <= 1.0):
            raise ValueError(f"recovery_fraction must be in (0, 1], got {recovery_fraction}")
        self.windows = windows
        self.recovery_fraction = float(recovery_fraction)
        self.task_starts: list[tuple[int, int]] = []  # (task, first step index of the task = steps done before it)
        self.records: list[tuple[int, int, float]] = []  # (step, evaluated task, accuracy)

    # ------------------------------------------------------------------ recording
    @property
    def current_task(self) -> int | None:
        return self.task_starts[-1][0] if self.task_starts else None

    @property
    def seen_tasks(self) -> list[int]:
        return [t for t, _ in self.task_starts]

    def start_task(self, task: int, step: int) -> None:
        """Training on ``task`` starts after ``step`` optimizer steps."""
        if isinstance(task, bool) or not isinstance(task, int) or task < 0:
            raise ValueError(f"task must be an integer >= 0, got {task!r}")
        if self.task_starts:
            last_task, last_step = self.task_starts[-1]
            if task == last_task:
                return
            if step < last_step:
                raise ValueError(f"task {task} starts at step {step}, before task {last_task} (step {last_step})")
            if task in self.seen_tasks:
                raise ValueError(
                    f"task {task} was already trained (tasks seen: {self.seen_tasks}); tasks are not revisited"
                )
        self.task_starts.append((task, int(step)))

    def record(self, step: int, task: int, acc: float) -> None:
        """Accuracy ``acc`` of evaluated ``task`` after ``step`` optimizer steps."""
        acc = float(acc)
        if not math.isfinite(acc):
            raise ValueError(f"acc must be finite, got {acc} (task {task}, step {step})")
        if self.records and step < self.records[-1][0]:
            raise ValueError(f"steps must not decrease: got {step} after {self.records[-1][0]}")
        self.records.append((int(step), int(task), acc))

    def phase_of(self, step: int) -> int | None:
        """The training task whose steps produced the weights evaluated at ``step``."""
        phase = None
        for task, start in self.task_starts:
            if step > start or (phase is None and step >= start):
                phase = task
        return phase

    def task_end(self, task: int) -> int | None:
        """Step at which ``task`` ended (the next task's start), or None if it is still running."""
        for (t, _), (_, nxt) in zip(self.task_starts, self.task_starts[1:]):
            if t == task:
                return nxt
        return None

    # ------------------------------------------------------------------ queries
    def history(self, task: int) -> tuple[list[int], list[float]]:
        """Steps and accuracies recorded for evaluated ``task``."""
        pts = [(s, a) for s, k, a in self.records if k == task]
        return [s for s, _ in pts], [a for _, a in pts]

    def evaluated_tasks(self) -> list[int]:
        return sorted({k for _, k, _ in self.records})

    def latest(self, task: int, upto: int | None = None) -> float | None:
        val = None
        for s, k, a in self.records:
            if k == task and (upto is None or s <= upto):
                val = a
        return val

    def _finished(self, upto: int | None = None) -> list[int]:
        """Tasks that ended at or before ``upto`` (default: every ended task)."""
        out = []
        for t, _ in self.task_starts:
            end = self.task_end(t)
            if end is not None and (upto is None or end <= upto):
                out.append(t)
        return out

    def task_min_acc(self, task: int, upto: int | None = None) -> float | None:
        """Lowest accuracy of a finished ``task`` after it was learned (evaluations at steps > its end)."""
        end = self.task_end(task)
        if end is None:
            return None
        vals = [a for s, k, a in self.records if k == task and s > end and (upto is None or s <= upto)]
        return min(vals) if vals else None

    def min_acc(self, upto: int | None = None) -> float | None:
        """min-ACC: mean over the earlier tasks of their lowest accuracy after they were learned."""
        vals = [self.task_min_acc(t, upto) for t in self._finished(upto)]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    def _last_step(self) -> int | None:
        return self.records[-1][0] if self.records else None

    def wc_acc(self, step: int | None = None) -> float | None:
        """WC-ACC at ``step`` (default: the last evaluation): the current task's accuracy weighted
        1/k with the min-ACC of the k-1 earlier tasks."""
        step = self._last_step() if step is None else step
        if step is None:
            return None
        current = self.phase_of(step)
        if current is None:
            return None
        acc = None
        for s, k, a in self.records:
            if s == step and k == current:
                acc = a
        if acc is None:
            return None
        k = [t for t, _ in self.task_starts].index(current) + 1
        if k == 1:
            return acc
        m = self.min_acc(upto=step)
        if m is None:
            return None
        return acc / k + (1.0 - 1.0 / k) * m

    def avg_acc(self, step: int | None = None) -> float | None:
        """Mean of the latest accuracies (at or before ``step``) over the tasks seen by then."""
        step = self._last_step() if step is None else step
        if step is None:
            return None
        phase = self.phase_of(step)
        seen = []
        for t, start in self.task_starts:
            end = self.task_end(t)
            if t == phase or (start <= step and end is not None and end <= step):
                seen.append(t)
        vals = [self.latest(t, step) for t in seen]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    def task_windowed_forgetting(self, task: int, window: int) -> float | None:
        """Largest accuracy drop of ``task`` within ``window`` iterations, from its end on."""
        end = self.task_end(task)
        if end is None:
            return None
        steps, accs = self.history(task)
        pts = [(s, a) for s, a in zip(steps, accs) if s >= end]
        best = 0.0
        for i, (si, ai) in enumerate(pts):
            for sj, aj in pts[i + 1 :]:
                if sj - si >= window:
                    break
                best = max(best, ai - aj)
        return best if len(pts) > 1 else None

    def windowed_forgetting(self, window: int) -> float | None:
        """WF^w: mean over the finished tasks of their windowed forgetting."""
        vals = [self.task_windowed_forgetting(t, window) for t in self._finished()]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    def gaps(self) -> list[dict[str, Any]]:
        """One row per (task switch, earlier task): accuracy before the switch, the minimum during
        the new task, depth, iterations to the bottom and to recovery."""
        rows = []
        for idx in range(1, len(self.task_starts)):
            new_task, start = self.task_starts[idx]
            end = self.task_starts[idx + 1][1] if idx + 1 < len(self.task_starts) else None
            for old_task, _ in self.task_starts[:idx]:
                before = self.latest(old_task, upto=start)
                during = [
                    (s, a) for s, k, a in self.records if k == old_task and s > start and (end is None or s <= end)
                ]
                if before is None or not during:
                    continue
                low_step, low = min(during, key=lambda p: (p[1], p[0]))
                depth = before - low
                recover = None
                if depth <= 0:
                    recover = 0
                else:
                    level = low + self.recovery_fraction * depth
                    for s, a in during:
                        if s > low_step and a >= level - 1e-12:
                            recover = s - start
                            break
                rows.append(
                    {
                        "switch_to": new_task,
                        "switch_step": start,
                        "task": old_task,
                        "acc_before": before,
                        "acc_min": low,
                        "depth": depth,
                        "steps_to_min": low_step - start,
                        "steps_to_recover": recover,
                    }
                )
        return rows

    def summary(self) -> dict[str, Any]:
        """All final metrics in one dict."""
        out: dict[str, Any] = {
            "avg_acc": self.avg_acc(),
            "min_acc": self.min_acc(),
            "wc_acc": self.wc_acc(),
            "task_min_acc": {t: self.task_min_acc(t) for t in self._finished()},
            "final_acc": {t: self.latest(t) for t in self.evaluated_tasks()},
        }
        for w in self.windows:
            out[f"wf{w}"] = self.windowed_forgetting(w)
        out["gaps"] = self.gaps()
        return out

    def table(self) -> str:
        """A Markdown summary: the headline metrics, then one row per task switch and earlier task."""

        def f(v: Any) -> str:
            return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

        s = self.summary()
        lines = ["| metric | value |", "|---|---|"]
        lines += [
            f"| avg-ACC | {f(s['avg_acc'])} |",
            f"| min-ACC | {f(s['min_acc'])} |",
            f"| WC-ACC | {f(s['wc_acc'])} |",
        ]
        lines += [f"| WF^{w} | {f(s[f'wf{w}'])} |" for w in self.windows]
        if s["gaps"]:
            lines += [
                "",
                "| switch to task | at step | earlier task | acc before | min acc | gap depth | steps to min | steps to recover |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for g in s["gaps"]:
                rec = "not recovered" if g["steps_to_recover"] is None else str(g["steps_to_recover"])
                lines.append(
                    f"| {g['switch_to']} | {g['switch_step']} | {g['task']} | {f(g['acc_before'])} | {f(g['acc_min'])} "
                    f"| {f(g['depth'])} | {g['steps_to_min']} | {rec} |"
                )
        return "\n".join(lines)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "windows": list(self.windows),
            "recovery_fraction": self.recovery_fraction,
            "task_starts": [list(x) for x in self.task_starts],
            "records": [list(x) for x in self.records],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.task_starts = [(int(t), int(s)) for t, s in state["task_starts"]]
        self.records = [(int(s), int(k), float(a)) for s, k, a in state["records"]]


class StabilityGapReport:
    """Reporting and checkpoint state shared by the continual-evaluation callbacks (Lightning's
    :class:`~lit_optim.callbacks.StabilityGapEvaluator` and the HF twin): both keep a
    :class:`StabilityGapTracker` in ``self.tracker`` and the evaluation bookkeeping below."""

    tracker: StabilityGapTracker
    iteration: int
    eval_seconds: list[float]
    _fit_count: int
    _last_eval: Any
    _provisional: Any

    def summary(self) -> dict[str, Any]:
        """min-ACC, WC-ACC, avg-ACC, WF^w, per-task minima and one row per gap (see the tracker),
        with the number of evaluations and their mean duration."""
        out = self.tracker.summary()
        out["eval_seconds_mean"] = sum(self.eval_seconds) / len(self.eval_seconds) if self.eval_seconds else None
        out["evaluations"] = len(self.eval_seconds)
        return out

    def table(self) -> str:
        """Markdown table of the per-switch gaps (see :meth:`StabilityGapTracker.table`)."""
        return self.tracker.table()

    def plot(self, path: str | os.PathLike) -> str:
        """Write a PNG: accuracy of each task over iterations, task boundaries as dashed lines,
        each earlier task's minimum after it was learned as a dotted line. Returns the path."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = os.fspath(path)
        fig, ax = plt.subplots(figsize=(8, 4.5))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for task in self.tracker.evaluated_tasks():
            steps, accs = self.tracker.history(task)
            color = colors[task % len(colors)]
            ax.plot(steps, accs, label=f"task {task}", color=color, lw=1.4)
            low = self.tracker.task_min_acc(task)
            end = self.tracker.task_end(task)
            if low is not None and end is not None:
                ax.hlines(low, end, steps[-1], colors=color, linestyles="dotted", lw=1)
        for task, start in self.tracker.task_starts[1:]:
            ax.axvline(start, color="grey", ls="--", lw=0.8)
            ax.text(start, 1.01, f"T{task}", transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
        ax.set_xlabel("iteration (optimizer steps)")
        ax.set_ylabel("accuracy")
        wc = self.tracker.wc_acc()
        mn = self.tracker.min_acc()
        title = "continual evaluation"
        if mn is not None:
            title += f" -- min-ACC {mn:.3f}"
        if wc is not None:
            title += f", WC-ACC {wc:.3f}"
        ax.set_title(title, pad=16)
        ax.set_ylim(-0.02, 1.05)
        ax.legend(loc="lower left", fontsize=8, ncol=2)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self.tracker.state_dict(),
            "iteration": self.iteration,
            "fit_count": self._fit_count,
            "last_eval": self._last_eval,
            "provisional": self._provisional,
            "eval_seconds": list(self.eval_seconds),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict["tracker"])
        self.iteration = int(state_dict["iteration"])
        self._fit_count = int(state_dict["fit_count"])
        self._last_eval = state_dict["last_eval"]
        self._provisional = state_dict.get("provisional")
        self.eval_seconds = list(state_dict.get("eval_seconds", []))
