"""Extraction throughput: a synthetic InsightFace-style .rec, extracted with 1, 2, 4 threads.

    python benchmarks/bench_extract.py [--n 20000] [--workers 1 2 4]
"""
from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transfira.recordio import MAGIC_BYTES, extract_all  # noqa: E402


def make_rec(folder: Path, n: int, seed: int = 0) -> int:
    """Meta record 0 + ``n`` images of 5-20 KB random bytes, 50 per identity; returns image bytes."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5_000, 20_001, n)
    meta = struct.pack("<IfQQ", 2, 0, 0, 0) + np.array([n + 1, n + 1], "<f4").tobytes()
    payloads = [meta] + [struct.pack("<IfQQ", 0, k // 50, 0, 0) + os.urandom(int(s)).replace(MAGIC_BYTES, b"\0" * 4)
                         for k, s in enumerate(sizes)]  # no magic inside: every record is whole
    offsets, pos = [], 0
    with open(folder / "train.rec", "wb") as f:
        for p in payloads:
            offsets.append(pos)
            rec = MAGIC_BYTES + struct.pack("<I", len(p)) + p + bytes(-len(p) % 4)
            f.write(rec)
            pos += len(rec)
    (folder / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    return int(sizes.sum())


def timed(rec_dir: Path, out: Path, workers: int) -> tuple[float, float]:
    """Seconds for a fresh extraction and for a rerun that skips everything."""
    t0 = time.perf_counter()
    s = extract_all(rec_dir, out, out.with_suffix(".csv"), workers=workers, progress=False)
    t1 = time.perf_counter()
    extract_all(rec_dir, out, out.with_suffix(".csv"), workers=workers, progress=False)
    t2 = time.perf_counter()
    assert s.written == len(rec_dir.joinpath("train.idx").read_text().splitlines()) - 1
    shutil.rmtree(out)
    return t1 - t0, t2 - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeat", type=int, default=3, help="runs per setting; the median is shown")
    p.add_argument("--tmp", help="temp folder for the .rec and the output (default: system temp)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        tmp = Path(tmp)
        nbytes = make_rec(tmp, a.n)
        print(f"{a.n} records, {nbytes / 1e6:.0f} MB of images, {os.cpu_count()} cpus, temp {tmp.parent}")
        timed(tmp, tmp / "warmup", 1)
        print("workers  seconds  records/s   MB/s   rerun (all skipped) s")
        for w in a.workers:
            fresh, rerun = np.median([timed(tmp, tmp / "out", w) for _ in range(a.repeat)], axis=0)
            print(f"{w:7d}  {fresh:7.2f}  {a.n / fresh:9.0f}  {nbytes / 1e6 / fresh:5.0f}   {rerun:.2f}")

if __name__ == "__main__":
    main()
