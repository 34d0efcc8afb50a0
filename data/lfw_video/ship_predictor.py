"""Copy the recipe's predictor of one encoder's run into ``pretrained_weights/`` with the facts its
model card needs: the encoder file's SHA-256, the headline numbers of the evaluate stage and a
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

import pandas as pd

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
    sample = {"paths": SAMPLE, "ccs": [round(float(x), 5) for x in scores.ccs],
              "ccas": [round(float(x), 5) for x in scores.ccas]}
    print(f"encoder file: `{Path(args.model).name}`\nencoder sha256: `{file_sha256(args.model)}`\n"
          f"checkpoint: `{target.name}`, {target.stat().st_size} bytes, sha256 `{file_sha256(target)}`\n")
    for where, title in (("evaluation", "video-like LFW test frames"), ("evaluation_orl", "AT&T/ORL"),
                         ("evaluation_lfw1", "first LFW protocol, test split")):
        if (work / where / "image_results.csv").is_file():
            print(f"Spearman with true CCS ({title}):")
            ranking_lines(pd.read_csv(work / where / "image_results.csv"))
    tar = pd.read_csv(work / "evaluation" / "results.csv")
    for variant in ("baseline", "norm_weight", "serfiq_weight", "filter_weight", "true_filter_weight"):
        rows = tar[tar["variant"] == variant].sort_values("fmr", ascending=False)
        if len(rows):
            print(f"  TAR {variant}: " + " / ".join(f"{r.tar:.3f} [{r.tar_lo:.3f}, {r.tar_hi:.3f}]" for r in rows.itertuples())
                  + "  vs mean " + " / ".join(f"{r.delta:+.3f} [{r.delta_lo:+.3f}, {r.delta_hi:+.3f}]" for r in rows.itertuples())
                  + ("  vs norm " + " / ".join(f"{r.delta_norm_weight:+.3f} [{r.delta_norm_weight_lo:+.3f}, "
                                               f"{r.delta_norm_weight_hi:+.3f}]" for r in rows.itertuples())
                     if "delta_norm_weight" in rows else ""))
    for where in ("evaluation", "evaluation_orl"):
        if (work / where / "cut_agreement.csv").is_file():
            cuts = pd.read_csv(work / where / "cut_agreement.csv")
            for r in cuts[cuts["measure"] == "transfira_ccas"].itertuples():
                print(f"  {where} cut ({r.images}, cut {r.cut:+.3f}): pred > 0 {r.pred_pos:.3f} vs true {r.true_pos:.3f}; "
                      f"agree {r.agree:.3f}")
    print("\n```json\n" + json.dumps(sample) + "\n```")


def ranking_lines(table: pd.DataFrame) -> None:
    """Each CCS score's Spearman with true CCS and its paired differences to the norm and SER-FIQ."""
    for r in table.drop_duplicates("measure").to_dict("records"):
        if r["target"] != "ccs":
            continue
        line = f"  {r['measure']}: {r['sc']:.3f} [{r['sc_lo']:.3f}, {r['sc_hi']:.3f}]"
        for ref in ("norm", "serfiq"):
            if not pd.isna(r.get(f"sc_minus_{ref}", float("nan"))):
                line += (f" minus {ref} {r[f'sc_minus_{ref}']:+.3f} [{r[f'sc_minus_{ref}_lo']:+.3f}, "
                         f"{r[f'sc_minus_{ref}_hi']:+.3f}]")
        print(line)


if __name__ == "__main__":
    main()
