"""test.py's job: features from the deployed encoder, CCS/CCAS from the predictor, templates.

One DataLoader pass decodes each test image once and feeds it to both networks (and to
SER-FIQ's stochastic passes when ``[quality]`` enables it); any step can also run alone,
reading the other steps' outputs from files aligned with the annotation rows.
Aggregation itself is :mod:`transfira.aggregation` (paper eq. 10), quality scores and
score-weighted templates :mod:`transfira.quality`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import distributed as dist_utils
from ..aggregation import VARIANTS, WEIGHT_EPS, aggregate_variants
from ..backbone import resolve_device
from ..config import REQUIRED
from ..data import AUG_DEFAULTS, read_annotations
from ..errors import TransfiraError
from ..io import pickle_refused, save_csv, save_id_vectors
from ..networks import CCAS, CCS, FEATURES, SERFIQ, embed_and_score
from ..quality import (QUALITY_SCHEMA, certainty_ratio, embedding_norm, external_scores, score_names,
                      score_templates)

QUALITY = "test_quality.csv"

SCHEMA: dict[str, Any] = {
    "backbone_type": "onnx",
    "model_path": "",  # deployed encoder (ONNX): template features
    "predictor_model_path": "",  # ONNX giving the predictor backbone's architecture ('' = model_path)
    "embedding_size": REQUIRED,
    "checkpoint_path": "",  # predictor state dict (backbone.*, ccs_layer.*, ccas_layer.*)
    "head_hidden": 0,  # as in train.py: 0 = linear heads
    "outdir": "output/test_results/",
    "batch_size": 64,
    "save_features": True,  # keep test_features.npy (always kept when not aggregated in the same run)
    "device": "auto",
    "num_workers": 2,
    "normalize_features": False,  # L2-normalize each feature before aggregating
    "on_bad_image": "error",  # "error" | "skip" (NaN rows, listed in test_skipped.csv, left out of templates)
    "flip_test": False,  # encoder feature = f(image) + f(mirrored image) (InsightFace's flip test)
    "allow_pickle": False,  # read legacy pickled features / scores (trusted files only)
    "aug": dict(AUG_DEFAULTS),
    "data": {"data_dir": "", "annotations": REQUIRED, "path_col_name": "path", "id_col_name": "template_id",
             "batch_size": 0,  # 0: the top-level batch_size
             "landmark_columns": []},  # 10 columns x1, y1, ..., x5, y5: align to the ArcFace template first
    "quality": QUALITY_SCHEMA,  # FIQA scores beside CCS / CCAS (transfira.quality)
}


def run(cfg: dict[str, Any], generate_features: bool = False, predict_scores: bool = False,
             aggregate: bool = False, variants: list[str] | None = None, features_path: str | None = None,
             ccs_path: str | None = None, ccas_path: str | None = None) -> dict[str, Path]:
    """Run the requested steps of stage 3; return ``{name: path}`` of the files written."""
    if not (generate_features or predict_scores or aggregate):
        raise TransfiraError("nothing to do: give --generate_features, --predict_scores and/or --aggregate_features")
    if cfg["on_bad_image"] not in ("error", "skip"):
        raise TransfiraError(f"on_bad_image must be 'error' or 'skip', got '{cfg['on_bad_image']}'")
    variants = list(variants or ["baseline"])
    quality = score_names(cfg["quality"])
    data = cfg["data"]
    columns = [data["path_col_name"], data["id_col_name"]] if aggregate or quality else [data["path_col_name"]]
    frame = read_annotations(data["annotations"], columns)
    taken = [n for n in quality if n in columns]
    if taken:
        raise TransfiraError(f"score '{taken[0]}' has the name of a [data] column: rename it")
    outdir = Path(cfg["outdir"])
    outdir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    features = ccs = ccas = serfiq = None
    with dist_utils.process_group(resolve_device(cfg["device"])) as info:
        if generate_features or predict_scores:
            features, ccs, ccas, serfiq = embed_and_score(cfg, frame, generate_features, predict_scores,
                                                          "serfiq" in quality, info.device)
    if not info.is_main:  # under torchrun the other ranks help with the forward passes only
        return {}
    if generate_features or predict_scores:
        if generate_features:
            written[FEATURES] = outdir / FEATURES
        if predict_scores:
            written.update({CCS: outdir / CCS, CCAS: outdir / CCAS})
        if serfiq is not None:
            written[SERFIQ] = outdir / SERFIQ
    load = lambda given, default, what, ndim: load_rows(
        given or outdir / default, frame, data, what, ndim, cfg["allow_pickle"])
    if aggregate:
        if features is None:
            features = load(features_path, FEATURES, "features", 2)
        if ccs is None and _needs(variants, 1):
            ccs = load(ccs_path, CCS, "CCS", 1)
        if ccas is None and _needs(variants, 0):
            ccas = load(ccas_path, CCAS, "CCAS", 1)
        written.update(write_templates(features, frame[data["id_col_name"]].to_numpy(), ccs, ccas, variants,
                                       cfg["normalize_features"], outdir))
    if quality:
        def found(current, given, default, what, ndim, wanted, needed):
            """An input of the quality scores: computed now, else its file (an error if ``needed`` and absent)."""
            if current is not None or not wanted:
                return current
            path = Path(given or outdir / default)
            return load(path, default, what, ndim) if path.is_file() or needed else None

        features = found(features, features_path, FEATURES, "features", 2, "norm" in quality, aggregate)
        ccs = found(ccs, ccs_path, CCS, "CCS", 1, True, aggregate and "cr" in quality)
        ccas = found(ccas, ccas_path, CCAS, "CCAS", 1, True, aggregate and "cr" in quality)
        serfiq = found(serfiq, None, SERFIQ, "SER-FIQ scores", 1, "serfiq" in quality, aggregate)
        scores = quality_scores(cfg, frame, quality, features, ccs, ccas, serfiq, required=aggregate)
        if scores is not None and (ccs is None or ccas is None):
            print(f"note: {QUALITY} not written: it needs the predicted CCS / CCAS (--predict_scores)")
        elif scores is not None:
            table = frame[columns].assign(ccs=ccs, ccas=ccas, **scores)
            save_csv(table, outdir / QUALITY)
            written[QUALITY] = outdir / QUALITY
            print(f"quality scores ({', '.join(quality)}) of {len(table)} images -> {outdir / QUALITY}")
        if aggregate:
            written.update(save_templates(
                score_templates(features, frame[data["id_col_name"]].to_numpy(), scores, cfg["quality"]["rescale"],
                                cfg["normalize_features"]), outdir, {name: f"'{name}'" for name in scores}))
    if aggregate and generate_features and not cfg["save_features"]:
        del features
        written.pop(FEATURES).unlink()
    return written


def write_templates(features: np.ndarray, template_ids: np.ndarray, ccs: np.ndarray | None,
                    ccas: np.ndarray | None, variants: list[str], normalize: bool, outdir: Path) -> dict[str, Path]:
    """Aggregate, write ``templates_<variant>.npz`` and ``templates_<variant>_summary.csv``, report fallbacks."""
    results = aggregate_variants(features, template_ids, ccs if _needs(variants, 1) else None,
                                 ccas if _needs(variants, 0) else None, variants, normalize)
    return save_templates(results, outdir, {name: "predicted-CCS" for name in results})


def save_templates(results: dict[str, Any], outdir: Path, weight_names: dict[str, str]) -> dict[str, Path]:
    """Write ``templates_<name>.npz`` and ``templates_<name>_summary.csv`` for each result, report fallbacks.

    ``weight_names`` says what weighted each result (named in the weight-guard warning).
    """
    written = {}
    for name, (ids, vectors, summary) in results.items():
        path, summary_path = outdir / f"templates_{name}.npz", outdir / f"templates_{name}_summary.csv"
        save_id_vectors(path, ids, vectors)
        save_csv(summary, summary_path)
        written[path.name], written[summary_path.name] = path, summary_path
        total = len(summary)
        notes = []
        if "filter_fallback" in summary and summary["filter_fallback"].any():
            notes.append(f"{summary['filter_fallback'].sum()} of {total} templates have no image with predicted "
                         "CCAS > 0, all their images were kept")
        if "weight_fallback" in summary and summary["weight_fallback"].any():
            notes.append(f"{summary['weight_fallback'].sum()} of {total} templates have a {weight_names[name]} "
                         f"weight sum <= {WEIGHT_EPS:g}, their unweighted mean was used")
        empty = int((summary["images_usable"] == 0).sum())
        if empty:
            notes.append(f"{empty} of {total} templates have no usable image and were left out")
        for note in notes:
            print(f"warning: {name}: {note} (see {summary_path})", file=sys.stderr)
        print(f"{name}: {len(ids)} templates -> {path}")
    return written


def quality_scores(cfg: dict[str, Any], frame: pd.DataFrame, names: list[str], features: np.ndarray | None,
                   ccs: np.ndarray | None, ccas: np.ndarray | None, serfiq: np.ndarray | None,
                   required: bool = False) -> dict[str, np.ndarray] | None:
    """``{score: [N] values}`` of the enabled ``names``; None (after a note) when an input is missing.

    With ``required`` a missing input is an error instead.
    """
    needs = {"norm": ("features", features, "--generate_features or --features_path"),
             "cr": ("predicted CCS / CCAS", ccs if ccas is not None else None, "--predict_scores"),
             "serfiq": ("SER-FIQ scores", serfiq, "--generate_features or --predict_scores")}
    missing = [(name, *needs[name]) for name in names if name in needs and needs[name][1] is None]
    if missing:
        name, what, _, how = missing[0]
        message = f"score '{name}' needs the {what} ({how} with [quality] enabling it)"
        if required:
            raise TransfiraError(message)
        print(f"note: {QUALITY} not written: {message}")
        return None
    data, out = cfg["data"], {}
    paths = frame[data["path_col_name"]].astype(str).tolist()
    for name in names:
        if name == "norm":
            out[name] = embedding_norm(features)
        elif name == "cr":
            out[name] = certainty_ratio(ccs, ccas)
        elif name == "serfiq":
            out[name] = np.asarray(serfiq, np.float64)
        else:
            out[name] = external_scores(name, cfg["quality"]["external"][name], paths, data["path_col_name"])
    return out


def _needs(variants: list[str], which: int) -> bool:
    """Whether any variant uses the filter (``which`` 0) or the weights (1)."""
    return any(VARIANTS[v][which] for v in variants)


def load_rows(path: str | Path, frame: pd.DataFrame, data: dict[str, Any], what: str, ndim: int,
              allow_pickle: bool = False) -> np.ndarray:
    """Read a per-image ``.npy`` (features [N, D] or scores [N]) aligned with the annotation rows.

    A legacy pickled file (a dict keyed by image path or row number, or an object array)
    is read only with ``allow_pickle``.
    """
    path = Path(path)
    if not path.is_file():
        raise TransfiraError(f"{what} file not found: {path} (compute it in this run or pass its path)")
    try:
        array = _load_npy(path)
    except (OSError, ValueError) as err:
        raise TransfiraError(f"{path}: cannot read {what} (expected a .npy file): {err}") from None
    if array is None and not allow_pickle:
        raise pickle_refused(path)
    if array is None:
        array = _unpickled_rows(np.load(path, allow_pickle=True), frame[data["path_col_name"]], path)
    if not isinstance(array, np.ndarray):
        raise TransfiraError(f"{path}: expected a .npy array of {what}, found {type(array).__name__}")
    if ndim == 1 and array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != ndim:
        raise TransfiraError(f"{path}: {what} must be a {ndim}-D array, found shape {array.shape}")
    if len(array) != len(frame):
        raise TransfiraError(f"{path} has {len(array)} rows of {what} but {data['annotations']} has "
                             f"{len(frame)} rows: they must be aligned")
    return array


def _load_npy(path: Path) -> np.ndarray | None:
    """A memory-mapped ``.npy``; None when the file holds Python objects (a pickle)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # object arrays cannot be memory-mapped: confirm it is a pickle
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:
            if "allow_pickle" in str(err):
                return None
            raise


def _unpickled_rows(obj: np.ndarray, paths: pd.Series, source: Path) -> np.ndarray:
    """A legacy pickle as an array in annotation order: dict by path or row number, or object array."""
    if obj.dtype == object and obj.shape == () and isinstance(obj.item(), dict):
        mapping = obj.item()
        for keys in (paths.tolist(), list(range(len(paths)))):
            if all(k in mapping for k in keys):
                return np.stack([np.asarray(mapping[k], dtype=np.float32) for k in keys])
        missing = next(p for p in paths if p not in mapping)
        raise TransfiraError(f"{source}: pickled dict has no entry for image '{missing}' (keys are neither "
                             "the annotation paths nor row numbers)")
    try:
        return np.stack([np.asarray(v, dtype=np.float32) for v in obj]) if obj.dtype == object else obj
    except (TypeError, ValueError) as err:
        raise TransfiraError(f"{source}: cannot read the pickled rows: {err}") from None


