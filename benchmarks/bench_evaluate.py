"""Throughput and peak memory of the streaming all-vs-all verification (transfira.evaluation).

    python benchmarks/bench_evaluate.py                 # 5k and 20k templates x 512-D, fresh process each
    python benchmarks/bench_evaluate.py --single 20000 --chunks 4096

Peak memory is the process's max RSS (resource.getrusage; torch allocations are invisible to
tracemalloc), reported in total and above the RSS after the inputs were built.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transfira import evaluation as ev  # noqa: E402

FMRS = [1e-3, 1e-4, 1e-5, 1e-6]


def rss_mib() -> float:
    """Current RSS (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def single(n: int, dim: int, chunk: int, per_subject: int) -> dict:
    rng = np.random.default_rng(0)
    subjects = np.arange(n) // per_subject
    centers = rng.standard_normal((n // per_subject + 1, dim), dtype=np.float32)
    feats = centers[subjects] + 1.5 * rng.standard_normal((n, dim), dtype=np.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ev.all_vs_all_scores(feats[:600], subjects[:600], FMRS, chunk, device=device)  # warm-up
    base = rss_mib()
    t0 = time.perf_counter()
    st = ev.all_vs_all_scores(feats, subjects, FMRS, chunk, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    tar = ev.tar_at_fmr(st.genuine, st.impostor_top, st.n_impostor, FMRS)
    pairs = n * (n - 1) // 2
    return dict(n=n, dim=dim, chunk=chunk, device=device, threads=torch.get_num_threads(), pairs=pairs,
                genuine=len(st.genuine), k_max=len(st.impostor_top), seconds=round(sec, 2),
                mpairs_per_s=round(pairs / sec / 1e6, 1), rss_base_mib=round(base),
                peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                tar=[None if np.isnan(t) else round(float(t), 4) for t in tar])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--single", type=int, help="run one size in this process and print JSON")
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    p.add_argument("--chunks", type=int, nargs="+", default=[2048])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--per-subject", type=int, default=4, help="templates per subject")
    args = p.parse_args()
    if args.single:
        print(json.dumps(single(args.single, args.dim, args.chunks[0], args.per_subject)))
        return
    print(f"{'N':>7} {'chunk':>6} {'pairs':>12} {'sec':>7} {'Mpairs/s':>9} {'peak RSS MiB':>13} {'(base)':>7}  TAR@{FMRS}")
    for n in args.sizes:
        for chunk in args.chunks:
            out = subprocess.run([sys.executable, __file__, "--single", str(n), "--chunks", str(chunk),
                                  "--dim", str(args.dim), "--per-subject", str(args.per_subject)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{r['n']:>7} {r['chunk']:>6} {r['pairs']:>12,} {r['seconds']:>7} {r['mpairs_per_s']:>9} "
                  f"{r['peak_rss_mib']:>13} {r['rss_base_mib']:>7}  {r['tar']}  ({r['device']}, {r['threads']} threads)")


if __name__ == "__main__":
    main()
