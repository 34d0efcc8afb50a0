"""Train the recognizability predictor (CCS and CCAS heads on the encoder, end to end).

    python train.py --config configs/train.toml
    torchrun --nproc_per_node=4 train.py --config configs/train.toml
    python train.py --resume output/checkpoints/RUN_NAME        # continue a run
"""
from __future__ import annotations

import argparse
import os

from transfira.config import load_config
from transfira.errors import TransfiraError, run_cli
from transfira.jobs import train


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the TransFIRA recognizability predictor.")
    parser.add_argument("--config", help="TOML config (see configs/train.toml)")
    parser.add_argument("--resume", metavar="RUN_DIR_OR_FILE",
                        help="continue a run from its resume.pt (uses the stored config when --config is not given)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimizer steps, as if killed (smoke tests)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in a run directory that already holds a run (its files are replaced)")
    args = parser.parse_args()
    if args.config is None and args.resume is None:
        raise TransfiraError("give --config CONFIG (or --resume RUN_DIR to continue a run)")
    cfg = load_config(args.config, train.SCHEMA) if args.config else None
    run_dir = train.run(cfg, resume=args.resume, max_steps=args.max_steps, config_path=args.config or "config",
                        overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(f"run directory: {run_dir}")


if __name__ == "__main__":
    run_cli(main)
