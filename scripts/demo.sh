#!/usr/bin/env bash
# The whole pipeline on the built-in synthetic demo data, on CPU, with no downloads:
# demo data + tiny encoder -> labels -> predictor training -> templates -> calibration -> evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
stage() { echo; echo "=== $1"; SECONDS=0; }
done_() { echo "--- $1 took ${SECONDS}s"; }

stage "1/6 demo data and encoder (demo_data/)"
[ -f demo_data/encoder.onnx ] || $PY -m transfira.demo demo_data
done_ "demo data"
stage "2/6 labels: generate.py"
$PY generate.py --config configs/demo/generate.toml
done_ "generate"
stage "3/6 predictor: train.py"
$PY train.py --config configs/demo/train.toml --overwrite   # a rerun of the demo trains again
done_ "train"
stage "4/6 templates: test.py"
$PY test.py --config configs/demo/test.toml --generate_features --predict_scores --aggregate_features --all_variants
done_ "test"
stage "5/6 calibration: calibrate.py"
$PY calibrate.py --csv output/demo/labels/train_labels.csv --outdir output/demo/calibration
done_ "calibrate"
stage "6/6 evaluation: evaluate.py"
$PY evaluate.py --config configs/demo/evaluate.toml
done_ "evaluate"
echo
cat output/demo/evaluation/results.md
echo
echo "All outputs are under output/demo/."
