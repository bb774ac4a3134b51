#!/usr/bin/env bash
# One command: install what the tests need, then run the whole suite (notebooks included).
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser tests drive the system chromium (Debian package): install it when missing
# (UQCIT_SKIP_BROWSER=1 skips them on purpose). Playwright never downloads a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if [ -z "${UQCIT_SKIP_BROWSER:-}" ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then as_root=(); else as_root=(sudo -n); fi
  "${as_root[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq chromium >/dev/null
fi
bash scripts/install.sh test
# Idle OpenMP threads spin and slow every pass 6-12x when another process holds a core.
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest "$@"
