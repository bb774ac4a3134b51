#!/usr/bin/env bash
# One command: install everything, then run the main job on the offline default model
# (SmolLM2-135M, recipe alloc-signround-4.25-quick: the best recipe measured to finish within 10
# minutes on 2 cores, full evaluation included: 553 s) and print it beside the recorded baselines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh lab
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/uqcit compress --model smollm2-135m --recipe alloc-signround-4.25-quick \
  --out runs/default/package --json runs/default/report.json "$@"
.venv/bin/python benchmarks/beside.py runs/default/report.json
