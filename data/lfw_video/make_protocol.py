"""Build the LFW "video" protocol: clean enrolment photos (gallery) and clips of degraded frames (probes).

    python data/lfw_video/make_protocol.py --lfw ../shared/data/lfw_aligned \\
        --out output/lfw_video/mobilefacenet_arcface/protocol --severity-min 0.3

Deterministic: every random choice is a SHA-1 of ``seed`` and a name (identity, photo or frame
path), never global state or file order, so the same arguments give the same CSVs and pixels.

* Identities go to train / val / test by ``sha1(seed:split:name) mod 100`` (disjoint).
  Every identity with >= 2 photos qualifies; ``--max-ids-<split>`` caps a split (hash order).
* Per identity the photo with the smallest ``sha1(seed:gallery:path)`` is the **enrolment**
  photo (gallery, kept clean); the next ``--clips-<split>`` photos in that order each give one
  **clip** of ``--frames`` frames: ``--clean-frames`` clean copies, then degraded frames.
* A degraded frame gets ``--stack`` kinds (distinct, drawn uniformly from ``--kinds``), all at
  one severity ``s = smin + (smax - smin) u``, ``u`` uniform per frame. ``u``, the kinds and the
  pixel seed depend on the frame's name only, so protocols that differ only in the severity
  range contain the same clips, harsher or milder.
* Every split is in gallery / probe form (SPEC eq. 2: centers from the clean enrolment photos
  only): ``<split>_gallery.csv`` (path, subject_id) and ``<split>_probes.csv`` (path,
  subject_id, degradation, severity, source, clip, frame).
* ``train_photos.csv`` (path relative to ``<lfw>/images``, subject_id): every non-enrolment photo of
  the train identities (at most ``--max-photos-train`` each, gallery-hash order), undegraded: the
  input of ``train.py [degrade]``, which draws fresh degradations every epoch and labels them online
  against the train enrolment photos' centers.
* Test templates: enrol template ``2k`` = the enrolment photo, probe template ``2k+1`` = the
  clip (one clip per test identity with the default ``--clips-test 1``; further clips get
  their own probe ids, ``2k+1`` for the first). ``test.csv`` = probe frames (rows of
  ``test_probes.csv``, same order) then the gallery photos, with ``template_id``; ``test_clips.csv``
  its probe rows only (test.py's input; the enrol templates are the photos themselves);
  ``templates.csv`` (template_id, subject_id, side); ``pairs.csv`` every enrol x probe pair.

Layout of ``--out`` (``data_dir`` of every config is ``<out>/images``)::

    images/clean/<Name>/<file>.jpg                 byte copies of the LFW crops used
    images/frames/<Name>/<photo>_fNN.png           clip frames (lossless PNG; clean ones too)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.lfw.make_protocol import _hash, _unit, assign_split, check_kinds_and_split, write_missing  # noqa: E402  (one hashing scheme for both protocols)
from transfira.degradations import degrade_chain  # noqa: E402

SPLITS = ("train", "val", "test")
KINDS = ("blur", "downscale", "noise", "occlusion", "jpeg", "underexpose", "overexpose", "rotation")


def frame_plan(source: str, frame: int, seed: int, kinds: tuple[str, ...], stack: int,
               severity: tuple[float, float]) -> dict:
    """Kinds, severity and pixel seed of frame ``frame`` of the clip made from photo ``source``."""
    name = f"{source}#{frame}"
    order = sorted(kinds, key=lambda k: _hash(seed, "kind", name, k))
    u = _unit(seed, "severity", name)
    return {"degradation": "+".join(order[:stack]), "severity": round(severity[0] + (severity[1] - severity[0]) * u, 4),
            "u": round(u, 6), "pixel_seed": _hash(seed, "pixels", name) % 2**32}


def build_tables(photos: pd.DataFrame, args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """``{split}_gallery`` / ``{split}_probes`` tables from ``photos`` (path, subject_id)."""
    photos = photos.assign(_h=[_hash(args.seed, "gallery", p) for p in photos["path"]]).sort_values(["subject_id", "_h"])
    counts = photos["subject_id"].value_counts()
    names = sorted(counts.index[counts >= 2], key=lambda n: _hash(args.seed, "identity", n))
    split_of = {n: assign_split(n, args.seed, args.shares) for n in names}
    tables = {}
    for split in SPLITS:
        keep = [n for n in names if split_of[n] == split]
        cap = getattr(args, f"max_ids_{split}")
        keep = set(keep[:cap] if cap else keep)
        part = photos[photos["subject_id"].isin(keep)]
        gallery, probes = [], []
        for subject, group in part.groupby("subject_id", sort=True):
            paths = list(group["path"])
            gallery.append({"path": f"clean/{paths[0]}", "subject_id": subject, "source": paths[0]})
            for clip_no, source in enumerate(paths[1: 1 + getattr(args, f"clips_{split}")]):
                stem = Path(source).with_suffix("")
                for f in range(args.frames):
                    row = {"path": f"frames/{stem}_f{f:02d}.png", "subject_id": subject, "degradation": "none",
                           "severity": 0.0, "source": source, "clip": clip_no, "frame": f, "u": 0.0, "pixel_seed": 0}
                    if f >= args.clean_frames:
                        row.update(frame_plan(source, f, args.seed, args.kinds, args.stack,
                                              (args.severity_min, args.severity_max)))
                    probes.append(row)
        if split == "train":
            cap = getattr(args, "max_photos_train", 0) or None
            tables["train_photos"] = pd.concat([g.iloc[1:][["path", "subject_id"]].iloc[:cap]
                                                for _, g in part.groupby("subject_id", sort=True)], ignore_index=True)
        tables[f"{split}_gallery"] = pd.DataFrame(gallery, columns=["path", "subject_id", "source"])
        tables[f"{split}_probes"] = pd.DataFrame(probes, columns=["path", "subject_id", "degradation", "severity",
                                                                   "source", "clip", "frame", "u", "pixel_seed"])
    return tables


def make_test_templates(gallery: pd.DataFrame, probes: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``test.csv`` (probes, then gallery, with template_id), ``templates.csv`` and ``pairs.csv``."""
    index = {s: 2 * k for k, s in enumerate(sorted(gallery["subject_id"].unique()))}
    n_sub = len(index)
    probe_tid = [index[s] + 1 if c == 0 else 2 * n_sub + 2 * (c - 1) * n_sub + index[s] + 1
                 for s, c in zip(probes["subject_id"], probes["clip"])]
    test = pd.concat([probes.assign(template_id=probe_tid),
                      gallery.assign(template_id=[index[s] for s in gallery["subject_id"]], degradation="none",
                                     severity=0.0, clip=-1, frame=-1, u=0.0, pixel_seed=0)], ignore_index=True)
    templates = (test.groupby("template_id", sort=True)["subject_id"].first().reset_index()
                 .assign(side=lambda t: ["enrol" if i < 2 * n_sub and i % 2 == 0 else "probe" for i in t["template_id"]]))
    enrol, probe = templates[templates["side"] == "enrol"], templates[templates["side"] == "probe"]
    cross = enrol.merge(probe, how="cross", suffixes=("_a", "_b"))
    pairs = pd.DataFrame({"template_a": cross["template_id_a"], "template_b": cross["template_id_b"],
                          "label": (cross["subject_id_a"] == cross["subject_id_b"]).astype(int)})
    return test, templates, pairs


def render(row, lfw: Path) -> Image.Image:
    """The pixels of one probe frame (clean copy, or the stacked degradations in order)."""
    with Image.open(lfw / "images" / row.source) as img:
        img = img.convert("RGB")
    if row.degradation == "none":
        return img
    return degrade_chain(img, row.degradation.split("+"), float(row.severity), int(row.pixel_seed))


def write_images(tables: dict[str, pd.DataFrame], lfw: Path, out: Path) -> int:
    """Copy enrolment photos, render frames; files already there are kept (same bytes by construction)."""
    def copy(row, tmp: Path) -> None:
        shutil.copyfile(lfw / "images" / row.source, tmp)

    def frame(row, tmp: Path) -> None:
        render(row, lfw).save(tmp, "PNG")

    return sum(write_missing(table.itertuples(index=False), out, copy if name.endswith("_gallery") else frame)
               for name, table in tables.items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lfw", default="../shared/data/lfw_aligned", help="aligned LFW folder (all.csv, images/)")
    p.add_argument("--out", default="output/lfw_video/protocol", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="45,5,50", help="train,val,test shares of the identities in percent")
    for s in SPLITS:
        p.add_argument(f"--max-ids-{s}", type=int, default=0, help=f"keep this many {s} identities, hash order (0: all)")
    p.add_argument("--max-photos-train", type=int, default=0,
                   help="at most this many non-enrolment photos per train identity in train_photos.csv (0: all)")
    p.add_argument("--clips-train", type=int, default=1, help="clips per train identity (one per non-enrolment photo)")
    p.add_argument("--clips-val", type=int, default=1)
    p.add_argument("--clips-test", type=int, default=1)
    p.add_argument("--frames", type=int, default=5, help="frames per clip")
    p.add_argument("--clean-frames", type=int, default=1, help="undegraded frames at the start of each clip")
    p.add_argument("--kinds", default=",".join(KINDS), help="degradations, comma-separated")
    p.add_argument("--stack", type=int, default=1, help="degradations applied together to each degraded frame")
    p.add_argument("--severity-min", type=float, default=0.3)
    p.add_argument("--severity-max", type=float, default=1.0)
    args = p.parse_args(argv)
    check_kinds_and_split(p, args)
    args.kinds = tuple(args.kinds)
    if not 1 <= args.stack <= len(args.kinds):
        p.error(f"--stack must be between 1 and the number of kinds ({len(args.kinds)})")
    if not 0 <= args.severity_min <= args.severity_max <= 1:
        p.error("need 0 <= severity-min <= severity-max <= 1")
    if not 0 <= args.clean_frames <= args.frames or args.frames < 1:
        p.error("need frames >= 1 and 0 <= clean-frames <= frames")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    lfw, out = Path(args.lfw), Path(args.out)
    if not (lfw / "all.csv").is_file():
        raise SystemExit(f"{lfw / 'all.csv'} not found (--lfw)")
    tables = build_tables(pd.read_csv(lfw / "all.csv")[["path", "subject_id"]], args)
    test, templates, pairs = make_test_templates(tables["test_gallery"], tables["test_probes"])
    out.mkdir(parents=True, exist_ok=True)
    photos = tables.pop("train_photos")
    written = write_images(tables, lfw, out / "images")
    clips = test[test["frame"] >= 0]  # the probe frames with their template ids: test.py's input
    for name, table in {**tables, "test": test, "test_clips": clips, "templates": templates, "pairs": pairs,
                        "train_photos": photos}.items():
        table.to_csv(out / f"{name}.csv", index=False)
    disk = sum((out / "images" / path).stat().st_size for table in tables.values() for path in table["path"])
    summary = {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "shares"},
               **{f"{s}_identities": int(tables[f"{s}_gallery"]["subject_id"].nunique()) for s in SPLITS},
               **{f"{s}_frames": len(tables[f"{s}_probes"]) for s in SPLITS}, "train_photos": len(photos),
               "templates": len(templates), "genuine_pairs": int(pairs["label"].sum()),
               "impostor_pairs": int((pairs["label"] == 0).sum()), "images_written": written, "disk_bytes": disk}
    (out / "protocol.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"protocol in {out} ({time.perf_counter() - start:.1f} s): " + ", ".join(
        f"{s} {summary[f'{s}_identities']} ids / {summary[f'{s}_frames']} frames" for s in SPLITS)
        + f"; {summary['genuine_pairs']} genuine + {summary['impostor_pairs']} impostor pairs; "
        f"{written} files written, {disk / 2**20:.0f} MiB on disk")
    return summary


if __name__ == "__main__":
    main()
