"""Choose the clip severities for one encoder from the share of frames below the cut (CCAS <= 0).

    python data/lfw_video/calibrate_severity.py --model ../shared/models/w600k_mbf.onnx \\
        --out output/lfw_video/w600k_mbf/calibration.json

Uses **training identities only** (never val / test, never any TAR): the enrolment photos of all
train identities are the centers (SPEC eq. 2), and ``--ids`` of them get, from their first clip
photo, frames at every severity of ``--grid`` for every stack depth in ``--stacks`` (8 frames per
point: one per kind for a single degradation, drawn kinds for stacks). The share of degraded
frames with CCAS <= 0 at each grid point is interpolated linearly in the severity (severity 0 =
the clean photo), averaged over ``s ~ U[smin, 1]``, and the candidate ``(stack, smin)`` closest to
``--target`` is chosen. The first candidate is the issue's reference setting (one degradation,
U[0.3, 1]). The protocol config then uses the chosen values (written down in the doc).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.lfw_video.make_protocol import KINDS, build_tables, frame_plan, render  # noqa: E402

CANDIDATES = [(1, 0.3), (1, 0.5), (1, 0.7), (2, 0.3), (2, 0.5), (2, 0.7), (3, 0.5), (3, 0.7)]


def embed_onnx(model: str, images: list, batch: int = 32) -> np.ndarray:
    """Raw embeddings of PIL images with onnxruntime, input ``(p/255 - 0.5)/0.5`` (one thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = []
    for i in range(0, len(images), batch):
        x = np.stack([np.asarray(im, np.float32) for im in images[i: i + batch]])
        out.append(sess.run(None, {name: ((x / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()})[0])
    return np.concatenate(out).astype(np.float32)


def ccas_gallery(z: np.ndarray, own: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """CCAS of rows ``z`` against gallery ``centers`` (own center index ``own``): CCS - NNCCS (eq. 2-4)."""
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    cn = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    sim = zn @ cn.T
    ccs = sim[np.arange(len(z)), own]
    sim[np.arange(len(z)), own] = -np.inf
    return ccs - sim.max(1)


def expected_share(grid: list[float], share: list[float], clean: float, smin: float) -> float:
    """Mean of the piecewise-linear share(s) (share(0) = clean) over s ~ U[smin, 1]."""
    s = np.linspace(smin, 1.0, 201)
    return float(np.interp(s, [0.0, *grid], [clean, *share]).mean())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--lfw", default="../shared/data/lfw_aligned")
    p.add_argument("--out", required=True, help="calibration JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="45,5,50")
    p.add_argument("--ids", type=int, default=50, help="train identities that get calibration frames")
    p.add_argument("--grid", default="0.25,0.5,0.75,1.0")
    p.add_argument("--stacks", default="1,2,3")
    p.add_argument("--target", type=float, default=0.40, help="wanted share of degraded frames with CCAS <= 0")
    args = p.parse_args(argv)
    start = time.perf_counter()
    grid = [float(g) for g in args.grid.split(",")]
    stacks = [int(s) for s in args.stacks.split(",")]
    ns = SimpleNamespace(seed=args.seed, shares=tuple(int(s) for s in args.split.split(",")), max_ids_train=0,
                         max_ids_val=1, max_ids_test=1, clips_train=1, clips_val=0, clips_test=0, frames=1,
                         clean_frames=1, kinds=KINDS, stack=1, severity_min=0.0, severity_max=1.0)
    lfw = Path(args.lfw)
    tables = build_tables(pd.read_csv(lfw / "all.csv")[["path", "subject_id"]], ns)
    gallery, probes = tables["train_gallery"], tables["train_probes"]
    subjects = list(gallery["subject_id"])
    chosen = probes.drop_duplicates("subject_id").head(args.ids)
    images, rows = [], []
    for g in gallery.itertuples(index=False):
        images.append(render(SimpleNamespace(source=g.source, degradation="none"), lfw))
    for r in chosen.itertuples(index=False):
        own = subjects.index(r.subject_id)
        images.append(render(SimpleNamespace(source=r.source, degradation="none"), lfw))
        rows.append({"own": own, "stack": 0, "severity": 0.0, "kind": "none"})
        for stack in stacks:
            for level, sev in enumerate(grid):
                for f in range(len(KINDS)):
                    plan = frame_plan(r.source, 1000 * stack + 10 * level + f, args.seed, KINDS, stack, (sev, sev))
                    if stack == 1:
                        plan["degradation"] = KINDS[f]
                    images.append(render(SimpleNamespace(source=r.source, **plan), lfw))
                    rows.append({"own": own, "stack": stack, "severity": sev, "kind": plan["degradation"]})
    z = embed_onnx(args.model, images)
    centers, frames = z[: len(gallery)], z[len(gallery):]
    table = pd.DataFrame(rows)
    table["ccas"] = ccas_gallery(frames, table["own"].to_numpy(), centers)
    table["below"] = table["ccas"] <= 0
    clean = float(table.loc[table["stack"] == 0, "below"].mean())
    curve = {st: [float(table[(table["stack"] == st) & (table["severity"] == s)]["below"].mean()) for s in grid]
             for st in stacks}
    per_kind = table[table["stack"] == 1].groupby(["kind", "severity"])["below"].mean().unstack().round(3)
    cands = [{"stack": st, "severity_min": sm, "share": round(expected_share(grid, curve[st], clean, sm), 4)}
             for st, sm in CANDIDATES if st in curve]
    best = min(cands, key=lambda c: abs(c["share"] - args.target))
    result = {"model": args.model, "train_identities_as_centers": len(gallery), "calibration_identities": len(chosen),
              "frames_embedded": len(frames), "grid": grid, "clean_share": clean,
              "share_by_stack_and_severity": {str(k): v for k, v in curve.items()},
              "share_by_kind_single": {k: {str(s): float(v) for s, v in row.items()} for k, row in per_kind.iterrows()},
              "candidates": cands, "target": args.target, "chosen": best,
              "seconds": round(time.perf_counter() - start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("clean_share", "share_by_stack_and_severity", "candidates", "chosen",
                                              "seconds")}, indent=1))
    print(per_kind.to_string())
    return result


if __name__ == "__main__":
    main()
