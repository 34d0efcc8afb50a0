"""Attribution maps of predicted CCAS: which pixels raise or lower the predictor's recognizability score.

* :func:`integrated_gradients` (Sundararajan et al. 2017) from a blurred copy of the image:
  ``IG_i = (x_i - x'_i) * mean_k d f(x' + a_k (x - x')) / d x_i`` with midpoint steps
  ``a_k = (k + 1/2) / m``, all ``m`` steps in batches; completeness: ``sum_i IG_i ~ f(x) - f(x')``.
* :func:`occlusion_map`: the drop ``f(x) - f(x with a patch replaced by the blurred copy)`` of
  every sliding patch (batched), averaged over the patches covering each pixel.
* :func:`region_drops`: the sanity check that the patch with the largest attribution lowers
  the score more than random patches of the same size.

``f`` maps a batch of preprocessed images [B, 3, H, W] to a score [B] (here the predicted CCAS).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from .io import save_csv
from .progress import progress

Score = Callable[[torch.Tensor], torch.Tensor]


def ccas_score(predictor: nn.Module) -> Score:
    """The predictor's CCAS output as a [B] score."""
    return lambda images: predictor(images)[1].reshape(len(images))


def blurred(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a [3, H, W] (or [B, 3, H, W]) tensor with ``sigma`` pixels (reflected borders)."""
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, min(image.shape[-2:]) - 1)
    return gaussian_blur(image, [2 * radius + 1] * 2, [sigma, sigma])


@torch.no_grad()
def scores(f: Score, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``f`` over a stack of images in batches."""
    return torch.cat([f(images[i:i + batch_size]).detach() for i in range(0, len(images), batch_size)])


def integrated_gradients(f: Score, image: torch.Tensor, baseline: torch.Tensor, steps: int = 32,
                         batch_size: int = 32) -> tuple[torch.Tensor, float, float]:
    """IG attributions [3, H, W] of ``f`` at ``image`` from ``baseline``, and ``f(image)``, ``f(baseline)``."""
    alphas = (torch.arange(steps, dtype=image.dtype, device=image.device) + 0.5) / steps
    delta = image - baseline
    total = torch.zeros_like(image)
    for start in range(0, steps, batch_size):
        a = alphas[start:start + batch_size].view(-1, 1, 1, 1)
        path = (baseline + a * delta).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(f(path).sum(), path)
        total += grad.sum(0)
    ends = scores(f, torch.stack([image, baseline]), 2)
    return delta * total / steps, float(ends[0]), float(ends[1])


def patch_corners(height: int, width: int, patch: int, stride: int) -> np.ndarray:
    """Top-left corners [P, 2] (y, x) of sliding ``patch`` squares every ``stride`` pixels, the last flush
    with the border."""
    axis = lambda n: np.unique(np.r_[np.arange(0, n - patch + 1, stride), n - patch])  # noqa: E731
    ys, xs = axis(height), axis(width)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def occluded(image: torch.Tensor, fill: torch.Tensor, corners: np.ndarray, patch: int) -> torch.Tensor:
    """Copies [P, 3, H, W] of ``image`` with the square at each corner replaced by ``fill``."""
    masks = torch.zeros(len(corners), 1, *image.shape[-2:], dtype=image.dtype, device=image.device)
    for k, (y, x) in enumerate(corners):
        masks[k, :, y:y + patch, x:x + patch] = 1
    return image * (1 - masks) + fill * masks


def occlusion_map(f: Score, image: torch.Tensor, fill: torch.Tensor, patch: int = 16, stride: int = 8,
                  batch_size: int = 32) -> tuple[torch.Tensor, float]:
    """Mean score drop [H, W] when a ``patch`` square covering the pixel is replaced by ``fill``; and ``f(image)``."""
    corners = patch_corners(*image.shape[-2:], patch, stride)
    reference = float(scores(f, image[None], 1)[0])
    drops = torch.cat([reference - scores(f, occluded(image, fill, corners[i:i + batch_size], patch), batch_size)
                       for i in range(0, len(corners), batch_size)])
    total = torch.zeros(image.shape[-2:], dtype=image.dtype, device=image.device)
    cover = torch.zeros_like(total)
    for (y, x), drop in zip(corners, drops):
        total[y:y + patch, x:x + patch] += drop
        cover[y:y + patch, x:x + patch] += 1
    return total / cover, reference


def top_corner(attribution: torch.Tensor, patch: int) -> tuple[int, int]:
    """Top-left corner of the ``patch`` square with the largest summed attribution ([H, W] map)."""
    sums = F.avg_pool2d(attribution[None, None], patch, stride=1)[0, 0]
    y, x = divmod(int(sums.argmax()), sums.shape[1])
    return y, x


def region_drops(f: Score, image: torch.Tensor, fill: torch.Tensor, attribution: torch.Tensor, patch: int,
                 n_random: int = 16, seed: int = 0) -> tuple[float, float]:
    """Score drop when occluding the most-attributed ``patch`` square, and the mean drop over ``n_random``
    uniformly placed squares of the same size."""
    h, w = image.shape[-2:]
    rng = np.random.default_rng(seed)
    corners = np.stack([rng.integers(0, h - patch + 1, n_random), rng.integers(0, w - patch + 1, n_random)], 1)
    corners = np.concatenate([np.array([top_corner(attribution, patch)]), corners])
    values = scores(f, torch.cat([image[None], occluded(image, fill, corners, patch)]), len(corners) + 1)
    drops = values[0] - values[1:]
    return float(drops[0]), float(drops[1:].mean())


def run_attribution(predictor: nn.Module, dataset, rows: np.ndarray, true_ccas: np.ndarray, acfg: dict[str, Any],
                    aug: dict[str, Any], outdir: Path, device) -> dict[str, Path]:
    """IG and occlusion maps of ``acfg['num_images']`` of ``rows`` spread over their true CCAS; writes
    ``attribution.csv``, ``attribution_maps.npz`` and the grid ``attribution.png``."""
    from .explain_plots import plot_attribution
    from .io import atomic_path

    order = np.argsort(true_ccas, kind="stable")
    pick = order[np.unique(np.round(np.linspace(0, len(order) - 1, min(acfg["num_images"], len(order)))).astype(int))]
    f = ccas_score(predictor.eval())
    maps_ig, maps_occ, images, records = [], [], [], []
    for k in progress(pick, desc="attribution maps", unit="img"):
        item = dataset[int(rows[k])]
        x = item["image"].to(device)
        base = blurred(x, acfg["baseline_sigma"])
        ig, fx, fb = integrated_gradients(f, x, base, acfg["ig_steps"], acfg["batch_size"])
        ig_map = ig.sum(0)
        occ, _ = occlusion_map(f, x, base, acfg["patch"], acfg["stride"], acfg["batch_size"])
        top, rand = region_drops(f, x, base, ig_map, acfg["patch"], seed=int(k))
        maps_ig.append(ig_map.cpu().numpy())
        maps_occ.append(occ.cpu().numpy())
        images.append(x.cpu().numpy())
        records.append({"path": dataset.paths[int(rows[k])], "true_ccas": float(true_ccas[k]), "pred_ccas": fx,
                        "pred_ccas_baseline": fb, "ig_sum": float(ig.sum()), "completeness_gap": float(ig.sum()) - (fx - fb),
                        "top_region_drop": top, "random_region_drop": rand})
    table = pd.DataFrame(records)
    written = {"attribution.csv": outdir / "attribution.csv", "attribution_maps.npz": outdir / "attribution_maps.npz"}
    save_csv(table, written["attribution.csv"])
    with atomic_path(written["attribution_maps.npz"]) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, integrated_gradients=np.stack(maps_ig), occlusion=np.stack(maps_occ),
                 paths=table["path"].to_numpy(str))
    written.update(plot_attribution(np.stack(images), np.stack(maps_ig), np.stack(maps_occ), table, aug, outdir))
    return written
