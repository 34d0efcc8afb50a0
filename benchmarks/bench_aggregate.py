"""Template aggregation: vectorized segment sums (transfira.aggregation) vs the reference's per-template loop.

    python benchmarks/bench_aggregate.py                  # loop vs vectorized at 20k and 100k images, then 1M / 100k
    python benchmarks/bench_aggregate.py --n 200000 --templates 20000 --small --normalize

The reference builds each template with a boolean mask over all rows (O(N) per template, O(N * K)
in all); the vectorized version computes per-row weights for all four variants with ``bincount``
and all weighted segment sums in one ``embedding_bag`` call, O(N * D). Both give the same vectors
(checked).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transfira import aggregation as agg


def make(n: int, k: int, dim: int, seed: int = 0):
    """Random features, template ids (about n / k images each), CCS in [-0.2, 1) and CCAS in [-0.5, 0.5)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    features = torch.randn(n, dim).numpy()
    tids = rng.integers(0, k, n)
    ccs = rng.uniform(-0.2, 1.0, n).astype(np.float32)
    ccas = rng.uniform(-0.5, 0.5, n).astype(np.float32)
    return features, tids, ccs, ccas


def reference_loop(features, tids, ccs, ccas, eps=agg.WEIGHT_EPS) -> dict[str, np.ndarray]:
    """The reference's algorithm (a boolean mask per template), with the same filter fallback and weight guard."""
    ids = np.unique(tids)
    out = {name: np.empty((len(ids), features.shape[1]), np.float32) for name in agg.VARIANTS}
    for j, t in enumerate(ids):
        mask = tids == t
        z, c, a = features[mask], ccs[mask], ccas[mask]
        keep = a > 0
        if not keep.any():
            keep[:] = True
        for name, (use_filter, use_weight) in agg.VARIANTS.items():
            zz, cc = (z[keep], c[keep]) if use_filter else (z, c)
            w = np.clip(cc, 0, None) if use_weight else np.ones(len(cc), np.float32)
            if w.sum() <= eps:
                w = np.ones(len(cc), np.float32)
            out[name][j] = (w[:, None] * zz).sum(0) / w.sum()
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="images of the large case")
    p.add_argument("--templates", type=int, default=100_000, help="templates of the large case")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--small", type=int, nargs="*", default=[20_000, 100_000],
                   help="image counts (10 per template) for the loop comparison; none skips it")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of the large case (shared CPUs vary)")
    p.add_argument("--normalize", action="store_true", help="also time normalize_features = true")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    for n in args.small:
        k = n // 10
        features, tids, ccs, ccas = make(n, k, args.dim)
        loop, t_loop = timed(reference_loop, features, tids, ccs, ccas)
        fast, t_fast = timed(agg.all_variants, features, tids, ccs, ccas)
        worst = max(float(np.abs(fast[name][1] - loop[name]).max()) for name in agg.VARIANTS)
        print(f"{n} images / {k} templates x {args.dim}-D, 4 variants: per-template loop {t_loop:.2f} s, "
              f"vectorized {t_fast:.3f} s, ratio {t_loop / t_fast:.0f}x (max abs difference {worst:.1e})")
        del features, tids, ccs, ccas, loop, fast
    features, tids, ccs, ccas = make(args.n, args.templates, args.dim, seed=1)
    gib = features.nbytes / 2**30
    for normalize in [False, True] if args.normalize else [False]:
        times = []
        for _ in range(args.repeat):
            result, sec = timed(agg.all_variants, features, tids, ccs, ccas, normalize=normalize)
            times.append(sec)
            del result
        print(f"{args.n} images ({gib:.1f} GiB) / {args.templates} templates x {args.dim}-D, 4 variants"
              f"{', normalized' if normalize else ''}: median {np.median(times):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in times)}; {args.n / np.median(times) / 1e6:.2f} M images/s)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


if __name__ == "__main__":
    main()
