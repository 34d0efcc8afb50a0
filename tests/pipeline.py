"""generate -> train -> test (with SER-FIQ) -> score on the demo data, in this process, on one device.

Shared by the CPU stand-in for a GPU (the TorchScript lazy backend, ``tests/test_lazy_device.py``)
and the ``gpu`` smoke tests (``tests/test_gpu.py``): sizes are tiny, the point is that every
tensor lands on the right device, not what is learned.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from transfira.config import apply_schema


def pipeline_configs(demo_dir: Path, root: Path, device: str, amp: str = "none") -> dict[str, dict[str, Any]]:
    """The four configs: 64 training images (4 steps of 16), 20 test images, SER-FIQ with m = 4."""
    from transfira.jobs.generate import SCHEMA as GENERATE_SCHEMA
    from transfira.jobs.test import SCHEMA as TEST_SCHEMA
    from transfira.jobs.score import SCHEMA as SCORE_SCHEMA
    from transfira.jobs.train import SCHEMA

    images, encoder = str(demo_dir / "images"), str(demo_dir / "encoder.onnx")
    root.mkdir(parents=True, exist_ok=True)
    pd.read_csv(demo_dir / "train.csv").head(64).to_csv(root / "train.csv", index=False)
    pd.read_csv(demo_dir / "test.csv").head(20).to_csv(root / "test.csv", index=False)
    labels = root / "labels" / "train_labels.csv"
    common = {"model_path": encoder, "embedding_size": 64, "device": device, "num_workers": 0}
    return {
        "generate": apply_schema({**common, "outdir": str(root / "labels"), "batch_size": 32,
                                  "train": {"data_dir": images, "annotations": str(root / "train.csv")}},
                                 GENERATE_SCHEMA, "generate"),
        "train": apply_schema({**common, "checkpoint_outdir": str(root / "ckpt"), "run_name": "run", "amp": amp,
                               "save_every_steps": 2,
                               "data": {"data_dir": images, "annotations": str(labels), "batch_size": 16},
                               "val": {"data_dir": images, "annotations": str(labels), "batch_size": 32},
                               "opt": {"optimizer": "SGD", "lr": 1e-3, "num_epochs": 1, "milestones": [5]}},
                              SCHEMA, "train"),
        "test": apply_schema({**common, "checkpoint_path": str(root / "ckpt" / "run" / "encoder_0001.pt"),
                              "outdir": str(root / "test"), "batch_size": 8,
                              "data": {"data_dir": images, "annotations": str(root / "test.csv")},
                              "quality": {"scores": ["serfiq"], "serfiq": {"m": 4}}}, TEST_SCHEMA, "test"),
        "score": apply_schema({**common, "checkpoint_path": str(root / "ckpt" / "run" / "encoder_0001.pt"),
                               "csv": str(root / "test.csv"), "data_dir": images, "out": str(root / "scores.csv"),
                               "batch_size": 8}, SCORE_SCHEMA, "score"),
    }


def run_pipeline(demo_dir: Path, root: Path, device: str, amp: str = "none") -> dict[str, Any]:
    """Run the four stages; return what they wrote (features, labels, metrics, test arrays, scores)."""
    from transfira.jobs.generate import run as run_generate
    from transfira.jobs.test import run as run_test
    from transfira.jobs.score import run as run_score
    from transfira.jobs.train import run as train

    cfgs = pipeline_configs(demo_dir, root, device, amp)
    run_generate(cfgs["generate"])
    run = train(cfgs["train"])
    run_test(cfgs["test"], generate_features=True, predict_scores=True)
    run_score(cfgs["score"])
    test = root / "test"
    return {"features": np.load(root / "labels" / "train_features.npy"),
            "labels": pd.read_csv(root / "labels" / "train_labels.csv"),
            "metrics": pd.read_csv(run / "metrics.csv"), "run": run,
            **{f"test_{name}": np.load(test / f"test_{name}.npy") for name in ("features", "ccs", "ccas", "serfiq")},
            "scores": pd.read_csv(root / "scores.csv")}
