"""Subject (identity) bootstrap of TAR at FMR, SC and ERC/EDC areas, streamed.

Resampling. A replicate draws S units (subjects) with replacement from the S units of the
evaluation (``draw_counts``: ``c[r, s]`` = how often unit s was drawn in replicate r). Each drawn
copy of a unit carries all its templates (or images). The replicate's pairs are:

- genuine: every genuine pair of unit s, once per copy: multiplicity ``c[s]`` (pairs between two
  copies of the same unit are not formed: they would pair a template with itself);
- impostor between units u != v: once per (copy of u, copy of v): multiplicity ``c[u] * c[v]``;
- an impostor pair inside one unit (only possible with an explicit pair list whose units are
  given by the genuine pairs, see :func:`pair_units`): once per copy, ``c[u]``.

This is exactly what one gets by building the resampled set explicitly and comparing it the
same way as the original one (the slow reference in the tests does that). In each replicate the
threshold at an FMR is recomputed on the weighted impostor multiset (the k-th highest with
k = floor(FMR * N_r), N_r the replicate's impostor count; SPEC section 6) and TAR is the weighted
share of genuine pairs strictly above it.

Streaming. Nothing per replicate is ever as large as the pair set: the scoring pass keeps the
genuine scores (O(sum n_s^2)) and the K highest impostor scores with their units (K a few times
floor(max FMR * N), enough for the k-th highest of every replicate; a replicate that would need
more raises :class:`NeedMoreImpostors` and the caller rescoring with a larger K). Replicates are
then processed in batches of B as [B, K] and [B, G] weight matrices (cumulative sums), so memory
is O(B * (K + G) + R * S).

Intervals are percentile intervals (2.5 and 97.5 % of the replicates); differences between two
variants use the same replicates for both (paired).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from .evaluation import NeedMoreImpostors, n_at_fmr  # noqa: F401 (NeedMoreImpostors re-exported)

TOP_FACTOR = 4  # keep TOP_FACTOR x floor(max FMR * N) + TOP_EXTRA impostor scores for the bootstrap
TOP_EXTRA = 64
BATCH_ELEMENTS = 1 << 22  # replicates per batch x (K + G) stays below this


def keep_top(fmrs, n_impostor: int) -> int:
    """How many top impostor scores the scoring pass keeps for the bootstrap."""
    k = max(n_at_fmr(f, n_impostor) for f in fmrs)
    return min(n_impostor, TOP_FACTOR * k + TOP_EXTRA)


def draw_counts(n_units: int, replicates: int, seed: int) -> np.ndarray:
    """``c[r, s]``: multiplicity of unit s in replicate r (S draws with replacement) [R, S] int32.

    Replicate r draws ``rng.integers(0, S, (R, S))[r]`` with ``rng = np.random.default_rng(seed)``.
    """
    draws = np.random.default_rng(seed).integers(0, n_units, (replicates, n_units))
    return counts_of(draws, n_units)


def counts_of(draws: np.ndarray, n_units: int) -> np.ndarray:
    """Per-row bincount of a [R, S] array of drawn units."""
    r = len(draws)
    flat = (draws + n_units * np.arange(r)[:, None]).reshape(-1)
    return np.bincount(flat, minlength=r * n_units).reshape(r, n_units).astype(np.int32)


@dataclass
class Design:
    """How the impostor count of a comparison depends on the unit multiplicities.

    kind ``"all"``: all pairs i < j of one set, ``sizes`` = templates per unit; ``"cross"``: all
    gallery x probe pairs, ``sizes`` = gallery templates, ``probe_sizes`` = probe templates per
    unit; ``"list"``: an explicit pair list, ``impostor_matrix`` [S, S] (upper triangle incl.
    diagonal) counts its impostor pairs per pair of units.
    """

    kind: str
    n_units: int
    sizes: np.ndarray | None = None
    probe_sizes: np.ndarray | None = None
    impostor_matrix: scipy.sparse.csr_matrix | None = None

    def n_impostor(self, counts: np.ndarray) -> np.ndarray:
        """Impostor pairs of each replicate [R] (float64, exact below 2^53)."""
        c = counts.astype(np.float64)
        if self.kind == "all":
            n = self.sizes.astype(np.float64)
            return ((c @ n) ** 2 - (c**2) @ (n**2)) / 2
        if self.kind == "cross":
            g, p = self.sizes.astype(np.float64), self.probe_sizes.astype(np.float64)
            return (c @ g) * (c @ p) - (c**2) @ (g * p)
        m = self.impostor_matrix
        diag = m.diagonal().astype(np.float64)
        off = scipy.sparse.triu(m, k=1).tocsr()
        return np.einsum("rs,rs->r", c, (off @ c.T).T) + c @ diag


def all_design(units: np.ndarray, n_units: int) -> Design:
    return Design("all", n_units, sizes=np.bincount(units, minlength=n_units))


def cross_design(gallery_units: np.ndarray, probe_units: np.ndarray, n_units: int) -> Design:
    return Design("cross", n_units, sizes=np.bincount(gallery_units, minlength=n_units),
                  probe_sizes=np.bincount(probe_units, minlength=n_units))


def pair_units(n_templates: int, genuine_a: np.ndarray, genuine_b: np.ndarray) -> tuple[np.ndarray, int]:
    """Units of the templates of an explicit pair list: connected components of the genuine pairs.

    Templates joined by genuine pairs (directly or through others) are one subject; a template
    in no genuine pair is a unit of its own. Returns (unit per template, number of units).
    """
    from scipy.sparse.csgraph import connected_components

    graph = scipy.sparse.coo_matrix((np.ones(len(genuine_a)), (genuine_a, genuine_b)),
                                    shape=(n_templates, n_templates))
    n, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64), int(n)


class ImpostorMatrix:
    """Accumulates the impostor pairs of a pair list per (unit a, unit b), chunk by chunk: a dense
    S x S int64 table up to ``DENSE_UNITS`` units (IJB-C's ~3.5k subjects: 100 MB), else sparse."""

    DENSE_UNITS = 4096

    def __init__(self, n_units: int):
        self.n = n_units
        self.dense = np.zeros(n_units * n_units, np.int64) if n_units <= self.DENSE_UNITS else None
        self.m = scipy.sparse.csr_matrix((n_units, n_units), dtype=np.int64)

    def add(self, ua: np.ndarray, ub: np.ndarray) -> None:
        lo, hi = np.minimum(ua, ub), np.maximum(ua, ub)
        if self.dense is not None:
            np.add.at(self.dense, lo * self.n + hi, 1)
        else:
            self.m = self.m + scipy.sparse.coo_matrix((np.ones(len(lo), np.int64), (lo, hi)),
                                                      shape=(self.n, self.n)).tocsr()

    def design(self) -> Design:
        m = self.m if self.dense is None else scipy.sparse.csr_matrix(self.dense.reshape(self.n, self.n))
        return Design("list", self.n, impostor_matrix=m)


@dataclass
class PairSample:
    """What the bootstrap of one variant needs: genuine scores with their unit, the top impostor
    scores (descending) with the units of their two sides."""

    genuine: np.ndarray
    genuine_units: np.ndarray
    impostor_top: np.ndarray
    impostor_units: np.ndarray  # [K, 2]


def batches(n_rep: int, width: int) -> list[tuple[int, int]]:
    """Replicate batches [lo, hi) such that a [B, width] float64 matrix stays bounded."""
    b = max(1, BATCH_ELEMENTS // max(width, 1))
    return [(i, min(i + b, n_rep)) for i in range(0, n_rep, b)]


def replicate_thresholds(sample: PairSample, design: Design, counts: np.ndarray, fmrs,
                         block: int = 1 << 16) -> np.ndarray:
    """Threshold per replicate and FMR [R, F]: k-th highest of the weighted impostor multiset,
    k = floor(FMR * N_r); NaN where k = 0. Raises :class:`NeedMoreImpostors` when some replicate's
    k-th highest is not among the kept impostor scores.

    The kept scores are scanned in blocks of ``block``, a batch of replicates at a time, with the
    weights ``c[u] * c[v]`` of a block and their running cumulative sum; a replicate leaves the
    scan once its largest k is reached (work ~ R x k_max, memory ~ B x block).
    """
    n_imp = design.n_impostor(counts)
    k = np.array([[n_at_fmr(f, n) for f in fmrs] for n in n_imp], dtype=np.float64).reshape(len(counts), len(fmrs))
    ua, ub = sample.impostor_units[:, 0], sample.impostor_units[:, 1]
    same = ua == ub
    out = np.full(k.shape, np.nan)
    for lo, hi in batches(len(counts), min(block, max(len(ua), 1))):
        c = counts[lo:hi].astype(np.float64)
        kk = k[lo:hi]
        pending = kk > 0
        run = np.zeros(hi - lo)
        for start in range(0, len(ua), block):
            rows = np.flatnonzero(pending.any(1))
            if not len(rows):
                break
            a, b, sm = ua[start : start + block], ub[start : start + block], same[start : start + block]
            cr = c[rows]
            cw = np.cumsum(np.where(sm, cr[:, a], cr[:, a] * cr[:, b]), axis=1) + run[rows, None]
            for i, r in enumerate(rows):
                hit = pending[r] & (kk[r] <= cw[i, -1])
                if hit.any():
                    pos = np.searchsorted(cw[i], kk[r, hit], side="left")
                    out[lo + r, np.flatnonzero(hit)] = sample.impostor_top[start + pos]
                    pending[r, hit] = False
            run[rows] = cw[:, -1]
        if pending.any():
            r = lo + int(np.flatnonzero(pending.any(1))[0])
            raise NeedMoreImpostors(f"replicate {r} needs more than the {len(ua)} kept impostor scores")
    return out


def replicate_tar(sample: PairSample, design: Design, counts: np.ndarray, fmrs) -> np.ndarray:
    """TAR per replicate and FMR [R, F] (weighted share of genuine scores above the replicate's
    threshold); NaN where the FMR cannot be measured in a replicate."""
    thr = replicate_thresholds(sample, design, counts, fmrs)
    order = np.argsort(sample.genuine, kind="stable")
    gen, units = sample.genuine[order], sample.genuine_units[order]
    out = np.full(thr.shape, np.nan)
    for lo, hi in batches(len(counts), len(gen)):
        w = counts[lo:hi][:, units].astype(np.float64)
        below = np.concatenate([np.zeros((hi - lo, 1)), np.cumsum(w, axis=1)], axis=1)  # weight of the i lowest
        total = below[:, -1]
        pos = np.searchsorted(gen, np.nan_to_num(thr[lo:hi]), side="right")  # [B, F]
        above = total[:, None] - np.take_along_axis(below, pos, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo:hi] = np.where(np.isnan(thr[lo:hi]) | (total[:, None] == 0), np.nan, above / total[:, None])
    return out


def interval(values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over replicates (axis 0); replicates where a value is NaN (e.g. an FMR
    that a replicate cannot measure) are left out; NaN where none is left."""
    a = (1 - level) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        lo, hi = np.nanpercentile(values, [a, 100 - a], axis=0)
    return lo, hi


# ----------------------------------------------------------------------------- image level
def weighted_spearman(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Spearman correlation of the multisets that repeat item i ``weights[r, i]`` times, per row r
    of ``weights`` [B, N] (ties get their average rank, as :func:`transfira.evaluation.spearman`)."""
    w = weights.astype(np.float64)
    rx, ry = _weighted_ranks(x, w), _weighted_ranks(y, w)
    n = w.sum(1, keepdims=True)
    mx, my = (w * rx).sum(1, keepdims=True) / n, (w * ry).sum(1, keepdims=True) / n
    dx, dy = rx - mx, ry - my
    cov, vx, vy = (w * dx * dy).sum(1), (w * dx * dx).sum(1), (w * dy * dy).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((vx > 0) & (vy > 0), cov / np.sqrt(vx * vy), np.nan)


def _weighted_ranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[B, N] average ranks of x in each weighted multiset."""
    order = np.argsort(x, kind="stable")
    xs = np.asarray(x)[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    group = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1  # tie group of each sorted item
    gw = np.add.reduceat(w[:, order], starts, axis=1)  # [B, U]
    rank = np.cumsum(gw, axis=1) - (gw - 1) / 2  # average of ranks cum - gw + 1 .. cum
    out = np.empty_like(w)
    out[:, order] = rank[:, group]
    return out


class ErcBootstrap:
    """ERC/EDC areas per replicate for one quality measure (see :func:`transfira.evaluation.erc_curve`).

    In a replicate, image i appears ``c[unit_i]`` times and genuine pair p ``c[unit_p]`` times. The
    EDC discards the m lowest-quality images of the replicate (m / N_r = fraction); image j of the
    ascending quality order covers fractions [W_{j-1}, W_j) / N_r (W = cumulative weights), where
    the FNMR is that of the pairs with min quality >= q_j. The area up to ``upto`` sums FNMR(q_j)
    times the covered length below ``upto`` (the same step integral as
    :func:`transfira.evaluation.erc_area`).
    """

    def __init__(self, quality: np.ndarray, image_units: np.ndarray, pairs: np.ndarray, pair_units: np.ndarray):
        self.order = np.argsort(quality, kind="stable")
        q = np.asarray(quality)[self.order]
        self.image_units = image_units[self.order]
        pq = np.minimum(quality[pairs[:, 0]], quality[pairs[:, 1]])
        self.pair_order = np.argsort(pq, kind="stable")
        self.pair_units = pair_units[self.pair_order]
        self.first_kept = np.searchsorted(pq[self.pair_order], q, side="left")  # [N]: pairs kept at cut q_j

    def areas(self, counts: np.ndarray, false_nonmatch: np.ndarray, uptos) -> np.ndarray:
        """[B, len(uptos)] areas for replicate counts [B, S] and false non-match flags [B, G]
        (in the original pair order: the replicate's threshold decides them)."""
        c = counts.astype(np.float64)
        wi = c[:, self.image_units]  # [B, N]
        wcum = np.cumsum(wi, axis=1)
        n_r = wcum[:, -1:]
        wp = c[:, self.pair_units]
        fnm = false_nonmatch[:, self.pair_order].astype(np.float64) * wp
        kept = _suffix_at(wp, self.first_kept)
        errors = _suffix_at(fnm, self.first_kept)
        with np.errstate(invalid="ignore", divide="ignore"):
            fnmr = np.where(kept > 0, errors / np.maximum(kept, 1e-300), np.nan)
        start, end = (wcum - wi) / n_r, wcum / n_r
        out = []
        for upto in uptos:
            length = np.clip(np.minimum(end, upto) - np.minimum(start, upto), 0, None)
            out.append((np.where(length > 0, fnmr, 0.0) * length).sum(1))
        return np.stack(out, 1)


def _suffix_at(w: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Sum of w[:, first_j:] for every j: [B, len(first)]."""
    below = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w, axis=1)], axis=1)
    return below[:, -1:] - below[:, first]


def sample_of(stats, units_a: np.ndarray, units_b: np.ndarray | None = None) -> PairSample:
    """:class:`PairSample` of a :class:`transfira.evaluation.ScoreStats` scored with ``keep_top``;
    ``units_a`` / ``units_b``: unit of each row of side a / b (b = a for one set or a pair list)."""
    if stats.impostor_pairs is None or stats.genuine_pairs is None:
        raise ValueError("the scores were kept without pair indices (score with keep_top > 0)")
    units_b = units_a if units_b is None else units_b
    gp, ip = stats.genuine_pairs, stats.impostor_pairs
    return PairSample(genuine=stats.genuine, genuine_units=units_a[gp[:, 0]], impostor_top=stats.impostor_top,
                      impostor_units=np.stack([units_a[ip[:, 0]], units_b[ip[:, 1]]], 1))
