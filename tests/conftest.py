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
