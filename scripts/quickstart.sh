#!/usr/bin/env bash
# One command: install everything, then run the main job on the offline default model
# (SmolLM2-135M, recipe gptq-4.25: the best recipe measured to finish within about 10 minutes on
# 2 cores, full evaluation included) and print it beside the recorded baselines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh lab
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/uqcit compress --model smollm2-135m --recipe gptq-4.25 \
  --out runs/default/package --json runs/default/report.json "$@"
.venv/bin/python benchmarks/beside.py runs/default/report.json
