"""IJB-B / IJB-C: meta readers, media pooling by hand, synthetic loose crops, run_ijb.py end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import load_script
import torch
from PIL import Image, ImageFilter

from transfira.aggregation import VARIANTS, aggregate_media_variants, aggregate_variants
from transfira.alignment import ARCFACE_TEMPLATE, LANDMARK_COLUMNS, align_face, arcface_transform
from transfira.errors import TransfiraError
from transfira.ijb import (build_test_table, make_synthetic_release, meta_path, read_landmark_file, read_pairs,
                           read_tid_mid)
from transfira.io import load_id_vectors

ROOT = Path(__file__).resolve().parents[1]


# --- media pooling by hand ---------------------------------------------------------------------------

# template 7: media 1 is a 3-frame video, media 2 a still; template 9: one still whose scores trigger both fallbacks
Z = np.array([[1, 0], [3, 0], [2, 2], [0, 4], [5, 1]], np.float32)
TIDS = np.array([7, 7, 7, 7, 9])
MIDS = np.array([1, 1, 1, 2, 3])
CCS = np.array([0.2, 0.4, 0.6, 0.8, -0.1])
CCAS = np.array([0.1, -0.3, 0.2, 0.5, -0.2])


def test_media_pooling_by_hand():
    """The documented rule on numbers worked out by hand (see aggregate_media_variants)."""
    out = aggregate_media_variants(Z, TIDS, MIDS, CCS, CCAS, list(VARIANTS))
    # baseline: video mean (2, 2/3), still (0, 4) -> their mean
    # weight: video (.2*(1,0) + .4*(3,0) + .6*(2,2)) / 1.2 = (2.1667, 1), weight 1.2/3 = .4; still weight .8
    #         -> (.4*(2.1667, 1) + .8*(0, 4)) / 1.2
    # filter: frame 2 (CCAS < 0) dropped: video (1.5, 1) -> mean with the still
    # filter_weight: video (.2*(1,0) + .6*(2,2)) / .8 = (1.75, 1.5), weight .8/2 = .4 -> (.4*(1.75,1.5) + .8*(0,4)) / 1.2
    expected = {"baseline": [1.0, 7 / 3], "weight": [2.6 / 3 / 1.2, 3.6 / 1.2], "filter": [0.75, 2.5],
                "filter_weight": [0.7 / 1.2, 3.8 / 1.2]}
    for name, vector in expected.items():
        ids, vectors, summary = out[name]
        assert ids.tolist() == [7, 9]
        np.testing.assert_allclose(vectors[0], vector, atol=2e-4)
        np.testing.assert_allclose(vectors[1], [5, 1], atol=1e-6)  # a single image whatever the fallbacks
        assert summary["media"].tolist() == [2, 1]
    assert out["filter"][2]["filter_fallback"].tolist() == [False, True]
    assert out["weight"][2]["weight_fallback"].tolist() == [False, True]
    assert out["filter_weight"][2]["images_used"].tolist() == [3, 1]
    # without media pooling the video's three frames count three times: plain mean of the four images
    np.testing.assert_allclose(aggregate_media_variants(Z, TIDS, None, None, None, ["baseline"])["baseline"][1][0],
                               [1.5, 1.5], atol=1e-6)


def test_detector_score_scales_features_before_media_pooling():
    scale = np.array([0.5, 1.0, 1.0, 0.25, 1.0])
    ids, vectors, _ = aggregate_media_variants(Z, TIDS, MIDS, None, None, ["baseline"], image_scale=scale)["baseline"]
    # video mean of (.5, 0), (3, 0), (2, 2) = (5.5/3, 2/3); still (0, 1); template = their mean
    np.testing.assert_allclose(vectors[0], [5.5 / 6, (2 / 3 + 1) / 2], atol=1e-6)


def reference_media_pooling(z, tids, mids, ccs, ccas, use_filter, use_weight, normalize, scale, eps=1e-6):
    """Slow float64 loops over templates and media implementing the documented rule."""
    out = {}
    for t in np.unique(tids):
        rows = np.flatnonzero(tids == t)
        rows = rows[np.isfinite(z[rows]).all(1) & np.isfinite(ccs[rows]) & np.isfinite(ccas[rows])]
        if not len(rows):
            continue
        keep = rows[ccas[rows] > 0] if use_filter else rows
        if not len(keep):
            keep = rows
        w = {i: (max(ccs[i], 0.0) if use_weight else 1.0) for i in keep}
        if use_weight and sum(w.values()) <= eps:
            w = {i: 1.0 for i in keep}
        total, norm = np.zeros(z.shape[1]), 0.0
        for m in np.unique(mids[keep]):
            frames = [i for i in keep if mids[i] == m]
            wsum = sum(w[i] for i in frames)
            if wsum == 0:
                continue
            feat = lambda i: z[i].astype(np.float64) / (np.linalg.norm(z[i]) if normalize else 1.0) * scale[i]  # noqa: E731
            media_vector = sum(w[i] * feat(i) for i in frames) / wsum
            media_weight = wsum / len(frames)
            total += media_weight * media_vector
            norm += media_weight
        out[t] = total / norm
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_media_pooling_matches_a_float64_reference(normalize):
    rng = np.random.default_rng(3)
    n = 400
    z = rng.normal(0, 1, (n, 8)).astype(np.float32)
    tids = rng.integers(0, 30, n)
    mids = rng.integers(0, 4, n)  # media ids repeat across templates: grouped within a template
    ccs, ccas = rng.normal(0.1, 0.3, n), rng.normal(0, 0.3, n)
    ccs[tids == 5] = -0.5  # weight fallback
    ccas[tids == 6] = -0.5  # filter fallback
    z[3] = np.nan  # an unreadable image
    scale = rng.uniform(0.2, 1.0, n)
    out = aggregate_media_variants(z, tids, mids, ccs, ccas, list(VARIANTS), normalize, image_scale=scale)
    for name, (use_filter, use_weight) in VARIANTS.items():
        ref = reference_media_pooling(z, tids, mids, ccs, ccas, use_filter, use_weight, normalize, scale)
        ids, vectors, _ = out[name]
        assert ids.tolist() == sorted(ref)
        np.testing.assert_allclose(vectors, np.stack([ref[t] for t in ids]), rtol=1e-4, atol=1e-5)


def test_one_media_per_image_equals_aggregate_variants():
    rng = np.random.default_rng(4)
    z = rng.normal(0, 1, (120, 6)).astype(np.float32)
    z[7] = np.nan
    tids, ccs, ccas = rng.integers(0, 15, 120), rng.normal(0.1, 0.3, 120), rng.normal(0, 0.3, 120)
    ours = aggregate_media_variants(z, tids, None, ccs, ccas, list(VARIANTS))
    theirs = aggregate_variants(z, tids, ccs, ccas, list(VARIANTS))
    for name in VARIANTS:
        np.testing.assert_array_equal(ours[name][0], theirs[name][0])
        np.testing.assert_allclose(ours[name][1], theirs[name][1], rtol=1e-5, atol=1e-6)


# --- meta readers ------------------------------------------------------------------------------------

def write_meta(root: Path, tid: str, lmk: str, pairs: str = "101 102 1\n101 103 0\n", prefix: str = "ijbc") -> Path:
    (root / "meta").mkdir(parents=True, exist_ok=True)
    for which, text in (("tid_mid", tid), ("landmarks", lmk), ("pairs", pairs)):
        meta_path(root, prefix, which).write_text(text)
    return root


LMK = " ".join(["1.5"] * 10)


def test_readers_and_join_by_name(tmp_path):
    root = write_meta(tmp_path, "a.jpg 101 1\nb.jpg 102 2\nc.jpg 103 2\n",
                      f"c.jpg {LMK} 0.5\na.jpg {LMK} 0.9\nb.jpg {LMK} 0.7\n", prefix="ijbb")
    table = build_test_table(root, "ijbb")
    assert table.columns.tolist() == ["path", "template_id", "media_id", *LANDMARK_COLUMNS, "det_score"]
    assert table["path"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert table["det_score"].tolist() == [0.9, 0.7, 0.5]  # matched by name, not by row
    assert read_pairs(meta_path(root, "ijbb", "pairs"))["label"].tolist() == [1, 0]
    assert read_tid_mid(meta_path(root, "ijbb", "tid_mid"))["template_id"].dtype == np.int64


@pytest.mark.parametrize("case, message", [
    ("extra_field", "line 2"),
    ("missing_field", "missing fields on line(s) 2"),
    ("not_integer", "'template_id' is not an integer on line(s) 3"),
    ("bad_landmark", "'y3' is not a number on line(s) 1"),
    ("bad_label", "label must be 1 (genuine) or 0 (impostor) on line(s) 2"),
    ("no_landmarks", "no landmarks for 1 image(s)"),
    ("missing_file", "IJB meta file not found"),
])
def test_reader_errors_name_file_and_line(tmp_path, case, message):
    tid = "a.jpg 101 1\nb.jpg 102 2\nc.jpg 103 2\n"
    lmk = f"a.jpg {LMK} 0.9\nb.jpg {LMK} 0.7\nc.jpg {LMK} 0.5\n"
    pairs = "101 102 1\n101 103 0\n"
    if case == "extra_field":
        tid = "a.jpg 101 1\nb.jpg 102 2 9\nc.jpg 103 2\n"
    elif case == "missing_field":
        tid = "a.jpg 101 1\nb.jpg 102\nc.jpg 103 2\n"
    elif case == "not_integer":
        tid = "a.jpg 101 1\nb.jpg 102 2\nc.jpg 10x 2\n"
    elif case == "bad_landmark":
        lmk = lmk.replace("a.jpg 1.5 1.5 1.5 1.5 1.5 1.5", "a.jpg 1.5 1.5 1.5 1.5 1.5 nan?")
    elif case == "bad_label":
        pairs = "101 102 1\n101 103 2\n"
    elif case == "no_landmarks":
        lmk = f"a.jpg {LMK} 0.9\nc.jpg {LMK} 0.5\n"
    root = write_meta(tmp_path, tid, lmk, pairs)
    if case == "missing_file":
        meta_path(root, "ijbc", "tid_mid").unlink()
    with pytest.raises(TransfiraError) as err:
        build_test_table(root, "ijbc")
        read_pairs(meta_path(root, "ijbc", "pairs"))
    text = str(err.value)
    assert message in text
    assert "/meta/ijbc_" in text  # names the file
    with pytest.raises(TransfiraError, match="prefix must be one of"):
        read_landmark_file(meta_path(root, "ijbx", "landmarks"))


# --- synthetic release -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ijbc_release")
    make_synthetic_release(root, "ijbc", subjects=8, templates_per_subject=3, impostor_pairs=120, seed=0,
                           keep_aligned=True)
    return root


def test_synthetic_release_layout(release):
    table = build_test_table(release, "ijbc")
    pairs = read_pairs(meta_path(release, "ijbc", "pairs"))
    owners = pd.read_csv(release / "meta" / "synth_subjects.csv").set_index("template_id")["subject_id"]
    assert 60 <= len(table) <= 200 and table["template_id"].nunique() == 24
    per_media = table.groupby(["template_id", "media_id"]).size()
    assert (per_media >= 3).any() and (per_media == 1).any()  # videos and stills
    assert (table.groupby("template_id")["media_id"].nunique() > 1).any()
    same = owners[pairs["template_a"]].to_numpy() == owners[pairs["template_b"]].to_numpy()
    np.testing.assert_array_equal(same, pairs["label"].to_numpy() == 1)
    assert pairs["label"].sum() == 8 * 3 and (pairs["label"] == 0).sum() == 120
    assert all((release / "loose_crop" / p).is_file() for p in table["path"])


def test_alignment_of_loose_crops_reproduces_the_aligned_face(release):
    table = build_test_table(release, "ijbc")
    kinds = pd.read_csv(release / "meta" / "synth_images.csv")["degradation"]
    for i in range(0, len(table), 7):
        row = table.iloc[i]
        landmarks = row[LANDMARK_COLUMNS].to_numpy(np.float64).reshape(5, 2)
        matrix = arcface_transform(landmarks)
        np.testing.assert_allclose(landmarks @ matrix[:, :2].T + matrix[:, 2], ARCFACE_TEMPLATE, atol=2e-3)
        with Image.open(release / "loose_crop" / row["path"]) as crop:
            ours = align_face(crop.convert("RGB"), landmarks)
        original = Image.open(release / "aligned" / row["path"].replace(".jpg", ".png")).convert("RGB")
        # two bilinear resamplings and JPEG: pixel noise does not survive, so compare lightly blurred images
        blur = lambda im: np.asarray(im.filter(ImageFilter.GaussianBlur(2)), np.float64)  # noqa: E731
        assert np.abs(blur(ours) - blur(original)).mean() < 3.0, (row["path"], kinds[i])
        if kinds[i] == "none":
            assert np.median(np.abs(np.asarray(ours, float) - np.asarray(original, float))) <= 2
        # a wrong alignment (shifted by 6 px) is far off: the check can fail
        shifted = align_face(Image.open(release / "loose_crop" / row["path"]).convert("RGB"), landmarks + 6)
        assert np.abs(blur(shifted) - blur(original)).mean() > 3.0


# --- run_ijb.py end to end ---------------------------------------------------------------------------

def run_ijb_cli(*args):
    return load_script("data/IJB/run_ijb.py").main([str(a) for a in args])


@pytest.fixture(scope="module")
def predictor(demo_dir, tmp_path_factory) -> Path:
    from transfira.backbone import load_backbone
    from transfira.model import RecognizabilityPredictionNetwork

    torch.manual_seed(0)
    model = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64)
    with torch.no_grad():  # scores spread around 0: filter and weights both act
        model.ccs_layer.bias.fill_(0.05)
        model.ccas_layer.bias.fill_(0.0)
    path = tmp_path_factory.mktemp("ijb_predictor") / "predictor.pt"
    torch.save(model.state_dict(), path)
    return path


def write_ijb_config(path: Path, release: Path, demo_dir: Path, predictor: Path, outdir: Path, **extra) -> Path:
    values = {"root": str(release), "prefix": "ijbc", "model_path": str(demo_dir / "encoder.onnx"),
              "embedding_size": 64, "checkpoint_path": str(predictor), "outdir": str(outdir), "media_pooling": True,
              "flip": True, "fmr": [1e-2, 1e-1], "batch_size": 32, "num_workers": 0, "device": "cpu", **extra}
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n")
    return path


def test_run_ijb_end_to_end_and_resume(release, demo_dir, predictor, tmp_path):
    outdir = tmp_path / "out"
    cfg = write_ijb_config(tmp_path / "ijbc.toml", release, demo_dir, predictor, outdir)
    assert run_ijb_cli("--config", cfg) == dict.fromkeys(["meta", "features", "templates", "evaluate"], "ran")
    table = build_test_table(release, "ijbc")
    feats = np.load(outdir / "features" / "test_features.npy")
    assert feats.shape == (len(table), 64) and np.isfinite(feats).all()
    ccas = np.load(outdir / "features" / "test_ccas.npy")
    assert 0 < (ccas > 0).mean() < 1
    # flip test: feature = f(aligned crop) + f(its mirror), checked on one image outside the loader
    from transfira.backbone import load_backbone
    from transfira.data import build_transform

    encoder = load_backbone("onnx", demo_dir / "encoder.onnx").eval()
    row = table.iloc[5]
    with Image.open(release / "loose_crop" / row["path"]) as crop:
        aligned = align_face(crop.convert("RGB"), row[LANDMARK_COLUMNS].to_numpy(float).reshape(5, 2))
    x = torch.stack([build_transform({})(aligned), build_transform({})(aligned.transpose(Image.FLIP_LEFT_RIGHT))])
    with torch.no_grad():
        np.testing.assert_allclose(feats[5], encoder(x).sum(0).numpy(), rtol=1e-4, atol=1e-4)
    # templates: ids are the IJB template ids, each equal to the media rule applied to the stored features
    ccs = np.load(outdir / "features" / "test_ccs.npy")
    for name, (use_filter, use_weight) in VARIANTS.items():
        ids, vectors = load_id_vectors(outdir / f"templates_{name}.npz")
        ref = reference_media_pooling(feats, table["template_id"].to_numpy(), table["media_id"].to_numpy(), ccs, ccas,
                                      use_filter, use_weight, False, np.ones(len(table)))
        assert sorted(ids.tolist()) == sorted(table["template_id"].unique().tolist())
        np.testing.assert_allclose(vectors, np.stack([ref[t] for t in ids]), rtol=1e-4, atol=1e-4)
    results = pd.read_csv(outdir / "evaluation" / "results.csv")
    assert sorted(results["variant"].unique()) == sorted(VARIANTS) and set(results["fmr"]) == {0.01, 0.1}
    # TAR at FAR 1e-1 of the baseline, recomputed from the templates (cosine, k-th highest impostor score)
    pairs = read_pairs(meta_path(release, "ijbc", "pairs"))
    ids, vectors = load_id_vectors(outdir / "templates_baseline.npz")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    index = {t: i for i, t in enumerate(ids.tolist())}
    a, b = [unit[[index[t] for t in pairs[c]]] for c in ("template_a", "template_b")]
    scores, genuine = (a * b).sum(1).astype(np.float64), pairs["label"].to_numpy() == 1
    impostor = np.sort(scores[~genuine])[::-1]
    threshold = impostor[int(np.floor(0.1 * len(impostor))) - 1]
    tar = results.query("variant == 'baseline' and fmr == 0.1")["tar"].iloc[0]
    assert tar == pytest.approx((scores[genuine] > threshold).mean(), abs=1e-9)
    assert tar > 0.5  # the demo encoder recognizes the synthetic subjects after alignment
    assert "Template verification" in (outdir / "evaluation" / "results.md").read_text()
    # second run: every stage up to date; a changed pooling option re-runs templates and evaluate only
    assert set(run_ijb_cli("--config", cfg).values()) == {"skipped"}
    cfg2 = write_ijb_config(tmp_path / "ijbc2.toml", release, demo_dir, predictor, outdir, media_pooling=False)
    assert run_ijb_cli("--config", cfg2) == {"meta": "skipped", "features": "skipped", "templates": "ran",
                                             "evaluate": "ran"}
    ids, vectors = load_id_vectors(outdir / "templates_baseline.npz")
    plain = pd.DataFrame(feats).groupby(table["template_id"].to_numpy()).mean()
    np.testing.assert_allclose(vectors, plain.loc[ids].to_numpy(), rtol=1e-4, atol=1e-4)


def test_run_ijb_config_errors(tmp_path):  # no files are read: the checks run on the config alone
    from transfira.config import load_config
    from transfira.jobs.ijb import SCHEMA as IJB_SCHEMA, check_config

    bad = write_ijb_config(tmp_path / "a.toml", tmp_path, tmp_path, tmp_path / "p.pt", tmp_path / "o", media_pool=True)
    with pytest.raises(TransfiraError, match="unknown key 'media_pool'.*did you mean 'media_pooling'"):
        load_config(bad, IJB_SCHEMA)
    bad = write_ijb_config(tmp_path / "b.toml", tmp_path, tmp_path, tmp_path / "p.pt", tmp_path / "o", checkpoint_path="")
    with pytest.raises(TransfiraError, match="need the predictor"):
        check_config(load_config(bad, IJB_SCHEMA), str(bad))
    bad = write_ijb_config(tmp_path / "c.toml", tmp_path, tmp_path, tmp_path / "p.pt", tmp_path / "o", prefix="ijba")
    with pytest.raises(TransfiraError, match="prefix must be one of ijbc, ijbb"):
        check_config(load_config(bad, IJB_SCHEMA), str(bad))


@pytest.mark.parametrize("name", ["ijbc", "ijbb", "synthetic"])
def test_example_configs_are_valid(name):
    from transfira.config import load_config
    from transfira.jobs.ijb import SCHEMA as IJB_SCHEMA, check_config

    path = ROOT / "configs" / "examples" / "ijbc" / f"{name}.toml"
    cfg = check_config(load_config(path, IJB_SCHEMA), str(path))
    assert cfg["prefix"] == ("ijbb" if name == "ijbb" else "ijbc") and cfg["media_pooling"]


def test_synth_command(tmp_path, capsys):
    from transfira.ijb import main

    main(["synth", str(tmp_path / "r"), "--prefix", "ijbb", "--subjects", "2", "--templates-per-subject", "2",
          "--impostor-pairs", "3"])
    assert "synthetic ijbb release" in capsys.readouterr().out
    table = build_test_table(tmp_path / "r", "ijbb")
    pairs = read_pairs(meta_path(tmp_path / "r", "ijbb", "pairs"))
    assert table["template_id"].nunique() == 4 and pairs["label"].tolist().count(1) == 2 and len(pairs) == 5
