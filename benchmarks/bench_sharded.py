"""Sharded extraction: generate.py's images/s with 1 and 2 processes under torchrun (Gloo on CPU).

    python benchmarks/bench_sharded.py [--n 2000] [--nproc 1 2] [--device cpu] [--workers 1]

The demo encoder (112x112, 64-D) over ``n`` demo images (the demo train table repeated);
each setting gets ``cores / nproc`` threads per process. Shown: the extraction rate of rank
0's progress line (all ranks' images) and the wall time of the whole command (start-up,
model loading and labels included), with the load average before each run.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from transfira.demo import make_demo  # noqa: E402


def run(cfg: Path, nproc: int, threads: int) -> tuple[float, float]:
    """(images/s of the extraction, wall seconds) of one ``torchrun`` generate.py."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])), "OMP_NUM_THREADS": str(threads), "TRANSFIRA_PROGRESS": "lines"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(ROOT / "generate.py"), "--config", str(cfg)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rate = re.findall(r"train: \d+/\d+ img \(100%\), ([\d.]+(?:e[+-]?\d+)?) img/s", proc.stderr + proc.stdout)
    return float(rate[-1]), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per process (num_workers)")
    a = p.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = make_demo(tmp / "demo", seed=0, encoder_steps=20)
        train = pd.read_csv(demo / "train.csv")
        pd.concat([train] * (a.n // len(train) + 1)).head(a.n).to_csv(tmp / "train.csv", index=False)
        print("| processes | threads each | images/s | wall s | load average (1, 5, 15 min) |\n|--:|--:|--:|--:|--|")
        for nproc in a.nproc:
            cfg = tmp / f"g{nproc}.toml"
            cfg.write_text(f"model_path = '{demo / 'encoder.onnx'}'\nembedding_size = 64\noutdir = '{tmp / str(nproc)}'\n"
                           f"batch_size = {a.batch_size}\nnum_workers = {a.workers}\ndevice = '{a.device}'\n"
                           f"[train]\ndata_dir = '{demo / 'images'}'\nannotations = '{tmp / 'train.csv'}'\n")
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            threads = max(1, cores // nproc)
            rate, wall = run(cfg, nproc, threads)
            print(f"| {nproc} | {threads} | {rate:.0f} | {wall:.1f} | {load} |", flush=True)


if __name__ == "__main__":
    main()
