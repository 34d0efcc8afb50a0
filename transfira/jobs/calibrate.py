"""calibrate.py's job: fit a sigmoid calibrator on a labels CSV (or apply one), write the calibrated
labels, the metrics, the calibrator and the plots. The calibration itself is :mod:`transfira.calibration`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..calibration import (SCORE_COLUMNS, brier_score, calibrate_labels, calibration_metrics, fit_calibrator,
                           load_calibrator, read_scores, save_calibrator, stack_scores)
from ..io import read_annotations, save_csv, save_figure, save_json

LABELS_FILE = "calibrated_labels.csv"
METRICS_FILE = "calibration_metrics.json"
MODEL_FILE = "calibrator.json"
PLOT_FILES = ("raw_distributions.png", "calibrated_distributions.png", "reliability_curve.png")


def plot_calibration(frame: pd.DataFrame, outdir: str | Path) -> list[Path]:
    """Save raw / calibrated CCS-vs-NNCCS histograms and the reliability curve as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    outdir, written = Path(outdir), []

    def save(fig, name: str) -> None:
        save_figure(fig, outdir / name)
        written.append(outdir / name)

    for prefix, name, title in (("", PLOT_FILES[0], "Raw"), ("cal_", PLOT_FILES[1], "Calibrated")):
        cols = [c for c in SCORE_COLUMNS if prefix + c in frame.columns]
        bins = np.histogram_bin_edges(frame[[prefix + c for c in cols]].to_numpy().ravel(), 50)
        fig, ax = plt.subplots(figsize=(6, 4))
        for column in cols:
            ax.hist(frame[prefix + column], bins=bins, alpha=0.6, label=column.upper())
        ax.set(title=f"{title} score distributions", xlabel="score", ylabel="count")
        ax.legend()
        save(fig, name)
    if {"cal_ccs", "cal_nnccs"} <= set(frame.columns):
        probs, labels = stack_scores(frame["cal_ccs"], frame["cal_nnccs"])
        frac_pos, mean_pred = calibration_curve(labels, probs, n_bins=10)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([0, 1], [0, 1], "k--", label="perfectly calibrated")
        ax.plot(mean_pred, frac_pos, "o-", label="calibrated CCS/NNCCS")
        ax.set(title=f"Reliability (Brier {brier_score(probs, labels):.4f})",
               xlabel="mean predicted probability", ylabel="fraction of CCS (positives)")
        ax.legend()
        save(fig, PLOT_FILES[2])
    return written


def run(csv: str | Path, outdir: str | Path, model: str | Path | None = None,
                  plots: bool = True, folds: int = 5, seed: int | None = None) -> dict[str, Any]:
    """``calibrate.py``: fit on ``csv`` (or apply the calibrator JSON ``model``) and write outputs.

    Writes ``calibrated_labels.csv``, ``calibration_metrics.json``, ``calibrator.json`` (fit
    only) and the plots into ``outdir``. Labels and calibrator are computed before anything is
    written; the plots come last.
    Returns the metrics.
    """
    csv, outdir = Path(csv), Path(outdir)
    frame = read_annotations(csv, [])
    if model is None:
        params = fit_calibrator(read_scores(frame, "ccs", str(csv)),
                                read_scores(frame, "nnccs", str(csv)), folds, seed)
    else:
        params = load_calibrator(model)
    labels = calibrate_labels(frame, params, str(csv))
    metrics = {"mode": "fit" if model is None else "apply", "csv": str(csv),
               **({"model": str(model)} if model is not None else {}),
               **calibration_metrics(labels)}
    save_csv(labels, outdir / LABELS_FILE)
    if model is None:
        save_calibrator(params, outdir / MODEL_FILE)
    save_json(outdir / METRICS_FILE, metrics)
    if plots:
        plot_calibration(labels, outdir)
    return metrics
