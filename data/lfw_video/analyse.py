"""LFW video protocol, analysis of one encoder's run: the rows without a training run, intervals, tables.

    python data/lfw_video/analyse.py --config configs/examples/lfw_video/mobilefacenet_arcface/analyse.toml

Reads ``<workdir>/{protocol,labels,test_results}`` and writes ``<workdir>/analysis/``:

* ``templates_<row>.npz`` (enrol photos + aggregated clips, evaluate.py's format) for the rows
  computed here: ``norm_weight`` (weights = embedding norm), ``<name>_*`` for every frozen predictor
  of the ``[heads]`` table (heads-only checkpoints of train.py, applied to the cached test features:
  exactly what test.py computes with a frozen backbone), ``disk_raw_*`` / ``disk_unit_*`` (ridge heads
  fitted on the fixed train frames written to disk, on raw ``z`` / on ``[z/|z|, log|z|]``),
  ``true_*`` (true test labels: the optimistic bound), ``e2e_*`` (test.py's predictions of the
  fine-tuned predictor, recomputed here so every row goes through one code path);
* ``test_probes_scores.csv`` (true labels + every score per test frame), ``test_probes_ccs/ccas.npy``;
* ``results.md`` / ``results.json``: TAR at ``fmr`` with a **subject bootstrap** (test identities
  resampled with replacement, ``bootstrap`` times; an identity brings its enrol photo and its clip;
  pairs between two copies of one identity are dropped), paired differences vs baseline and vs
  norm, Spearman with true CCS (same bootstrap), 2 x 2 cut agreement, ERC (enrolment photo x frame
  pairs, FNMR at a fixed threshold vs share of frames discarded), per-degradation / per-severity
  tables, ROC / ERC plots, the transfer check on AT&T/ORL with the ``recut`` remedy, and the same
  ranking comparison (Spearman with true CCS against the norm, subject bootstrap) on AT&T/ORL and
  on the first LFW protocol's test split (``lfw1_labels``: its generate.py outputs), never trained on.

This bootstrap is this script's own; evaluate.py's intervals are
switched on in evaluate.toml when available and should agree within Monte-Carlo error.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from data.lfw_video.make_protocol import _hash, frame_plan  # noqa: E402
from transfira import evaluation as ev  # noqa: E402
from transfira.aggregation import aggregate_variants  # noqa: E402
from transfira.degradations import degrade_chain  # noqa: E402
from transfira.io import save_id_vectors  # noqa: E402
from transfira.model import HEAD_INPUTS  # noqa: E402
from transfira.training import ridge_fit  # noqa: E402  (train.py's head_init = "ridge" solve)

VARIANTS = ("weight", "filter", "filter_weight")


# ---------------------------------------------------------------------------------------------- pure parts
def ridge_predict(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64) @ w[:-1] + w[-1]


def unit_lognorm(z: np.ndarray) -> np.ndarray:
    """``[z / |z|, log |z|]`` in float64: what heads with ``head_input = "unit_lognorm"`` see
    (:func:`transfira.model.head_features`)."""
    import torch

    from transfira.model import head_features

    return head_features(torch.from_numpy(np.asarray(z, np.float64)), "unit_lognorm").numpy()


def heads_predict(path: str, z: np.ndarray) -> np.ndarray:
    """[N, 2] (CCS, CCAS) of a heads-only (frozen-encoder) checkpoint on cached encoder features."""
    import torch

    from transfira.checkpoint import load_predictor_checkpoint, read_predictor_state
    from transfira.model import RecognizabilityPredictionNetwork, head_layout

    state = read_predictor_state(path)
    model = RecognizabilityPredictionNetwork(torch.nn.Identity(), z.shape[1], **head_layout(state, z.shape[1]))
    load_predictor_checkpoint(path, model, state)
    with torch.no_grad():
        return torch.cat(model.eval().heads(torch.from_numpy(np.asarray(z, np.float32))), 1).double().numpy()


def ranking(scores: dict[str, np.ndarray], true_ccs: np.ndarray, groups: np.ndarray, reps: int, seed: int) -> dict:
    """Spearman of each score with the true CCS, a subject-bootstrap 95 % interval and the paired
    difference to the norm (``scores["norm"]``), over images grouped by subject."""
    rng = np.random.default_rng(seed)
    uniq, g = np.unique(groups, return_inverse=True)
    draws = [rng.integers(0, len(uniq), len(uniq)) for _ in range(reps)]
    boot = {k: np.array(spearman_groups(q, true_ccs, g, draws)) for k, q in scores.items()}
    return {k: {"spearman": ev.spearman(q, true_ccs), "ci": interval(boot[k]),
                "delta_norm": ev.spearman(q, true_ccs) - ev.spearman(scores["norm"], true_ccs),
                "delta_norm_ci": interval(boot[k] - boot["norm"])} for k, q in scores.items()}


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def tar_from_matrix(scores: np.ndarray, fmrs: list[float], index: np.ndarray | None = None) -> np.ndarray:
    """TAR per FMR for subject-aligned scores ``[S, S]`` (row = enrol of subject i, column = probe of
    subject j; genuine on the diagonal) restricted to the (resampled) subjects ``index``; impostor
    pairs are the pairs of different original subjects."""
    if index is None:
        index = np.arange(len(scores))
    sub = scores[np.ix_(index, index)]
    same = index[:, None] == index[None, :]
    genuine = np.diagonal(sub)
    impostor = sub[~same]
    k = ev.k_needed(fmrs, impostor.size)
    top = -np.sort(-np.partition(impostor, impostor.size - k)[impostor.size - k:]) if k else np.empty(0)
    return ev.tar_at_fmr(genuine, top, impostor.size, fmrs)


def spearman_groups(q: np.ndarray, truth: np.ndarray, groups: np.ndarray, reps: list[np.ndarray]) -> list[float]:
    """Spearman of ``q`` with ``truth`` over the rows of the resampled groups (one value per resample)."""
    rows_of = pd.Series(np.arange(len(groups))).groupby(groups).apply(np.asarray).to_dict()
    out = []
    for rep in reps:
        rows = np.concatenate([rows_of[g] for g in rep])
        out.append(ev.spearman(q[rows], truth[rows]))
    return out


def interval(values: np.ndarray) -> tuple[float, float]:
    return float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))


def agreement(pred_ccas: np.ndarray, true_ccas: np.ndarray, cut: float = 0.0) -> dict[str, float]:
    """2 x 2 of predicted (``> cut``) vs true CCAS > 0, as shares of all frames."""
    p, t = np.asarray(pred_ccas) > cut, np.asarray(true_ccas) > 0
    return {"both_pos": float(np.mean(p & t)), "pred_pos_true_neg": float(np.mean(p & ~t)),
            "pred_neg_true_pos": float(np.mean(~p & t)), "both_neg": float(np.mean(~p & ~t)),
            "agree": float(np.mean(p == t)), "pred_pos": float(p.mean()), "true_pos": float(t.mean())}


def recut(pred_ccas: np.ndarray, true_ccas: np.ndarray) -> float:
    """The cut on predicted CCAS that best reproduces true CCAS > 0 on labelled images (remedy for a
    drifting level): the candidate with the highest agreement, ties broken towards 0."""
    cand = np.concatenate([[0.0], np.sort(np.asarray(pred_ccas, np.float64))])
    cand = np.concatenate([cand, (cand[1:] + cand[:-1]) / 2])
    t = np.asarray(true_ccas) > 0
    agree = np.array([np.mean((pred_ccas > c) == t) for c in cand])
    best = np.flatnonzero(agree == agree.max())
    return float(cand[best[np.argmin(np.abs(cand[best]))]])


def erc(quality: np.ndarray, genuine: np.ndarray, threshold: float, fractions: np.ndarray) -> np.ndarray:
    """FNMR of the frames left after discarding the lowest-quality ``fractions`` (one genuine score per frame)."""
    if not np.isfinite(threshold):
        return np.full(len(fractions), np.nan)
    order = np.argsort(quality, kind="stable")
    out = []
    for f in fractions:
        kept = genuine[order[int(round(f * len(order))):]]
        out.append(float(np.mean(kept <= threshold)) if len(kept) else np.nan)
    return np.array(out)


# ---------------------------------------------------------------------------------------------- I/O parts
def fiqa_scores(quality_csv: str, paths: pd.Series) -> dict[str, np.ndarray]:
    """Other FIQA scores per test frame from test.py's ``test_quality.csv`` (``[quality]``, e.g. SER-FIQ),
    matched by path; ``{}`` without a file. The norm, CCS and CCAS columns are computed here already."""
    if not quality_csv:
        return {}
    table = pd.read_csv(quality_csv).drop_duplicates("path").set_index("path")
    missing = ~paths.isin(table.index)
    if missing.any():
        raise SystemExit(f"{quality_csv}: no row for test frame {paths[missing].iloc[0]} ({int(missing.sum())} missing)")
    names = [c for c in table.columns if c not in ("template_id", "ccs", "ccas", "norm")]
    return {c: table.loc[paths, c].to_numpy(np.float64) for c in names}


def templates_for(rows: dict[str, dict[str, np.ndarray]], probe_feats: np.ndarray, probe_tids: np.ndarray,
                  gallery_feats: np.ndarray, gallery_tids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{row: (template ids, vectors)}``: enrol photos unchanged, clips aggregated (paper eq. 10)."""
    out = {}
    base = aggregate_variants(probe_feats, probe_tids, None, None, ["baseline"])["baseline"]
    out["baseline"] = base[:2]
    for prefix, scores in rows.items():
        res = aggregate_variants(probe_feats, probe_tids, scores.get("ccs"), scores.get("ccas"),
                                 scores.get("variants", list(VARIANTS)))
        for variant, (ids, vecs, _) in res.items():
            out[f"{prefix}_{variant}"] = (ids, vecs)
    return {name: (np.concatenate([gallery_tids, ids]), np.concatenate([gallery_feats, vecs]).astype(np.float32))
            for name, (ids, vecs) in out.items()}


def subject_matrix(ids: np.ndarray, vecs: np.ndarray, enrol_tid: np.ndarray, probe_tid: np.ndarray) -> np.ndarray:
    pos = {t: i for i, t in enumerate(ids)}
    e = unit(vecs[[pos[t] for t in enrol_tid]])
    p = unit(vecs[[pos[t] for t in probe_tid]])
    return (e @ p.T).astype(np.float32)


def embed(model_path: str, images: list, checkpoint: str = "", embedding_size: int = 0) -> tuple[np.ndarray, ...]:
    """Frozen-encoder features of PIL images, or (ccs, ccas) of the trained predictor at ``checkpoint``."""
    import torch

    from transfira.backbone import load_backbone
    from transfira.inference import load_predictor

    if checkpoint:
        cfg = {"checkpoint_path": checkpoint, "predictor_model_path": "", "model_path": model_path,
               "backbone_type": "onnx", "embedding_size": embedding_size, "head_hidden": 0, "aug": {"crop_dim": 112}}
        net = load_predictor(cfg, torch.device("cpu"))
    else:
        net = load_backbone("onnx", model_path).eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(images), 64):
            x = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images[i: i + 64]])
            y = net(torch.from_numpy(((x / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()))
            outs.append([t.flatten(1).numpy() if t.ndim > 1 and t.shape[1] > 1 else t.reshape(-1).numpy()
                         for t in (y if isinstance(y, tuple) else (y,))])
    return tuple(np.concatenate(parts) for parts in zip(*outs))


def orl_images(orl: Path, seed: int, protocol: dict, subjects: int = 0) -> tuple[pd.DataFrame, list]:
    """AT&T/ORL, 92x112 grey padded to 112x112 RGB: one enrolment photo per subject (hash order), the
    other 9 photos as probes, each either clean or degraded (by hash, half and half; the encoder's
    protocol severities)."""
    from PIL import Image

    table = pd.read_csv(orl / "all.csv")
    if subjects:
        table = table[table["subject_id"].isin(sorted(table["subject_id"].unique())[:subjects])]
    table = table.assign(_h=[_hash(seed, "gallery", p) for p in table["path"]]).sort_values(["subject_id", "_h"])
    rows, images = [], []
    kinds = tuple(protocol["kinds"].split(",")) if isinstance(protocol["kinds"], str) else tuple(protocol["kinds"])
    for subject, group in table.groupby("subject_id", sort=True):
        for k, path in enumerate(group["path"]):
            with Image.open(orl / "images" / path) as im:
                grey = im.convert("RGB")
            canvas = Image.new("RGB", (112, 112))
            canvas.paste(grey, ((112 - grey.width) // 2, (112 - grey.height) // 2))
            versions = [("none", 0.0, canvas)]
            if k > 0 and _hash(seed, "orl-degrade", path) % 2:  # half the probe photos degraded, half clean
                plan = frame_plan(f"orl/{path}", 1, seed, kinds, protocol["stack"],
                                  (protocol["severity_min"], protocol["severity_max"]))
                img = degrade_chain(canvas, plan["degradation"].split("+"), plan["severity"], plan["pixel_seed"])
                versions = [(plan["degradation"], plan["severity"], img)]
            for kind, sev, img in versions:
                rows.append({"path": path, "subject_id": subject, "role": "gallery" if k == 0 else "probe",
                             "degradation": kind, "severity": sev})
                images.append(img)
    return pd.DataFrame(rows), images


def fmt(x: float, d: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{d}f}"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


# ---------------------------------------------------------------------------------------------- the job
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--skip-orl", action="store_true", help="leave out the AT&T/ORL transfer check")
    args = p.parse_args(argv)
    cfg = tomllib.loads(Path(args.config).read_text())
    start = time.perf_counter()
    work = Path(cfg["workdir"])
    out = work / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    prot, lab = work / "protocol", work / "labels"
    fmrs = list(cfg["fmr"])
    protocol_args = json.loads((prot / "protocol.json").read_text())["args"]

    probes = pd.read_csv(lab / "test_probes_labels.csv")
    z = np.load(lab / "test_probes_features.npy")
    gallery = pd.read_csv(prot / "test_gallery.csv")
    zg = np.load(lab / "test_gallery_features.npy")
    test = pd.read_csv(prot / "test.csv")
    n = len(probes)
    if list(test["path"][:n]) != list(probes["path"]):
        raise SystemExit(f"{prot / 'test.csv'}: first rows are not the test probes in order")
    tid_probe = test["template_id"].to_numpy()[:n]
    tid_gallery = test["template_id"].to_numpy()[n:]
    subjects = sorted(gallery["subject_id"])
    if probes.groupby("subject_id")["clip"].nunique().max() != 1:
        raise SystemExit("the subject bootstrap here needs one clip per test identity (clips_test = 1)")
    sub_of_gal = dict(zip(gallery["subject_id"], tid_gallery))
    sub_of_probe = dict(zip(probes["subject_id"], tid_probe))
    enrol_tid = np.array([sub_of_gal[s] for s in subjects])
    probe_tid = np.array([sub_of_probe[s] for s in subjects])

    # scores per test frame: frozen predictors ([heads]), ridge on the disk frames, end to end (test.py)
    norm = np.linalg.norm(z, axis=1)
    heads = dict(cfg.get("heads", {}))
    preds = {name: heads_predict(path, z) for name, path in heads.items()}
    ridge = {}
    if (lab / "train_probes_features.npy").is_file():  # ridge heads on the frames written to disk
        train = pd.read_csv(lab / "train_probes_labels.csv")
        zt = np.load(lab / "train_probes_features.npy")
        y = train[["ccs", "ccas"]].to_numpy()
        ridge = {"disk_raw": (ridge_fit(zt, y, cfg["ridge_l2"]), HEAD_INPUTS[0]),
                 "disk_unit": (ridge_fit(unit_lognorm(zt), y, cfg["ridge_l2"]), HEAD_INPUTS[1])}
        preds.update({k: ridge_predict(z if inp == "raw" else unit_lognorm(z), w) for k, (w, inp) in ridge.items()})
    e2e_path = work / "test_results" / "test_ccs.npy"
    if e2e_path.is_file():
        preds["e2e"] = np.stack([np.load(e2e_path)[:n], np.load(work / "test_results" / "test_ccas.npy")[:n]], 1)
    true = probes[["ccs", "ccas"]].to_numpy()
    fiqa = fiqa_scores(cfg.get("quality_csv", ""), probes["path"])
    scores = probes.assign(**fiqa, norm=norm, **{f"{k}_{c}": v[:, j] for k, v in preds.items() for j, c in enumerate(("ccs", "ccas"))})
    scores.to_csv(out / "test_probes_scores.csv", index=False)
    main_pred = next(iter(heads), "e2e" if "e2e" in preds else "disk_raw")
    np.save(out / "test_probes_ccs.npy", preds[main_pred][:, 0].astype(np.float32))
    np.save(out / "test_probes_ccas.npy", preds[main_pred][:, 1].astype(np.float32))

    # template rows
    rows = {"norm": {"ccs": norm, "variants": ["weight"]}, "true": {"ccs": true[:, 0], "ccas": true[:, 1]}}
    rows.update({k: {"ccs": v[:, 0], "ccas": v[:, 1], **({} if k == main_pred else {"variants": ["filter_weight"]})}
                 for k, v in preds.items()})
    rows.update({name: {"ccs": q, "variants": ["weight"]} for name, q in fiqa.items()})  # e.g. serfiq_weight
    templates = templates_for(rows, z, tid_probe, zg, tid_gallery)
    for name, (ids, vecs) in templates.items():
        save_id_vectors(out / f"templates_{name}.npz", ids, vecs)
    mats = {name: subject_matrix(ids, vecs, enrol_tid, probe_tid) for name, (ids, vecs) in templates.items()}

    # subject bootstrap (same resamples for every row: paired differences)
    rng = np.random.default_rng(cfg["seed"])
    n_sub = len(subjects)
    reps = [rng.integers(0, n_sub, n_sub) for _ in range(cfg["bootstrap"])]
    names = list(mats)
    point = {k: tar_from_matrix(m, fmrs) for k, m in mats.items()}
    boot = np.array([[tar_from_matrix(mats[k], fmrs, r) for k in names] for r in reps])  # [B, rows, F]
    tar = {}
    for i, k in enumerate(names):
        tar[k] = {"tar": point[k].tolist(), "ci": [interval(boot[:, i, f]) for f in range(len(fmrs))]}
        for ref in ("baseline", "norm_weight"):
            d = boot[:, i, :] - boot[:, names.index(ref), :]
            tar[k][f"delta_{ref}"] = (point[k] - point[ref]).tolist()
            tar[k][f"delta_{ref}_ci"] = [interval(d[:, f]) for f in range(len(fmrs))]

    # image level: Spearman with true CCS (subject bootstrap), cut agreement, ERC
    frame_sub = probes["subject_id"].map({s: i for i, s in enumerate(subjects)}).to_numpy()
    quality = {"norm": norm, **fiqa, **{f"{k} CCS": v[:, 0] for k, v in preds.items()},
               **{f"{k} CCAS": v[:, 1] for k, v in preds.items()}}
    sc = {}
    sc_boot = {}
    for name, q in quality.items():
        sc_boot[name] = np.array(spearman_groups(q, true[:, 0], frame_sub, reps[: min(len(reps), 400)]))
        sc[name] = {"spearman": ev.spearman(q, true[:, 0]), "ci": interval(sc_boot[name])}
    for name in quality:
        for ref in ("norm", "serfiq"):
            if ref in quality:
                sc[name][f"delta_{ref}_ci"] = interval(sc_boot[name] - sc_boot[ref])
                sc[name][f"delta_{ref}"] = sc[name]["spearman"] - sc[ref]["spearman"]
    cuts = {k: agreement(v[:, 1], true[:, 1]) for k, v in preds.items()}
    gal_pos = {s: i for i, s in enumerate(gallery["subject_id"])}
    sim = unit(z) @ unit(zg).T  # frame x enrolment photo
    own = probes["subject_id"].map(gal_pos).to_numpy()
    gen = sim[np.arange(n), own]
    imp = sim.copy()
    imp[np.arange(n), own] = np.nan
    imp = imp[np.isfinite(imp)]
    fractions = np.linspace(0, 0.8, 17)
    erc_rows = {}
    for fmr in fmrs:
        k = ev.n_at_fmr(fmr, imp.size)
        thr = float(np.sort(imp)[-k]) if k else np.nan
        curves = {name: erc(q, gen, thr, fractions) for name, q in {**quality, "true CCS": true[:, 0]}.items()}
        erc_rows[fmr] = {"threshold": thr, "curves": {k2: v.tolist() for k2, v in curves.items()},
                         "auc": {k2: float(np.trapezoid(v, fractions)) for k2, v in curves.items()}}
        if np.isfinite(thr):  # subject bootstrap of the area (threshold fixed), 200 resamples
            rows_of = pd.Series(np.arange(n)).groupby(frame_sub).apply(np.asarray).to_dict()
            picks = [np.concatenate([rows_of[g] for g in rep]) for rep in reps[:200]]
            erc_rows[fmr]["auc_ci"] = {
                k2: interval(np.array([np.trapezoid(erc(q[r], gen[r], thr, fractions), fractions) for r in picks]))
                for k2, q in {**quality, "true CCS": true[:, 0]}.items()}

    # per degradation / per severity
    kind = probes["degradation"].astype(str)
    sev = probes["severity"].to_numpy()
    per_kind = []
    expanded = [(i, k2) for i, ks in enumerate(kind) for k2 in ks.split("+")]
    for k2 in sorted(set(k for _, k in expanded)):
        idx = np.array([i for i, kk in expanded if kk == k2])
        per_kind.append([k2, len(idx), fmt(np.mean(true[idx, 1] <= 0)), fmt(true[idx, 0].mean()),
                         fmt(ev.spearman(norm[idx], true[idx, 0])), fmt(ev.spearman(preds[main_pred][idx, 0], true[idx, 0])),
                         fmt(np.mean((preds[main_pred][idx, 1] > 0) == (true[idx, 1] > 0)))])
    per_sev = []
    edges = [0.0, 1e-9, 0.5, 0.625, 0.75, 0.875, 1.0001] if protocol_args["severity_min"] >= 0.5 else \
        [0.0, 1e-9, 0.3, 0.475, 0.65, 0.825, 1.0001]
    for lo, hi in zip(edges[:-1], edges[1:]):
        idx = np.flatnonzero((sev >= lo) & (sev < hi)) if lo > 0 else np.flatnonzero(sev == 0)
        if len(idx) < 2:
            continue
        label = "clean" if lo == 0 else f"[{lo:.3g}, {min(hi, 1):.3g}{']' if hi > 1 else ')'}"
        per_sev.append([label, len(idx), fmt(np.mean(true[idx, 1] <= 0)), fmt(true[idx, 0].mean()),
                        fmt(ev.spearman(norm[idx], true[idx, 0])), fmt(ev.spearman(preds[main_pred][idx, 0], true[idx, 0])),
                        fmt(np.mean((preds[main_pred][idx, 1] > 0) == (true[idx, 1] > 0)))])

    result = {"fmr": fmrs, "identities": n_sub, "frames": n, "genuine": n_sub, "impostor": n_sub * (n_sub - 1),
              "bootstrap": cfg["bootstrap"], "share_degraded_below_cut": float(np.mean(true[sev > 0, 1] <= 0)),
              "share_all_below_cut": float(np.mean(true[:, 1] <= 0)), "tar": tar, "spearman": sc, "cut": cuts,
              "erc": erc_rows, "per_kind": per_kind, "per_severity": per_sev, "orl": None, "lfw1": None,
              "main_predictor": main_pred, "seconds": round(time.perf_counter() - start, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out / "results.md").write_text(report(result))
    plots(result, mats, fmrs, out)
    if cfg.get("lfw1_labels") and Path(cfg["lfw1_labels"]).is_dir():  # the first LFW protocol's test split
        result["lfw1"] = transfer_lfw1(cfg, heads, ridge)
    if not args.skip_orl and cfg.get("orl") and Path(cfg["orl"]).is_dir():  # transfer to AT&T/ORL
        result["orl"] = transfer_orl(cfg, work, protocol_args, heads, ridge)
        result["seconds"] = round(time.perf_counter() - start, 1)
        (out / "results.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
        (out / "results.md").write_text(report(result))
    print(report(result))
    print(f"analysis in {out} ({result['seconds']} s)")
    return result


def transfer_lfw1(cfg: dict, heads: dict[str, str], ridge: dict) -> dict:
    """Spearman with true CCS (its own leave-one-out labels) on the first LFW protocol's test split."""
    lab = Path(cfg["lfw1_labels"])
    table = pd.read_csv(lab / "test_labels.csv")
    z = np.load(lab / "test_features.npy")
    scores = {"norm": np.linalg.norm(z, axis=1), **{k: heads_predict(p, z)[:, 0] for k, p in heads.items()},
              **{k: ridge_predict(z if inp == "raw" else unit_lognorm(z), w)[:, 0] for k, (w, inp) in ridge.items()}}
    return {"images": len(table), "identities": int(table["subject_id"].nunique()),
            "ranking": ranking(scores, table["ccs"].to_numpy(), table["subject_id"].to_numpy(), 400, cfg["seed"])}


def transfer_orl(cfg: dict, work: Path, protocol: dict, heads: dict[str, str], ridge: dict) -> dict:
    """Spearman, cut shares and 2 x 2 agreement of the LFW-trained predictors on AT&T/ORL; the recut remedy."""
    table, images = orl_images(Path(cfg["orl"]), cfg["seed"], protocol, cfg.get("orl_subjects", 0))
    (z,) = embed(cfg["model_path"], images)
    gal = table["role"].to_numpy() == "gallery"
    subjects = table["subject_id"].to_numpy()
    centers = unit(z[gal])
    csub = list(subjects[gal])
    sim = unit(z[~gal]) @ centers.T
    own = np.array([csub.index(s) for s in subjects[~gal]])
    ccs = sim[np.arange(len(own)), own]
    sim[np.arange(len(own)), own] = -np.inf
    ccas = ccs - sim.max(1)
    probes = table[~gal].reset_index(drop=True)
    zp = z[~gal]
    gsim = unit(z[~gal]) @ centers.T
    preds = {k: heads_predict(p, zp) for k, p in heads.items()}
    preds.update({k: ridge_predict(zp if inp == "raw" else unit_lognorm(zp), w) for k, (w, inp) in ridge.items()})
    if cfg.get("e2e_checkpoint") and Path(cfg["e2e_checkpoint"]).is_file():
        sel = [im for im, g in zip(images, gal) if not g]
        ccs_p, ccas_p = embed(cfg["model_path"], sel, cfg["e2e_checkpoint"], cfg["embedding_size"])
        preds["e2e"] = np.stack([ccs_p, ccas_p], 1)
    labelled = np.array([_hash(cfg["seed"], "recut", p, d) % len(probes) for p, d in
                         zip(probes["path"], probes["degradation"])]).argsort()[: cfg["recut"]]
    rest = np.setdiff1d(np.arange(len(probes)), labelled)
    out = {"images": len(table), "probes": len(probes), "centers": int(gal.sum()),
           "genuine_mean": float(gsim[np.arange(len(own)), own].mean()),
           "impostor_mean": float(gsim[np.arange(len(centers))[None, :] != own[:, None]].mean()),
           "true_pos_share": float(np.mean(ccas > 0)), "norm_spearman": ev.spearman(np.linalg.norm(zp, axis=1), ccs),
           "ranking": ranking({"norm": np.linalg.norm(zp, axis=1), **{k: v[:, 0] for k, v in preds.items()}}, ccs,
                              probes["subject_id"].to_numpy(), 400, cfg["seed"]),
           "predictors": {}}
    for k, v in preds.items():
        cut = recut(v[labelled, 1], ccas[labelled])
        out["predictors"][k] = {"spearman": ev.spearman(v[:, 0], ccs), "cut0": agreement(v[:, 1], ccas),
                                "recut": cut, "cut0_rest": agreement(v[rest, 1], ccas[rest]),
                                "recut_rest": agreement(v[rest, 1], ccas[rest], cut),
                                "mean_pred_ccas": float(v[:, 1].mean()), "mean_true_ccas": float(ccas.mean())}
    return out


def ranking_table(rows: dict) -> str:
    refs = [r for r in ("norm", "serfiq") if all(f"delta_{r}_ci" in v for v in rows.values())]

    def delta(v: dict, ref: str) -> str:
        lo, hi = v[f"delta_{ref}_ci"]
        return f"{v.get(f'delta_{ref}', np.nan):+.3f} [{lo:+.3f}, {hi:+.3f}]"
    return md_table(["score", "Spearman [95 %]", *(f"minus {r} [95 %]" for r in refs)],
                    [[k, f"{v['spearman']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]", *(delta(v, r) for r in refs)]
                     for k, v in rows.items()])


def report(r: dict) -> str:
    f1, f2 = r["fmr"][:2]
    lines = [f"{r['identities']} test identities, {r['frames']} frames, {r['genuine']} genuine + {r['impostor']} impostor "
             f"template pairs; degraded frames with true CCAS <= 0: {r['share_degraded_below_cut']:.1%} (all frames "
             f"{r['share_all_below_cut']:.1%}); intervals: 95 % subject bootstrap, {r['bootstrap']} resamples.", ""]
    rows = []
    for k, v in r["tar"].items():
        cells = [k]
        for f in range(2):
            lo, hi = v["ci"][f]
            cells += [f"{v['tar'][f]:.3f} [{lo:.3f}, {hi:.3f}] (w {hi - lo:.3f})"]
        for f in range(2):
            lo, hi = v["delta_baseline_ci"][f]
            cells += [f"{v['delta_baseline'][f]:+.3f} [{lo:+.3f}, {hi:+.3f}]"]
        for f in range(2):
            lo, hi = v["delta_norm_weight_ci"][f]
            cells += [f"{v['delta_norm_weight'][f]:+.3f} [{lo:+.3f}, {hi:+.3f}]"]
        rows.append(cells)
    lines += [md_table(["row", f"TAR@{f1:g}", f"TAR@{f2:g}", f"- baseline @{f1:g}", f"- baseline @{f2:g}",
                        f"- norm @{f1:g}", f"- norm @{f2:g}"], rows), ""]
    lines += ["Spearman with true CCS (test frames; subject bootstrap):", "", ranking_table(r["spearman"]), ""]
    if r.get("lfw1"):
        lines += [f"First LFW protocol, test split ({r['lfw1']['images']} images of {r['lfw1']['identities']} identities, "
                  "never trained on; its own leave-one-out labels): Spearman with true CCS", "",
                  ranking_table(r["lfw1"]["ranking"]), ""]
    for fmr, e in r["erc"].items():
        lines += [f"ERC at FMR {float(fmr):g} (enrolment photo x frame pairs, threshold {e['threshold']:.4f}): "
                  "FNMR after discarding 0 / 20 / 40 % of frames, area over [0, 0.8]", ""]
        fr = np.linspace(0, 0.8, 17)
        ci = e.get("auc_ci", {})
        rows = [[k, *(fmt(c[int(np.argmin(np.abs(fr - x)))]) for x in (0, 0.2, 0.4)), fmt(e["auc"][k], 4),
                 f"[{ci[k][0]:.4f}, {ci[k][1]:.4f}]" if k in ci else "n/a"] for k, c in e["curves"].items()]
        lines += [md_table(["score", "0 %", "20 %", "40 %", "area", "area 95 %"], rows), ""]
    rows = [[k, fmt(c["true_pos"]), fmt(c["pred_pos"]), fmt(c["both_pos"]), fmt(c["pred_pos_true_neg"]),
             fmt(c["pred_neg_true_pos"]), fmt(c["both_neg"]), fmt(c["agree"])] for k, c in r["cut"].items()]
    lines += ["Cut agreement on the test frames (shares of all frames):", "",
              md_table(["predictor", "true > 0", "pred > 0", "both > 0", "pred > 0, true <= 0", "pred <= 0, true > 0",
                        "both <= 0", "agree"], rows), ""]
    head = ["", "frames", "true CCAS <= 0", "mean true CCS", "Spearman norm", f"Spearman {r['main_predictor']}",
            "cut agree"]
    lines += ["Per degradation kind:", "", md_table(["kind"] + head[1:], r["per_kind"]), "",
              "Per severity:", "", md_table(["severity"] + head[1:], r["per_severity"]), ""]
    o = r["orl"]
    if o:
        lines += [f"AT&T/ORL transfer: {o['probes']} probes ({o['centers']} enrolment photos), genuine cosine "
                  f"{o['genuine_mean']:.3f}, impostor {o['impostor_mean']:.3f}; true CCAS > 0: {o['true_pos_share']:.1%}; "
                  f"Spearman(norm, CCS) {o['norm_spearman']:.3f}.", "", ranking_table(o["ranking"]), ""]
        rows = []
        for k, v in o["predictors"].items():
            c0, cr0, cr = v["cut0"], v["cut0_rest"], v["recut_rest"]
            rows.append([k, fmt(v["spearman"]), fmt(v["mean_pred_ccas"]), fmt(v["mean_true_ccas"]), fmt(c0["pred_pos"]),
                         fmt(c0["true_pos"]), f"{c0['both_pos']:.3f} / {c0['pred_pos_true_neg']:.3f} / "
                         f"{c0['pred_neg_true_pos']:.3f} / {c0['both_neg']:.3f}", fmt(c0["agree"]), f"{v['recut']:+.3f}",
                         f"{fmt(cr0['agree'])} -> {fmt(cr['agree'])}"])
        lines += [md_table(["predictor", "Spearman CCS", "mean pred CCAS", "mean true CCAS", "pred > 0", "true > 0",
                            "2x2 (++ / +- / -+ / --)", "agree (cut 0)", "recut", "agree on the rest: 0 -> recut"], rows), ""]
    return "\n".join(lines) + "\n"


def plots(r: dict, mats: dict[str, np.ndarray], fmrs: list[float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.2), dpi=90)
    for name in ("baseline", "norm_weight", f"{r['main_predictor']}_filter_weight", "e2e_filter_weight",
                 "true_filter_weight"):
        if name not in mats:
            continue
        m = mats[name]
        gen = np.diagonal(m)
        imp = np.sort(m[~np.eye(len(m), dtype=bool)])[::-1]
        fmr = np.logspace(-5, 0, 60)
        k = np.maximum((fmr * imp.size).astype(int), 1)
        thr = imp[np.minimum(k, imp.size) - 1]
        ax.plot(fmr, [(gen > t).mean() for t in thr], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("FMR")
    ax.set_ylabel("TAR")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "roc.png")
    plt.close(fig)
    fmr = str(fmrs[0]) if str(fmrs[0]) in r["erc"] else fmrs[0]
    e = r["erc"][fmr]
    fig, ax = plt.subplots(figsize=(4.2, 3.2), dpi=90)
    fr = np.linspace(0, 0.8, 17)
    for name, c in e["curves"].items():
        if "CCAS" in name:
            continue
        ax.plot(fr, c, label=name)
    ax.set_xlabel("share of frames discarded")
    ax.set_ylabel(f"FNMR at FMR {float(fmr):g}")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "erc.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
