"""Five-point alignment: Umeyama fit, warp convention, and a synthetic face with known landmarks."""
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from transfira.alignment import (ARCFACE_TEMPLATE, LANDMARK_COLUMNS, align_face, arcface_transform,
                                 read_landmarks, similarity_transform, warp_affine)
from transfira.errors import TransfiraError


def similarity(scale, angle, tx, ty):
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_umeyama_recovers_an_exact_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    true = similarity(0.37, 0.6, 12.0, -7.5)
    np.testing.assert_allclose(similarity_transform(src, apply(true, src)), true, atol=1e-10)


def test_umeyama_is_the_least_squares_fit():
    """With noisy targets no nearby similarity has a smaller squared error (float64 brute check)."""
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (5, 2))
    dst = apply(similarity(1.3, -0.4, 5, 9), src) + rng.normal(0, 2, (5, 2))
    fit = similarity_transform(src, dst)
    err = lambda m: ((apply(m, src) - dst) ** 2).sum()  # noqa: E731
    a, b = fit[0, 0], fit[1, 0]
    for da, db, dtx, dty in rng.normal(0, 1e-2, (200, 4)):
        other = np.array([[a + da, -(b + db), fit[0, 2] + dtx], [b + db, a + da, fit[1, 2] + dty]])
        assert err(other) >= err(fit) - 1e-9
    assert np.isclose(fit[0, 0], fit[1, 1]) and np.isclose(fit[0, 1], -fit[1, 0])  # a similarity, no shear


def test_no_reflection_even_for_mirrored_points():
    src = ARCFACE_TEMPLATE.copy()
    dst = src * [-1, 1]  # a mirror image: the best *similarity* must still be a rotation
    m = similarity_transform(src, dst)
    assert np.linalg.det(m[:, :2]) > 0


def bilinear_reference(pixels, matrix, size):
    """Slow float64 warp in the OpenCV convention: out[r, c] = bilinear sample at M^-1 (c, r), border 0."""
    h, w = pixels.shape[:2]
    inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    out = np.zeros((size, size) + pixels.shape[2:])
    for r in range(size):
        for c in range(size):
            x, y = inv[:2] @ [c, r, 1]
            x0, y0 = math.floor(x), math.floor(y)
            fx, fy = x - x0, y - y0
            acc = 0.0
            for yy, xx, wgt in ((y0, x0, (1 - fx) * (1 - fy)), (y0, x0 + 1, fx * (1 - fy)),
                                (y0 + 1, x0, (1 - fx) * fy), (y0 + 1, x0 + 1, fx * fy)):
                if 0 <= yy < h and 0 <= xx < w:
                    acc = acc + wgt * pixels[yy, xx].astype(np.float64)
            out[r, c] = acc
    return out


def test_warp_matches_a_float64_opencv_convention_reference():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    matrix = similarity(0.8, 0.3, 4.0, -2.0)
    ours = np.asarray(warp_affine(Image.fromarray(pixels), matrix, 32), np.float64)
    ref = bilinear_reference(pixels, matrix, 32)
    inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    cols, rows = np.meshgrid(np.arange(32), np.arange(32))
    x, y = (inv[:2] @ np.stack([cols.ravel(), rows.ravel(), np.ones(32 * 32)])).reshape(2, 32, 32)
    inside = (x >= 1) & (x <= 48) & (y >= 1) & (y <= 38)  # away from the border, where edge rules differ
    assert inside.sum() > 500
    assert np.abs(ours[inside] - ref[inside]).max() <= 1.0  # PIL rounds to uint8 (and uses fixed point)


def test_integer_translation_moves_a_pixel_exactly():
    pixels = np.zeros((20, 20, 3), np.uint8)
    pixels[5, 7] = 255
    out = np.asarray(warp_affine(Image.fromarray(pixels), similarity(1, 0, 3, 2), 20))
    assert out[7, 10].tolist() == [255, 255, 255] and out.sum() == 3 * 255


def synthetic_face(landmarks, size=(160, 200)):
    """A dark image with a bright 3x3 dot on every landmark (row = y, column = x)."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    for x, y in np.round(landmarks).astype(int):
        pixels[y - 1:y + 2, x - 1:x + 2] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size", [112, 224])
def test_known_landmarks_land_on_the_template(size):
    """Landmarks placed by a known similarity from the template: after alignment, each dot's
    centroid sits on the template point (within a fraction of a pixel)."""
    inverse = similarity(1.4, 0.35, 30.0, 25.0)  # template -> photo
    landmarks = np.round(apply(inverse, ARCFACE_TEMPLATE))  # dots on integer pixels
    aligned = np.asarray(align_face(synthetic_face(landmarks), landmarks, size), np.float64).mean(2)
    template = ARCFACE_TEMPLATE * size / 112
    for x, y in template:
        r0, c0 = int(round(y)), int(round(x))
        win = aligned[r0 - 4:r0 + 5, c0 - 4:c0 + 5]
        rows, cols = np.mgrid[r0 - 4:r0 + 5, c0 - 4:c0 + 5]
        assert win.sum() > 0
        cy, cx = (win * rows).sum() / win.sum(), (win * cols).sum() / win.sum()
        assert abs(cx - x) < 0.6 and abs(cy - y) < 0.6
    assert aligned[0, 0] == 0 and aligned.shape == (size, size)  # border filled with 0


def test_transform_of_template_is_identity():
    np.testing.assert_allclose(arcface_transform(ARCFACE_TEMPLATE), [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_read_landmarks_checks_columns_and_values():
    frame = pd.DataFrame([list(range(10)), list(range(10, 20))], columns=LANDMARK_COLUMNS)
    out = read_landmarks(frame, LANDMARK_COLUMNS, "f.csv")
    assert out.shape == (2, 5, 2) and out[1, 4].tolist() == [18, 19]
    with pytest.raises(TransfiraError, match="f.csv: missing landmark column"):
        read_landmarks(frame.drop(columns="y5"), LANDMARK_COLUMNS, "f.csv")
    frame = frame.astype(object)
    frame.loc[1, "x3"] = "n/a"
    with pytest.raises(TransfiraError, match=r"f.csv: missing or non-numeric landmarks at row\(s\) 2"):
        read_landmarks(frame, LANDMARK_COLUMNS, "f.csv")


def test_dataset_aligns_rows_with_landmark_columns(tmp_path):
    """A CSV with x1..y5 columns: the loader's tensor is the transform of the aligned crop."""
    from transfira.data import AUG_DEFAULTS, build_transform, dataset_from_table

    inverse = similarity(1.2, -0.2, 20.0, 15.0)
    landmarks = np.round(apply(inverse, ARCFACE_TEMPLATE))
    synthetic_face(landmarks).save(tmp_path / "a.png")
    frame = pd.DataFrame([["a.png", *landmarks.ravel()]], columns=["path"] + LANDMARK_COLUMNS)
    table = {"data_dir": str(tmp_path), "path_col_name": "path", "landmark_columns": LANDMARK_COLUMNS}
    item = dataset_from_table(frame, table, {}, "t.csv")[0]
    expected = build_transform(AUG_DEFAULTS)(align_face(synthetic_face(landmarks), landmarks, 112))
    assert item["ok"] and torch_equal(item["image"], expected)
    plain = dataset_from_table(frame, {**table, "landmark_columns": []}, {}, "t.csv")[0]["image"]
    assert plain.shape == expected.shape and not torch_equal(plain, expected)


def torch_equal(a, b):
    return bool((a == b).all())
