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


def load_script(script: str):
    """A top-level script (path relative to the project root) imported as a module, to call its ``main``
    in this process (a subprocess costs seconds of start-up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


# A face for the synthetic SCRFD outputs: (stride, row, col, anchor, score, box x1 y1 x2 y2, 5 keypoints),
# coordinates in the detector's 640 x 640 input.
FAKE_FACES = [
    (16, 10, 12, 1, 0.9, (150.0, 110.0, 240.0, 230.0),
     ((172.0, 150.0), (216.0, 151.0), (194.0, 175.0), (176.0, 200.0), (212.0, 199.0))),
    (32, 14, 15, 0, 0.7, (420.0, 380.0, 540.0, 520.0),
     ((450.0, 430.0), (508.0, 428.0), (480.0, 462.0), (455.0, 490.0), (505.0, 491.0))),
]


def scrfd_outputs(faces, size: int = 640, batch_axis: bool = True):
    """The nine raw SCRFD outputs (scores, boxes, keypoints for strides 8, 16, 32) encoding ``faces``."""
    import numpy as np

    strides = (8, 16, 32)
    scores = [np.zeros(((size // s) ** 2 * 2, 1), np.float32) for s in strides]
    boxes = [np.zeros(((size // s) ** 2 * 2, 4), np.float32) for s in strides]
    kps = [np.zeros(((size // s) ** 2 * 2, 10), np.float32) for s in strides]
    for stride, row, col, anchor, score, box, points in faces:
        i, k = strides.index(stride), (row * (size // stride) + col) * 2 + anchor
        cx, cy = col * stride, row * stride
        scores[i][k] = score
        boxes[i][k] = np.array([cx - box[0], cy - box[1], box[2] - cx, box[3] - cy]) / stride
        kps[i][k] = (np.asarray(points, np.float64) - [cx, cy]).reshape(-1) / stride
    out = scores + boxes + kps
    return [a[None] for a in out] if batch_axis else out


def make_fake_scrfd(path: Path, faces=FAKE_FACES, size: int = 640) -> Path:
    """An ONNX model with SCRFD's input and outputs that reports ``faces`` in any photo whose
    letterboxed input is not mostly black (scores x clip(4 (mean + 1), 0, 1)); black photos have none."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    arrays = scrfd_outputs(faces, size)
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["mean"], keepdims=0),
             helper.make_node("Add", ["mean", "one"], ["shifted"]),
             helper.make_node("Mul", ["shifted", "four"], ["scaled"]),
             helper.make_node("Clip", ["scaled", "zero", "one"], ["gate"])]
    constants = (("one", 1.0), ("four", 4.0), ("zero", 0.0))
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in constants]
    for name, array in zip(names, arrays):
        inits.append(numpy_helper.from_array(array, f"{name}_const"))
        op = ["Mul", [f"{name}_const", "gate"]] if name.startswith("score") else ["Identity", [f"{name}_const"]]
        nodes.append(helper.make_node(op[0], op[1], [name]))
    graph = helper.make_graph(
        nodes, "fake_scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in zip(names, arrays)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def fake_scrfd(tmp_path_factory) -> Path:
    """A tiny stand-in for scrfd_500m_bnkps.onnx reporting :data:`FAKE_FACES` (no face in black photos)."""
    return make_fake_scrfd(tmp_path_factory.mktemp("fake_scrfd") / "scrfd.onnx")
