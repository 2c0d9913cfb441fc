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
    # multi-tensor path only: the compiled rows are run by EXTRA and by the gpu_check.sh dry run
    "step_time": ["--only", "lion,sophia,adahessian,adan", "--reps", "1", "--layers", "1", "--width", "128",
                  "--fused", "off", "--no-peers"],
    # heavyball's rows and the compiled Newton-Schulz are left out: they compile kernels (C compiler)
    "orthogonal_step_time": ["--reps", "1", "--layers", "1", "--width", "128", "--only", "lit,torch.optim,pytorch_optimizer",
                             "--no-heavyball", "--no-compiled"],
    "memory": ["--sections", "state,convergence", "--only", "frugal,subset_norm,dct_lowrank(T=5)", "--reps", "1",
               "--steps", "5"],
    "curvature_overhead": ["--quick"],
    "callback_overhead_grad": ["--reps", "1", "--block", "2", "--blocks", "4"],
    "callback_overhead_eval": ["--steps", "16", "--warmup", "2", "--block", "4", "--reps", "1"],
    "hf_callback_overhead": ["--steps", "12", "--warmup", "2", "--reps", "1"],
    # spawns 1 then 2 gloo processes on tiny GPT shapes
    "distributed": ["--small", "--procs", "1,2", "--reps", "1", "--only", "adamw,muon,frugal"],
}


#: further settings: the compiled path (fused=True) and the peers, smallest sizes
EXTRA = {
    "step_time_fused": ("step_time", ["--only", "lion,adagradnorm", "--reps", "1", "--layers", "1", "--width", "64"]),
}


def test_every_benchmark_has_a_smoke_setting():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common")}
    assert scripts == set(SMOKE)


RUNS = {**{k: (k, v) for k, v in SMOKE.items()}, **EXTRA}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_benchmark_runs(name):
    script, argv = RUNS[name]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip(), "the benchmark printed nothing"
    if name == "step_time_fused":
        assert "fell back" not in proc.stdout and "\n                        fused" in proc.stdout


def test_gpu_check_dry_run(tmp_path):
    """scripts/gpu_check.sh --dry-run: the GPU machine's pipeline (CUDA tests, benchmarks, Markdown
    figures) on the CPU with tiny sizes."""
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# lit_optim GPU check (DRY RUN")
    assert "- torch " in text and "| torch AdamW | fused |" in text and "| heavyball | AdamW compiled |" in text
    assert "|  | fused |" in text  # Lion's compiled row
    assert "| lit Muon bf16 NS compiled |" in text
    assert text.count(": passed in") == 3, text
