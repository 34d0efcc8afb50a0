"""explain.py's figures: degradation curves, subject histogram, attribution grid (PNG, written atomically)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 90) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_sweeps(summary: pd.DataFrame, outdir: Path) -> dict[str, Path]:
    """``sweeps_ccas.png`` and ``sweeps_ccs.png``: per degradation, mean (line) and 25-75 % band (shade) of
    the true and the predicted score against severity."""
    plt = _pyplot()
    kinds = list(dict.fromkeys(summary["degradation"]))
    cols = min(4, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    written = {}
    for score in ("ccas", "ccs"):
        fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.5 * rows), squeeze=False, sharey=True)
        for ax, kind in zip(axes.flat, kinds):
            part = summary[summary["degradation"] == kind].sort_values("severity")
            s = part["severity"].to_numpy()
            for col, label, color in ((score, "true", "tab:blue"), (f"pred_{score}", "predicted", "tab:orange")):
                ax.plot(s, part[f"{col}_mean"], marker="o", ms=3, color=color, label=label)
                ax.fill_between(s, part[f"{col}_q25"], part[f"{col}_q75"], color=color, alpha=0.2, lw=0)
            if score == "ccas":
                ax.axhline(0, color="k", lw=0.8, ls="--")
            ax.set_title(kind, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(kinds):]:
            ax.axis("off")
        for ax in axes[-1]:
            ax.set_xlabel("severity", fontsize=8)
        for ax in axes[:, 0]:
            ax.set_ylabel(score.upper(), fontsize=8)
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{score.upper()} under degradation: mean and 25-75 % band, true (encoder) vs predicted",
                     fontsize=10)
        fig.tight_layout()
        written[f"sweeps_{score}.png"] = _save(fig, outdir / f"sweeps_{score}.png")
    return written


def plot_subjects(subjects: pd.DataFrame, outdir: Path) -> dict[str, Path]:
    """``subjects_hist.png``: per identity, mean and min true CCS, mean true CCAS, share of images with CCAS > 0."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
    bins = np.linspace(min(subjects["min_ccs"].min(), subjects["mean_ccs"].min()), 1, 31)
    axes[0].hist(subjects["mean_ccs"], bins=bins, color="tab:blue", alpha=0.7, label="mean")
    axes[0].hist(subjects["min_ccs"], bins=bins, color="tab:red", alpha=0.5, label="min")
    axes[0].set_xlabel("true CCS of the identity's images")
    axes[0].legend(fontsize=7)
    axes[1].hist(subjects["mean_ccas"], bins=30, color="tab:purple")
    axes[1].axvline(0, color="k", lw=0.8, ls="--")
    axes[1].set_xlabel("mean true CCAS of the identity's images")
    axes[2].hist(subjects["frac_ccas_pos"], bins=np.linspace(0, 1, 11), color="tab:green")
    axes[2].set_xlabel("share of the identity's images with CCAS > 0")
    for ax in axes:
        ax.set_ylabel("identities")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(subjects)} identities", fontsize=10)
    fig.tight_layout()
    return {"subjects_hist.png": _save(fig, outdir / "subjects_hist.png")}


def _display(image: np.ndarray, aug: dict[str, Any]) -> np.ndarray:
    """A preprocessed [3, H, W] image back to [H, W, 3] in [0, 1]."""
    mean = np.asarray(aug["train_rgb_norm"], np.float32).reshape(3, 1, 1)
    std = np.broadcast_to(np.asarray(aug["test_rgb_std"], np.float32), (3,)).reshape(3, 1, 1)
    return np.clip(image * std + mean, 0, 1).transpose(1, 2, 0)


def plot_attribution(images: np.ndarray, ig: np.ndarray, occ: np.ndarray, table: pd.DataFrame,
                     aug: dict[str, Any], outdir: Path) -> dict[str, Path]:
    """``attribution.png``: one column per image (rows: image, integrated gradients, occlusion); red raises,
    blue lowers the predicted CCAS; scores in the titles."""
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n, 6.3), squeeze=False)
    for j in range(n):
        face = _display(images[j], aug)
        grey = face.mean(-1)
        r = table.iloc[j]
        axes[0, j].imshow(face)
        axes[0, j].set_title(f"true CCAS {r.true_ccas:.2f}\npred CCAS {r.pred_ccas:.2f}", fontsize=7)
        for i, (m, name) in enumerate(((ig[j], f"IG sum {r.ig_sum:+.2f}, f(x)-f(x') {r.pred_ccas - r.pred_ccas_baseline:+.2f}"), (occ[j], "occlusion")), 1):
            limit = float(np.percentile(np.abs(m), 99.5)) or 1.0  # pixel-level IG is sparse: clip the extremes
            axes[i, j].imshow(grey, cmap="gray")
            axes[i, j].imshow(m, cmap="bwr", vmin=-limit, vmax=limit, alpha=0.6)
            axes[i, j].set_title(name, fontsize=7)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("What raises (red) or lowers (blue) the predicted CCAS", fontsize=9)
    fig.tight_layout()
    return {"attribution.png": _save(fig, outdir / "attribution.png")}
