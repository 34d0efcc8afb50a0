"""evaluate.py's job: read templates / labels, measure them with :mod:`transfira.evaluation` and
:mod:`transfira.bootstrap`, write the tables and plots of :mod:`transfira.report`."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import bootstrap as bs
from .. import evaluation as ev
from ..backbone import resolve_device
from ..config import ANY_VALUE, apply_schema, read_toml
from ..errors import TransfiraError
from ..progress import progress as progress_bar
from ..io import atomic_path, format_rows, load_id_vectors, numeric_column, read_annotations, save_csv
from ..pairlist import PairList
from ..report import (INSIGHTFACE, breakdown_markdown, cuts_markdown, delta_column, fmt_ci, fmt_fmr, markdown_table,
                      plot_erc, plot_roc, verification_markdown)

SCHEMA: dict[str, Any] = {
    "outdir": "output/evaluation/",
    "fmr": [1e-3, 1e-4, 1e-5, 1e-6],
    "allow_pickle": False,
    "chunk_size": 2048,
    "device": "auto",
    "bootstrap": 1000,  # subject-bootstrap replicates for the 95 % intervals; 0 = no intervals
    "seed": 0,
    "threshold_convention": "spec",  # 'insightface' adds rows in InsightFace's nearest-FPR convention
    "compare_to": [],  # template variants besides baseline that the others get paired differences to
    "templates_dir": "",  # every templates_<name>.npz in this folder is a variant <name>
    "pairs": {
        "path": "",  # template_a,template_b,label CSV or space-separated IJB pair list (1 genuine, 0 impostor)
        "subjects": "",  # CSV id,subject: all-vs-all pairs
        "gallery": "",  # CSV id,subject: gallery x probes pairs (with 'probes')
        "probes": "",
        "id_col_name": "template_id",
        "label_col_name": "subject_id",
        "chunk_rows": 1 << 18,  # pair-list rows read and scored at a time
    },
    "images": {
        "labels": "",  # generate.py's labels CSV (identity, true ccs, ccas); '' skips the image level
        "features": "",  # [N, D] .npy aligned with the rows of 'labels'
        "ccs": "",  # predicted CCS .npy [N] (test.py's test_ccs.npy); '' to skip
        "ccas": "",
        "label_col_name": "subject_id",
        "ccs_col_name": "ccs",
        "ccas_col_name": "ccas",
        "quality_columns": [],  # further columns of 'labels' with other FIQA scores
        "quality_csv": "",  # test.py's test_quality.csv: per-image quality scores, rows matched by path
        "scores": [],  # columns of quality_csv to evaluate (e.g. ['norm', 'serfiq', 'cr'])
        "path_col_name": "path",  # image path column of 'labels' and 'quality_csv'
        "max_discard": 0.95,
        "ccas_scores": [],  # columns of quality_csv that are predicted CCAS (SC against the true CCAS)
        "enrolment_labels": "",  # CSV of enrolment images (identity column): pairs = enrolment x images
        "enrolment_features": "",  # [M, D] .npy aligned with 'enrolment_labels'
        "cut_agreement": False,  # 2 x 2 of predicted CCAS > 0 against true CCAS > 0, per CCAS measure
        "recut": 0,  # N > 0: re-estimate that cut on N images (seeded draw), agreement on the others
        "breakdown": [],  # columns of 'labels' to break the image rows down by ('a+b' counts in a and b)
        "bins": {ANY_VALUE: None},  # column -> bin edges for a numeric breakdown column: [e0, e1), ..., [e_k-1, e_k]
    },
}
PAUC_UPTO = 0.2  # ISO/IEC 29794-1:2024 partial AUC of the EDC
STANDARD_VARIANTS = ["baseline", "weight", "filter", "filter_weight"]
CONVENTIONS = ("spec", "insightface")


def load_evaluate_config(path: str | Path) -> dict[str, Any]:
    """Validate ``path`` against :data:`SCHEMA`; ``[templates]`` maps free variant names to files,
    ``templates_dir`` adds every ``templates_<name>.npz`` of a folder not named there."""
    raw = read_toml(path)
    templates = raw.pop("templates", {})
    if not isinstance(templates, dict) or not all(isinstance(v, str) for v in templates.values()):
        raise TransfiraError(f"{path}: [templates] must map variant names to file paths")
    cfg = apply_schema(raw, SCHEMA, source=str(path))
    cfg["templates"] = {k: v for k, v in templates.items() if v}
    if cfg["templates_dir"]:
        folder = Path(cfg["templates_dir"])
        if not folder.is_dir():
            raise TransfiraError(f"{path}: templates_dir {folder} is not a folder")
        found = {f.name[len("templates_"):-len(".npz")]: str(f) for f in sorted(folder.glob("templates_*.npz"))}
        if not found:
            raise TransfiraError(f"{path}: no templates_*.npz in templates_dir {folder}")
        for name in sorted(found, key=lambda n: (STANDARD_VARIANTS.index(n) if n in STANDARD_VARIANTS else 99, n)):
            cfg["templates"].setdefault(name, found[name])
    fmrs = cfg["fmr"]
    if not isinstance(fmrs, list) or not fmrs or not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in fmrs):
        raise TransfiraError(f"{path}: 'fmr' must be a non-empty list of numbers in (0, 1]")
    if not cfg["templates"] and not cfg["images"]["labels"]:
        raise TransfiraError(f"{path}: nothing to evaluate: give [templates] and/or [images] labels")
    if not PAUC_UPTO <= cfg["images"]["max_discard"] < 1:
        raise TransfiraError(f"{path}: [images] max_discard must lie in [{PAUC_UPTO}, 1) (the EDC partial area "
                             f"runs to {PAUC_UPTO})")
    for key in ("bootstrap", "seed"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 0:
            raise TransfiraError(f"{path}: '{key}' must be an integer >= 0")
    if cfg["threshold_convention"] not in CONVENTIONS:
        raise TransfiraError(f"{path}: threshold_convention must be one of {', '.join(CONVENTIONS)}, "
                             f"not {cfg['threshold_convention']!r}")
    scores = cfg["images"]["scores"]
    if not isinstance(scores, list) or not all(isinstance(x, str) for x in scores):
        raise TransfiraError(f"{path}: [images] scores must be a list of column names")
    if scores and not cfg["images"]["quality_csv"]:
        raise TransfiraError(f"{path}: [images] scores needs quality_csv (test.py's test_quality.csv)")
    im = cfg["images"]
    for key in ("ccas_scores", "breakdown"):
        if not isinstance(im[key], list) or not all(isinstance(x, str) for x in im[key]):
            raise TransfiraError(f"{path}: [images] {key} must be a list of column names")
    if im["ccas_scores"] and not im["quality_csv"]:
        raise TransfiraError(f"{path}: [images] ccas_scores needs quality_csv")
    if bool(im["enrolment_labels"]) != bool(im["enrolment_features"]):
        raise TransfiraError(f"{path}: [images] enrolment_labels and enrolment_features go together")
    if not isinstance(im["recut"], int) or isinstance(im["recut"], bool) or im["recut"] < 0:
        raise TransfiraError(f"{path}: [images] recut must be an integer >= 0")
    if not isinstance(im["bins"], dict) or not all(
            isinstance(e, list) and len(e) >= 2 and all(isinstance(x, (int, float)) for x in e)
            and all(a < b for a, b in zip(e, e[1:])) for e in im["bins"].values()):
        raise TransfiraError(f"{path}: [images.bins] must map columns to increasing lists of >= 2 bin edges")
    compare = cfg["compare_to"]
    if not isinstance(compare, list) or not all(isinstance(x, str) for x in compare):
        raise TransfiraError(f"{path}: 'compare_to' must be a list of template variant names")
    if not isinstance(cfg["pairs"]["chunk_rows"], int) or cfg["pairs"]["chunk_rows"] < 1:
        raise TransfiraError(f"{path}: [pairs] chunk_rows must be a positive integer")
    return cfg


def numeric(frame: pd.DataFrame, col: str, path: str) -> np.ndarray:
    values, bad_rows = numeric_column(frame, col)
    if len(bad_rows):
        bad = frame[col].iloc[bad_rows[:3]].tolist()
        raise TransfiraError(f"{path}: column '{col}' has non-numeric or missing values, e.g. {bad} "
                             f"(row(s) {format_rows(bad_rows)})")
    return values


def index_of(ids: np.ndarray, wanted: pd.Series | np.ndarray, path: str, source: str) -> np.ndarray:
    """Rows of ``wanted`` template ids in a templates file; missing ids are an error listing a few."""
    index = pd.Index(np.asarray(ids).astype(str))
    if not index.is_unique:
        raise TransfiraError(f"{path}: duplicate template ids, e.g. {index[index.duplicated()][:3].tolist()}")
    wanted = pd.Series(np.asarray(wanted).astype(str))
    rows = index.get_indexer(wanted)
    if (rows < 0).any():
        missing = pd.unique(wanted[rows < 0])
        raise TransfiraError(f"{path}: {len(missing)} template id(s) from {source} not in the file, "
                             f"e.g. {', '.join(missing[:5])}")
    return rows


def subjects_table(path: str, pc: dict, what: str) -> pd.DataFrame:
    frame = read_annotations(path, [pc["id_col_name"], pc["label_col_name"]], what=what, text=True)
    dup = frame[pc["id_col_name"]].duplicated()
    if dup.any():
        raise TransfiraError(f"{path}: duplicate template ids, e.g. {frame[pc['id_col_name']][dup].head(3).tolist()}")
    return frame


def check_pairs(n_gen: int, n_imp: int, source: str) -> None:
    if n_gen + n_imp == 0:
        raise TransfiraError(f"{source}: no pairs to compare")
    if n_gen == 0 or n_imp == 0:
        raise TransfiraError(f"{source}: {n_gen} genuine and {n_imp} impostor pairs; both are needed")


def unit_codes(*labels) -> tuple[list[np.ndarray], int]:
    """Integer subject codes shared across label arrays, and their number."""
    _, inv = np.unique(np.concatenate([np.asarray(x).astype(str) for x in labels]), return_inverse=True)
    inv = inv.reshape(-1)
    splits = np.cumsum([len(x) for x in labels])[:-1]
    return np.split(inv.astype(np.int64), splits), int(inv.max()) + 1


def keep_for(cfg: dict, n_imp: int) -> int:
    """Top impostor scores to keep: the bootstrap's and the nearest-FPR convention's needs."""
    fmrs, keep = cfg["fmr"], 0
    if cfg["bootstrap"]:
        keep = bs.keep_top(fmrs, n_imp)
    if cfg["threshold_convention"] == "insightface":
        keep = max(keep, min(n_imp, 2 * ev.k_needed(fmrs, n_imp) + 2 * bs.TOP_EXTRA))
    return keep


@dataclass
class VariantResult:
    """One template variant's verification: scores, point estimates and bootstrap replicates."""

    stats: ev.ScoreStats
    tar: np.ndarray
    threshold: np.ndarray
    replicates: np.ndarray | None = None  # [R, F] TAR per bootstrap replicate
    insightface: tuple[np.ndarray, np.ndarray] | None = None  # (TAR, threshold) per FMR


def evaluate_variant(cfg: dict, score, n_imp: int, design: bs.Design | None, counts, units_a, units_b=None
                     ) -> VariantResult:
    """Score one variant (``score(keep_top)`` -> ScoreStats) and derive everything from it, rescoring
    with 4 x more kept impostor scores when the bootstrap or the nearest-FPR rule needs them."""
    fmrs, keep = cfg["fmr"], keep_for(cfg, n_imp)
    while True:
        st = score(keep)
        res = VariantResult(st, ev.tar_at_fmr(st.genuine, st.impostor_top, st.n_impostor, fmrs),
                            ev.fmr_thresholds(st.impostor_top, st.n_impostor, fmrs))
        try:
            if cfg["threshold_convention"] == "insightface":
                res.insightface = ev.nearest_fpr_tar(st.genuine, st.impostor_top, st.n_impostor, fmrs)
            if design is not None:
                res.replicates = bs.replicate_tar(bs.sample_of(st, units_a, units_b), design, counts, fmrs)
            return res
        except ev.NeedMoreImpostors as err:
            if keep >= n_imp:
                raise
            keep = min(n_imp, 4 * keep)
            print(f"{err}; rescoring keeping {keep}")


def verification(cfg: dict, device: torch.device) -> tuple[dict[str, VariantResult], str]:
    """Results per template variant, on the pairs the config names; also a description of them."""
    pc, fmrs, chunk, n_boot = cfg["pairs"], cfg["fmr"], cfg["chunk_size"], cfg["bootstrap"]
    modes = [m for m, given in [("path", pc["path"]), ("subjects", pc["subjects"]),
                                ("gallery", pc["gallery"] or pc["probes"])] if given]
    if len(modes) != 1:
        raise TransfiraError("[pairs]: give exactly one of 'path' (pair list), 'subjects' (all-vs-all) "
                             "or 'gallery' + 'probes'")
    mode, ic, lc = modes[0], pc["id_col_name"], pc["label_col_name"]
    variants = list(cfg["templates"].items())
    out: dict[str, VariantResult] = {}
    if mode == "path":
        ref_path = variants[0][1]
        ref_ids, _ = load_id_vectors(ref_path, allow_pickle=cfg["allow_pickle"])
        with PairList(pc["path"], ref_ids, ref_path, cfg["outdir"], pc["chunk_rows"]) as pairs:
            check_pairs(pairs.n_genuine, pairs.n_impostor, pc["path"])
            design = counts = None
            ref_units, n_units = bs.pair_units(len(ref_ids), pairs.genuine_a, pairs.genuine_b)
            if n_boot:
                mat = bs.ImpostorMatrix(n_units)
                for a, b, g in pairs.chunks():
                    mat.add(ref_units[a[~g]], ref_units[b[~g]])
                design, counts = mat.design(), bs.draw_counts(n_units, n_boot, cfg["seed"])
            source = (f"pair list {pc['path']} ({pairs.n_pairs} pairs; bootstrap units: {n_units} groups of "
                      f"templates joined by genuine pairs)")
            for variant, path in variants:
                ids, vectors = load_id_vectors(path, allow_pickle=cfg["allow_pickle"])
                print(f"{variant}: {len(ids)} templates from {path}")
                used = np.flatnonzero(pairs.used)
                perm = np.full(len(ref_ids), -1, np.int64)
                perm[used] = index_of(ids, ref_ids[used], path, pc["path"])
                units = np.zeros(len(ids), np.int64)
                units[perm[used]] = ref_units[used]

                def score(keep, vectors=vectors, perm=perm, variant=variant):
                    return ev.pair_list_stats(vectors, pairs.chunks(perm), pairs.n_genuine, pairs.n_impostor,
                                              fmrs, keep_top=keep, device=device, total=pairs.n_chunks,
                                              progress=f"{variant} pairs")
                out[variant] = evaluate_variant(cfg, score, pairs.n_impostor, design, counts, units)
        return out, source
    if mode == "subjects":
        subj = subjects_table(pc["subjects"], pc, "subjects CSV")
        n_gen, n_imp = ev.count_pairs(subj[lc].to_numpy())
        check_pairs(n_gen, n_imp, pc["subjects"])
        (units,), n_units = unit_codes(subj[lc].to_numpy())
        design = bs.all_design(units, n_units)
        source = f"all-vs-all over {pc['subjects']}"
    else:
        if not (pc["gallery"] and pc["probes"]):
            raise TransfiraError("[pairs]: 'gallery' and 'probes' go together")
        gal = subjects_table(pc["gallery"], pc, "gallery CSV")
        prb = subjects_table(pc["probes"], pc, "probes CSV")
        n_gen, n_imp = ev.count_pairs(gal[lc].to_numpy(), prb[lc].to_numpy())
        check_pairs(n_gen, n_imp, pc["gallery"])
        (gu, pu), n_units = unit_codes(gal[lc].to_numpy(), prb[lc].to_numpy())
        design = bs.cross_design(gu, pu, n_units)
        source = f"gallery {pc['gallery']} x probes {pc['probes']}"
    counts = bs.draw_counts(n_units, n_boot, cfg["seed"]) if n_boot else None
    design = design if n_boot else None
    for variant, path in variants:
        ids, vectors = load_id_vectors(path, allow_pickle=cfg["allow_pickle"])
        print(f"{variant}: {len(ids)} templates from {path}")
        if mode == "subjects":
            rows = index_of(ids, subj[ic], path, pc["subjects"])

            def score(keep, x=vectors[rows], variant=variant):
                return ev.all_vs_all_scores(x, subj[lc].to_numpy(), fmrs, chunk, device=device, keep_top=keep,
                                            progress=f"{variant} all-vs-all")
            out[variant] = evaluate_variant(cfg, score, n_imp, design, counts, units)
        else:
            g, p = index_of(ids, gal[ic], path, pc["gallery"]), index_of(ids, prb[ic], path, pc["probes"])

            def score(keep, x=vectors[g], y=vectors[p], variant=variant):
                return ev.all_vs_all_scores(x, gal[lc].to_numpy(), fmrs, chunk, device=device, probe_features=y,
                                            probe_subjects=prb[lc].to_numpy(), keep_top=keep,
                                            progress=f"{variant} gallery x probes")
            out[variant] = evaluate_variant(cfg, score, n_imp, design, counts, gu, pu)
    return out, source


def load_vector(path: str, n: int, what: str) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise TransfiraError(f"{what} not found: {path}") from None
    except ValueError as err:
        raise TransfiraError(f"{path}: cannot read {what}: {err}") from None
    if x.ndim == 0 or len(x) != n or (x.ndim == 2 and what != "features" and x.shape[1] != 1):
        raise TransfiraError(f"{path}: {what} has shape {x.shape}, expected {n} rows like the labels CSV")
    if not np.isfinite(x).all():
        raise TransfiraError(f"{path}: {what} contains NaN or infinite values")
    return x.astype(np.float32) if what == "features" else x.reshape(-1).astype(np.float64)


def read_quality_scores(im: dict, labels: pd.DataFrame, path: str) -> dict[str, np.ndarray]:
    """The ``scores`` and ``ccas_scores`` columns of ``quality_csv`` (test.py's test_quality.csv), rows
    matched to the labels CSV by the image path column."""
    columns = list(dict.fromkeys(im["scores"] + im["ccas_scores"]))
    if not columns:
        return {}
    pcol, qpath = im["path_col_name"], im["quality_csv"]
    if pcol not in labels.columns:
        raise TransfiraError(f"{path}: missing column '{pcol}' ([images] path_col_name) to match {qpath}")
    quality = read_annotations(qpath, [pcol] + columns, what="quality CSV", text=True)
    index = pd.Index(quality[pcol])
    if not index.is_unique:
        raise TransfiraError(f"{qpath}: duplicate image paths, e.g. {index[index.duplicated()][:3].tolist()}")
    rows = index.get_indexer(labels[pcol])
    if (rows < 0).any():
        raise TransfiraError(f"{qpath}: {int((rows < 0).sum())} image(s) of {path} missing, e.g. "
                             f"{', '.join(labels[pcol][rows < 0].head(3))}")
    quality = quality.iloc[rows].reset_index(drop=True)
    return {col: numeric(quality, col, qpath) for col in columns}


SC_REFERENCES = ("norm", "serfiq")  # training-free FIQA baselines: SC differences to them get intervals


@dataclass
class ImageLevel:
    """What :func:`image_level` measured: Table III rows, ERC curves, the cut tables and the breakdown."""

    table: pd.DataFrame
    curves: dict
    source: str
    cuts: pd.DataFrame | None = None
    breakdown: pd.DataFrame | None = None


def image_measures(im: dict, labels: pd.DataFrame, path: str, n: int) -> dict[str, tuple[np.ndarray, str | None]]:
    """name -> (quality per image, the true label its SC is measured against: 'ccs', 'ccas' or None)."""
    measures: dict[str, tuple[np.ndarray, str | None]] = {}
    for key in ("ccs", "ccas"):
        if im[key]:
            measures[f"predicted {key.upper()}"] = (load_vector(im[key], n, f"predicted {key}"), key)
    for col in im["quality_columns"]:
        measures[col] = (numeric(labels, col, path), "ccs")
    for col, q in read_quality_scores(im, labels, path).items():
        measures[col] = (q, "ccas" if col in im["ccas_scores"] else "ccs")
    return measures


@dataclass
class ImagePairs:
    """The scored image pairs of the image level (:func:`image_pairs`)."""

    stats: ev.ScoreStats  # genuine scores, the top impostor scores, the impostor count
    units: np.ndarray  # [N] the bootstrap unit (subject code) of each image
    genuine_pairs: np.ndarray  # [G, 2] image indices; with an enrolment set both columns are the image's
    replicate_thresholds: np.ndarray | None  # [R, F] each bootstrap replicate's threshold per FMR
    counts: np.ndarray | None  # [R, units] how often each replicate draws each unit
    source: str  # one line: which images, how many pairs


def image_pairs(im: dict, subjects: np.ndarray, feats: np.ndarray, fmrs, chunk: int, device, n_boot: int,
                seed: int) -> ImagePairs:
    """The image pairs of the image level: all-vs-all, or every image against the enrolment set.

    With an enrolment set both columns of the genuine pairs are the image's index (the enrolment photo is
    not discarded), and the bootstrap resamples the subjects of both sides.
    """
    cross = bool(im["enrolment_labels"])
    if cross:
        enrol = read_annotations(im["enrolment_labels"], [im["label_col_name"]], what="enrolment CSV", text=True)
        enrol_feats = load_vector(im["enrolment_features"], len(enrol), "features")
        enrol_subjects = enrol[im["label_col_name"]].to_numpy()
        n_gen, n_imp = ev.count_pairs(enrol_subjects, subjects)
        (enrol_units, units), n_units = unit_codes(enrol_subjects, subjects)
        design = bs.cross_design(enrol_units, units, n_units)
    else:
        n_gen, n_imp = ev.count_pairs(subjects)
        (units,), n_units = unit_codes(subjects)
        enrol_units = units
        design = bs.all_design(units, n_units)
    check_pairs(n_gen, n_imp, im["labels"])
    counts = bs.draw_counts(n_units, n_boot, seed) if n_boot else None
    keep = bs.keep_top(fmrs, n_imp) if n_boot else 0
    extra = dict(probe_features=feats, probe_subjects=subjects) if cross else {}
    while True:
        stats = ev.all_vs_all_scores(enrol_feats if cross else feats, enrol_subjects if cross else subjects, fmrs,
                                      chunk, device=device, keep_top=keep, progress="image pairs", **extra)
        try:
            rep_thr = (bs.replicate_thresholds(bs.sample_of(stats, enrol_units, units), design, counts, fmrs)
                       if n_boot else None)
            break
        except ev.NeedMoreImpostors:
            keep = min(n_imp, 4 * keep)
    pairs = np.repeat(stats.genuine_pairs[:, 1:], 2, axis=1) if cross else stats.genuine_pairs
    n = len(subjects)
    source = (f"{n} images of {len(np.unique(subjects))} subjects from {im['labels']} against "
              f"{len(enrol_subjects)} enrolment images from {im['enrolment_labels']}: {len(stats.genuine)} genuine, "
              f"{stats.n_impostor} impostor pairs (enrolment x images)" if cross else
              f"{n} images of {n_units} subjects from {im['labels']}: {len(stats.genuine)} genuine, "
              f"{stats.n_impostor} impostor pairs (all-vs-all)")
    return ImagePairs(stats, units, pairs, rep_thr, counts, source)


def image_level(cfg: dict, device: torch.device) -> ImageLevel:
    """SC and ERC/EDC per quality measure (paper Table III), with bootstrap intervals over the
    subjects of the images; the curves; optionally the cut tables and a breakdown by columns."""
    im, fmrs, n_boot = cfg["images"], cfg["fmr"], cfg["bootstrap"]
    path = im["labels"]
    extra = list(im["quality_columns"]) + [c for c in im["breakdown"] if c not in im["quality_columns"]]
    labels = read_annotations(path, [im["label_col_name"], im["ccs_col_name"], im["ccas_col_name"]] + extra,
                              what="labels CSV", text=True)
    n = len(labels)
    if not im["features"]:
        raise TransfiraError("[images]: 'features' (the image features .npy) is required with 'labels'")
    feats = load_vector(im["features"], n, "features")
    if feats.ndim != 2:
        raise TransfiraError(f"{im['features']}: features must be [N, D], found shape {feats.shape}")
    true = {"ccs": numeric(labels, im["ccs_col_name"], path), "ccas": numeric(labels, im["ccas_col_name"], path)}
    measures = image_measures(im, labels, path, n)
    measures["ideal (true CCS)"] = (true["ccs"], None)

    scored = image_pairs(im, labels[im["label_col_name"]].to_numpy(), feats, fmrs, cfg["chunk_size"], device, n_boot,
                         cfg["seed"])
    stats, units, pairs = scored.stats, scored.units, scored.genuine_pairs
    thresholds = ev.fmr_thresholds(stats.impostor_top, stats.n_impostor, fmrs)
    uptos = [im["max_discard"], PAUC_UPTO]
    boot: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (SC [R], areas [R, F, 2])
    if n_boot:
        gen_units = units[pairs[:, 0]]
        ercs = {name: bs.ErcBootstrap(q, units, pairs, gen_units) for name, (q, _) in measures.items()}
        boot = {name: (np.full(n_boot, np.nan), np.full((n_boot, len(fmrs), 2), np.nan)) for name in measures}
        for lo, hi in progress_bar(bs.batches(n_boot, n + len(stats.genuine)), desc="image bootstrap",
                                   unit="batch"):
            c = scored.counts[lo:hi]
            for name, (q, target) in measures.items():
                if target:
                    boot[name][0][lo:hi] = bs.weighted_spearman(q, true[target], c[:, units])
                for fi in range(len(fmrs)):
                    thr = scored.replicate_thresholds[lo:hi, fi]
                    ok = ~np.isnan(thr)
                    if ok.any():
                        fnm = stats.genuine[None, :] <= thr[ok, None]
                        boot[name][1][lo:hi][ok, fi] = ercs[name].areas(c[ok], fnm, uptos)
    rows, curves, warned = [], {}, False
    for fi, (fmr, thr) in enumerate(zip(fmrs, thresholds)):
        fnm = stats.genuine <= thr
        for name, (q, target) in measures.items():
            sc = ev.spearman(q, true[target]) if target else np.nan
            row = dict(measure=name, target=target or "", sc=sc, fmr=fmr, threshold=thr,
                       fnmr=np.nan, erc_auc=np.nan, edc_pauc20=np.nan)
            if not np.isnan(thr):
                frac, fnmr = ev.erc_curve(q, pairs, fnm, im["max_discard"])
                curves.setdefault(fmr, {})[name] = (frac, fnmr)
                if np.isnan(fnmr).any() and not warned:
                    warned = True
                    print(f"warning: {name}: no genuine pair is left after discarding "
                          f"{frac[np.isnan(fnmr).argmax()]:.1%} of the images; AUCs beyond are n/a "
                          "(lower [images] max_discard)", file=sys.stderr)
                row.update(fnmr=fnmr[0], erc_auc=ev.erc_area(frac, fnmr, n, im["max_discard"]),
                           edc_pauc20=ev.erc_area(frac, fnmr, n, PAUC_UPTO))
            for col in ("sc", "erc_auc", "edc_pauc20"):
                row[f"{col}_lo"] = row[f"{col}_hi"] = np.nan
            if n_boot:
                sc_r, areas = boot[name]
                if target:
                    row["sc_lo"], row["sc_hi"] = bs.interval(sc_r)
                for ref in SC_REFERENCES:  # paired: the same replicates for both measures
                    if target == "ccs" and ref in measures and ref != name:
                        row[f"sc_minus_{ref}"] = sc - ev.spearman(measures[ref][0], true["ccs"])
                        row[f"sc_minus_{ref}_lo"], row[f"sc_minus_{ref}_hi"] = bs.interval(sc_r - boot[ref][0])
                for k, col in enumerate(("erc_auc", "edc_pauc20")):
                    if not np.isnan(row[col]):
                        row[f"{col}_lo"], row[f"{col}_hi"] = bs.interval(areas[:, fi, k])
            rows.append(row)
    ccas_measures = {name: q for name, (q, target) in measures.items() if target == "ccas"}
    cuts = cut_tables(ccas_measures, true["ccas"], im["recut"], cfg["seed"]) if im["cut_agreement"] else None
    breakdown = (breakdown_table(labels, im["breakdown"], im["bins"], measures, true, ccas_measures, path)
                 if im["breakdown"] else None)
    return ImageLevel(pd.DataFrame(rows), curves, scored.source, cuts, breakdown)


def cut_tables(ccas_measures: dict[str, np.ndarray], true_ccas: np.ndarray, recut: int, seed: int) -> pd.DataFrame:
    """cut_agreement.csv: per predicted-CCAS measure the 2 x 2 at cut 0 on all images; with ``recut`` = N
    also the cut re-estimated on N images drawn with ``seed`` (:func:`transfira.evaluation.best_cut`) and
    the agreement on the other images at cut 0 and at that cut."""
    if not ccas_measures:
        raise TransfiraError("[images] cut_agreement needs a predicted CCAS ('ccas' or 'ccas_scores')")
    n = len(true_ccas)
    if recut >= n:
        raise TransfiraError(f"[images] recut = {recut} leaves no image to test the new cut on ({n} images)")
    labelled = np.sort(np.random.default_rng(seed).permutation(n)[:recut]) if recut else None
    rest = np.setdiff1d(np.arange(n), labelled) if recut else None
    rows = []
    for name, q in ccas_measures.items():
        rows.append(dict(measure=name, images="all", n=n, cut=0.0, **ev.cut_agreement(q, true_ccas)))
        if recut:
            cut = ev.best_cut(q[labelled], true_ccas[labelled])
            for c, what in ((0.0, "rest, cut 0"), (cut, "rest, recut")):
                rows.append(dict(measure=name, images=what, n=len(rest), cut=c,
                                 **ev.cut_agreement(q[rest], true_ccas[rest], c)))
    return pd.DataFrame(rows)


def group_rows(values: pd.Series, edges: list[float] | None) -> dict[str, np.ndarray]:
    """Row indices per group: per bin ``[e_i, e_i+1)`` (the last closed) of a numeric column, else per
    value, a value 'a+b' counting in group a and in group b."""
    if edges is not None:
        x = values.to_numpy(np.float64)
        out = {}
        for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
            last = i == len(edges) - 2
            rows = np.flatnonzero((x >= lo) & ((x <= hi) if last else (x < hi)))
            out[f"[{lo:g}, {hi:g}{']' if last else ')'}"] = rows
        return out
    parts = values.astype(str).str.split("+")
    groups: dict[str, list[int]] = {}
    for i, kinds in enumerate(parts):
        for kind in kinds:
            groups.setdefault(kind, []).append(i)
    return {k: np.array(groups[k]) for k in sorted(groups)}


def breakdown_table(labels: pd.DataFrame, columns: list[str], bins: dict, measures: dict, true: dict,
                    ccas_measures: dict[str, np.ndarray], path: str) -> pd.DataFrame:
    """image_breakdown.csv: per breakdown column and group, the images, the share with true CCAS <= 0,
    the mean true CCS, each measure's SC (point estimates) and each predicted CCAS's agreement at cut 0."""
    rows = []
    for col in columns:
        values = labels[col]
        if col in bins:
            values = pd.Series(numeric(labels, col, path))
        for group, idx in group_rows(values, bins.get(col)).items():
            row = dict(column=col, group=group, images=len(idx),
                       true_ccas_le0=float(np.mean(true["ccas"][idx] <= 0)) if len(idx) else np.nan,
                       mean_true_ccs=float(np.mean(true["ccs"][idx])) if len(idx) else np.nan)
            for name, (q, target) in measures.items():
                if target:
                    row[f"sc {name}"] = ev.spearman(q[idx], true[target][idx]) if len(idx) > 1 else np.nan
            for name, q in ccas_measures.items():
                row[f"agree {name}"] = ev.cut_agreement(q[idx], true["ccas"][idx])["agree"] if len(idx) else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def verification_table(results: dict[str, VariantResult], fmrs: list[float], n_boot: int,
                       compare_to: list[str] = ()) -> pd.DataFrame:
    """results.csv: one row per (variant, FMR) with TAR, threshold, interval and the paired difference
    to ``baseline`` and to each variant of ``compare_to``; then the nearest-FPR rows (convention
    'insightface') when asked for."""
    missing = [ref for ref in compare_to if ref not in results]
    if missing:
        raise TransfiraError(f"compare_to: no template variant {', '.join(missing)} (variants: {', '.join(results)})")
    refs = ["baseline", *compare_to]
    nan = np.full(len(fmrs), np.nan)
    rows = []
    for v, res in results.items():
        lo, hi = bs.interval(res.replicates) if res.replicates is not None else (nan, nan)
        deltas = {}
        for ref in refs:
            base = results.get(ref)
            d_lo = d_hi = nan
            if base is not None and res.replicates is not None:
                d_lo, d_hi = bs.interval(res.replicates - base.replicates)
            col = delta_column(ref)
            deltas[col] = res.tar - base.tar if base is not None else nan
            deltas[f"{col}_lo"], deltas[f"{col}_hi"] = d_lo, d_hi
        for i, f in enumerate(fmrs):
            rows.append(dict(variant=v, fmr=f, tar=res.tar[i], threshold=res.threshold[i], tar_lo=lo[i],
                             tar_hi=hi[i], **{k: x[i] for k, x in deltas.items()}, convention="spec"))
    for v, res in results.items():
        if res.insightface is not None:
            for f, t, h in zip(fmrs, *res.insightface):
                rows.append(dict(variant=f"{v} ({INSIGHTFACE})", fmr=f, tar=t, threshold=h, tar_lo=np.nan,
                                 tar_hi=np.nan, **{f"{delta_column(r)}{e}": np.nan for r in refs
                                                   for e in ("", "_lo", "_hi")}, convention="insightface"))
    return pd.DataFrame(rows)


def run(cfg: dict[str, Any]) -> None:
    """Evaluate what the config names; write results.{md,csv}, image_results.csv and the plots."""
    import matplotlib

    matplotlib.use("Agg")
    out, fmrs, n_boot = Path(cfg["outdir"]), cfg["fmr"], cfg["bootstrap"]
    device = resolve_device(str(cfg["device"]))
    md = ["# TransFIRA evaluation", ""]
    written = []
    if cfg["templates"]:
        results, source = verification(cfg, device)
        table = verification_table(results, fmrs, n_boot, cfg["compare_to"])
        save_csv(table, out / "results.csv")
        plot_roc({v: r.stats for v, r in results.items()}, fmrs, out / "roc.png")
        written += ["results.csv", "roc.png"]
        md += verification_markdown(table, fmrs, source, next(iter(results.values())).stats, n_boot, cfg["seed"],
                                    cfg["compare_to"])
    if cfg["images"]["labels"]:
        level = image_level(cfg, device)
        table, curves, source = level.table, level.curves, level.source
        save_csv(table, out / "image_results.csv")
        written.append("image_results.csv")
        for fmr, c in curves.items():
            plot_erc(c, fmr, out / f"erc_fmr{fmt_fmr(fmr)}.png")
            written.append(f"erc_fmr{fmt_fmr(fmr)}.png")
        names = list(dict.fromkeys(table.measure))
        header = ["Measure", "SC"] + [h for f in fmrs for h in (f"AUC@{fmt_fmr(f)}", f"pAUC20@{fmt_fmr(f)}")]
        body = []
        for m in names:
            sub = table[table.measure == m]
            r0 = sub.iloc[0]
            body.append([m, fmt_ci(r0.sc, r0.sc_lo, r0.sc_hi) + (f" ({r0.target.upper()})" if r0.target else "")]
                        + [fmt_ci(getattr(r, c), getattr(r, f"{c}_lo"), getattr(r, f"{c}_hi"))
                           for r in sub.itertuples() for c in ("erc_auc", "edc_pauc20")])
        differences = [f"{m} minus {ref}: {fmt_ci(r[f'sc_minus_{ref}'], r[f'sc_minus_{ref}_lo'], r[f'sc_minus_{ref}_hi'], True)}"
                       for r in table.drop_duplicates("measure").to_dict("records") for m in [r["measure"]]
                       for ref in SC_REFERENCES if f"sc_minus_{ref}" in r and not pd.isna(r[f"sc_minus_{ref}"])
                       and SC_REFERENCES.index(ref) > (SC_REFERENCES.index(m) if m in SC_REFERENCES else -1)]
        md += ["## Image-level recognizability (paper Table III)", "", f"{source}.", "",
               markdown_table(header, body), "",
               *(["SC differences (Spearman with the true CCS, paired over the same bootstrap replicates; "
                  "above 0: ranks the images better than the baseline): " + "; ".join(differences) + ".", ""]
                 if differences else []),
               "SC: Spearman correlation with the true value in brackets. AUC: area under FNMR versus "
               f"fraction of images discarded over [0, {cfg['images']['max_discard']}]; pAUC20: over "
               "[0, 0.2] (ISO/IEC 29794-1:2024 EDC); both unnormalized, threshold fixed at the FMR on all "
               "image pairs; n/a where the FMR cannot be measured."
               + (f" [lo, hi]: 95 % percentile interval of a bootstrap over the images' subjects ({n_boot} "
                  f"replicates, seed {cfg['seed']}; thresholds recomputed in every replicate)." if n_boot else ""),
               ""]
        if level.cuts is not None:
            save_csv(level.cuts, out / "cut_agreement.csv")
            written.append("cut_agreement.csv")
            md += cuts_markdown(level.cuts)
        if level.breakdown is not None:
            save_csv(level.breakdown, out / "image_breakdown.csv")
            written.append("image_breakdown.csv")
            md += breakdown_markdown(level.breakdown)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(md))
    print(f"wrote {', '.join(['results.md'] + written)} to {out}")
