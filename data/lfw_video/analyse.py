"""LFW video protocol, the rows of one encoder's run: which scores, which templates, which files.

    python data/lfw_video/analyse.py --config configs/examples/lfw_video/mobilefacenet_arcface/analyse.toml

Reads ``<workdir>/{protocol,labels,test_results}`` and writes ``<workdir>/analysis/``, the inputs of the
``evaluate`` stage (``evaluate.toml``, ``evaluate_orl.toml``, ``evaluate_lfw1.toml``; every metric and
interval comes from evaluate.py):

* ``templates_<row>.npz`` (enrol photos + aggregated clips, evaluate.py's format) for the rows
  computed here: ``norm_weight`` (weights = embedding norm), ``<name>_*`` for every frozen predictor
  of the ``[heads]`` table (heads-only checkpoints of train.py, applied to the cached test features:
  exactly what test.py computes with a frozen backbone), ``disk_raw_*`` / ``disk_unit_*`` (ridge heads
  fitted on the fixed train frames written to disk, on raw ``z`` / on ``[z/|z|, log|z|]``),
  ``true_*`` (true test labels: the optimistic bound), ``e2e_*`` (test.py's predictions of the
  fine-tuned predictor, recomputed here so every row goes through one code path), ``serfiq_weight``;
* ``test_probes_scores.csv``: per test frame its labels and every score (``norm``, ``serfiq``,
  ``<row>_ccs``, ``<row>_ccas``); ``test_probes_ccs/ccas.npy`` of the main predictor;
* ``orl/``: AT&T/ORL, never trained on (one enrolment photo per subject, the other 9 as probes, half of
  them degraded): ``probes.csv`` (labels against the enrolment photos + every score),
  ``probes_features.npy``, ``enrolment.csv``, ``enrolment_features.npy``;
* ``lfw1_scores.csv``: every score on the first LFW protocol's test split (``lfw1_labels``: its
  generate.py outputs), never trained on.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from data.lfw_video.make_protocol import _hash, frame_plan  # noqa: E402
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


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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


def embed(model_path: str, images: list, checkpoint: str = "", embedding_size: int = 0) -> tuple[np.ndarray, ...]:
    """Frozen-encoder features of PIL images, or (ccs, ccas) of the trained predictor at ``checkpoint``."""
    import torch

    from transfira.backbone import load_backbone
    from transfira.networks import load_predictor

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


# ---------------------------------------------------------------------------------------------- the job
def main(argv: list[str] | None = None) -> None:
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
    protocol_args = json.loads((prot / "protocol.json").read_text())["args"]

    probes = pd.read_csv(lab / "test_probes_labels.csv")
    z = np.load(lab / "test_probes_features.npy")
    zg = np.load(lab / "test_gallery_features.npy")
    test = pd.read_csv(prot / "test.csv")
    n = len(probes)
    if list(test["path"][:n]) != list(probes["path"]):
        raise SystemExit(f"{prot / 'test.csv'}: first rows are not the test probes in order")
    tid_probe = test["template_id"].to_numpy()[:n]
    tid_gallery = test["template_id"].to_numpy()[n:]

    # scores per test frame: frozen predictors ([heads]), ridge on the disk frames, end to end (test.py)
    heads = dict(cfg.get("heads", {}))
    preds = {name: heads_predict(path, z) for name, path in heads.items()}
    ridge = {}
    if (lab / "train_probes_features.npy").is_file():  # ridge heads on the frames written to disk
        train = pd.read_csv(lab / "train_probes_labels.csv")
        zt = np.load(lab / "train_probes_features.npy")
        y = train[["ccs", "ccas"]].to_numpy()
        ridge = {"disk_raw": (ridge_fit(zt, y, cfg["ridge_l2"]), HEAD_INPUTS[0]),
                 "disk_unit": (ridge_fit(unit_lognorm(zt), y, cfg["ridge_l2"]), HEAD_INPUTS[1])}
    preds.update(ridge_rows(ridge, z))
    e2e_path = work / "test_results" / "test_ccs.npy"
    if e2e_path.is_file():
        preds["e2e"] = np.stack([np.load(e2e_path)[:n], np.load(work / "test_results" / "test_ccas.npy")[:n]], 1)
    norm = np.linalg.norm(z, axis=1)
    fiqa = fiqa_scores(cfg.get("quality_csv", ""), probes["path"])
    score_table(probes, norm, fiqa, preds).to_csv(out / "test_probes_scores.csv", index=False)
    main_pred = next(iter(heads), "e2e" if "e2e" in preds else "disk_raw")
    np.save(out / "test_probes_ccs.npy", preds[main_pred][:, 0].astype(np.float32))
    np.save(out / "test_probes_ccas.npy", preds[main_pred][:, 1].astype(np.float32))

    # template rows
    true = probes[["ccs", "ccas"]].to_numpy()
    rows = {"norm": {"ccs": norm, "variants": ["weight"]}, "true": {"ccs": true[:, 0], "ccas": true[:, 1]}}
    rows.update({k: {"ccs": v[:, 0], "ccas": v[:, 1], **({} if k == main_pred else {"variants": ["filter_weight"]})}
                 for k, v in preds.items()})
    rows.update({name: {"ccs": q, "variants": ["weight"]} for name, q in fiqa.items()})  # e.g. serfiq_weight
    for name, (ids, vecs) in templates_for(rows, z, tid_probe, zg, tid_gallery).items():
        save_id_vectors(out / f"templates_{name}.npz", ids, vecs)

    if cfg.get("lfw1_labels") and Path(cfg["lfw1_labels"]).is_dir():  # the first LFW protocol's test split
        lab1 = Path(cfg["lfw1_labels"])
        z1 = np.load(lab1 / "test_features.npy")
        table = pd.read_csv(lab1 / "test_labels.csv")[["path"]]
        score_table(table, np.linalg.norm(z1, axis=1), {}, predict_all(heads, ridge, z1)).to_csv(
            out / "lfw1_scores.csv", index=False)
    if not args.skip_orl and cfg.get("orl") and Path(cfg["orl"]).is_dir():  # transfer to AT&T/ORL
        write_orl(cfg, out / "orl", protocol_args, heads, ridge)
    print(f"analysis inputs in {out} ({time.perf_counter() - start:.1f} s); the evaluate stage measures them")


def ridge_rows(ridge: dict, z: np.ndarray) -> dict[str, np.ndarray]:
    return {k: ridge_predict(z if inp == "raw" else unit_lognorm(z), w) for k, (w, inp) in ridge.items()}


def predict_all(heads: dict[str, str], ridge: dict, z: np.ndarray) -> dict[str, np.ndarray]:
    """[N, 2] (CCS, CCAS) of every frozen predictor and ridge row on features ``z``."""
    return {**{k: heads_predict(p, z) for k, p in heads.items()}, **ridge_rows(ridge, z)}


def score_table(table: pd.DataFrame, norm: np.ndarray, fiqa: dict[str, np.ndarray],
                preds: dict[str, np.ndarray]) -> pd.DataFrame:
    """``table`` + ``norm``, the FIQA scores and ``<row>_ccs``, ``<row>_ccas`` of every predictor."""
    return table.assign(**fiqa, norm=norm, **{f"{k}_{c}": v[:, j] for k, v in preds.items()
                                              for j, c in enumerate(("ccs", "ccas"))})


def write_orl(cfg: dict, out: Path, protocol: dict, heads: dict[str, str], ridge: dict) -> None:
    """AT&T/ORL probes labelled against the enrolment photos (CCS, CCAS as generate.py's gallery/probe
    form), with every predictor's scores; the enrolment photos and both feature files."""
    out.mkdir(parents=True, exist_ok=True)
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
    probes = table[~gal].reset_index(drop=True).assign(ccs=ccs, ccas=ccs - sim.max(1))
    zp = z[~gal]
    preds = predict_all(heads, ridge, zp)
    if cfg.get("e2e_checkpoint") and Path(cfg["e2e_checkpoint"]).is_file():
        sel = [im for im, g in zip(images, gal) if not g]
        ccs_p, ccas_p = embed(cfg["model_path"], sel, cfg["e2e_checkpoint"], cfg["embedding_size"])
        preds["e2e"] = np.stack([ccs_p, ccas_p], 1)
    score_table(probes, np.linalg.norm(zp, axis=1), {}, preds).to_csv(out / "probes.csv", index=False)
    np.save(out / "probes_features.npy", zp.astype(np.float32))
    table[gal].to_csv(out / "enrolment.csv", index=False)
    np.save(out / "enrolment_features.npy", z[gal].astype(np.float32))


if __name__ == "__main__":
    main()
