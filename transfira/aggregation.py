"""Recognizability-informed template aggregation (paper section III-C, eq. 10).

A template is the set of images sharing a template id. Its vector is a weighted mean of
the images' features ``z_i`` from the deployed encoder; four variants:

- ``baseline``: plain mean.
- ``weight``: ``sum(w_i z_i) / sum(w_i)`` with ``w_i`` = predicted CCS (eq. 10).
- ``filter``: mean over the images with predicted CCAS > 0 (closer to their own class
  center than to any impostor's). If no image of a template passes, all are kept
  (``filter_fallback``).
- ``filter_weight``: both.

Weight guard: predicted CCS can be <= 0, and the reference then divides by a sum that can
be zero or negative (flipping or blowing up the template). Here weights are clamped at 0
(an image predicted no closer to its center than orthogonal contributes nothing), and a
template whose clamped weight sum is <= ``eps`` gets the unweighted mean of its
(kept) images (``weight_fallback``). Where every predicted CCS is positive this equals
the reference exactly.

Rows with a non-finite feature or (given) score, i.e. images skipped as unreadable, are left out;
a template with no usable image is reported in the summary and left out of the output.
Everything is vectorized over all templates: per-row weights from ``bincount`` segment
statistics, then one pass of chunked ``index_add_`` segment sums over the features.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

WEIGHT_EPS = 1e-6  # a template whose clamped CCS sum is <= this gets the unweighted mean
VARIANTS: dict[str, tuple[bool, bool]] = {  # name -> (use_filter, use_weight)
    "baseline": (False, False),
    "weight": (False, True),
    "filter": (True, False),
    "filter_weight": (True, True),
}
CHUNK_ROWS = 1 << 17  # rows per index_add_ call: large calls are much faster than many small ones


def variant_name(use_filter: bool, use_weight: bool) -> str:
    """``baseline``, ``weight``, ``filter`` or ``filter_weight``."""
    return {v: k for k, v in VARIANTS.items()}[(bool(use_filter), bool(use_weight))]


Templates = tuple[np.ndarray, np.ndarray, pd.DataFrame]  # ids [K], vectors [K, D] float32, summary (one row per id)


def aggregate_templates(features: np.ndarray, template_ids: Any, ccs: np.ndarray | None = None,
                        ccas: np.ndarray | None = None, use_filter: bool = False, use_weight: bool = False,
                        normalize: bool = False, eps: float = WEIGHT_EPS) -> Templates:
    """One variant: ``(ids, vectors [K, D] float32, summary)`` (see the module docstring).

    ``features`` [N, D] (array or memmap), ``template_ids`` [N], ``ccs``/``ccas`` [N]
    predicted scores (needed by ``use_weight``/``use_filter``). ``normalize`` L2-normalizes
    each feature before aggregating. ``summary`` has one row per template id.
    """
    name = variant_name(use_filter, use_weight)
    return aggregate_variants(features, template_ids, ccs, ccas, [name], normalize, eps)[name]


def all_variants(features: np.ndarray, template_ids: Any, ccs: np.ndarray, ccas: np.ndarray,
                 normalize: bool = False, eps: float = WEIGHT_EPS) -> dict[str, Templates]:
    """All four variants from one pass over ``features``: ``{name: (ids, vectors, summary)}``."""
    return aggregate_variants(features, template_ids, ccs, ccas, list(VARIANTS), normalize, eps)


def aggregate_variants(features: np.ndarray, template_ids: Any, ccs: np.ndarray | None, ccas: np.ndarray | None,
                       variants: list[str], normalize: bool = False,
                       eps: float = WEIGHT_EPS) -> dict[str, Templates]:
    """The named ``variants`` (keys of :data:`VARIANTS`) from one pass over ``features``."""
    n = len(features)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    codes, ids = pd.factorize(np.asarray(template_ids), sort=True)
    if len(codes) != n:
        raise ValueError(f"{len(codes)} template ids for {n} feature rows")
    if (codes < 0).any():
        raise ValueError("template ids contain missing values")
    k = len(ids)
    needs_ccs = any(VARIANTS[v][1] for v in variants)
    needs_ccas = any(VARIANTS[v][0] for v in variants)
    usable = finite_rows(features)
    for scores, needed, what in ((ccs, needs_ccs, "ccs"), (ccas, needs_ccas, "ccas")):
        if scores is None:
            if needed:
                raise ValueError(f"predicted {what} is needed for variant(s) {', '.join(variants)}")
            continue
        if len(scores) != n:
            raise ValueError(f"{len(scores)} {what} values for {n} feature rows")
        usable &= np.isfinite(scores)  # any given score, needed or not: all variants use the same rows
    count = lambda mask: np.bincount(codes, weights=mask, minlength=k)  # per-template sums
    images = np.bincount(codes, minlength=k)
    n_usable = count(usable).astype(np.int64)
    base = pd.DataFrame({"template_id": ids, "images": images, "images_usable": n_usable})
    plans = {}
    for name in variants:
        use_filter, use_weight = VARIANTS[name]
        summary = base.copy()
        keep = usable
        if use_filter:
            passed = usable & (np.nan_to_num(ccas) > 0)
            n_passed = count(passed).astype(np.int64)
            fallback = (n_passed == 0) & (n_usable > 0)
            keep = passed | (usable & fallback[codes])
            summary["images_kept"] = n_passed
            summary["filter_fallback"] = fallback
        weights = keep.astype(np.float64)
        if use_weight:
            clamped = np.where(keep, np.clip(np.nan_to_num(ccs), 0, None), 0.0)
            weight_sum = count(clamped)
            fallback = (weight_sum <= eps) & (count(keep) > 0)
            weights = np.where(fallback[codes], weights, clamped)
            summary["weight_sum"] = weight_sum
            summary["weight_fallback"] = fallback
        summary["images_used"] = count(weights > 0).astype(np.int64)
        plans[name] = (weights, summary)
    sums = segment_sums(features, codes, k, np.stack([w for w, _ in plans.values()], 1), usable, normalize)
    out = {}
    for (name, (weights, summary)), total in zip(plans.items(), sums):
        denom = count(weights)
        written = n_usable > 0
        vectors = (total[written] / denom[written, None]).astype(np.float32)
        out[name] = (np.asarray(ids)[written], vectors, summary)
    return out


def finite_rows(features: np.ndarray, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """Boolean [N]: rows of ``features`` without NaN or inf (checked chunk by chunk)."""
    ok = np.empty(len(features), bool)
    for start in range(0, len(features), chunk):
        block = _rows(features, start, start + chunk)
        row_ok = block.sum(1).isfinite()  # NaN/inf anywhere makes the row sum non-finite
        if not row_ok.all():  # confirm exactly (a sum of huge finite values can overflow)
            row_ok[~row_ok] = block[~row_ok].isfinite().all(1)
        ok[start:start + len(block)] = row_ok.numpy()
    return ok


def segment_sums(features: np.ndarray, codes: np.ndarray, k: int, weights: np.ndarray, usable: np.ndarray,
                 normalize: bool = False, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """``out[v, t] = sum over rows i of template t of weights[i, v] * z_i`` -> [V, K, D] float32.

    Rows not ``usable`` are zeroed first (their weight is 0, but NaN * 0 is NaN). With
    ``normalize`` each ``z_i`` is L2-normalized first. One ``index_add_`` per variant and
    chunk of rows; a weight column that is all ones skips the multiplication.
    """
    n, d = features.shape
    out = torch.zeros(weights.shape[1], k, d)
    buf = torch.empty(min(chunk, n), d)
    codes_t = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int64))
    weights_t = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        z = _rows(features, start, stop)
        bad = torch.from_numpy(~usable[start:stop])
        if bad.any():
            z = torch.where(bad[:, None], 0.0, z)
        if normalize:
            z = torch.nn.functional.normalize(z, dim=1)
        idx = codes_t[start:stop]
        for j, total in enumerate(out):
            w = weights_t[start:stop, j]
            total.index_add_(0, idx, z if bool((w == 1).all()) else torch.mul(z, w[:, None], out=buf[:stop - start]))
    return out.numpy()


def _rows(features: np.ndarray, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` as a float32 tensor (no copy for writable float32 arrays; memmaps are copied)."""
    block = np.asarray(features[start:stop])
    if block.dtype == np.float32 and block.flags.writeable and block.flags.c_contiguous:
        return torch.from_numpy(block)
    return torch.tensor(block, dtype=torch.float32)
