"""explain.py on the demo data: sweeps (severity 0 = generate.py), crossings, confuser, attribution sanity, IG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import load_script
import torch

from transfira.attribution import blurred, ccas_score, integrated_gradients, region_drops
from transfira.backbone import load_backbone
from transfira.config import apply_schema, load_config
from transfira.data import build_transform, load_image
from transfira.errors import TransfiraError
from transfira.jobs.explain import SCHEMA as EXPLAIN_SCHEMA, SWEEP_COLUMNS, run as run_explain, subject_factors, zero_crossing
from transfira.jobs.generate import SCHEMA as GENERATE_SCHEMA, run as run_generate
from transfira.labels import nearest_nonmatch
from transfira.model import RecognizabilityPredictionNetwork

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["blur", "noise", "occlusion_eyes", "hflip"]
SEVERITIES = [0, 0.5, 1.0]


@pytest.fixture(scope="module")
def setup(demo_dir, tmp_path_factory):
    """generate.py labels of the demo test set (leave-one-out centers, as the LFW example) and a predictor whose
    linear heads are the ridge fit of (CCS, CCAS) on the demo train features (a real, if simple, predictor)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("explain")
    gen = apply_schema({"model_path": str(demo_dir / "encoder.onnx"), "embedding_size": 64,
                        "outdir": str(root / "labels"), "num_workers": 0, "batch_size": 50, "device": "cpu",
                        "leave_one_out": True,
                        "train": {"data_dir": str(demo_dir / "images"), "annotations": str(demo_dir / "train.csv")},
                        "test": {"data_dir": str(demo_dir / "images"), "annotations": str(demo_dir / "test.csv")}},
                       GENERATE_SCHEMA, "generate")
    run_generate(gen)
    x = np.load(root / "labels" / "train_features.npy").astype(np.float64)
    labels = pd.read_csv(root / "labels" / "train_labels.csv")
    design = np.c_[x, np.ones(len(x))]
    w = np.linalg.solve(design.T @ design + 1e-3 * np.trace(design.T @ design) / len(design) * np.eye(65),
                        design.T @ labels[["ccs", "ccas"]].to_numpy())
    predictor = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64)
    with torch.no_grad():
        for k, head in enumerate((predictor.ccs_layer, predictor.ccas_layer)):
            head.weight.copy_(torch.as_tensor(w[:64, k], dtype=torch.float32)[None])
            head.bias.fill_(float(w[64, k]))
    torch.save(predictor.state_dict(), root / "predictor.pt")
    return root


def config(setup, demo_dir, outdir="out", **extra) -> dict:
    raw = {"model_path": str(demo_dir / "encoder.onnx"), "embedding_size": 64,
           "checkpoint_path": str(setup / "predictor.pt"), "centers_path": str(setup / "labels" / "test_centers.npz"),
           "outdir": str(setup / outdir), "degradations": KINDS, "severities": SEVERITIES, "batch_size": 48,
           "device": "cpu", "max_identities": 8, "max_images": 12, "leave_one_out": True,
           "data": {"data_dir": str(demo_dir / "images"), "annotations": str(demo_dir / "test.csv")},
           "attribution": {"num_images": 3, "ig_steps": 16, "stride": 16}}
    for key, value in extra.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return apply_schema(raw, EXPLAIN_SCHEMA, "explain")


@pytest.fixture(scope="module")
def run(setup, demo_dir):
    cfg = config(setup, demo_dir)
    run_explain(cfg)
    return Path(cfg["outdir"])


def test_outputs_and_columns(run):
    sweeps = pd.read_csv(run / "sweeps.csv")
    assert list(sweeps.columns) == SWEEP_COLUMNS
    assert len(sweeps) == 12 * len(KINDS) * len(SEVERITIES)
    assert set(sweeps["degradation"]) == set(KINDS) and sorted(sweeps["severity"].unique()) == SEVERITIES
    np.testing.assert_allclose(sweeps["ccas"], sweeps["ccs"] - sweeps["nnccs"], atol=1e-6)
    for name in ("sweeps_ccas.png", "sweeps_ccs.png", "subjects_hist.png", "attribution.png", "crossings.md"):
        assert (run / name).stat().st_size > (100 if name.endswith(".md") else 5000), name
    subjects = pd.read_csv(run / "subjects.csv")
    assert len(subjects) == 8 and subjects["mean_ccas"].is_monotonic_increasing
    assert not list(run.glob("*.tmp-*")) and not list(run.glob("*.partial*"))


def test_severity_zero_equals_generate(run, setup):
    """Every degradation's severity-0 row carries generate.py's labels of that image, exactly."""
    sweeps = pd.read_csv(run / "sweeps.csv")
    generated = pd.read_csv(setup / "labels" / "test_labels.csv").set_index("path")
    zero = sweeps[sweeps["severity"] == 0]
    assert len(zero) == 12 * len(KINDS)
    for col in ("ccs", "nnccs", "ccas"):
        np.testing.assert_array_equal(zero[col].to_numpy(np.float32),
                                      generated.loc[zero["path"], col].to_numpy(np.float32))


def test_degraded_scores_move_and_flip_barely(run):
    sweeps = pd.read_csv(run / "sweeps.csv")
    mean = sweeps.groupby(["degradation", "severity"])["ccas"].mean()
    assert mean["blur", 1.0] < mean["blur", 0.0] - 0.05 and mean["noise", 1.0] < mean["noise", 0.0] - 0.05
    assert abs(mean["hflip", 1.0] - mean["hflip", 0.0]) < abs(mean["noise", 1.0] - mean["noise", 0.0])
    zero = sweeps[sweeps["severity"] == 0]
    assert zero.groupby("path")["pred_ccas"].nunique().eq(1).all()  # one shared undegraded pass


def test_deterministic_rerun(run, setup, demo_dir):
    cfg = config(setup, demo_dir, outdir="again", attribution={"num_images": 0})
    run_explain(cfg)
    again = pd.read_csv(Path(cfg["outdir"]) / "sweeps.csv")
    pd.testing.assert_frame_equal(again, pd.read_csv(run / "sweeps.csv"))
    assert not (Path(cfg["outdir"]) / "attribution.png").exists()


def test_crossings_match_hand_interpolation(run):
    sweeps = pd.read_csv(run / "sweeps.csv")
    table = pd.read_csv(run / "crossings.csv").set_index("degradation")
    for kind in KINDS:
        for col, out in (("ccas", "true_ccas_crossing"), ("pred_ccas", "pred_ccas_crossing")):
            m = [sweeps[(sweeps.degradation == kind) & (sweeps.severity == s)][col].astype(np.float64).mean()
                 for s in SEVERITIES]
            if m[0] < 0:
                expected = 0.0
            elif m[1] < 0:
                expected = 0.5 * m[0] / (m[0] - m[1])
            elif m[2] < 0:
                expected = 0.5 + 0.5 * m[1] / (m[1] - m[2])
            else:
                expected = np.nan
            np.testing.assert_allclose(table.loc[kind, out], expected, rtol=1e-4, atol=1e-6)


def test_zero_crossing_by_hand():
    s = [0, 0.25, 0.5, 1.0]
    assert zero_crossing(s, [0.4, 0.2, -0.2, -0.5]) == pytest.approx(0.25 + 0.25 * 0.2 / 0.4)
    assert zero_crossing([1.0, 0, 0.5], [-0.3, 0.6, 0.3]) == pytest.approx(0.5 + 0.5 * 0.3 / 0.6)  # unsorted input
    assert np.isnan(zero_crossing(s, [0.4, 0.3, 0.2, 0.0]))  # touching 0 is not below it
    assert zero_crossing(s, [-0.1, 0.2, -0.2, -0.5]) == 0.0
    assert zero_crossing(s, [0.1, -0.1, 0.3, -0.5]) == pytest.approx(0.125)  # the first crossing


def test_nearest_nonmatch_and_confuser_vs_numpy():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(9, 16)).astype(np.float32)
    ids = rng.integers(0, 9, 200)
    features = (centers[ids] * 0.3 + rng.normal(size=(200, 16))).astype(np.float32)
    center_ids = np.arange(9) * 10 + 5
    got = nearest_nonmatch(features, center_ids[ids], center_ids, centers, chunk_size=7)
    f = features.astype(np.float64) / np.linalg.norm(features, axis=1, keepdims=True)
    c = centers.astype(np.float64) / np.linalg.norm(centers, axis=1, keepdims=True)
    sims = f @ c.T
    sims[np.arange(200), ids] = -np.inf
    np.testing.assert_array_equal(got, sims.argmax(1))
    confuser = center_ids[got]
    subjects = subject_factors(center_ids[ids], rng.normal(size=200), rng.normal(size=200), confuser,
                               np.zeros(200)).set_index("subject_id")
    for k in range(9):
        mine = confuser[ids == k]
        values, counts = np.unique(mine, return_counts=True)
        assert counts.max() == (mine == subjects.loc[center_ids[k], "confuser"]).sum()
        assert subjects.loc[center_ids[k], "confuser_share"] == pytest.approx(counts.max() / len(mine))


def test_bad_config_errors(setup, demo_dir):
    with pytest.raises(TransfiraError, match="unknown name.*'smudge'"):
        run_explain(config(setup, demo_dir, degradations=["blur", "smudge"]))
    with pytest.raises(TransfiraError, match="include 0"):
        run_explain(config(setup, demo_dir, severities=[0.5, 1]))
    with pytest.raises(TransfiraError, match=r"\[0, 1\]"):
        run_explain(config(setup, demo_dir, severities=[0, 2]))
    bad = setup / "bad.toml"
    bad.write_text("model_path = 'x'\nseverites = [0]\n")
    with pytest.raises(TransfiraError, match="did you mean 'severities'"):
        load_config(bad, EXPLAIN_SCHEMA)


@pytest.fixture(scope="module")
def scorer(setup, demo_dir):
    predictor = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64)
    predictor.load_state_dict(torch.load(setup / "predictor.pt", weights_only=True))
    frame = pd.read_csv(demo_dir / "test.csv")
    clean = frame[frame["degradation"] == "none"]["path"].to_numpy()[::3][:8]
    transform = build_transform({})
    images = torch.stack([transform(load_image(demo_dir / "images" / p)) for p in clean])
    return ccas_score(predictor.eval()), images


def test_integrated_gradients_completeness(scorer):
    f, images = scorer
    for x in images[:3]:
        base = blurred(x, 8.0)
        attr, fx, fb = integrated_gradients(f, x, base, steps=64, batch_size=32)
        assert attr.shape == x.shape
        assert abs(fx - fb) > 0.01
        assert float(attr.sum()) == pytest.approx(fx - fb, abs=0.02 + 0.05 * abs(fx - fb))


def test_top_attributed_region_matters_more_than_random(scorer):
    """Occluding the patch with the largest IG attribution lowers predicted CCAS more than random patches."""
    f, images = scorer
    top, rand = [], []
    for k, x in enumerate(images):
        base = blurred(x, 8.0)
        attr, _, _ = integrated_gradients(f, x, base, steps=16, batch_size=16)
        t, r = region_drops(f, x, base, attr.sum(0), patch=24, n_random=24, seed=k)
        top.append(t)
        rand.append(r)
    top, rand = np.array(top), np.array(rand)
    assert top.mean() > rand.mean() + 2 * abs(rand.mean()) and top.mean() > 0, (top, rand)
    assert (top > rand).mean() >= 0.75, (top, rand)


def test_script_on_demo_config(run, setup, demo_dir):
    """explain.py's command line runs a TOML config (the shipped demo config validates)."""
    load_config(ROOT / "configs" / "demo" / "explain.toml", EXPLAIN_SCHEMA)
    load_config(ROOT / "configs" / "explain.toml", EXPLAIN_SCHEMA)
    module = load_script("explain.py")
    toml = setup / "e.toml"
    toml.write_text(f"model_path = '{demo_dir / 'encoder.onnx'}'\nembedding_size = 64\n"
                    f"checkpoint_path = '{setup / 'predictor.pt'}'\ncenters_path = '{setup / 'labels' / 'test_centers.npz'}'\n"
                    f"outdir = '{setup / 'cli'}'\ndegradations = ['jpeg']\nseverities = [0, 1]\ndevice = 'cpu'\n"
                    f"max_identities = 3\n[data]\ndata_dir = '{demo_dir / 'images'}'\nannotations = '{demo_dir / 'test.csv'}'\n"
                    "[attribution]\nnum_images = 0\n")
    module.main(["--config", str(toml)])
    sweeps = pd.read_csv(setup / "cli" / "sweeps.csv")
    assert set(sweeps["degradation"]) == {"jpeg"} and sweeps["subject_id"].nunique() == 3


def test_ridge_heads_match_sklearn():
    """train.py's ridge heads (head_init = "ridge"; num_epochs = 0 writes them alone) = scikit-learn's Ridge
    with a free intercept."""
    from sklearn.linear_model import Ridge

    from transfira.training import ridge_fit

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(300, 12))
    y = np.c_[x @ rng.normal(size=12) + 1.5, x[:, 0] - 0.5] + rng.normal(0, 0.3, (300, 2))
    w = ridge_fit(x, y, l2=1e-2)
    ref = Ridge(alpha=1e-2 * (x ** 2).sum(), fit_intercept=True).fit(x, y)
    np.testing.assert_allclose(w[:-1].T, ref.coef_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(w[-1], ref.intercept_, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("normalize", [False, True])
def test_leave_one_out_exclude_vs_numpy(normalize):
    """center_similarities(exclude=clean): a degraded copy is scored against its center without the clean photo."""
    from transfira.labels import center_similarities, class_centers

    rng = np.random.default_rng(5)
    ids = np.repeat(np.arange(6), 4)
    clean = rng.normal(size=(24, 8)).astype(np.float32)
    degraded = (clean + rng.normal(0, 0.8, size=clean.shape)).astype(np.float32)
    center_ids, mu = class_centers(clean, ids, normalize=normalize)
    counts = np.bincount(ids)
    same = center_similarities(clean, ids, center_ids, mu, True, counts, normalize, chunk_size=5, exclude=clean)
    default = center_similarities(clean, ids, center_ids, mu, True, counts, normalize, chunk_size=5)
    np.testing.assert_array_equal(same[0], default[0])
    ccs, nnccs = center_similarities(degraded, ids, center_ids, mu, True, counts, normalize, chunk_size=5,
                                     exclude=clean)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    rows = unit(clean.astype(np.float64)) if normalize else clean.astype(np.float64)
    for i in range(24):
        own = rows[(ids == ids[i]) & (np.arange(24) != i)].mean(0)
        assert ccs[i] == pytest.approx(float(unit(degraded[i].astype(np.float64)) @ unit(own)), abs=1e-5)
        others = [float(unit(degraded[i].astype(np.float64)) @ unit(mu[j].astype(np.float64)))
                  for j in range(6) if j != ids[i]]
        assert nnccs[i] == pytest.approx(max(others), abs=1e-5)
