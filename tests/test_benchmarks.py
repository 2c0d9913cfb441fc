"""Every benchmark runs end to end in its smallest setting, so that the commands in the README's
performance table cannot rot. Figures are not checked here (speed is never asserted in tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = {
    "step_time": ["--only", "lion,sophia,adahessian,adan", "--reps", "1", "--layers", "1"],
    # heavyball's row is left out: it may compile kernels, which needs a C compiler
    "orthogonal_step_time": ["--reps", "1", "--layers", "1", "--only", "lit,torch.optim,pytorch_optimizer"],
    "memory": ["--sections", "state,convergence", "--only", "frugal,subset_norm,dct_lowrank(T=5)", "--reps", "1",
               "--steps", "5"],
    "curvature_overhead": ["--quick"],
    "callback_overhead_grad": ["--reps", "1", "--block", "2", "--blocks", "4"],
    "callback_overhead_eval": ["--steps", "16", "--warmup", "2", "--block", "4", "--reps", "1"],
    "hf_callback_overhead": ["--steps", "12", "--warmup", "2", "--reps", "1"],
    # spawns 1 then 2 gloo processes on tiny GPT shapes
    "distributed": ["--small", "--procs", "1,2", "--reps", "1", "--only", "adamw,muon,frugal"],
}


def test_every_benchmark_has_a_smoke_setting():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common")}
    assert scripts == set(SMOKE)


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_runs(name):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *SMOKE[name]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip(), "the benchmark printed nothing"
