"""train.py ``[degrade]`` throughput: fresh degradations labelled online, frozen vs end to end.

Trains on aligned LFW photos (``../shared``; the demo data without it) for a fixed number of steps
and reports images per second of the whole job's training loop, and of the data loader alone
(decode + degrade + preprocess, ``num_workers`` processes), so one sees whether the loader is on the
critical path:

    python benchmarks/bench_degrade.py [--photos 512] [--batch 64] [--workers 1]

Rows: frozen encoder (one encoder pass gives the label and the heads' input), end to end (an extra
forward through a frozen copy of the encoder for the labels, plus forward + backward).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from transfira.backbone import load_backbone
from transfira.config import apply_schema
from transfira.data import FreshlyDegradedDataset, build_transform, load_image, make_loader
from transfira.io import save_id_vectors
from transfira.jobs.train import SCHEMA, run as train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
KINDS = ["blur", "downscale", "noise", "occlusion", "jpeg", "underexpose", "overexpose", "rotation"]


def photos_and_encoder(tmp: Path, n: int) -> tuple[pd.DataFrame, Path, Path, int]:
    """``(photos, data_dir, encoder, embedding size)``: LFW + MS1M MobileFaceNet, or the demo."""
    if (SHARED / "models" / "mobilefacenet_arcface.onnx").is_file():
        table = pd.read_csv(SHARED / "data" / "lfw_aligned" / "all.csv")
        table = table.groupby("subject_id").head(4)
        table = table[table.groupby("subject_id")["path"].transform("size") >= 2].iloc[:n]
        return table, SHARED / "data" / "lfw_aligned" / "images", SHARED / "models" / "mobilefacenet_arcface.onnx", 192
    from transfira.demo import make_demo

    demo = make_demo(tmp / "demo", encoder_steps=50)
    table = pd.read_csv(demo / "train.csv").iloc[:n]
    return table, demo / "images", demo / "encoder.onnx", 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos, data_dir, encoder, dim = photos_and_encoder(tmp, args.photos)
        photos[["path", "subject_id"]].to_csv(tmp / "photos.csv", index=False)
        net = load_backbone("onnx", encoder).eval()  # centers: mean embedding of each identity's photos
        transform = build_transform({})
        with torch.inference_mode():
            z = torch.cat([net(torch.stack([transform(load_image(data_dir / q)) for q in photos["path"][i:i + 64]]))
                           for i in range(0, len(photos), 64)]).numpy()
        ids = np.unique(photos["subject_id"])
        save_id_vectors(tmp / "centers.npz", ids, np.stack([z[photos["subject_id"].to_numpy() == i].mean(0) for i in ids]))
        degrade = {"kinds": KINDS, "stack": 1, "severity": [0.1, 1.0], "p_clean": 0.3,
                   "centers_path": str(tmp / "centers.npz")}
        data = FreshlyDegradedDataset(data_dir, photos["path"].tolist(), transform, np.zeros(len(photos), np.int64),
                                      degrade)
        start = time.perf_counter()
        for _ in make_loader(data, args.batch, args.workers, persistent=False):
            pass
        loader_rate = len(photos) / (time.perf_counter() - start)
        print(f"{len(photos)} photos, encoder {encoder.name} ({dim}-D), batch {args.batch}, {args.workers} loader "
              f"worker(s), torch {torch.__version__}, 2 threads\n")
        print("| row | images | seconds | images/s |\n| --- | --: | --: | --: |")
        print(f"| data loader alone (decode + degrade + preprocess) | {len(photos)} | "
              f"{len(photos) / loader_rate:.1f} | {loader_rate:.1f} |")
        for name, frozen, epochs in (("frozen encoder, ridge start + 1 epoch", True, 1),
                                     ("end to end, ridge start + 1 epoch", False, 1)):
            cfg = apply_schema({
                "model_path": str(encoder), "embedding_size": dim, "checkpoint_outdir": str(tmp / "ckpt"),
                "run_name": name.split(",")[0].replace(" ", "_"), "device": "cpu", "num_workers": args.workers,
                "freeze_backbone": frozen, "head_input": "unit_lognorm", "head_init": "ridge",
                "data": {"data_dir": str(data_dir), "annotations": str(tmp / "photos.csv"), "batch_size": args.batch},
                "degrade": degrade, "opt": {"optimizer": "AdamW", "lr": 1e-5, "num_epochs": epochs}}, SCHEMA, "bench")
            start = time.perf_counter()
            train(cfg)
            seconds = time.perf_counter() - start
            images = len(photos) * (epochs + 1)  # the ridge pass and the epochs
            print(f"| {name} | {images} | {seconds:.1f} | {images / seconds:.1f} |")


if __name__ == "__main__":
    main()
