"""data/IJB/run_ijb.py's job: the IJB-B / IJB-C 1:1 protocol in four resumable stages.

1. ``meta``: the release's meta files -> ``test.csv`` (path, template_id, media_id, landmarks,
   det_score) and checks the pair list (evaluate.py streams the release's file itself);
2. ``features``: one pass over the loose crops, aligned to the ArcFace template in the data
   loader, through the deployed encoder (optionally with the flip test) and the predictor
   (CCS, CCAS) -> ``features/test_{features,ccs,ccas}.npy`` (test.py's extraction; an
   interrupted pass resumes; under ``torchrun`` it runs alone, sharded across the ranks);
3. ``templates``: ``templates_<variant>.npz`` (ids = IJB template ids) with the media rule
   (:func:`transfira.aggregation.aggregate_media_variants`);
4. ``evaluate``: evaluate.py on the official pairs -> ``evaluation/results.{csv,md}``.

``stages.json`` in ``outdir`` records each finished stage's inputs; a stage whose record
matches and whose outputs exist is skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..aggregation import VARIANTS, aggregate_media_variants
from ..config import REQUIRED, toml_text
from ..data import AUG_DEFAULTS
from ..errors import TransfiraError
from ..io import file_fingerprint, save_csv, save_id_vectors, save_json
from ..progress import log

STAGES = ("meta", "features", "templates", "evaluate")
# evaluate.py's job on the config file argv[1], run in its own process (no job imports another); found
# through the package, so it works from a checkout and from a non-editable install alike
EVALUATE_IN_ITS_OWN_PROCESS = ("import sys; from transfira.errors import run_cli; from transfira.jobs import evaluate; "
                               "run_cli(lambda: evaluate.run(evaluate.load_evaluate_config(sys.argv[1])))")
FMR_DEFAULT = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
SCHEMA: dict[str, Any] = {
    "root": REQUIRED,  # the release: <root>/loose_crop/, <root>/meta/
    "prefix": "ijbc",  # 'ijbc' or 'ijbb'
    "images_dir": "loose_crop",  # under root
    "backbone_type": "onnx",
    "model_path": REQUIRED,  # deployed encoder: template features
    "predictor_model_path": "",  # ONNX of the predictor's backbone ('' = model_path)
    "embedding_size": REQUIRED,
    "checkpoint_path": "",  # predictor; '' = no CCS/CCAS, baseline only
    "head_hidden": 0,
    "outdir": "output/ijbc/",
    "media_pooling": True,  # images of one media averaged first, then media combined
    "flip": False,  # feature of the image plus that of its mirror
    "det_score_weight": False,  # features scaled by the detector score before pooling (InsightFace D1)
    "normalize_features": False,  # L2-normalize image features before pooling (InsightFace: raw, N1)
    "variants": list(VARIANTS),
    "fmr": list(FMR_DEFAULT),
    "threshold_convention": "spec",  # 'insightface' adds InsightFace's nearest-FPR TAR rows
    "bootstrap": 0,  # evaluate.py's subject-bootstrap replicates for 95 % intervals (0 = none)
    "batch_size": 64,
    "num_workers": 2,
    "device": "auto",
    "on_bad_image": "error",
    "chunk_size": 2048,
    "aug": dict(AUG_DEFAULTS),
}


def check_config(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Value checks the schema cannot express; returns ``cfg``."""
    from ..ijb import PREFIXES

    if cfg["prefix"] not in PREFIXES:
        raise TransfiraError(f"{source}: prefix must be one of {', '.join(PREFIXES)}, got '{cfg['prefix']}'")
    unknown = [v for v in cfg["variants"] if v not in VARIANTS]
    if not cfg["variants"] or unknown:
        raise TransfiraError(f"{source}: variants must be a non-empty list of {', '.join(VARIANTS)}"
                             + (f" (unknown: {', '.join(map(str, unknown))})" if unknown else ""))
    if not cfg["checkpoint_path"] and any(VARIANTS[v][0] or VARIANTS[v][1] for v in cfg["variants"]):
        raise TransfiraError(f"{source}: variants {', '.join(cfg['variants'])} need the predictor: set "
                             "checkpoint_path, or variants = ['baseline']")
    fmrs = cfg["fmr"]
    if not isinstance(fmrs, list) or not fmrs or not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in fmrs):
        raise TransfiraError(f"{source}: 'fmr' must be a non-empty list of numbers in (0, 1]")
    for key in ("media_pooling", "flip", "det_score_weight", "normalize_features"):
        if not isinstance(cfg[key], bool):
            raise TransfiraError(f"{source}: '{key}' must be true or false")
    return cfg


def content_hash(path: Path) -> str:
    """SHA-1 of a file's bytes (the small tables this job writes: unchanged content, same hash)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class Stages:
    """The ``stages.json`` record: which stage ran with which inputs, which outputs it wrote."""

    def __init__(self, outdir: Path, force: bool = False):
        self.path = outdir / "stages.json"
        self.force = force
        try:
            self.done = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.done = {}

    def fresh(self, stage: str, inputs: Any, outputs: list[Path]) -> bool:
        record = self.done.get(stage)
        return (not self.force and record is not None and record["inputs"] == json.loads(json.dumps(inputs))
                and all(Path(p).is_file() for p in outputs))

    def finish(self, stage: str, inputs: Any, outputs: list[Path], seconds: float) -> None:
        self.done[stage] = {"inputs": inputs, "outputs": [str(p) for p in outputs], "seconds": round(seconds, 1)}
        save_json(self.path, self.done)


def extraction_config(cfg: dict[str, Any], outdir: Path) -> dict[str, Any]:
    """The extraction settings of the features stage (:func:`transfira.networks.embed_and_score`):
    aligned loose crops, the flip test as configured, no quality scores."""
    from ..alignment import LANDMARK_COLUMNS

    keys = ("backbone_type", "model_path", "predictor_model_path", "embedding_size", "checkpoint_path",
            "head_hidden", "batch_size", "num_workers", "device", "on_bad_image", "aug")
    return {**{k: cfg[k] for k in keys}, "outdir": str(outdir / "features"), "flip_test": cfg["flip"],
            "data": {"data_dir": str(Path(cfg["root"]) / cfg["images_dir"]), "annotations": str(outdir / "test.csv"),
                     "path_col_name": "path", "id_col_name": "template_id", "batch_size": 0,
                     "landmark_columns": list(LANDMARK_COLUMNS)}}


def stage_meta(cfg: dict[str, Any], outdir: Path) -> dict[str, Any]:
    from ..ijb import build_test_table, check_pairs_templates, meta_path, read_pairs

    table = build_test_table(cfg["root"], cfg["prefix"])
    pairs_path = meta_path(cfg["root"], cfg["prefix"], "pairs")
    pairs = read_pairs(pairs_path)
    check_pairs_templates(pairs, table, str(pairs_path))
    save_csv(table, outdir / "test.csv")
    media = table.groupby("template_id")["media_id"].nunique()
    genuine = int(pairs["label"].sum())
    log(f"{len(table)} images, {table['template_id'].nunique()} templates, {int(media.sum())} media "
        f"(median {media.median():g} per template); {genuine} genuine and {len(pairs) - genuine} impostor pairs")
    return {"images": len(table), "templates": int(table["template_id"].nunique()), "pairs": len(pairs)}


def stage_features(cfg: dict[str, Any], outdir: Path) -> None:
    from .. import distributed as dist_utils
    from ..backbone import resolve_device
    from ..networks import embed_and_score

    tcfg = extraction_config(cfg, outdir)
    frame = pd.read_csv(outdir / "test.csv")
    with dist_utils.process_group(resolve_device(tcfg["device"])) as info:  # under torchrun: every rank
        embed_and_score(tcfg, frame, True, bool(cfg["checkpoint_path"]), device=info.device)


def stage_templates(cfg: dict[str, Any], outdir: Path) -> list[Path]:
    frame = pd.read_csv(outdir / "test.csv", usecols=["template_id", "media_id", "det_score"])
    feats = outdir / "features"
    load = lambda name: np.load(feats / name, mmap_mode="r")  # noqa: E731
    scored = bool(cfg["checkpoint_path"])
    results = aggregate_media_variants(
        load("test_features.npy"), frame["template_id"].to_numpy(),
        frame["media_id"].to_numpy() if cfg["media_pooling"] else None,
        load("test_ccs.npy") if scored else None, load("test_ccas.npy") if scored else None, cfg["variants"],
        cfg["normalize_features"], image_scale=frame["det_score"].to_numpy() if cfg["det_score_weight"] else None)
    written = []
    for name, (ids, vectors, summary) in results.items():
        path = outdir / f"templates_{name}.npz"
        save_id_vectors(path, ids, vectors)
        save_csv(summary, outdir / f"templates_{name}_summary.csv")
        notes = [f"{int(summary[c].sum())} {what}" for c, what in
                 (("filter_fallback", "with no image of predicted CCAS > 0 (all kept)"),
                  ("weight_fallback", "with predicted-CCS sum ~ 0 (unweighted)")) if c in summary and summary[c].any()]
        empty = int((summary["images_usable"] == 0).sum())
        if empty:
            notes.append(f"{empty} without a usable image (left out)")
        log(f"{name}: {len(ids)} templates -> {path}" + (f"; templates {'; '.join(notes)}" if notes else ""))
        written.append(path)
    return written


def pairs_file(cfg: dict[str, Any], outdir: Path) -> Path:
    from ..ijb import meta_path

    return meta_path(cfg["root"], cfg["prefix"], "pairs")


def evaluate_config(cfg: dict[str, Any], outdir: Path) -> dict[str, Any]:
    """evaluate.py's config: the template variants on the official pairs."""
    return {"outdir": str(outdir / "evaluation"), "fmr": [float(f) for f in cfg["fmr"]], "chunk_size": cfg["chunk_size"],
            "device": cfg["device"], "threshold_convention": cfg["threshold_convention"], "bootstrap": cfg["bootstrap"],
            "templates": {v: str(outdir / f"templates_{v}.npz") for v in cfg["variants"]},
            "pairs": {"path": str(pairs_file(cfg, outdir))}}


def stage_evaluate(cfg: dict[str, Any], outdir: Path) -> Path:
    """Write ``evaluate.toml`` and run evaluate.py on it (another job: its own process)."""
    path = outdir / "evaluate.toml"
    path.write_text(toml_text(evaluate_config(cfg, outdir)))
    package_root = str(Path(__file__).resolve().parents[2])  # holds `transfira`: the checkout or site-packages
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", EVALUATE_IN_ITS_OWN_PROCESS, str(path)], env=env)
    if done.returncode:
        raise TransfiraError(f"evaluate.py --config {path} failed (exit status {done.returncode}; its error is above)")
    return path


def run(cfg: dict[str, Any], first: str = STAGES[0], last: str = STAGES[-1], force: bool = False
            ) -> dict[str, str]:
    """Run stages ``first`` .. ``last`` (skipping fresh ones unless ``force``); return ``{stage: 'ran'|'skipped'}``."""
    main = int(os.environ.get("RANK", "0")) == 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (first, last) != ("features", "features"):
        raise TransfiraError("under torchrun run_ijb.py runs the features stage alone "
                             "(--from features --to features); start the other stages with python")
    from ..ijb import META, meta_path

    outdir = Path(cfg["outdir"])
    outdir.mkdir(parents=True, exist_ok=True)
    if main:  # under torchrun rank 0 alone writes the records (the other ranks share the features stage)
        save_json(outdir / "run_ijb_config.json", cfg)
    record = Stages(outdir, force)
    feats = outdir / "features"
    scored = bool(cfg["checkpoint_path"])
    feature_files = [feats / "test_features.npy"] + ([feats / "test_ccs.npy", feats / "test_ccas.npy"] if scored else [])
    templates = [outdir / f"templates_{v}.npz" for v in cfg["variants"]]
    evaluation = [outdir / "evaluation" / "results.csv", outdir / "evaluation" / "results.md"]
    hashed = lambda path: content_hash(path) if path.is_file() else None  # noqa: E731
    inputs = {
        "meta": lambda: {"files": [file_fingerprint(meta_path(cfg["root"], cfg["prefix"], w)) for w in META]},
        "features": lambda: {"test_csv": hashed(outdir / "test.csv"),
                             "models": [file_fingerprint(cfg[k]) for k in ("model_path", "predictor_model_path",
                                                                           "checkpoint_path")],
                             **{k: cfg[k] for k in ("root", "images_dir", "backbone_type", "embedding_size",
                                                    "head_hidden", "flip", "aug")}},
        "templates": lambda: {"test_csv": hashed(outdir / "test.csv"), "features": list(map(file_fingerprint, feature_files)),
                              **{k: cfg[k] for k in ("media_pooling", "det_score_weight", "normalize_features",
                                                     "variants")}},
        "evaluate": lambda: {"pairs": file_fingerprint(pairs_file(cfg, outdir)),
                             "templates": list(map(file_fingerprint, templates)),
                             **{k: cfg[k] for k in ("fmr", "threshold_convention", "bootstrap")}},
    }
    outputs = {"meta": [outdir / "test.csv"],
               "features": feature_files,
               "templates": templates, "evaluate": evaluation}
    actions = {"meta": lambda: stage_meta(cfg, outdir), "features": lambda: stage_features(cfg, outdir),
               "templates": lambda: stage_templates(cfg, outdir), "evaluate": lambda: stage_evaluate(cfg, outdir)}
    if first not in STAGES or last not in STAGES or STAGES.index(first) > STAGES.index(last):
        raise TransfiraError(f"stages run from first to last of {', '.join(STAGES)}; got {first} .. {last}")
    status = {}
    for stage in STAGES[STAGES.index(first): STAGES.index(last) + 1]:
        missing = [p for s in STAGES[:STAGES.index(stage)] for p in outputs[s] if not p.is_file()]
        if missing:
            raise TransfiraError(f"[{stage}] needs {missing[0]}: run the earlier stages first")
        given = inputs[stage]()
        if record.fresh(stage, given, outputs[stage]):
            log(f"=== [{stage}] up to date, skipped (outputs: {', '.join(p.name for p in outputs[stage])})")
            status[stage] = "skipped"
            continue
        log(f"=== [{stage}]")
        start = time.perf_counter()
        actions[stage]()
        seconds = time.perf_counter() - start
        if main:
            record.finish(stage, given, outputs[stage], seconds)
        log(f"=== [{stage}] done in {seconds:.1f} s")
        status[stage] = "ran"
    if "evaluate" in status:
        log(f"results: {outdir / 'evaluation' / 'results.md'}")
    return status
