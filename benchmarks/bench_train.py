"""Training throughput (images/s) of the predictor on CPU (or ``--device cuda``): where does the time go?

For two ONNX encoders converted like train.py does (the demo encoder and an IResNet-50 of
random weights, exported with the TorchScript exporter like InsightFace's models), measure
  - data only: the DataLoader decoding + preprocessing demo PNGs (``num_workers`` processes),
  - compute only: forward + backward + AdamW step on synthetic tensors,
  - full step: both together, as in train.py.

    python benchmarks/bench_train.py [--r50-batch 8] [--steps 3] [--workers 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from transfira.backbone import load_backbone, resolve_device
from transfira.data import ImageDataset, build_transform, make_loader
from transfira.demo import TinyFaceNet, export_onnx, make_images
from transfira.model import RecognizabilityPredictionNetwork


class IBasicBlock(nn.Module):
    """arcface_torch's IResNet block: BN, conv3x3, BN, PReLU, conv3x3 (stride), BN, + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (x if self.down is None else self.down(x))


class IResNet50(nn.Module):
    """IResNet-50 (layers 3, 4, 14, 3) with a 512-D BN-FC-BN head: the shape of w600k_r50."""

    def __init__(self, embedding_size: int = 512):
        super().__init__()
        layers, widths, cin = (3, 4, 14, 3), (64, 128, 256, 512), 64
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        blocks = []
        for n, width in zip(layers, widths):
            blocks += [IBasicBlock(cin, width, 2)] + [IBasicBlock(width, width, 1) for _ in range(n - 1)]
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn2 = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512 * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.bn2(self.blocks(self.stem(x))), 1)))


def sync() -> None:
    """Wait for queued CUDA work (timings of asynchronous GPU calls); nothing on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, steps: int, images_per_step: int) -> float:
    """Images per second of ``fn`` over ``steps`` calls, after one warm-up call."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return steps * images_per_step / (time.perf_counter() - start)


def bench(name: str, onnx_path: Path, emb: int, batch: int, steps: int, images: Path, paths: list[str], workers: int,
          device: torch.device = torch.device("cpu")):
    model = RecognizabilityPredictionNetwork(load_backbone("onnx", onnx_path), emb).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    targets = torch.rand(batch, 2)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        ccs, ccas = model(x)
        loss = nn.functional.mse_loss(ccs[:, 0], y[:, 0]) + nn.functional.mse_loss(ccas[:, 0], y[:, 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dataset = ImageDataset(images, paths, build_transform({}, train=True), torch.rand(len(paths), 2).numpy())
    loader = make_loader(dataset, batch, workers, shuffle=True, drop_last=True, device=device)
    batches = iter(())

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    synthetic = torch.randn(batch, 3, 112, 112, device=device)
    data_only = timed(next_batch, steps * 4, batch)
    compute = timed(lambda: step(synthetic, targets), steps, batch)
    full = timed(lambda: (lambda b: step(b["image"], b["target"]))(next_batch()), steps, batch)
    print(f"| {name} | {n_params / 1e6:.2f} M | {batch} | {data_only:.0f} | {compute:.1f} | {full:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--r50-batch", type=int, default=8)
    parser.add_argument("--demo-batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (full fp32, as train.py)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        frames = make_images(tmp, seed=0)
        paths = frames["train"].path.tolist()
        export_onnx(TinyFaceNet(), tmp / "demo.onnx")
        export_onnx(IResNet50().eval(), tmp / "r50.onnx")
        print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
              f"{args.workers} loader workers\n")
        print("| encoder | parameters | batch | data only (img/s) | compute only (img/s) | full step (img/s) |")
        print("| --- | --- | --- | --- | --- | --- |")
        bench("demo (TinyFaceNet)", tmp / "demo.onnx", 64, args.demo_batch, args.steps * 5, tmp / "images", paths,
              args.workers, device)
        bench("IResNet-50 (random)", tmp / "r50.onnx", 512, args.r50_batch, args.steps, tmp / "images", paths,
              args.workers, device)


if __name__ == "__main__":
    main()
