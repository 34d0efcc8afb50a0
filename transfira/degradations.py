"""Image degradations for synthetic and real-face protocols and for explain.py's sweeps.

Each is a pure function ``(image, severity, seed) -> image`` on PIL RGB images, with
``severity`` in [0, 1]; severity 0 returns the image unchanged (a copy). Every one is
monotone in its severity for a fixed seed: the same random draws (noise pattern, patch
place and shade, direction) at every severity, and a damage that only grows -- blur radius,
noise sigma, down-scaling factor, JPEG quality loss, occluded area (the patches are nested),
brightness up (over-exposure) or down (under-exposure), rotation angle. ``hflip`` is binary:
any severity > 0 mirrors the image. The eye and mouth patches assume an ArcFace-aligned
face (:data:`transfira.alignment.ARCFACE_TEMPLATE`, scaled to the image size).
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
    """A grey rectangle covering up to 60 % of the image area at a random place.

    Aspect ratio, relative place and shade depend on the seed only, so the rectangles of one
    seed are nested: a higher severity covers everything a lower one does.
    """
    area = _check(severity) * 0.6
    out = image.copy()
    if area == 0:
        return out
    rng = np.random.default_rng(seed)
    w, h = image.size
    aspect, u, v = rng.uniform(0.5, 2.0), rng.random(), rng.random()
    shade = int(rng.integers(0, 256))
    pixels = area * w * h
    ow, oh = np.sqrt(pixels * aspect), np.sqrt(pixels / aspect)
    if ow > w:
        ow, oh = w, min(h, pixels / w)
    elif oh > h:
        ow, oh = min(w, pixels / h), h
    ow, oh = int(round(ow)), int(round(oh))
    x, y = int(np.floor(u * (w - ow))), int(np.floor(v * (h - oh)))
    ImageDraw.Draw(out).rectangle([x, y, x + ow - 1, y + oh - 1], fill=(shade, shade, shade))
    return out


def _patch(image: Image.Image, center: tuple[float, float], width: float, height: float, seed: int) -> Image.Image:
    """A grey rectangle of ``width`` x ``height`` (fractions of the image) centered at ``center``
    (template coordinates of a 112x112 aligned face), clipped to the image; shade from the seed."""
    out = image.copy()
    w, h = image.size
    cx, cy = center[0] * w / 112.0, center[1] * h / 112.0
    half_w, half_h = width * w / 2, height * h / 2
    if half_w <= 0 or half_h <= 0:
        return out
    box = [max(0, int(np.floor(cx - half_w))), max(0, int(np.floor(cy - half_h))),
           min(w, int(np.ceil(cx + half_w))) - 1, min(h, int(np.ceil(cy + half_h))) - 1]
    shade = int(np.random.default_rng(seed).integers(0, 96))  # dark, like sunglasses or a mask
    ImageDraw.Draw(out).rectangle(box, fill=(shade, shade, shade))
    return out


def occlusion_eyes(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """A dark band over both eyes (sunglasses): 35 % -> 100 % of the width, up to 30 % of the height."""
    s = _check(severity)
    if s == 0:
        return image.copy()
    from .alignment import ARCFACE_TEMPLATE

    return _patch(image, tuple(ARCFACE_TEMPLATE[:2].mean(0)), 0.35 + 0.65 * s, 0.3 * s, seed)


def occlusion_mouth(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """A dark patch over the mouth (a mask): 30 % -> 80 % of the width, up to 30 % of the height."""
    s = _check(severity)
    if s == 0:
        return image.copy()
    from .alignment import ARCFACE_TEMPLATE

    return _patch(image, tuple(ARCFACE_TEMPLATE[3:].mean(0)), 0.3 + 0.5 * s, 0.3 * s, seed)


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


def underexpose(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """Darker with contrast loss: ``p' = p^(1 + 3s) (1 - 0.6 s)`` on [0, 1] pixels (every pixel
    darkens as the severity grows)."""
    s = _check(severity)
    if s == 0:
        return image.copy()
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return _to_image(pixels ** (1.0 + 3.0 * s) * (1.0 - 0.6 * s))


def overexpose(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """Brighter with contrast loss, the mirror of :func:`underexpose`:
    ``p' = 1 - (1 - p)^(1 + 3s) (1 - 0.6 s)`` (every pixel brightens as the severity grows)."""
    s = _check(severity)
    if s == 0:
        return image.copy()
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return _to_image(1.0 - (1.0 - pixels) ** (1.0 + 3.0 * s) * (1.0 - 0.6 * s))


def lighting(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """Under- or over-exposure, the direction drawn from the seed (:func:`underexpose`, :func:`overexpose`).

    Until version 0.1 the over-exposed direction was ``p^(1/(1+3s)) (1 - 0.6 s) + 0.3 s``, which
    turns grey rather than brighter at high severity; it is now monotone in brightness.
    """
    _check(severity)
    darker = np.random.default_rng(seed).random() < 0.5
    return (underexpose if darker else overexpose)(image, severity, seed)


def rotation(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """In-plane rotation about the image center by up to 60 degrees (direction from the seed), border 0."""
    angle = _check(severity) * 60.0 * (1 if np.random.default_rng(seed).random() < 0.5 else -1)
    if angle == 0:
        return image.copy()
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))


def hflip(image: Image.Image, severity: float, seed: int = 0) -> Image.Image:
    """The mirror image for any severity > 0 (a binary degradation; recognition should barely care)."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if _check(severity) > 0 else image.copy()


def _to_image(pixels: np.ndarray) -> Image.Image:
    """[0, 1] float pixels to uint8 (truncated, as the first version of ``lighting`` did)."""
    return Image.fromarray(np.clip(pixels * 255.0, 0, 255).astype(np.uint8))


DEGRADATIONS: dict[str, Callable[[Image.Image, float, int], Image.Image]] = {
    "blur": blur, "noise": noise, "occlusion": occlusion, "downscale": downscale, "jpeg": jpeg, "lighting": lighting,
    "underexpose": underexpose, "overexpose": overexpose, "rotation": rotation, "hflip": hflip,
    "occlusion_eyes": occlusion_eyes, "occlusion_mouth": occlusion_mouth,
}
CLASSIC = ("blur", "noise", "occlusion", "downscale", "jpeg", "lighting")  # the demo's and the first LFW protocol's


def degrade(image: Image.Image, kind: str, severity: float, seed: int = 0) -> Image.Image:
    """Apply the degradation named ``kind`` (``"none"`` returns a copy)."""
    if kind == "none":
        return image.copy()
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation '{kind}' (known: none, {', '.join(DEGRADATIONS)})")
    return DEGRADATIONS[kind](image.convert("RGB"), severity, seed)


def degrade_chain(image: Image.Image, kinds: tuple[str, ...] | list[str], severity: float, seed: int = 0) -> Image.Image:
    """Apply ``kinds`` one after the other at one ``severity``; kind ``i`` gets pixel seed ``seed + i``
    (how the video-like protocol renders a frame with stacked degradations)."""
    image = image.convert("RGB")
    for i, kind in enumerate(kinds):
        image = degrade(image, kind, severity, (int(seed) + i) % 2**32)
    return image


def draw_degradation(seed: int, epoch: int, index: int, kinds: tuple[str, ...] | list[str], stack: int,
                     severity: tuple[float, float], p_clean: float) -> tuple[tuple[str, ...], float, int]:
    """``(kinds, severity, pixel_seed)`` of image ``index`` in ``epoch``: clean (``()``) with probability
    ``p_clean``, else ``stack`` distinct kinds in a random order at one severity ``U[lo, hi]``.
    A function of (seed, epoch, index) alone, identical on every platform, worker and rank."""
    rng = np.random.default_rng((int(seed), int(epoch), int(index), 0x5EED))
    clean, u, pixel_seed = rng.random(), rng.random(), int(rng.integers(0, 2**31))
    order = rng.permutation(len(kinds))
    if clean < p_clean:
        return (), 0.0, pixel_seed
    return tuple(kinds[k] for k in order[:stack]), float(severity[0] + (severity[1] - severity[0]) * u), pixel_seed
