"""IJB-C / IJB-B 1:1 verification (TAR at FAR) in InsightFace's release layout, one command.

    python data/IJB/run_ijb.py --config configs/examples/ijbc/ijbc.toml
    python data/IJB/run_ijb.py --config CFG --from templates      # re-run from a stage (earlier outputs kept)
    python data/IJB/run_ijb.py --config CFG --force               # re-run every stage, even when up to date

Stages: meta (meta files -> test.csv, pairs.csv), features (aligned loose crops through the
encoder and the predictor), templates (templates_<variant>.npz with the media rule), evaluate
(evaluate.py on the official pairs -> evaluation/results.md). A stage whose recorded inputs
(outdir/stages.json) match and whose outputs exist is skipped; an interrupted feature pass
resumes. See data/IJB/README.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from transfira.config import load_config  # noqa: E402
from transfira.errors import run_cli  # noqa: E402
from transfira.jobs import ijb  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="TOML config (see configs/examples/ijbc/ijbc.toml)")
    p.add_argument("--from", dest="first", choices=ijb.STAGES, default=ijb.STAGES[0], help="first stage to run")
    p.add_argument("--to", dest="last", choices=ijb.STAGES, default=ijb.STAGES[-1], help="last stage to run")
    p.add_argument("--force", action="store_true", help="run the stages even when their outputs are up to date")
    args = p.parse_args(argv)
    cfg = ijb.check_config(load_config(args.config, ijb.SCHEMA), args.config)
    return ijb.run(cfg, args.first, args.last, args.force)


if __name__ == "__main__":
    run_cli(main)
