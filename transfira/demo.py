"""Built-in demo: procedural face-like identities and a tiny ONNX face encoder.

``python -m transfira.demo OUTDIR`` writes everything the demo configs need:
``images/``, ``train.csv``, ``val.csv``, ``test.csv`` (with ``template_id``),
``test_gallery.csv``, ``test_probes.csv``, ``test_templates.csv`` and ``encoder.onnx``.
Each image records the degradation applied to it (``degradation``, ``severity``), so the
labels can be checked against a known cause of poor recognizability.
"""
from __future__ import annotations

import argparse
import io
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw
from torch import nn

from .degradations import CLASSIC, degrade
from .io import atomic_path, save_csv

SIZE = 112
SPLITS = {"train": (0, 48, 12), "val": (48, 12, 10), "test": (60, 24, 10)}  # first id, identities, images each


def identity_params(subject: int) -> dict:
    """Appearance of identity ``subject``: a deterministic function of its number."""
    rng = np.random.default_rng(1000 + subject)
    return {
        "skin": rng.integers(90, 240, 3), "hair": rng.integers(0, 200, 3), "iris": rng.integers(0, 200, 3),
        "face_w": rng.uniform(30, 44), "face_h": rng.uniform(40, 52), "eye_dx": rng.uniform(10, 18),
        "eye_y": rng.uniform(-12, -2), "eye_r": rng.uniform(3, 7), "brow": rng.uniform(-0.4, 0.4),
        "nose_l": rng.uniform(6, 16), "mouth_w": rng.uniform(8, 22), "mouth_y": rng.uniform(16, 26),
        "hair_h": rng.uniform(4, 24), "glasses": rng.random() < 0.3,
        "marks": rng.uniform(-1, 1, (rng.integers(2, 6), 2)) * [24, 30], "mark_rgb": rng.integers(0, 256, 3),
    }


def render_face(p: dict, rng: np.random.Generator) -> Image.Image:
    """Draw one image of identity ``p`` with small pose, expression and lighting changes."""
    bg = tuple(int(v) for v in rng.integers(40, 220, 3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    cx, cy = SIZE / 2 + rng.normal(0, 2), SIZE / 2 + 4 + rng.normal(0, 2)
    tone = rng.uniform(0.85, 1.15)
    col = lambda c: tuple(int(min(255, max(0, v * tone))) for v in c)  # noqa: E731
    fw, fh = p["face_w"], p["face_h"]
    d.ellipse([cx - fw - 2, cy - fh - p["hair_h"], cx + fw + 2, cy + fh * 0.2], fill=col(p["hair"]))
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=col(p["skin"]))
    for mx, my in p["marks"]:
        d.ellipse([cx + mx - 2.5, cy + my - 2.5, cx + mx + 2.5, cy + my + 2.5], fill=col(p["mark_rgb"]))
    ey = cy + p["eye_y"]
    for side in (-1, 1):
        ex, r = cx + side * p["eye_dx"], p["eye_r"]
        d.ellipse([ex - r * 1.4, ey - r, ex + r * 1.4, ey + r], fill=(245, 245, 245))
        d.ellipse([ex - r * 0.7, ey - r * 0.7, ex + r * 0.7, ey + r * 0.7], fill=col(p["iris"]))
        slope = side * p["brow"] * r * 2
        d.line([ex - r * 1.6, ey - r * 1.8 + slope, ex + r * 1.6, ey - r * 1.8 - slope], fill=col(p["hair"]), width=3)
        if p["glasses"]:
            d.ellipse([ex - r * 2, ey - r * 1.6, ex + r * 2, ey + r * 1.6], outline=(20, 20, 20), width=2)
    d.line([cx, ey + 4, cx - 3, ey + 4 + p["nose_l"], cx + 3, ey + 4 + p["nose_l"]], fill=col(p["skin"] * 0.6), width=2)
    smile = rng.uniform(-4, 6)
    my, mw = cy + p["mouth_y"], p["mouth_w"]
    d.line([cx - mw, my - smile / 2, cx, my + smile / 2, cx + mw, my - smile / 2], fill=(150, 40, 50), width=3)
    return img.rotate(rng.normal(0, 5), resample=Image.BILINEAR, fillcolor=bg)


def random_degradation(rng: np.random.Generator, clean_share: float = 0.35) -> tuple[str, float]:
    """A (kind, severity) pair: clean with probability ``clean_share``, else uniform kind and severity."""
    if rng.random() < clean_share:
        return "none", 0.0
    return str(rng.choice(list(CLASSIC))), float(np.round(rng.uniform(0.15, 1.0), 3))


def make_images(outdir: Path, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Render every split into ``outdir/images`` and return one annotation frame per split."""
    frames = {}
    for split, (first, count, per_id) in SPLITS.items():
        rows = []
        for subject in range(first, first + count):
            params = identity_params(subject)
            for i in range(per_id):
                rng = np.random.default_rng([seed, subject, i])
                kind, severity = random_degradation(rng)
                image = degrade(render_face(params, rng), kind, severity, seed=int(rng.integers(1 << 31)))
                path = f"{split}/{subject:03d}/{i:02d}.png"
                (outdir / "images" / path).parent.mkdir(parents=True, exist_ok=True)
                image.save(outdir / "images" / path)
                rows.append({"path": path, "subject_id": subject, "degradation": kind, "severity": severity})
        frames[split] = pd.DataFrame(rows)
    return frames


class TinyFaceNet(nn.Module):
    """An InsightFace-shaped encoder in miniature: Conv, BatchNorm, PReLU, residual Add, Gemm."""

    def __init__(self, embedding_size: int = 64):
        super().__init__()
        block = lambda i, o, s: nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.PReLU(o))  # noqa: E731
        self.stem = nn.Sequential(nn.AvgPool2d(2), block(3, 16, 2), block(16, 32, 2))  # 14x14
        self.res = nn.Sequential(block(32, 32, 1), nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32))
        self.tail = block(32, 48, 2)  # 7x7
        self.fc = nn.Linear(48 * 7 * 7, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.res(x)
        return self.fc(torch.flatten(self.tail(x), 1))


def train_encoder(embedding_size: int = 64, steps: int = 200, seed: int = 0, pool_per_id: int = 16) -> TinyFaceNet:
    """Fit the tiny encoder with a normalized-softmax (CosFace-style) loss on the train identities.

    Images (a pool of ``pool_per_id`` renders per identity) carry mild degradations, so the encoder is robust to mild
    and not to severe degradation, like a real encoder.
    """
    torch.manual_seed(seed)
    first, count, _ = SPLITS["train"]
    params = [identity_params(s) for s in range(first, first + count)]
    net = TinyFaceNet(embedding_size)
    classes = nn.Parameter(torch.randn(count, embedding_size) * 0.01)
    opt = torch.optim.AdamW([*net.parameters(), classes], lr=3e-3, weight_decay=5e-4)
    rng = np.random.default_rng(seed + 1)
    pool_labels = np.repeat(np.arange(count), pool_per_id)
    pool = []
    for label in pool_labels:
        kind, severity = random_degradation(rng, clean_share=0.5)
        img = degrade(render_face(params[label], rng), kind, severity * 0.35, int(rng.integers(1 << 31)))
        pool.append(np.asarray(img, dtype=np.uint8))
    pool_x = (torch.from_numpy(np.stack(pool)).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    for step in range(steps):
        pick = rng.integers(0, len(pool_x), 32)
        labels, x = pool_labels[pick], pool_x[pick]
        cos = nn.functional.normalize(net(x)) @ nn.functional.normalize(classes).T
        target = torch.as_tensor(labels)
        margin = nn.functional.one_hot(target, count) * 0.3
        loss = nn.functional.cross_entropy(24.0 * (cos - margin), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def export_onnx(net: nn.Module, path: Path, input_size: int = SIZE) -> None:
    """Export with the TorchScript exporter, keeping BatchNormalization nodes (InsightFace style)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(), torch.zeros(1, 3, input_size, input_size), buffer, dynamo=False, opset_version=13,
            input_names=["input"], output_names=["embedding"], dynamic_axes={"input": {0: "n"}, "embedding": {0: "n"}},
            do_constant_folding=False,
        )
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


SHIPPED_ENCODER = Path(__file__).parent / "assets" / "demo_encoder.onnx"  # train_encoder(steps=200, seed=0)


def make_demo(outdir: str | Path, seed: int = 0, encoder_steps: int | None = None) -> Path:
    """Write the demo dataset and encoder into ``outdir``; return ``outdir``.

    ``encoder_steps = None`` copies the shipped encoder (:data:`SHIPPED_ENCODER`, made once by
    ``train_encoder(steps=200, seed=0)``), so the demo's numbers do not depend on the platform's
    kernels; a number trains a new encoder with that many steps and ``seed``.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    frames = make_images(outdir, seed)
    save_csv(frames["train"], outdir / "train.csv")
    save_csv(frames["val"], outdir / "val.csv")
    test = frames["test"].copy()
    half = test.groupby("subject_id").cumcount() >= SPLITS["test"][2] // 2
    test["template_id"] = test["subject_id"] * 2 + half.astype(int)  # enrol / probe template per identity
    save_csv(test, outdir / "test.csv")
    save_csv(test.drop_duplicates("template_id")[["template_id", "subject_id"]], outdir / "test_templates.csv")
    save_csv(test[~half], outdir / "test_gallery.csv")
    save_csv(test[half], outdir / "test_probes.csv")
    if encoder_steps is None:
        with atomic_path(outdir / "encoder.onnx") as tmp:
            tmp.write_bytes(SHIPPED_ENCODER.read_bytes())
    else:
        export_onnx(train_encoder(steps=encoder_steps, seed=seed), outdir / "encoder.onnx")
    return outdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", default="demo_data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder-steps", type=int, default=None,
                        help="train a new encoder with this many steps (default: copy the shipped one)")
    args = parser.parse_args()
    start = time.time()
    make_demo(args.outdir, args.seed, args.encoder_steps)
    print(f"demo data and encoder written to {args.outdir} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
