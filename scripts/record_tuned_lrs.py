"""Record the learning rates a `lit-optim compare --tune sweep` run chose into lit_optim/_tuned_lrs.py,
so that the default comparison on that built-in task starts from them (``--tune auto``).

    lit-optim compare --task charlm --tune sweep --seeds 1 --name charlm-400
    python scripts/record_tuned_lrs.py runs/compare/charlm-400 [--only adamw,muon]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pprint
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, "lit_optim", "_tuned_lrs.py")


def _g(x: float) -> float:
    return float(f"{x:.6g}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--only", help="comma-separated optimizers to record (default: every swept one)")
    args = ap.parse_args(argv)
    with open(os.path.join(args.run_dir, "results.json")) as f:
        res = json.load(f)
    p, s = res["problem"], res["settings"]
    if p["kind"] != "task" or p.get("text_path"):
        print("only built-in tasks on their own data can be recorded", file=sys.stderr)
        return 2
    only = set(args.only.split(",")) if args.only else None
    lrs, trials = {}, {}
    for name, plan in res["lr"].items():
        if plan.get("source") != "sweep" or (only and name not in only):
            continue
        lrs[name] = _g(plan["lr"])
        trials[name] = [[_g(t["lr"]), t["steps"], t["rung"], round(t["score"], 5) if math.isfinite(t["score"]) else None]
                        for t in plan.get("trials", [])]
    if not lrs:
        print("no swept learning rates in this run", file=sys.stderr)
        return 2
    key = f"{p['task']}/{p['model_size']}/b{p['batch_size']}"
    meta = res.get("meta", {})
    entry = {
        "steps": s["steps"], "scheduler": s["scheduler"], "warmup_fraction": s["warmup_fraction"],
        "seed": s["tune_seed"], "grid": s["tune_grid"], "fraction": s["tune_fraction"], "keep": s["tune_keep"],
        "recorded": f"{meta.get('date', '?')}, {meta.get('software', '')}, {meta.get('machine', '')}",
        "lrs": lrs, "trials": trials,
    }
    ns: dict = {}
    with open(TARGET) as f:
        src = f.read()
    exec(compile(src, TARGET, "exec"), ns)  # noqa: S102 - our own generated file
    tuned = ns["TUNED"]
    entries = tuned.setdefault(key, [])
    old = next((e for e in entries if e["steps"] == entry["steps"] and e["scheduler"] == entry["scheduler"]), None)
    if old is not None:  # merge: keep other optimizers recorded earlier
        old_lrs, old_trials = dict(old["lrs"]), dict(old["trials"])
        old_lrs.update(lrs)
        old_trials.update(trials)
        entry["lrs"], entry["trials"] = old_lrs, old_trials
        entries.remove(old)
    entries.append(entry)
    head = src.split("\nTUNED", 1)[0].rstrip() + "\n\n"
    with open(TARGET, "w") as f:
        f.write(head + "TUNED: dict[str, list[dict]] = " + pprint.pformat(tuned, width=110, sort_dicts=False) + "\n")
    print(f"recorded {key} ({entry['steps']} steps): " + ", ".join(f"{k} {v:.3g}" for k, v in lrs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
