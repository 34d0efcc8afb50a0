"""LFW video protocol: protocol construction on synthetic identities (fast, CI), the
analysis helpers against slow float64 references, and a small real run when ../shared is present."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.lfw_video import analyse as an  # noqa: E402
from data.lfw_video.make_protocol import KINDS, build_tables, frame_plan, make_test_templates, render  # noqa: E402

SHARED = ROOT.parent / "shared"
LFW = SHARED / "data" / "lfw_aligned"
MODEL = SHARED / "models" / "mobilefacenet_arcface.onnx"


def args(**kw) -> SimpleNamespace:
    base = dict(seed=0, shares=(45, 5, 50), max_ids_train=0, max_ids_val=0, max_ids_test=0, clips_train=1,
                clips_val=1, clips_test=1, frames=5, clean_frames=1, kinds=KINDS, stack=1, severity_min=0.3,
                severity_max=1.0)
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def photos() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"path": f"id{i:03d}/id{i:03d}_{j:04d}.jpg", "subject_id": f"id{i:03d}"}
            for i in range(200) for j in range(int(rng.integers(1, 6)))]
    return pd.DataFrame(rows)


def test_splits_disjoint_and_deterministic(photos):
    a, b = build_tables(photos, args()), build_tables(photos.sample(frac=1, random_state=1), args())
    for name in a:
        pd.testing.assert_frame_equal(a[name].reset_index(drop=True), b[name].reset_index(drop=True))
    ids = {s: set(a[f"{s}_gallery"]["subject_id"]) for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    counts = photos["subject_id"].value_counts()
    assert set().union(*ids.values()) == set(counts.index[counts >= 2])  # singletons dropped, the rest kept
    assert 0.35 < len(ids["train"]) / sum(map(len, ids.values())) < 0.55


def test_gallery_is_clean_and_never_a_clip_source(photos):
    t = build_tables(photos, args(frames=6, clean_frames=2))
    for s in ("train", "val", "test"):
        gal, pro = t[f"{s}_gallery"], t[f"{s}_probes"]
        assert gal["subject_id"].is_unique
        assert not set(gal["source"]) & set(pro["source"])
        assert set(pro["subject_id"]) == set(gal["subject_id"])
        assert (pro.groupby("source").size() == 6).all()
        clean = pro["frame"] < 2
        assert (pro.loc[clean, "degradation"] == "none").all() and (pro.loc[clean, "severity"] == 0).all()
        assert (pro.loc[~clean, "severity"].between(0.3, 1.0)).all()
        assert pro.loc[~clean, "degradation"].isin(KINDS).all()
        assert pro["path"].is_unique


def test_severity_range_changes_only_the_severity(photos):
    mild = build_tables(photos, args())["test_probes"]
    harsh = build_tables(photos, args(severity_min=0.7))["test_probes"]
    for col in ("path", "degradation", "u", "pixel_seed"):
        assert (mild[col] == harsh[col]).all()
    deg = mild["frame"] > 0
    assert (harsh.loc[deg, "severity"] >= mild.loc[deg, "severity"]).all()
    np.testing.assert_allclose(harsh.loc[deg, "severity"], 0.7 + 0.3 * harsh.loc[deg, "u"], atol=1e-4)
    kinds = pd.Series([frame_plan(f"x{i}.jpg", 1, 0, KINDS, 1, (0, 1))["degradation"] for i in range(800)])
    assert set(kinds) == set(KINDS) and kinds.value_counts().min() > 60  # roughly uniform over 8 kinds


def test_stack_draws_distinct_kinds():
    for i in range(50):
        kinds = frame_plan(f"p{i}.jpg", 3, 0, KINDS, 3, (0.3, 1))["degradation"].split("+")
        assert len(kinds) == len(set(kinds)) == 3 and set(kinds) <= set(KINDS)


def test_test_templates_and_pairs(photos):
    t = build_tables(photos, args(clips_test=1))
    test, templates, pairs = make_test_templates(t["test_gallery"], t["test_probes"])
    n = t["test_gallery"]["subject_id"].nunique()
    assert list(test["path"]) == list(t["test_probes"]["path"]) + list(t["test_gallery"]["path"])
    assert len(templates) == 2 * n and (templates["side"] == "enrol").sum() == n
    assert len(pairs) == n * n and pairs["label"].sum() == n
    sub = dict(zip(templates["template_id"], templates["subject_id"]))
    assert all((sub[a] == sub[b]) == bool(lab) for a, b, lab in pairs.itertuples(index=False))
    enrol = test.groupby("template_id").size()
    assert (enrol[templates.loc[templates["side"] == "enrol", "template_id"]] == 1).all()  # one photo per enrol
    assert (enrol[templates.loc[templates["side"] == "probe", "template_id"]] == 5).all()


def test_render_is_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(tmp_path / "images/a/a_0001.jpg")
    row = SimpleNamespace(source="a/a_0001.jpg", **frame_plan("a/a_0001.jpg", 2, 0, KINDS, 2, (0.5, 1)))
    one, two = np.asarray(render(row, tmp_path)), np.asarray(render(row, tmp_path))
    assert np.array_equal(one, two)
    assert not np.array_equal(one, np.asarray(render(SimpleNamespace(source=row.source, degradation="none"), tmp_path)))


def test_ridge_fit_matches_augmented_least_squares():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 7)) * 5, rng.normal(size=(300, 2))
    l2 = 1e-2
    w = an.ridge_fit(x, y, l2)
    # independent: minimise |Xb w - y|^2 + lam |w[:-1]|^2 via lstsq on rows sqrt(lam) I appended
    lam = l2 * float((x ** 2).sum())
    xb = np.hstack([x, np.ones((300, 1))])
    aug = np.vstack([xb, np.hstack([np.sqrt(lam) * np.eye(7), np.zeros((7, 1))])])
    ref = np.linalg.lstsq(aug, np.vstack([y, np.zeros((7, 2))]), rcond=None)[0]
    np.testing.assert_allclose(w, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.skipif(not (LFW / "all.csv").is_file() or not MODEL.is_file(), reason=f"needs aligned LFW and models in {SHARED}")
def test_small_real_run(tmp_path):
    """All stages on ~30 identities with 3-frame clips, one end-to-end step; the rows are consistent."""
    small = ["protocol.max_ids_train=12", "protocol.max_photos_train=3", "protocol.max_ids_test=14",
             "protocol.frames=3", "prepare.e2e_train_ids=4", "evaluate.bootstrap=20", "evaluate_orl.bootstrap=20", "evaluate_orl.images.recut=10", "evaluate_lfw1.bootstrap=20",
             "train.save_every_steps=0", "train.opt.num_epochs=1", "train.data.batch_size=8",
             "train_e2e.save_every_steps=0", "train_e2e.num_workers=0", "test.quality.serfiq.m=4",
             "generate.num_workers=0", "train.num_workers=0", "test.num_workers=0", "evaluate.fmr=[0.02, 0.1]",
             "analyse.orl_subjects=3"]
    cmd = [sys.executable, str(ROOT / "data/lfw_video/run_protocol.py"), "--workdir", str(tmp_path),
           *[a for s in small for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evaluation = tmp_path / "evaluation"
    images = pd.read_csv(evaluation / "image_results.csv")
    assert {"norm", "serfiq", "transfira_ccs", "disk_raw_ccs", "disk_unit_ccs", "e2e_ccs"} <= set(images["measure"])
    assert "42 images of 14 subjects" in (evaluation / "results.md").read_text()
    cuts = pd.read_csv(evaluation / "cut_agreement.csv")
    assert {"transfira_ccas", "disk_raw_ccas", "disk_unit_ccas", "e2e_ccas"} == set(cuts["measure"])
    orl = pd.read_csv(tmp_path / "evaluation_orl" / "cut_agreement.csv")
    assert set(orl["images"]) == {"all", "rest, cut 0", "rest, recut"}
    assert {"norm", "transfira_ccs", "e2e_ccs"} <= set(pd.read_csv(tmp_path / "evaluation_orl" / "image_results.csv")["measure"])
    online = pd.read_csv(tmp_path / "checkpoints" / "transfira" / "online_labels_epoch0001.csv")
    assert len(online) == len(pd.read_csv(tmp_path / "protocol" / "train_photos.csv"))
    # the e2e rows recomputed by analyse.py equal test.py's templates (one aggregation code path)
    for variant in ("filter_weight",):
        mine = np.load(tmp_path / "analysis" / f"templates_e2e_{variant}.npz")
        theirs = np.load(tmp_path / "test_results" / f"templates_{variant}.npz")
        order = np.argsort(theirs["ids"])
        pos = {t: i for i, t in enumerate(mine["ids"])}
        np.testing.assert_allclose(mine["vectors"][[pos[t] for t in theirs["ids"][order]]],
                                   theirs["vectors"][order], rtol=1e-5, atol=1e-5)
    # every template row reaches evaluate.py, with paired differences to the mean and the norm-weighted rows
    metrics = pd.read_csv(evaluation / "results.csv")
    assert {"baseline", "norm_weight", "filter_weight", "e2e_filter_weight", "true_filter_weight"} <= set(metrics["variant"])
    assert (metrics.loc[metrics["variant"] == "norm_weight", "delta_norm_weight"] == 0).all()
    truth = pd.read_csv(tmp_path / "analysis" / "test_probes_scores.csv")
    assert (truth.loc[truth["frame"] == 0, "ccas"] > 0).mean() >= (truth.loc[truth["frame"] > 0, "ccas"] > 0).mean()


def test_fiqa_scores_matched_by_path_and_missing_frame_named(tmp_path):
    csv = tmp_path / "test_quality.csv"
    pd.DataFrame({"path": ["b.png", "a.png"], "template_id": [1, 1], "ccs": [0.1, 0.2], "norm": [3.0, 4.0],
                  "serfiq": [0.5, 0.7]}).to_csv(csv, index=False)
    scores = an.fiqa_scores(str(csv), pd.Series(["a.png", "b.png"]))
    assert list(scores) == ["serfiq"]  # norm, ccs, ccas and ids are computed by analyse.py itself
    np.testing.assert_array_equal(scores["serfiq"], [0.7, 0.5])
    assert an.fiqa_scores("", pd.Series(["a.png"])) == {}
    with pytest.raises(SystemExit, match=r"test_quality\.csv: no row for test frame c\.png \(1 missing\)"):
        an.fiqa_scores(str(csv), pd.Series(["a.png", "c.png"]))
