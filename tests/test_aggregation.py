"""Template aggregation against a plain float64 per-template loop (paper eq. 10 with the weight guard)."""
from __future__ import annotations

import numpy as np
import pytest

from transfira import aggregation as agg


def reference(features, tids, ccs, ccas, use_filter, use_weight, normalize=False, eps=agg.WEIGHT_EPS):
    """The reference's per-template mask loop in float64, plus the documented guards."""
    z = np.asarray(features, np.float64)
    if normalize:
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    out = {}
    for t in sorted(set(tids.tolist())):
        rows = np.flatnonzero((tids == t) & np.isfinite(z).all(1) & np.isfinite(ccs) & np.isfinite(ccas))
        if len(rows) == 0:
            continue
        if use_filter and (ccas[rows] > 0).any():
            rows = rows[ccas[rows] > 0]
        w = np.ones(len(rows))
        if use_weight:
            w = np.clip(ccs[rows].astype(np.float64), 0, None)
            if w.sum() <= eps:
                w = np.ones(len(rows))
        out[t] = (w[:, None] * z[rows]).sum(0) / w.sum()
    return out


def make_data(seed=0, n=400, d=16, k=37):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.5, 3, (n, 1)).astype(np.float32)
    tids = rng.integers(0, k, n) * 7 + 100
    ccs = rng.uniform(-0.2, 1, n).astype(np.float32)
    ccas = rng.uniform(-0.5, 0.5, n).astype(np.float32)
    ccas[tids == tids[0]] = -0.1  # every image of this template fails the filter
    ccs[tids == tids[1]] = -0.3  # negative CCS: weight sum 0
    ccs[tids == tids[2]] = 0.0
    return features, tids, ccs, ccas


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("name", list(agg.VARIANTS))
def test_matches_loop(name, normalize):
    features, tids, ccs, ccas = make_data()
    use_filter, use_weight = agg.VARIANTS[name]
    ids, vectors, summary = agg.aggregate_templates(features, tids, ccs, ccas, use_filter, use_weight, normalize)
    ref = reference(features, tids, ccs, ccas, use_filter, use_weight, normalize)
    assert ids.tolist() == sorted(ref)
    np.testing.assert_allclose(vectors, np.stack([ref[t] for t in ids.tolist()]), rtol=1e-5, atol=1e-6)
    assert vectors.dtype == np.float32
    by_id = summary.set_index("template_id")
    if use_filter:
        assert bool(by_id.loc[tids[0], "filter_fallback"]) and by_id.loc[tids[0], "images_kept"] == 0
        assert by_id["filter_fallback"].sum() == sum(not (ccas[tids == t] > 0).any() for t in set(tids.tolist()))
    if use_weight:
        assert bool(by_id.loc[tids[1], "weight_fallback"]) and by_id.loc[tids[1], "weight_sum"] == 0
        assert bool(by_id.loc[tids[2], "weight_fallback"])


def test_all_variants_one_pass_equals_single_calls():
    features, tids, ccs, ccas = make_data(1)
    both = agg.all_variants(features, tids, ccs, ccas)
    assert list(both) == list(agg.VARIANTS)
    for name, (use_filter, use_weight) in agg.VARIANTS.items():
        ids, vectors, summary = agg.aggregate_templates(features, tids, ccs, ccas, use_filter, use_weight)
        np.testing.assert_array_equal(both[name][0], ids)
        np.testing.assert_allclose(both[name][1], vectors, rtol=1e-6, atol=1e-7)
        assert both[name][2].equals(summary)


def test_small_chunks_and_readonly_memmap(tmp_path):
    features, tids, ccs, ccas = make_data(2)
    np.save(tmp_path / "f.npy", features)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    ids, vectors, _ = agg.aggregate_templates(features, tids, ccs, ccas, True, True)
    ids2, vectors2, _ = agg.aggregate_templates(mm, tids, ccs, ccas, True, True)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(vectors, vectors2, rtol=1e-6)
    finite, norms = agg.row_norms(mm, chunk=64)
    assert finite.all()
    np.testing.assert_allclose(norms, np.linalg.norm(features, axis=1), rtol=1e-5)
    features[3, 1] = np.inf
    assert np.flatnonzero(~agg.row_norms(features, chunk=64)[0]).tolist() == [3]


def test_skipped_rows_are_left_out():
    features, tids, ccs, ccas = make_data(3)
    features[5] = np.nan
    ccs[6] = np.nan
    only = tids == tids[7]
    features[only] = np.nan  # a template whose images were all unreadable
    for use_filter, use_weight in agg.VARIANTS.values():
        ids, vectors, summary = agg.aggregate_templates(features, tids, ccs, ccas, use_filter, use_weight)
        ref = reference(features, tids, ccs, ccas, use_filter, use_weight)
        assert ids.tolist() == sorted(ref) and tids[7] not in ids
        assert np.isfinite(vectors).all()
        np.testing.assert_allclose(vectors, np.stack([ref[t] for t in ids.tolist()]), rtol=1e-5, atol=1e-6)
        row = summary.set_index("template_id").loc[tids[7]]
        assert row["images_usable"] == 0 and row["images_used"] == 0 and row["images"] == only.sum()


def test_rows_move_with_ids():
    """Shuffling rows (features, scores and ids together) gives the same templates."""
    features, tids, ccs, ccas = make_data(4)
    perm = np.random.default_rng(0).permutation(len(tids))
    a = agg.all_variants(features, tids, ccs, ccas)
    b = agg.all_variants(features[perm], tids[perm], ccs[perm], ccas[perm])
    for name in agg.VARIANTS:
        np.testing.assert_array_equal(a[name][0], b[name][0])
        np.testing.assert_allclose(a[name][1], b[name][1], rtol=1e-5, atol=1e-6)


def test_string_ids_and_guards():
    features = np.array([[1, 0], [0, 1], [3, 3], [1, 1]], np.float32)
    tids = np.array(["b", "a", "a", "c"], dtype=object)
    ccs = np.array([-1.0, 0.5, 0.25, 0.0], np.float32)
    ccas = np.array([-0.1, 0.2, -0.2, -0.3], np.float32)
    ids, vectors, summary = agg.aggregate_templates(features, tids, ccs, ccas, use_filter=True, use_weight=True)
    assert ids.tolist() == ["a", "b", "c"]
    np.testing.assert_allclose(vectors, [[0, 1], [1, 0], [1, 1]])  # a: only row 1 passes; b, c: fallbacks
    assert summary["filter_fallback"].tolist() == [False, True, True]
    assert summary["weight_fallback"].tolist() == [False, True, True]
    with pytest.raises(ValueError, match="ccs"):
        agg.aggregate_templates(features, tids, use_weight=True)
    with pytest.raises(ValueError, match="3 template ids for 4"):
        agg.aggregate_templates(features, tids[:3])
