"""Score images: predicted CCS, CCAS and recognizability (CCAS > 0) for a folder or a CSV.

    python score.py --config configs/score.toml
    python score.py --model_path encoder.onnx --checkpoint predictor.pt --images photos/ --out scores.csv
    python score.py --model_path ../shared/models/w600k_mbf.onnx --images photos/   # the shipped predictor
    python score.py ... --csv test.csv --data_dir images/ --detect scrfd_500m_bnkps.onnx   # raw photos
    torchrun --standalone --nproc_per_node=8 score.py --config configs/score.toml   # one device per process

Writes path (or the CSV's columns), ccs, ccas, recognizable, error; with --detect one row per
face with its box, detector score and landmarks. Rerunning with the same --out resumes (also
with another number of torchrun processes: the output is the same as one process writes).
Flags override the config's keys (see configs/score.toml).
"""
from __future__ import annotations

import argparse

from transfira.errors import run_cli
from transfira.jobs import score

FLAGS = {  # flag: (config key, type, help)
    "model_path": ("model_path", str, "ONNX encoder the predictor was trained from"),
    "checkpoint": ("checkpoint_path", str, "predictor checkpoint (default: the one shipped in pretrained_weights/ "
                                          "for this encoder file)"),
    "images": ("images", str, "folder of images (recursive), or one image file"),
    "csv": ("csv", str, "CSV with a path column"),
    "data_dir": ("data_dir", str, "folder the CSV's paths are relative to"),
    "path_col_name": ("path_col_name", str, "path column of the CSV (default: path)"),
    "out": ("out", str, "output CSV (default: scores.csv); appended to and resumed"),
    "batch_size": ("batch_size", int, "images per batch (default: 64)"),
    "num_workers": ("num_workers", int, "image decoding workers (default: 2)"),
    "device": ("device", str, "auto | cpu | cuda | cuda:1 ..."),
    "embedding_size": ("embedding_size", int, "encoder output size (default: read from the encoder)"),
    "detect": ("detect", str, "SCRFD ONNX detector: score every face of raw photos"),
    "det_threshold": ("det_threshold", float, "detector score threshold (default: 0.5)"),
    "channel_order": ("channel_order", str, "RGB, or BGR for files written with swapped channels"),
    "on_bad_image": ("on_bad_image", str, "skip (default): an unreadable file gets an error row; error: stop"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config (see configs/score.toml)")
    for flag, (_, kind, text) in FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind, help=text)
    args = parser.parse_args(argv)
    given = {key: getattr(args, flag) for flag, (key, _, _) in FLAGS.items() if getattr(args, flag) is not None}
    score.run(score.score_config(args.config, given))


if __name__ == "__main__":
    run_cli(main)
