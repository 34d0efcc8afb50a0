"""The subject bootstrap's cost: 20k templates all-vs-all (2e8 pairs), 1000 replicates.

    PYTHONPATH=. python benchmarks/bench_bootstrap.py
    PYTHONPATH=. python benchmarks/bench_bootstrap.py --templates 5000 --replicates 200

Times (a) the streamed scoring without and with the pair indices of the top impostor scores the
bootstrap needs (``keep_top``), (b) ``bootstrap.replicate_tar`` over all replicates, (c) the
image-level part (weighted Spearman + ERC areas of one measure) on a --images-sized set. Peak
memory = the process's max RSS (resource.getrusage).
"""
from __future__ import annotations

import argparse
import json
import resource
import time


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime

import numpy as np
import torch

from transfira import bootstrap as bs
from transfira import evaluation as ev

FMRS = [1e-3, 1e-4, 1e-5, 1e-6]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--templates", type=int, default=20_000)
    p.add_argument("--per-subject", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--replicates", type=int, default=1000)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n = args.templates
    subj = np.arange(n) // args.per_subject
    centers = rng.standard_normal((subj.max() + 1, args.dim), dtype=np.float32)
    x = centers[subj] + 2.0 * rng.standard_normal((n, args.dim), dtype=np.float32)
    out: dict = dict(templates=n, pairs=n * (n - 1) // 2, replicates=args.replicates, threads=args.threads)

    t0, c0 = time.perf_counter(), cpu()
    ev.all_vs_all_scores(x, subj, FMRS, 2048)
    out["score_s"], out["score_cpu_s"] = round(time.perf_counter() - t0, 1), round(cpu() - c0, 1)
    _, n_imp = ev.count_pairs(subj)
    keep = bs.keep_top(FMRS, n_imp)
    t0, c0 = time.perf_counter(), cpu()
    st = ev.all_vs_all_scores(x, subj, FMRS, 2048, keep_top=keep)
    out["score_keep_top_s"], out["score_keep_top_cpu_s"] = round(time.perf_counter() - t0, 1), round(cpu() - c0, 1)
    out["kept"] = len(st.impostor_top)
    out["genuine"] = len(st.genuine)

    units = subj
    n_units = int(units.max()) + 1
    t0, c0 = time.perf_counter(), cpu()
    counts = bs.draw_counts(n_units, args.replicates, 0)
    reps = bs.replicate_tar(bs.sample_of(st, units), bs.all_design(units, n_units), counts, FMRS)
    out["bootstrap_s"] = round(time.perf_counter() - t0, 1)
    out["bootstrap_cpu_s"] = round(cpu() - c0, 1)
    lo, hi = bs.interval(reps)
    out["tar"] = [round(float(t), 4) for t in ev.tar_at_fmr(st.genuine, st.impostor_top, st.n_impostor, FMRS)]
    out["tar_ci"] = [[round(float(a), 4), round(float(b), 4)] for a, b in zip(lo, hi)]

    # image level: one quality measure, one FMR
    m = args.images
    isub = np.arange(m) // 5
    noise = rng.uniform(0.5, 4, m).astype(np.float32)
    feats = centers[isub % len(centers)] + noise[:, None] * rng.standard_normal((m, args.dim), dtype=np.float32)
    q = -noise + 0.3 * rng.standard_normal(m)
    _, n_imp_i = ev.count_pairs(isub)
    sti = ev.all_vs_all_scores(feats, isub, FMRS[:1], 2048, keep_top=bs.keep_top(FMRS[:1], n_imp_i))
    iu = isub
    ni_units = int(iu.max()) + 1
    t0, c0 = time.perf_counter(), cpu()
    ci = bs.draw_counts(ni_units, args.replicates, 0)
    thr = bs.replicate_thresholds(bs.sample_of(sti, iu), bs.all_design(iu, ni_units), ci, FMRS[:1])
    erc = bs.ErcBootstrap(q, iu, sti.genuine_pairs, iu[sti.genuine_pairs[:, 0]])
    for a, b in bs.batches(args.replicates, m + len(sti.genuine)):
        bs.weighted_spearman(q, -noise, ci[a:b][:, iu])
        erc.areas(ci[a:b], sti.genuine[None, :] <= thr[a:b, :1], [0.95, 0.2])
    out["image_level_s"] = round(time.perf_counter() - t0, 1)
    out["image_level_cpu_s"] = round(cpu() - c0, 1)
    out["images"] = m
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["peak_rss_mib"] = round(ru.ru_maxrss / 1024)
    out["cpu_s_total"] = round(ru.ru_utime + ru.ru_stime, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
