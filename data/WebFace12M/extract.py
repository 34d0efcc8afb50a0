"""Extract WebFace12M training images from InsightFace RecordIO (train.rec + train.idx), no MXNet.

    python data/WebFace12M/extract.py --rec_dir /path/to/webface_rec            # train_10k + val_2k
    python data/WebFace12M/extract.py --rec_dir /path/to/webface_rec --all      # every image

Images are written as {out}/{subject:06d}/{key:08d}.jpg (original JPEG bytes). Reruns skip
complete files. See data/WebFace12M/README.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from transfira.errors import TransfiraError, run_cli  # noqa: E402
from transfira.recordio import extract_all, extract_subsets  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rec_dir", required=True, help="folder with {prefix}.rec and {prefix}.idx")
    p.add_argument("--prefix", default="train", help="record file name without extension (default: train)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--csv", nargs="+", default=[str(HERE / "train_10k.csv"), str(HERE / "val_2k.csv")],
                      help="subset CSVs with columns path ({subject:06d}/{key:08d}.jpg) and subject_id")
    mode.add_argument("--all", action="store_true", help="dump every image of the .rec under its record label")
    p.add_argument("--out", default=str(HERE / "train"), help="output folder (default: data/WebFace12M/train)")
    p.add_argument("--out_csv", help="--all: CSV (path,subject_id) of the dump (default: {out}.csv)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="reader threads")
    p.add_argument("--allow_mismatch", action="store_true",
                   help="write images whose record label differs from the CSV subject (default: error)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.workers < 1:
        raise TransfiraError(f"--workers must be >= 1, got {a.workers}")
    if a.all:
        csv = a.out_csv or str(Path(a.out)) + ".csv"
        s = extract_all(a.rec_dir, a.out, csv, a.workers, a.prefix, progress=not a.no_progress)
        print(f"{s}\nlist of images: {csv}")
    else:
        s = extract_subsets(a.rec_dir, a.csv, a.out, a.workers, a.prefix, a.allow_mismatch,
                            progress=not a.no_progress)
        print(s)
    if s.missing:
        raise TransfiraError(f"{len(s.missing)} listed keys are not in the index, e.g. {s.missing[:5]}: "
                             "is this the right .rec?")
    if s.mismatched and not a.allow_mismatch:
        raise TransfiraError(f"{len(s.mismatched)} records have a label other than the CSV subject "
                             f"(key, csv subject, label): {s.mismatched[:5]}; they were not written. "
                             "Wrong .rec? Pass --allow_mismatch to write them under the CSV subject.")


if __name__ == "__main__":
    run_cli(main)
