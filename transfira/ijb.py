"""IJB-B / IJB-C 1:1 verification in InsightFace's release layout: meta files, test table, synthetic release.

The release (``<root>/loose_crop/<image>`` and ``<root>/meta/``) describes every face crop
in three space-separated text files without a header, ``{prefix}`` = ``ijbc`` or ``ijbb``:

- ``{prefix}_face_tid_mid.txt``: ``image template_id media_id``, one row per image;
- ``{prefix}_template_pair_label.txt``: ``template_a template_b label`` (1 genuine, 0 impostor);
- ``{prefix}_name_5pts_score.txt``: ``image x1 y1 ... x5 y5 detector_score`` (left eye, right
  eye, nose tip, left and right mouth corner in the loose crop's pixels).

:func:`build_test_table` joins the first and the last into the per-image table that
``test.py``'s data loader reads (``path, template_id, media_id, x1 .. y5, det_score``; the
loader aligns each crop to the ArcFace template with :mod:`transfira.alignment`).
``python -m transfira.ijb synth OUTDIR`` writes a small synthetic release in the exact formats.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from .alignment import ARCFACE_TEMPLATE, LANDMARK_COLUMNS, warp_affine
from .errors import TransfiraError
from .io import atomic_path, format_rows, save_csv

PREFIXES = ("ijbc", "ijbb")
IMAGES_DIR = "loose_crop"
META = {"tid_mid": "{}_face_tid_mid.txt", "pairs": "{}_template_pair_label.txt",
        "landmarks": "{}_name_5pts_score.txt"}
TID_MID_COLUMNS = ["path", "template_id", "media_id"]
PAIR_COLUMNS = ["template_a", "template_b", "label"]
LANDMARK_FILE_COLUMNS = ["path", *LANDMARK_COLUMNS, "det_score"]
TEST_COLUMNS = ["path", "template_id", "media_id", *LANDMARK_COLUMNS, "det_score"]


def meta_path(root: str | Path, prefix: str, which: str) -> Path:
    """``<root>/meta/<prefix>_...txt`` for ``which`` in :data:`META`."""
    if prefix not in PREFIXES:
        raise TransfiraError(f"prefix must be one of {', '.join(PREFIXES)}, got '{prefix}'")
    return Path(root) / "meta" / META[which].format(prefix)


def read_fields(path: str | Path, columns: list[str], integer: list[str], real: list[str]) -> pd.DataFrame:
    """A headerless whitespace-separated file as a frame with ``columns`` (vectorized C parser).

    ``integer`` / ``real`` columns are parsed as int64 / float64, the others kept as text;
    blank lines are ignored. A line with the wrong number of fields or a non-numeric value
    is an error naming the file and the line (1 = first line of the file).
    """
    path = Path(path)
    layout = " ".join(columns)
    if not path.is_file():
        raise TransfiraError(f"IJB meta file not found: {path} (expected lines '{layout}')")
    kinds = {i: np.int64 if c in integer else np.float64 if c in real else str for i, c in enumerate(columns)}
    try:  # fast path: typed columns straight from the parser (15.7M pair lines in seconds)
        frame = pd.read_csv(path, sep=r"\s+", header=None, dtype=kinds, engine="c")
        if frame.shape[1] == len(columns) and np.isfinite(frame[[columns.index(c) for c in real]].to_numpy()).all() \
                and not frame.isna().to_numpy().any():
            frame.columns = columns
            return frame
    except pd.errors.EmptyDataError:
        raise TransfiraError(f"{path}: empty file (expected lines '{layout}')") from None
    except ValueError:  # a bad value or line (ParserError is a ValueError): find it below
        pass
    return _diagnose(path, columns, integer, real)


def _diagnose(path: Path, columns: list[str], integer: list[str], real: list[str]) -> pd.DataFrame:
    """The slow text path of :func:`read_fields`: raise naming the first bad line(s), or return the frame."""
    layout = " ".join(columns)
    try:
        frame = pd.read_csv(path, sep=r"\s+", header=None, dtype=str, skip_blank_lines=False,
                            keep_default_na=False, na_values=[""], engine="c")
    except pd.errors.ParserError as err:
        message = str(err).strip().removeprefix("Error tokenizing data. C error: ")
        raise TransfiraError(f"{path}: {message} (expected {len(columns)} fields per line: '{layout}')") from None
    if frame.shape[1] != len(columns):
        raise TransfiraError(f"{path}: line 1 has {frame.shape[1]} fields, expected {len(columns)}: '{layout}'")
    frame.columns = columns
    frame = frame[frame.notna().any(axis=1)]  # blank lines; the index keeps the line numbers
    lines = frame.index.to_numpy()
    short = np.flatnonzero(frame.isna().any(axis=1).to_numpy())
    if len(short):
        raise TransfiraError(f"{path}: missing fields on line(s) {format_rows(lines[short])} "
                             f"(expected {len(columns)} fields per line: '{layout}')")
    out = {}
    for col in columns:
        if col not in integer and col not in real:
            out[col] = frame[col].astype(str).to_numpy()
            continue
        values = pd.to_numeric(frame[col], errors="coerce").to_numpy(np.float64)
        ok = np.isfinite(values)
        if col in integer:
            ok &= values == np.round(values)
        bad = np.flatnonzero(~ok)
        if len(bad):
            raise TransfiraError(f"{path}: field '{col}' is not {'an integer' if col in integer else 'a number'} "
                                 f"on line(s) {format_rows(lines[bad])} (e.g. '{frame[col].iloc[bad[0]]}')")
        out[col] = values.astype(np.int64) if col in integer else values
    return pd.DataFrame(out)


def read_tid_mid(path: str | Path) -> pd.DataFrame:
    """``{prefix}_face_tid_mid.txt`` -> ``path, template_id, media_id``."""
    return read_fields(path, TID_MID_COLUMNS, ["template_id", "media_id"], [])


def read_pairs(path: str | Path) -> pd.DataFrame:
    """``{prefix}_template_pair_label.txt`` -> ``template_a, template_b, label`` (labels 0 or 1)."""
    frame = read_fields(path, PAIR_COLUMNS, PAIR_COLUMNS, [])
    bad = np.flatnonzero(~frame["label"].isin([0, 1]).to_numpy())
    if len(bad):
        raise TransfiraError(f"{path}: label must be 1 (genuine) or 0 (impostor) on line(s) {format_rows(bad)}")
    return frame


def read_landmark_file(path: str | Path) -> pd.DataFrame:
    """``{prefix}_name_5pts_score.txt`` -> ``path, x1, y1, ..., x5, y5, det_score``."""
    return read_fields(path, LANDMARK_FILE_COLUMNS, [], LANDMARK_FILE_COLUMNS[1:])


def build_test_table(root: str | Path, prefix: str) -> pd.DataFrame:
    """The per-image table ``path, template_id, media_id, x1 .. y5, det_score`` in ``tid_mid`` order.

    The two per-image files list the same crops; InsightFace reads them row by row. Here the
    rows are matched by image name (the same order needs no lookup), and an image without
    landmarks, a duplicated name or an extra landmark row is an error.
    """
    tid_path, lmk_path = meta_path(root, prefix, "tid_mid"), meta_path(root, prefix, "landmarks")
    tid, lmk = read_tid_mid(tid_path), read_landmark_file(lmk_path)
    if len(tid) == len(lmk) and (tid["path"].to_numpy() == lmk["path"].to_numpy()).all():
        joined = pd.concat([tid, lmk.drop(columns="path")], axis=1)
    else:
        for frame, path in ((tid, tid_path), (lmk, lmk_path)):
            dup = np.flatnonzero(frame["path"].duplicated().to_numpy())
            if len(dup):
                raise TransfiraError(f"{path}: image '{frame['path'].iloc[dup[0]]}' is listed twice "
                                     f"(line {dup[0] + 1}); rows cannot be matched by name")
        rows = pd.Index(lmk["path"]).get_indexer(tid["path"])
        if (rows < 0).any():
            miss = np.flatnonzero(rows < 0)
            raise TransfiraError(f"{lmk_path}: no landmarks for {len(miss)} image(s) of {tid_path}, e.g. "
                                 f"'{tid['path'].iloc[miss[0]]}' (line {miss[0] + 1})")
        if len(lmk) > len(tid):
            extra = np.setdiff1d(np.arange(len(lmk)), rows)
            raise TransfiraError(f"{lmk_path}: {len(extra)} image(s) not in {tid_path}, e.g. "
                                 f"'{lmk['path'].iloc[extra[0]]}' (line {extra[0] + 1})")
        joined = pd.concat([tid, lmk.drop(columns="path").iloc[rows].reset_index(drop=True)], axis=1)
    return joined[TEST_COLUMNS]


def check_pairs_templates(pairs: pd.DataFrame, table: pd.DataFrame, source: str) -> None:
    """Every template of the pair list must have images in the test table."""
    known = np.unique(table["template_id"].to_numpy())
    used = np.unique(pairs[["template_a", "template_b"]].to_numpy())
    missing = np.setdiff1d(used, known)
    if len(missing):
        raise TransfiraError(f"{source}: {len(missing)} template id(s) of the pair list have no image in the "
                             f"tid_mid file, e.g. {', '.join(map(str, missing[:5]))}")


# --- synthetic release ------------------------------------------------------------------------------

def random_similarity(rng: np.random.Generator, size: int = 112) -> tuple[np.ndarray, tuple[int, int]]:
    """A loose-crop placement: the 2x3 matrix from the aligned ``size`` crop into a larger canvas, and the canvas size.

    Scale 1.1-1.6, rotation within 15 degrees, 15-40 px margins and a jittered position.
    """
    scale, angle = rng.uniform(1.1, 1.6), math.radians(rng.uniform(-15, 15))
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    linear = np.array([[c, -s], [s, c]])
    corners = (np.array([[0, 0], [size, 0], [0, size], [size, size]]) - size / 2) @ linear.T
    extent = corners.max(0) - corners.min(0)
    margin = rng.uniform(15, 40, 2)
    canvas = np.ceil(extent + 2 * margin).astype(int)
    center = canvas / 2 + rng.uniform(-0.5, 0.5, 2) * (canvas - extent) / 2
    matrix = np.hstack([linear, (center - linear @ [size / 2, size / 2])[:, None]])
    return matrix, (int(canvas[0]), int(canvas[1]))


def loose_crop(aligned: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """``aligned`` (an ArcFace-aligned face) placed in a cluttered loose crop; also its five landmarks [5, 2].

    The landmarks are the ArcFace template mapped by the placement, so aligning the crop with
    them maps the face back onto itself.
    """
    matrix, (width, height) = random_similarity(rng, aligned.width)
    noise = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    background = Image.fromarray(noise).resize((width, height), Image.Resampling.BILINEAR)
    face = warp_affine(aligned, matrix, (width, height))
    mask = warp_affine(Image.new("L", aligned.size, 255), matrix, (width, height))
    landmarks = ARCFACE_TEMPLATE * (aligned.width / 112.0) @ matrix[:, :2].T + matrix[:, 2]
    return Image.composite(face, background, mask), landmarks


def make_synthetic_release(outdir: str | Path, prefix: str = "ijbc", subjects: int = 20, templates_per_subject: int = 3,
                           impostor_pairs: int = 300, seed: int = 0, keep_aligned: bool = False) -> dict[str, Any]:
    """Write an IJB-shaped release into ``outdir`` (``loose_crop/``, ``meta/``); return counts.

    Each subject (a :mod:`transfira.demo` identity unseen by the demo encoder) has
    ``templates_per_subject`` templates of 1-3 media each; a media is a still (one image) or,
    with probability 0.4, a video of 3-5 frames sharing one degradation. Genuine pairs: all
    template pairs of a subject; impostor pairs: random pairs of different subjects. Also
    writes ``meta/synth_subjects.csv`` (template -> subject) and, with ``keep_aligned``, the
    aligned originals under ``aligned/`` (same names).
    """
    from .degradations import degrade
    from .demo import identity_params, random_degradation, render_face

    outdir = Path(outdir)
    if prefix not in PREFIXES:
        raise TransfiraError(f"prefix must be one of {', '.join(PREFIXES)}, got '{prefix}'")
    (outdir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (outdir / "meta").mkdir(parents=True, exist_ok=True)
    if keep_aligned:
        (outdir / "aligned").mkdir(exist_ok=True)
    rows, owners = [], []
    template_id, media_id = 100, 5000
    for subject in range(subjects):
        params = identity_params(200 + subject)
        for _ in range(templates_per_subject):
            template_id += 1
            owners.append((template_id, subject))
            rng = np.random.default_rng([seed, template_id])
            for _ in range(int(rng.integers(1, 4))):
                media_id += 1
                frames = int(rng.integers(3, 6)) if rng.random() < 0.4 else 1
                kind, severity = random_degradation(rng)
                for _ in range(frames):
                    frame_severity = float(np.clip(severity + rng.normal(0, 0.05), 0, 1)) if kind != "none" else 0.0
                    aligned = degrade(render_face(params, rng), kind, frame_severity, seed=int(rng.integers(1 << 31)))
                    crop, landmarks = loose_crop(aligned, rng)
                    name = f"{len(rows) + 1}.jpg"
                    crop.save(outdir / IMAGES_DIR / name, quality=95)
                    if keep_aligned:
                        aligned.save(outdir / "aligned" / f"{len(rows) + 1}.png")
                    score = float(np.clip(0.95 - 0.6 * frame_severity + rng.normal(0, 0.03), 0.05, 1.0))
                    rows.append((name, template_id, media_id, landmarks.ravel(), score, subject, kind, frame_severity))
    owners_frame = pd.DataFrame(owners, columns=["template_id", "subject_id"])
    tids, subj = owners_frame["template_id"].to_numpy(), owners_frame["subject_id"].to_numpy()
    a, b = np.triu_indices(len(tids), 1)
    genuine = subj[a] == subj[b]
    rng = np.random.default_rng([seed, 1])
    impostor = rng.choice(np.flatnonzero(~genuine), min(impostor_pairs, int((~genuine).sum())), replace=False)
    chosen = np.sort(np.concatenate([np.flatnonzero(genuine), impostor]))
    lines = {
        "tid_mid": [f"{r[0]} {r[1]} {r[2]}" for r in rows],
        "landmarks": [" ".join([r[0], *(f"{v:.4f}" for v in r[3]), f"{r[4]:.6f}"]) for r in rows],
        "pairs": [f"{tids[a[i]]} {tids[b[i]]} {int(genuine[i])}" for i in chosen],
    }
    for which, text in lines.items():
        with atomic_path(meta_path(outdir, prefix, which)) as tmp:
            tmp.write_text("\n".join(text) + "\n")
    save_csv(owners_frame, outdir / "meta" / "synth_subjects.csv")
    save_csv(pd.DataFrame({"path": [r[0] for r in rows], "subject_id": [r[5] for r in rows],
                           "degradation": [r[6] for r in rows], "severity": [r[7] for r in rows]}),
             outdir / "meta" / "synth_images.csv")
    return {"images": len(rows), "templates": len(tids), "media": media_id - 5000,
            "genuine_pairs": int(genuine.sum()), "impostor_pairs": len(impostor)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m transfira.ijb", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write a small synthetic IJB-shaped release (loose_crop/, meta/)")
    synth.add_argument("outdir")
    synth.add_argument("--prefix", default="ijbc", choices=PREFIXES)
    synth.add_argument("--subjects", type=int, default=20)
    synth.add_argument("--templates-per-subject", type=int, default=3)
    synth.add_argument("--impostor-pairs", type=int, default=300)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--keep-aligned", action="store_true", help="also write the aligned originals to aligned/")
    args = parser.parse_args(argv)
    counts = make_synthetic_release(args.outdir, args.prefix, args.subjects, args.templates_per_subject,
                                    args.impostor_pairs, args.seed, args.keep_aligned)
    print(f"synthetic {args.prefix} release in {args.outdir}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


if __name__ == "__main__":
    from .errors import run_cli

    run_cli(main)
