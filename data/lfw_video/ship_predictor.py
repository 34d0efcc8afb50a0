"""Copy the recipe's predictor of one encoder's run into ``pretrained_weights/`` with the facts its
model card needs: the encoder file's SHA-256, the headline numbers of ``analysis/results.json`` and a
small sample of scores that ``tests/test_pretrained.py`` reproduces.

    python data/lfw_video/ship_predictor.py --workdir output/lfw_video/mobilefacenet_arcface \\
        --model ../shared/models/mobilefacenet_arcface.onnx --name mobilefacenet_arcface_transfira

Writes ``pretrained_weights/<name>.pt`` (the heads-only checkpoint, as trained) and prints the card's
facts (Markdown) for ``pretrained_weights/<name>.md``; the prose of the card is written by hand.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from transfira import Predictor  # noqa: E402
from transfira.pretrained import PRETRAINED_DIR, file_sha256  # noqa: E402

# the sample: photos of test identities (never trained on) and AT&T/ORL, paths under ../shared/data
SAMPLE = ["lfw_aligned/images/Serena_Williams/Serena_Williams_0001.jpg",
          "lfw_aligned/images/Serena_Williams/Serena_Williams_0002.jpg",
          "lfw_aligned/images/Colin_Powell/Colin_Powell_0001.jpg",
          "lfw_aligned/images/Tony_Blair/Tony_Blair_0001.jpg"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--model", required=True, help="the encoder file the predictor was trained on")
    p.add_argument("--name", required=True)
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args(argv)
    work = Path(args.workdir)
    heads = tomllib.loads((work / "configs" / "analyse.toml").read_text())["heads"]["transfira"]
    target = PRETRAINED_DIR / f"{args.name}.pt"
    shutil.copyfile(heads, target)
    predictor = Predictor.from_files(args.model, target, device="cpu")
    scores = predictor.score([Path(args.shared) / s for s in SAMPLE])
    r = json.loads((work / "analysis" / "results.json").read_text())
    sample = {"paths": SAMPLE, "ccs": [round(float(x), 5) for x in scores.ccs],
              "ccas": [round(float(x), 5) for x in scores.ccas]}
    print(f"encoder file: `{Path(args.model).name}`\nencoder sha256: `{file_sha256(args.model)}`\n"
          f"checkpoint: `{target.name}`, {target.stat().st_size} bytes, sha256 `{file_sha256(target)}`\n")
    print("Spearman with true CCS (video-like LFW test frames):")
    for k in ("norm", "serfiq", "transfira CCS"):
        if k in r["spearman"]:
            v = r["spearman"][k]
            print(f"  {k}: {v['spearman']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
                  f" minus norm {v.get('delta_norm', 0):+.3f} [{v['delta_norm_ci'][0]:+.3f}, {v['delta_norm_ci'][1]:+.3f}]"
                  + (f" minus serfiq {v['delta_serfiq']:+.3f} [{v['delta_serfiq_ci'][0]:+.3f}, {v['delta_serfiq_ci'][1]:+.3f}]"
                     if "delta_serfiq" in v else ""))
    for k in ("baseline", "norm_weight", "serfiq_weight", "transfira_filter_weight", "true_filter_weight"):
        if k in r["tar"]:
            t = r["tar"][k]
            print(f"  TAR {k}: " + " / ".join(f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, (lo, hi) in zip(t["tar"], t["ci"]))
                  + "  vs mean " + " / ".join(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, (lo, hi) in
                                               zip(t["delta_baseline"], t["delta_baseline_ci"]))
                  + "  vs norm " + " / ".join(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, (lo, hi) in
                                               zip(t["delta_norm_weight"], t["delta_norm_weight_ci"])))
    for where in ("orl", "lfw1"):
        if r.get(where):
            for k, v in r[where]["ranking"].items():
                print(f"  {where} {k}: {v['spearman']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] minus norm "
                      f"{v['delta_norm']:+.3f} [{v['delta_norm_ci'][0]:+.3f}, {v['delta_norm_ci'][1]:+.3f}]")
    if r.get("orl"):
        c = r["orl"]["predictors"].get("transfira")
        if c:
            print(f"  orl cut: pred > 0 {c['cut0']['pred_pos']:.3f} vs true {c['cut0']['true_pos']:.3f}; agree "
                  f"{c['cut0']['agree']:.3f}; recut {c['recut']:+.3f}: {c['cut0_rest']['agree']:.3f} -> "
                  f"{c['recut_rest']['agree']:.3f}")
    c = r["cut"].get("transfira")
    if c:
        print(f"  test cut: pred > 0 {c['pred_pos']:.3f} vs true {c['true_pos']:.3f}; agree {c['agree']:.3f}")
    print("\n```json\n" + json.dumps(sample) + "\n```")


if __name__ == "__main__":
    main()
