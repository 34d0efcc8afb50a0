"""transfira.Predictor on the demo data: scores vs onnxruntime + numpy heads, input kinds, BGR, batching, configs."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAKE_FACES, ROOT
from PIL import Image

import transfira
from transfira.alignment import align_face
from transfira.errors import TransfiraError
from transfira.predictor import Predictor, Scores

N = 12


@pytest.fixture(scope="module")
def paths(demo_dir):
    return [demo_dir / "images" / p for p in pd.read_csv(demo_dir / "test.csv")["path"].head(N)]


@pytest.fixture(scope="module")
def predictor(demo_dir, demo_predictor):
    return transfira.Predictor.from_files(demo_dir / "encoder.onnx", demo_predictor, device="cpu", batch_size=5)


def test_scores_match_onnxruntime_and_numpy_heads(predictor, paths, demo_dir, demo_predictor):
    import onnxruntime

    result = predictor.score(paths)
    assert isinstance(result, Scores) and result.ccs.shape == result.ccas.shape == (N,)
    np.testing.assert_array_equal(result.recognizable, result.ccas > 0)
    assert result.recognizable.any() and not result.recognizable.all()
    # independent: (p - 127.5) / 127.5 in numpy, the encoder in onnxruntime, the linear heads in float64
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in paths])
    assert pixels.shape[1:3] == (112, 112)
    x = ((pixels - 127.5) / 127.5).transpose(0, 3, 1, 2)
    session = onnxruntime.InferenceSession(str(demo_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
    z = session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64).reshape(N, -1)
    state = torch.load(demo_predictor, weights_only=True)
    for name, got in (("ccs", result.ccs), ("ccas", result.ccas)):
        w, b = (state[f"{name}_layer.{k}"].double().numpy() for k in ("weight", "bias"))
        np.testing.assert_allclose(got, (z @ w.T + b).ravel(), atol=1e-4, rtol=1e-4)


def test_input_kinds_and_bgr(predictor, paths, demo_dir, demo_predictor):
    want = predictor.score(paths[:4])
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in paths[:4]]
    mixed = predictor.score([paths[0], Image.open(paths[1]), rgb[2], str(paths[3])])
    np.testing.assert_allclose(mixed.ccs, want.ccs, atol=1e-5)
    np.testing.assert_allclose(mixed.ccas, want.ccas, atol=1e-5)
    bgr = [a[:, :, ::-1] for a in rgb]  # what cv2.imread gives
    as_bgr = Predictor(predictor.model, device="cpu", channel_order="BGR").score(bgr)
    np.testing.assert_allclose(as_bgr.ccs, want.ccs, atol=1e-5)
    np.testing.assert_allclose(as_bgr.ccas, want.ccas, atol=1e-5)
    swapped = predictor.score(bgr)  # BGR read as RGB: other scores (the bug the option prevents)
    assert np.abs(swapped.ccs - want.ccs).max() > 1e-2
    single = predictor.score(rgb[0])
    assert len(single) == 1 and np.isclose(single.ccs[0], want.ccs[0], atol=1e-5)
    grey = predictor.score(np.asarray(Image.open(paths[0]).convert("L")))
    np.testing.assert_allclose(grey.ccs, predictor.score(Image.open(paths[0]).convert("L")).ccs, atol=1e-6)


def test_batching_does_not_change_scores(predictor, paths):
    one_batch = Predictor(predictor.model, device="cpu", batch_size=64).score(paths)
    np.testing.assert_allclose(predictor.score(paths).ccas, one_batch.ccas, atol=1e-5)  # 5 + 5 + 2
    assert len(predictor.score([])) == 0


def test_other_sizes_go_through_the_shared_transform(predictor, paths):
    from transfira.data import build_transform

    big = Image.open(paths[0]).convert("RGB").resize((150, 170))
    with torch.no_grad():
        ccs, _ = predictor.model(build_transform({})(big)[None])
    assert np.isclose(predictor.score(big).ccs[0], float(ccs), atol=1e-5)


def test_from_config(tmp_path, predictor, paths, demo_dir, demo_predictor):
    want = predictor.score(paths[:3]).ccs
    test_toml = tmp_path / "test.toml"
    test_toml.write_text(f"model_path = '{demo_dir / 'encoder.onnx'}'\nembedding_size = 64\n"
                         f"checkpoint_path = '{demo_predictor}'\ndevice = 'cpu'\n[aug]\nresize_dim = 112\n")
    np.testing.assert_allclose(Predictor.from_config(test_toml).score(paths[:3]).ccs, want, atol=1e-5)
    score_toml = tmp_path / "score.toml"  # score.py's config: embedding_size = 0 reads it from the encoder
    score_toml.write_text(f"model_path = '{demo_dir / 'encoder.onnx'}'\nembedding_size = 0\n"
                          f"checkpoint_path = '{demo_predictor}'\ndevice = 'cpu'\nchannel_order = 'BGR'\n")
    from_score = Predictor.from_config(score_toml)
    assert from_score.channel_order == "BGR"
    np.testing.assert_allclose(from_score.score(paths[:3]).ccs, want, atol=1e-5)  # files: decoded as RGB
    run = tmp_path / "ckpt" / "demo"
    run.mkdir(parents=True)
    for epoch in (2, 10):  # the newest epoch is taken; resume.pt is not a predictor
        state = torch.load(demo_predictor, weights_only=True)
        state["ccs_layer.bias"] += epoch
        torch.save(state, run / f"encoder_{epoch:04}.pt")
    (run / "resume.pt").write_bytes(b"x")
    train_toml = tmp_path / "train.toml"
    train_toml.write_text(f"model_path = '{demo_dir / 'encoder.onnx'}'\nembedding_size = 64\n"
                          f"checkpoint_outdir = '{tmp_path / 'ckpt'}'\nrun_name = 'demo'\ndevice = 'cpu'\n")
    np.testing.assert_allclose(Predictor.from_config(train_toml).score(paths[:3]).ccs, want + 10, atol=1e-4)
    (tmp_path / "bad.toml").write_text("embedding_size = 64\n")
    with pytest.raises(TransfiraError, match="model_path"):
        Predictor.from_config(tmp_path / "bad.toml")


def test_errors(predictor, demo_dir, demo_predictor, tmp_path):
    with pytest.raises(TransfiraError, match="uint8"):
        predictor.score(np.zeros((112, 112, 3), np.float32))
    with pytest.raises(TransfiraError, match="HWC"):
        predictor.score([np.zeros((3, 112, 112, 2), np.uint8)])
    with pytest.raises(TransfiraError, match="channel_order"):
        Predictor(predictor.model, device="cpu", channel_order="GBR")
    with pytest.raises(TransfiraError, match="missing.png"):
        predictor.score([tmp_path / "missing.png"])
    with pytest.raises(TransfiraError, match="embedding_size = 32"):
        Predictor.from_files(demo_dir / "encoder.onnx", demo_predictor, "cpu", embedding_size=32)
    with pytest.raises(TransfiraError, match="no face detector"):
        predictor.score_photos([np.zeros((64, 64, 3), np.uint8)])


def test_score_photos_with_a_detector(demo_dir, demo_predictor, paths, fake_scrfd):
    predictor = Predictor.from_files(demo_dir / "encoder.onnx", demo_predictor, "cpu", detector_path=fake_scrfd)
    photo = np.asarray(Image.open(paths[0]).convert("RGB").resize((640, 640)))
    result = predictor.score_photos([np.zeros((100, 100, 3), np.uint8), photo])  # black: no face
    np.testing.assert_array_equal(result.image, [1, 1])
    np.testing.assert_array_equal(result.face, [0, 1])
    points = np.array([f[6] for f in FAKE_FACES])
    np.testing.assert_allclose(result.landmarks, points, atol=1e-3)
    crops = [align_face(Image.fromarray(photo), p) for p in points]
    np.testing.assert_allclose(result.ccs, predictor.score(crops).ccs, atol=1e-4)
    np.testing.assert_array_equal(result.recognizable, result.ccas > 0)


def test_import_transfira_stays_light():
    subprocess.run([sys.executable, "-c", "import sys, transfira; assert 'torch' not in sys.modules, 'torch imported'"],
                   cwd=ROOT, check=True)
    assert transfira.Predictor is Predictor
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        transfira.Nope  # noqa: B018
