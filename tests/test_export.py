"""export_onnx.py: parity onnxruntime vs PyTorch, dynamic batch, metadata, a torch-free runtime, fp16."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from conftest import load_script

from transfira.errors import TransfiraError
from transfira.export import preprocessing_metadata, read_metadata
from transfira.predictor import Predictor


def cli(*args) -> None:
    load_script("export_onnx.py").main([str(a) for a in args])


@pytest.fixture(scope="module")
def exported(demo_dir, demo_predictor, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "transfira.onnx"
    cli("--model_path", demo_dir / "encoder.onnx", "--checkpoint", demo_predictor, "--out", out)
    return out


@pytest.fixture(scope="module")
def paths(demo_dir):
    return [str(demo_dir / "images" / p) for p in pd.read_csv(demo_dir / "test.csv")["path"].head(16)]


def test_parity_with_torch_and_dynamic_batch(exported, demo_dir, demo_predictor, paths):
    import onnxruntime

    predictor = Predictor.from_files(demo_dir / "encoder.onnx", demo_predictor, "cpu")
    want = predictor.score(paths)
    x = predictor.preprocess(paths).numpy()
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    ccs, ccas = session.run(["ccs", "ccas"], {"image": x})
    assert ccs.shape == ccas.shape == (16,) and ccs.dtype == np.float32
    np.testing.assert_allclose(ccs, want.ccs, atol=1e-4)
    np.testing.assert_allclose(ccas, want.ccas, atol=1e-4)
    one = session.run(["ccs"], {"image": x[3:4]})[0]
    assert one.shape == (1,) and abs(float(one[0]) - want.ccs[3]) < 1e-4


def test_metadata(exported):
    meta = read_metadata(exported)
    assert meta == preprocessing_metadata({"train_rgb_norm": [0.5, 0.5, 0.5], "test_rgb_std": 0.5,
                                           "resize_dim": 112, "crop_dim": 112})
    assert meta["channel_order"] == "RGB" and meta["input_size"] == [112, 112]
    assert meta["mean"] == [0.5] * 3 and meta["std"] == [0.5] * 3


RUNTIME = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime
    from PIL import Image
    session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    def preprocess(path):
        image = Image.open(path).convert(meta["channel_order"])
        w, h = image.size
        r = meta["resize_dim"] / min(w, h)
        image = image.resize((round(w * r), round(h * r)), Image.BILINEAR)
        c, (w, h) = meta["crop_dim"], image.size
        left, top = (w - c) // 2, (h - c) // 2
        x = np.asarray(image.crop((left, top, left + c, top + c)), np.float32) * meta["pixel_scale"]
        return ((x - meta["mean"]) / meta["std"]).transpose(2, 0, 1)
    batch = np.stack([preprocess(p) for p in sys.argv[2:]]).astype(np.float32)
    ccs, ccas = session.run(meta["output_names"], {meta["input_name"]: batch})
    assert "torch" not in sys.modules
    print(json.dumps({"ccs": ccs.tolist(), "ccas": ccas.tolist(), "torch": "torch" in sys.modules}))
""")


def test_runs_with_onnxruntime_alone(exported, demo_dir, demo_predictor, paths):
    proc = subprocess.run([sys.executable, "-c", RUNTIME, str(exported), *paths[:6]], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["torch"] is False
    want = Predictor.from_files(demo_dir / "encoder.onnx", demo_predictor, "cpu").score(paths[:6])
    np.testing.assert_allclose(got["ccs"], want.ccs, atol=1e-4)
    np.testing.assert_allclose(got["ccas"], want.ccas, atol=1e-4)


def test_fp16_and_printed_metadata(demo_dir, demo_predictor, tmp_path, capsys, paths):
    import onnxruntime

    out = tmp_path / "fp16.onnx"
    cli("--model_path", demo_dir / "encoder.onnx", "--checkpoint", demo_predictor, "--out", out, "--fp16")
    printed = capsys.readouterr().out
    assert "mean = [0.5, 0.5, 0.5]" in printed and 'channel_order = "RGB"' in printed
    assert read_metadata(out)["weights"] == "float16"
    predictor = Predictor.from_files(demo_dir / "encoder.onnx", demo_predictor, "cpu")
    x = predictor.preprocess(paths).numpy()
    ccs = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["ccs"], {"image": x})[0]
    assert ccs.dtype == np.float32
    want = predictor.score(paths).ccs
    np.testing.assert_allclose(ccs, want, atol=0.02 * np.abs(want).max())


def test_needs_model_and_checkpoint():
    with pytest.raises(TransfiraError, match=r"--config, or --model_path \(and --checkpoint\)"):
        cli("--out", "x.onnx")
