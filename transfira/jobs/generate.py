"""Stage 1 (``generate.py``): embed every dataset table, compute class centers and labels.

Tables are processed in dependency order: every ``*_gallery`` first (centers only), then
standalone tables (centers from themselves, then labels), then ``*_probes`` (labelled
against the centers of the matching gallery). See SPEC §2-3 for names and outputs.
All tables are embedded first (under ``torchrun`` by every rank, see
:func:`features.extract_outputs`); centers and labels are then computed once, by rank 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import distributed as dist_utils
from ..backbone import check_embedding_size, load_backbone, resolve_device
from ..config import REQUIRED
from ..data import AUG_DEFAULTS, dataset_from_table, read_annotations
from ..errors import TransfiraError
from ..features import extract_outputs, readable_mask, write_skipped
from ..io import file_fingerprint, load_id_vectors, save_csv, save_id_vectors, save_npy
from ..labels import center_similarities, certainty_ratio, class_centers, class_index

TABLE_SCHEMA = {
    "data_dir": REQUIRED,
    "annotations": REQUIRED,  # "" disables the table
    "path_col_name": "path",
    "label_col_name": "subject_id",
    "centers_path": "",  # *_probes: centers of the gallery (else <gallery>_centers.npz in outdir)
    "landmark_columns": [],  # 10 columns x1, y1, ..., x5, y5: align each image to the ArcFace template first
}

SCHEMA: dict[str, Any] = {
    "backbone_type": "onnx",
    "model_path": REQUIRED,
    "embedding_size": REQUIRED,
    "outdir": REQUIRED,
    "batch_size": 64,
    "num_workers": 2,
    "device": "auto",
    "save_features": True,
    "on_bad_image": "error",  # or "skip": unreadable images get NaN labels and are listed
    "normalize_centers": False,  # average L2-normalized embeddings instead of raw ones
    "leave_one_out": False,  # own center without the image itself (no-gallery tables)
    "save_cr": False,  # also write CR-FIQA's certainty ratio as column `cr`
    "chunk_size": 0,  # rows per similarity block (0: automatic, ~256 MB)
    "allow_pickle": False,  # read legacy pickled centers files
    "aug": dict(AUG_DEFAULTS),
    "*": TABLE_SCHEMA,
}


def table_order(config: dict[str, Any]) -> list[str]:
    """Enabled dataset tables: galleries, then standalone tables, then probes."""
    tables = [k for k, v in config.items() if isinstance(v, dict) and k != "aug" and v["annotations"]]
    rank = lambda name: 0 if name.endswith("_gallery") else 2 if name.endswith("_probes") else 1  # noqa: E731
    return sorted(tables, key=rank)


def run(config: dict[str, Any], allow_pickle: bool = False) -> dict[str, Path]:
    """Run stage 1 for every enabled table; return the labels CSV written per table."""
    if config["on_bad_image"] not in ("error", "skip"):
        raise TransfiraError(f"on_bad_image must be 'error' or 'skip', got '{config['on_bad_image']}'")
    tables = table_order(config)
    if not tables:
        raise TransfiraError("no dataset table with non-empty 'annotations' in the config")
    outdir = Path(config["outdir"])
    outdir.mkdir(parents=True, exist_ok=True)
    frames = {name: _read_table(name, config[name]) for name in tables}  # fail early on bad CSVs
    with dist_utils.process_group(resolve_device(config["device"])) as info:
        backbone = load_backbone(config["backbone_type"], config["model_path"]).to(info.device).eval()
        check_embedding_size(backbone, config["embedding_size"], config["aug"]["crop_dim"], config["model_path"])
        embedded = {name: _embed(name, config, frames[name], backbone, info.device) for name in tables}
    if not info.is_main:  # under torchrun: the other ranks helped with the features only
        return {}
    centers: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    written = {}
    for name in tables:
        table, frame = config[name], frames[name]
        ids = frame[table["label_col_name"]].to_numpy()
        ids = ids.astype(str) if ids.dtype == object else ids  # mixed numbers and names: compare as text
        features, skipped = embedded.pop(name)
        rows = np.flatnonzero(readable_mask(len(frame), skipped))
        features = features if len(rows) == len(frame) else features[rows]  # a memmap stays on disk
        try:
            if name.endswith("_probes"):
                center_ids, mu, counts = _gallery_centers(name, table, config, centers, allow_pickle)
                leave_one_out = False
            else:
                center_ids, mu = class_centers(features, ids[rows], config["normalize_centers"], device=info.device)
                counts = np.bincount(class_index(ids[rows], center_ids), minlength=len(center_ids))
                save_id_vectors(outdir / f"{name}_centers.npz", center_ids, mu)
                centers[name] = (center_ids, mu, counts)
                leave_one_out = config["leave_one_out"]
            if not name.endswith("_gallery"):
                written[name] = _write_labels(name, frame, features, ids[rows], rows, center_ids, mu, counts,
                                              leave_one_out, config, info.device, outdir)
        except TransfiraError as err:
            raise TransfiraError(f"[{name}] {err}") from None
        finally:
            del features
        if not config["save_features"]:
            (outdir / f"{name}_features.npy").unlink(missing_ok=True)
    return written


def _embed(name: str, config: dict[str, Any], frame: pd.DataFrame, backbone, device) -> tuple[np.ndarray, list]:
    """``{name}_features.npy`` (and ``{name}_skipped.csv``); under torchrun every rank takes part,
    and only rank 0 gets the features back."""
    table = config[name]
    dataset = dataset_from_table(frame, table, config["aug"], f"[{name}] {table['annotations']}")
    arrays, skipped = extract_outputs(backbone, dataset,
                                      {"embedding": (Path(config["outdir"]) / f"{name}_features.npy",
                                                     config["embedding_size"])},
                                      config["batch_size"], config["num_workers"], device,
                                      config["on_bad_image"], desc=name,
                                      fingerprint=[file_fingerprint(config["model_path"]), config["aug"],
                                                   table["landmark_columns"]])
    if arrays:
        write_skipped(frame, skipped, Path(config["outdir"]) / f"{name}_skipped.csv")
    return arrays.get("embedding"), skipped


def _read_table(name: str, table: dict[str, Any]) -> pd.DataFrame:
    try:
        return read_annotations(table["annotations"], [table["path_col_name"], table["label_col_name"]])
    except TransfiraError as err:
        raise TransfiraError(f"[{name}] {err}") from None


def _gallery_centers(name: str, table: dict, config: dict, centers: dict, allow_pickle: bool):
    """Centers for a ``<x>_probes`` table: ``centers_path``, this run's gallery, or a saved file."""
    gallery = name[: -len("_probes")] + "_gallery"
    if table["centers_path"]:
        center_ids, mu = load_id_vectors(table["centers_path"], allow_pickle or config["allow_pickle"])
        return center_ids, mu, None
    if gallery in centers:
        return centers[gallery]
    saved = Path(config["outdir"]) / f"{gallery}_centers.npz"
    if saved.is_file():
        center_ids, mu = load_id_vectors(saved)
        return center_ids, mu, None
    raise TransfiraError(f"no centers for the probes: set centers_path, add a [{gallery}] table, "
                         f"or provide {saved}")


def _write_labels(name, frame, features, ids, rows, center_ids, mu, counts, leave_one_out, config, device, outdir):
    """Write ``{name}_ccs.npy``, ``{name}_nnccs.npy`` and ``{name}_labels.csv`` (input rows + labels).

    ``features`` and ``ids`` are those of the readable images, at CSV positions ``rows``;
    the other rows get NaN labels.
    """
    n = len(frame)
    ccs = np.full(n, np.nan, np.float32)
    nnccs = np.full(n, np.nan, np.float32)
    ccs[rows], nnccs[rows] = center_similarities(
        features, ids, center_ids, mu, leave_one_out=leave_one_out, counts=counts,
        normalize=config["normalize_centers"], chunk_size=config["chunk_size"] or None, device=device)
    labels = frame.copy()
    labels["ccs"], labels["nnccs"], labels["ccas"] = ccs, nnccs, ccs - nnccs
    if config["save_cr"]:
        labels["cr"] = certainty_ratio(ccs, nnccs)
    save_npy(outdir / f"{name}_ccs.npy", ccs)
    save_npy(outdir / f"{name}_nnccs.npy", nnccs)
    save_csv(labels, outdir / f"{name}_labels.csv")
    print(f"[{name}] {n} images, {len(center_ids)} centers: mean CCS {np.nanmean(ccs):.4f}, "
          f"mean CCAS {np.nanmean(ccs - nnccs):.4f}, CCAS > 0 for {np.mean(ccs[rows] > nnccs[rows]):.1%}")
    return outdir / f"{name}_labels.csv"

