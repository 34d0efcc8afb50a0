"""A zero-epoch predictor: linear CCS / CCAS heads fitted by ridge regression on cached encoder features.

    python scripts/ridge_predictor.py --model ../shared/models/mobilefacenet_arcface.onnx \\
        --features output/lfw/labels/train_features.npy --labels output/lfw/labels/train_labels.csv \\
        --out output/lfw/checkpoints/ridge/predictor.pt

The heads are train.py's ``head_init = "ridge"`` start (penalty l2 x N x mean squared feature norm,
bias unpenalized), solved from generate.py's saved features instead of a new pass over the
images, on the unchanged encoder: what train.py gives with ``freeze_backbone = true``,
``head_hidden = 0``, ``head_init = "ridge"`` before its first optimizer step. A cheap baseline
predictor (seconds on CPU) where a training run does not fit the budget.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfira.backbone import check_embedding_size, load_backbone  # noqa: E402
from transfira.checkpoint import save_predictor  # noqa: E402
from transfira.errors import TransfiraError, run_cli  # noqa: E402
from transfira.io import numeric_column, read_annotations  # noqa: E402
from transfira.model import RecognizabilityPredictionNetwork  # noqa: E402
from transfira.training import ridge_fit as ridge_heads  # noqa: E402  (train.py's head_init = "ridge" solve)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the encoder (ONNX) the features come from")
    p.add_argument("--features", required=True, help="generate.py's {split}_features.npy")
    p.add_argument("--labels", required=True, help="generate.py's {split}_labels.csv (columns ccs, ccas), same rows")
    p.add_argument("--out", required=True, help="predictor checkpoint to write (plain state dict)")
    p.add_argument("--l2", type=float, default=1e-3, help="ridge penalty relative to the mean squared feature norm")
    args = p.parse_args()
    features = np.load(args.features, mmap_mode="r")
    frame = read_annotations(args.labels, ["ccs", "ccas"])
    if len(frame) != len(features):
        raise TransfiraError(f"{args.labels} has {len(frame)} rows but {args.features} has {len(features)}")
    targets = np.stack([numeric_column(frame, c)[0] for c in ("ccs", "ccas")], 1)
    keep = np.isfinite(targets).all(1) & np.isfinite(features).all(1)
    w = ridge_heads(features[keep], targets[keep], args.l2)
    backbone = load_backbone("onnx", args.model)
    check_embedding_size(backbone, features.shape[1], 112, args.model)
    model = RecognizabilityPredictionNetwork(backbone, features.shape[1], 0, freeze_backbone=True)
    with torch.no_grad():
        for k, head in enumerate((model.ccs_layer, model.ccas_layer)):
            head.weight.copy_(torch.as_tensor(w[:-1, k], dtype=torch.float32)[None])
            head.bias.fill_(float(w[-1, k]))
    save_predictor(args.out, model)
    fit = np.c_[features[keep], np.ones(keep.sum())] @ w
    corr = [np.corrcoef(fit[:, k], targets[keep, k])[0, 1] for k in range(2)]
    print(f"ridge heads on {int(keep.sum())} images: train Pearson r CCS {corr[0]:.3f}, CCAS {corr[1]:.3f} -> {args.out}")


if __name__ == "__main__":
    run_cli(main)
