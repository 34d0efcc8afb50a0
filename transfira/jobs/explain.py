"""explain.py's job: encoder-grounded explainability of recognizability (the paper's third contribution).

* **Degradation sweeps**: every selected image is degraded at every severity of every named
  degradation (:mod:`transfira.degradations`); one batched pass through the deployed encoder
  and the predictor gives each copy's embedding and predicted CCS / CCAS, and the true CCS,
  NNCCS, CCAS (eq. 4-6) come from :func:`transfira.labels.center_similarities` against
  generate.py's class centers. Severity 0 is the undegraded image: its labels are generate.py's.
* **Crossings**: the severity at which the mean true (and predicted) CCAS falls below 0,
  the point where the encoder stops telling the subject from the nearest other identity.
* **Subject-level factors**: per identity, mean / min true CCS, the share of images with
  CCAS > 0 and the "confuser", the non-match identity most often behind NNCCS.

Attribution maps are :mod:`transfira.attribution`, figures :mod:`transfira.explain_plots`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import REQUIRED
from ..data import AUG_DEFAULTS, ImageDataset, dataset_from_table, read_annotations
from ..degradations import DEGRADATIONS, degrade
from ..errors import TransfiraError
from ..features import extract_outputs
from ..networks import encoder_and_predictor
from ..io import atomic_path, file_fingerprint, load_id_vectors, save_csv
from ..labels import center_similarities, class_index, nearest_nonmatch
from ..progress import log

ATTRIBUTION_SCHEMA: dict[str, Any] = {
    "num_images": 6,  # images in the attribution grid (0: none), spread over the range of true CCAS
    "ig_steps": 32,  # integrated-gradients interpolation steps (one batch each)
    "baseline_sigma": 8.0,  # Gaussian blur (pixels) of the integrated-gradients baseline and the occluder
    "patch": 16,  # occlusion patch side (pixels)
    "stride": 8,  # occlusion patch step (pixels)
    "batch_size": 32,  # images per forward/backward pass
}

SCHEMA: dict[str, Any] = {
    "backbone_type": "onnx",
    "model_path": REQUIRED,  # the deployed encoder (true labels)
    "predictor_model_path": "",  # ONNX architecture of the predictor's backbone ('' = model_path)
    "embedding_size": REQUIRED,
    "checkpoint_path": REQUIRED,  # the trained predictor (state dict)
    "head_hidden": 0,  # as in train.py
    "centers_path": REQUIRED,  # generate.py's {split}_centers.npz
    "outdir": REQUIRED,
    "degradations": REQUIRED,  # names in transfira.degradations.DEGRADATIONS
    "severities": REQUIRED,  # in [0, 1], including 0
    "batch_size": 64,
    "num_workers": 0,
    "device": "auto",
    "seed": 0,  # image sample and degradation draws
    "max_identities": 0,  # use the rows of at most this many identities (0: all), drawn with seed
    "max_images": 0,  # images swept, drawn from the used rows (0: all); subjects.csv covers every used row
    "leave_one_out": False,  # as generate.py: the own center without the (undegraded) image
    "normalize_centers": False,  # as generate.py (with leave_one_out)
    "chunk_size": 0,  # rows per similarity block (0: automatic)
    "allow_pickle": False,  # read a legacy pickled centers file
    "aug": dict(AUG_DEFAULTS),
    "data": {"data_dir": REQUIRED, "annotations": REQUIRED, "path_col_name": "path", "label_col_name": "subject_id",
             "landmark_columns": [],
             "select_col_name": "",  # sweep only rows whose value in this column ...
             "select_values": []},  # ... is one of these (as text), e.g. degradation = ['none']
    "attribution": ATTRIBUTION_SCHEMA,
}
SWEEP_COLUMNS = ["path", "subject_id", "degradation", "severity", "ccs", "nnccs", "ccas", "pred_ccs", "pred_ccas"]
CLEAN = "none"


def check_config(cfg: dict[str, Any]) -> tuple[list[str], list[float]]:
    """The degradation names and the sorted severities (0 first); one-line errors naming the key."""
    kinds = cfg["degradations"]
    if isinstance(kinds, str) or not isinstance(kinds, list) or not kinds:
        raise TransfiraError("degradations must be a non-empty list of names, e.g. ['blur', 'noise']")
    unknown = [k for k in kinds if k not in DEGRADATIONS]
    if unknown:
        raise TransfiraError(f"degradations: unknown name(s) {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(DEGRADATIONS)})")
    if len(set(kinds)) != len(kinds):
        raise TransfiraError("degradations: a name is listed twice")
    levels = cfg["severities"]
    if not isinstance(levels, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in levels):
        raise TransfiraError("severities must be a list of numbers in [0, 1], e.g. [0, 0.25, 0.5, 1]")
    if any(not 0 <= s <= 1 for s in levels):
        raise TransfiraError(f"severities must lie in [0, 1], got {levels}")
    if 0 not in levels:
        raise TransfiraError("severities must include 0 (the undegraded image)")
    if len(set(levels)) != len(levels):
        raise TransfiraError(f"severities: a value is listed twice in {levels}")
    for key in ("batch_size", "max_images", "max_identities"):
        if not isinstance(cfg[key], int) or cfg[key] < (1 if key == "batch_size" else 0):
            raise TransfiraError(f"{key} must be an integer >= {1 if key == 'batch_size' else 0}, got {cfg[key]!r}")
    return list(kinds), sorted(float(s) for s in levels)


def image_seed(seed: int, path: str) -> int:
    """The degradation seed of one image: the same random draws at every severity (nested damage)."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{path}".encode()).digest()[:4], "little")


def select_rows(frame: pd.DataFrame, data: dict[str, Any], max_identities: int, max_images: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(used, swept)`` CSV positions (in CSV order). Used rows pass ``select_col_name`` / ``select_values``
    and belong to at most ``max_identities`` identities drawn with ``seed``; they are embedded undegraded
    (subjects.csv). Swept rows are at most ``max_images`` of them, drawn with ``seed``."""
    rows = np.arange(len(frame))
    rng = np.random.default_rng(seed)
    if max_identities:
        labels = frame[data["label_col_name"]].astype(str).to_numpy()
        names = pd.unique(labels)
        if len(names) > max_identities:
            rows = rows[np.isin(labels, rng.choice(names, max_identities, replace=False))]
    column = data["select_col_name"]
    if column:
        if column not in frame.columns:
            raise TransfiraError(f"{data['annotations']}: no column '{column}' (select_col_name); "
                                 f"columns present: {', '.join(map(str, frame.columns))}")
        rows = rows[frame[column].astype(str).iloc[rows].isin([str(v) for v in data["select_values"]]).to_numpy()]
        if not len(rows):
            raise TransfiraError(f"{data['annotations']}: no row has {column} in {data['select_values']}")
    swept = np.sort(rng.choice(rows, max_images, replace=False)) if 0 < max_images < len(rows) else rows
    return rows, swept


def sweep_plan(used: np.ndarray, swept: np.ndarray, kinds: list[str], severities: list[float]) -> pd.DataFrame:
    """The images to embed: every used row once undegraded, then each swept row at each kind and severity > 0.

    Columns ``source`` (CSV position), ``degradation``, ``severity``; the first ``len(used)`` rows
    are the undegraded images (shared by every degradation's severity 0).
    """
    levels = [s for s in severities if s > 0]
    clean = pd.DataFrame({"source": used, "degradation": CLEAN, "severity": 0.0})
    grid = pd.DataFrame({"source": np.repeat(swept, len(kinds) * len(levels)),
                         "degradation": np.tile(np.repeat(kinds, len(levels)), len(swept)),
                         "severity": np.tile(levels, len(swept) * len(kinds))})
    return pd.concat([clean, grid], ignore_index=True)


class DegradedDataset(ImageDataset):
    """The images of ``base`` at the rows of a :func:`sweep_plan`, each degraded before the transform."""

    def __init__(self, base: ImageDataset, plan: pd.DataFrame, seed: int):
        source = plan["source"].to_numpy()
        super().__init__(base.data_dir, [base.paths[i] for i in source], base.transform,
                         landmarks=None if base.landmarks is None else base.landmarks[source],
                         align_size=base.align_size)
        self.kinds = plan["degradation"].tolist()
        self.levels = plan["severity"].to_numpy(np.float64)
        self.seeds = [image_seed(seed, p) for p in self.paths]

    def load(self, index: int):
        return degrade(super().load(index), self.kinds[index], float(self.levels[index]), self.seeds[index])


def true_labels(features: np.ndarray, ids: np.ndarray, center_ids: np.ndarray, centers: np.ndarray,
                clean_rows: np.ndarray, counts: np.ndarray | None, cfg: dict[str, Any], device,
                block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """CCS, NNCCS of every embedded copy (eq. 4-5); with ``leave_one_out`` the own center leaves out the
    undegraded embedding ``features[clean_rows]`` of the photo the copy was made from."""
    ccs = np.empty(len(features), np.float32)
    nnccs = np.empty(len(features), np.float32)
    for start in range(0, len(features), block):
        part = slice(start, start + block)
        exclude = np.asarray(features[clean_rows[part]]) if cfg["leave_one_out"] else None
        ccs[part], nnccs[part] = center_similarities(
            features[part], ids[part], center_ids, centers, leave_one_out=cfg["leave_one_out"], counts=counts,
            normalize=cfg["normalize_centers"], chunk_size=cfg["chunk_size"] or None, device=device, exclude=exclude)
    return ccs, nnccs


def summarize(sweeps: pd.DataFrame) -> pd.DataFrame:
    """Per degradation and severity: n, mean, 25 % and 75 % quantiles of the true and predicted scores."""
    groups = sweeps.groupby(["degradation", "severity"], sort=False)
    parts = {"n": groups["ccas"].size()}
    for col in ("ccs", "ccas", "pred_ccs", "pred_ccas", "nnccs"):
        parts[f"{col}_mean"] = groups[col].mean()
        parts[f"{col}_q25"] = groups[col].quantile(0.25)
        parts[f"{col}_q75"] = groups[col].quantile(0.75)
    parts["ccas_pos"] = groups["ccas"].apply(lambda v: float((v > 0).mean()))
    return pd.DataFrame(parts).reset_index()


def zero_crossing(severities: np.ndarray, means: np.ndarray) -> float:
    """First severity at which ``means`` drops below 0, linearly interpolated between the two
    severities around it; 0 when already below at the first severity, NaN when never reached."""
    severities, means = np.asarray(severities, np.float64), np.asarray(means, np.float64)
    order = np.argsort(severities)
    severities, means = severities[order], means[order]
    below = np.flatnonzero(means < 0)
    if not len(below):
        return float("nan")
    k = below[0]
    if k == 0:
        return float(severities[0])
    s0, s1, m0, m1 = severities[k - 1], severities[k], means[k - 1], means[k]
    return float(s0 + (s1 - s0) * m0 / (m0 - m1))


def crossings(summary: pd.DataFrame) -> pd.DataFrame:
    """Per degradation: the severity where mean true CCAS and mean predicted CCAS cross 0, and both at the
    highest severity."""
    rows = []
    for kind, part in summary.groupby("degradation", sort=False):
        part = part.sort_values("severity")
        rows.append({"degradation": kind,
                     "true_ccas_crossing": zero_crossing(part["severity"], part["ccas_mean"]),
                     "pred_ccas_crossing": zero_crossing(part["severity"], part["pred_ccas_mean"]),
                     "true_ccas_at_max": float(part["ccas_mean"].iloc[-1]),
                     "pred_ccas_at_max": float(part["pred_ccas_mean"].iloc[-1])})
    return pd.DataFrame(rows)


def crossings_markdown(table: pd.DataFrame, n_images: int) -> str:
    """The crossings as a markdown table ("not reached" for NaN)."""
    show = lambda v: "not reached" if np.isnan(v) else f"{v:.3f}"  # noqa: E731
    lines = [f"Severity at which the mean CCAS of {n_images} images falls below 0 (linear interpolation "
             "between the swept severities; 0 = already below undegraded).", "",
             "| degradation | true CCAS crosses 0 | predicted CCAS crosses 0 | mean true CCAS at max | "
             "mean predicted CCAS at max |", "|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.degradation} | {show(r.true_ccas_crossing)} | {show(r.pred_ccas_crossing)} | "
                     f"{r.true_ccas_at_max:.3f} | {r.pred_ccas_at_max:.3f} |")
    return "\n".join(lines) + "\n"


def subject_factors(ids: np.ndarray, ccs: np.ndarray, nnccs: np.ndarray, confuser: np.ndarray,
                    pred_ccas: np.ndarray) -> pd.DataFrame:
    """Per identity: images, mean / min true CCS, mean CCAS, share with CCAS > 0, mean predicted CCAS and the
    confuser (most frequent nearest non-match identity, ties to the first in ``confuser`` order) with the share
    of the identity's images it is nearest for. Sorted least recognizable first (mean CCAS, then share > 0)."""
    frame = pd.DataFrame({"subject_id": ids, "ccs": ccs, "ccas": ccs - nnccs, "pos": (ccs - nnccs) > 0,
                          "pred_ccas": pred_ccas, "confuser": confuser})
    groups = frame.groupby("subject_id", sort=False)
    out = pd.DataFrame({"images": groups.size(), "mean_ccs": groups["ccs"].mean(), "min_ccs": groups["ccs"].min(),
                        "mean_ccas": groups["ccas"].mean(), "frac_ccas_pos": groups["pos"].mean(),
                        "mean_pred_ccas": groups["pred_ccas"].mean()})
    counts = frame.groupby(["subject_id", "confuser"], sort=False).size().rename("k").reset_index()
    counts = counts.sort_values(["subject_id", "k"], ascending=[True, False], kind="stable")
    top = counts.drop_duplicates("subject_id").set_index("subject_id")
    out["confuser"] = top["confuser"]
    out["confuser_share"] = top["k"] / out["images"]
    out = out.reset_index().sort_values(["mean_ccas", "frac_ccas_pos"], kind="stable")
    return out.reset_index(drop=True)


def run(cfg: dict[str, Any]) -> dict[str, Path]:
    """Sweeps, crossings, subjects, attribution maps and figures in ``outdir``; returns the files written."""
    from ..attribution import run_attribution
    from ..backbone import resolve_device
    from ..explain_plots import plot_subjects, plot_sweeps

    kinds, severities = check_config(cfg)
    data, outdir = cfg["data"], Path(cfg["outdir"])
    outdir.mkdir(parents=True, exist_ok=True)
    path_col, label_col = data["path_col_name"], data["label_col_name"]
    frame = read_annotations(data["annotations"], [path_col, label_col])
    ids = frame[label_col].to_numpy()
    ids = ids.astype(str) if ids.dtype == object else ids
    center_ids, centers = load_id_vectors(cfg["centers_path"], cfg["allow_pickle"])
    if centers.shape[1] != cfg["embedding_size"]:
        raise TransfiraError(f"{cfg['centers_path']}: centers are {centers.shape[1]}-D but embedding_size = "
                             f"{cfg['embedding_size']}")
    try:
        own = class_index(ids, center_ids)
    except TransfiraError as err:
        raise TransfiraError(f"{data['annotations']} vs {cfg['centers_path']}: {err}") from None
    counts = np.bincount(own, minlength=len(center_ids)) if cfg["leave_one_out"] else None
    used, swept = select_rows(frame, data, cfg["max_identities"], cfg["max_images"], cfg["seed"])
    plan = sweep_plan(used, swept, kinds, severities)
    clean_row = np.full(len(frame), -1)
    clean_row[used] = np.arange(len(used))  # plan row of each used image's undegraded pass
    device = resolve_device(cfg["device"])
    model, predictor = encoder_and_predictor(cfg, device)
    base = dataset_from_table(frame, data, cfg["aug"], data["annotations"])
    dataset = DegradedDataset(base, plan, cfg["seed"])
    log(f"explain: {len(used)} images, {len(swept)} swept x {len(kinds)} degradations x "
        f"{len(severities) - 1} severities > 0 = {len(plan)} forward passes")
    arrays, _ = extract_outputs(
        model, dataset, {"embedding": (outdir / "sweep_features.npy", cfg["embedding_size"]),
                         "predicted CCS": (outdir / "sweep_pred_ccs.npy", 0),
                         "predicted CCAS": (outdir / "sweep_pred_ccas.npy", 0)},
        cfg["batch_size"], cfg["num_workers"], device, desc="explain sweeps",
        fingerprint=[file_fingerprint(cfg[k]) for k in ("model_path", "predictor_model_path", "checkpoint_path")]
        + [cfg["aug"], data["landmark_columns"], cfg["seed"],
           hashlib.sha1(plan.to_csv(index=False).encode()).hexdigest()])
    features = arrays["embedding"]
    source = plan["source"].to_numpy()
    ccs, nnccs = true_labels(features, ids[source], center_ids, centers, clean_row[source], counts, cfg, device)
    pred_ccs, pred_ccas = np.asarray(arrays["predicted CCS"]), np.asarray(arrays["predicted CCAS"])

    sweeps = sweep_table(frame, path_col, label_col, plan, clean_row[swept], kinds, ccs, nnccs, pred_ccs, pred_ccas)
    written = {"sweeps.csv": outdir / "sweeps.csv"}
    save_csv(sweeps, written["sweeps.csv"])
    summary = summarize(sweeps)
    save_csv(summary, outdir / "sweeps_summary.csv")
    table = crossings(summary)
    save_csv(table, outdir / "crossings.csv")
    with atomic_path(outdir / "crossings.md") as tmp:
        tmp.write_text(crossings_markdown(table, len(swept)))
    written.update({k: outdir / k for k in ("sweeps_summary.csv", "crossings.csv", "crossings.md")})
    written.update(plot_sweeps(summary, outdir))

    n = len(used)
    confuser = center_ids[nearest_nonmatch(features[:n], ids[used], center_ids, centers, cfg["chunk_size"] or None,
                                           device)]
    subjects = subject_factors(ids[used], ccs[:n], nnccs[:n], confuser, pred_ccas[:n])
    written["subjects.csv"] = outdir / "subjects.csv"
    save_csv(subjects, written["subjects.csv"])
    written.update(plot_subjects(subjects, outdir))

    if cfg["attribution"]["num_images"] > 0:
        written.update(run_attribution(predictor, base, swept, ccs[clean_row[swept]] - nnccs[clean_row[swept]],
                                       cfg["attribution"], cfg["aug"], outdir, device))
    print(crossings_markdown(table, len(swept)))
    print(f"subjects: {len(subjects)} identities, CCAS > 0 for {np.mean(ccs[:n] > nnccs[:n]):.1%} of the images; "
          f"outputs in {outdir}")
    return written


def sweep_table(frame: pd.DataFrame, path_col: str, label_col: str, plan: pd.DataFrame, clean: np.ndarray,
                kinds: list[str], ccs: np.ndarray, nnccs: np.ndarray, pred_ccs: np.ndarray,
                pred_ccas: np.ndarray) -> pd.DataFrame:
    """``sweeps.csv``: per swept image and degradation the severity-0 row (the shared undegraded pass) and
    the degraded rows, ordered by image, degradation, severity; ``clean`` are the plan rows of the swept
    images' undegraded passes."""
    degraded = np.flatnonzero(plan["degradation"].to_numpy() != CLEAN)
    rows = np.concatenate([np.repeat(clean, len(kinds)), degraded])
    kind = np.concatenate([np.tile(kinds, len(clean)), plan["degradation"].to_numpy()[degraded]])
    source = plan["source"].to_numpy()[rows]
    table = pd.DataFrame({"path": frame[path_col].to_numpy()[source], "subject_id": frame[label_col].to_numpy()[source],
                          "degradation": kind, "severity": plan["severity"].to_numpy()[rows],
                          "ccs": ccs[rows], "nnccs": nnccs[rows], "ccas": ccs[rows] - nnccs[rows],
                          "pred_ccs": pred_ccs[rows], "pred_ccas": pred_ccas[rows], "_source": source,
                          "_kind": pd.Categorical(kind, categories=kinds).codes})
    table = table.sort_values(["_source", "_kind", "severity"], kind="stable")
    return table[SWEEP_COLUMNS].reset_index(drop=True)
