#!/usr/bin/env bash
# One command: install everything, then run the main job on the offline default model
# (SmolLM2-135M, recipe uqcit-default, full evaluation protocol) and print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh lab
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/uqcit compress --model smollm2-135m --recipe uqcit-default \
  --out runs/default/package --json runs/default/report.json "$@"
