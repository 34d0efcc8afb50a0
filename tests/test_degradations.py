"""transfira.degradations: identity at severity 0, shape/mode, determinism, monotone effect, errors."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from transfira.degradations import (DEGRADATIONS, blur, degrade, downscale, hflip, jpeg, lighting, noise, occlusion,
                                    occlusion_eyes, occlusion_mouth, overexpose, rotation, underexpose)

KINDS = sorted(DEGRADATIONS)
SEVERITIES = (0.25, 0.5, 1.0)


@pytest.fixture(scope="module")
def face() -> Image.Image:
    """A 112x96 RGB test card: smooth gradients plus fine random texture (high and low frequencies)."""
    rng = np.random.default_rng(7)
    h, w = 112, 96
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 160 + 40, y / h * 160 + 40, (x + y) / (w + h) * 120 + 60], axis=-1)
    texture = rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8), "RGB")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def high_freq(image: Image.Image) -> float:
    """Mean absolute difference of neighbouring pixels (a high-frequency energy measure)."""
    a = pixels(image)
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


def mse(a: Image.Image, b: Image.Image) -> float:
    return float(((pixels(a) - pixels(b)) ** 2).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_severity_zero_is_identity_copy(face, kind):
    for out in (DEGRADATIONS[kind](face, 0.0, 3), degrade(face, kind, 0.0, 3)):
        assert out is not face
        assert out.size == face.size and out.mode == face.mode
        np.testing.assert_array_equal(pixels(out), pixels(face))


def test_none_is_a_copy(face):
    out = degrade(face, "none", 0.9, 1)
    assert out is not face
    np.testing.assert_array_equal(pixels(out), pixels(face))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_size_and_mode_preserved_and_changed(face, kind, severity):
    out = degrade(face, kind, severity, 5)
    assert out.size == face.size
    assert out.mode == "RGB"
    assert mse(out, face) > 0, f"{kind} at severity {severity} left the image unchanged"


def test_grey_input_becomes_rgb(face):
    out = degrade(face.convert("L"), "blur", 0.5, 0)
    assert out.mode == "RGB" and out.size == face.size


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_with_seed(face, kind):
    a = degrade(face, kind, 0.7, 123)
    b = degrade(face, kind, 0.7, 123)
    np.testing.assert_array_equal(pixels(a), pixels(b))
    np.testing.assert_array_equal(pixels(face), pixels(degrade(face, "none", 0, 0)))  # input untouched


def test_seed_matters_for_random_kinds(face):
    assert mse(noise(face, 0.5, 1), noise(face, 0.5, 2)) > 0
    boxes = {pixels(occlusion(face, 0.3, s)).tobytes() for s in range(5)}
    assert len(boxes) > 1
    directions = {np.sign(pixels(lighting(face, 0.8, s)).mean() - pixels(face).mean()) for s in range(20)}
    assert directions == {-1.0, 1.0}, "lighting should both darken and brighten depending on the seed"


@pytest.mark.parametrize("func", [blur, downscale], ids=["blur", "downscale"])
def test_blur_and_downscale_remove_more_detail_at_higher_severity(face, func):
    energy = [high_freq(face)] + [high_freq(func(face, s, 0)) for s in SEVERITIES]
    assert all(a > b for a, b in zip(energy, energy[1:])), energy
    assert energy[-1] < 0.5 * energy[0]


def test_occlusion_area_grows_with_severity(face):
    w, h = face.size
    for seed in range(4):
        areas = []
        for s in (0.1, 0.3, 0.6, 1.0):
            changed = np.any(pixels(occlusion(face, s, seed)) != pixels(face), axis=-1)
            areas.append(changed.mean())
            assert changed.mean() == pytest.approx(0.6 * s, rel=0.15, abs=2.5 / min(w, h))
            rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
            # one solid rectangle: every pixel inside its bounding box changed (up to texture ties)
            assert changed[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].mean() > 0.95
        assert all(a < b for a, b in zip(areas, areas[1:])), areas


def test_jpeg_quality_drops_with_severity(face):
    errors = [mse(jpeg(face, s, 0), face) for s in (0.1, 0.4, 0.7, 1.0)]
    assert all(a < b for a, b in zip(errors, errors[1:])), errors
    # severity 1 is quality 3: the same bytes as PIL's own encoder at that quality
    buffer = io.BytesIO()
    face.save(buffer, format="JPEG", quality=3)
    np.testing.assert_array_equal(pixels(jpeg(face, 1.0, 0)), pixels(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))


def test_noise_sigma_follows_severity():
    grey = Image.new("RGB", (96, 96), (128, 128, 128))
    sigmas = [float((pixels(noise(grey, s, 0)) - 128).std()) for s in (0.1, 0.3, 0.5)]
    assert sigmas == pytest.approx([8, 24, 40], rel=0.1)  # 80 * severity, little clipping at mid grey


def test_lighting_contrast_drops_and_brightness_is_monotone(face):
    for seed in range(6):
        contrast = [pixels(face).std()] + [pixels(lighting(face, s, seed)).std() for s in SEVERITIES]
        assert all(a > b for a, b in zip(contrast, contrast[1:])), (seed, contrast)
        means = [pixels(face).mean()] + [pixels(lighting(face, s, seed)).mean() for s in SEVERITIES]
        steps = np.sign(np.diff(means))
        assert len(set(steps)) == 1 and steps[0] != 0, (seed, means)  # one direction, strictly


def test_exposure_moves_every_pixel_one_way(face):
    """Over-exposure never darkens a pixel as the severity grows; under-exposure never brightens one."""
    grid = np.linspace(0, 1, 11)
    over = np.stack([pixels(overexpose(face, s, 0)) for s in grid])
    under = np.stack([pixels(underexpose(face, s, 0)) for s in grid])
    assert (np.diff(over, axis=0) >= 0).all() and (np.diff(under, axis=0) <= 0).all()
    assert over[-1].mean() > pixels(face).mean() + 40 and under[-1].mean() < pixels(face).mean() - 60
    # the old under-exposed direction is kept exactly: p^(1 + 3s) (1 - 0.6 s), truncated to uint8
    s = 0.7
    expected = np.clip((pixels(face).astype(np.float32) / 255) ** (1 + 3 * s) * (1 - 0.6 * s) * 255, 0, 255)
    np.testing.assert_array_equal(pixels(underexpose(face, s, 0)), expected.astype(np.uint8))


@pytest.mark.parametrize("func", [occlusion, occlusion_eyes, occlusion_mouth], ids=["random", "eyes", "mouth"])
def test_occluded_regions_are_nested(face, func):
    for seed in range(5):
        masks = [np.any(pixels(func(face, s, seed)) != pixels(face), axis=-1) for s in np.linspace(0.05, 1, 20)]
        for small, large in zip(masks, masks[1:]):
            assert (small <= large).all() and small.sum() <= large.sum()
        assert masks[-1].sum() > masks[0].sum()


def test_eye_and_mouth_patches_sit_on_the_aligned_face():
    from transfira.alignment import ARCFACE_TEMPLATE

    card = Image.new("RGB", (112, 112), (200, 200, 200))
    eyes = np.any(pixels(occlusion_eyes(card, 0.5, 0)) != 200, axis=-1)
    mouth = np.any(pixels(occlusion_mouth(card, 0.5, 0)) != 200, axis=-1)
    for mask, points in ((eyes, ARCFACE_TEMPLATE[:2]), (mouth, ARCFACE_TEMPLATE[3:])):
        for x, y in points:
            assert mask[int(round(y)), int(round(x))], (x, y)
    assert not eyes[int(ARCFACE_TEMPLATE[3, 1]), 56] and not mouth[int(ARCFACE_TEMPLATE[0, 1]), 56]


def test_rotation_angle_grows_and_flip_mirrors(face):
    errors = [mse(rotation(face, s, 1), face) for s in (0.1, 0.3, 0.6, 1.0)]
    assert all(a < b for a, b in zip(errors, errors[1:])), errors
    np.testing.assert_array_equal(pixels(hflip(face, 0.3, 0)), pixels(face)[:, ::-1])
    np.testing.assert_array_equal(pixels(hflip(face, 1.0, 5)), pixels(face)[:, ::-1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("severity", [-0.01, 1.01, 5, math.nan, math.inf])
def test_bad_severity_raises(face, kind, severity):
    with pytest.raises(ValueError, match="severity"):
        degrade(face, kind, severity, 0)


def test_unknown_kind_raises(face):
    with pytest.raises(ValueError, match="unknown degradation 'smudge'"):
        degrade(face, "smudge", 0.5, 0)


def test_issue_12_list_is_covered():
    """Gaussian blur, down-then-up scaling, JPEG, additive noise, occlusion (eyes, mouth, random), brightness
    both directions, in-plane rotation, horizontal flip."""
    assert {"blur", "downscale", "jpeg", "noise", "occlusion", "occlusion_eyes", "occlusion_mouth",
            "underexpose", "overexpose", "rotation", "hflip"} <= set(DEGRADATIONS)


@pytest.mark.parametrize("kind", KINDS)
def test_pure_function_of_image_severity_seed(face, kind):
    """The input is never modified, and a call gives the same pixels whatever ran before it (no hidden state)."""
    before = pixels(face).copy()
    first = pixels(degrade(face, kind, 0.6, 11))
    for other in KINDS:
        degrade(face, other, 0.9, 12)
    np.random.seed(99)  # the global numpy state must not matter
    np.testing.assert_array_equal(pixels(degrade(face, kind, 0.6, 11)), first)
    np.testing.assert_array_equal(pixels(face), before)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "hflip"])
def test_distance_from_original_grows_with_severity(face, kind):
    """For a fixed seed the damage (mean squared change) never shrinks as the severity grows."""
    for seed in (0, 1):
        errors = [mse(degrade(face, kind, s, seed), face) for s in np.linspace(0, 1, 6)]
        assert errors[0] == 0 and all(a <= b for a, b in zip(errors, errors[1:])), (seed, errors)
        assert errors[-1] > errors[1]
