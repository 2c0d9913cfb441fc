"""The report of ``lit-optim compare``, built only from ``results.json``: per-optimizer statistics
over seeds, a recommendation written from those numbers, ``report.md``, a single-file
``report.html`` (plots inlined), ``loss.png`` and ``lr_sweep.png``.

``lit-optim report DIR`` calls :func:`write_report` again on a finished (or interrupted) run folder.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from statistics import mean, stdev
from typing import Any

from .compare_protocol import final_loss, steps_to_reach

__all__ = ["OptStats", "aggregate", "load_results", "recommendation", "verdicts", "write_report"]

#: a time ratio whose interquartile range over the timing rounds exceeds this fraction of its median
#: is called too spread to trust
LARGE_SPREAD = 0.1


@dataclass
class OptStats:
    """One optimizer's numbers over its seeds."""

    name: str
    lr: float | None
    lr_source: str = "default"
    note: str | None = None
    seeds: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    final: list[float] = field(default_factory=list)  # the ranking metric, one per good seed
    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    steps_to_base: dict[int, int | None] = field(default_factory=dict)
    base_steps: dict[int, int | None] = field(default_factory=dict)
    bytes_per_param: float = math.nan
    timing: dict[str, Any] | None = None
    curves: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.final)

    @property
    def ok(self) -> bool:
        return self.n > 0 and not self.failed

    @property
    def mean(self) -> float:
        return mean(self.final) if self.final else math.nan

    @property
    def std(self) -> float:
        return stdev(self.final) if len(self.final) > 1 else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return (self.mean - self.std, self.mean + self.std)

    @property
    def reached(self) -> list[int]:
        return [s for s, v in self.steps_to_base.items() if v is not None]

    @property
    def steps_fraction(self) -> float:
        """Mean over the seeds where it got there of (its steps to AdamW's final loss) / (AdamW's)."""
        fr = [self.steps_to_base[s] / self.base_steps[s] for s in self.reached if self.base_steps.get(s)]
        return mean(fr) if fr else math.nan


def load_results(path: str) -> dict[str, Any]:
    """``results.json`` of a run folder (``path`` may be the folder or the file)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path) as f:
        return json.load(f)


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def aggregate(results: dict[str, Any]) -> tuple[list[OptStats], str]:
    """Statistics per optimizer (in the order compared) and the ranking metric (``"val"`` when every
    good run has a final validation loss, else ``"train"``)."""
    base_name = results.get("baseline", "adamw")
    evals = [r for r in results.get("runs", []) if r.get("phase") == "eval"]
    good = [r for r in evals if not r.get("error")]
    metric = "val" if good and all(_finite(r.get("final_val_loss")) for r in good) else "train"
    base_by_seed = {r["seed"]: r for r in good if r["optimizer"] == base_name}
    base_target = {s: final_loss(r["train_loss"]) for s, r in base_by_seed.items()}
    stats = []
    timing = (results.get("timing") or {}).get("optimizers", {})
    for name in results.get("optimizers", []):
        plan = results.get("lr", {}).get(name, {})
        st = OptStats(name, plan.get("lr"), plan.get("source", "default"), plan.get("note"))
        runs = sorted((r for r in evals if r["optimizer"] == name and r["lr"] == st.lr), key=lambda r: r["seed"])
        if st.lr is None and runs:
            st.lr = runs[0]["lr"]
        bpp = []
        for r in runs:
            st.seeds.append(r["seed"])
            if r.get("error"):
                st.failed.append((r["seed"], r["error"]))
                continue
            st.train.append(r["final_train_loss"])
            if _finite(r.get("final_val_loss")):
                st.val.append(r["final_val_loss"])
            st.final.append(r["final_val_loss"] if metric == "val" else r["final_train_loss"])
            if r.get("num_params"):
                bpp.append(r["state_bytes"] / r["num_params"])
            st.curves.append(r)
            if r["seed"] in base_target:
                st.steps_to_base[r["seed"]] = steps_to_reach(r["train_loss"], base_target[r["seed"]])
                st.base_steps[r["seed"]] = steps_to_reach(base_by_seed[r["seed"]]["train_loss"], base_target[r["seed"]])
        st.bytes_per_param = mean(bpp) if bpp else math.nan
        st.timing = timing.get(name)
        stats.append(st)
    return stats, metric


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def verdicts(stats: list[OptStats], baseline: str = "adamw") -> dict[str, str]:
    """Each optimizer against the baseline: ``baseline``, ``better``, ``tie`` (mean ± std intervals
    overlap), ``worse``, ``failed`` (a seed failed), or ``single`` (too few seeds to tell noise from a
    difference)."""
    base = next((s for s in stats if s.name == baseline), None)
    out = {}
    for s in stats:
        if s.name == baseline:
            out[s.name] = "baseline" if s.ok else "failed"
        elif not s.ok:
            out[s.name] = "failed"
        elif base is None or not base.ok:
            out[s.name] = "no baseline"
        elif s.n < 2 or base.n < 2:
            out[s.name] = "single"
        elif _overlap(s.interval, base.interval):
            out[s.name] = "tie"
        else:
            out[s.name] = "better" if s.mean < base.mean else "worse"
    return out


def _pm(s: OptStats, digits: int = 4) -> str:
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}" if s.n > 1 else f"{s.mean:.{digits}f}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _names(xs: list[str]) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def _cost_phrase(s: OptStats, base: OptStats | None) -> str:
    parts = []
    if base is not None and _finite(s.bytes_per_param) and _finite(base.bytes_per_param) and base.bytes_per_param > 0:
        parts.append(f"{_pct(s.bytes_per_param / base.bytes_per_param)} of AdamW's optimizer-state memory")
    t = s.timing or {}
    if _finite(t.get("step_ratio")):
        parts.append(f"{t['step_ratio']:.2f}x its optimizer-step time ({t['whole_ratio']:.2f}x the whole training step)")
    return " and ".join(parts)


def _reach_phrase(s: OptStats) -> str:
    n_seeds = len(s.steps_to_base)
    k = len(s.reached)
    if not n_seeds:
        return ""
    if k == 0:
        return "does not reach AdamW's final training loss on any seed"
    steps = mean(s.steps_to_base[x] for x in s.reached)
    base_steps = mean(s.base_steps[x] for x in s.reached if s.base_steps.get(x))
    where = "on every seed" if k == n_seeds else f"on {k} of {n_seeds} seeds"
    return (f"reaches AdamW's final training loss in {_pct(s.steps_fraction)} of AdamW's steps "
            f"({steps:.0f} vs {base_steps:.0f}, mean) {where}")


def _cost_differences(group: list[OptStats], base: OptStats) -> list[str]:
    """What the numbers say about cost inside a tied group: a memory difference only when the
    smallest state is at least 10% below every other; a time difference only when the fastest
    step's min-max range over timing rounds lies below every other's."""
    bits = []
    mems = [s for s in group if _finite(s.bytes_per_param)]
    if len(mems) == len(group) and _finite(base.bytes_per_param) and base.bytes_per_param > 0:
        least = min(mems, key=lambda s: s.bytes_per_param)
        rel = [_pct(s.bytes_per_param / base.bytes_per_param) for s in sorted(mems, key=lambda s: s.bytes_per_param)]
        if all(least.bytes_per_param < 0.9 * s.bytes_per_param for s in mems if s is not least):
            bits.append(f"{least.name} holds the least optimizer state ({rel[0]} of AdamW's)")
        else:
            bits.append(f"their optimizer state is about the same ({rel[0]}-{rel[-1]} of AdamW's)" if rel[0] != rel[-1]
                        else f"their optimizer state is the same ({rel[0]} of AdamW's)")
    timed = [s for s in group if _finite((s.timing or {}).get("step_ratio"))]
    if len(timed) == len(group) and len(timed) > 1:
        fast = min(timed, key=lambda s: s.timing["step_ratio"])
        if all(fast.timing["step_ratio_max"] < s.timing["step_ratio_min"] for s in timed if s is not fast):
            bits.append(f"{fast.name} has the shortest optimizer step ({fast.timing['step_ratio']:.2f}x AdamW's)")
        else:
            bits.append("their optimizer-step times overlap over the timing rounds")
    return bits


def recommendation(stats: list[OptStats], metric: str = "val", baseline: str = "adamw", task: str = "this task") -> list[str]:
    """The recommendation, as Markdown paragraphs, written only from the numbers: a winner only
    when its mean ± std interval over seeds overlaps no other optimizer's; a tie otherwise."""
    what = "validation" if metric == "val" else "training"
    base = next((s for s in stats if s.name == baseline and s.ok), None)
    ok = [s for s in stats if s.ok]
    failed = [s for s in stats if not s.ok]
    v = verdicts(stats, baseline)
    paras: list[str] = []
    if not ok:
        return ["**No recommendation**: every optimizer failed on at least one seed (see the table)."]
    n_seeds = max(s.n for s in ok)
    best = min(ok, key=lambda s: s.mean)
    if n_seeds < 2:
        ranking = ", ".join(f"{s.name} {s.mean:.4f}" for s in sorted(ok, key=lambda s: s.mean))
        paras.append(
            f"**No recommendation from one seed**: without a spread over seeds no difference can be told from noise. "
            f"Final {what} loss of the single runs, best first: {ranking}. Run with `--seeds 3` for a verdict."
        )
    else:
        tied = [s for s in ok if s is not best and _overlap(s.interval, best.interval)]
        group = [best, *tied]
        if not tied:
            if best is base:
                paras.append(
                    f"**Keep AdamW.** On {task} it ends at the lowest final {what} loss, {_pm(best)} (mean ± standard "
                    f"deviation over {best.n} seeds), and no other optimizer's spread reaches it."
                )
            else:
                cmp = f", against AdamW's {_pm(base)}" if base else ""
                text = (f"**Use {best.name}.** On {task} it ends at the lowest final {what} loss, {_pm(best)} (mean ± "
                        f"standard deviation over {best.n} seeds){cmp}; no other optimizer's spread overlaps it.")
                reach = _reach_phrase(best) if base else ""
                cost = _cost_phrase(best, base)
                if reach:
                    text += f" It {reach}" + (f", with {cost}." if cost else ".")
                elif cost:
                    text += f" It needs {cost}."
                paras.append(text)
        else:
            names = [s.name for s in sorted(group, key=lambda s: s.mean)]
            values = "; ".join(f"{s.name} {_pm(s)}" for s in sorted(group, key=lambda s: s.mean))
            if base in group:
                others = [s for s in group if s is not base]
                text = (f"**Keep AdamW, or take a cheaper tie.** On {task} no optimizer ends clearly below AdamW: "
                        f"{_names([s.name for s in others])} {'is' if len(others) == 1 else 'are'} within noise of it "
                        f"(final {what} loss, mean ± std over seeds: {values}; the spreads overlap).")
                cheaper = [s for s in others if _finite(s.bytes_per_param) and s.bytes_per_param < base.bytes_per_param]
                if cheaper:
                    c = min(cheaper, key=lambda s: s.bytes_per_param)
                    text += (f" If memory matters, {c.name} gives the same loss with "
                             f"{_pct(c.bytes_per_param / base.bytes_per_param)} of AdamW's optimizer-state memory.")
                paras.append(text)
            else:
                text = (f"**A tie between {_names(names)}.** On {task} they end within noise of each other (final "
                        f"{what} loss, mean ± std over seeds: {values}; the spreads overlap)")
                text += f" and below AdamW's {_pm(base)}." if base and all(v[s.name] == "better" for s in group) else "."
                if base:
                    bits = _cost_differences(group, base)
                    names_in = [b for b in bits if any(b.startswith(x.name + " ") for x in group)]
                    if names_in:
                        text += " Between them, pick on cost: " + "; ".join(bits) + "."
                    elif bits:
                        text += " Cost does not separate them either: " + "; ".join(bits) + "."
                        if all(v[s.name] == "better" for s in group):
                            text += " Either is a sound choice."
                paras.append(text)
    if base is not None and len(stats) > 1:
        lines = []
        for s in stats:
            if s is base:
                continue
            verdict = v[s.name]
            if verdict == "failed":
                err = s.failed[0][1] if s.failed else "no finished run"
                lines.append(f"* {s.name}: failed on {len(s.failed)} of {len(s.seeds)} seeds ({err[:100]})")
                continue
            head = {
                "better": f"better than AdamW ({_pm(s)} vs {_pm(base)})",
                "tie": f"within noise of AdamW ({_pm(s)} vs {_pm(base)})",
                "worse": f"worse than AdamW ({_pm(s)} vs {_pm(base)})",
                "single": f"{s.mean:.4f} vs AdamW's {base.mean:.4f} (one seed: not tested against noise)",
            }.get(verdict, f"{_pm(s)}")
            extra = [x for x in (_reach_phrase(s), _cost_phrase(s, base)) if x]
            lines.append(f"* {s.name}: {head}" + ("; " + "; ".join(extra) if extra else "") + ".")
        paras.append(f"Against AdamW, final {what} loss (mean ± std over seeds):\n\n" + "\n".join(lines))
    elif failed and base is None:
        paras.append("AdamW has no successful run, so nothing is compared against it.")
    return paras


# ----------------------------------------------------------------------------- rendering


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "n/a"


def _fmt_pm(xs: list[float], digits: int = 4) -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{mean(xs):.{digits}f} ± {stdev(xs):.{digits}f}"


def _lr_text(lr: Any) -> str:
    return f"{lr:.3g}" if _finite(lr) else "n/a"


def _tables(stats: list[OptStats], metric: str, results: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    base = next((s for s in stats if s.name == results.get("baseline", "adamw") and s.ok), None)
    h1 = ["optimizer", "lr", "lr from", "seeds ok", "final val loss", "final train loss", "steps to AdamW's loss (seeds)",
          "% of AdamW's steps"]
    rows1 = []
    for s in stats:
        reached = [s.steps_to_base[x] for x in s.reached]
        if s.steps_to_base:
            steps = (_fmt_pm([float(x) for x in reached], 0) if reached else "not reached") + f" ({len(reached)}/{len(s.steps_to_base)})"
        else:
            steps = "n/a"
        rows1.append([
            s.name, _lr_text(s.lr), s.lr_source, f"{s.n}/{len(s.seeds)}", _fmt_pm(s.val), _fmt_pm(s.train), steps,
            _pct(s.steps_fraction) if _finite(s.steps_fraction) else "n/a",
        ])
    h2 = ["optimizer", "state bytes/param", "state vs AdamW", "optimizer step ms (spread)", "step vs AdamW (min-max)",
          "whole step ms (spread)", "whole step vs AdamW (min-max)"]
    rows2 = []
    for s in stats:
        t = s.timing or {}
        mem = (_pct(s.bytes_per_param / base.bytes_per_param)
               if base and _finite(s.bytes_per_param) and base.bytes_per_param else "n/a")
        if t.get("error") or not t:
            rows2.append([s.name, _fmt(s.bytes_per_param, 1), mem, t.get("error", "not timed")[:60], "", "", ""])
            continue

        def ratio(key: str, t: dict[str, Any] = t) -> str:
            if not _finite(t.get(key)):
                return "n/a"
            return f"{t[key]:.2f}x ({t[key + '_min']:.2f}-{t[key + '_max']:.2f})"

        whole = f"{t['whole_ms']:.1f} ({_pct(t['whole_spread'])})"
        if t.get("curvature_ms"):
            whole += f" incl. curvature {t['curvature_ms']:.0f} ms / {t['curvature_every']}"
        rows2.append([
            s.name, _fmt(s.bytes_per_param, 1), mem, f"{t['step_ms']:.2f} ({_pct(t['step_spread'])})", ratio("step_ratio"),
            whole, ratio("whole_ratio"),
        ])
    return h1, rows1, h2, rows2


def _sweep_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in results.get("optimizers", []):
        plan = results.get("lr", {}).get(name, {})
        trials = _trials(plan)
        if not trials:
            continue
        cells = []
        for t in sorted(trials, key=lambda t: (t["rung"], t["lr"])):
            val = _fmt(t["score"]) if _finite(t["score"]) else "failed"
            cell = f"{t['lr']:.3g} @{t['steps']}: {val}"
            cells.append(f"**{cell}**" if t["rung"] == max(x["rung"] for x in trials) and t["lr"] == plan.get("lr") else cell)
        rows.append([name, plan.get("source", ""), "; ".join(cells)])
    return rows


def _trials(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for t in plan.get("trials") or []:
        if isinstance(t, dict):
            out.append(t)
        elif isinstance(t, (list, tuple)) and len(t) >= 4:  # shipped: [lr, steps, rung, score]
            out.append({"lr": t[0], "steps": t[1], "rung": t[2], "score": t[3] if t[3] is not None else math.inf})
    return out


def _caveats(results: dict[str, Any], stats: list[OptStats], metric: str) -> list[str]:
    out = []
    s = results.get("settings", {})
    srcs = {st.lr_source for st in stats}
    if "shipped" in srcs:
        rec = next((results["lr"][st.name].get("record") for st in stats if st.lr_source == "shipped"), None) or {}
        out.append(
            "Learning rates marked *shipped* were tuned for this task by the same successive-halving sweep "
            f"(`--tune sweep`) when the package was built ({rec.get('recorded', 'see lit_optim/_tuned_lrs.py')}, "
            f"{rec.get('steps', '?')} steps, tuning seed {rec.get('seed', '?')}); `--tune sweep` re-tunes them here."
        )
    if "sweep" in srcs:
        out.append(
            f"Learning rates marked *sweep* were tuned here by successive halving on seed {s.get('tune_seed')}, not one "
            f"of the reported seeds: lr x {', '.join(f'{m:g}' for m in s.get('tune_grid', []))} of the registry default "
            f"for {_pct(s.get('tune_fraction', 0))} of the steps (one more lr beyond an edge winner, up to "
            f"{s.get('tune_extend')} times), then the best {s.get('tune_keep')} for the full {s.get('steps')} steps."
        )
    if "default" in srcs:
        out.append("Learning rates marked *default* are the registry defaults, untuned (`--tune none` or no record).")
    if "given" in srcs:
        out.append("Learning rates marked *given* come from `--lr`.")
    for st in stats:
        if st.note:
            out.append(f"{st.name}: {st.note}.")
    if metric == "train":
        out.append("No validation loss was logged (`val_loss`, or `--val-metric`), so optimizers are ranked on the final "
                   "training loss.")
    timing = results.get("timing") or {}
    if timing.get("optimizers"):
        worst, worst_iqr = 0.0, 0.0
        for t in timing["optimizers"].values():
            if t.get("error"):
                continue
            for key in ("step_ratio", "whole_ratio"):
                if _finite(t.get(key)) and t[key] > 0:
                    worst = max(worst, (t[key + "_max"] - t[key + "_min"]) / t[key])
                    iqr = t.get(key + "_iqr")
                    worst_iqr = max(worst_iqr, iqr if _finite(iqr) else (t[key + "_max"] - t[key + "_min"]) / t[key])
        load = timing.get("loadavg_before")
        cores = results.get("meta", {}).get("cpu cores")
        where = (f" (1-minute load average {load[0]:.1f} on {cores} cores when timing started)" if load and cores else "")
        if worst_iqr > LARGE_SPREAD:
            out.append(
                f"**Timing spread is large**: the middle half of the rounds' time ratios spans up to {_pct(worst_iqr)} "
                f"of the median{where}. The machine was busy; treat the time ratios as rough and re-run on an idle "
                "machine."
            )
        else:
            out.append(f"Time ratios: the middle half of the rounds lies within {_pct(worst_iqr)} of the median "
                       f"(full min-max range up to {_pct(worst)}){where}.")
    elif timing.get("error"):
        out.append(f"Step times could not be measured: {timing['error']}.")
    return out


def _plot_styles(n: int) -> list[dict[str, Any]]:
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
    dashes = ["-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1))]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    return [{"color": colors[i % len(colors)], "linestyle": dashes[i % len(dashes)], "marker": markers[i % len(markers)]}
            for i in range(n)]


def _ema(xs: list[float], beta: float = 0.9) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


def _title(results: dict[str, Any], stats: list[OptStats]) -> str:
    s = results.get("settings", {})
    label = results.get("meta", {}).get("label", results.get("problem", {}).get("task", ""))
    n = max((len(st.seeds) for st in stats), default=0)
    lrs = ", ".join(f"{st.name} {_lr_text(st.lr)}" for st in stats)
    return "\n".join(textwrap.wrap(f"{label}: {s.get('steps')} steps, {n} seed{'s' * (n != 1)}; lr {lrs}", 110))


def plot_losses(results: dict[str, Any], stats: list[OptStats], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    styles = _plot_styles(len(stats))
    finite = []
    for st, sty in zip(stats, styles):
        curves = [_ema(r["train_loss"]) for r in st.curves if r.get("train_loss")]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = list(range(1, n + 1))
        m = [mean(c[i] for c in curves) for i in range(n)]
        lo = [min(c[i] for c in curves) for i in range(n)]
        hi = [max(c[i] for c in curves) for i in range(n)]
        finite += [v for v in m if math.isfinite(v)]
        a1.plot(xs, m, color=sty["color"], linestyle=sty["linestyle"], lw=1.6, label=f"{st.name} (lr {_lr_text(st.lr)})")
        if len(curves) > 1:
            a1.fill_between(xs, lo, hi, color=sty["color"], alpha=0.12, lw=0)
        vals = [r for r in st.curves if r.get("val_loss")]
        if vals:
            k = min(len(r["val_loss"]) for r in vals)
            vs = vals[0]["val_steps"][:k]
            vm = [mean(r["val_loss"][i] for r in vals) for i in range(k)]
            err = [stdev([r["val_loss"][i] for r in vals]) if len(vals) > 1 else 0.0 for i in range(k)]
            a2.errorbar(vs, vm, yerr=err if len(vals) > 1 else None, color=sty["color"], linestyle=sty["linestyle"],
                        marker=sty["marker"], ms=4, lw=1.4, capsize=2, label=st.name)
    a1.set(title="training loss (EMA 0.9), mean over seeds; band: min-max", xlabel="optimizer step", ylabel="loss")
    a2.set(title="validation loss, mean ± std over seeds", xlabel="optimizer step", ylabel="loss")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=8)
    if finite:
        srt = sorted(finite)
        lo, hi = srt[0], srt[int(0.97 * (len(srt) - 1))]
        a1.set_ylim(lo - 0.05 * abs(lo), hi + 0.05 * abs(hi))
    fig.suptitle(_title(results, stats), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_sweeps(results: dict[str, Any], stats: list[OptStats], path: str) -> bool:
    """One panel per swept optimizer: final loss against lr for each round of the sweep (short runs
    dashed, full-length runs solid), the chosen lr starred."""
    styles = dict(zip([st.name for st in stats], _plot_styles(len(stats))))
    swept = [(st, _trials(results.get("lr", {}).get(st.name, {}))) for st in stats]
    swept = [(st, t) for st, t in swept if any(_finite(x["score"]) for x in t)]
    if not swept:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return False
    n = len(swept)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False, sharey=True)
    finite = [x["score"] for _, t in swept for x in t if _finite(x["score"])]
    srt = sorted(finite)
    lo, hi = srt[0], srt[min(len(srt) - 1, int(0.8 * (len(srt) - 1)) + 1)]
    for ax, (st, trials) in zip(axes.flat, swept):
        sty = styles[st.name]
        rungs = sorted({t["rung"] for t in trials})
        for rung in rungs:
            pts = sorted((t["lr"], t["score"]) for t in trials if t["rung"] == rung and _finite(t["score"]))
            if not pts:
                continue
            steps = next(t["steps"] for t in trials if t["rung"] == rung)
            last = rung == rungs[-1] and len(rungs) > 1
            ax.plot([x for x, _ in pts], [y for _, y in pts], color=sty["color"], marker=sty["marker"],
                    linestyle="-" if last else "--", lw=1.8 if last else 1.0, ms=6 if last else 4,
                    alpha=1.0 if last else 0.6, label=f"{steps} steps")
            failed = [t["lr"] for t in trials if t["rung"] == rung and not _finite(t["score"])]
            for x in failed:
                ax.axvline(x, color=sty["color"], ls=":", lw=1)
        chosen = [t for t in trials if _finite(st.lr) and t["lr"] == st.lr and _finite(t["score"])]
        if chosen:
            best = max(chosen, key=lambda t: t["rung"])
            ax.plot([st.lr], [best["score"]], marker="*", ms=15, color=sty["color"], mec="black", linestyle="none")
        ax.set_xscale("log")
        ax.set_title(f"{st.name}: lr {_lr_text(st.lr)} ({st.lr_source})", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].set_ylim(lo - 0.05 * abs(hi - lo) - 1e-3, hi + 0.1 * abs(hi - lo) + 1e-3)
    for r in range(rows):
        axes[r][0].set_ylabel("final loss (tuning seed)", fontsize=8)
    fig.suptitle("learning-rate sweep (successive halving): short runs dashed, full length solid, chosen lr starred",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- documents


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def _inline_html(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", t)


def _html_doc(blocks: list[tuple], images: dict[str, str]) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>lit-optim compare</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}",
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}",
        "th{background:#f3f3f3}code{background:#f3f3f3;padding:1px 4px}img{max-width:100%}.rec{background:#eef6ee;padding:0.6em 1em;"
        "border-left:4px solid #3a3}.meta{color:#555;font-size:0.9em}</style></head><body>",
    ]
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            parts.append(f"<h1>{_inline_html(b[1])}</h1>")
        elif kind == "h2":
            parts.append(f"<h2>{_inline_html(b[1])}</h2>")
        elif kind in ("p", "rec", "meta"):
            text = b[1]
            if "\n* " in "\n" + text:
                head, _, rest = text.partition("\n\n")
                items = [ln[2:] for ln in rest.splitlines() if ln.startswith("* ")]
                parts.append(f"<div class='{kind}'><p>{_inline_html(head)}</p><ul>"
                             + "".join(f"<li>{_inline_html(i)}</li>" for i in items) + "</ul></div>")
            else:
                parts.append(f"<div class='{kind}'><p>{_inline_html(text)}</p></div>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            header, rows = b[1], b[2]
            parts.append("<table><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in header) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in rows)
                         + "</table>")
        elif kind == "img":
            data = images.get(b[1])
            if data:
                parts.append(f"<p><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _md_doc(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            out += [f"# {b[1]}", ""]
        elif kind == "h2":
            out += [f"## {b[1]}", ""]
        elif kind in ("p", "rec", "meta"):
            out += [b[1], ""]
        elif kind == "ul":
            out += [f"* {i}" for i in b[1]] + [""]
        elif kind == "table":
            out += _md_table(b[1], b[2]) + [""]
        elif kind == "img":
            out += [f"![{b[2]}]({b[1]})", ""]
    return "\n".join(out)


def build_blocks(results: dict[str, Any], run_dir: str | None = None) -> tuple[list[tuple], list[OptStats], str]:
    stats, metric = aggregate(results)
    meta = results.get("meta", {})
    s = results.get("settings", {})
    label = meta.get("label", results.get("problem", {}).get("task", "task"))
    blocks: list[tuple] = [("h1", f"lit-optim compare: {label}")]
    facts = [f"**{k}**: {v}" for k, v in meta.items() if k not in ("label", "command", "cpu cores") and v not in (None, "")]
    seeds = s.get("seeds", [])
    facts.insert(0, f"**protocol**: {s.get('steps')} steps, seeds {', '.join(map(str, seeds))}, {s.get('scheduler')} schedule "
                    f"with {_pct(s.get('warmup_fraction', 0))} warm-up, each optimizer at its own lr (below)")
    rec = recommendation(stats, metric, results.get("baseline", "adamw"), task=label)
    blocks.append(("h2", "Recommendation"))
    blocks.append(("rec", rec[0]))
    for para in rec[1:]:
        blocks.append(("p", para))
    h1, rows1, h2, rows2 = _tables(stats, metric, results)
    blocks.append(("h2", "Results"))
    blocks.append(("p", f"Final losses: mean ± standard deviation over seeds (train: mean of the last 10% of steps). "
                        f"Steps to AdamW's loss: first step where the trailing-window mean training loss reaches the final "
                        f"training loss of AdamW's run with the same seed (in how many seeds it did); % of AdamW's steps: "
                        f"the same for AdamW's own run as the reference. Ranked on the final "
                        f"{'validation' if metric == 'val' else 'training'} loss."))
    blocks.append(("table", h1, rows1))
    blocks.append(("img", "loss.png", "loss curves"))
    blocks.append(("h2", "Cost: memory and time"))
    timing = results.get("timing") or {}
    blocks.append(("p", "State: bytes of optimizer-state tensors per model parameter. Time: "
                        + (timing.get("method", "not measured") + "." if timing else "not measured.")
                        + " The optimizer step alone and the whole training step (forward + backward + step, plus a "
                          "curvature estimate divided by its interval for Sophia/AdaHessian) are timed separately; the "
                          "ratios to AdamW are taken round by round."))
    blocks.append(("table", h2, rows2))
    sweep_rows = _sweep_rows(results)
    if sweep_rows:
        blocks.append(("h2", "Learning rates"))
        blocks.append(("p", "Each sweep trial as lr @steps: final validation loss on the tuning seed (training loss when "
                            "there is no validation); the chosen lr in bold."))
        blocks.append(("table", ["optimizer", "from", "trials"], sweep_rows))
        blocks.append(("img", "lr_sweep.png", "learning-rate sweep"))
    notes = _caveats(results, stats, metric)
    blocks.append(("h2", "How this was measured"))
    blocks.append(("ul", facts + notes))
    if run_dir:
        blocks.append(("p", f"TensorBoard (curves and hparams of every run): `tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}`. "
                            f"Regenerate this report: `lit-optim report {run_dir}`."))
    if meta.get("command"):
        blocks.append(("p", f"Command: `{meta['command']}`"))
    return blocks, stats, metric


def write_report(run_dir: str, results: dict[str, Any] | None = None) -> str:
    """Write ``report.md``, ``report.html``, ``loss.png`` and ``lr_sweep.png`` into ``run_dir`` from
    ``results`` (default: its ``results.json``); return the Markdown."""
    if results is None:
        results = load_results(run_dir)
    blocks, stats, _ = build_blocks(results, run_dir)
    made = {}
    if plot_losses(results, stats, os.path.join(run_dir, "loss.png")):
        made["loss.png"] = True
    if plot_sweeps(results, stats, os.path.join(run_dir, "lr_sweep.png")):
        made["lr_sweep.png"] = True
    blocks = [b for b in blocks if b[0] != "img" or b[1] in made]
    if "lr_sweep.png" not in made:
        stale = os.path.join(run_dir, "lr_sweep.png")
        if os.path.exists(stale):
            os.remove(stale)
    md = _md_doc(blocks)
    with open(os.path.join(run_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(md)
    images = {}
    for name in made:
        with open(os.path.join(run_dir, name), "rb") as f:
            images[name] = base64.b64encode(f.read()).decode("ascii")
    with open(os.path.join(run_dir, "report.html"), "w", encoding="utf-8") as f:
        f.write(_html_doc(blocks, images))
    return md
