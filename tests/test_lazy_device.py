"""generate -> train -> test (SER-FIQ) -> score on a device that is not the CPU, without a GPU.

The TorchScript lazy backend (``device = 'lazy'``) refuses an operation that mixes its tensors
with CPU tensors, as CUDA does, so a tensor created on the wrong device fails here instead of
in a user's GPU job. It runs in a subprocess: the backend is initialized once per process, and
``torch.inference_mode`` is replaced by ``torch.no_grad`` before ``transfira`` is imported
(lazy tensors cannot be inference tensors; that is the backend's limit, not a device mix).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from test_generate import onnx_features

LAZY_RUN = """import sys, torch
class NoGrad(torch.no_grad):
    def __init__(self, mode=True):
        super().__init__()
torch.inference_mode = NoGrad
import torch._lazy.ts_backend
torch._lazy.ts_backend.init()
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from pipeline import run_pipeline
run_pipeline(Path(sys.argv[1]), Path(sys.argv[2]), "lazy")
"""


def lazy_backend_works() -> bool:
    try:
        import torch._lazy.ts_backend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not lazy_backend_works(), reason="this torch build has no TorchScript lazy backend")
def test_pipeline_on_the_lazy_device(demo_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LAZY_RUN, str(demo_dir), str(tmp_path), str(ROOT / "tests")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = pd.read_csv(tmp_path / "labels" / "train_labels.csv")
    features = np.load(tmp_path / "labels" / "train_features.npy")
    np.testing.assert_allclose(features, onnx_features(demo_dir, labels.path), atol=2e-4, rtol=1e-4)
    metrics = pd.read_csv(tmp_path / "ckpt" / "run" / "metrics.csv")
    assert metrics.epoch.tolist() == [0, 1] and metrics.step.tolist() == [0, 4] and (metrics.skipped_steps == 0).all()
    serfiq = np.load(tmp_path / "test" / "test_serfiq.npy")
    assert serfiq.shape == (20,) and np.isfinite(serfiq).all()
    scores = pd.read_csv(tmp_path / "scores.csv")  # score.py and test.py: the same checkpoint, the same numbers
    np.testing.assert_allclose(scores.ccas, np.load(tmp_path / "test" / "test_ccas.npy").ravel(), atol=1e-5)


@pytest.mark.skipif(not lazy_backend_works(), reason="this torch build has no TorchScript lazy backend")
def test_lazy_device_refuses_device_mixing():
    """What makes the test above worth running: a CPU tensor meeting a lazy one raises."""
    code = ("import torch, torch._lazy.ts_backend\ntorch._lazy.ts_backend.init()\n"
            "(torch.ones(2, device='lazy') + torch.ones(2)).cpu()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not a lazy tensor" in proc.stderr
