"""Scoring throughput on CPU: the Predictor API (PyTorch) vs the exported ONNX graph (onnxruntime),
for the demo encoder and (when ../shared is present) the real MobileFaceNet; SCRFD + alignment per photo.

    PYTHONPATH=. python benchmarks/bench_score.py [--n 256] [--batch 32] [--threads 2]

Images are 112 x 112 uint8 arrays; both paths include preprocessing (the API: the shared
torchvision transform; onnxruntime: numpy ``(x / 255 - mean) / std``). The predictor heads are
random (speed does not depend on the weights). Photos for the detector: AT&T faces 2x on a
grey 640 x 480 canvas (real faces, so every photo gives one detection to align).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def best_of(fn, repeat: int) -> float:
    """Fastest of ``repeat`` timed calls (seconds), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_encoder(name: str, encoder: Path, images: list[np.ndarray], batch: int, threads: int, repeat: int,
                  tmp: Path) -> None:
    import onnxruntime
    import torch

    from transfira.backbone import embedding_dim, load_backbone
    from transfira.export import export_onnx, read_metadata
    from transfira.model import RecognizabilityPredictionNetwork
    from transfira.predictor import Predictor

    backbone = load_backbone("onnx", encoder)
    model = RecognizabilityPredictionNetwork(backbone, embedding_dim(backbone, 112))
    torch.save(model.state_dict(), tmp / f"{name}.pt")
    predictor = Predictor.from_files(encoder, tmp / f"{name}.pt", "cpu", batch_size=batch)
    export_onnx(predictor.model, predictor.aug, tmp / f"{name}.onnx")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(tmp / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
    meta = read_metadata(tmp / f"{name}.onnx")
    mean, std = np.float32(meta["mean"]), np.float32(meta["std"])
    stack = np.stack(images)

    def run_ort():
        for i in range(0, len(stack), batch):
            x = ((stack[i:i + batch].astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
            session.run(["ccs", "ccas"], {"image": np.ascontiguousarray(x)})

    api = best_of(lambda: predictor.score(images), repeat)
    ort = best_of(run_ort, repeat)
    x = predictor.preprocess(images[:batch])
    diff = max(np.abs(a - b).max() for a, b in zip(session.run(["ccs", "ccas"], {"image": x.numpy()}),
                                                   predictor.forward(x)))
    print(f"{name:>22}: API (torch) {len(images) / api:7.1f} img/s | ONNX (onnxruntime) {len(images) / ort:7.1f} img/s"
          f" | batch {batch}, {threads} threads, max |ort - torch| {diff:.1e}")


def bench_detector(n: int, threads: int, repeat: int) -> None:
    from PIL import Image

    from transfira.alignment import align_face
    from transfira.detection import SCRFD

    detector = SCRFD(SHARED / "models" / "scrfd_500m_bnkps.onnx", threads=threads)
    faces = sorted((SHARED / "data" / "att_orl" / "images").glob("*/*.png"))[:n]
    photos = []
    for path in faces:
        face = Image.open(path).convert("RGB")
        photo = Image.new("RGB", (640, 480), (128, 128, 128))
        photo.paste(face.resize((face.width * 2, face.height * 2)), (200, 100))
        photos.append(np.asarray(photo))
    found = [0]

    def run():
        found[0] = 0
        for photo in photos:
            dets = detector.detect(photo)
            found[0] += len(dets)
            pil = Image.fromarray(photo)
            for landmarks in dets.landmarks:
                align_face(pil, landmarks)

    seconds = best_of(run, repeat)
    print(f"{'SCRFD-500M + align':>22}: {len(photos) / seconds:7.1f} photos/s (640 x 480, {found[0]} faces in "
          f"{len(photos)} photos, {threads} threads)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="images per timed run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="timed runs; the fastest is shown")
    p.add_argument("--photos", type=int, default=64, help="photos for the detector")
    a = p.parse_args()

    import torch

    from transfira.demo import export_onnx as export_demo_encoder
    from transfira.demo import train_encoder

    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(a.n)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_demo_encoder(train_encoder(steps=1), tmp / "demo_encoder.onnx")
        bench_encoder("demo encoder (64-D)", tmp / "demo_encoder.onnx", images, a.batch, a.threads, a.repeat, tmp)
        mobile = SHARED / "models" / "mobilefacenet_arcface.onnx"
        if mobile.is_file():
            bench_encoder("MobileFaceNet (192-D)", mobile, images, a.batch, a.threads, a.repeat, tmp)
        else:
            print(f"skipped MobileFaceNet: {mobile} not found")
    if (SHARED / "models" / "scrfd_500m_bnkps.onnx").is_file() and (SHARED / "data" / "att_orl").is_dir():
        bench_detector(a.photos, a.threads, a.repeat)
    else:
        print("skipped SCRFD: ../shared/models/scrfd_500m_bnkps.onnx or ../shared/data/att_orl not found")


if __name__ == "__main__":
    main()
