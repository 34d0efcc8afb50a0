"""score.py's job: predicted CCS / CCAS for a folder or a CSV of images, streamed to a CSV.

Output rows: the input's own columns (a folder gives ``path``, relative to it), then
``ccs, ccas, recognizable`` (= ccas > 0) and ``error`` (empty when the image was scored;
the decoding error of an unreadable file otherwise: the run goes on). With a face
detector (``detect``), each photo gives one row per face, with ``face`` (0 = best
detection), the box ``box_x1, box_y1, box_x2, box_y2``, ``det_score`` and the landmarks
``x1, y1, ..., x5, y5`` (the ``landmark_columns`` of test.py); a photo without a face
gets one row with ``error = no face found``.

``on_bad_image = "error"`` stops at the first batch with an unreadable file instead.

The output is appended batch by batch (flushed each time, header once). A rerun with the
same ``out`` skips the paths already in it, so an interrupted run resumes; a line torn
by a crash is dropped first (with the other rows of its photo), so that photo is redone.
Under ``torchrun`` the batches are shared out and rank 0 alone appends every rank's rows in
batch order (:func:`run`): the same file as one process, resumable with any number of them.
"""
from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import distributed as dist_utils
from ..alignment import LANDMARK_COLUMNS
from ..backbone import resolve_device
from ..config import REQUIRED, apply_schema, read_toml
from ..data import AUG_DEFAULTS, ImageDataset, make_loader, read_annotations
from ..errors import TransfiraError
from ..predictor import Predictor, check_channel_order, predictor_settings
from ..progress import log, progress

SCHEMA: dict[str, Any] = {
    "backbone_type": "onnx",
    "model_path": REQUIRED,  # the ONNX encoder the predictor was trained from
    "checkpoint_path": "",  # predictor checkpoint; "": the one shipped in pretrained_weights/ for this encoder
    "embedding_size": 0,  # 0: the encoder's output size
    "head_hidden": 0,  # ignored: the heads' layout is read from the checkpoint
    "images": "",  # a folder of images (searched recursively) ...
    "csv": "",  # ... or a CSV with a path column (paths relative to data_dir)
    "data_dir": "",
    "path_col_name": "path",
    "out": "scores.csv",
    "batch_size": 64,
    "num_workers": 2,
    "device": "auto",
    "channel_order": "RGB",  # "BGR": the files hold swapped channels (e.g. written by OpenCV from RGB arrays)
    "detect": "",  # SCRFD ONNX model (5 keypoints): detect, align and score every face of raw photos
    "det_threshold": 0.5,
    "on_bad_image": "skip",  # "skip": an unreadable file gets an error row and the run goes on; "error": stop
    "aug": dict(AUG_DEFAULTS),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".gif")
SCORE_COLUMNS = ["ccs", "ccas", "recognizable"]
BOX_COLUMNS = ["box_x1", "box_y1", "box_x2", "box_y2"]
FACE_COLUMNS = ["face", *BOX_COLUMNS, "det_score", *LANDMARK_COLUMNS]
NO_FACE = "no face found"


def list_images(folder: str | Path) -> list[str]:
    """Image files under ``folder`` (by suffix, recursively), as sorted POSIX paths relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TransfiraError(f"images: no such folder or image file: {folder}")
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise TransfiraError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return found


def input_table(cfg: dict[str, Any]) -> tuple[pd.DataFrame, str, Path]:
    """``(frame, path column, data_dir)`` of the images to score: the folder's files or the CSV's rows."""
    if bool(cfg["images"]) == bool(cfg["csv"]):
        raise TransfiraError("give exactly one of images (a folder) and csv (a CSV with a path column)")
    if cfg["images"] and Path(cfg["images"]).is_file():  # one image file
        return pd.DataFrame({"path": [Path(cfg["images"]).name]}), "path", Path(cfg["images"]).parent
    if cfg["images"]:
        return pd.DataFrame({"path": list_images(cfg["images"])}), "path", Path(cfg["images"])
    column = cfg["path_col_name"]
    frame = read_annotations(cfg["csv"], [column])
    frame[column] = frame[column].astype(str)
    return frame, column, Path(cfg["data_dir"])


def output_columns(frame: pd.DataFrame, detect: bool) -> tuple[pd.DataFrame, list[str]]:
    """The input's columns, then the score (and face) columns and ``error``. Input columns with
    those names (e.g. the ``ccs``, ``ccas`` labels of generate.py) are kept as ``<name>_csv``."""
    added = SCORE_COLUMNS + (FACE_COLUMNS if detect else []) + ["error"]
    clash = {c: f"{c}_csv" for c in added if c in frame.columns}
    if clash:
        frame = frame.rename(columns=clash)
        log(f"input column(s) {', '.join(clash)} kept as {', '.join(clash.values())}")
    return frame, list(frame.columns) + added


def done_paths(out: Path, columns: list[str], path_col: str) -> set[str]:
    """Paths already in ``out`` (resume); drops a torn last line and the other rows of its photo.

    Raises when ``out`` has another header (another input or mode).
    """
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    raw = out.read_bytes()
    torn = not raw.endswith(b"\n")
    lines = raw.splitlines(keepends=True)
    header = next(csv.reader([lines[0].decode("utf-8", "replace")]), [])
    if header != columns:
        raise TransfiraError(f"{out} exists with other columns ({', '.join(header)}); it is not a run of this "
                             f"input and mode: remove it or choose another out")
    if torn:
        lines = lines[:-1]
        if len(lines) > 1:  # the torn line may belong to the photo of the last complete one: redo that photo
            last = _path_of(lines[-1], columns.index(path_col))
            while len(lines) > 1 and _path_of(lines[-1], columns.index(path_col)) == last:
                lines.pop()
        with open(out, "r+b") as f:
            f.truncate(sum(map(len, lines)))
        log(f"{out}: dropped an incomplete last line (interrupted run), its photo is scored again")
    if len(lines) <= 1:
        return set()
    frame = pd.read_csv(io.BytesIO(b"".join(lines)), usecols=[path_col], dtype=str, keep_default_na=False)
    return set(frame[path_col])


def _path_of(line: bytes, index: int) -> str | None:
    row = next(csv.reader([line.decode("utf-8", "replace")]), [])
    return row[index] if index < len(row) else None


def _one_line(text: str) -> str:
    """An error message on one CSV line (resume reads the output line by line)."""
    return " ".join(str(text).split())


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Photos of different sizes stay a list (detection mode)."""
    return items


class _ToArray:
    """PIL image -> uint8 HWC tensor (picklable, for DataLoader workers), channels swapped for BGR files."""

    def __init__(self, swap: bool):
        self.swap = swap

    def __call__(self, image) -> torch.Tensor:
        array = np.array(image)
        return torch.from_numpy(np.ascontiguousarray(array[:, :, ::-1]) if self.swap else array)


class _Swapped:
    """``transform`` applied after swapping the channels (files written BGR)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        from PIL import Image

        return self.transform(Image.fromarray(np.ascontiguousarray(np.asarray(image)[:, :, ::-1])))


def score_config(config: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The job's config from a TOML file (a score.toml; or a test.toml / train.toml, whose predictor is
    used as :meth:`Predictor.from_config` would) and the command line's values ``given``, which
    win; ``images`` given on the command line replaces the file's ``csv`` and vice versa."""
    raw = read_toml(config) if config else {}
    if "outdir" in raw or "checkpoint_outdir" in raw:  # a test.toml or train.toml: its predictor
        settings = predictor_settings(raw, config)
        raw = {"model_path": settings["model_path"], "checkpoint_path": str(settings["checkpoint_path"]),
               "device": settings["device"], "embedding_size": settings["embedding_size"] or 0,
               "backbone_type": settings["backbone_type"], **({"aug": settings["aug"]} if settings["aug"] else {})}
    if "images" in given:
        raw.pop("csv", None)
    if "csv" in given:
        raw.pop("images", None)
    return apply_schema({**raw, **given}, SCHEMA, source=config or "command line")


def run(cfg: dict[str, Any], predictor: Predictor | None = None) -> dict[str, Any]:
    """Score the images of ``cfg`` (see SCHEMA) into ``cfg["out"]``; return counts and the path.

    Under ``torchrun`` the batches of the images still to score are dealt out in turn (batch k,
    the same images as in one process, to rank k mod W, each rank on its own device); after each
    round every rank agrees on errors and rank 0 alone appends the gathered rows, in batch order.
    The output is thus byte for byte that of one process, and an interrupted run resumes from
    what was flushed with any number of processes. Every rank returns the same counts.
    """
    if cfg["batch_size"] < 1 or cfg["num_workers"] < 0:
        raise TransfiraError("batch_size must be >= 1 and num_workers >= 0")
    if cfg["on_bad_image"] not in ("error", "skip"):
        raise TransfiraError(f"on_bad_image must be 'error' or 'skip', got '{cfg['on_bad_image']}'")
    swap = check_channel_order(cfg["channel_order"]) == "BGR"
    frame, path_col, data_dir = input_table(cfg)
    detect = bool(cfg["detect"])
    out = Path(cfg["out"])
    frame, columns = output_columns(frame, detect)
    with dist_utils.process_group(predictor.device if predictor else resolve_device(cfg["device"])) as info:
        n_done, done = dist_utils.on_main(_done_rows, out, columns, path_col, frame)
        todo = frame[~done].reset_index(drop=True)
        if predictor is None:
            options = dict(device=str(info.device) if info.distributed else cfg["device"], aug=cfg["aug"],
                           embedding_size=cfg["embedding_size"] or None, batch_size=cfg["batch_size"],
                           backbone_type=cfg["backbone_type"])
            predictor = Predictor.from_files(cfg["model_path"], cfg["checkpoint_path"], **options)
            if predictor.source:
                log(f"no checkpoint given: using the shipped predictor {predictor.source} for {cfg['model_path']}")
        if detect and predictor.detector is None:
            from ..detection import SCRFD

            predictor.detector = SCRFD(cfg["detect"], threshold=cfg["det_threshold"])

        def score(batch) -> tuple[int, pd.DataFrame]:
            """(images, rows) of one of this rank's batches."""
            rows = (_face_rows if detect else _image_rows)(predictor, todo, batch, cfg["on_bad_image"])
            return len(batch) if detect else len(batch["index"]), rows.reindex(columns=columns)

        counts = {"images": len(frame), "skipped_done": len(frame) - len(todo), "scored": 0, "errors": 0, "faces": 0}
        if n_done:
            log(f"{out}: {n_done} image(s) already scored, {len(todo)} to go")
        if info.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
        header = info.is_main and (not out.is_file() or out.stat().st_size == 0)
        rounds = dist_utils.dealt_rounds(_loader(predictor, cfg, todo[path_col].tolist(), data_dir, swap), score,
                                         len(range(0, len(todo), cfg["batch_size"])), "scoring")
        with open(out, "a", newline="") if info.is_main else contextlib.nullcontext() as f, \
                progress(total=len(todo), desc="scoring", unit="img") as bar:
            for images, rows in (part for parts in rounds for part in parts):  # batch order
                if info.is_main:
                    rows.to_csv(f, header=header, index=False)
                    f.flush()
                    header = False
                bad = rows["error"].fillna("") != ""
                counts["errors"] += int(bad.sum())
                counts["scored"] += int((~bad).sum())
                counts["faces"] += int((~bad).sum()) if detect else 0
                bar.update(images)
    what = f"{counts['faces']} face(s) scored" if detect else f"{counts['scored']} image(s) scored"
    log(f"{what}, {counts['errors']} error row(s), {counts['skipped_done']} already done -> {out}")
    return {**counts, "out": out}


def _done_rows(out: Path, columns: list[str], path_col: str, frame: pd.DataFrame) -> tuple[int, np.ndarray]:
    """The number of paths already in ``out`` and the mask of ``frame``'s rows among them (rank 0 reads)."""
    done = done_paths(out, columns, path_col)
    return len(done), frame[path_col].isin(done).to_numpy()


def _loader(predictor: Predictor, cfg: dict[str, Any], paths: list[str], data_dir: Path, swap: bool):
    """This rank's batches of ``paths`` (all of them in one process): decoded arrays of whole photos
    with ``detect``, else the predictor's input tensors."""
    if cfg["detect"]:
        dataset = ImageDataset(data_dir, paths, _ToArray(swap))
    else:
        dataset = ImageDataset(data_dir, paths, _Swapped(predictor.transform) if swap else predictor.transform)
    mine = torch.utils.data.Subset(dataset, dist_utils.dealt_rows(len(paths), cfg["batch_size"]))
    if cfg["detect"]:
        return torch.utils.data.DataLoader(mine, batch_size=cfg["batch_size"], num_workers=cfg["num_workers"],
                                           collate_fn=_collate)
    return make_loader(mine, cfg["batch_size"], cfg["num_workers"], persistent=False, device=predictor.device)


def _check_readable(errors: list[str], policy: str) -> None:
    """With ``on_bad_image = "error"``: one error naming the batch's unreadable files, if any."""
    bad = [_one_line(e) for e in errors if e]
    if policy == "error" and bad:
        raise TransfiraError(f"cannot read image{'s' if len(bad) > 1 else ''} {'; '.join(bad)} "
                             "(set on_bad_image = 'skip' to give them an error row and go on)")


def _image_rows(predictor: Predictor, todo: pd.DataFrame, batch: dict[str, Any], policy: str = "skip") -> pd.DataFrame:
    """One row per image of a DataLoader batch: scores of the readable ones, errors of the others."""
    _check_readable(batch["error"], policy)
    ok = batch["ok"].numpy().astype(bool)
    rows = todo.iloc[batch["index"].numpy()].reset_index(drop=True)
    ccs, ccas = np.full(len(rows), np.nan, np.float32), np.full(len(rows), np.nan, np.float32)
    if ok.any():
        ccs[ok], ccas[ok] = predictor.forward(batch["image"][torch.as_tensor(ok)])
    rows["ccs"], rows["ccas"] = ccs, ccas
    rows["recognizable"] = np.where(ok, ccas > 0, None)
    rows["error"] = [_one_line(e) for e in batch["error"]]
    return rows


def _face_rows(predictor: Predictor, todo: pd.DataFrame, items: list[dict[str, Any]],
               policy: str = "skip") -> pd.DataFrame:
    """One row per face found in a batch of photos (detect, align, score); error rows for the rest."""
    _check_readable([item["error"] for item in items], policy)
    records, crops = [], []
    for item in items:
        base = todo.iloc[item["index"]].to_dict()
        if not item["ok"]:
            records.append({**base, "error": _one_line(item["error"])})
            continue
        faces, found = predictor.align_faces(item["image"].numpy())
        if not faces:
            records.append({**base, "error": NO_FACE})
        crops += faces
        for k in range(len(faces)):
            records.append({**base, "face": k, **dict(zip(BOX_COLUMNS, found.boxes[k].tolist())),
                            "det_score": float(found.scores[k]),
                            **dict(zip(LANDMARK_COLUMNS, found.landmarks[k].reshape(-1).tolist())), "error": ""})
    rows = pd.DataFrame.from_records(records)
    faces = rows["error"] == ""
    scores = predictor.score(crops)
    rows.loc[faces, "ccs"], rows.loc[faces, "ccas"] = scores.ccs, scores.ccas
    rows.loc[faces, "recognizable"] = scores.recognizable
    if "face" in rows:
        rows["face"] = rows["face"].astype("Int64")
    return rows
