"""SER-FIQ throughput (images/s) on CPU: the deployed encoder alone vs. encoder + m stochastic passes.

For MobileFaceNet (../shared/models/mobilefacenet_arcface.onnx, w600k_mbf.onnx when present)
and an IResNet-50 of random weights (benchmarks/bench_train.py's builder, exported with the
TorchScript exporter like InsightFace's models), converted as test.py does, measure on
synthetic 112 x 112 batches
  - encoder: one forward pass (what --generate_features costs anyway),
  - SER-FIQ: the layers before the last FC once, then m dropout passes of the head (the
    embedding comes out of the same call),
  - masks: building the m dropout masks (counter-based hash) once, shared by every image,
and print where the dropout goes, how many units it drops, and whether the masks are folded
into a global depthwise conv's weights (MobileFaceNet) instead of multiplying copies of the input.

    PYTHONPATH=. python benchmarks/bench_serfiq.py [--m 100] [--batch 8] [--steps 3] [--device cuda]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_train import IResNet50, timed as rate
from transfira.backbone import load_backbone, resolve_device
from transfira.demo import export_onnx
from transfira.quality import SerFiq, keep_masks

ROOT = Path(__file__).resolve().parents[1]
MODELS = next((p for p in (ROOT.parent / "shared" / "models", ROOT / "shared" / "models") if p.is_dir()),
              ROOT.parent / "shared" / "models")  # beside the checkout, or inside it (a copy on a GPU machine)


@torch.inference_mode()
def bench(name: str, path: Path, m: int, batch: int, steps: int, device: torch.device) -> None:
    net = load_backbone("onnx", path).to(device).eval()
    serfiq = SerFiq(net, 112, m=m)
    x = torch.randn(batch, 3, 112, 112, device=device)
    plain = rate(lambda: net(x), steps, batch)
    full = rate(lambda: serfiq(x), steps, batch)
    masks = 1e3 / rate(lambda: keep_masks(serfiq.seed, m, serfiq.units, serfiq.p, device), steps, 1)
    print(f"| {name} | `{serfiq.layer}` | {serfiq.units} | {'yes' if serfiq.fold else 'no'} | {m} | {batch} | "
          f"{plain:.1f} | {full:.1f} | "
          f"{plain / full:.2f} | {masks:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (full fp32, as test.py)")
    parser.add_argument("--models", nargs="*", default=["mobilefacenet_arcface.onnx", "w600k_mbf.onnx"],
                        help=f"ONNX files under {MODELS} (IResNet-50 of random weights is always added)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads\n")
    print("| encoder | dropout on the input of | units | masks folded | m | batch | encoder (img/s) | SER-FIQ (img/s) "
          "| slowdown | masks, once (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for file in args.models:
        if (MODELS / file).is_file():
            bench(file, MODELS / file, args.m, args.batch, args.steps, device)
        else:
            print(f"| {file} | (not found under {MODELS}) | | | | | | | | |")
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(IResNet50().eval(), Path(tmp) / "r50.onnx")
        bench("IResNet-50 (random)", Path(tmp) / "r50.onnx", args.m, args.batch, args.steps, device)


if __name__ == "__main__":
    main()
