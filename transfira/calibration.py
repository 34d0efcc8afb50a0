"""Sigmoid (Platt) calibration of CCS / NNCCS (paper section IV-E).

Encoders whose similarities saturate (body recognition: raw mean 0.97, variance 3.69e-5)
give CCS and NNCCS values that are hard to threshold or compare. A calibrator is fitted on
X = [CCS ; NNCCS] with y = [1 ... ; 0 ...] using scikit-learn's
``CalibratedClassifierCV(LogisticRegression(), method="sigmoid", cv=5)``; the paper reports a
calibrated mean 0.50, variance 0.09 and Brier score 0.1564.

The fitted ensemble is stored as plain JSON parameters (no pickle). For each CV fold k with
logistic regression ``f_k(x) = coef_k * x + intercept_k`` and Platt parameters ``a_k, b_k``:

    p(x) = mean_k expit(-(a_k * f_k(x) + b_k))

which is exactly ``CalibratedClassifierCV.predict_proba(X)[:, 1]`` for binary targets.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from scipy.special import expit

from .errors import TransfiraError
from .io import numeric_column, save_json

FORMAT = "transfira.sigmoid_calibrator"
FOLD_FIELDS = ("coef", "intercept", "a", "b")
SCORE_COLUMNS = ("ccs", "nnccs")


# ----------------------------------------------------------------------------- inputs
def read_scores(frame: pd.DataFrame, column: str, source: str = "CSV") -> np.ndarray:
    """Column ``column`` of ``frame`` as finite float64, or a one-line :class:`TransfiraError`."""
    if column not in frame.columns:
        raise TransfiraError(
            f"{source}: missing column '{column}' (present: {', '.join(map(str, frame.columns))})"
        )
    values, bad = numeric_column(frame, column)
    if bad.size:
        rows = ", ".join(str(i + 1) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise TransfiraError(
            f"{source}: column '{column}' has {bad.size} non-numeric/NaN/inf value(s), "
            f"data rows {rows} (1-based, header excluded)"
        )
    return values


def stack_scores(ccs: np.ndarray, nnccs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The paper's calibration set: X = [CCS ; NNCCS] as one feature, y = [1 ... ; 0 ...]."""
    ccs, nnccs = np.asarray(ccs, np.float64).ravel(), np.asarray(nnccs, np.float64).ravel()
    x = np.concatenate([ccs, nnccs])
    y = np.concatenate([np.ones(ccs.size), np.zeros(nnccs.size)])
    return x, y


def _check_fit_data(ccs: np.ndarray, nnccs: np.ndarray, folds: int) -> None:
    """Reject data on which a 5-fold sigmoid calibration is undefined."""
    if folds < 2:
        raise TransfiraError(f"need at least 2 cross-validation folds, got {folds}")
    n = min(len(ccs), len(nnccs))
    if n < folds:
        raise TransfiraError(
            f"too few rows for {folds}-fold calibration: {n} (need at least {folds})"
        )
    x, _ = stack_scores(ccs, nnccs)
    if not np.all(np.isfinite(x)):
        raise TransfiraError("CCS/NNCCS contain NaN or inf values")
    if np.unique(x).size < 2 or x.std() < 1e-12:
        raise TransfiraError(
            f"CCS and NNCCS values are (near) constant (all ~{x.mean():.6g}, std {x.std():.3g}): "
            "calibration is undefined"
        )


# ----------------------------------------------------------------------------- fit / apply
def fit_sklearn_calibrator(ccs: np.ndarray, nnccs: np.ndarray, folds: int = 5,
                           seed: int | None = None):
    """Fit ``CalibratedClassifierCV(LogisticRegression(), method="sigmoid")`` (section IV-E).

    ``seed=None`` uses ``cv=folds`` (unshuffled stratified folds, as the reference); an
    integer seed shuffles the folds reproducibly.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    _check_fit_data(ccs, nnccs, folds)
    x, y = stack_scores(ccs, nnccs)
    cv = folds if seed is None else StratifiedKFold(folds, shuffle=True, random_state=seed)
    model = CalibratedClassifierCV(LogisticRegression(), method="sigmoid", cv=cv)
    return model.fit(x[:, None], y)


def export_calibrator(model, seed: int | None = None) -> dict[str, Any]:
    """JSON-ready parameters of a fitted binary sigmoid ``CalibratedClassifierCV``."""
    import sklearn

    folds = []
    for pair in model.calibrated_classifiers_:
        (cal,) = pair.calibrators
        est = pair.estimator
        folds.append({"coef": float(est.coef_.ravel()[0]), "intercept": float(est.intercept_[0]),
                      "a": float(cal.a_), "b": float(cal.b_)})
    return {"format": FORMAT, "method": "sigmoid", "classes": [float(c) for c in model.classes_],
            "sklearn_version": sklearn.__version__, "seed": seed, "folds": folds}


def fit_calibrator(ccs: np.ndarray, nnccs: np.ndarray, folds: int = 5,
                   seed: int | None = None) -> dict[str, Any]:
    """Fit the section IV-E calibrator and return its JSON-ready parameters."""
    return export_calibrator(fit_sklearn_calibrator(ccs, nnccs, folds, seed), seed)


def validate_calibrator(params: Any, source: str = "calibrator") -> dict[str, Any]:
    """Check a parameter dict (e.g. loaded JSON); raise a one-line error naming what is missing."""
    if not isinstance(params, Mapping):
        raise TransfiraError(f"{source}: expected a JSON object, got {type(params).__name__}")
    for key in ("format", "folds"):
        if key not in params:
            raise TransfiraError(f"{source}: missing field '{key}'")
    if params["format"] != FORMAT:
        raise TransfiraError(f"{source}: field 'format' is {params['format']!r}, expected {FORMAT!r}")
    folds = params["folds"]
    if not isinstance(folds, list) or not folds:
        raise TransfiraError(f"{source}: field 'folds' must be a non-empty list")
    for k, fold in enumerate(folds):
        for key in FOLD_FIELDS:
            value = fold.get(key) if isinstance(fold, Mapping) else None
            if value is None:
                raise TransfiraError(f"{source}: missing field 'folds[{k}].{key}'")
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not np.isfinite(value):
                raise TransfiraError(f"{source}: field 'folds[{k}].{key}' is not a finite number")
    return dict(params)


def apply_calibrator(params: Mapping[str, Any], scores: np.ndarray) -> np.ndarray:
    """Calibrated probabilities, float64: ``mean_k expit(-(a_k (coef_k x + intercept_k) + b_k))``."""
    x = np.asarray(scores, dtype=np.float64).ravel()
    coef, intercept, a, b = (np.array([f[key] for f in params["folds"]], dtype=np.float64)
                             for key in FOLD_FIELDS)
    decision = x[:, None] * coef + intercept          # each fold's LogisticRegression
    probs = expit(-(a * decision + b))                # each fold's _SigmoidCalibration
    return probs.mean(axis=1)


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared error of probabilities against 0/1 labels."""
    return float(np.mean((np.asarray(probs, np.float64) - np.asarray(labels, np.float64)) ** 2))


def save_calibrator(params: Mapping[str, Any], path: str | Path) -> None:
    """Write calibrator parameters as JSON (atomically; floats round-trip exactly)."""
    save_json(path, params)


def load_calibrator(path: str | Path) -> dict[str, Any]:
    """Read and validate a calibrator JSON written by :func:`save_calibrator`."""
    path = Path(path)
    if not path.is_file():
        raise TransfiraError(f"calibrator file not found: {path}")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TransfiraError(f"{path}: not valid JSON ({err})") from None
    return validate_calibrator(params, str(path))


# ----------------------------------------------------------------------------- frames
def calibrate_labels(frame: pd.DataFrame, params: Mapping[str, Any],
                     source: str = "CSV") -> pd.DataFrame:
    """Append ``cal_ccs``, ``cal_nnccs`` and ``cal_ccas = cal_ccs - cal_nnccs`` (rows kept).

    Columns absent from ``frame`` are skipped (``cal_ccas`` needs both); at least one of
    ``ccs``/``nnccs`` must be present.
    """
    present = [c for c in SCORE_COLUMNS if c in frame.columns]
    if not present:
        read_scores(frame, SCORE_COLUMNS[0], source)  # raises: names the present columns
    out = frame.copy()
    for column in present:
        out[f"cal_{column}"] = apply_calibrator(params, read_scores(frame, column, source))
    if len(present) == len(SCORE_COLUMNS):
        out["cal_ccas"] = out["cal_ccs"] - out["cal_nnccs"]
    return out


def calibration_metrics(frame: pd.DataFrame) -> dict[str, Any]:
    """Means/variances of raw and calibrated scores; Brier score when CCS and NNCCS are both there."""
    metrics: dict[str, Any] = {"n_rows": int(len(frame))}
    for prefix in ("", "cal_"):
        kind = "cal" if prefix else "raw"
        cols = [prefix + c for c in SCORE_COLUMNS if prefix + c in frame.columns]
        for col in cols:
            values = frame[col].to_numpy(np.float64)
            name = col.removeprefix(prefix)
            metrics[f"{kind}_{name}_mean"], metrics[f"{kind}_{name}_var"] = \
                float(values.mean()), float(values.var())
        if len(cols) == 2:
            both = frame[cols].to_numpy(np.float64).ravel()
            metrics[f"{kind}_all_mean"], metrics[f"{kind}_all_var"] = \
                float(both.mean()), float(both.var())
    if {"cal_ccs", "cal_nnccs"} <= set(frame.columns):
        probs, labels = stack_scores(frame["cal_ccs"], frame["cal_nnccs"])
        metrics["brier"] = brier_score(probs, labels)
    return metrics
