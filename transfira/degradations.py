"""Image degradations for synthetic and real-face protocols.

Each is a pure function ``(image, severity, seed) -> image`` on PIL RGB images, with
``severity`` in [0, 1]; severity 0 returns the image unchanged (a copy).
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _check(severity: float) -> float:
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    return float(severity)


def blur(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """Gaussian blur, radius up to 4 % of the image width."""
    radius = _check(severity) * 0.04 * image.width
    return image.copy() if radius == 0 else image.filter(ImageFilter.GaussianBlur(radius))


def noise(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """Additive Gaussian noise, sigma up to 80 grey levels."""
    sigma = _check(severity) * 80.0
    if sigma == 0:
        return image.copy()
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def occlusion(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """A grey rectangle covering up to 60 % of the image area at a random place."""
    area = _check(severity) * 0.6
    out = image.copy()
    if area == 0:
        return out
    rng = np.random.default_rng(seed)
    w, h = image.size
    aspect = rng.uniform(0.5, 2.0)
    ow = int(min(w, round(np.sqrt(area * w * h * aspect))))
    oh = int(min(h, round(area * w * h / max(ow, 1))))
    x, y = int(rng.integers(0, w - ow + 1)), int(rng.integers(0, h - oh + 1))
    shade = int(rng.integers(0, 256))
    ImageDraw.Draw(out).rectangle([x, y, x + ow - 1, y + oh - 1], fill=(shade, shade, shade))
    return out


def downscale(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """Down-sample by up to 8x and scale back up (low resolution)."""
    factor = 1.0 + 7.0 * _check(severity)
    if factor == 1.0:
        return image.copy()
    small = image.resize((max(1, round(image.width / factor)), max(1, round(image.height / factor))), Image.BILINEAR)
    return small.resize(image.size, Image.BILINEAR)


def jpeg(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """JPEG compression, quality from 95 (severity ~0) down to 3."""
    if _check(severity) == 0:
        return image.copy()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(round(95 - 92 * severity)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def lighting(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """Under- or over-exposure (random direction) with contrast loss."""
    s = _check(severity)
    if s == 0:
        return image.copy()
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    gamma = (1.0 + 3.0 * s) ** (1 if np.random.default_rng(seed).random() < 0.5 else -1)
    pixels = (pixels ** gamma) * (1.0 - 0.6 * s) + 0.3 * s * (gamma < 1)
    return Image.fromarray(np.clip(pixels * 255.0, 0, 255).astype(np.uint8))


DEGRADATIONS: dict[str, Callable[[Image.Image, float, int], Image.Image]] = {
    "blur": blur, "noise": noise, "occlusion": occlusion, "downscale": downscale, "jpeg": jpeg, "lighting": lighting,
}


def degrade(image: Image.Image, kind: str, severity: float, seed: int = 0) -> Image.Image:
    """Apply the degradation named ``kind`` (``"none"`` returns a copy)."""
    if kind == "none":
        return image.copy()
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation '{kind}' (known: none, {', '.join(DEGRADATIONS)})")
    return DEGRADATIONS[kind](image.convert("RGB"), severity, seed)
