"""generate.py end to end on the demo data, and its errors on bad input."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import run_script
from test_labels import reference_labels


def write_config(path: Path, demo: Path, outdir: Path, tables: dict, **top) -> Path:
    lines = [f"model_path = '{demo / 'encoder.onnx'}'", "embedding_size = 64", f"outdir = '{outdir}'",
             "num_workers = 0", "batch_size = 50"]
    top = {"device": "cpu", **top}  # CPU unless a test says otherwise
    lines += [f"{k} = {v!r}".replace("True", "true").replace("False", "false") for k, v in top.items()]
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.append(f"data_dir = '{table.get('data_dir', demo / 'images')}'")
        lines += [f"{k} = '{v}'" for k, v in table.items() if k != "data_dir"]
    path.write_text("\n".join(lines) + "\n")
    return path


def onnx_features(demo: Path, paths) -> np.ndarray:
    """Independent preprocessing + onnxruntime: (pixel - 127.5) / 127.5 on RGB (112x112 images)."""
    import onnxruntime as ort

    x = np.stack([np.asarray(Image.open(demo / "images" / p).convert("RGB"), np.float32) for p in paths])
    x = ((x - 127.5) / 127.5).transpose(0, 3, 1, 2)
    return ort.InferenceSession(str(demo / "encoder.onnx")).run(None, {"input": x})[0]


def test_generate_end_to_end(demo_dir, tmp_path):
    train = pd.read_csv(demo_dir / "train.csv").sample(frac=1.0, random_state=0)  # rows out of id order
    train.to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "g.toml", demo_dir, out, {
        "train": {"annotations": tmp_path / "train.csv"},
        "test_gallery": {"annotations": demo_dir / "test_gallery.csv"},
        "test_probes": {"annotations": demo_dir / "test_probes.csv"},
        "disabled": {"annotations": ""},
    }, save_cr=True)
    run_script("generate.py", "--config", cfg)

    labels = pd.read_csv(out / "train_labels.csv")
    assert list(labels["path"]) == list(train["path"])  # input order kept
    assert {"degradation", "severity", "ccs", "nnccs", "ccas", "cr"} <= set(labels.columns)
    features = np.load(out / "train_features.npy")
    np.testing.assert_allclose(features, onnx_features(demo_dir, train["path"]), atol=2e-4, rtol=1e-4)
    ref_ccs, ref_nnccs, _ = reference_labels(features, train["subject_id"].to_numpy())
    np.testing.assert_allclose(labels["ccs"], ref_ccs, atol=1e-5)
    np.testing.assert_allclose(labels["nnccs"], ref_nnccs, atol=1e-5)
    np.testing.assert_allclose(labels["ccas"], labels["ccs"] - labels["nnccs"], atol=1e-6)
    np.testing.assert_allclose(np.load(out / "train_ccs.npy"), labels["ccs"], atol=1e-6)
    with np.load(out / "train_centers.npz") as centers:
        assert len(centers["ids"]) == train["subject_id"].nunique() and centers["vectors"].shape[1] == 64

    probes = pd.read_csv(out / "test_probes_labels.csv")
    g_feat, p_feat = np.load(out / "test_gallery_features.npy"), np.load(out / "test_probes_features.npy")
    gallery = pd.read_csv(demo_dir / "test_gallery.csv")
    ref_ccs, ref_nnccs, _ = reference_labels(p_feat, probes["subject_id"].to_numpy(), g_feat,
                                             gallery["subject_id"].to_numpy())
    np.testing.assert_allclose(probes["ccs"], ref_ccs, atol=1e-5)
    np.testing.assert_allclose(probes["nnccs"], ref_nnccs, atol=1e-5)
    assert not (out / "test_gallery_labels.csv").exists()  # a gallery yields centers only
    assert not list(out.glob("*.tmp-*")) and not list(out.glob("*partial*"))
    # Degraded images are less recognizable: severity correlates negatively with CCS.
    assert np.corrcoef(labels["severity"], labels["ccs"])[0, 1] < -0.2

    # Probes in a later run find the saved gallery centers in outdir.
    cfg2 = write_config(tmp_path / "g2.toml", demo_dir, out, {
        "test_probes": {"annotations": demo_dir / "test_probes.csv"}}, save_features=False)
    run_script("generate.py", "--config", cfg2)
    np.testing.assert_allclose(pd.read_csv(out / "test_probes_labels.csv")["ccs"], probes["ccs"], atol=1e-6)


def error_of(tmp_path, demo_dir, tables, **top) -> str:
    cfg = write_config(tmp_path / "bad.toml", demo_dir, tmp_path / "out", tables, **top)
    proc = run_script("generate.py", "--config", cfg, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    return lines[-1]


def test_config_key_typo(tmp_path, demo_dir):
    msg = error_of(tmp_path, demo_dir, {"train": {"annotations": demo_dir / "train.csv"}}, bach_size=3)
    assert "bad.toml" in msg and "'bach_size'" in msg and "did you mean 'batch_size'" in msg
    msg = error_of(tmp_path, demo_dir, {"train": {"annotation": demo_dir / "train.csv"}})
    assert "'annotation' in [train]" in msg and "did you mean 'annotations'" in msg


def test_missing_column(tmp_path, demo_dir):
    msg = error_of(tmp_path, demo_dir, {"train": {"annotations": demo_dir / "train.csv", "label_col_name": "person"}})
    assert "[train]" in msg and "'person'" in msg and "path, subject_id" in msg


def test_single_identity_and_missing_gallery_identity(tmp_path, demo_dir):
    one = pd.read_csv(demo_dir / "train.csv").query("subject_id == 0")
    one.to_csv(tmp_path / "one.csv", index=False)
    msg = error_of(tmp_path, demo_dir, {"train": {"annotations": tmp_path / "one.csv"}})
    assert "[train]" in msg and "at least two identities" in msg
    gallery = pd.read_csv(demo_dir / "test_gallery.csv")
    gallery[~gallery["subject_id"].isin([60, 61])].to_csv(tmp_path / "g.csv", index=False)
    msg = error_of(tmp_path, demo_dir, {"x_gallery": {"annotations": tmp_path / "g.csv"},
                                         "x_probes": {"annotations": demo_dir / "test_probes.csv"}})
    assert "[x_probes] 2 identity(s) have no class center: 60, 61" in msg
    assert not (tmp_path / "out" / "x_probes_labels.csv").exists()


def test_embedding_size_mismatch(tmp_path, demo_dir):
    cfg = write_config(tmp_path / "bad.toml", demo_dir, tmp_path / "out", {"train": {"annotations": demo_dir / "train.csv"}})
    cfg.write_text(cfg.read_text().replace("embedding_size = 64", "embedding_size = 512"))
    proc = run_script("generate.py", "--config", cfg, check=False)
    assert proc.returncode == 2 and "embedding_size = 512 in the config, but" in proc.stderr and "64-D" in proc.stderr


def test_bad_image_error_and_skip(tmp_path, demo_dir):
    frame = pd.read_csv(demo_dir / "val.csv")
    images = tmp_path / "images"
    for p in frame["path"]:
        (images / p).parent.mkdir(parents=True, exist_ok=True)
        (images / p).write_bytes((demo_dir / "images" / p).read_bytes())
    (images / frame["path"][3]).write_bytes(b"not an image")
    table = {"val": {"annotations": demo_dir / "val.csv", "data_dir": images}}
    msg = error_of(tmp_path, demo_dir, table)
    assert "row 4" in msg and frame["path"][3] in msg and "on_bad_image" in msg
    out = tmp_path / "out"
    assert not (out / "val_labels.csv").exists()
    cfg = write_config(tmp_path / "skip.toml", demo_dir, out, table, on_bad_image="skip")
    run_script("generate.py", "--config", cfg)
    labels = pd.read_csv(out / "val_labels.csv")
    assert len(labels) == len(frame) and np.isnan(labels["ccs"][3]) and labels["ccs"].drop(3).notna().all()
    skipped = pd.read_csv(out / "val_skipped.csv")
    assert list(skipped["row"]) == [4] and skipped["path"][0] == frame["path"][3]
    assert "UnidentifiedImageError" in skipped["error"][0]


def test_feature_extraction_resumes(tmp_path, demo_dir, monkeypatch):
    """A run killed mid-way resumes from the last flushed batch and gives the same features."""
    from transfira import features as feat
    from transfira.backbone import load_backbone
    from transfira.data import AUG_DEFAULTS, ImageDataset, build_transform

    frame = pd.read_csv(demo_dir / "train.csv")
    dataset = ImageDataset(demo_dir / "images", frame["path"], build_transform(AUG_DEFAULTS))
    net = load_backbone("onnx", demo_dir / "encoder.onnx")
    extract = lambda name: feat.extract_outputs(net, dataset, {"f": (tmp_path / name, 64)}, 32, 0)  # noqa: E731
    full = extract("full.npy")[0]["f"]

    monkeypatch.setattr(feat, "FLUSH_EVERY", 2)
    calls = {"n": 0}
    real_forward = net.forward

    def crashing_forward(x):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_forward(x)

    net.forward = crashing_forward
    with pytest.raises(KeyboardInterrupt):
        extract("resumed.npy")
    assert not (tmp_path / "resumed.npy").exists() and (tmp_path / "resumed.partial.json").exists()
    calls["n"] = -1000  # no more crashes; count the batches of the resumed run
    resumed, skipped = extract("resumed.npy")
    np.testing.assert_allclose(resumed["f"], full, atol=1e-6)
    assert not skipped and not (tmp_path / "resumed.partial.json").exists()
    assert calls["n"] + 1000 == (len(frame) - 4 * 32 + 31) // 32  # restarted after the 4 flushed batches

    # An interrupted run with another model or preprocessing (fingerprint) starts over.
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        extract("other.npy")
    calls["n"] = -1000
    feat.extract_outputs(net, dataset, {"f": (tmp_path / "other.npy", 64)}, 32, 0, fingerprint=["another model"])
    assert calls["n"] + 1000 == (len(frame) + 31) // 32


def test_non_finite_embedding_is_an_error(tmp_path, demo_dir):
    import torch

    from transfira.data import AUG_DEFAULTS, ImageDataset, build_transform
    from transfira.errors import TransfiraError
    from transfira.features import extract_outputs

    class NanOnThird(torch.nn.Module):
        def forward(self, x):
            out = x.mean((2, 3)).repeat(1, 4)
            out[2 % len(out), 0] = float("nan") if len(out) > 2 else 0.0
            return out

    frame = pd.read_csv(demo_dir / "val.csv").head(8)
    dataset = ImageDataset(demo_dir / "images", frame["path"], build_transform(AUG_DEFAULTS))
    with pytest.raises(TransfiraError, match=f"non-finite embedding for row 3 \\({frame['path'][2]}\\)"):
        extract_outputs(NanOnThird(), dataset, {"embedding": (tmp_path / "f.npy", 12)}, 4, 0)
    assert not (tmp_path / "f.npy").exists()
