"""File I/O at the edges: atomic writes, id -> vector files without pickle, legacy opt-in."""
from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from .errors import TransfiraError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    Readers never see a half-written file, and a failed job leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_fingerprint(path: str | Path) -> list:
    """``[path, size, mtime_ns]`` of a file (``[]`` for no file): tells whether an input changed."""
    if not path or not Path(path).is_file():
        return []
    stat = Path(path).stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` atomically (no pickle)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def save_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (values JSON cannot hold are written as text)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def save_csv(frame, path: str | Path) -> None:
    """Write a pandas DataFrame as CSV atomically, without the index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def save_id_vectors(path: str | Path, ids, vectors: np.ndarray) -> None:
    """Store an id -> vector mapping as ``.npz`` with arrays ``ids`` [K] and ``vectors`` [K, D].

    Integer ids are kept as int64, anything else as unicode strings, so no pickle is needed.
    """
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        ids = ids.astype(str)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ValueError(f"ids {ids.shape} and vectors {vectors.shape} do not match")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=ids, vectors=vectors)


def pickle_refused(path: str | Path) -> TransfiraError:
    """The error for a pickled file read without the user's opt-in."""
    return TransfiraError(f"{path} is a pickle (the reference's format); unpickling can run code from the file, "
                          "so it is refused. If you trust the file, pass --allow-pickle.")


def load_id_vectors(path: str | Path, allow_pickle: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read an id -> vector file written by :func:`save_id_vectors`.

    A legacy pickled ``dict`` saved with ``np.save`` (the reference's ``*_centers.npy`` and
    ``templates_*.npy``) is read only with ``allow_pickle=True``: unpickling runs code
    from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise TransfiraError(f"file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" not in str(err):
            raise TransfiraError(f"{path}: cannot read: {err}") from None
        data = None
    except (zipfile.BadZipFile, OSError, EOFError) as err:  # truncated or corrupt archive
        raise TransfiraError(f"{path}: cannot read (truncated or corrupt file?): {err}") from None
    if data is not None:
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise TransfiraError(f"{path}: expected an .npz with arrays 'ids' and 'vectors'")
        with data:
            if not {"ids", "vectors"} <= set(data.files):
                raise TransfiraError(f"{path}: expected arrays 'ids' and 'vectors', found {data.files}")
            try:
                ids, vectors = data["ids"], data["vectors"].astype(np.float32, copy=False)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
                raise TransfiraError(f"{path}: cannot read (truncated or corrupt file?): {err}") from None
            if vectors.ndim != 2 or ids.ndim != 1 or len(ids) != len(vectors):
                raise TransfiraError(f"{path}: 'ids' {ids.shape} and 'vectors' {vectors.shape} do not match")
            return ids, vectors
    if not allow_pickle:
        raise pickle_refused(path)
    obj = np.load(path, allow_pickle=True)
    mapping = obj.item() if obj.dtype == object and obj.shape == () else None
    if not isinstance(mapping, dict) or not mapping:
        raise TransfiraError(f"{path}: expected a pickled dict of id -> vector")
    ids = np.asarray(list(mapping.keys()))
    vectors = np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in mapping.values()])
    return ids, vectors


def read_annotations(csv_path: str | Path, columns: Sequence[str], *, what: str = "CSV file",
                     text: bool = False) -> pd.DataFrame:
    """Read a CSV and check that ``columns`` are present, have no empty value, and that it has rows.

    ``what`` names the file in the not-found error; ``text=True`` reads every column as text
    (ids such as ``007`` stay as written; numbers are parsed later, e.g. by :func:`numeric_column`).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise TransfiraError(f"{what} not found: {csv_path}")
    try:
        frame = pd.read_csv(csv_path, **(dict(dtype=str, keep_default_na=False) if text else {}))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise TransfiraError(f"{csv_path}: cannot parse CSV: {str(err).strip()}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TransfiraError(
            f"{csv_path}: missing column(s) {', '.join(map(repr, missing))}; "
            f"columns present: {', '.join(map(str, frame.columns))}"
        )
    if frame.empty:
        raise TransfiraError(f"{csv_path}: no rows")
    for col in columns:
        empty = frame[col].isna().to_numpy()
        if text:
            empty = empty | (frame[col].str.strip() == "").to_numpy()
        bad = np.flatnonzero(empty)
        if len(bad):
            raise TransfiraError(f"{csv_path}: empty value in column '{col}' at row(s) {format_rows(bad)}")
    return frame


def numeric_column(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``column`` as float64 and the (0-based) positions of its non-numeric or non-finite values."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
    return values, np.flatnonzero(~np.isfinite(values))


def format_rows(indices: np.ndarray, most: int = 5) -> str:
    """CSV row numbers (1 = first data row) of ``indices``, the first few."""
    shown = ", ".join(str(i + 1) for i in indices[:most])
    return shown + (f" and {len(indices) - most} more" if len(indices) > most else "")
