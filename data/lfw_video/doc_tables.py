"""Print the tables of docs/results_lfw_video.md from both encoders' analysis/results.json and timings.json.

    python data/lfw_video/doc_tables.py output/lfw_video/mobilefacenet_arcface output/lfw_video/w600k_mbf
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [("baseline", "baseline (mean)"), ("norm_weight", "norm-weighted"), ("serfiq_weight", "SER-FIQ-weighted"),
        ("e2e_weight", "TransFIRA weight (e2e)"), ("e2e_filter", "TransFIRA filter (e2e)"),
        ("e2e_filter_weight", "TransFIRA filter + weight (e2e)"),
        ("ridge_weight", "frozen ridge weight"), ("ridge_filter", "frozen ridge filter"),
        ("ridge_filter_weight", "frozen ridge filter + weight"),
        ("ridge_all_filter_weight", "frozen ridge filter + weight, all train ids"),
        ("ridge_lognorm_filter_weight", "frozen ridge + log-norm, filter + weight, all train ids"),
        ("true_filter_weight", "true-label bound (filter + weight)")]


def cell(v: dict, key: str, f: int) -> str:
    lo, hi = v[f"{key}_ci" if key != "tar" else "ci"][f]
    x = v[key][f]
    return f"{x:.3f} [{lo:.3f}, {hi:.3f}]" if key == "tar" else f"{x:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main() -> None:
    runs = {Path(p).name: json.loads((Path(p) / "analysis" / "results.json").read_text()) for p in sys.argv[1:]}
    for name, r in runs.items():
        print(f"\n#### {name}: Table II ({r['identities']} identities, {r['genuine']} genuine / {r['impostor']} impostor pairs)\n")
        print("| row | TAR@1e-3 [95 %] | width | TAR@1e-4 [95 %] | width | vs mean @1e-3 | vs mean @1e-4 | vs norm @1e-3 | vs norm @1e-4 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for key, label in ROWS:
            if key not in r["tar"]:
                continue
            v = r["tar"][key]
            w = [v["ci"][f][1] - v["ci"][f][0] for f in range(2)]
            print(f"| {label} | {cell(v, 'tar', 0)} | {w[0]:.3f} | {cell(v, 'tar', 1)} | {w[1]:.3f} | "
                  f"{cell(v, 'delta_baseline', 0)} | {cell(v, 'delta_baseline', 1)} | "
                  f"{cell(v, 'delta_norm_weight', 0)} | {cell(v, 'delta_norm_weight', 1)} |")
        print(f"\n#### {name}: Table III (image level, {r['frames']} test frames)\n")
        e3, e4 = (r["erc"][k] for k in list(r["erc"])[:2])
        print("| score | Spearman with true CCS [95 %] | minus norm [95 %] | ERC area @1e-3 [95 %] | ERC area @1e-4 [95 %] |")
        print("|---|---|---|---|---|")
        for k, v in r["spearman"].items():
            a3, a4 = e3["auc"].get(k), e4["auc"].get(k)
            c3, c4 = e3.get("auc_ci", {}).get(k, [float("nan")] * 2), e4.get("auc_ci", {}).get(k, [float("nan")] * 2)
            print(f"| {k} | {v['spearman']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] | "
                  f"[{v['delta_norm_ci'][0]:+.3f}, {v['delta_norm_ci'][1]:+.3f}] | {a3:.4f} [{c3[0]:.4f}, {c3[1]:.4f}] | "
                  f"{a4:.4f} [{c4[0]:.4f}, {c4[1]:.4f}] |")
        print(f"| true CCS (ideal) | 1 | | {e3['auc']['true CCS']:.4f} | {e4['auc']['true CCS']:.4f} |")
        timings = json.loads((Path(sys.argv[1 + list(runs).index(name)]) / "timings.json").read_text())
        print(f"\ntimings {name}: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
