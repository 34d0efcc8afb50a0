"""IJB-C at full size on CPU: alignment + extraction speed, media pooling, the pair list.

    PYTHONPATH=. python benchmarks/bench_ijb.py                      # all parts, each in its own process
    PYTHONPATH=. python benchmarks/bench_ijb.py --part extract --images 240 --threads 2
    PYTHONPATH=. python benchmarks/bench_ijb.py --part pool          # 469,375 images -> 23,124 templates
    PYTHONPATH=. python benchmarks/bench_ijb.py --part pairs         # 15,658,489 pair lines

- ``extract``: a synthetic release (loose crops with landmarks, :mod:`transfira.ijb`) through
  run_ijb's features stage: decoding + five-point alignment alone, then alignment + the real
  MobileFaceNet (``../shared/models/mobilefacenet_arcface.onnx``; the demo encoder when absent)
  without and with the flip test. Images/s on ``--threads`` torch threads, loader in-process.
- ``pool``: :func:`transfira.aggregation.aggregate_media_variants` (all four variants, media
  rule) on random 512-D features with IJB-C's counts, against the per-image rule
  (``aggregate_variants``).
- ``pairs``: reading a pair list of IJB-C's length (:func:`transfira.ijb.read_pairs`) and the
  conversion to evaluate.py's CSV.
Each part prints its peak resident memory (``ru_maxrss`` of its process).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IJBC_IMAGES, IJBC_TEMPLATES, IJBC_PAIRS = 469_375, 23_124, 15_658_489
MOBILEFACENET = ROOT.parent / "shared" / "models" / "mobilefacenet_arcface.onnx"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def part_extract(args) -> None:
    import pandas as pd
    import torch

    from transfira.data import dataset_from_table
    from transfira.ijb import build_test_table, make_synthetic_release
    from transfira.jobs.ijb import SCHEMA as IJB_SCHEMA, extraction_config
    from transfira.networks import embed_and_score
    from transfira.config import apply_schema

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subjects = max(1, round(args.images / 12))  # about 12 images per subject (3 templates)
        counts = make_synthetic_release(tmp / "release", subjects=subjects, impostor_pairs=10)
        table = build_test_table(tmp / "release", "ijbc")
        table.to_csv(tmp / "test.csv", index=False)
        if MOBILEFACENET.is_file():
            model, dim, name = MOBILEFACENET, 192, "MobileFaceNet (mobilefacenet_arcface.onnx)"
        else:
            from transfira.demo import export_onnx, train_encoder

            model, dim, name = tmp / "encoder.onnx", 64, "demo encoder (shared models absent)"
            export_onnx(train_encoder(steps=10), model)
        print(f"{counts['images']} loose crops, {table['template_id'].nunique()} templates, encoder {name}, "
              f"{args.threads} torch thread(s), batch {args.batch}")
        base = apply_schema({"root": str(tmp / "release"), "model_path": str(model), "embedding_size": dim,
                             "num_workers": 0, "device": "cpu", "batch_size": args.batch}, IJB_SCHEMA, "bench")
        tcfg = extraction_config(base, tmp)
        frame = pd.read_csv(tmp / "test.csv")
        dataset = dataset_from_table(frame, tcfg["data"], tcfg["aug"], "bench")
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        align = time.perf_counter() - start
        print(f"decode + align + normalize: {len(dataset) / align:8.1f} images/s")
        for flip in (False, True):
            tcfg = extraction_config({**base, "flip": flip}, tmp)
            best = float("inf")
            for _ in range(args.repeats):
                for f in (tmp / "features").glob("*.npy"):
                    f.unlink()
                start = time.perf_counter()
                embed_and_score(tcfg, frame, True, False)
                best = min(best, time.perf_counter() - start)
            print(f"align + extract, flip {'on ' if flip else 'off'}: {len(frame) / best:8.1f} images/s "
                  f"(best of {args.repeats}; {len(frame)} images in {best:.2f} s)")


def ijbc_like(n: int, k: int, dim: int, seed: int = 0):
    """Random features and scores; template ids; media: 30 % stills, the rest frames of 5 videos per template."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    features = torch.randn(n, dim).numpy()
    tids = rng.integers(0, k, n)
    still = rng.random(n) < 0.3
    mids = np.where(still, 1_000_000 + np.arange(n), rng.integers(0, 5, n))
    return features, tids, mids, rng.uniform(-0.2, 1.0, n), rng.uniform(-0.5, 0.5, n), rng.uniform(0.3, 1.0, n)


def part_pool(args) -> None:
    import torch

    from transfira import aggregation as agg

    torch.set_num_threads(args.threads)
    features, tids, mids, ccs, ccas, det = ijbc_like(args.n, args.templates, args.dim)
    n_media = len(np.unique(np.stack([tids, mids]), axis=1).T)
    print(f"{args.n} images, {len(np.unique(tids))} templates, {n_media} media, {args.dim}-D float32 "
          f"({features.nbytes / 2**20:.0f} MiB), {args.threads} torch thread(s); peak before pooling "
          f"{peak_mb():.0f} MiB")
    runs = {
        "media rule, 4 variants": lambda: agg.aggregate_media_variants(features, tids, mids, ccs, ccas,
                                                                       list(agg.VARIANTS)),
        "media rule + det score, 4 variants": lambda: agg.aggregate_media_variants(
            features, tids, mids, ccs, ccas, list(agg.VARIANTS), image_scale=det),
        "per image (aggregate_variants), 4 variants": lambda: agg.aggregate_variants(features, tids, ccs, ccas,
                                                                                    list(agg.VARIANTS)),
    }
    for name, fn in runs.items():
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
            del out
        print(f"{name:45s} {best:6.2f} s  ({args.n / best / 1e6:.2f} M images/s)")
    print(f"peak resident memory {peak_mb():.0f} MiB")


def part_pairs(args) -> None:
    import pandas as pd

    from transfira.ijb import read_pairs, write_pairs_csv

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "ijbc_template_pair_label.txt"
        pairs = np.stack([rng.integers(1, 190_000, args.pairs), rng.integers(1, 190_000, args.pairs),
                          (rng.random(args.pairs) < 0.0123).astype(np.int64)], 1)
        start = time.perf_counter()
        pd.DataFrame(pairs).to_csv(path, sep=" ", header=False, index=False, chunksize=1 << 20)
        print(f"{args.pairs} pair lines, {path.stat().st_size / 2**20:.0f} MiB (written in "
              f"{time.perf_counter() - start:.1f} s); peak before reading {peak_mb():.0f} MiB")
        del pairs
        start = time.perf_counter()
        frame = read_pairs(path)
        print(f"read_pairs: {time.perf_counter() - start:6.2f} s, peak {peak_mb():.0f} MiB")
        start = time.perf_counter()
        write_pairs_csv(frame, Path(tmp) / "pairs.csv")
        print(f"write_pairs_csv (evaluate.py's CSV): {time.perf_counter() - start:6.2f} s, peak {peak_mb():.0f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "extract", "pool", "pairs"], default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--images", type=int, default=240, help="extract: synthetic loose crops")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--n", type=int, default=IJBC_IMAGES, help="pool: images")
    p.add_argument("--templates", type=int, default=IJBC_TEMPLATES)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--pairs", type=int, default=IJBC_PAIRS)
    p.add_argument("--tmp", default=None, help="pairs: folder for the temporary pair files")
    args = p.parse_args()
    if args.part != "all":
        {"extract": part_extract, "pool": part_pool, "pairs": part_pairs}[args.part](args)
        return
    for part in ("extract", "pool", "pairs"):
        print(f"\n== {part}", flush=True)
        forwarded = [a for a in sys.argv[1:] if not a.startswith("--part")]
        subprocess.run([sys.executable, __file__, "--part", part, *forwarded], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})


if __name__ == "__main__":
    main()
