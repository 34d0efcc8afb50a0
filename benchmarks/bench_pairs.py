"""An IJB-C-sized 1:1 pair list through evaluate.py's verification: time and peak memory.

    PYTHONPATH=. python benchmarks/bench_pairs.py                      # 15.7M pairs, 23k templates x 512-D
    PYTHONPATH=. python benchmarks/bench_pairs.py --pairs 2000000 --bootstrap 1000

Writes a synthetic ``template_a template_b label`` file in InsightFace's layout (19,557 genuine
pairs, the rest impostor, like IJB-C; cached under --workdir), a templates_baseline.npz, and runs
``transfira.jobs.evaluate.verification`` on it in a fresh process: parse + memory-mapped cache,
streamed scoring, TAR at FMR 1e-6 .. 1e-1 (and the bootstrap when asked). Peak memory = the
process's max RSS (resource.getrusage), also shown above the RSS before the run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

FMRS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_inputs(work: Path, n_pairs: int, n_templates: int, n_subjects: int, n_genuine: int, dim: int) -> Path:
    """Templates (subject centers + noise) and a pair file; reused when already there."""
    from transfira.io import save_id_vectors

    pairs = work / f"pairs_{n_pairs}.txt"
    if pairs.is_file() and (work / "templates_baseline.npz").is_file():
        return pairs
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    subj = rng.integers(0, n_subjects, n_templates)
    centers = rng.standard_normal((n_subjects, dim), dtype=np.float32)
    feats = centers[subj] + 2.2 * rng.standard_normal((n_templates, dim), dtype=np.float32)
    ids = np.arange(1, n_templates + 1) * 7  # integer template ids, as IJB-C's
    save_id_vectors(work / "templates_baseline.npz", ids, feats)
    order = np.argsort(subj, kind="stable")
    start = np.searchsorted(subj[order], np.arange(n_subjects))
    size = np.bincount(subj, minlength=n_subjects)
    with open(pairs, "w") as f:
        left = n_pairs
        gen_left = n_genuine
        while left:
            n = min(left, 1 << 20)
            n_gen = min(gen_left, round(n_genuine * n / n_pairs) + 1)
            a = rng.integers(0, n_templates, n)
            b = rng.integers(0, n_templates, n)
            # genuine: a second template of a's subject (subjects with one template give a != b pairs rarely)
            s = subj[a[:n_gen]]
            b[:n_gen] = order[start[s] + rng.integers(0, np.maximum(size[s], 1))]
            lab = np.zeros(n, np.int8)
            lab[:n_gen] = 1
            lab[n_gen:] = 0
            imp = np.flatnonzero(subj[a] == subj[b])
            imp = imp[imp >= n_gen]
            b[imp] = (b[imp] + 1) % n_templates  # keep impostors between subjects (mostly)
            lab[n_gen:][subj[a[n_gen:]] == subj[b[n_gen:]]] = 1
            pd.DataFrame({"a": ids[a], "b": ids[b], "label": lab}).to_csv(f, sep=" ", header=False, index=False)
            left -= n
            gen_left -= n_gen
    return pairs


def single(args) -> dict:
    import torch

    from transfira.jobs import evaluate as job

    work = Path(args.workdir)
    t0 = time.perf_counter()
    pairs = make_inputs(work, args.pairs, args.templates, args.subjects, 19557, args.dim)
    prep = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    cfg = job.SCHEMA.copy()
    cfg = {**cfg, "fmr": FMRS, "bootstrap": args.bootstrap, "seed": 0, "threshold_convention": args.convention,
           "outdir": str(work / "out"), "templates": {"baseline": str(work / "templates_baseline.npz")},
           "pairs": {**job.SCHEMA["pairs"], "path": str(pairs), "chunk_rows": args.chunk_rows}}
    base = rss_mib()
    t0 = time.perf_counter()
    results, source = job.verification(cfg, torch.device("cpu"))
    sec = time.perf_counter() - t0
    res = results["baseline"]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = dict(pairs=args.pairs, templates=args.templates, dim=args.dim, chunk_rows=args.chunk_rows,
               bootstrap=args.bootstrap, threads=torch.get_num_threads(), seconds=round(sec, 1),
               mpairs_per_s=round(args.pairs / sec / 1e6, 2), rss_base_mib=round(base),
               peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               genuine=len(res.stats.genuine), prep_seconds=round(prep, 1),
               tar=[None if np.isnan(t) else round(float(t), 4) for t in res.tar],
               cpu_s_total=round(ru.ru_utime + ru.ru_stime, 1))
    if res.replicates is not None:
        from transfira import bootstrap as bs

        lo, hi = bs.interval(res.replicates)
        out["tar_ci"] = [[round(float(a), 4), round(float(b), 4)] for a, b in zip(lo, hi)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=15_658_137)  # IJB-C 1:1: 19,557 genuine + 15,638,932 impostor
    p.add_argument("--templates", type=int, default=23_124)
    p.add_argument("--subjects", type=int, default=3_531)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk-rows", type=int, default=1 << 18)
    p.add_argument("--bootstrap", type=int, default=0)
    p.add_argument("--convention", default="spec")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="output/bench_pairs")
    p.add_argument("--single", action="store_true", help="run in this process and print JSON")
    args = p.parse_args()
    if args.single:
        print(json.dumps(single(args)))
        return
    cmd = [sys.executable, __file__, "--single"] + sys.argv[1:]
    r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    print(json.dumps(r))


if __name__ == "__main__":
    main()
