"""The report of `lit-optim compare` from synthetic results: the recommendation says only what the
numbers support (a winner only without overlapping spreads, ties otherwise), the tables, the
single-file HTML, and `lit-optim report DIR`."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

from hypothesis import given, settings
from hypothesis import strategies as st

from lit_optim.cli import main
from lit_optim.compare_protocol import Settings, final_loss
from lit_optim.report import aggregate, recommendation, verdicts, write_report

STEPS = 60


def _curve(final: float, speed: float) -> list[float]:
    """A training curve from 3.0 down to ``final``, faster for larger ``speed``."""
    return [final + (3.0 - final) * math.exp(-speed * (i + 1) / STEPS) - 0.01 * math.exp(-speed) for i in range(STEPS)]


def synthetic(finals: dict[str, list[float]], *, speed=None, state=None, errors=None, timing=True) -> dict:
    speed, state, errors = speed or {}, state or {}, errors or {}
    runs = []
    for name, vals in finals.items():
        for seed, v in enumerate(vals):
            err = errors.get((name, seed))
            curve = [] if err else _curve(v, speed.get(name, 6.0))
            runs.append({
                "optimizer": name, "lr": 1e-3, "seed": seed, "steps": STEPS, "phase": "eval", "rung": 0, "error": err,
                "train_loss": curve, "val_steps": [STEPS] if not err else [], "val_loss": [v] if not err else [],
                "final_train_loss": final_loss(curve), "final_val_loss": math.nan if err else v,
                "state_bytes": int(state.get(name, 8.0) * 1000), "num_params": 1000, "wall_s": 1.0,
            })
    names = list(finals)
    tim = None
    if timing:
        tim = {"method": "synthetic", "loadavg_before": [0.1, 0.1, 0.1], "optimizers": {
            n: {"step_ms": 1.0, "step_spread": 0.05, "whole_ms": 10.0, "whole_spread": 0.05, "fwd_bwd_ms": 9.0,
                "curvature_ms": None, "curvature_every": None, "state_bytes": 1,
                "step_ratio": 1.0 if n == "adamw" else 1.5, "step_ratio_min": 1.0 if n == "adamw" else 1.4,
                "step_ratio_max": 1.0 if n == "adamw" else 1.6, "whole_ratio": 1.0 if n == "adamw" else 1.05,
                "whole_ratio_min": 1.0 if n == "adamw" else 1.03, "whole_ratio_max": 1.0 if n == "adamw" else 1.07}
            for n in names}}
    n_seeds = max(len(v) for v in finals.values())
    return {
        "version": 2, "meta": {"label": "synthetic", "cpu cores": 2}, "problem": {"kind": "task", "task": "synthetic"},
        "settings": asdict(Settings(steps=STEPS, seeds=list(range(n_seeds)))), "optimizers": names,
        "baseline": "adamw", "lr": {n: {"source": "given", "lr": 1e-3} for n in names}, "runs": runs,
        "timing": tim, "times": {},
    }


def _rec(results) -> list[str]:
    stats, metric = aggregate(results)
    return recommendation(stats, metric, task="synthetic")


def test_clear_winner_is_named_with_steps_memory_and_time():
    res = synthetic(
        {"adamw": [2.00, 2.02, 1.98], "muon": [1.80, 1.82, 1.78], "lion": [2.50, 2.45, 2.55]},
        speed={"muon": 12.0}, state={"muon": 4.0, "lion": 4.0},
    )
    stats, _ = aggregate(res)
    assert verdicts(stats) == {"adamw": "baseline", "muon": "better", "lion": "worse"}
    rec = _rec(res)
    assert rec[0].startswith("**Use muon.**")
    assert "1.8000 ± 0.0200" in rec[0] and "AdamW's 2.0000 ± 0.0200" in rec[0]
    assert "reaches AdamW's final training loss in" in rec[0] and "on every seed" in rec[0]
    assert "50% of AdamW's optimizer-state memory" in rec[0] and "1.50x its optimizer-step time" in rec[0]
    muon = next(s for s in stats if s.name == "muon")
    assert muon.steps_fraction < 0.8  # it gets there clearly sooner
    assert "* lion: worse than AdamW" in rec[1] and "does not reach AdamW's final training loss on any seed" in rec[1]


def test_tie_with_adamw_recommends_no_switch_and_names_the_cheaper_tie():
    res = synthetic({"adamw": [2.00, 2.05, 1.95], "frugal": [2.01, 2.06, 1.96], "lion": [2.6, 2.61, 2.59]},
                    state={"frugal": 2.0})
    rec = _rec(res)
    assert rec[0].startswith("**Keep AdamW, or take a cheaper tie.**")
    assert "frugal is within noise of it" in rec[0] and "25% of AdamW's optimizer-state memory" in rec[0]
    assert "Use " not in rec[0]
    assert "* frugal: within noise of AdamW" in rec[1]


def test_tie_between_two_better_optimizers_is_a_tie_not_a_winner():
    res = synthetic({"adamw": [2.0, 2.01, 1.99], "muon": [1.80, 1.84, 1.76], "normuon": [1.81, 1.79, 1.83]},
                    state={"muon": 4.0, "normuon": 4.5})
    rec = _rec(res)
    assert rec[0].startswith("**A tie between ")
    assert "muon" in rec[0] and "normuon" in rec[0] and "below AdamW's" in rec[0]
    assert "muon holds the least optimizer state" in rec[0]


def test_adamw_alone_at_the_top_is_kept():
    rec = _rec(synthetic({"adamw": [1.5, 1.51, 1.49], "lion": [2.0, 2.1, 1.9]}))
    assert rec[0].startswith("**Keep AdamW.**")


def test_one_seed_gives_a_ranking_but_no_verdict():
    rec = _rec(synthetic({"adamw": [2.0], "muon": [1.5]}))
    assert rec[0].startswith("**No recommendation from one seed**")
    assert "muon 1.5000, adamw 2.0000" in rec[0]
    assert "one seed: not tested against noise" in rec[1]


def test_an_optimizer_that_failed_on_a_seed_is_never_recommended():
    res = synthetic({"adamw": [2.0, 2.02, 1.98], "sophia": [1.0, 1.0, 1.0]},
                    errors={("sophia", 1): "NonFiniteGradientError: gradient is not finite"})
    rec = _rec(res)
    assert not rec[0].startswith("**Use sophia")
    assert "* sophia: failed on 1 of 3 seeds (NonFiniteGradientError" in rec[1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(1.0, 3.0), min_size=3, max_size=3), min_size=3, max_size=3))
def test_a_named_winner_always_has_the_lowest_mean_and_no_overlap(values):
    res = synthetic({"adamw": values[0], "adan": values[1], "lion": values[2]}, timing=False)
    stats, metric = aggregate(res)
    first = recommendation(stats, metric)[0]
    if first.startswith("**Use "):
        name = first[len("**Use "):].split(".**")[0]
        win = next(s for s in stats if s.name == name)
        assert win.mean == min(s.mean for s in stats)
        for s in stats:
            if s is not win:
                assert s.interval[0] > win.interval[1]  # no overlap
    if first.startswith("**Keep AdamW.**"):
        base = next(s for s in stats if s.name == "adamw")
        assert all(s.interval[0] > base.interval[1] for s in stats if s is not base)


def test_write_report_and_regenerate_it_from_results_json(tmp_path, capsys):
    res = synthetic({"adamw": [2.0, 2.02, 1.98], "muon": [1.8, 1.82, 1.78]}, speed={"muon": 12.0})
    res["lr"]["muon"] = {"source": "sweep", "lr": 1e-3, "trials": [
        {"lr": 1e-4, "steps": 15, "rung": 0, "score": 2.5, "error": None},
        {"lr": 1e-3, "steps": 15, "rung": 0, "score": 2.2, "error": None},
        {"lr": 1e-2, "steps": 15, "rung": 0, "score": math.inf, "error": "diverged"},
        {"lr": 1e-3, "steps": 60, "rung": 1, "score": 1.9, "error": None},
    ]}
    (tmp_path / "results.json").write_text(json.dumps(res))
    md = write_report(str(tmp_path))
    assert md.startswith("# lit-optim compare: synthetic")
    assert "## Recommendation" in md and "**Use muon.**" in md
    assert "| optimizer | lr | lr from | seeds ok | final val loss |" in md
    assert "| muon | 0.001 | sweep | 3/3 | 1.8000 ± 0.0200 |" in md
    assert "**0.001 @60: 1.9000**" in md and "0.01 @15: failed" in md  # sweep table, chosen lr in bold
    html = (tmp_path / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 2  # loss curves and lr sweep, inlined
    assert "<b>Use muon.</b>" in html
    assert (tmp_path / "loss.png").stat().st_size > 10_000 and (tmp_path / "lr_sweep.png").exists()
    (tmp_path / "report.md").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == md
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_large_timing_spread_is_flagged():
    res = synthetic({"adamw": [2.0, 2.02, 1.98], "muon": [1.8, 1.82, 1.78]})
    res["timing"]["optimizers"]["muon"].update(step_ratio=1.5, step_ratio_min=0.9, step_ratio_max=2.4)
    from lit_optim.report import build_blocks

    blocks, _, _ = build_blocks(res)
    notes = next(b[1] for b in blocks if b[0] == "ul")
    assert any("Timing spread is large" in n and "100%" in n for n in notes)
