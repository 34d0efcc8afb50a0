"""Verification and quality-assessment metrics (paper Tables II and III), streaming where it matters.

Conventions (SPEC section 6):
- Scores are cosine similarities. With N impostor scores and k = floor(FMR * N), the threshold at
  that FMR is the k-th highest impostor score; TAR is the share of genuine scores strictly above
  it, FNMR the share at or below it. k = 0 means the FMR cannot be measured (NaN, never a number).
- All-vs-all comparison never materializes the score matrix: blocks of ``chunk_size`` x
  ``chunk_size`` scores are reduced to (a) the genuine scores with their pair indices
  (O(sum n_s^2), small), (b) a bounded running top-k of impostor scores, k_max = floor(max FMR * N),
  enough for every requested threshold, and (c) a fixed histogram of impostor scores for the ROC.
- Error-versus-discard (ISO/IEC 29794-1:2024 EDC; the paper's ERC): discarding a fraction f of
  the images removes every image whose quality is below q_(m), the (m+1)-th lowest quality,
  m = floor(f * N_images) (exactly the m lowest images when there are no ties; tied images at the
  cut are all kept). A pair goes when either image goes (pair quality = min of the two); FNMR is
  counted over the remaining genuine pairs at the threshold fixed beforehand on all pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .progress import progress as progress_bar

HIST_BINS = 20000  # impostor histogram over [-1, 1] for the ROC (bin width 1e-4)


@dataclass
class ScoreStats:
    """What a verification run keeps of its scores.

    genuine: all genuine scores [G]; genuine_pairs: their (row a, row b) indices [G, 2] (None for
    an explicit pair list); impostor_top: the largest impostor scores, descending [<= k_max];
    n_impostor: number of impostor scores; impostor_hist: counts of impostor scores in
    ``HIST_BINS`` equal bins over [-1, 1] (scores outside are not counted); impostor_pairs: the
    (row a, row b) indices of ``impostor_top`` [<= k_max, 2] when asked for (the bootstrap needs
    their subjects), else None.
    """

    genuine: np.ndarray
    genuine_pairs: np.ndarray | None
    impostor_top: np.ndarray
    n_impostor: int
    impostor_hist: np.ndarray
    impostor_pairs: np.ndarray | None = None


def n_at_fmr(fmr: float, n_impostor: int) -> int:
    """k = floor(FMR * N), robust to the binary representation of e.g. 1e-3 (1e-3 * 1000 -> 1)."""
    return math.floor(round(fmr * n_impostor, 6))


def k_needed(fmrs, n_impostor: int) -> int:
    """Number of top impostor scores that all thresholds at ``fmrs`` need."""
    return max((n_at_fmr(f, n_impostor) for f in fmrs), default=0)


def fmr_thresholds(impostor_top: np.ndarray, n_impostor: int, fmrs) -> np.ndarray:
    """Threshold per FMR: the k-th highest impostor score, k = floor(FMR * N); NaN where k = 0."""
    out = np.full(len(fmrs), np.nan)
    for i, fmr in enumerate(fmrs):
        k = n_at_fmr(fmr, n_impostor)
        if k > len(impostor_top):
            raise ValueError(f"FMR {fmr} needs the top {k} impostor scores, only {len(impostor_top)} kept")
        if k > 0:
            out[i] = impostor_top[k - 1]
    return out


def tar_at_fmr(genuine: np.ndarray, impostor_top: np.ndarray, n_impostor: int, fmrs) -> np.ndarray:
    """TAR (share of genuine scores > threshold) per FMR, NaN where not measurable (paper Table II).

    ``impostor_top`` holds at least the floor(max(fmrs) * n_impostor) largest impostor scores,
    sorted descending (all impostor scores, sorted, also do).
    """
    if len(genuine) == 0:
        raise ValueError("no genuine scores")
    thr = fmr_thresholds(impostor_top, n_impostor, fmrs)
    gen = np.sort(np.asarray(genuine, dtype=np.float64))
    above = len(gen) - np.searchsorted(gen, np.nan_to_num(thr), side="right")
    return np.where(np.isnan(thr), np.nan, above / len(gen))


class NeedMoreImpostors(Exception):
    """The kept top impostor scores do not reach far enough: rescore keeping more of them."""


def nearest_fpr_tar(genuine: np.ndarray, impostor_top: np.ndarray, n_impostor: int, fmrs
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(TAR, threshold) per FMR in InsightFace's IJB convention (not SPEC section 6).

    InsightFace's IJB evaluation takes ``fpr, tpr, _ = sklearn.metrics.roc_curve(label, score)``
    and reports the TPR of the ROC point whose FPR is nearest the target FAR (on equally near
    points the one with the highest TPR: it flips the curve and takes the first minimum). This
    rebuilds that curve exactly: one point per distinct score (TPR / FPR = share of genuine /
    impostor scores >= it), sklearn's ``drop_intermediate`` rule (keep a point where the second
    difference of the false- or true-positive counts is non-zero, and both ends) and the point
    (0, 0) in front (threshold inf). Only the top of the impostor scores is needed: points down
    to FPR 2 * max(fmrs) decide it. Raises :class:`NeedMoreImpostors` when ``impostor_top`` (the
    highest impostor scores, any order) does not reach that far.
    """
    gen, imp = np.asarray(genuine, dtype=np.float64), np.asarray(impostor_top, dtype=np.float64)
    scores = np.concatenate([imp, gen])
    neg = np.concatenate([np.ones(len(imp)), np.zeros(len(gen))])
    order = np.argsort(-scores, kind="stable")
    s, neg = scores[order], neg[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last position of each distinct score
    fps, tps, thr = np.cumsum(neg)[last], np.cumsum(1 - neg)[last], s[last]
    complete = len(imp) >= n_impostor
    if not complete:  # counts are exact for thresholds above the lowest kept impostor score
        j = int(np.searchsorted(-thr, -imp.min(), side="left")) if len(imp) else 0
        fps, tps, thr = fps[: j + 1], tps[: j + 1], thr[: j + 1]
        if j < 1 or fps[j - 1] <= 2 * max(fmrs) * n_impostor:
            raise NeedMoreImpostors(f"the nearest-FPR convention needs more than the {len(imp)} kept impostor scores")
    keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
    if not complete:
        keep = keep[keep < len(fps) - 1]  # the last point's keep decision depends on a point not seen
    fpr = np.r_[0.0, fps[keep] / n_impostor]
    tpr = np.r_[0.0, tps[keep] / len(gen)]
    thr = np.r_[np.inf, thr[keep]]
    tar, out_thr = np.empty(len(fmrs)), np.empty(len(fmrs))
    for i, f in enumerate(fmrs):
        d = np.abs(fpr - f)[::-1]
        idx = len(fpr) - 1 - int(np.argmin(d))
        tar[i], out_thr[i] = tpr[idx], thr[idx]
    return tar, out_thr


def roc_curve(stats: ScoreStats, n_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """(FMR, TAR) points, FMR ascending: exact from the impostor top-k at the low-FMR end,
    from the impostor histogram (threshold = bin edge) above it."""
    gen = np.sort(stats.genuine.astype(np.float64))
    n_imp, top = stats.n_impostor, stats.impostor_top
    ks = np.unique(np.geomspace(1, max(len(top), 1), n_points).astype(np.int64))[: len(top)]
    fmr_lo = ks / n_imp
    tar_lo = (len(gen) - np.searchsorted(gen, top[ks - 1], side="right")) / len(gen)
    edges = np.linspace(-1.0, 1.0, len(stats.impostor_hist) + 1)[:-1]
    at_or_above = np.cumsum(stats.impostor_hist[::-1])[::-1]  # impostors >= lower edge of each bin
    fmr_hi = at_or_above / n_imp
    keep = fmr_hi > (fmr_lo[-1] if len(fmr_lo) else 0.0)
    tar_hi = (len(gen) - np.searchsorted(gen, edges, side="left")) / len(gen)
    fmr = np.concatenate([fmr_lo, fmr_hi[keep][::-1]])
    tar = np.concatenate([tar_lo, tar_hi[keep][::-1]])
    return fmr, tar


def _normalize(x, device, dtype) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x), device=device).to(dtype)
    return torch.nn.functional.normalize(x, dim=1)


def _codes(*labels: np.ndarray) -> list[torch.Tensor]:
    """Integer codes of labels shared across the given arrays."""
    _, inv = np.unique(np.concatenate([np.asarray(lab).astype(str) for lab in labels]), return_inverse=True)
    splits = np.cumsum([len(lab) for lab in labels])[:-1]
    return [torch.from_numpy(c.astype(np.int64)) for c in np.split(inv.reshape(-1), splits)]


def count_pairs(subjects, probe_subjects=None) -> tuple[int, int]:
    """(genuine, impostor) pair counts of an all-vs-all (i < j) or gallery-vs-probe comparison."""
    if probe_subjects is None:
        _, n = np.unique(np.asarray(subjects).astype(str), return_counts=True)
        total, gen = len(subjects) * (len(subjects) - 1) // 2, int((n * (n - 1) // 2).sum())
    else:
        g_ids, g_n = np.unique(np.asarray(subjects).astype(str), return_counts=True)
        p_ids, p_n = np.unique(np.asarray(probe_subjects).astype(str), return_counts=True)
        _, gi, pi = np.intersect1d(g_ids, p_ids, return_indices=True)
        total, gen = len(subjects) * len(probe_subjects), int((g_n[gi] * p_n[pi]).sum())
    return gen, total - gen


def all_vs_all_scores(
    features: np.ndarray,
    subjects: np.ndarray,
    fmrs,
    chunk_size: int = 2048,
    *,
    probe_features: np.ndarray | None = None,
    probe_subjects: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool | str = False,
    keep_top: int = 0,
) -> ScoreStats:
    """Cosine scores of all pairs i < j of ``features`` (or all gallery x probe pairs), streamed.

    Pairs with equal subject are genuine, all others impostor. Works through blocks of
    ``chunk_size`` x ``chunk_size`` scores (memory O(chunk_size^2 + G + k_max)); keeps every
    genuine score with its indices (``genuine_pairs[:, 1]`` indexes the probes when given), the
    top floor(max(fmrs) * N_impostor) impostor scores and an impostor histogram. ``progress``:
    show progress over blocks (a string names it). ``keep_top`` > 0: keep at least that many top
    impostor scores, with their pair indices (``impostor_pairs``), e.g. for the bootstrap.
    """
    cross = probe_features is not None
    if cross != (probe_subjects is not None):
        raise ValueError("probe_features and probe_subjects go together")
    a = _normalize(features, device, dtype)
    b = _normalize(probe_features, device, dtype) if cross else a
    la, lb = [c.to(device) for c in _codes(subjects, probe_subjects)] if cross else [_codes(subjects)[0].to(device)] * 2
    _, n_imp = count_pairs(subjects, probe_subjects if cross else None)
    blocks = [(i, j) for i in range(0, len(a), chunk_size) for j in range(0 if cross else i, len(b), chunk_size)]
    acc = _Accumulator(fmrs, n_imp, keep_top, device, dtype)
    for i, j in progress_bar(blocks, desc=progress if isinstance(progress, str) else "scoring", unit="block",
                             disable=not progress):
        s = a[i : i + chunk_size] @ b[j : j + chunk_size].T
        same = la[i : i + chunk_size, None] == lb[None, j : j + chunk_size]
        if not cross and i == j:  # diagonal block: only pairs i < j; NaN drops out of histc and ">"
            lower = torch.ones_like(same).tril_()
            s.masked_fill_(lower, math.nan)
            same &= ~lower
        acc.add(s, same, lambda mask: mask.nonzero() + torch.tensor([i, j], device=device))
    return acc.result()


class _Accumulator:
    """Reduces blocks of scores to :class:`ScoreStats`: genuine scores with their pair indices, a
    bounded running top-k of impostor scores (with indices when ``keep_top``) and a histogram."""

    def __init__(self, fmrs, n_impostor: int, keep_top: int, device, dtype):
        self.n_imp, self.with_pairs = n_impostor, keep_top > 0
        self.k_max = min(max(k_needed(fmrs, n_impostor), keep_top), n_impostor)
        self.gen, self.gen_idx = [], []
        self.top = torch.empty(0, device=device, dtype=dtype)
        self.top_idx = torch.empty((0, 2), device=device, dtype=torch.int64)
        self.thr = torch.tensor(-math.inf, device=device, dtype=dtype)
        self.hist = torch.zeros(HIST_BINS, dtype=torch.float64, device=device)

    def add(self, s: torch.Tensor, same: torch.Tensor, index) -> None:
        """``s``: a block of scores (NaN = no pair); ``same``: genuine mask; ``index(mask)``: the
        (row a, row b) indices of the entries of a mask, in row-major order."""
        g = s[same]  # histc counts in the input dtype: exact per block up to 2^24 (float32) per bin
        self.hist += torch.histc(s, HIST_BINS, -1, 1).double() - torch.histc(g, HIST_BINS, -1, 1).double()
        self.gen.append(g.cpu())
        self.gen_idx.append(index(same).cpu())
        if self.k_max:
            mask = (s > self.thr) & ~same
            cand = s[mask]
            if len(cand):
                self.top = torch.cat([self.top, cand])
                if self.with_pairs:
                    self.top_idx = torch.cat([self.top_idx, index(mask)])
                if len(self.top) >= self.k_max:
                    self.top, pos = torch.topk(self.top, self.k_max, sorted=False)
                    if self.with_pairs:
                        self.top_idx = self.top_idx[pos]
                    self.thr = self.top.min()

    def result(self) -> ScoreStats:
        top, order = torch.sort(self.top.cpu(), descending=True, stable=True)
        return ScoreStats(
            genuine=torch.cat(self.gen).double().numpy() if self.gen else np.zeros(0),
            genuine_pairs=torch.cat(self.gen_idx).numpy() if self.gen_idx else np.zeros((0, 2), np.int64),
            impostor_top=top.double().numpy(),
            n_impostor=self.n_imp,
            impostor_hist=self.hist.round().long().cpu().numpy(),
            impostor_pairs=self.top_idx.cpu()[order].numpy() if self.with_pairs else None,
        )


def pair_list_stats(
    a: np.ndarray, chunks, n_genuine: int, n_impostor: int, fmrs, *, keep_top: int = 0,
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, progress: bool | str = False,
    total: int | None = None, score_rows: int = 1 << 15,
) -> ScoreStats:
    """:class:`ScoreStats` of an explicit pair list (e.g. IJB-C's 1:1 protocol), streamed.

    ``chunks`` yields (idx_a, idx_b, genuine) arrays of pairs of rows of ``a``; each chunk is
    scored with batched row-wise dot products of ``score_rows`` pairs (memory O(score_rows * D))
    and reduced at once (memory O(chunk + G + k)).
    ``genuine_pairs`` / ``impostor_pairs`` hold row indices of ``a``.
    """
    x = _normalize(a, device, dtype)
    acc = _Accumulator(fmrs, n_impostor, keep_top, device, dtype)
    seen = 0
    for ia, ib, gen in progress_bar(chunks, desc=progress if isinstance(progress, str) else "pairs",
                                    unit="chunk", total=total, disable=not progress):
        ia = torch.as_tensor(np.asarray(ia, dtype=np.int64), device=device)
        ib = torch.as_tensor(np.asarray(ib, dtype=np.int64), device=device)
        s = torch.zeros(len(ia), device=device, dtype=dtype)
        for i in range(0, len(ia), score_rows):
            s[i : i + score_rows] = torch.einsum("pd,pd->p", x[ia[i : i + score_rows]], x[ib[i : i + score_rows]])
        rows = torch.stack([ia, ib], 1)
        acc.add(s, torch.as_tensor(np.asarray(gen, dtype=bool), device=device), lambda mask: rows[mask])
        seen += len(ia)
    st = acc.result()
    if len(st.genuine) != n_genuine or seen - n_genuine != n_impostor:
        raise ValueError(f"pair chunks held {len(st.genuine)} genuine and {seen - len(st.genuine)} impostor "
                         f"pairs, expected {n_genuine} and {n_impostor}")
    return st


def pair_scores(
    a: np.ndarray, b: np.ndarray, idx_a: np.ndarray, idx_b: np.ndarray, chunk_size: int = 1 << 16,
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """Cosine similarity of the listed pairs (a[idx_a[p]], b[idx_b[p]]) (e.g. IJB-C's 1:1 protocol)."""
    a, b = _normalize(a, device, dtype), _normalize(b, device, dtype)
    ia, ib = torch.as_tensor(np.asarray(idx_a)), torch.as_tensor(np.asarray(idx_b))
    out = [(a[ia[i : i + chunk_size].to(device)] * b[ib[i : i + chunk_size].to(device)]).sum(1).cpu()
           for i in range(0, len(ia), chunk_size)]
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def stats_from_scores(scores: np.ndarray, genuine: np.ndarray, fmrs) -> ScoreStats:
    """:class:`ScoreStats` of an explicit list of scores with genuine (True) / impostor labels."""
    genuine = np.asarray(genuine, dtype=bool)
    imp = torch.as_tensor(scores[~genuine])
    k = min(k_needed(fmrs, len(imp)), len(imp))
    return ScoreStats(
        genuine=np.asarray(scores[genuine], dtype=np.float64),
        genuine_pairs=None,
        impostor_top=torch.topk(imp, k).values.numpy(),
        n_impostor=len(imp),
        impostor_hist=torch.histc(imp, HIST_BINS, -1, 1).round().long().numpy(),
    )


def erc_curve(
    quality: np.ndarray, pairs: np.ndarray, false_nonmatch: np.ndarray, max_discard: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """FNMR versus fraction of images discarded (paper Table III ERC; ISO/IEC 29794-1:2024 EDC).

    ``quality`` [N] per image; ``pairs`` [G, 2] image indices of the genuine pairs;
    ``false_nonmatch`` [G] whether each genuine score is <= the threshold fixed on all pairs.
    For m = 0 .. floor(max_discard * N), images with quality below q_(m) (the (m+1)-th lowest)
    are discarded and a pair is kept when min(q_a, q_b) >= q_(m). Returns the fractions m / N and
    FNMR over the kept genuine pairs (NaN where none is left); one sort plus cumulative counts.
    """
    n = len(quality)
    cut = np.sort(quality)[: math.floor(max_discard * n) + 1]
    pq = np.minimum(quality[pairs[:, 0]], quality[pairs[:, 1]])
    order = np.argsort(pq, kind="stable")
    pq, fnm = pq[order], np.asarray(false_nonmatch, dtype=np.int64)[order]
    errors_below = np.concatenate([[0], np.cumsum(fnm)])  # false non-matches among the i lowest pairs
    first_kept = np.searchsorted(pq, cut, side="left")
    kept = len(pq) - first_kept
    errors = errors_below[-1] - errors_below[first_kept]
    with np.errstate(invalid="ignore", divide="ignore"):
        fnmr = np.where(kept > 0, errors / np.maximum(kept, 1), np.nan)
    return np.arange(len(cut)) / n, fnmr


def erc_area(fractions: np.ndarray, fnmr: np.ndarray, n_images: int, upto: float) -> float:
    """Area under the ERC/EDC step curve (FNMR constant on [m/N, (m+1)/N)) over [0, upto].

    ``upto`` = the curve's max_discard gives the Table III AUC; 0.2 the ISO/IEC 29794-1:2024
    partial AUC. Not normalized: a flat FNMR x has area x * upto. NaN if FNMR is undefined there.
    """
    if upto > fractions[-1] + 1 / n_images + 1e-12:
        raise ValueError(f"curve ends at {fractions[-1]:.3f}, cannot integrate up to {upto}")
    width = np.clip(np.minimum(fractions + 1 / n_images, upto) - fractions, 0, None)
    return float(np.sum(np.where(width > 0, fnmr, 0.0) * width))


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N, ties get their average rank (as scipy.stats.rankdata)."""
    _, inv, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inv.reshape(-1)]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (SC, paper Table III); NaN when either input is constant."""
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry / den) if den > 0 else math.nan


def cut_agreement(pred_ccas: np.ndarray, true_ccas: np.ndarray, cut: float = 0.0) -> dict[str, float]:
    """The 2 x 2 table of predicted CCAS > ``cut`` against true CCAS > 0, as shares of the images,
    with the agreement (diagonal) and both marginals."""
    p, t = np.asarray(pred_ccas) > cut, np.asarray(true_ccas) > 0
    return {"true_pos": float(t.mean()), "pred_pos": float(p.mean()), "both_pos": float(np.mean(p & t)),
            "pred_pos_true_neg": float(np.mean(p & ~t)), "pred_neg_true_pos": float(np.mean(~p & t)),
            "both_neg": float(np.mean(~p & ~t)), "agree": float(np.mean(p == t))}


def best_cut(pred_ccas: np.ndarray, true_ccas: np.ndarray) -> float:
    """The cut on predicted CCAS whose ``pred > cut`` best reproduces true CCAS > 0 on labelled images
    (a remedy when the predictions' level drifts on other data): among 0, the predicted values and the
    midpoints between consecutive ones, the highest agreement, ties broken towards 0."""
    pred = np.asarray(pred_ccas, np.float64)
    t = np.asarray(true_ccas) > 0
    values = np.sort(pred)
    cand = np.concatenate([[0.0], values, (values[1:] + values[:-1]) / 2])
    order = np.argsort(pred, kind="stable")
    pos_below = np.concatenate([[0], np.cumsum(t[order])])  # true positives among the i lowest predictions
    below = np.searchsorted(values, cand, side="right")  # predictions <= cut
    agree = (t.sum() - pos_below[below]) + (below - pos_below[below])  # true pos above + true neg at or below
    best = np.flatnonzero(agree == agree.max())
    return float(cand[best[np.argmin(np.abs(cand[best]))]])
