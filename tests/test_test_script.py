"""test.py end to end on the demo data: one-pass features + scores, separate steps, legacy files, bad input."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_script, run_script

from transfira.aggregation import VARIANTS, all_variants
from transfira.backbone import load_backbone
from transfira.config import load_config
from transfira.data import build_transform, load_image
from transfira.errors import TransfiraError
from transfira.jobs.test import SCHEMA as TEST_SCHEMA, run as run_test
from transfira.io import load_id_vectors
from transfira.model import RecognizabilityPredictionNetwork

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 60  # 12 templates of 5 images: enough for every code path, quick on 2 CPU cores


@pytest.fixture(scope="module")
def setup(demo_dir, tmp_path_factory):
    """A predictor checkpoint (released layout: a plain state dict) and a small test CSV."""
    root = tmp_path_factory.mktemp("test_script")
    torch.manual_seed(0)
    predictor = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64)
    with torch.no_grad():  # spread the scores around 0 so filters and weight guards all trigger
        predictor.ccs_layer.bias.fill_(0.05)
        predictor.ccas_layer.bias.fill_(-0.02)
    torch.save(predictor.state_dict(), root / "predictor.pt")
    frame = pd.read_csv(demo_dir / "test.csv").head(N_IMAGES)
    frame.to_csv(root / "test.csv", index=False)
    return root


def write_config(root, demo_dir, name="test.toml", annotations="test.csv", outdir="out", **extra) -> str:
    values = {"model_path": demo_dir / "encoder.onnx", "embedding_size": 64, "checkpoint_path": root / "predictor.pt",
              "outdir": root / outdir, "batch_size": 16, "device": "cpu", "num_workers": 0, **extra}
    lines = [f"{k} = {_toml(v)}" for k, v in values.items()]
    lines += ["[data]", f"data_dir = {_toml(demo_dir / 'images')}", f"annotations = {_toml(root / annotations)}"]
    (root / name).write_text("\n".join(lines) + "\n")
    return str(root / name)


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, (int, float)) else f"'{value}'"


def cli(*args) -> None:
    """test.py's ``main`` in this process (subprocesses cost seconds of start-up each)."""
    load_script("test.py").main([str(a) for a in args])


def templates(outdir, name):
    return load_id_vectors(outdir / f"templates_{name}.npz")


def test_one_pass_all_variants(setup, demo_dir):
    cfg = write_config(setup, demo_dir)
    proc = run_script("test.py", "--config", cfg, "--generate_features", "--predict_scores", "--aggregate_features",
                      "--all_variants")
    out = setup / "out"
    features = np.load(out / "test_features.npy")
    ccs, ccas = np.load(out / "test_ccs.npy"), np.load(out / "test_ccas.npy")
    assert features.shape == (N_IMAGES, 64) and ccs.shape == ccas.shape == (N_IMAGES,)
    assert (ccas > 0).any() and (ccas <= 0).any() and (ccs <= 0).any()
    # features equal onnxruntime's on the same preprocessed images, scores the predictor's
    import onnxruntime

    frame = pd.read_csv(setup / "test.csv")
    transform = build_transform({})
    rows = [0, 17, 59]
    batch = torch.stack([transform(load_image(demo_dir / "images" / frame.path[i])) for i in rows])
    session = onnxruntime.InferenceSession(str(demo_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    np.testing.assert_allclose(features[rows], expected, rtol=1e-4, atol=1e-4)
    predictor = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64)
    predictor.load_state_dict(torch.load(setup / "predictor.pt", weights_only=True))
    with torch.no_grad():
        c, a = predictor.eval()(batch)
    np.testing.assert_allclose(ccs[rows], c[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ccas[rows], a[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    # templates are the aggregation of exactly these files, summaries alongside
    expected_templates = all_variants(features, frame.template_id.to_numpy(), ccs, ccas)
    for name in VARIANTS:
        ids, vectors = templates(out, name)
        np.testing.assert_array_equal(ids, expected_templates[name][0])
        np.testing.assert_allclose(vectors, expected_templates[name][1], rtol=1e-6)
        summary = pd.read_csv(out / f"templates_{name}_summary.csv")
        assert len(summary) == 12 and summary["images"].sum() == N_IMAGES
    assert "templates -> " in proc.stdout


def test_separate_steps_on_shuffled_csv(setup, demo_dir):
    """Steps run one at a time on a shuffled CSV: rows move with the CSV, templates are unchanged."""
    if not (setup / "out" / "templates_baseline.npz").exists():
        pytest.skip("needs test_one_pass_all_variants")
    frame = pd.read_csv(setup / "test.csv")
    perm = np.random.default_rng(1).permutation(len(frame))
    frame.iloc[perm].to_csv(setup / "shuffled.csv", index=False)
    cfg = load_config(write_config(setup, demo_dir, "shuffled.toml", "shuffled.csv", "shuffled"), TEST_SCHEMA)
    run_test(cfg, generate_features=True)
    run_test(cfg, predict_scores=True)
    shuffled, first = setup / "shuffled", setup / "out"
    for name in ("test_features.npy", "test_ccs.npy", "test_ccas.npy"):
        np.testing.assert_allclose(np.load(shuffled / name), np.load(first / name)[perm], rtol=1e-5, atol=1e-6)
    moved = shuffled / "moved"
    moved.mkdir()
    for name in ("test_features.npy", "test_ccs.npy", "test_ccas.npy"):
        shutil.move(shuffled / name, moved / name)
    cli("--config", setup / "shuffled.toml", "--aggregate_features", "--all_variants",
        "--features_path", moved / "test_features.npy", "--ccs_path", moved / "test_ccs.npy",
        "--ccas_path", moved / "test_ccas.npy")
    run_test(cfg, aggregate=True, variants=["filter_weight"], features_path=str(moved / "test_features.npy"),
             ccs_path=str(moved / "test_ccs.npy"), ccas_path=str(moved / "test_ccas.npy"))
    for name in VARIANTS:
        ids, vectors = templates(shuffled, name)
        ids0, vectors0 = templates(first, name)
        np.testing.assert_array_equal(ids, ids0)
        np.testing.assert_allclose(vectors, vectors0, rtol=1e-5, atol=1e-6)


def test_legacy_pickled_features(setup, demo_dir):
    """The reference's pickled dict (path -> feature) is refused, and read with --allow-pickle."""
    if not (setup / "out" / "templates_baseline.npz").exists():
        pytest.skip("needs test_one_pass_all_variants")
    frame = pd.read_csv(setup / "test.csv")
    features = np.load(setup / "out" / "test_features.npy")
    legacy = setup / "legacy_features.npy"
    np.save(legacy, dict(zip(frame.path[::-1], features[::-1])), allow_pickle=True)
    cfg = write_config(setup, demo_dir, "legacy.toml", outdir="legacy")
    args = ["--config", cfg, "--aggregate_features", "--features_path", legacy]
    proc = run_script("test.py", *args, check=False)  # the one subprocess: exit code and one-line message
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--allow-pickle" in proc.stderr
    assert proc.stderr.startswith("error: ") and str(legacy) in proc.stderr
    assert not (setup / "legacy" / "templates_baseline.npz").exists()
    cli(*args, "--allow-pickle")
    ids, vectors = templates(setup / "legacy", "baseline")
    ids0, vectors0 = templates(setup / "out", "baseline")
    np.testing.assert_array_equal(ids, ids0)
    np.testing.assert_allclose(vectors, vectors0, rtol=1e-6)


def test_unreadable_image_skip_and_error(setup, demo_dir):
    frame = pd.read_csv(setup / "test.csv").head(10)
    (setup / "broken.png").write_bytes(b"not an image")
    frame.loc[3, "path"] = str(setup / "broken.png")  # absolute: data_dir / absolute = absolute
    frame.to_csv(setup / "broken.csv", index=False)
    cfg = write_config(setup, demo_dir, "broken.toml", "broken.csv", "broken")
    with pytest.raises(TransfiraError, match=r"row 4: .*broken\.png") as err:
        cli("--config", cfg, "--generate_features", "--aggregate_features")
    assert "\n" not in str(err.value)
    cfg = load_config(write_config(setup, demo_dir, "skip.toml", "broken.csv", "skip", on_bad_image="skip"),
                      TEST_SCHEMA)
    run_test(cfg, generate_features=True, predict_scores=True, aggregate=True, variants=list(VARIANTS))
    out = setup / "skip"
    assert np.isnan(np.load(out / "test_features.npy")[3]).all() and np.isnan(np.load(out / "test_ccs.npy")[3])
    assert pd.read_csv(out / "test_skipped.csv")["row"].tolist() == [4]
    summary = pd.read_csv(out / "templates_baseline_summary.csv").set_index("template_id")
    tid = frame.template_id[3]
    assert summary.loc[tid, "images_usable"] == summary.loc[tid, "images"] - 1
    assert all(np.isfinite(templates(out, name)[1]).all() for name in VARIANTS)


@pytest.mark.parametrize("case", ["missing_column", "length", "checkpoint", "keys", "no_step", "flag"])
def test_bad_input_one_line_errors(setup, demo_dir, case):
    frame = pd.read_csv(setup / "test.csv")
    args = ["--aggregate_features"]
    extra = {}
    if case == "missing_column":
        frame.drop(columns="template_id").to_csv(setup / "nocol.csv", index=False)
        cfg, expect = write_config(setup, demo_dir, "nocol.toml", "nocol.csv", "bad"), "'template_id'"
    elif case == "length":
        np.save(setup / "short.npy", np.zeros((N_IMAGES - 1, 64), np.float32))
        cfg, expect = write_config(setup, demo_dir, outdir="bad"), f"{N_IMAGES - 1} rows"
        args += ["--features_path", setup / "short.npy"]
    elif case in ("checkpoint", "keys"):
        if case == "keys":
            torch.save({"ccs_layer.weight": torch.zeros(1, 64)}, setup / "partial.pt")
        extra = {"checkpoint_path": setup / ("partial.pt" if case == "keys" else "missing.pt")}
        cfg, expect = write_config(setup, demo_dir, "ckpt.toml", outdir="bad", **extra), (
            "missing keys" if case == "keys" else "missing.pt")
        args = ["--predict_scores"]
    elif case == "no_step":
        cfg, expect, args = write_config(setup, demo_dir, outdir="bad"), "nothing to do", []
    else:
        cfg, expect, args = write_config(setup, demo_dir, outdir="bad"), "--use_weight", ["--use_weight"]
    with pytest.raises(TransfiraError) as err:
        cli("--config", cfg, *args)
    message = str(err.value)
    assert "\n" not in message and expect in message, message
    if case == "length":
        assert str(N_IMAGES) in message


QUALITY_TOML = """
[quality]
scores = ["norm", "serfiq", "cr"]
rescale = "minmax"
[quality.serfiq]
m = {m}
[quality.external.ext]
csv = '{csv}'
column = "q"
"""


def quality_config(setup, demo_dir, name, outdir, batch_size, m=8):
    frame = pd.read_csv(setup / "test.csv")
    external = setup / "external.csv"
    if not external.exists():  # another tool's scores, in another row order, with an extra row
        q = np.random.default_rng(5).uniform(-1, 2, len(frame))
        pd.DataFrame({"path": list(frame.path[::-1]) + ["other.png"], "q": list(q[::-1]) + [np.nan]}).to_csv(
            external, index=False)
    path = write_config(setup, demo_dir, name, outdir=outdir, batch_size=batch_size)
    with open(path, "a") as f:
        f.write(QUALITY_TOML.format(csv=external, m=m))
    return path


def test_quality_scores_and_score_templates(setup, demo_dir, capsys):
    """norm, SER-FIQ, CR and an external score in the same pass; test_quality.csv; templates_<score>.npz."""
    from transfira.quality import score_templates

    cfg = load_config(quality_config(setup, demo_dir, "quality.toml", "quality", 7), TEST_SCHEMA)
    written = run_test(cfg, generate_features=True, predict_scores=True, aggregate=True, variants=list(VARIANTS))
    out = setup / "quality"
    table = pd.read_csv(out / "test_quality.csv")
    assert list(table.columns) == ["path", "template_id", "ccs", "ccas", "norm", "serfiq", "cr", "ext"]
    frame = pd.read_csv(setup / "test.csv")
    assert table.path.tolist() == frame.path.tolist() and table.template_id.tolist() == frame.template_id.tolist()
    features = np.load(out / "test_features.npy")
    ccs, ccas, serfiq = (np.load(out / f"test_{s}.npy") for s in ("ccs", "ccas", "serfiq"))
    np.testing.assert_allclose(table.ccs, ccs, rtol=1e-6)
    np.testing.assert_allclose(table.norm, np.linalg.norm(features.astype(np.float64), axis=1), rtol=1e-6)
    np.testing.assert_allclose(table.cr, ccs / (ccs - ccas + 1 + 1e-9), rtol=1e-6)
    np.testing.assert_allclose(table.serfiq, serfiq, rtol=1e-6)
    assert ((serfiq > 0) & (serfiq <= 1)).all() and np.ptp(serfiq) > 1e-3
    external = pd.read_csv(setup / "external.csv").set_index("path").q
    np.testing.assert_allclose(table.ext, external[frame.path].to_numpy())
    if (setup / "out" / "test_features.npy").exists():  # the split encoder gives the plain encoder's features
        np.testing.assert_allclose(features, np.load(setup / "out" / "test_features.npy"), rtol=1e-5, atol=1e-6)
    for name in ("norm", "serfiq", "cr", "ext"):
        assert written[f"templates_{name}.npz"].exists()
        (ids0, vectors0, _), = score_templates(features, frame.template_id.to_numpy(), {name: table[name].to_numpy()},
                                               "minmax").values()
        ids, vectors = templates(out, name)
        np.testing.assert_array_equal(ids, ids0)
        np.testing.assert_allclose(vectors, vectors0, rtol=1e-5, atol=1e-6)
        assert not np.allclose(vectors, templates(out, "baseline")[1], atol=1e-4)  # the weights matter
    # SER-FIQ does not depend on the batch composition; the LFW route computes it in the scoring pass
    capsys.readouterr()
    other = load_config(quality_config(setup, demo_dir, "quality16.toml", "quality16", 16), TEST_SCHEMA)
    run_test(other, generate_features=True)
    assert "test_quality.csv not written" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(setup / "quality16" / "test_serfiq.npy"), serfiq, rtol=1e-6)
    np.save(setup / "quality16" / "features_copy.npy", features)
    (setup / "quality16" / "test_serfiq.npy").unlink()
    cli("--config", setup / "quality16.toml", "--predict_scores", "--aggregate_features",
        "--features_path", setup / "quality16" / "features_copy.npy")
    np.testing.assert_allclose(np.load(setup / "quality16" / "test_serfiq.npy"), serfiq, rtol=1e-6)
    # batch 16 vs 64 runs other conv kernels: predictions up to ~6 agree to ~3e-6 absolute
    pd.testing.assert_frame_equal(pd.read_csv(setup / "quality16" / "test_quality.csv"), table, rtol=1e-5, atol=1e-5)
    # aggregation alone reads test_serfiq.npy; without it, the error says how to make it
    (setup / "quality16" / "test_serfiq.npy").unlink()
    with pytest.raises(TransfiraError, match=r"SER-FIQ scores file not found: .*test_serfiq\.npy"):
        run_test(other, aggregate=True)


def test_serfiq_pass_resumes(setup, demo_dir, monkeypatch):
    """An interrupted pass resumes with the same SER-FIQ scores; with another m it starts over."""
    from transfira import features as feat
    from transfira import quality

    if not (setup / "quality" / "test_serfiq.npy").exists():
        pytest.skip("needs test_quality_scores_and_score_templates")
    monkeypatch.setattr(feat, "FLUSH_EVERY", 1)
    real, calls = quality.SerFiq.scores, {"n": 0}

    def crashing(self, x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(quality.SerFiq, "scores", crashing)
    batches = -(-N_IMAGES // 7)
    for m, expected_calls in ((8, batches - 3), (9, batches)):  # m = 9: the interrupted m = 8 run is not reused
        calls["n"] = 0
        cfg = load_config(quality_config(setup, demo_dir, "resume.toml", "resume", 7, m=8), TEST_SCHEMA)
        with pytest.raises(KeyboardInterrupt):
            run_test(cfg, generate_features=True)
        assert (setup / "resume" / "test_features.partial.json").exists()
        calls["n"] = -1000
        cfg = load_config(quality_config(setup, demo_dir, "resume.toml", "resume", 7, m=m), TEST_SCHEMA)
        run_test(cfg, generate_features=True)
        assert calls["n"] + 1000 == expected_calls
        if m == 8:  # resumed: the scores and features of the uninterrupted one-pass run
            for name in ("test_serfiq.npy", "test_features.npy"):
                np.testing.assert_allclose(np.load(setup / "resume" / name), np.load(setup / "quality" / name),
                                           rtol=1e-6, atol=1e-7)
