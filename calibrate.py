"""Sigmoid (Platt) calibration of CCS/NNCCS labels (paper section IV-E).

Fit:   python calibrate.py --csv train_labels.csv --outdir OUT
Apply: python calibrate.py --csv val_labels.csv --outdir OUT_VAL --model OUT/calibrator.json
"""
from __future__ import annotations

import argparse
import json

from transfira.jobs import calibrate
from transfira.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True, help="labels CSV with 'ccs' and 'nnccs' columns")
    parser.add_argument("--outdir", required=True, help="output directory")
    parser.add_argument("--model", help="calibrator.json to apply (omit to fit one on --csv)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (fit)")
    parser.add_argument("--seed", type=int, default=None,
                        help="shuffle the folds with this seed (default: unshuffled, as the paper)")
    args = parser.parse_args(argv)
    metrics = calibrate.run(args.csv, args.outdir, args.model, plots=not args.no_plots,
                            folds=args.folds, seed=args.seed)
    if "brier" in metrics:
        print(f"Brier score: {metrics['brier']:.4f}")
    print(json.dumps(metrics, indent=2))
    print(f"wrote {args.outdir}")


if __name__ == "__main__":
    run_cli(main)
