"""Stage 1: embed images, compute class centers and CCS / NNCCS / CCAS labels.

    python generate.py --config configs/generate.toml
"""
import argparse

from transfira.config import load_config
from transfira.errors import run_cli
from transfira.jobs import generate


def main() -> None:
    parser = argparse.ArgumentParser(description="TransFIRA stage 1: recognizability labels (CCS, NNCCS, CCAS)")
    parser.add_argument("--config", default="configs/generate.toml", help="TOML config (see docs/labels.md)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow reading legacy pickled centers files")
    args = parser.parse_args()
    generate.run(load_config(args.config, generate.SCHEMA), allow_pickle=args.allow_pickle)


if __name__ == "__main__":
    run_cli(main)
