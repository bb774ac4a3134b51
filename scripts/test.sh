#!/usr/bin/env bash
# One command: install what the tests need, then run the whole suite (notebooks included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
# Idle OpenMP threads spin and slow every pass 6-12x when another process holds a core.
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest "$@"
