"""Building blocks of predictor training (paper section III-B, eq. 9); train.py's job is
:mod:`transfira.jobs.train`.

Ridge heads (the ``head_init = "ridge"`` start, and the whole zero-epoch predictor), labels made
online for freshly degraded images (``[degrade]``), the validation pass, and the per-batch
agreement over ranks (:func:`each_batch`, :func:`bad_images`).
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from . import distributed as dist_utils
from .data import ImageDataset, make_loader
from .errors import TransfiraError, describe
from .evaluation import spearman
from .io import load_id_vectors
from .labels import batch_center_similarities
from .model import RecognizabilityPredictionNetwork, head_features
from .progress import log, progress

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class OnlineLabels:
    """CCS / NNCCS / CCAS (eq. 4-6) of the frames the predictor sees, measured by the frozen deployed
    encoder against fixed class centers (``train.py [degrade]``).

    With a frozen predictor backbone (the deployed encoder itself) the labels come from the same
    pass that feeds the heads; end to end, ``encoder`` is a separate frozen copy (one extra forward,
    no backward)."""

    def __init__(self, cfg: dict[str, Any], device: torch.device, encoder: nn.Module | None):
        path = cfg["degrade"]["centers_path"]
        self.center_ids, centers = load_id_vectors(path)
        if centers.ndim != 2 or centers.shape[1] != cfg["embedding_size"]:
            raise TransfiraError(f"{path}: centers have shape {centers.shape}, expected [C, {cfg['embedding_size']}]")
        if len(self.center_ids) < 2:
            raise TransfiraError(f"{path}: NNCCS needs at least two class centers, found {len(self.center_ids)}")
        self.unit_centers = nn.functional.normalize(torch.from_numpy(np.asarray(centers, np.float32)), dim=1).to(device)
        self.encoder = encoder

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, classes: torch.Tensor, features: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(targets [B, 2] = (CCS, CCAS), nnccs [B])``; ``features``: the deployed encoder's
        embeddings of ``images`` when already computed."""
        if features is None:
            features = self.encoder(images)
        ccs, nnccs = batch_center_similarities(features.flatten(1).float(), classes.to(features.device),
                                               self.unit_centers)
        return torch.stack([ccs, ccs - nnccs], 1), nnccs


def ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, l2: float) -> torch.Tensor:
    """``[D + 1, K]`` ridge weights (last row: bias) from the sufficient statistics of X = [z, 1]:
    ``(X^T X + l2 * sum|z|^2 * I) w = X^T y``, i.e. l2 * N * mean squared norm, bias unpenalized."""
    dim = xtx.shape[0] - 1
    penalty = l2 * xtx.diagonal()[:dim].sum()
    return torch.linalg.solve(xtx + torch.diag(torch.cat([penalty.repeat(dim), penalty.new_zeros(1)])), xty)


def ridge_fit(features: np.ndarray, targets: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """:func:`ridge_solve` on features held in memory (float64): the heads ``head_init = "ridge"``
    computes, from cached features instead of a pass over the images."""
    x = torch.from_numpy(np.c_[np.asarray(features, np.float64), np.ones(len(features))])
    return ridge_solve(x.T @ x, x.T @ torch.from_numpy(np.asarray(targets, np.float64)), l2).numpy()


@torch.inference_mode()
def ridge_init_heads(model: RecognizabilityPredictionNetwork, dataset: ImageDataset, batch_size: int,
                     num_workers: int, info: dist_utils.DistInfo, l2: float = 1e-3, policy: str = "skip",
                     labels: OnlineLabels | None = None) -> None:
    """Start the linear heads at the ridge regression of (CCS, CCAS) on the encoder's features.

    Xavier-initialized heads on raw embeddings (norm ~20-70) start with outputs far outside
    [-1, 1]; short runs then spend their steps on that scale. One pass over the training
    images (eval mode, no gradients) accumulates X^T X and X^T y in float64, summed over
    processes, and solves ``(X^T X + l2 * mean|z|^2 * N * I) w = X^T y`` (bias unpenalized).
    Unreadable images are left out (``policy = "skip"``) or stop every rank naming them
    (``"error"``); an exception on any rank stops all of them (:func:`dist_utils.raise_agreed`).
    The regression is on what the heads see (:func:`~transfira.model.head_features`); with
    ``labels`` (``[degrade]``) the targets are the online labels of the current epoch's frames.
    """
    sampler = torch.utils.data.DistributedSampler(dataset, info.world_size, info.rank, shuffle=False)
    loader = make_loader(dataset, batch_size, num_workers, sampler=sampler, persistent=False, device=info.device)
    was_training = model.backbone.training
    model.backbone.eval()
    dim = model.ccs_layer.in_features
    xtx = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=info.device)
    xty = torch.zeros(dim + 1, 2, dtype=torch.float64, device=info.device)
    skipped = 0

    def accumulate(batch: dict[str, Any]) -> str | None:
        nonlocal skipped
        keep, error = bad_images(batch, policy)
        if error is None:
            skipped += int((~keep).sum())
            z = model.backbone(batch["image"][keep].to(info.device)).flatten(1)
            targets = batch["target"][keep] if labels is None else labels(None, batch["class"][keep], z)[0]
            z = head_features(z.float(), model.head_input).double()
            x = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype, device=z.device)], 1)
            xtx.add_(x.T @ x)
            xty.add_(x.T @ targets.to(info.device).double())
        return error

    each_batch(loader, "ridge head init", accumulate, disable=not info.is_main)
    for total in (xtx, xty):
        dist_utils.all_reduce_sum(total)
    n = xtx[dim, dim]
    solution = ridge_solve(xtx, xty, l2)
    for k, head in enumerate((model.ccs_layer, model.ccas_layer)):
        head.weight.copy_(solution[:dim, k].to(head.weight.dtype)[None])
        head.bias.copy_(solution[dim, k].to(head.bias.dtype)[None])
    model.backbone.train(was_training)
    skipped = int(dist_utils.agree(skipped)[0])
    log(f"heads initialized by ridge regression on {int(n)} training images' features"
        + (f" ({skipped} unreadable images skipped)" if skipped else ""))


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """MAE, Pearson and Spearman correlation of ``pred`` against ``target`` (NaN when undefined)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    out = {"mae": float(np.abs(pred - target).mean()), "pearson": math.nan, "spearman": math.nan}
    if len(pred) > 1 and pred.std() > 0 and target.std() > 0:
        out["pearson"] = float(np.corrcoef(pred, target)[0, 1])
        out["spearman"] = spearman(pred, target)
    return out


class SkipSampler(torch.utils.data.Sampler):
    """The indices of ``sampler`` without the first ``skip`` (mid-epoch resume)."""

    def __init__(self, sampler: torch.utils.data.Sampler, skip: int = 0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def bad_images(batch: dict[str, Any], policy: str) -> tuple[torch.Tensor, str | None]:
    """``(keep, error)``: the rows whose image decoded, and with ``policy = "error"`` a message
    naming the unreadable files of the batch (None when every image decoded or they are skipped)."""
    ok = batch["ok"].bool()
    if policy == "error" and not bool(ok.all()):
        bad = [e for e, good in zip(batch["error"], ok.tolist()) if not good]
        return ok, (f"cannot read image{'s' if len(bad) > 1 else ''} {'; '.join(bad)} "
                    "(set on_bad_image = 'skip' to leave such images out)")
    return ok, None


def each_batch(loader, what: str, body, disable: bool = False) -> None:
    """Run ``body(batch)`` (returning None or an error message) on every batch of ``loader``.

    After each batch every rank agrees (:func:`dist_utils.raise_agreed`): an unreadable image
    or an exception while loading or in ``body`` on any rank stops all ranks with one message.
    Ranks must hold equally many batches (DistributedSampler pads the shards to make it so).
    """
    with progress(total=len(loader), desc=what, leave=False, disable=disable) as shown:
        it = iter(loader)
        for _ in range(len(loader)):
            try:
                error = body(next(it))
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                error = describe(err)
            dist_utils.raise_agreed(error, what)
            shown.update(1)


def autocast_for(device: torch.device, amp: str):
    """``torch.autocast`` on CUDA with the ``amp`` dtype ("bf16", "fp16"); a no-op for "none"."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def validation_pass(model: nn.Module, loader, dataset: ImageDataset, info: dist_utils.DistInfo, amp: str = "none",
             policy: str = "error") -> dict[str, float]:
    """CCS and CCAS MAE, Pearson, Spearman over the whole validation set, computed once.

    Each rank predicts its shard; predictions are gathered with their dataset indices and
    de-duplicated (DistributedSampler pads shards), so every image counts exactly once.
    Every batch ends with an agreement, so an unreadable image (``policy = "error"``) or an
    exception on any rank stops all ranks with one message. Returns the metrics on every
    rank (``{"ccs_mae": ..., "ccas_spearman": ..., "skipped": unreadable images left out}``).
    """
    was_training = model.training
    model.eval()
    rows = []

    def predict(batch: dict[str, Any]) -> str | None:
        keep, error = bad_images(batch, policy)
        if error is None:
            with autocast_for(info.device, amp):
                ccs, ccas = model(batch["image"].to(info.device, non_blocking=True))
            rows.append(torch.stack([batch["index"].to(info.device).double(), ccs[:, 0].double(),
                                     ccas[:, 0].double(), keep.to(info.device).double()], 1))
        return error

    try:
        each_batch(loader, "validation", predict, disable=not info.is_main)
    finally:
        model.train(was_training)
    local = torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.float64, device=info.device)
    table = dist_utils.all_gather_cat(local).cpu().numpy()
    index, first = np.unique(table[:, 0].astype(np.int64), return_index=True)
    table = table[first]
    skipped = int((table[:, 3] == 0).sum())
    table = table[table[:, 3] > 0]
    targets = dataset.targets.numpy()[table[:, 0].astype(np.int64)]
    metrics: dict[str, float] = {}
    for j, name in enumerate(("ccs", "ccas")):
        for key, value in regression_metrics(table[:, 1 + j], targets[:, j]).items():
            metrics[f"{name}_{key}"] = value
    metrics["skipped"] = skipped
    return metrics


# ---------------------------------------------------------------- run directory and resume state


# ---------------------------------------------------------------- the training job


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG's state; CUDA's only for a CUDA run (reading it would open contexts on every GPU)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached": float(cached)}, "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
