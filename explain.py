"""Explain recognizability: degradation sweeps, attribution maps, subject-level factors.

    python explain.py --config configs/explain.toml

Writes sweeps.csv, sweeps_summary.csv, crossings.csv/.md, subjects.csv, attribution.csv and the
PNG figures into the config's outdir (see docs/explain.md).
"""
from __future__ import annotations

import argparse

from transfira.config import load_config
from transfira.errors import run_cli
from transfira.jobs import explain


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/explain.toml", help="TOML config (see configs/explain.toml)")
    parser.add_argument("--allow-pickle", action="store_true", help="read a legacy pickled centers file (trusted only)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, explain.SCHEMA)
    cfg["allow_pickle"] = cfg["allow_pickle"] or args.allow_pickle
    explain.run(cfg)


if __name__ == "__main__":
    run_cli(main)
