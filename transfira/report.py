"""How evaluate.py presents results: numbers with their intervals, Markdown tables, ROC and ERC plots."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import evaluation as ev
from .io import save_figure

INSIGHTFACE = "InsightFace nearest-FPR"  # the rows of threshold_convention = 'insightface'


def fmt_fmr(fmr: float) -> str:
    """``1e-3`` for 0.001 (column titles and file names)."""
    return f"{fmr:.0e}".replace("e-0", "e-").replace("e+00", "")


def fmt(x: float, digits: int = 4) -> str:
    """``x`` with ``digits`` decimals, ``n/a`` for a missing value."""
    return "n/a" if x is None or np.isnan(x) else f"{x:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def plot_roc(stats: dict[str, ev.ScoreStats], fmrs: list[float], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for variant, st in stats.items():
        fmr, tar = ev.roc_curve(st)
        ax.semilogx(fmr, tar, label=variant)
    for f in fmrs:
        ax.axvline(f, color="0.8", lw=0.8, ls=":")
    ax.set(xlabel="FMR", ylabel="TAR", title="Template verification ROC", ylim=(0, 1.01))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_erc(curves: dict[str, tuple[np.ndarray, np.ndarray]], fmr: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (frac, fnmr) in curves.items():
        style = dict(color="k", ls="--") if name.startswith("ideal") else {}
        ax.step(frac, fnmr, where="post", label=name, **style)
    ax.set(xlabel="fraction of images discarded", ylabel="FNMR",
           title=f"Error versus discard (EDC/ERC), FMR = {fmt_fmr(fmr)}", xlim=(0, frac[-1]))
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def fmt_ci(x: float, lo: float, hi: float, sign: bool = False) -> str:
    """``0.9839 [0.97, 0.99]`` (the interval with 2 decimals; the CSV keeps every digit)."""
    if x is None or np.isnan(x):
        return "n/a"
    value = f"{x:+.4f}" if sign else f"{x:.4f}"
    if np.isnan(lo) or np.isnan(hi):
        return value
    return f"{value} [{lo:.2f}, {hi:.2f}]"


def delta_column(ref: str) -> str:
    """results.csv's column of the paired difference to template variant ``ref``."""
    return "delta" if ref == "baseline" else f"delta_{ref}"


def verification_markdown(table: pd.DataFrame, fmrs: list[float], source: str, first: ev.ScoreStats,
                          n_boot: int, seed: int, compare_to: list[str] = ()) -> list[str]:
    names = list(dict.fromkeys(table.variant))
    cells = {v: [fmt_ci(r.tar, r.tar_lo, r.tar_hi) for r in table[table.variant == v].itertuples()] for v in names}
    header = ["Variant"] + [f"FMR={fmt_fmr(f)}" for f in fmrs]
    md = ["## Template verification: TAR at FMR (paper Table II)", "",
          f"Pairs: {source}; {len(first.genuine)} genuine, {first.n_impostor} impostor.", "",
          markdown_table(header, [[v] + cells[v] for v in names]), "",
          "n/a: fewer than 1/FMR impostor pairs, this FMR cannot be measured. "
          "TAR = share of genuine scores strictly above the k-th highest impostor score, "
          "k = floor(FMR * N_impostor) (SPEC section 6). Rows other than baseline, weight, filter and "
          "filter_weight are templates weighted by that quality score (test.py [quality])."]
    if (table.convention == "insightface").any():
        md[-1] += (f" Rows marked ({INSIGHTFACE}): TAR at the ROC point (sklearn roc_curve) whose FPR is "
                   "nearest the target, as InsightFace's IJB evaluation reports it; comparable with published "
                   "IJB numbers, not with the rows above.")
    if n_boot:
        md[-1] += (f" [lo, hi]: 95 % percentile interval of a bootstrap over subjects ({n_boot} replicates, "
                   f"seed {seed}; thresholds recomputed in every replicate).")
        for ref in ["baseline", *compare_to]:
            col = delta_column(ref)
            spec = table[(table.convention == "spec") & (table.variant != ref)]
            if ref in names and len(spec) and spec[f"{col}_lo"].notna().any():
                diff = [[v] + [fmt_ci(r[col], r[f"{col}_lo"], r[f"{col}_hi"], sign=True)
                               for r in spec[spec.variant == v].to_dict("records")] for v in dict.fromkeys(spec.variant)]
                md += ["", f"### Difference to {ref} (paired bootstrap, same replicates)", "",
                       markdown_table(["Variant"] + [f"FMR={fmt_fmr(f)}" for f in fmrs], diff), "",
                       f"TAR(variant) - TAR({ref}); an interval that excludes 0 is a difference beyond "
                       "subject-sampling noise."]
    return md + [""]


def cuts_markdown(cuts: pd.DataFrame) -> list[str]:
    body = [[r.measure, r.images, str(r.n), f"{r.cut:+.4f}", *(fmt(getattr(r, c), 3) for c in (
        "true_pos", "pred_pos", "both_pos", "pred_pos_true_neg", "pred_neg_true_pos", "both_neg", "agree"))]
            for r in cuts.itertuples()]
    return ["## Does the cut transfer? Predicted CCAS > cut against true CCAS > 0", "",
            markdown_table(["Measure", "images", "n", "cut", "true > 0", "pred > 0", "both > 0",
                            "pred > 0, true <= 0", "pred <= 0, true > 0", "both <= 0", "agree"], body), "",
            "Shares of the images. 'rest': the images not used to re-estimate the cut ([images] recut: the "
            "cut that best reproduces true CCAS > 0 on N images drawn with the seed), at cut 0 and at that cut.",
            ""]


def breakdown_markdown(table: pd.DataFrame) -> list[str]:
    md = []
    value_cols = [c for c in table.columns if c.startswith(("sc ", "agree "))]
    for col, sub in table.groupby("column", sort=False):
        body = [[r["group"], str(r["images"]), fmt(r["true_ccas_le0"], 3), fmt(r["mean_true_ccs"], 3),
                 *(fmt(r[c], 3) for c in value_cols)] for r in sub.to_dict("records")]
        md += [f"## Images by {col}", "",
               markdown_table([col, "images", "true CCAS <= 0", "mean true CCS",
                               *(f"SC {c[3:]}" if c.startswith("sc ") else f"cut agreement {c[6:]}"
                                 for c in value_cols)], body), ""]
    return md + ["SC per group: Spearman of each measure with its true value within the group (point estimates); "
                 "cut agreement: share of the group where predicted CCAS > 0 agrees with true CCAS > 0.", ""]
