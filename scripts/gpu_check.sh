#!/usr/bin/env bash
# One prepared command for a GPU machine: finds (or installs) a CUDA build of torch, runs the CUDA
# tests and the GPU benchmarks, and writes a Markdown table of figures (device name, torch version,
# every step-time ratio against torch's fused AdamW and heavyball) to gpu_check.md.
#
#   bash scripts/gpu_check.sh                 # on a GPU machine (target: < 8 minutes on one H100)
#   bash scripts/gpu_check.sh --out FILE      # write the figures to FILE instead of gpu_check.md
#   bash scripts/gpu_check.sh --dry-run       # the same pipeline on the CPU with tiny sizes (tests it)
#
# Python: $PYTHON when set; else .venv/bin/python when its torch sees a GPU; else the first of
# python3 / python whose torch sees a GPU (a machine image with CUDA torch preinstalled), used with
# PYTHONPATH pointing at this checkout (no installation, works offline); else .venv is set up by
# scripts/setup.sh and, when it has no CUDA torch, `pip install torch` from PyPI (whose Linux
# wheels are CUDA builds) is tried. Missing test/benchmark extras (pytest, lightning, heavyball,
# pytorch_optimizer) are installed with pip when the network allows and skipped otherwise.
#
# Every stage has a time limit (LIT_GPU_CHECK_TESTS_S, _STEP_S, _ORTHO_S seconds); a stage that
# runs out keeps the rows it finished. The exit status is 0 when every stage passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
OUT=gpu_check.md
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done

log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
has_torch() { "$1" -c "import torch" >/dev/null 2>&1; }

# ------------------------------------------------------------------------------ python with torch
PY=""
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ $DRY = 1 ]; then
  if ! has_torch .venv/bin/python; then bash scripts/setup.sh; fi
  PY=.venv/bin/python
elif has_cuda .venv/bin/python; then
  PY=.venv/bin/python
else
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && has_cuda "$cand"; then PY=$(command -v "$cand"); break; fi
  done
  if [ -z "$PY" ]; then
    log "no torch with CUDA found: setting up .venv (scripts/setup.sh) and trying pip install torch (CUDA build)"
    bash scripts/setup.sh || true
    if ! has_cuda .venv/bin/python; then
      .venv/bin/python -m pip install -q --upgrade torch || true
    fi
    PY=.venv/bin/python
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/lit_optim_inductor_cache}"
if [ $DRY = 1 ]; then
  DEVICE=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  DEVICE=cuda
  if ! has_cuda "$PY"; then
    log "ERROR: $PY has no CUDA torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1)); use --dry-run on a machine without a GPU"
    exit 1
  fi
fi
log "python: $PY"

# ------------------------------------------------------------------------------ extras
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"pytest": "pytest", "lightning": "lightning", "torchmetrics": "torchmetrics", "tensorboard": "tensorboard",
        "heavyball": "heavyball", "pytorch_optimizer": "pytorch_optimizer", "sklearn": "scikit-learn"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  log "installing missing extras: $missing (skipped when offline)"
  timeout 120 "$PY" -m pip install -q $missing >/dev/null 2>&1 || log "could not install: $missing (rows that need them are left out)"
fi

# ------------------------------------------------------------------------------ figures file
"$PY" - "$OUT" "$DEVICE" "$DRY" <<'EOF'
import sys, time
import torch
from benchmarks.common import device_name
out, device, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
name = device_name(device)
cap = ".".join(map(str, torch.cuda.get_device_capability(0))) if device == "cuda" else "-"
with open(out, "w") as f:
    f.write(f"# lit_optim GPU check{' (DRY RUN on the CPU, tiny sizes: not figures)' if dry else ''}\n\n")
    f.write(f"- device: {name} (compute capability {cap})\n- torch {torch.__version__}, CUDA {torch.version.cuda}\n")
    f.write(f"- date: {time.strftime('%Y-%m-%d %H:%M')}\n- command: `bash scripts/gpu_check.sh{' --dry-run' if dry else ''}`\n")
EOF

status=0
run_stage() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  log "$name (limit ${secs}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$secs" "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    echo "- $name: passed in ${dt}s" >> "$OUT.stages"
  else
    [ $rc -eq 124 ] && log "$name: out of time after ${secs}s" || log "$name: exit status $rc"
    echo "- $name: **exit status $rc** after ${dt}s$([ $rc -eq 124 ] && echo ' (time limit)')" >> "$OUT.stages"
    status=1
  fi
}
rm -f "$OUT.stages"

# ------------------------------------------------------------------------------ stages
if [ $DRY = 1 ]; then
  TESTS_K="(agree and Lion) or newton or curvature_estimators or compare or weight_averaging"
  run_stage "CUDA tests (on the CPU)" "${LIT_GPU_CHECK_TESTS_S:-300}" \
    env LIT_OPTIM_TEST_DEVICE=cpu "$PY" -m pytest tests/cuda -q -p no:cacheprovider -k "$TESTS_K"
  run_stage "step_time" "${LIT_GPU_CHECK_STEP_S:-300}" \
    "$PY" -m benchmarks.step_time --device cpu --layers 1 --width 64 --reps 2 --only lion,adagradnorm --markdown "$OUT"
  run_stage "orthogonal_step_time" "${LIT_GPU_CHECK_ORTHO_S:-300}" \
    "$PY" -m benchmarks.orthogonal_step_time --device cpu --layers 1 --width 64 --reps 1 --no-state \
    --only nsc --markdown "$OUT"
else
  run_stage "CUDA tests" "${LIT_GPU_CHECK_TESTS_S:-200}" "$PY" -m pytest tests/cuda -q -p no:cacheprovider -rfEs
  run_stage "step_time (float32)" "${LIT_GPU_CHECK_STEP_S:-200}" \
    "$PY" -m benchmarks.step_time --device cuda --reps 20 --markdown "$OUT"
  run_stage "orthogonal_step_time" "${LIT_GPU_CHECK_ORTHO_S:-60}" \
    "$PY" -m benchmarks.orthogonal_step_time --device cuda --reps 10 --no-state \
    --only "torch.optim,lit muon,heavyball" --markdown "$OUT"
fi

{ echo; echo "### Stages"; echo; cat "$OUT.stages"; } >> "$OUT"
rm -f "$OUT.stages"
log "figures written to $OUT"
exit $status
