"""score.py on the demo data: folder and CSV input, a corrupt file, resume after a torn write, --detect."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import FAKE_FACES, ROOT, load_script
from PIL import Image

from transfira.alignment import LANDMARK_COLUMNS, align_face
from transfira.errors import TransfiraError
from transfira.predictor import Predictor
from transfira.jobs.score import BOX_COLUMNS, NO_FACE


def cli(*args) -> None:
    """score.py's ``main`` in this process."""
    load_script("score.py").main([str(a) for a in args])


@pytest.fixture(scope="module")
def folder(demo_dir, tmp_path_factory):
    """10 demo images in two subfolders, a corrupt .jpg and a text file (not an image: ignored)."""
    root = tmp_path_factory.mktemp("score") / "images"
    for i, rel in enumerate(pd.read_csv(demo_dir / "test.csv")["path"].head(10)):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_dir / "images" / rel, root / "ab"[i % 2] / f"{i:02}.png")
    (root / "c").mkdir()
    (root / "c" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def model_args(demo_dir, demo_predictor):
    return ["--model_path", demo_dir / "encoder.onnx", "--checkpoint", demo_predictor, "--device", "cpu"]


@pytest.fixture(scope="module")
def predictor(demo_dir, demo_predictor):
    return Predictor.from_files(demo_dir / "encoder.onnx", demo_predictor, "cpu")


@pytest.fixture(scope="module")
def full_run(folder, model_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("score_out") / "scores.csv"
    cli(*model_args, "--images", folder, "--out", out, "--batch_size", 4, "--num_workers", 1)
    return out


def test_folder_with_a_corrupt_file(full_run, folder, predictor):
    frame = pd.read_csv(full_run, keep_default_na=False)
    assert list(frame.columns) == ["path", "ccs", "ccas", "recognizable", "error"]
    assert len(frame) == 11 and frame["path"].is_unique
    bad = frame["path"] == "c/bad.jpg"
    assert "bad.jpg" in frame.loc[bad, "error"].item() and frame.loc[bad, "ccs"].item() == ""
    good = frame[~bad]
    assert (good["error"] == "").all()
    want = predictor.score([folder / p for p in good["path"]])
    np.testing.assert_allclose(good["ccs"].astype(float), want.ccs, atol=1e-5)
    np.testing.assert_allclose(good["ccas"].astype(float), want.ccas, atol=1e-5)
    assert (good["recognizable"].map({"True": True, "False": False}) == want.recognizable).all()


def test_resume_after_a_torn_write(full_run, folder, model_args, tmp_path):
    out = tmp_path / "scores.csv"
    lines = full_run.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:6]) + lines[6][: len(lines[6]) // 2])  # header, 5 rows, half a row
    cli(*model_args, "--images", folder, "--out", out, "--batch_size", 4, "--num_workers", 0)
    assert out.read_bytes().count(b"path,ccs") == 1
    pd.testing.assert_frame_equal(pd.read_csv(out).sort_values("path", ignore_index=True),
                                  pd.read_csv(full_run).sort_values("path", ignore_index=True), atol=1e-6)
    before = out.read_bytes()
    cli(*model_args, "--images", folder, "--out", out, "--num_workers", 0)  # all done: nothing appended
    assert out.read_bytes() == before


def test_csv_input_keeps_its_columns(folder, model_args, predictor, tmp_path, demo_dir):
    table = pd.DataFrame({"subject_id": [7, 8, 9], "path": ["b/01.png", "c/bad.jpg", "a/00.png"],
                          "ccs": [0.1, 0.2, 0.3]})  # e.g. generate.py labels: kept as ccs_csv
    table.to_csv(tmp_path / "in.csv", index=False)
    config = tmp_path / "score.toml"
    config.write_text((ROOT / "configs" / "score.toml").read_text())
    cli("--config", config, *model_args, "--csv", tmp_path / "in.csv", "--data_dir", folder,
        "--out", tmp_path / "out.csv", "--num_workers", 0)
    frame = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(frame.columns) == ["subject_id", "path", "ccs_csv", "ccs", "ccas", "recognizable", "error"]
    assert frame["path"].tolist() == table["path"].tolist() and frame["ccs_csv"].tolist() == [0.1, 0.2, 0.3]
    assert frame["error"].tolist()[0] == "" and "bad.jpg" in frame["error"][1]
    assert np.isclose(float(frame["ccs"][2]), predictor.score(folder / "a" / "00.png").ccs[0], atol=1e-5)


def test_bad_arguments(folder, model_args, tmp_path):
    with pytest.raises(TransfiraError, match="exactly one of images"):
        cli(*model_args, "--images", folder, "--csv", tmp_path / "x.csv", "--out", tmp_path / "o.csv")
    with pytest.raises(TransfiraError, match="model_path"):
        cli("--images", folder, "--checkpoint", "x.pt")
    with pytest.raises(TransfiraError, match="no image files"):
        cli(*model_args, "--images", tmp_path, "--out", tmp_path / "o.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(TransfiraError, match="other columns"):
        cli(*model_args, "--images", folder, "--out", tmp_path / "other.csv")
    with pytest.raises(TransfiraError, match="channel_order"):
        cli(*model_args, "--images", folder, "--out", tmp_path / "o.csv", "--channel_order", "XYZ")


def test_detect_faces_in_photos(demo_dir, model_args, predictor, fake_scrfd, tmp_path, folder):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("p0", "p1"):
        Image.open(folder / "a" / "00.png" if name == "p0" else folder / "b" / "01.png").resize((640, 640)).save(
            photos / f"{name}.png")
    Image.new("RGB", (300, 300)).save(photos / "p2_black.png")
    (photos / "p3_bad.png").write_bytes(b"broken")
    out = tmp_path / "faces.csv"
    args = [*model_args, "--images", photos, "--out", out, "--detect", fake_scrfd, "--num_workers", 0,
            "--batch_size", 2]
    cli(*args)
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame.columns) == ["path", "ccs", "ccas", "recognizable", "face", *BOX_COLUMNS, "det_score",
                                   *LANDMARK_COLUMNS, "error"]
    assert frame["path"].tolist() == ["p0.png", "p0.png", "p1.png", "p1.png", "p2_black.png", "p3_bad.png"]
    assert frame["face"].tolist()[:4] == ["0", "1", "0", "1"] and frame["error"][4] == NO_FACE
    assert "p3_bad.png" in frame["error"][5] and frame["face"][5] == ""
    boxes = frame[BOX_COLUMNS][:4].astype(float).to_numpy()
    np.testing.assert_allclose(boxes, [f[5] for f in FAKE_FACES] * 2, atol=1e-3)
    points = frame[LANDMARK_COLUMNS][:4].astype(float).to_numpy().reshape(-1, 5, 2)
    photo = Image.open(photos / "p1.png").convert("RGB")
    want = predictor.score([align_face(photo, p) for p in points[2:]])
    np.testing.assert_allclose(frame["ccs"][2:4].astype(float), want.ccs, atol=1e-4)
    # a crash while writing p1's second face: p1 is scored again, all its faces once
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:4]) + lines[4][:10])
    cli(*args)
    again = pd.read_csv(out, keep_default_na=False)
    assert sorted(again["path"]) == sorted(frame["path"])
    pd.testing.assert_frame_equal(again.sort_values(["path", "face"], ignore_index=True),
                                  frame.sort_values(["path", "face"], ignore_index=True))
