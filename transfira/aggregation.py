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
statistics, then all weighted segment sums in one ``embedding_bag`` call (rows grouped by
template, zero-weight rows left out, so NaN rows of skipped images are never read).
"""
from __future__ import annotations

import warnings
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
CHUNK_ROWS = 1 << 18  # rows per block when checking features for NaN and computing norms


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
    usable, norms = row_norms(features)
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
        _, weights, columns = image_weights(codes, k, usable, ccs, ccas, *VARIANTS[name], eps=eps)
        summary = base.copy()
        for column, values in columns.items():
            summary[column] = values
        summary["images_used"] = count(weights > 0).astype(np.int64)
        plans[name] = (weights, summary)
    columns = np.stack([w for w, _ in plans.values()], 1)
    if normalize:  # sum(w_i z_i / |z_i|): the normalization folded into the weights, no normalized copy
        columns = columns * np.where(usable, 1 / np.maximum(np.nan_to_num(norms), 1e-12), 0.0)[:, None]
    sums = segment_sums(features, codes, k, columns)
    written = n_usable > 0
    out = {}
    for (name, (weights, summary)), total in zip(plans.items(), sums):
        denom = np.where(written, count(weights), 1.0).astype(np.float32)  # > 0 wherever written (guards above)
        total /= denom[:, None]  # in place: no new K x D array
        out[name] = (np.asarray(ids)[written], total if written.all() else total[written], summary)
    return out


def row_norms(features: np.ndarray, chunk: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """``(finite [N] bool, L2 norms [N] float32)`` of the rows of ``features``, block by block.

    A row with NaN or inf anywhere has a non-finite norm (skipped images are NaN rows).
    """
    finite, norms = np.empty(len(features), bool), np.empty(len(features), np.float32)
    for start in range(0, len(features), chunk):
        block = _rows(features, start, start + chunk)
        norm = torch.linalg.vector_norm(block, dim=1)
        ok = norm.isfinite()
        if not ok.all():  # confirm exactly: squares of huge finite values can overflow
            ok[~ok] = block[~ok].isfinite().all(1)
        finite[start:start + len(block)], norms[start:start + len(block)] = ok.numpy(), norm.numpy()
    return finite, norms


def segment_sums(features: np.ndarray, codes: np.ndarray, k: int, weights: np.ndarray) -> np.ndarray:
    """``out[v, t] = sum of weights[i, v] * z_i over the rows i of template t`` -> [V, K, D] float32.

    Rows with weight 0 are not read at all (skipped images' NaN rows must have weight 0).
    One ``embedding_bag`` call: bag ``v * K + t`` lists the rows of template ``t`` with a
    nonzero weight in column ``v``; it reads those rows and sums them weighted, without
    scattered writes or a weighted copy of the features.
    """
    n, v = weights.shape
    order = np.argsort(codes, kind="stable")  # rows grouped by template, in row order within each
    rows, bags, sample_weights = [], [], []
    for j in range(v):
        picked = order[weights[order, j] != 0]
        rows.append(picked)
        bags.append(np.bincount(codes[picked], minlength=k))
        sample_weights.append(weights[picked, j])
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(bags))[:-1]])
    table = _rows(features, 0, n)
    out = torch.nn.functional.embedding_bag(
        torch.from_numpy(np.concatenate(rows).astype(np.int64)), table, torch.from_numpy(offsets.astype(np.int64)),
        mode="sum", per_sample_weights=torch.from_numpy(np.concatenate(sample_weights).astype(np.float32)))
    return out.numpy().reshape(v, k, features.shape[1])


def _rows(features: np.ndarray, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` as a float32 tensor for reading; no copy of float32 arrays or memmaps."""
    block = np.asarray(features[start:stop])
    if block.dtype != np.float32 or not block.flags.c_contiguous:
        return torch.tensor(block, dtype=torch.float32)
    with warnings.catch_warnings():  # read-only memmaps are fine: the tensor is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(block)


# --- per-image weights of a variant, and IJB media pooling -----------------------------------------

def image_weights(codes: np.ndarray, k: int, usable: np.ndarray, ccs: np.ndarray | None, ccas: np.ndarray | None,
                  use_filter: bool, use_weight: bool, eps: float = WEIGHT_EPS) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-image ``(keep [N] bool, weight [N] float64, summary columns)`` of one variant, as in
    :func:`aggregate_variants`: the CCAS > 0 filter with the all-images fallback per template, then
    CCS weights clamped at 0 with the unweighted fallback per template (sum <= ``eps``)."""
    count = lambda mask: np.bincount(codes, weights=mask, minlength=k)  # noqa: E731
    n_usable = count(usable)
    columns: dict[str, np.ndarray] = {}
    keep = usable
    if use_filter:
        passed = usable & (np.nan_to_num(ccas) > 0)
        n_passed = count(passed).astype(np.int64)
        fallback = (n_passed == 0) & (n_usable > 0)
        keep = passed | (usable & fallback[codes])
        columns.update(images_kept=n_passed, filter_fallback=fallback)
    weights = keep.astype(np.float64)
    if use_weight:
        clamped = np.where(keep, np.clip(np.nan_to_num(ccs), 0, None), 0.0)
        weight_sum = count(clamped)
        fallback = (weight_sum <= eps) & (count(keep) > 0)
        weights = np.where(fallback[codes], weights, clamped)
        columns.update(weight_sum=weight_sum, weight_fallback=fallback)
    return keep, weights, columns


def aggregate_media_variants(features: np.ndarray, template_ids: Any, media_ids: Any | None,
                             ccs: np.ndarray | None, ccas: np.ndarray | None, variants: list[str],
                             normalize: bool = False, eps: float = WEIGHT_EPS,
                             image_scale: np.ndarray | None = None) -> dict[str, Templates]:
    """Templates with IJB's media rule: images of one media are pooled first, then the media.

    Composition, per template ``t`` and variant:

    1. The filter and the weights act on images exactly as in :func:`aggregate_variants`:
       images with predicted CCAS <= 0 are dropped (all kept when none of ``t`` passes), and
       the kept images get ``w_i = max(CCS_i, 0)`` (all 1 when ``t``'s sum is <= ``eps``;
       ``w_i = 1`` without weights).
    2. Media vector: the ``w``-weighted mean of its kept images, ``v_m = sum w_i s_i z_i / sum w_i``,
       with ``s_i`` = ``image_scale`` (the detector score; 1 when None) scaling the feature
       (InsightFace's detector-score mode multiplies the feature, not the weight).
    3. Media weight ``W_m`` = the mean weight of its kept images (1 without weights): a
       10-frame video counts like one still of the same recognizability. A media whose kept
       images all weigh 0, or with no kept image, drops out.
    4. Template vector ``sum W_m v_m / sum W_m``. Together: image ``i`` of media ``m`` enters
       with coefficient ``w_i s_i / n_m / sum_m' W_m'``, ``n_m`` = kept images of ``m``.

    ``media_ids`` None makes each image its own media: then this equals
    :func:`aggregate_variants` (with ``image_scale`` None). Media are grouped within a template
    (the same media id in two templates is two media). Summary columns as there plus ``media``
    (with a usable image) and ``media_used`` (weight > 0).
    """
    n = len(features)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    codes, ids = pd.factorize(np.asarray(template_ids), sort=True)
    if len(codes) != n or (codes < 0).any():
        raise ValueError(f"template ids must be {n} non-missing values")
    k = len(ids)
    if media_ids is None:
        groups = np.arange(n)
    else:
        media = np.asarray(media_ids)
        if len(media) != n or pd.isna(media).any():
            raise ValueError(f"media ids must be {n} non-missing values")
        media_codes = pd.factorize(media)[0].astype(np.int64)
        groups = pd.factorize(codes * (int(media_codes.max()) + 1) + media_codes)[0]  # one code per (template, media)
    g = int(groups.max()) + 1 if n else 0
    usable, norms = row_norms(features)
    for scores, what in ((ccs, "ccs"), (ccas, "ccas"), (image_scale, "image_scale")):
        if scores is not None:
            if len(scores) != n:
                raise ValueError(f"{len(scores)} {what} values for {n} feature rows")
            usable &= np.isfinite(scores)
    for name in variants:
        use_filter, use_weight = VARIANTS[name]
        if (use_filter and ccas is None) or (use_weight and ccs is None):
            raise ValueError(f"variant {name} needs predicted {'ccas' if use_filter and ccas is None else 'ccs'}")
    count = lambda mask: np.bincount(codes, weights=mask, minlength=k)  # noqa: E731
    group_template = np.zeros(g, np.int64)
    group_template[groups] = codes
    media_count = lambda mask: np.bincount(group_template, weights=np.bincount(groups, weights=mask, minlength=g) > 0,
                                           minlength=k).astype(np.int64)  # noqa: E731
    n_usable = count(usable).astype(np.int64)
    base = pd.DataFrame({"template_id": ids, "images": np.bincount(codes, minlength=k), "images_usable": n_usable,
                         "media": media_count(usable)})
    columns, summaries = [], {}
    for name in variants:
        keep, weights, extra = image_weights(codes, k, usable, ccs, ccas, *VARIANTS[name], eps)
        kept_in_media = np.bincount(groups, weights=keep, minlength=g)
        coef = np.where(keep, weights / np.maximum(kept_in_media, 1)[groups], 0.0)  # w_i / n_m
        summary = base.assign(**extra, images_used=count(coef > 0).astype(np.int64), media_used=media_count(coef > 0))
        summaries[name] = (summary, count(coef))
        columns.append(coef)
    columns = np.stack(columns, 1)
    if image_scale is not None:
        columns = columns * np.where(usable, np.nan_to_num(np.asarray(image_scale, np.float64)), 0.0)[:, None]
    if normalize:
        columns = columns * np.where(usable, 1 / np.maximum(np.nan_to_num(norms), 1e-12), 0.0)[:, None]
    sums = segment_sums(features, codes, k, columns)
    written = n_usable > 0
    out = {}
    for (name, (summary, denom)), total in zip(summaries.items(), sums):
        total /= np.where(written, denom, 1.0).astype(np.float32)[:, None]
        out[name] = (np.asarray(ids)[written], total if written.all() else total[written], summary)
    return out
