"""Smoke tests on a CUDA GPU (``pytest -m gpu``; skipped without one): the whole pipeline, each
``amp`` with resume, and 2-rank NCCL training when two GPUs exist. Never needed by CI."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT
from pipeline import pipeline_configs, run_pipeline
from test_generate import onnx_features
from test_training import write_toml
from transfira.errors import TransfiraError
from transfira.jobs.train import run as train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_pipeline_on_cuda_matches_onnxruntime(demo_dir, tmp_path):
    """generate -> train -> test (SER-FIQ) -> score on cuda; features equal onnxruntime's within the
    suite's tolerance (full fp32: no TF32), test.py and score.py give the same scores."""
    out = run_pipeline(demo_dir, tmp_path, "cuda")
    assert torch.backends.cudnn.conv.fp32_precision == "ieee" if hasattr(torch.backends.cudnn, "conv") \
        else not torch.backends.cudnn.allow_tf32
    np.testing.assert_allclose(out["features"], onnx_features(demo_dir, out["labels"].path), atol=2e-4, rtol=1e-4)
    assert out["metrics"].step.tolist() == [0, 4] and np.isfinite(out["metrics"].val_ccs_mae).all()
    assert np.isfinite(out["test_serfiq"]).all() and np.isfinite(out["test_features"]).all()
    np.testing.assert_allclose(out["scores"].ccas, out["test_ccas"].ravel(), atol=1e-4)


def test_serfiq_masks_equal_the_cpus():
    from transfira.quality import keep_masks

    for seed in (0, 2 ** 31, 2 ** 32 - 1):  # 100 passes x 25,088 units: R50's and MobileFaceNet's size
        assert torch.equal(keep_masks(seed, 100, 25088, 0.5, "cuda").cpu(), keep_masks(seed, 100, 25088, 0.5))


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_training_with_each_amp_resumes(demo_dir, tmp_path, amp):
    """Killed after 2 applied steps, resumed to the end of the epoch: its 4 steps are applied or
    (fp16, GradScaler finding inf/NaN gradients) skipped, and the metrics are finite."""
    from transfira.jobs.generate import run as run_generate

    cfgs = pipeline_configs(demo_dir, tmp_path, "cuda", amp)
    run_generate(cfgs["generate"])
    cfg = {**cfgs["train"], "save_every_steps": 1}  # fp16 may skip steps: resume.pt exists either way
    run = train(cfg, max_steps=2)
    state = torch.load(run / "resume.pt", weights_only=True)
    assert state["step"] == 2 or amp == "fp16"
    train(None, resume=run)
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics.epoch.tolist() == [0, 1] and np.isfinite(metrics.train_loss.iloc[1])
    assert metrics.step.iloc[1] + metrics.skipped_steps.iloc[1] == 4 and (run / "encoder_0001.pt").is_file()
    assert metrics.skipped_steps.iloc[1] == 0 or amp == "fp16"
    other = {"none": "fp16", "bf16": "fp16", "fp16": "bf16"}[amp]
    with pytest.raises(TransfiraError, match=f"amp = '{amp}', resumed with amp = '{other}'"):
        train({**cfg, "amp": other}, resume=run)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_rank_nccl_training(demo_dir, tmp_path):
    cfgs = pipeline_configs(demo_dir, tmp_path, "cuda")
    from transfira.jobs.generate import run as run_generate

    run_generate(cfgs["generate"])
    cfg = write_toml(tmp_path / "ddp.toml", cfgs["train"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train.py"), "--config", str(cfg)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "ckpt" / "run" / "metrics.csv")
    assert metrics.step.tolist() == [0, 2] and np.isfinite(metrics.val_ccs_mae).all()  # 64 images / 2 ranks / 16


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_index_becomes_the_current_device():
    from transfira.backbone import resolve_device

    assert resolve_device("cuda:1") == torch.device("cuda", 1) and torch.cuda.current_device() == 1
    torch.cuda.set_device(0)
