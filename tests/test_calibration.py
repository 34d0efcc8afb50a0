"""Sigmoid calibration (section IV-E): agreement with scikit-learn, JSON round trip, errors, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss
from sklearn.model_selection import StratifiedKFold

from transfira.calibration import (
    apply_calibrator, brier_score, calibrate_labels, calibration_metrics,
    export_calibrator, fit_calibrator, load_calibrator, save_calibrator, stack_scores,
)
from transfira.jobs.calibrate import PLOT_FILES
from transfira.errors import TransfiraError

ROOT = Path(__file__).resolve().parents[1]


def scores(n: int = 400, ccs=(0.6, 0.15), nnccs=(0.35, 0.12), seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(*ccs, n), rng.normal(*nnccs, n)


def labels_csv(path: Path, n: int = 300, **kw) -> Path:
    ccs, nnccs = scores(n, **kw)
    pd.DataFrame({"path": [f"{i}.jpg" for i in range(n)], "ccs": ccs, "nnccs": nnccs}).to_csv(
        path, index=False)
    return path


@pytest.mark.parametrize("seed", [None, 3])
def test_matches_sklearn_on_fit_and_fresh_data(seed):
    ccs, nnccs = scores()
    x, y = stack_scores(ccs, nnccs)
    cv = 5 if seed is None else StratifiedKFold(5, shuffle=True, random_state=seed)
    ref = CalibratedClassifierCV(LogisticRegression(), method="sigmoid", cv=cv).fit(x[:, None], y)
    params = fit_calibrator(ccs, nnccs, seed=seed)
    assert params == export_calibrator(ref, seed)
    assert len(params["folds"]) == 5
    fresh = np.random.default_rng(1).uniform(-1.5, 2.0, 1000)
    for data in (x, fresh):
        np.testing.assert_allclose(apply_calibrator(params, data),
                                   ref.predict_proba(data[:, None])[:, 1], rtol=0, atol=1e-9)
    probs = apply_calibrator(params, x)
    assert brier_score(probs, y) == pytest.approx(brier_score_loss(y, probs), abs=1e-12)


def test_json_round_trip(tmp_path):
    params = fit_calibrator(*scores())
    save_calibrator(params, tmp_path / "cal.json")
    loaded = load_calibrator(tmp_path / "cal.json")
    assert loaded == params
    x = np.linspace(-1, 1, 101)
    assert np.array_equal(apply_calibrator(loaded, x), apply_calibrator(params, x))


def test_calibrate_labels_appends_columns_in_order():
    ccs, nnccs = scores(50)
    frame = pd.DataFrame({"path": list("abcdefghij") * 5, "ccs": ccs, "nnccs": nnccs})
    out = calibrate_labels(frame, fit_calibrator(ccs, nnccs))
    assert list(out.columns) == ["path", "ccs", "nnccs", "cal_ccs", "cal_nnccs", "cal_ccas"]
    assert out["path"].tolist() == frame["path"].tolist()
    np.testing.assert_array_equal(out["cal_ccas"], out["cal_ccs"] - out["cal_nnccs"])
    # CCS only (e.g. a test CSV): calibrated CCS, no CCAS, no Brier score
    only = calibrate_labels(frame[["path", "ccs"]], fit_calibrator(ccs, nnccs))
    assert "cal_ccs" in only and "cal_ccas" not in only
    assert "brier" not in calibration_metrics(only)


def test_saturated_body_like_scores_calibrate():
    """Body recognition: raw mean ~0.97, variance ~3.7e-5; calibrated mean ~0.5."""
    ccs, nnccs = scores(2000, ccs=(0.972, 0.006), nnccs=(0.966, 0.006))
    frame = calibrate_labels(pd.DataFrame({"ccs": ccs, "nnccs": nnccs}),
                             fit_calibrator(ccs, nnccs))
    m = calibration_metrics(frame)
    assert m["raw_all_mean"] == pytest.approx(0.969, abs=0.005) and m["raw_all_var"] < 1e-4
    assert m["cal_all_mean"] == pytest.approx(0.5, abs=0.02)
    assert m["cal_all_var"] > 0.02
    assert m["cal_ccs_mean"] > m["cal_nnccs_mean"]
    assert 0 < m["brier"] < 0.25


@pytest.mark.parametrize("ccs, nnccs, message", [
    (np.full(20, 0.97), np.full(20, 0.97), "calibration is undefined"),
    (np.r_[np.ones(19) * 0.97, 0.97 + 1e-15], np.full(20, 0.97), "calibration is undefined"),
    (np.array([0.9, 0.8, 0.7]), np.array([0.1, 0.2, 0.3]), "too few rows for 5-fold"),
])
def test_bad_fit_data(ccs, nnccs, message):
    with pytest.raises(TransfiraError, match=message):
        fit_calibrator(ccs, nnccs)


def test_bad_frames():
    params = fit_calibrator(*scores())
    with pytest.raises(TransfiraError, match=r"missing column 'ccs' \(present: path, x\)"):
        calibrate_labels(pd.DataFrame({"path": ["a"], "x": [1.0]}), params)
    frame = pd.DataFrame({"ccs": [0.5, np.nan, 0.4, np.inf, "oops"], "nnccs": [0.1] * 5})
    with pytest.raises(TransfiraError, match=r"column 'ccs' has 3 .*rows 2, 4, 5"):
        calibrate_labels(frame, params)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": "transfira.sigmoid_calibrator"}', "missing field 'folds'"),
    ('{"format": "transfira.sigmoid_calibrator", "folds": [{"coef": 1, "intercept": 0, "a": -1}]}',
     r"missing field 'folds\[0\].b'"),
    ('{"format": "transfira.sigmoid_calibrator", "folds": [{"coef": "x", "intercept": 0, '
     '"a": -1, "b": 0}]}', "not a finite number"),
])
def test_malformed_json(tmp_path, text, message):
    path = tmp_path / "cal.json"
    path.write_text(text)
    with pytest.raises(TransfiraError, match=message) as err:
        load_calibrator(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "calibrate.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_fit_then_apply(tmp_path):
    train = labels_csv(tmp_path / "train.csv")
    val = labels_csv(tmp_path / "val.csv", n=80, seed=5)
    fit = run_script("--csv", train, "--outdir", tmp_path / "fit")
    assert fit.returncode == 0, fit.stderr
    assert "Brier score:" in fit.stdout
    out = tmp_path / "fit"
    for name in ("calibrated_labels.csv", "calibration_metrics.json", "calibrator.json", *PLOT_FILES):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.tmp-*"))
    metrics = json.loads((out / "calibration_metrics.json").read_text())
    frame = pd.read_csv(out / "calibrated_labels.csv")
    probs, y = stack_scores(frame["cal_ccs"], frame["cal_nnccs"])
    assert metrics["brier"] == pytest.approx(brier_score(probs, y))

    applied = run_script("--csv", val, "--outdir", tmp_path / "val", "--model",
                         out / "calibrator.json", "--no-plots")
    assert applied.returncode == 0, applied.stderr
    result = pd.read_csv(tmp_path / "val" / "calibrated_labels.csv")
    expected = apply_calibrator(load_calibrator(out / "calibrator.json"), result["ccs"])
    np.testing.assert_allclose(result["cal_ccs"], expected, atol=1e-12)
    assert not (tmp_path / "val" / "calibrator.json").exists()
    assert not (tmp_path / "val" / PLOT_FILES[0]).exists()


def test_cli_bad_input_is_one_line(tmp_path):
    pd.DataFrame({"path": ["a"] * 10, "ccs": [0.97] * 10}).to_csv(tmp_path / "bad.csv", index=False)
    result = run_script("--csv", tmp_path / "bad.csv", "--outdir", tmp_path / "out", "--no-plots")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "'nnccs'" in lines[0]
    assert not (tmp_path / "out").exists()
    missing = run_script("--csv", tmp_path / "nope.csv", "--outdir", tmp_path / "out")
    assert missing.returncode == 2 and "CSV file not found" in missing.stderr
    (tmp_path / "empty.csv").write_text("path,ccs,nnccs\n")
    empty = run_script("--csv", tmp_path / "empty.csv", "--outdir", tmp_path / "out")
    assert empty.returncode == 2 and "no rows" in empty.stderr
