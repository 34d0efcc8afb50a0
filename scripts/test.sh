#!/usr/bin/env bash
# Set up .venv and run the test suite (CPU; tests marked slow are skipped unless SLOW=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${SLOW:-0}" = "1" ]; then marker=(); else marker=(-m "not slow"); fi
exec .venv/bin/python -m pytest -q "${marker[@]}" "$@"
