"""The LFW example end to end on the real data and encoder, small: protocol -> generate -> train -> test -> evaluate.

About 40 identities (~280 images), one epoch with a frozen backbone; ~1-3 minutes on 2 CPU cores.
Skipped when ../shared (aligned LFW and the MobileFaceNet encoder) is not there.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LFW = SHARED / "data" / "lfw_aligned"
MODEL = SHARED / "models" / "mobilefacenet_arcface.onnx"

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not (LFW / "all.csv").is_file() or not MODEL.is_file(),
                       reason=f"needs aligned LFW and the MobileFaceNet encoder under {SHARED}"),
]

SMALL = [
    "protocol.max_ids=40", "protocol.min_images=4", "protocol.max_images=5",
    "protocol.max_train_images=0", "protocol.max_val_images=0",
    "generate.num_workers=0", "generate.device='cpu'",
    "train.opt.num_epochs=1", "train.opt.milestones=[10]", "train.num_workers=0", "train.device='cpu'",
    "test.num_workers=0", "test.device='cpu'",
    "evaluate.fmr=[0.02, 0.1, 1e-3]", "evaluate.device='cpu'",
]
VARIANTS = ("baseline", "weight", "filter", "filter_weight")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("lfw_small")
    cmd = [sys.executable, str(ROOT / "data/lfw/run_protocol.py"), "--workdir", str(workdir),
           *[arg for s in SMALL for arg in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"run_protocol.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    assert "all stages:" in proc.stdout
    return workdir


def read(path: Path) -> pd.DataFrame:
    assert path.is_file(), f"missing {path}"
    return pd.read_csv(path)


def test_protocol(run):
    proto = run / "protocol"
    splits = {s: read(proto / f"{s}.csv") for s in ("train", "val", "test")}
    ids = {s: set(t["subject_id"]) for s, t in splits.items()}
    assert sum(map(len, ids.values())) <= 40 and all(ids.values())
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    for table in splits.values():
        assert set(table["degradation"]) - {"none"}, "no degraded copies"
        assert all((proto / "images" / p).is_file() for p in table["path"])
        clean = table["degradation"] == "none"
        assert (table.loc[clean, "severity"] == 0).all() and table.loc[~clean, "severity"].between(0.2, 1).all()
    templates, pairs, test = read(proto / "templates.csv"), read(proto / "pairs.csv"), splits["test"]
    assert set(test["template_id"]) == set(templates["template_id"])
    assert (test.groupby("template_id")["subject_id"].nunique() == 1).all()
    # a source photo (clean + its degraded copy) is on one side only
    assert (test.groupby("source")["template_id"].nunique() == 1).all()
    n = len(templates) // 2
    assert pairs["label"].sum() == n and (pairs["label"] == 0).sum() == n * (n - 1)
    subject = dict(zip(templates["template_id"], templates["subject_id"]))
    assert (pairs["label"] == (pairs["template_a"].map(subject) == pairs["template_b"].map(subject))).all()


def test_protocol_is_deterministic(run, tmp_path):
    cfg = json.loads((run / "protocol" / "protocol.json").read_text())["args"]
    args = [f"--{k.replace('_', '-')}={','.join(v) if isinstance(v, list) else v}" for k, v in cfg.items() if k != "out"]
    subprocess.run([sys.executable, str(ROOT / "data/lfw/make_protocol.py"), *args, "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True)
    for name in ("train.csv", "val.csv", "test.csv", "templates.csv", "pairs.csv"):
        assert (tmp_path / name).read_bytes() == (run / "protocol" / name).read_bytes(), name
    degraded = read(tmp_path / "test.csv").query("degradation != 'none'")["path"].iloc[0]
    assert (tmp_path / "images" / degraded).read_bytes() == (run / "protocol" / "images" / degraded).read_bytes()


def test_labels(run):
    for split in ("train", "val", "test"):
        labels = read(run / "labels" / f"{split}_labels.csv")
        source = read(run / "protocol" / f"{split}.csv")
        assert list(labels["path"]) == list(source["path"])
        assert np.isfinite(labels[["ccs", "nnccs", "ccas"]].to_numpy()).all()
        np.testing.assert_allclose(labels["ccas"], labels["ccs"] - labels["nnccs"], atol=1e-5)
        assert labels["ccs"].between(-1, 1).all() and labels["ccs"].std() > 0.02
        assert np.load(run / "labels" / f"{split}_features.npy").shape == (len(labels), 192)
    # real encoder, real degradations: heavy degradations lower CCS on average
    train = read(run / "labels" / "train_labels.csv")
    assert train.loc[train["severity"] >= 0.6, "ccs"].mean() < train.loc[train["degradation"] == "none", "ccs"].mean()


def test_checkpoint(run):
    ckpt = run / "checkpoints" / "lfw" / "mobilefacenet_arcface_0001.pt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert {k.split(".")[0] for k in state} == {"ccs_layer", "ccas_layer"}  # frozen encoder: heads only
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    metrics = read(run / "checkpoints" / "lfw" / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1]
    assert np.isfinite(metrics.loc[1, ["train_loss", "val_ccs_mae", "val_ccas_mae"]].astype(float)).all()


def test_scores_and_templates(run):
    test = read(run / "protocol" / "test.csv")
    results = run / "test_results"
    ccs, ccas = np.load(results / "test_ccs.npy"), np.load(results / "test_ccas.npy")
    assert ccs.shape == ccas.shape == (len(test),) and np.isfinite(ccs).all() and np.isfinite(ccas).all()
    features = np.load(run / "labels" / "test_features.npy")
    templates = read(run / "protocol" / "templates.csv")
    for variant in VARIANTS:
        with np.load(results / f"templates_{variant}.npz") as npz:
            ids, vectors = npz["ids"], npz["vectors"]
        assert sorted(ids.tolist()) == sorted(templates["template_id"].tolist()), variant
        assert vectors.shape == (len(templates), 192) and np.isfinite(vectors).all()
        if variant == "baseline":  # plain mean of the deployed encoder's features per template
            for tid, vec in zip(ids, vectors):
                rows = np.flatnonzero(test["template_id"].to_numpy() == tid)
                np.testing.assert_allclose(vec, features[rows].mean(0), rtol=1e-4, atol=1e-4)
    # FIQA baselines of configs/examples/lfw/test.toml: norm, SER-FIQ (computed in the scoring pass), CR
    quality = read(results / "test_quality.csv")
    assert list(quality.columns) == ["path", "template_id", "ccs", "ccas", "norm", "serfiq", "cr"]
    np.testing.assert_allclose(quality["norm"], np.linalg.norm(features, axis=1), rtol=1e-5)
    assert quality["serfiq"].between(0, 1).all() and quality["serfiq"].std() > 0
    for score in ("norm", "serfiq", "cr"):
        with np.load(results / f"templates_{score}.npz") as npz:
            assert npz["vectors"].shape == (len(templates), 192) and np.isfinite(npz["vectors"]).all()


def test_results_table(run):
    ev = run / "evaluation"
    results = read(ev / "results.csv")
    rows = set(VARIANTS) | {"norm", "serfiq", "cr"}  # + the score-weighted templates (templates_dir)
    assert set(results["variant"]) == rows
    measured = results[results["fmr"].isin([0.02, 0.1])]
    assert len(measured) == 2 * len(rows) and measured["tar"].between(0, 1).all()
    # 95 % subject-bootstrap intervals around every measured TAR; baseline's own difference is 0
    assert (measured["tar_lo"] <= measured["tar"] + 1e-12).all() and (measured["tar"] <= measured["tar_hi"] + 1e-12).all()
    assert np.allclose(measured.loc[measured["variant"] == "baseline", "delta"], 0)
    # 90 impostor pairs: FMR 1e-3 cannot be measured and must say so, not print a number
    assert results.loc[np.isclose(results["fmr"], 1e-3), "tar"].isna().all()
    assert (ev / "results.md").is_file() and (ev / "roc.png").is_file()
    images = read(ev / "image_results.csv")
    predicted = images[images["target"].isin(["ccs", "ccas"])]  # measures "predicted CCS" / "predicted CCAS"
    assert set(predicted["target"]) == {"ccs", "ccas"} and np.isfinite(predicted["sc"]).all()
    assert predicted["sc"].between(-1, 1).all() and "ideal (true CCS)" in set(images["measure"])
    assert list(ev.glob("erc_fmr*.png"))
    timings = json.loads((run / "timings.json").read_text())
    assert set(timings) == {"protocol", "generate", "train", "test", "evaluate"}
