"""evaluate.py's job: read templates / labels, run :mod:`transfira.evaluation`, write tables and plots."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import evaluation as ev
from .backbone import resolve_device
from .config import apply_schema, read_toml
from .errors import TransfiraError
from .io import atomic_path, load_id_vectors, numeric_column, save_csv

SCHEMA: dict[str, Any] = {
    "outdir": "output/evaluation/",
    "fmr": [1e-3, 1e-4, 1e-5, 1e-6],
    "allow_pickle": False,
    "chunk_size": 2048,
    "device": "auto",
    "pairs": {
        "path": "",  # CSV template_a,template_b,label (1 genuine, 0 impostor)
        "subjects": "",  # CSV id,subject: all-vs-all pairs
        "gallery": "",  # CSV id,subject: gallery x probes pairs (with 'probes')
        "probes": "",
        "id_col_name": "template_id",
        "label_col_name": "subject_id",
    },
    "images": {
        "labels": "",  # generate.py's labels CSV (identity, true ccs, ccas); '' skips the image level
        "features": "",  # [N, D] .npy aligned with the rows of 'labels'
        "ccs": "",  # predicted CCS .npy [N] (test.py's test_ccs.npy); '' to skip
        "ccas": "",
        "label_col_name": "subject_id",
        "ccs_col_name": "ccs",
        "ccas_col_name": "ccas",
        "quality_columns": [],  # further columns of 'labels' with other FIQA scores
        "max_discard": 0.95,
    },
}
PAUC_UPTO = 0.2  # ISO/IEC 29794-1:2024 partial AUC of the EDC
PAIR_COLUMNS = ["template_a", "template_b", "label"]


def load_evaluate_config(path: str | Path) -> dict[str, Any]:
    """Validate ``path`` against :data:`SCHEMA`; ``[templates]`` maps free variant names to files."""
    raw = read_toml(path)
    templates = raw.pop("templates", {})
    if not isinstance(templates, dict) or not all(isinstance(v, str) for v in templates.values()):
        raise TransfiraError(f"{path}: [templates] must map variant names to file paths")
    cfg = apply_schema(raw, SCHEMA, source=str(path))
    cfg["templates"] = {k: v for k, v in templates.items() if v}
    fmrs = cfg["fmr"]
    if not isinstance(fmrs, list) or not fmrs or not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in fmrs):
        raise TransfiraError(f"{path}: 'fmr' must be a non-empty list of numbers in (0, 1]")
    if not cfg["templates"] and not cfg["images"]["labels"]:
        raise TransfiraError(f"{path}: nothing to evaluate: give [templates] and/or [images] labels")
    if not PAUC_UPTO <= cfg["images"]["max_discard"] < 1:
        raise TransfiraError(f"{path}: [images] max_discard must lie in [{PAUC_UPTO}, 1) (the EDC partial area "
                             f"runs to {PAUC_UPTO})")
    return cfg


def read_table(path: str, columns: list[str], what: str) -> pd.DataFrame:
    """Read a CSV (id-like columns as text) and check it has ``columns``."""
    if not Path(path).is_file():
        raise TransfiraError(f"{what} not found: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise TransfiraError(f"{path}: cannot read CSV: {str(err).strip()}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TransfiraError(f"{path}: missing column(s) {', '.join(map(repr, missing))} "
                             f"(present: {', '.join(map(str, frame.columns))})")
    if frame.empty:
        raise TransfiraError(f"{path}: no rows")
    return frame


def numeric(frame: pd.DataFrame, col: str, path: str) -> np.ndarray:
    values, bad_rows = numeric_column(frame, col)
    if len(bad_rows):
        bad = frame[col].iloc[bad_rows[:3]].tolist()
        raise TransfiraError(f"{path}: column '{col}' has non-numeric or missing values, e.g. {bad}")
    return values


def index_of(ids: np.ndarray, wanted: pd.Series, path: str, source: str) -> np.ndarray:
    """Rows of ``wanted`` template ids in a templates file; missing ids are an error listing a few."""
    index = pd.Index(np.asarray(ids).astype(str))
    if not index.is_unique:
        raise TransfiraError(f"{path}: duplicate template ids, e.g. {index[index.duplicated()][:3].tolist()}")
    rows = index.get_indexer(wanted.astype(str))
    if (rows < 0).any():
        missing = pd.unique(wanted[rows < 0])
        raise TransfiraError(f"{path}: {len(missing)} template id(s) from {source} not in the file, "
                             f"e.g. {', '.join(missing[:5])}")
    return rows


def subjects_table(path: str, pc: dict, what: str) -> pd.DataFrame:
    frame = read_table(path, [pc["id_col_name"], pc["label_col_name"]], what)
    dup = frame[pc["id_col_name"]].duplicated()
    if dup.any():
        raise TransfiraError(f"{path}: duplicate template ids, e.g. {frame[pc['id_col_name']][dup].head(3).tolist()}")
    return frame


def check_pairs(n_gen: int, n_imp: int, source: str) -> None:
    if n_gen + n_imp == 0:
        raise TransfiraError(f"{source}: no pairs to compare")
    if n_gen == 0 or n_imp == 0:
        raise TransfiraError(f"{source}: {n_gen} genuine and {n_imp} impostor pairs; both are needed")


def verification(cfg: dict, device: torch.device) -> tuple[dict[str, ev.ScoreStats], str]:
    """ScoreStats per template variant, on the pairs the config names; also a description of them."""
    pc, fmrs, chunk = cfg["pairs"], cfg["fmr"], cfg["chunk_size"]
    modes = [m for m, given in [("path", pc["path"]), ("subjects", pc["subjects"]),
                                ("gallery", pc["gallery"] or pc["probes"])] if given]
    if len(modes) != 1:
        raise TransfiraError("[pairs]: give exactly one of 'path' (pair list), 'subjects' (all-vs-all) "
                             "or 'gallery' + 'probes'")
    mode, ic, lc = modes[0], pc["id_col_name"], pc["label_col_name"]
    if mode == "path":
        pairs = read_table(pc["path"], PAIR_COLUMNS, "pairs CSV")
        label = pairs["label"].str.strip()
        if not label.isin(["0", "1"]).all():
            raise TransfiraError(f"{pc['path']}: column 'label' must be 1 (genuine) or 0 (impostor), "
                                 f"found {label[~label.isin(['0', '1'])].head(3).tolist()}")
        genuine = (label == "1").to_numpy()
        check_pairs(int(genuine.sum()), int((~genuine).sum()), pc["path"])
        source = f"pair list {pc['path']}"
    elif mode == "subjects":
        subj = subjects_table(pc["subjects"], pc, "subjects CSV")
        check_pairs(*ev.count_pairs(subj[lc].to_numpy()), pc["subjects"])
        source = f"all-vs-all over {pc['subjects']}"
    else:
        if not (pc["gallery"] and pc["probes"]):
            raise TransfiraError("[pairs]: 'gallery' and 'probes' go together")
        gal = subjects_table(pc["gallery"], pc, "gallery CSV")
        prb = subjects_table(pc["probes"], pc, "probes CSV")
        check_pairs(*ev.count_pairs(gal[lc].to_numpy(), prb[lc].to_numpy()), pc["gallery"])
        source = f"gallery {pc['gallery']} x probes {pc['probes']}"

    out = {}
    for variant, path in cfg["templates"].items():
        ids, vectors = load_id_vectors(path, allow_pickle=cfg["allow_pickle"])
        print(f"{variant}: {len(ids)} templates from {path}")
        if mode == "path":
            ia = index_of(ids, pairs["template_a"], path, pc["path"])
            ib = index_of(ids, pairs["template_b"], path, pc["path"])
            scores = ev.pair_scores(vectors, vectors, ia, ib, device=device)
            out[variant] = ev.stats_from_scores(scores, genuine, fmrs)
        elif mode == "subjects":
            rows = index_of(ids, subj[ic], path, pc["subjects"])
            out[variant] = ev.all_vs_all_scores(vectors[rows], subj[lc].to_numpy(), fmrs, chunk,
                                                device=device, progress=f"{variant} all-vs-all")
        else:
            g, p = index_of(ids, gal[ic], path, pc["gallery"]), index_of(ids, prb[ic], path, pc["probes"])
            out[variant] = ev.all_vs_all_scores(vectors[g], gal[lc].to_numpy(), fmrs, chunk, device=device,
                                                probe_features=vectors[p], probe_subjects=prb[lc].to_numpy(),
                                                progress=f"{variant} gallery x probes")
    return out, source


def load_vector(path: str, n: int, what: str) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise TransfiraError(f"{what} not found: {path}") from None
    except ValueError as err:
        raise TransfiraError(f"{path}: cannot read {what}: {err}") from None
    if x.ndim == 0 or len(x) != n or (x.ndim == 2 and what != "features" and x.shape[1] != 1):
        raise TransfiraError(f"{path}: {what} has shape {x.shape}, expected {n} rows like the labels CSV")
    if not np.isfinite(x).all():
        raise TransfiraError(f"{path}: {what} contains NaN or infinite values")
    return x.astype(np.float32) if what == "features" else x.reshape(-1).astype(np.float64)


def image_level(cfg: dict, device: torch.device) -> tuple[pd.DataFrame, dict, str]:
    """SC and ERC/EDC per quality measure (paper Table III); also the curves and a description."""
    im, fmrs = cfg["images"], cfg["fmr"]
    path = im["labels"]
    extra = list(im["quality_columns"])
    labels = read_table(path, [im["label_col_name"], im["ccs_col_name"], im["ccas_col_name"]] + extra, "labels CSV")
    n = len(labels)
    if not im["features"]:
        raise TransfiraError("[images]: 'features' (the image features .npy) is required with 'labels'")
    feats = load_vector(im["features"], n, "features")
    if feats.ndim != 2:
        raise TransfiraError(f"{im['features']}: features must be [N, D], found shape {feats.shape}")
    true = {"ccs": numeric(labels, im["ccs_col_name"], path), "ccas": numeric(labels, im["ccas_col_name"], path)}
    measures: dict[str, tuple[np.ndarray, str | None]] = {}  # name -> (quality, SC target)
    for key in ("ccs", "ccas"):
        if im[key]:
            measures[f"predicted {key.upper()}"] = (load_vector(im[key], n, f"predicted {key}"), key)
    for col in extra:
        measures[col] = (numeric(labels, col, path), "ccs")
    measures["ideal (true CCS)"] = (true["ccs"], None)

    subjects = labels[im["label_col_name"]].to_numpy()
    check_pairs(*ev.count_pairs(subjects), path)
    stats = ev.all_vs_all_scores(feats, subjects, fmrs, cfg["chunk_size"], device=device,
                                  progress="image pairs")
    thresholds = ev.fmr_thresholds(stats.impostor_top, stats.n_impostor, fmrs)
    rows, curves, warned = [], {}, False
    for fmr, thr in zip(fmrs, thresholds):
        fnm = stats.genuine <= thr
        for name, (q, target) in measures.items():
            sc = ev.spearman(q, true[target]) if target else np.nan
            row = dict(measure=name, target=target or "", sc=sc, fmr=fmr, threshold=thr,
                       fnmr=np.nan, erc_auc=np.nan, edc_pauc20=np.nan)
            if not np.isnan(thr):
                frac, fnmr = ev.erc_curve(q, stats.genuine_pairs, fnm, im["max_discard"])
                curves.setdefault(fmr, {})[name] = (frac, fnmr)
                if np.isnan(fnmr).any() and not warned:
                    warned = True
                    print(f"warning: {name}: no genuine pair is left after discarding "
                          f"{frac[np.isnan(fnmr).argmax()]:.1%} of the images; AUCs beyond are n/a "
                          "(lower [images] max_discard)", file=sys.stderr)
                row.update(fnmr=fnmr[0], erc_auc=ev.erc_area(frac, fnmr, n, im["max_discard"]),
                           edc_pauc20=ev.erc_area(frac, fnmr, n, PAUC_UPTO))
            rows.append(row)
    source = (f"{n} images from {path}: {len(stats.genuine)} genuine, {stats.n_impostor} impostor pairs "
              f"(all-vs-all)")
    return pd.DataFrame(rows), curves, source


def fmt_fmr(fmr: float) -> str:
    return f"{fmr:.0e}".replace("e-0", "e-").replace("e+00", "")


def fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{x:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_roc(stats: dict[str, ev.ScoreStats], fmrs: list[float], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for variant, st in stats.items():
        fmr, tar = ev.roc_curve(st)
        ax.semilogx(fmr, tar, label=variant)
    for f in fmrs:
        ax.axvline(f, color="0.8", lw=0.8, ls=":")
    ax.set(xlabel="FMR", ylabel="TAR", title="Template verification ROC", ylim=(0, 1.01))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_erc(curves: dict[str, tuple[np.ndarray, np.ndarray]], fmr: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (frac, fnmr) in curves.items():
        style = dict(color="k", ls="--") if name.startswith("ideal") else {}
        ax.step(frac, fnmr, where="post", label=name, **style)
    ax.set(xlabel="fraction of images discarded", ylabel="FNMR",
           title=f"Error versus discard (EDC/ERC), FMR = {fmt_fmr(fmr)}", xlim=(0, frac[-1]))
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def run(cfg: dict[str, Any]) -> None:
    """Evaluate what the config names; write results.{md,csv}, image_results.csv and the plots."""
    import matplotlib

    matplotlib.use("Agg")
    out, fmrs = Path(cfg["outdir"]), cfg["fmr"]
    device = resolve_device(str(cfg["device"]))
    md = ["# TransFIRA evaluation", ""]
    written = []
    if cfg["templates"]:
        stats, source = verification(cfg, device)
        rows = [dict(variant=v, fmr=f, tar=t, threshold=h) for v, st in stats.items()
                for f, t, h in zip(fmrs, ev.tar_at_fmr(st.genuine, st.impostor_top, st.n_impostor, fmrs),
                                   ev.fmr_thresholds(st.impostor_top, st.n_impostor, fmrs))]
        table = pd.DataFrame(rows)
        save_csv(table, out / "results.csv")
        plot_roc(stats, fmrs, out / "roc.png")
        written += ["results.csv", "roc.png"]
        first = next(iter(stats.values()))
        md += ["## Template verification: TAR at FMR (paper Table II)", "",
               f"Pairs: {source}; {len(first.genuine)} genuine, {first.n_impostor} impostor.", "",
               markdown_table(["Variant"] + [f"FMR={fmt_fmr(f)}" for f in fmrs],
                              [[v] + [fmt(t) for t in table.tar[table.variant == v]] for v in stats]),
               "", "n/a: fewer than 1/FMR impostor pairs, this FMR cannot be measured. "
               "TAR = share of genuine scores strictly above the k-th highest impostor score, "
               "k = floor(FMR * N_impostor).", ""]
    if cfg["images"]["labels"]:
        table, curves, source = image_level(cfg, device)
        save_csv(table, out / "image_results.csv")
        written.append("image_results.csv")
        for fmr, c in curves.items():
            plot_erc(c, fmr, out / f"erc_fmr{fmt_fmr(fmr)}.png")
            written.append(f"erc_fmr{fmt_fmr(fmr)}.png")
        names = list(dict.fromkeys(table.measure))
        header = ["Measure", "SC"] + [h for f in fmrs for h in (f"AUC@{fmt_fmr(f)}", f"pAUC20@{fmt_fmr(f)}")]
        body = []
        for m in names:
            sub = table[table.measure == m]
            tgt = sub.target.iloc[0]
            body.append([m, fmt(sub.sc.iloc[0]) + (f" ({tgt.upper()})" if tgt else "")]
                        + [fmt(x) for a, p in zip(sub.erc_auc, sub.edc_pauc20) for x in (a, p)])
        md += ["## Image-level recognizability (paper Table III)", "", f"{source}.", "",
               markdown_table(header, body), "",
               "SC: Spearman correlation with the true value in brackets. AUC: area under FNMR versus "
               f"fraction of images discarded over [0, {cfg['images']['max_discard']}]; pAUC20: over "
               "[0, 0.2] (ISO/IEC 29794-1:2024 EDC); both unnormalized, threshold fixed at the FMR on all "
               "image pairs; n/a where the FMR cannot be measured.", ""]
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(md))
    print(f"wrote {', '.join(['results.md'] + written)} to {out}")
