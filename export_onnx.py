"""Export a trained predictor to ONNX: one graph image -> (ccs, ccas), dynamic batch.

    python export_onnx.py --model_path encoder.onnx --checkpoint predictor.pt --out transfira.onnx [--fp16]
    python export_onnx.py --config configs/test.toml --out transfira.onnx

The preprocessing the graph expects (input size, RGB order, mean, std) is stored in the
model's metadata and printed; the file runs with onnxruntime alone (no PyTorch).
"""
from __future__ import annotations

import argparse
import json

from transfira.errors import TransfiraError, run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a test/score/train TOML giving model_path, checkpoint_path, [aug]")
    parser.add_argument("--model_path", help="ONNX encoder the predictor was trained from")
    parser.add_argument("--checkpoint", help="predictor checkpoint (default with --model_path: the one shipped in "
                                             "pretrained_weights/ for that encoder file)")
    parser.add_argument("--embedding_size", type=int, help="encoder output size (default: read from the encoder)")
    parser.add_argument("--head_hidden", type=int, default=None, help=argparse.SUPPRESS)  # read from the checkpoint
    parser.add_argument("--out", default="transfira.onnx", help="output ONNX file (default: transfira.onnx)")
    parser.add_argument("--fp16", action="store_true", help="half-precision weights (float32 input and outputs)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    args = parser.parse_args(argv)

    from transfira.export import export_onnx
    from transfira.predictor import Predictor

    if args.config:
        predictor = Predictor.from_config(args.config, args.checkpoint, device="cpu")
    elif args.model_path:
        predictor = Predictor.from_files(args.model_path, args.checkpoint or "", "cpu", args.embedding_size)
    else:
        raise TransfiraError("give --config, or --model_path (and --checkpoint)")
    if predictor.source:
        print(f"using the shipped predictor {predictor.source}")
    metadata = export_onnx(predictor.model, predictor.aug, args.out, args.fp16, args.opset)
    print(f"wrote {args.out}; preprocessing (stored in its metadata):")
    for key, value in metadata.items():
        print(f"  {key} = {json.dumps(value)}")


if __name__ == "__main__":
    run_cli(main)
