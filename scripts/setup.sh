#!/usr/bin/env bash
# Create .venv (if needed) and install the project with its test extras. Idempotent: a second
# run with an unchanged pyproject.toml does nothing. Override the interpreter with PYTHON=...
# and the torch build with TORCH_SPEC="torch==X torchvision==Y".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
stamp=.venv/.transfira-installed
want=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "setup: installing into .venv (PyTorch is large; the first run takes a few minutes; log: .venv/setup.log)"
log=.venv/setup.log
pip_install() { .venv/bin/python -m pip install -q "$@" >>"$log" 2>&1 || { tail -n 30 "$log" >&2; echo "setup: pip install $* failed (see $log)" >&2; exit 1; }; }
: >"$log"
.venv/bin/python -c "import torch, torchvision" 2>/dev/null || pip_install $TORCH_SPEC
pip_install -e ".[dev]"
.venv/bin/python -c "import torch, torchvision, onnx2torch, transfira" || { echo "setup: installation failed" >&2; exit 1; }
echo "$want" > "$stamp"
