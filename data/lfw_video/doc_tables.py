"""Print the tables of docs/results_lfw_video.md from both encoders' evaluate-stage outputs and timings.json.

    python data/lfw_video/doc_tables.py output/lfw_video/mobilefacenet_arcface output/lfw_video/w600k_mbf
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

ROWS = [("baseline", "baseline (mean)"), ("norm_weight", "norm-weighted"), ("serfiq_weight", "SER-FIQ-weighted"),
        ("weight", "TransFIRA weight"), ("filter", "TransFIRA filter"), ("filter_weight", "TransFIRA filter + weight"),
        ("e2e_filter_weight", "TransFIRA filter + weight (e2e)"),
        ("disk_raw_filter_weight", "ridge on disk frames, raw z, filter + weight"),
        ("disk_unit_filter_weight", "ridge on disk frames, unit + log norm, filter + weight"),
        ("true_filter_weight", "true-label bound (filter + weight)")]


def ci(x: float, lo: float, hi: float, sign: bool = False) -> str:
    return f"{x:+.3f} [{lo:+.3f}, {hi:+.3f}]" if sign else f"{x:.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    for work in map(Path, sys.argv[1:]):
        tar = pd.read_csv(work / "evaluation" / "results.csv")
        fmrs = sorted(tar["fmr"].unique(), reverse=True)
        print(f"\n#### {work.name}: Table II\n")
        print("| row | " + " | ".join(f"TAR@{f:g} [95 %]" for f in fmrs) + " | "
              + " | ".join(f"vs mean @{f:g}" for f in fmrs) + " | " + " | ".join(f"vs norm @{f:g}" for f in fmrs) + " |")
        print("|---|" + "---|" * 3 * len(fmrs))
        for key, label in ROWS:
            rows = tar[tar["variant"] == key].set_index("fmr")
            if rows.empty:
                continue
            cells = [ci(rows.tar[f], rows.tar_lo[f], rows.tar_hi[f]) for f in fmrs]
            cells += [ci(rows.delta[f], rows.delta_lo[f], rows.delta_hi[f], True) for f in fmrs]
            cells += [ci(rows.delta_norm_weight[f], rows.delta_norm_weight_lo[f], rows.delta_norm_weight_hi[f], True)
                      for f in fmrs]
            print(f"| {label} | " + " | ".join(cells) + " |")
        img = pd.read_csv(work / "evaluation" / "image_results.csv")
        print(f"\n#### {work.name}: Table III (image level)\n")
        print("| score | Spearman with its true value [95 %] | minus norm [95 %] | "
              + " | ".join(f"ERC area @{f:g} [95 %]" for f in fmrs) + " |")
        print("|---|---|---|" + "---|" * len(fmrs))
        for measure, rows in img.groupby("measure", sort=False):
            rows = rows.set_index("fmr")
            r = rows.iloc[0]
            sc = ci(r.sc, r.sc_lo, r.sc_hi) + f" ({r.target.upper()})" if isinstance(r.target, str) else "n/a"
            minus = (ci(r.sc_minus_norm, r.sc_minus_norm_lo, r.sc_minus_norm_hi, True)
                     if "sc_minus_norm" in rows and not pd.isna(r.sc_minus_norm) else "")
            areas = [f"{rows.erc_auc[f]:.4f} [{rows.erc_auc_lo[f]:.4f}, {rows.erc_auc_hi[f]:.4f}]" for f in fmrs]
            print(f"| {measure} | {sc} | {minus} | " + " | ".join(areas) + " |")
        timings = json.loads((work / "timings.json").read_text())
        print(f"\ntimings {work.name}: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
