#!/usr/bin/env bash
# Set up (first run only) and run the main job: the default optimizer comparison.
# Extra arguments go to `lit-optim compare` (e.g. --quick, --task digits, --steps 200, --device cuda,
# --module my_pkg.my_module:MyLightningModule); `lit-optim compare --help` lists them all.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
bash scripts/setup.sh
t1=$SECONDS
rc=0
.venv/bin/lit-optim compare "$@" || rc=$?
if [ "$rc" -ne 2 ]; then
  echo "[compare.sh] set-up $((t1 - t0)) s, comparison $((SECONDS - t1)) s"
fi
exit "$rc"
