"""Stage 3: recognizability-informed templates (paper section III-C, eq. 10).

    python test.py --config configs/test.toml --generate_features --predict_scores --aggregate_features --all_variants
    python test.py --config configs/test.toml --aggregate_features --use_filter --use_weight

Features come from the deployed encoder (model_path), CCS/CCAS from the predictor
(checkpoint_path); steps given together share one pass over the images. A step not run
reads the earlier one's output from outdir (or --features_path / --ccs_path / --ccas_path).
A [quality] table in the config adds FIQA scores (norm, SER-FIQ, CR, external CSVs) from the
same pass: test_quality.csv, test_serfiq.npy and, with --aggregate_features, templates_<score>.npz.
"""
from __future__ import annotations

import argparse

from transfira.aggregation import VARIANTS, variant_name
from transfira.config import load_config
from transfira.errors import TransfiraError, run_cli
from transfira.jobs import test


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/test.toml", help="TOML config (see configs/test.toml)")
    parser.add_argument("--generate_features", action="store_true", help="embed the images with the deployed encoder")
    parser.add_argument("--predict_scores", action="store_true", help="predict CCS and CCAS with the predictor")
    parser.add_argument("--aggregate_features", action="store_true", help="build one vector per template")
    parser.add_argument("--use_filter", action="store_true", help="aggregate only images with predicted CCAS > 0")
    parser.add_argument("--use_weight", action="store_true", help="weight images by predicted CCS (eq. 10)")
    parser.add_argument("--all_variants", action="store_true",
                        help=f"write all four template files ({', '.join(VARIANTS)}) in one pass")
    parser.add_argument("--features_path", help="features to aggregate (default: outdir/test_features.npy)")
    parser.add_argument("--ccs_path", help="predicted CCS to aggregate with (default: outdir/test_ccs.npy)")
    parser.add_argument("--ccas_path", help="predicted CCAS to aggregate with (default: outdir/test_ccas.npy)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read legacy pickled features / scores (runs code from the file: trusted files only)")
    args = parser.parse_args(argv)
    modifiers = [flag for flag in ("use_filter", "use_weight", "all_variants", "features_path", "ccs_path",
                                   "ccas_path") if getattr(args, flag)]
    if modifiers and not args.aggregate_features:
        raise TransfiraError(f"--{modifiers[0]} applies to --aggregate_features, which was not given")
    cfg = load_config(args.config, test.SCHEMA)
    cfg["allow_pickle"] = cfg["allow_pickle"] or args.allow_pickle
    variants = list(VARIANTS) if args.all_variants else [variant_name(args.use_filter, args.use_weight)]
    test.run(cfg, args.generate_features, args.predict_scores, args.aggregate_features, variants,
             args.features_path, args.ccs_path, args.ccas_path)


if __name__ == "__main__":
    run_cli(main)
