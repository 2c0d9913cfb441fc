#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with torch's CPU build
# (unless a torch is already importable there) and lit-optim installed in editable mode
# with every extra. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip's own progress (downloads, builds) is shown; "Requirement already satisfied" lines and the
# warning some machines print per missing local index entry are not
pipq() {
  "$VPY" -m pip install --progress-bar on "$@" 2>&1 \
    | { grep -v -e "is ignored: it is neither" -e "^Requirement already satisfied" || true; }
}
step() { echo "[setup] $*"; }
t0=$SECONDS
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  # A bare `torch` requirement would pull a multi-GB CUDA build: take the CPU build first.
  step "installing torch (CPU build; a few hundred MB on a fresh machine)"
  pipq "torch==2.13.0" || pipq --index-url https://download.pytorch.org/whl/cpu torch
fi
stamp=.venv/.lit_optim_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  step "installing lit-optim (editable) with its extras: Lightning, transformers, matplotlib, test tools"
  pipq -e ".[dev,hf,plot,cli]"
  touch "$stamp"
  step "done in $((SECONDS - t0)) s"
else
  step ".venv is up to date"
fi
