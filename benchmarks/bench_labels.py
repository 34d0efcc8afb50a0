"""Label computation speed: vectorized chunked labels vs the reference's per-cosine Python loop.

    python benchmarks/bench_labels.py [--sizes 10000x1000 100000x10000] [--dim 512]

Prints, per size, the time for class centers + CCS/NNCCS and the process's peak memory;
then, on one small size both can finish, the reference's algorithm (a Python loop over
images and over identities computing one cosine at a time) and the speed-up ratio.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from transfira.labels import center_similarities, class_centers


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def make_data(n: int, classes: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, classes, n)
    ids[:classes] = np.arange(classes)
    features = rng.standard_normal((n, dim), dtype=np.float32)
    features += rng.standard_normal((classes, dim), dtype=np.float32)[ids] * 2
    return features, ids


def vectorized(features: np.ndarray, ids: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    center_ids, centers = class_centers(features, ids, device=device)
    return center_similarities(features, ids, center_ids, centers, device=device)


def numpy_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def torch_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=0))


def reference_loop(features: np.ndarray, ids: np.ndarray, cos=torch_cosine) -> tuple[np.ndarray, np.ndarray]:
    """The reference's algorithm: loops over identities for centers, then over images x identities,
    one cosine at a time (``torch_cosine`` as in the reference's torch code, or ``numpy_cosine``)."""
    centers = {c: features[ids == c].mean(0) for c in np.unique(ids)}
    ccs, nnccs = [], []
    for z, y in zip(features, ids):
        best = -np.inf
        for c, mu in centers.items():
            s = cos(z, mu)
            if c == y:
                ccs.append(s)
            elif s > best:
                best = s
        nnccs.append(best)
    return np.array(ccs, np.float32), np.array(nnccs, np.float32)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10000x1000", "100000x10000"], help="N x C")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--loop-size", default="1000x300", help="N x C for the reference loop comparison")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, D = {args.dim}")

    n, c = map(int, args.loop_size.split("x"))
    features, ids = make_data(n, c, args.dim)
    t_vec = min(timed(vectorized, features, ids, args.device)[1] for _ in range(5))
    ours = vectorized(features, ids, args.device)
    for name, cos in (("torch", torch_cosine), ("numpy", numpy_cosine)):
        ref, t_loop = timed(reference_loop, features, ids, cos)
        assert np.allclose(ref[0], ours[0], atol=1e-4) and np.allclose(ref[1], ours[1], atol=1e-4)
        print(f"{n} images x {c} identities: reference loop ({name} cosine per pair) {t_loop:.2f} s, "
              f"vectorized {t_vec * 1e3:.1f} ms (best of 5), ratio {t_loop / t_vec:.0f}x (results agree to 1e-4)")

    for size in args.sizes:
        n, c = map(int, size.split("x"))
        features, ids = make_data(n, c, args.dim)
        elapsed = timed(vectorized, features, ids, args.device)[1]
        print(f"{n} images x {c} identities x {args.dim}-D: {elapsed:.2f} s "
              f"({n * c / elapsed / 1e6:.0f} M image-center similarities/s), peak RSS {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
