"""Shared fixtures: the built-in demo dataset and encoder, made once per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo data (``images/``, ``train.csv``, ``val.csv``, ``test*.csv``) and ``encoder.onnx``."""
    from transfira.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo"), seed=0, encoder_steps=100)


def run_script(script: str, *args: str, cwd: Path | None = None, check: bool = True):
    """Run a top-level script with the test interpreter; return the CompletedProcess."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def demo_predictor(demo_dir, tmp_path_factory) -> Path:
    """A predictor checkpoint (plain state dict) on the demo encoder, CCAS spread around 0."""
    import torch

    from transfira.backbone import load_backbone
    from transfira.model import RecognizabilityPredictionNetwork

    torch.manual_seed(0)
    predictor = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64)
    with torch.no_grad():
        predictor.ccs_layer.bias.fill_(0.05)
        predictor.ccas_layer.bias.fill_(-0.02)
    path = tmp_path_factory.mktemp("demo_predictor") / "predictor.pt"
    torch.save(predictor.state_dict(), path)
    return path
