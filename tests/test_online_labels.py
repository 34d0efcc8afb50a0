"""train.py [degrade] (fresh degradations labelled online), the heads' input option, and
checkpoints that describe their own heads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from conftest import run_script
from transfira.backbone import load_backbone
from transfira.checkpoint import build_predictor, save_predictor
from transfira.config import apply_schema
from transfira.data import load_image
from transfira.degradations import degrade_chain, draw_degradation
from transfira.errors import TransfiraError
from transfira.io import save_id_vectors
from transfira.labels import batch_center_similarities
from transfira.model import RecognizabilityPredictionNetwork, head_features, head_layout
from transfira.jobs.train import SCHEMA, run as train
from transfira.training import OnlineLabels, ridge_fit

KINDS = ["blur", "noise", "occlusion", "jpeg"]


def embed(onnx_path: Path, images: list) -> np.ndarray:
    """Embeddings from onnxruntime (independent of the torch conversion), float64."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.stack([(np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5 for img in images]).transpose(0, 3, 1, 2)
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})[0].astype(np.float64)


def numpy_labels(z: np.ndarray, own: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CCS and NNCCS (eq. 4-5) in float64 numpy: the independent reference for the online labels."""
    unit = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    sims = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ unit.T
    ccs = sims[np.arange(len(z)), own].copy()
    sims[np.arange(len(z)), own] = -np.inf
    return ccs, sims.max(1)


@pytest.fixture(scope="module")
def setup(demo_dir, tmp_path_factory) -> dict:
    """Clean demo training photos (48), and centers from the clean photos of their identities."""
    out = tmp_path_factory.mktemp("online")
    frame = pd.read_csv(demo_dir / "train.csv")
    frame = frame[frame["degradation"] == "none"].groupby("subject_id").head(2).iloc[:48].reset_index(drop=True)
    frame[["path", "subject_id"]].to_csv(out / "photos.csv", index=False)
    z = embed(demo_dir / "encoder.onnx", [load_image(demo_dir / "images" / p) for p in frame["path"]])
    ids = np.unique(frame["subject_id"])
    centers = np.stack([z[frame["subject_id"].to_numpy() == i].mean(0) for i in ids])
    save_id_vectors(out / "centers.npz", ids, centers)
    return {"out": out, "frame": frame, "centers": centers, "ids": ids}


def config(tmp: Path, demo_dir: Path, setup: dict, **over) -> dict:
    raw = {"model_path": str(demo_dir / "encoder.onnx"), "embedding_size": 64, "checkpoint_outdir": str(tmp / "ckpt"),
           "run_name": "run", "num_workers": 0, "freeze_backbone": True, "head_input": "unit_lognorm",
           "head_init": "ridge",
           "data": {"data_dir": str(demo_dir / "images"), "annotations": str(setup["out"] / "photos.csv"),
                    "batch_size": 16},
           "degrade": {"kinds": KINDS, "stack": 2, "severity": [0.2, 1.0], "p_clean": 0.25,
                       "centers_path": str(setup["out"] / "centers.npz"), "save_labels": True},
           "opt": {"optimizer": "AdamW", "lr": 1e-3, "milestones": [10], "num_epochs": 2}}
    for key, value in over.items():
        table, _, sub = key.rpartition("__")
        (raw.setdefault(table, {}) if table else raw)[sub] = value
    return apply_schema(raw, SCHEMA, "test")


def test_draws_depend_on_seed_epoch_index_only():
    a = [draw_degradation(0, 1, i, KINDS, 2, (0.2, 0.9), 0.3) for i in range(400)]
    assert a == [draw_degradation(0, 1, i, KINDS, 2, (0.2, 0.9), 0.3) for i in range(400)]
    assert a != [draw_degradation(0, 2, i, KINDS, 2, (0.2, 0.9), 0.3) for i in range(400)]
    clean = [k for k, _, _ in a if not k]
    assert 0.2 < len(clean) / len(a) < 0.4
    for kinds, severity, _ in a:
        if kinds:
            assert len(set(kinds)) == 2 and set(kinds) <= set(KINDS) and 0.2 <= severity <= 0.9
    assert all(not k for k, _, _ in (draw_degradation(3, 0, i, KINDS, 1, (0, 1), 1.0) for i in range(20)))


def test_batch_center_similarities_match_float64_loops():
    rng = np.random.default_rng(0)
    z, mu, own = rng.normal(size=(30, 8)), rng.normal(size=(5, 8)), rng.integers(0, 5, 30)
    unit = torch.nn.functional.normalize(torch.tensor(mu, dtype=torch.float32), dim=1)
    ccs, nnccs = batch_center_similarities(torch.tensor(z, dtype=torch.float32), torch.tensor(own), unit)
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    for i in range(30):
        assert ccs[i].item() == pytest.approx(cos(z[i], mu[own[i]]), abs=1e-5)
        assert nnccs[i].item() == pytest.approx(max(cos(z[i], mu[j]) for j in range(5) if j != own[i]), abs=1e-5)


def test_head_input_and_self_describing_checkpoints(tmp_path, demo_dir):
    z = torch.randn(6, 64) * 20
    x = head_features(z, "unit_lognorm")
    assert x.shape == (6, 65)
    assert torch.allclose(x[:, :64].norm(dim=1), torch.ones(6)) and torch.allclose(x[:, 64].exp(), z.norm(dim=1))
    for hidden, head_input in ((0, "raw"), (8, "unit_lognorm"), (0, "unit_lognorm")):
        model = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64, hidden,
                                                 head_input=head_input)
        assert head_layout(model.state_dict(), 64) == {"head_hidden": hidden, "head_input": head_input}
        for heads_only in (False, True):
            path = tmp_path / f"p{hidden}{head_input}{heads_only}.pt"
            save_predictor(path, model, heads_only=heads_only)
            loaded = build_predictor(load_backbone("onnx", demo_dir / "encoder.onnx"), 64, path).eval()
            images = torch.randn(3, 3, 112, 112)
            with torch.no_grad():
                for a, b in zip(loaded(images), model.eval()(images)):
                    assert torch.allclose(a, b, atol=1e-5)


def test_online_labels_are_the_encoders_view_of_the_frame(tmp_path, demo_dir, setup):
    """Every row of online_labels_epoch*.csv re-renders to a frame whose CCS / NNCCS, computed here
    independently (onnxruntime, float64 numpy), equal the row; frames differ between epochs."""
    run = train(config(tmp_path, demo_dir, setup))
    tables = [pd.read_csv(run / f"online_labels_epoch{e:04}.csv") for e in (1, 2)]
    for table in tables:
        assert sorted(table["path"]) == sorted(setup["frame"]["path"])
        assert {"path", "kinds", "severity", "seed", "ccs", "nnccs", "ccas"} <= set(table.columns)
    assert (tables[0]["kinds"] != tables[1]["kinds"]).any()
    rows = tables[1].iloc[:12]
    frames = []
    for row in rows.itertuples():
        image = load_image(demo_dir / "images" / row.path)
        frames.append(image if row.kinds == "none" else degrade_chain(image, row.kinds.split("+"), row.severity,
                                                                          row.seed))
    z = embed(demo_dir / "encoder.onnx", frames)
    subject = dict(zip(setup["frame"]["path"], setup["frame"]["subject_id"]))
    ccs, nnccs = numpy_labels(z, np.searchsorted(setup["ids"], [subject[p] for p in rows["path"]]), setup["centers"])
    np.testing.assert_allclose(rows["ccs"], ccs, atol=2e-4)
    np.testing.assert_allclose(rows["nnccs"], nnccs, atol=2e-4)
    np.testing.assert_allclose(rows["ccas"], rows["ccs"] - rows["nnccs"], atol=1e-6)
    assert (rows["kinds"] != "none").any()
    heads = torch.load(run / "encoder_0002.pt", weights_only=True)
    assert set(heads) == {"ccs_layer.weight", "ccs_layer.bias", "ccas_layer.weight", "ccas_layer.bias"}
    assert heads["ccs_layer.weight"].shape == (1, 65)


def test_ridge_predictor_with_zero_epochs_and_resume(tmp_path, demo_dir, setup):
    """num_epochs = 0 writes the ridge start: the ridge fit of the epoch-0 online labels on [unit, log norm];
    a killed [degrade] run resumes to the weights of an uninterrupted one."""
    run = train(config(tmp_path, demo_dir, setup, opt__num_epochs=0, run_name="ridge"))
    heads = torch.load(run / "encoder_0000.pt", weights_only=True)
    frames = []
    frame = setup["frame"]
    for i, row in frame.iterrows():
        kinds, severity, seed = draw_degradation(0, 0, i, KINDS, 2, (0.2, 1.0), 0.25)
        image = load_image(demo_dir / "images" / row["path"])
        frames.append(degrade_chain(image, kinds, severity, seed) if kinds else image)
    z = embed(demo_dir / "encoder.onnx", frames)
    ccs, nnccs = numpy_labels(z, np.searchsorted(setup["ids"], frame["subject_id"]), setup["centers"])
    targets = np.c_[ccs, ccs - nnccs]
    x = np.c_[z / np.linalg.norm(z, axis=1, keepdims=True), np.log(np.linalg.norm(z, axis=1))]
    w = ridge_fit(x, targets, 1e-3)
    np.testing.assert_allclose(heads["ccs_layer.weight"][0].numpy(), w[:-1, 0], atol=2e-3)
    np.testing.assert_allclose(heads["ccas_layer.bias"].numpy(), w[-1:, 1], atol=2e-3)

    cfg = config(tmp_path, demo_dir, setup, run_name="full", save_every_steps=1)
    full = train(cfg)
    train(config(tmp_path, demo_dir, setup, run_name="killed", save_every_steps=1), max_steps=4)
    killed = train(None, resume=tmp_path / "ckpt" / "killed")
    a = torch.load(full / "encoder_0002.pt", weights_only=True)
    b = torch.load(killed / "encoder_0002.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(pd.read_csv(full / "online_labels_epoch0002.csv"),
                                  pd.read_csv(killed / "online_labels_epoch0002.csv"))


def test_end_to_end_with_online_labels_and_bad_configs(tmp_path, demo_dir, setup):
    run = train(config(tmp_path, demo_dir, setup, freeze_backbone=False, head_input="raw",
                       opt__num_epochs=1, opt__lr=1e-5), max_steps=1)
    assert (run / "metrics.csv").is_file()
    bad = [({"degrade__kinds": ["blurr"]}, "degrade.kinds"), ({"degrade__stack": 5}, "degrade.stack"),
           ({"degrade__severity": [0.8, 0.2]}, "degrade.severity"), ({"degrade__centers_path": ""}, "centers_path"),
           ({"head_input": "log"}, "head_input")]
    for over, key in bad:
        with pytest.raises(TransfiraError, match=key):
            train(config(tmp_path, demo_dir, setup, run_name="bad", **over))
    other = pd.DataFrame({"path": setup["frame"]["path"][:3], "subject_id": ["nobody", "x", "y"]})
    other.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(TransfiraError, match=r"other\.csv: column 'subject_id': 3 identity"):
        train(config(tmp_path, demo_dir, setup, run_name="bad2", data__annotations=str(tmp_path / "other.csv")))


def test_centers_of_the_wrong_width_or_fewer_than_two_are_refused(tmp_path, demo_dir, setup):
    """A centers file that is not [C >= 2, embedding_size]: one line naming the file."""
    ids, centers = setup["ids"], setup["centers"]
    narrow = rf"narrow\.npz: centers have shape \({len(ids)}, 32\), expected \[C, 64\]"
    for name, (kept_ids, kept), message in [
            ("narrow.npz", (ids, centers[:, :32]), narrow),
            ("one.npz", (ids[:1], centers[:1]), r"one\.npz: NNCCS needs at least two class centers, found 1")]:
        save_id_vectors(tmp_path / name, kept_ids, kept)
        cfg = config(tmp_path, demo_dir, setup, degrade__centers_path=str(tmp_path / name))
        with pytest.raises(TransfiraError, match=message) as err:
            OnlineLabels(cfg, torch.device("cpu"), None)
        assert "\n" not in str(err.value)


def test_existing_run_is_not_overwritten(tmp_path, demo_dir, setup):
    from test_training import write_toml

    cfg = config(tmp_path, demo_dir, setup, opt__num_epochs=0)
    train(cfg)
    toml = write_toml(tmp_path / "train.toml", {k: v for k, v in cfg.items()})
    proc = run_script("train.py", "--config", toml, check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "--overwrite" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    run_script("train.py", "--config", toml, "--overwrite")
