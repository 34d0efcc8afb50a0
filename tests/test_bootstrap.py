"""transfira.bootstrap against explicit resampling (slow float64 numpy) and a coverage check."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from transfira import bootstrap as bs
from transfira import evaluation as ev

FMRS = [0.1, 0.02, 0.005]


def brute_tar(genuine, impostor, fmr):
    """SPEC section 6 on an explicit multiset: k-th highest impostor, genuine strictly above."""
    k = math.floor(round(fmr * len(impostor), 6))
    if k == 0:
        return math.nan
    thr = np.sort(impostor)[::-1][k - 1]
    return float(np.mean(np.asarray(genuine) > thr))


def explicit_all_vs_all(scores, subj, draws):
    """Build the resampled set (copies of the drawn subjects with all their templates) and compare
    all its pairs: same copy -> genuine, copies of different subjects -> impostor, two copies of
    one subject -> no pair. Returns (genuine, impostor) scores."""
    rows = np.concatenate([np.flatnonzero(subj == s) for s in draws])
    copy = np.concatenate([np.full((subj == s).sum(), k) for k, s in enumerate(draws)])
    i, j = np.triu_indices(len(rows), 1)
    s = scores[rows[i], rows[j]]
    same_copy = copy[i] == copy[j]
    other = subj[rows[i]] != subj[rows[j]]
    return s[same_copy], s[~same_copy & other]


def explicit_cross(scores, gsubj, psubj, draws):
    g = np.concatenate([np.flatnonzero(gsubj == s) for s in draws])
    gc = np.concatenate([np.full((gsubj == s).sum(), k) for k, s in enumerate(draws)])
    p = np.concatenate([np.flatnonzero(psubj == s) for s in draws])
    pc = np.concatenate([np.full((psubj == s).sum(), k) for k, s in enumerate(draws)])
    s = scores[g[:, None], p[None, :]]
    same_copy = gc[:, None] == pc[None, :]
    other = gsubj[g][:, None] != psubj[p][None, :]
    return s[same_copy], s[~same_copy & other]


def explicit_list(scores, ia, ib, genuine, unit, draws):
    """Each listed pair once per (copy of unit a, copy of unit b), the same copy when a and b share a unit."""
    gen, imp = [], []
    for a, b, g, sc in zip(ia, ib, genuine, scores):
        ca, cb = np.flatnonzero(draws == unit[a]), np.flatnonzero(draws == unit[b])
        n = len(ca) if unit[a] == unit[b] else len(ca) * len(cb)
        (gen if g else imp).extend([sc] * n)
    return np.array(gen), np.array(imp)


def cosine(x, y=None):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = xn if y is None else y / np.linalg.norm(y, axis=1, keepdims=True)
    return xn @ yn.T


def data(rng, n=90, n_subj=18, dim=6):
    centers = rng.normal(size=(n_subj, dim))
    subj = rng.integers(0, n_subj, n)
    return centers[subj] + 1.2 * rng.normal(size=(n, dim)), subj


@pytest.mark.parametrize("top_factor", [None, "small"])
def test_all_vs_all_matches_explicit_resampling(top_factor, monkeypatch):
    rng = np.random.default_rng(0)
    x, subj = data(rng)
    _, n_imp = ev.count_pairs(subj)
    k = bs.keep_top(FMRS, n_imp)
    if top_factor == "small":  # too few kept scores: detected, never a wrong threshold
        k = ev.k_needed(FMRS, n_imp)
    st = ev.all_vs_all_scores(x, subj, FMRS, 17, dtype=torch.float64, keep_top=k)
    units = np.unique(subj, return_inverse=True)[1]
    s_units = len(np.unique(subj))
    sample = bs.sample_of(st, units)
    draws = np.random.default_rng(5).integers(0, s_units, (40, s_units))
    counts = bs.counts_of(draws, s_units)
    np.testing.assert_array_equal(counts, bs.draw_counts(s_units, 40, 5))
    design = bs.all_design(units, s_units)
    if top_factor == "small":
        with pytest.raises(bs.NeedMoreImpostors):
            bs.replicate_tar(sample, design, counts, FMRS)
        return
    got = bs.replicate_tar(sample, design, counts, FMRS)
    np.testing.assert_array_equal(bs.replicate_thresholds(sample, design, counts, FMRS, block=7),
                                  bs.replicate_thresholds(sample, design, counts, FMRS))  # blocked scan
    scores = cosine(x)
    for r in range(len(draws)):
        gen, imp = explicit_all_vs_all(scores, units, draws[r])
        assert design.n_impostor(counts[r : r + 1])[0] == len(imp)
        np.testing.assert_allclose(got[r], [brute_tar(gen, imp, f) for f in FMRS], atol=1e-12)
    # all-ones counts give the point estimate
    ones = bs.replicate_tar(sample, design, np.ones((1, s_units), np.int32), FMRS)[0]
    np.testing.assert_allclose(ones, ev.tar_at_fmr(st.genuine, st.impostor_top, st.n_impostor, FMRS))


def test_gallery_probe_matches_explicit_resampling():
    rng = np.random.default_rng(1)
    x, gs = data(rng, 60)
    y, ps = data(np.random.default_rng(2), 50)
    st = ev.all_vs_all_scores(x, gs, FMRS, 16, probe_features=y, probe_subjects=ps, dtype=torch.float64,
                              keep_top=10**6)
    s_units = 18
    sample = bs.sample_of(st, gs, ps)
    draws = rng.integers(0, s_units, (30, s_units))
    counts = bs.counts_of(draws, s_units)
    design = bs.cross_design(gs, ps, s_units)
    got = bs.replicate_tar(sample, design, counts, FMRS)
    scores = cosine(x, y)
    for r in range(len(draws)):
        gen, imp = explicit_cross(scores, gs, ps, draws[r])
        assert design.n_impostor(counts[r : r + 1])[0] == len(imp)
        np.testing.assert_allclose(got[r], [brute_tar(gen, imp, f) for f in FMRS], atol=1e-12)


def test_pair_list_matches_explicit_resampling():
    rng = np.random.default_rng(3)
    x, subj = data(rng, 70)
    ia, ib = rng.integers(0, 70, 900), rng.integers(0, 70, 900)
    keep = ia != ib
    ia, ib = ia[keep], ib[keep]
    gen = subj[ia] == subj[ib]
    gen[:5] = False  # a few 'impostor' labels inside one subject: counted once per copy
    unit, n_units = bs.pair_units(70, ia[gen], ib[gen])
    chunks = [(ia[i : i + 100], ib[i : i + 100], gen[i : i + 100]) for i in range(0, len(ia), 100)]
    st = ev.pair_list_stats(x, chunks, int(gen.sum()), int((~gen).sum()), FMRS, keep_top=10**6,
                            dtype=torch.float64)
    scores = cosine(x)[ia, ib]
    np.testing.assert_allclose(np.sort(st.genuine), np.sort(scores[gen]), atol=1e-12)
    mat = bs.ImpostorMatrix(n_units)
    for a, b, g in chunks:
        mat.add(unit[a[~g]], unit[b[~g]])
    design = mat.design()
    sample = bs.sample_of(st, unit)
    draws = rng.integers(0, n_units, (25, n_units))
    counts = bs.counts_of(draws, n_units)
    got = bs.replicate_tar(sample, design, counts, FMRS)
    for r in range(len(draws)):
        g, imp = explicit_list(scores, ia, ib, gen, unit, draws[r])
        assert design.n_impostor(counts[r : r + 1])[0] == len(imp)
        np.testing.assert_allclose(got[r], [brute_tar(g, imp, f) for f in FMRS], atol=1e-12)


def test_pair_units_are_connected_components():
    unit, n = bs.pair_units(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert n == 3 and unit[0] == unit[1] == unit[2] and unit[4] == unit[5] and len({unit[0], unit[3], unit[4]}) == 3


def test_weighted_spearman_matches_explicit_repetition():
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 6, 40).astype(float), rng.normal(size=40)  # ties in x
    w = rng.integers(0, 4, (12, 40))
    got = bs.weighted_spearman(x, y, w)
    for r in range(12):
        want = scipy.stats.spearmanr(np.repeat(x, w[r]), np.repeat(y, w[r]))[0]
        assert math.isclose(got[r], want, abs_tol=1e-12)


def test_erc_areas_match_explicit_resampling():
    rng = np.random.default_rng(6)
    n, s_units = 80, 16
    unit = rng.integers(0, s_units, n)
    q = rng.integers(0, 12, n) / 12  # ties
    i, j = np.triu_indices(n, 1)
    same = unit[i] == unit[j]
    pairs = np.stack([i[same], j[same]], 1)
    gscore = rng.normal(size=len(pairs))
    erc = bs.ErcBootstrap(q, unit, pairs, unit[pairs[:, 0]])
    draws = rng.integers(0, s_units, (15, s_units))
    counts = bs.counts_of(draws, s_units)
    thr = rng.normal(size=15) * 0.3
    fnm = gscore[None, :] <= thr[:, None]
    got = erc.areas(counts, fnm, [0.2, 0.6])
    ones = erc.areas(np.ones((1, s_units)), (gscore <= 0.1)[None], [0.2, 0.6])[0]
    frac, fnmr = ev.erc_curve(q, pairs, gscore <= 0.1, 0.6)
    np.testing.assert_allclose(ones, [ev.erc_area(frac, fnmr, n, u) for u in (0.2, 0.6)], atol=1e-12)
    for r in range(15):  # explicit copies of images and of their genuine pairs
        rows = np.concatenate([np.flatnonzero(unit == s) for s in draws[r]])
        if len(rows) == 0:
            continue
        pos = {}
        for k, row in enumerate(rows):
            pos.setdefault(row, []).append(k)
        # copy c of image a pairs with copy c of image b: the k-th occurrences match up per drawn copy
        copy_of = np.concatenate([np.full((unit == s).sum(), c) for c, s in enumerate(draws[r])])
        where = {(row, c): k for k, (row, c) in enumerate(zip(rows, copy_of))}
        ep, ef = [], []
        for p, (a, b) in enumerate(pairs):
            for c in range(len(draws[r])):
                if (a, c) in where and (b, c) in where:
                    ep.append((where[a, c], where[b, c]))
                    ef.append(fnm[r, p])
        ep = np.array(ep).reshape(-1, 2)
        frac, fnmr = ev.erc_curve(q[rows], ep, np.array(ef, bool), 0.6)
        want = [ev.erc_area(frac, fnmr, len(rows), u) for u in (0.2, 0.6)]
        np.testing.assert_allclose(got[r], want, atol=1e-12)


def simulate(rng, n_subj=40, per=4, tau=0.6, sigma=0.8, m=2.0):
    """Scores with a subject effect on genuine pairs; impostors iid N(0, 1). True TAR at FMR f:
    P(N(m, tau^2 + sigma^2) > Phi^-1(1 - f))."""
    units = np.repeat(np.arange(n_subj), per)
    mu = m + tau * rng.normal(size=n_subj)
    n_gen_per = per * (per - 1) // 2
    gen_units = np.repeat(np.arange(n_subj), n_gen_per)
    genuine = mu[gen_units] + sigma * rng.normal(size=len(gen_units))
    i, j = np.triu_indices(len(units), 1)
    imp = units[i] != units[j]
    ui, uj = units[i][imp], units[j][imp]
    scores = rng.normal(size=len(ui))
    return units, genuine, gen_units, scores, np.stack([ui, uj], 1)


def coverage(trials, replicates, fmr=0.01, seed=0):
    rng = np.random.default_rng(seed)
    tau, sigma, m = 0.6, 0.8, 2.0
    truth = 1 - scipy.stats.norm.cdf((scipy.stats.norm.ppf(1 - fmr) - m) / math.hypot(tau, sigma))
    hits = 0
    for t in range(trials):
        units, genuine, gen_units, imp, imp_units = simulate(rng)
        n_units = units.max() + 1
        k = bs.keep_top([fmr], len(imp))
        top = np.argsort(-imp, kind="stable")[:k]
        sample = bs.PairSample(genuine, gen_units, imp[top], imp_units[top])
        counts = bs.draw_counts(n_units, replicates, seed=t)
        tar = bs.replicate_tar(sample, bs.all_design(units, n_units), counts, [fmr])
        lo, hi = bs.interval(tar)
        hits += lo[0] <= truth <= hi[0]
    return hits / trials


def test_interval_coverage_fast():
    """The 95 % interval covers the known true TAR in about 95 % of simulated evaluations."""
    cov = coverage(trials=150, replicates=200)
    assert 0.88 <= cov <= 0.99, cov


@pytest.mark.slow
def test_interval_coverage_slow():
    cov = coverage(trials=1000, replicates=1000, seed=1)
    assert 0.92 <= cov <= 0.975, cov


def test_impostor_matrix_dense_and_sparse_agree(monkeypatch):
    rng = np.random.default_rng(9)
    ua, ub = rng.integers(0, 30, 500), rng.integers(0, 30, 500)
    counts = rng.integers(0, 3, (7, 30))
    got = []
    for dense in (4096, 0):
        monkeypatch.setattr(bs.ImpostorMatrix, "DENSE_UNITS", dense)
        m = bs.ImpostorMatrix(30)
        m.add(ua[:200], ub[:200])
        m.add(ua[200:], ub[200:])
        got.append(m.design().n_impostor(counts))
    want = [sum(c[a] * c[b] if a != b else c[a] for a, b in zip(ua, ub)) for c in counts]
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(got[1], want)
