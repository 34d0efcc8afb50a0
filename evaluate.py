"""Evaluate templates (TAR at FMR, ROC; paper Table II) and image quality scores (SC, ERC/EDC; Table III).

    python evaluate.py --config configs/evaluate.toml
"""
from __future__ import annotations

import argparse

from transfira.errors import run_cli
from transfira.jobs import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/evaluate.toml", help="TOML config (see configs/evaluate.toml)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read legacy pickled templates_*.npy files (runs code from the file: trusted files only)")
    args = parser.parse_args()
    cfg = evaluate.load_evaluate_config(args.config)
    cfg["allow_pickle"] = cfg["allow_pickle"] or args.allow_pickle
    evaluate.run(cfg)


if __name__ == "__main__":
    run_cli(main)
