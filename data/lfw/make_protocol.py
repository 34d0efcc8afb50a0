"""Build a TransFIRA protocol on aligned LFW: identity splits, degraded copies, templates, pairs.

    python data/lfw/make_protocol.py --lfw ../shared/data/lfw_aligned --out output/lfw/protocol

Deterministic: the same arguments give the same files. Every random choice comes from a
SHA-1 of ``seed`` and a name (identity or image path), never from global state or file order.

Layout of ``--out`` (the ``data_dir`` of every config is ``<out>/images``)::

    images/clean/<Name>/<Name>_NNNN.jpg          byte copies of the LFW crops used
    images/degraded/<Name>/<Name>_NNNN_<kind>.png degraded copies (lossless PNG)
    train.csv, val.csv   path,subject_id,degradation,severity,source
    test.csv             path,subject_id,degradation,severity,source,template_id
    templates.csv        template_id,subject_id     (enrol 2k, probe 2k+1)
    pairs.csv            template_a,template_b,label (all enrol x probe pairs; 1 = genuine)
    protocol.json        arguments and counts

* Identities go to train / val / test by ``sha1(seed:name) mod 100`` (disjoint, stable when
  identities are added or removed).
* At most ``--max-images`` photos per identity (chosen by hash), identities with fewer
  than ``--min-images`` photos are dropped; ``--max-ids`` keeps the first identities in hash
  order (small versions for tests); ``--max-train-images`` / ``--max-val-images`` keep whole
  identities of that split, in hash order, up to that many images (CPU time budget).
* A share ``--degrade-share`` of the photos also gets one degraded copy: kind uniform over
  ``--kinds``, severity uniform in [``--severity-min``, ``--severity-max``]
  (``transfira.degradations``, seed from the path). The clean photo stays in the set.
* Test templates: a test identity with >= ``--min-template-images`` images (copies included)
  and >= 2 photos gets an enrol and a probe template. Whole source photos (the clean image
  with its degraded copy) go to one side, alternating in hash order, so no photo is on both
  sides of a genuine pair. Test identities that do not qualify are left out of test.csv.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from transfira.degradations import DEGRADATIONS, degrade  # noqa: E402

SPLITS = ("train", "val", "test")


def _hash(*parts: object) -> int:
    """A stable 64-bit integer from ``parts`` (SHA-1, independent of PYTHONHASHSEED)."""
    return int(hashlib.sha1(":".join(map(str, parts)).encode()).hexdigest()[:16], 16)


def _unit(*parts: object) -> float:
    """A stable number in [0, 1) from ``parts``."""
    return _hash(*parts) / 2.0 ** 64


def assign_split(name: str, seed: int, shares: tuple[int, int, int]) -> str:
    bucket = _hash(seed, "split", name) % 100
    return "train" if bucket < shares[0] else "val" if bucket < shares[0] + shares[1] else "test"


def select(frame: pd.DataFrame, args: argparse.Namespace) -> pd.DataFrame:
    """Photos kept: identities with enough photos, at most ``max_images`` each, ``max_ids`` identities."""
    frame = frame.assign(_h=[_hash(args.seed, "photo", p) for p in frame["path"]]).sort_values("_h")
    if args.max_images:
        frame = frame.groupby("subject_id", sort=False).head(args.max_images)
    counts = frame["subject_id"].value_counts()
    names = sorted(counts.index[counts >= args.min_images], key=lambda n: _hash(args.seed, "identity", n))
    if args.max_ids:
        names = names[: args.max_ids]
    frame = frame[frame["subject_id"].isin(set(names))]
    return frame.sort_values(["subject_id", "path"]).drop(columns="_h").reset_index(drop=True)


def plan_degradations(frame: pd.DataFrame, args: argparse.Namespace) -> pd.DataFrame:
    """One row per image: the clean photos, plus one degraded copy for a share of them."""
    rows = []
    for path, subject in zip(frame["path"], frame["subject_id"]):
        rows.append({"path": f"clean/{path}", "subject_id": subject, "degradation": "none", "severity": 0.0,
                     "source": path})
        if _unit(args.seed, "degrade?", path) < args.degrade_share:
            kind = args.kinds[_hash(args.seed, "kind", path) % len(args.kinds)]
            severity = args.severity_min + (args.severity_max - args.severity_min) * _unit(args.seed, "severity", path)
            stem = Path(path).with_suffix("")
            rows.append({"path": f"degraded/{stem}_{kind}.png", "subject_id": subject, "degradation": kind,
                         "severity": round(severity, 4), "source": path})
    return pd.DataFrame(rows)


def write_missing(rows: Iterable[Any], out: Path, make: Callable[[Any, Path], None]) -> int:
    """``make(row, tmp)`` writes each row's ``out / row.path`` to a temporary name, then renames it; files
    already there are kept (same bytes by construction). Returns the number written."""
    written = 0
    for row in rows:
        target = out / row.path
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp-write")
        make(row, tmp)
        tmp.replace(target)
        written += 1
    return written


def write_images(images: pd.DataFrame, lfw: Path, out: Path, seed: int) -> int:
    """Copy clean photos, render degraded ones."""
    def make(row: Any, tmp: Path) -> None:
        if row.degradation == "none":
            shutil.copyfile(lfw / "images" / row.source, tmp)
            return
        with Image.open(lfw / "images" / row.source) as img:
            img = img.convert("RGB")
        degrade(img, row.degradation, float(row.severity), _hash(seed, "pixels", row.path) % 2**32).save(tmp, "PNG")

    return write_missing(images.itertuples(index=False), out, make)


def cap_split(table: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """Whole identities, in hash order, while the images (copies included) fit in ``limit`` (0: all)."""
    if not limit or len(table) <= limit:
        return table
    counts = table["subject_id"].value_counts()
    names = sorted(counts.index, key=lambda n: _hash(seed, "identity", n))
    total = counts[names].cumsum()
    keep = set(total.index[total <= limit]) or {names[0]}
    return table[table["subject_id"].isin(keep)].reset_index(drop=True)


def make_templates(test: pd.DataFrame, args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Enrol/probe templates per qualifying test identity (whole source photos per side)."""
    parts, templates = [], []
    for subject, group in test.groupby("subject_id", sort=True):
        if len(group) < args.min_template_images or group["source"].nunique() < 2:
            continue
        sources = sorted(group["source"].unique(), key=lambda p: _hash(args.seed, "side", p))
        side = {src: i % 2 for i, src in enumerate(sources)}
        tid = len(templates)  # enrol 2k, probe 2k + 1
        group = group.assign(template_id=[tid + side[s] for s in group["source"]])
        parts.append(group)
        templates += [{"template_id": tid, "subject_id": subject}, {"template_id": tid + 1, "subject_id": subject}]
    if not parts:
        raise SystemExit("no test identity has enough images for two templates; use more identities")
    return pd.concat(parts, ignore_index=True), pd.DataFrame(templates)


def make_pairs(templates: pd.DataFrame) -> pd.DataFrame:
    """All enrol x probe pairs: genuine for the same identity, impostor otherwise."""
    enrol = templates[templates["template_id"] % 2 == 0]
    probe = templates[templates["template_id"] % 2 == 1]
    pairs = enrol.merge(probe, how="cross", suffixes=("_a", "_b"))
    return pd.DataFrame({"template_a": pairs["template_id_a"], "template_b": pairs["template_id_b"],
                         "label": (pairs["subject_id_a"] == pairs["subject_id_b"]).astype(int)})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lfw", default="../shared/data/lfw_aligned", help="aligned LFW folder (all.csv, images/)")
    p.add_argument("--out", default="output/lfw/protocol", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="60,10,30", help="train,val,test shares of the identities in percent")
    p.add_argument("--min-images", type=int, default=2, help="drop identities with fewer photos (after --max-images)")
    p.add_argument("--max-images", type=int, default=10, help="at most this many photos per identity (0: all)")
    p.add_argument("--max-ids", type=int, default=0, help="keep this many identities, in hash order (0: all)")
    p.add_argument("--max-train-images", type=int, default=0,
                   help="keep whole train identities (hash order) up to this many images, copies included (0: all)")
    p.add_argument("--max-val-images", type=int, default=0, help="the same for val")
    p.add_argument("--degrade-share", type=float, default=0.5, help="share of photos that also get a degraded copy")
    p.add_argument("--kinds", default=",".join(DEGRADATIONS), help="degradations, comma-separated")
    p.add_argument("--severity-min", type=float, default=0.2)
    p.add_argument("--severity-max", type=float, default=1.0)
    p.add_argument("--min-template-images", type=int, default=4,
                   help="test identities need this many images (copies included) for enrol + probe templates")
    args = p.parse_args(argv)
    check_kinds_and_split(p, args)
    if not 0 <= args.severity_min <= args.severity_max <= 1 or not 0 <= args.degrade_share <= 1:
        p.error("need 0 <= severity-min <= severity-max <= 1 and 0 <= degrade-share <= 1")
    return args


def check_kinds_and_split(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--kinds`` -> ``args.kinds`` (known degradations, in order) and ``--split`` -> ``args.shares``
    (three non-negative percentages adding up to 100), or ``p.error``. Shared by both LFW protocols."""
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in args.kinds if k not in DEGRADATIONS]
    shares = tuple(int(s) for s in args.split.split(","))
    if unknown or not args.kinds:
        p.error(f"--kinds: unknown {unknown} (known: {', '.join(DEGRADATIONS)})")
    if len(shares) != 3 or sum(shares) != 100 or min(shares) < 0:
        p.error("--split must be three non-negative percentages adding up to 100")
    args.shares = shares


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    lfw, out = Path(args.lfw), Path(args.out)
    if not (lfw / "all.csv").is_file():
        raise SystemExit(f"{lfw / 'all.csv'} not found (--lfw)")
    photos = select(pd.read_csv(lfw / "all.csv"), args)
    photos["split"] = [assign_split(n, args.seed, args.shares) for n in photos["subject_id"]]
    images = plan_degradations(photos, args)
    images["split"] = images["subject_id"].map(dict(zip(photos["subject_id"], photos["split"])))
    tables = {s: images[images["split"] == s].drop(columns="split").reset_index(drop=True) for s in SPLITS}
    tables["train"] = cap_split(tables["train"], args.max_train_images, args.seed)
    tables["val"] = cap_split(tables["val"], args.max_val_images, args.seed)
    tables["test"], templates = make_templates(tables["test"], args)
    pairs = make_pairs(templates)
    used = pd.concat(tables.values(), ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    written = write_images(used, lfw, out / "images", args.seed)
    for split, table in tables.items():
        table.to_csv(out / f"{split}.csv", index=False)
    templates.to_csv(out / "templates.csv", index=False)
    pairs.to_csv(out / "pairs.csv", index=False)
    summary = {
        "args": {k: v for k, v in vars(args).items() if k != "shares"},
        **{f"{s}_identities": int(t["subject_id"].nunique()) for s, t in tables.items()},
        **{f"{s}_images": len(t) for s, t in tables.items()},
        **{f"{s}_degraded": int((t["degradation"] != "none").sum()) for s, t in tables.items()},
        "templates": len(templates), "genuine_pairs": int(pairs["label"].sum()),
        "impostor_pairs": int((pairs["label"] == 0).sum()), "images_written": written,
    }
    (out / "protocol.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"protocol in {out} ({time.perf_counter() - start:.1f} s): " + ", ".join(
        f"{s} {summary[f'{s}_identities']} ids / {summary[f'{s}_images']} images ({summary[f'{s}_degraded']} degraded)"
        for s in SPLITS) + f"; {len(templates)} templates, {summary['genuine_pairs']} genuine + "
        f"{summary['impostor_pairs']} impostor pairs; {written} image files written")
    return summary


if __name__ == "__main__":
    main()
