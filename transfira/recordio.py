"""Read InsightFace / MXNet RecordIO (``.rec`` + ``.idx``) without MXNet, and extract images.

Format (dmlc-core ``recordio``): each record part is ``<uint32 magic 0xced7230a>
<uint32 lrecord>`` + payload + zero padding to a multiple of 4. ``lrecord`` holds the
continuation flag in its top 3 bits (0 whole, 1 first, 2 middle, 3 last) and the length
in the low 29. The writer splits a payload wherever the magic occurs at a 4-aligned
position and drops it; the reader joins the parts with the magic re-inserted.
A payload is an IRHeader ``<IfQQ`` (flag, label, id, id2), then ``flag`` float32
labels when flag > 0, then the encoded image.
"""
from __future__ import annotations

import contextlib
from array import array
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import pandas as pd

from .errors import TransfiraError
from .io import save_csv
from .progress import progress as progress_bar

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
LENGTH_MASK = (1 << 29) - 1


def read_index(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse an ``.idx`` file (``key<TAB>offset`` lines) into int64 (keys, offsets) sorted by key."""
    path = Path(path)
    if not path.is_file():
        raise TransfiraError(f"index file not found: {path}")
    try:
        df = pd.read_csv(path, sep=r"\s+", header=None, names=["key", "offset"], dtype=np.int64)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise TransfiraError(f"{path}: not a RecordIO index (lines 'key<TAB>offset'): {err}") from None
    df = df.drop_duplicates("key", keep="last").sort_values("key")  # MXNet keeps the last
    return df["key"].to_numpy(), df["offset"].to_numpy()


def _where(path: object, key: object, offset: int) -> str:
    return f"{path}: record {key} at byte {offset}"


def read_payload(f: BinaryIO, offset: int, key: object = "?", path: object = "?") -> bytes:
    """Read the record starting at byte ``offset`` of the open ``.rec`` ``f``; rejoin split parts."""
    where = _where(path, key, offset)
    f.seek(offset)
    parts: list[bytes] = []
    pos = offset
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise TransfiraError(f"{where}: truncated (part header at byte {pos} cut off by end of file)")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise TransfiraError(f"{where}: bad magic 0x{magic:08x} at byte {pos} (expected 0x{MAGIC:08x});"
                                 " does the .idx belong to this .rec?")
        cflag, length = lrec >> 29, lrec & LENGTH_MASK
        if cflag not in ((0, 1) if not parts else (2, 3)):
            raise TransfiraError(f"{where}: unexpected continuation flag {cflag} at byte {pos}")
        data = f.read(length)
        if len(data) < length:
            raise TransfiraError(f"{where}: truncated (part at byte {pos} needs {length} bytes, "
                                 f"file has {len(data)})")
        parts.append(data)
        if cflag in (0, 3):
            return MAGIC_BYTES.join(parts)
        pos += 8 + length + (-length) % 4
        f.seek(pos)


@dataclass(frozen=True)
class Record:
    """One unpacked record: IRHeader fields, the float32 labels and the image bytes."""
    flag: int
    label: np.ndarray  # [flag] float32 when flag > 0, else [1] holding the header's label
    id: int
    id2: int
    image: bytes

    @property
    def subject(self) -> int:
        """Identity label (the first label, as InsightFace reads it)."""
        return int(self.label[0])


def unpack(payload: bytes, where: str = "record") -> Record:
    """Split a payload into IRHeader, labels and image bytes (``mx.recordio.unpack``)."""
    if len(payload) < HEADER.size:
        raise TransfiraError(f"{where}: payload of {len(payload)} bytes is shorter than the "
                             f"{HEADER.size}-byte header")
    flag, label, id_, id2 = HEADER.unpack_from(payload)
    start = HEADER.size + 4 * flag
    if len(payload) < start:
        raise TransfiraError(f"{where}: header announces {flag} labels, payload has {len(payload)} bytes")
    labels = (np.frombuffer(payload, np.float32, flag, HEADER.size) if flag
              else np.array([label], np.float32))
    return Record(flag, labels, id_, id2, payload[start:])


@dataclass(frozen=True)
class Meta:
    """InsightFace meta record 0: image keys, then one record per identity."""
    image_keys: range  # range(1, label[0])
    identity_keys: range  # range(label[0], label[1])


class RecordFile:
    """An indexed RecordIO file: ``{prefix}.rec`` + ``{prefix}.idx`` in ``rec_dir``."""

    def __init__(self, rec_dir: str | Path, prefix: str = "train"):
        self.rec_path = Path(rec_dir) / f"{prefix}.rec"
        if not self.rec_path.is_file():
            raise TransfiraError(f"record file not found: {self.rec_path}")
        self.keys, self.offsets = read_index(self.rec_path.with_suffix(".idx"))

    def open(self) -> BinaryIO:
        """A new read handle (one per thread)."""
        return open(self.rec_path, "rb", buffering=1 << 20)

    def lookup(self, keys: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offsets of ``keys`` and a mask of which keys are in the index (offset -1 if not)."""
        keys = np.asarray(keys, np.int64)
        pos = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)  # the index is never empty
        found = self.keys[pos] == keys
        return np.where(found, self.offsets[pos], -1), found

    def offset(self, key: int) -> int:
        """Byte offset of ``key``; a missing key is a :class:`TransfiraError`."""
        (off,), (found,) = self.lookup([key])
        if not found:
            raise TransfiraError(f"{self.rec_path}: record {key} is not in {self.rec_path.with_suffix('.idx')}")
        return int(off)

    def read(self, key: int, f: BinaryIO | None = None) -> Record:
        """Read and unpack record ``key`` (opens the file unless a handle is given)."""
        if f is None:
            with self.open() as f:
                return self.read(key, f)
        return self.read_at(f, key, self.offset(key))

    def read_at(self, f: BinaryIO, key: int, offset: int) -> Record:
        """Read and unpack the record at ``offset`` (``key`` only names it in errors)."""
        return unpack(read_payload(f, offset, key, self.rec_path), _where(self.rec_path, key, offset))

    @cached_property
    def meta(self) -> Meta | None:
        """InsightFace's meta record 0 (two labels, no image), or None if there is none."""
        if self.keys[0] != 0:
            return None
        rec = self.read(0)
        if rec.flag < 2 or rec.image:
            return None
        a, b = int(rec.label[0]), int(rec.label[1])
        return Meta(range(1, a), range(a, b))

    def image_keys(self) -> np.ndarray:
        """Keys of image records: the meta record's range if present, else every key."""
        if self.meta is None:
            return self.keys
        r = self.meta.image_keys
        return self.keys[(self.keys >= r.start) & (self.keys < r.stop)]


def image_name(subject: int, key: int) -> str:
    """Relative output path of an image: ``{subject:06d}/{key:08d}.jpg``."""
    return f"{subject:06d}/{key:08d}.jpg"


_PATH_RE = r"(?:^|/)(\d+)/(\d+)\.jpg$"


def read_subset_csv(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Read subset CSVs (``path`` = ``{subject}/{key}.jpg``, ``subject_id``) into (key, subject)."""
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise TransfiraError(f"CSV not found: {path}")
        df = pd.read_csv(path)
        for col in ("path", "subject_id"):
            if col not in df.columns:
                raise TransfiraError(f"{path}: missing column '{col}' (columns: {', '.join(map(str, df.columns))})")
        parsed = df["path"].astype(str).str.extract(_PATH_RE)
        bad = parsed[0].isna().to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise TransfiraError(f"{path}: row {i + 2}: cannot parse subject/key from path "
                                 f"{df['path'].iloc[i]!r} (expected '{{subject:06d}}/{{key:08d}}.jpg'; "
                                 f"{int(bad.sum())} such rows)")
        subj = pd.to_numeric(df["subject_id"], errors="coerce")
        off = (subj != parsed[0].astype(np.int64)).to_numpy()
        if off.any():
            i = int(np.argmax(off))
            raise TransfiraError(f"{path}: row {i + 2}: subject_id {df['subject_id'].iloc[i]!r} does not match "
                                 f"path {df['path'].iloc[i]!r}")
        frames.append(pd.DataFrame({"key": parsed[1].astype(np.int64), "subject": subj.astype(np.int64)}))
    df = pd.concat(frames, ignore_index=True).drop_duplicates()
    dup = df["key"].duplicated(keep=False).to_numpy()
    if dup.any():
        raise TransfiraError(f"key {int(df['key'][dup].iloc[0])} is listed with different subjects in {list(paths)}")
    return df.reset_index(drop=True)


def scan_extracted(out: str | Path) -> pd.DataFrame:
    """(key, subject) of complete images already under ``out`` (temp files are ignored)."""
    keys, subjects = array("q"), array("q")  # 8 bytes an image: WebFace42M has 42 M
    if os.path.isdir(out):
        for d in os.scandir(out):
            if d.is_dir() and d.name.isdigit():
                n = len(keys)
                keys.extend(int(e.name[:-4]) for e in os.scandir(d.path)
                            if e.name.endswith(".jpg") and e.name[:-4].isdigit())
                subjects.extend([int(d.name)] * (len(keys) - n))
    return pd.DataFrame({"key": np.frombuffer(keys, np.int64), "subject": np.frombuffer(subjects, np.int64)})


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temp file and rename it onto ``path``, creating the folder on demand.

    A plain-string twin of :func:`transfira.io.atomic_path` for the per-image hot loop
    (pathlib costs as much as the write itself there).
    """
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f = open(tmp, "wb")
        with f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class Summary:
    """What an extraction did. ``mismatched`` holds (key, csv subject, record label)."""
    written: int = 0
    skipped: int = 0
    not_images: int = 0
    missing: list[int] = field(default_factory=list)
    mismatched: list[tuple[int, int, int]] = field(default_factory=list)
    extracted: array = field(default_factory=lambda: array("q"))  # key, subject, key, ... written

    def __str__(self) -> str:
        s = f"written {self.written}, skipped {self.skipped} (already complete), missing {len(self.missing)}"
        if self.missing:
            s += f" (keys not in the index: {self.missing[:5]}{' ...' if len(self.missing) > 5 else ''})"
        if self.mismatched:
            s += f", label mismatches {len(self.mismatched)} (key, csv subject, record label: {self.mismatched[:5]})"
        if self.not_images:
            s += f", records without image {self.not_images}"
        return s


def extract(rec: RecordFile, keys: np.ndarray, subjects: np.ndarray | None, out: str | Path,
            workers: int = 4, allow_mismatch: bool = False, progress: bool = True) -> Summary:
    """Write records ``keys`` as ``out/{subject:06d}/{key:08d}.jpg`` (original bytes).

    ``subjects`` gives the target folder per key and is checked against the record label
    (a mismatch is not written unless ``allow_mismatch``); ``None`` uses the record label.
    Existing files are skipped (files are written atomically, so existing means complete).
    Threads work on disjoint chunks of the offset-sorted keys, each with its own handle.
    """
    out = str(out)
    keys = np.asarray(keys, np.int64)
    subjects = np.full(len(keys), -1, np.int64) if subjects is None else np.asarray(subjects, np.int64)
    offsets, found = rec.lookup(keys)
    summary = Summary(missing=keys[~found].tolist())
    order = np.argsort(offsets[found], kind="stable")
    keys, subjects, offsets = keys[found][order], subjects[found][order], offsets[found][order]
    n = len(keys)
    size = min(10_000, max(1, -(-n // (4 * max(workers, 1)))))
    stop, lock = threading.Event(), threading.Lock()
    bar = progress_bar(total=n, unit="img", disable=not progress)

    def work(lo: int, hi: int) -> Summary:
        s, done = Summary(), 0
        with rec.open() as f:
            for key, subject, off in zip(keys[lo:hi].tolist(), subjects[lo:hi].tolist(), offsets[lo:hi].tolist()):
                if stop.is_set():
                    break
                done += 1
                if done % 256 == 0:
                    with lock:
                        bar.update(256)
                if subject >= 0 and os.path.exists(f"{out}/{image_name(subject, key)}"):
                    s.skipped += 1
                    continue
                r = rec.read_at(f, key, off)
                if not r.image:
                    s.not_images += 1
                    continue
                if subject < 0:
                    subject = r.subject
                elif subject != r.subject:
                    s.mismatched.append((key, subject, r.subject))
                    if not allow_mismatch:
                        continue
                write_atomic(f"{out}/{image_name(subject, key)}", r.image)
                s.written += 1
                s.extracted.extend((key, subject))
        with lock:
            bar.update(done % 256)
        return s

    with ThreadPoolExecutor(max(workers, 1)) as pool:
        futures = [pool.submit(work, lo, min(lo + size, n)) for lo in range(0, n, size)]
        try:
            for fut in as_completed(futures):
                s = fut.result()
                summary.written += s.written
                summary.skipped += s.skipped
                summary.not_images += s.not_images
                summary.mismatched += s.mismatched
                summary.extracted += s.extracted
        except BaseException:
            stop.set()
            for fut in futures:
                fut.cancel()
            raise
        finally:
            bar.close()
    summary.mismatched.sort()
    return summary


def extract_subsets(rec_dir: str | Path, csvs: Sequence[str | Path], out: str | Path, workers: int = 4,
                    prefix: str = "train", allow_mismatch: bool = False, progress: bool = True) -> Summary:
    """Extract the images listed in subset CSVs (``path``, ``subject_id``) from ``{prefix}.rec``."""
    df = read_subset_csv(csvs)
    rec = RecordFile(rec_dir, prefix)
    return extract(rec, df["key"].to_numpy(), df["subject"].to_numpy(), out, workers, allow_mismatch, progress)


def extract_all(rec_dir: str | Path, out: str | Path, csv: str | Path, workers: int = 4,
                prefix: str = "train", progress: bool = True) -> Summary:
    """Dump every image of ``{prefix}.rec`` under its record label; write ``csv`` (path, subject_id)
    listing everything now in ``out`` that came from this rec (including earlier runs' files)."""
    rec = RecordFile(rec_dir, prefix)
    keys = rec.image_keys()
    done = scan_extracted(out)
    done = done[done["key"].isin(keys)].drop_duplicates("key")  # a key in two folders: list it once
    todo = keys[~np.isin(keys, done["key"].to_numpy())]
    summary = extract(rec, todo, None, out, workers, progress=progress)
    summary.skipped += len(done)
    new = np.frombuffer(summary.extracted, np.int64).reshape(-1, 2)
    rows = pd.concat([done, pd.DataFrame(new, columns=["key", "subject"])])
    rows = rows.sort_values("key")
    save_csv(pd.DataFrame({"path": [image_name(s, k) for k, s in zip(rows["key"], rows["subject"])],
                           "subject_id": rows["subject"].to_numpy()}), csv)
    return summary
