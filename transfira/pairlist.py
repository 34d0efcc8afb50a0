"""Pair lists of 1:1 verification protocols, read in bounded memory.

Two formats: a CSV with header ``template_a,template_b,label`` (1 genuine, 0 impostor), or
InsightFace's space-separated ``ijbc_template_pair_label.txt`` (``template_a template_b label``,
no header; a header line with these names is accepted too). The file is parsed once in chunks
of ``chunk_rows`` rows; each chunk's template ids are mapped to rows of a reference id list
(vectorized, ``pandas.Index.get_indexer``) and appended as int32 triples (row a, row b, label)
to a temporary binary file next to the outputs, which is then memory-mapped: 12 bytes per pair
on disk (188 MB for IJB-C's 15.7M pairs) and O(chunk_rows) in memory, whatever the file's size.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from .errors import TransfiraError
from .io import format_rows

PAIR_COLUMNS = ["template_a", "template_b", "label"]


def pair_format(path: str | Path) -> tuple[str, int | None]:
    """(separator, header row or None) of a pair file, from its first line."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except FileNotFoundError:
        raise TransfiraError(f"pairs file not found: {path}") from None
    except UnicodeDecodeError:
        raise TransfiraError(f"{path}: not a text file") from None
    if not first.strip():
        raise TransfiraError(f"{path}: no rows")
    if "," in first:
        cols = [c.strip() for c in first.strip().split(",")]
        missing = [c for c in PAIR_COLUMNS if c not in cols]
        if missing:
            raise TransfiraError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
                                 f"columns present: {', '.join(cols)}")
        return ",", 0
    tokens = first.split()
    if tokens[:3] == PAIR_COLUMNS:
        return r"\s+", 0
    if len(tokens) != 3:
        raise TransfiraError(f"{path}: expected a CSV with header {','.join(PAIR_COLUMNS)} or space-separated "
                             f"'template_a template_b label' rows, first line has {len(tokens)} fields")
    return r"\s+", None


class PairList:
    """A pair file as rows of ``ref_ids`` (memory-mapped int32 [P, 3]: row a, row b, label).

    ``ref_path`` names the file the reference ids come from (in the error for unknown ids).
    ``used[i]``: whether reference row i occurs in a pair. Use as a context manager (the
    temporary file is removed on exit).
    """

    def __init__(self, path: str | Path, ref_ids: np.ndarray, ref_path: str | Path, workdir: str | Path,
                 chunk_rows: int = 1 << 18):
        self.path = str(path)
        sep, header = pair_format(path)
        index = pd.Index(np.asarray(ref_ids).astype(str))
        if not index.is_unique:
            raise TransfiraError(f"{ref_path}: duplicate template ids, e.g. {index[index.duplicated()][:3].tolist()}")
        Path(workdir).mkdir(parents=True, exist_ok=True)
        fd, self.cache = tempfile.mkstemp(prefix=".pairs-", suffix=".bin", dir=workdir)
        self.used = np.zeros(len(index), bool)
        self.n_genuine = self.n_pairs = 0
        gen_a, gen_b = [], []
        try:
            reader = pd.read_csv(path, sep=sep, header=header, names=None if header == 0 else PAIR_COLUMNS,
                                 usecols=PAIR_COLUMNS, dtype=str, keep_default_na=False, chunksize=chunk_rows,
                                 skipinitialspace=True)
            with os.fdopen(fd, "wb") as out:
                for chunk in reader:
                    rows = self._rows(chunk, index, ref_path)
                    out.write(rows.tobytes())
                    gen = rows[:, 2] == 1
                    gen_a.append(rows[gen, 0])
                    gen_b.append(rows[gen, 1])
                    self.used[rows[:, 0]] = True
                    self.used[rows[:, 1]] = True
                    self.n_genuine += int(gen.sum())
                    self.n_pairs += len(rows)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
            self.close()
            raise TransfiraError(f"{path}: cannot parse pairs: {str(err).strip()}") from None
        except BaseException:
            self.close()
            raise
        if self.n_pairs == 0:
            self.close()
            raise TransfiraError(f"{path}: no rows")
        self.genuine_a, self.genuine_b = np.concatenate(gen_a), np.concatenate(gen_b)
        self.rows = np.memmap(self.cache, dtype=np.int32, mode="r", shape=(self.n_pairs, 3))
        self.chunk_rows = chunk_rows

    @property
    def n_impostor(self) -> int:
        return self.n_pairs - self.n_genuine

    def _rows(self, chunk: pd.DataFrame, index: pd.Index, ref_path) -> np.ndarray:
        first = self.n_pairs
        label = chunk["label"]
        bad = np.flatnonzero(~label.isin(["0", "1"]).to_numpy())
        if len(bad):
            raise TransfiraError(f"{self.path}: column 'label' must be 1 (genuine) or 0 (impostor), found "
                                 f"{label.iloc[bad[:3]].tolist()} at row(s) {format_rows(bad + first)}")
        out = np.empty((len(chunk), 3), np.int32)
        for k, col in enumerate(PAIR_COLUMNS[:2]):
            ids = chunk[col]
            rows = index.get_indexer(ids)
            if (rows < 0).any():
                missing, where = pd.unique(ids[rows < 0]), format_rows(np.flatnonzero(rows < 0) + first)
                raise TransfiraError(f"{ref_path}: template id(s) from {self.path} not in the file, e.g. "
                                     f"{', '.join(missing[:5])} (row(s) {where})")
            out[:, k] = rows
        out[:, 2] = (label == "1").to_numpy()
        return out

    def chunks(self, perm: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(rows a, rows b, genuine) per chunk; ``perm`` maps reference rows to another file's rows."""
        for i in range(0, self.n_pairs, self.chunk_rows):
            block = np.asarray(self.rows[i : i + self.chunk_rows])
            a, b = block[:, 0].astype(np.int64), block[:, 1].astype(np.int64)
            if perm is not None:
                a, b = perm[a], perm[b]
            yield a, b, block[:, 2] == 1

    @property
    def n_chunks(self) -> int:
        return -(-self.n_pairs // self.chunk_rows)

    def close(self) -> None:
        self.rows = None
        if os.path.exists(self.cache):
            os.unlink(self.cache)

    def __enter__(self) -> "PairList":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
