#!/usr/bin/env bash
# One pass on a lent GPU machine: the `gpu` tests, then the GPU figures for benchmarks/RESULTS.md
# (labels, encoder / SER-FIQ img/s, training img/s, generate.py img/s). Bounded to about 7 minutes in all; logs go
# to $OUT (or ./gpu_check_logs). `transfira` is imported from the checkout ($PWD); dependencies
# the machine lacks come as wheels in .whl/ (at least onnx2torch: `pip download --no-deps -d .whl
# onnx2torch==1.5.15`, pure Python); the preflight below names any other missing one. Then:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   bash benchmarks/gpu_check.sh
#
# Each step has its own time limit and the script goes on after a failure; it exits non-zero
# when any step failed (see summary.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-gpu_check_logs}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-$PWD}
export TRANSFIRA_PROGRESS=${TRANSFIRA_PROGRESS:-off} PYTHONUNBUFFERED=1  # lines survive a timeout
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    [ "$rc" -ne 0 ] && failed=1
    printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$*" | tee -a "$LOGS/summary.txt"
    tail -n 25 "$LOGS/$name.log"
}

: >"$LOGS/summary.txt"
{ date -u; uptime; nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"; } \
    2>&1 | tee "$LOGS/machine.txt"

# every dependency importable? (else stop here, naming what to carry as a wheel, before spending GPU time)
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOGS/machine.txt" || exit 3
import importlib.util, sys
mods = ["torch", "torchvision", "onnx", "onnx2torch", "onnxruntime", "numpy", "pandas", "sklearn", "PIL",
        "tensorboard", "tqdm", "matplotlib", "scipy", "pytest", "transfira"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
print("missing:", ", ".join(missing) if missing else "nothing")
sys.exit(1 if missing else 0)
PYEOF

step gpu_tests 150 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py
step labels 45 "$PY" benchmarks/bench_labels.py --device cuda --loop-size 300x50 --sizes 100000x10000 200000x20000
step serfiq 60 "$PY" benchmarks/bench_serfiq.py --device cuda --batch 64 --m 100 --steps 5
step train 75 "$PY" benchmarks/bench_train.py --device cuda --steps 10 --r50-batch 64 --demo-batch 128 --workers 8
step sharded 60 "$PY" benchmarks/bench_sharded.py --n 8000 --nproc 1 --device cuda --workers 8 --batch_size 256

echo "logs in $LOGS; failed=$failed"
exit "$failed"
