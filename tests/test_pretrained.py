"""Shipped predictors: found by the encoder file's SHA-256, used by score.py / Predictor / export_onnx.py
without a checkpoint; every predictor in pretrained_weights/ loads and reproduces its card."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import transfira.pretrained as pretrained
from conftest import ROOT, SHARED, run_script
from transfira import Predictor
from transfira.backbone import load_backbone
from transfira.checkpoint import save_predictor
from transfira.errors import TransfiraError
from transfira.model import RecognizabilityPredictionNetwork
from transfira.pretrained import file_sha256, find_pretrained, shipped_predictors


@pytest.fixture()
def shipped_demo(tmp_path, demo_dir, monkeypatch) -> Path:
    """A pretrained_weights/ folder holding a heads-only predictor (hidden heads) for the demo encoder."""
    folder = tmp_path / "pretrained_weights"
    folder.mkdir()
    torch.manual_seed(1)
    model = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64, 4,
                                             freeze_backbone=True, head_input="unit_lognorm")
    save_predictor(folder / "demo_transfira.pt", model, heads_only=True)
    (folder / "demo_transfira.md").write_text(f"# demo\n\nencoder file: `encoder.onnx`\nencoder sha256: "
                                              f"`{file_sha256(demo_dir / 'encoder.onnx')}`\n")
    (folder / "other.md").write_text("encoder file: `x.onnx`\nencoder sha256: `" + "ab" * 32 + "`\n")
    (folder / "other.pt").write_bytes(b"")
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", folder)
    return folder


def test_lookup_by_hash_and_one_line_error(shipped_demo, demo_dir, tmp_path):
    assert [s.checkpoint.name for s in shipped_predictors()] == ["demo_transfira.pt", "other.pt"]
    assert find_pretrained(demo_dir / "encoder.onnx").checkpoint == shipped_demo / "demo_transfira.pt"
    stranger = tmp_path / "stranger.onnx"
    stranger.write_bytes((demo_dir / "encoder.onnx").read_bytes() + b"\0")
    with pytest.raises(TransfiraError, match=r"no shipped predictor for .*stranger\.onnx.*demo_transfira\.pt for "
                                             r"encoder\.onnx.*other\.pt for x\.onnx") as err:
        find_pretrained(stranger)
    assert "\n" not in str(err.value)


def test_score_predictor_and_export_use_the_shipped_predictor(shipped_demo, demo_dir, tmp_path):
    images = sorted((demo_dir / "images" / "test").rglob("*.png"))[:5]
    mine = Predictor.pretrained(demo_dir / "encoder.onnx", device="cpu")
    assert mine.source == shipped_demo / "demo_transfira.pt"
    explicit = Predictor.from_files(demo_dir / "encoder.onnx", shipped_demo / "demo_transfira.pt", device="cpu")
    np.testing.assert_allclose(mine.score(images).ccs, explicit.score(images).ccs, rtol=0, atol=0)
    # score.py in-process (the monkeypatched folder), on one image file and on a folder
    from score import main as score_main

    score_main(["--model_path", str(demo_dir / "encoder.onnx"), "--images", str(images[0]), "--out",
                str(tmp_path / "one.csv"), "--device", "cpu", "--num_workers", "0"])
    one = pd.read_csv(tmp_path / "one.csv")
    assert one["path"].tolist() == [images[0].name]
    assert one["ccs"].iloc[0] == pytest.approx(float(mine.score(images[:1]).ccs[0]), abs=1e-6)
    toml = tmp_path / "score.toml"
    toml.write_text(f"model_path = '{demo_dir / 'encoder.onnx'}'\nimages = '{images[0].parent}'\n"
                    f"out = '{tmp_path / 'folder.csv'}'\ndevice = 'cpu'\nnum_workers = 0\n")
    assert Predictor.from_config(toml).source == shipped_demo / "demo_transfira.pt"
    # a test.toml (predictor_model_path, outdir, [data] ...) is read by score.py through the same reader
    test_toml = tmp_path / "test.toml"
    test_toml.write_text(f"model_path = '{demo_dir / 'encoder.onnx'}'\npredictor_model_path = ''\n"
                         f"checkpoint_path = '{shipped_demo / 'demo_transfira.pt'}'\noutdir = '{tmp_path}'\n"
                         "device = 'cpu'\n[data]\ndata_dir = 'x'\nannotations = 'y.csv'\n")
    score_main(["--config", str(test_toml), "--images", str(images[0]), "--out", str(tmp_path / "via_test.csv"),
                "--num_workers", "0"])
    assert pd.read_csv(tmp_path / "via_test.csv")["ccs"].iloc[0] == pytest.approx(one["ccs"].iloc[0], abs=1e-6)
    # export_onnx.py with --model_path alone exports the shipped predictor
    from export_onnx import main as export_main

    export_main(["--model_path", str(demo_dir / "encoder.onnx"), "--out", str(tmp_path / "p.onnx")])
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    batch = mine.preprocess(images[:2]).numpy()
    got = session.run(None, {session.get_inputs()[0].name: batch})
    np.testing.assert_allclose(np.ravel(got[0]), mine.score(images[:2]).ccs, atol=1e-4)


def test_missing_image_path_is_named(tmp_path, demo_dir):
    proc = run_script("score.py", "--model_path", demo_dir / "encoder.onnx", "--checkpoint", "x.pt", "--images",
                      tmp_path / "nope.jpg", check=False)
    assert proc.returncode == 2 and "no such folder or image file" in proc.stderr and "nope.jpg" in proc.stderr


CARDS = sorted((ROOT / "pretrained_weights").glob("*.md"))
CARDS = [c for c in CARDS if c.with_suffix(".pt").is_file()]


@pytest.mark.parametrize("card", CARDS, ids=[c.stem for c in CARDS])
def test_every_shipped_predictor_loads_and_matches_its_card(card):
    """Small files, heads only; with ../shared: the encoder's hash matches and the card's sample scores
    (its JSON block ``sample``) are reproduced."""
    checkpoint = card.with_suffix(".pt")
    assert checkpoint.stat().st_size < 5 * 2**20
    state = torch.load(checkpoint, weights_only=True)
    assert state and not any(k.startswith("backbone.") for k in state)
    text = card.read_text()
    encoder = re.search(r"encoder file:\s*`([^`]+)`", text).group(1)
    model = SHARED / "models" / encoder
    if not model.is_file():
        pytest.skip(f"{model} not present")
    assert find_pretrained(model).checkpoint == checkpoint
    sample = json.loads(re.search(r"```json\n(.*?)\n```", text, re.S).group(1))
    scores = Predictor.pretrained(model, device="cpu").score([SHARED / "data" / p for p in sample["paths"]])
    np.testing.assert_allclose(scores.ccs, sample["ccs"], atol=1e-4)
    np.testing.assert_allclose(scores.ccas, sample["ccas"], atol=1e-4)
