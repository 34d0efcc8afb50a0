"""Five-point face alignment to the ArcFace 112x112 template (InsightFace's ``norm_crop``).

A similarity transform (rotation, uniform scale, translation) is fitted by least squares
(Umeyama 1991) from the five landmarks -- left eye, right eye, nose tip, left and right
mouth corner, in image pixel coordinates -- to :data:`ARCFACE_TEMPLATE`, and the image is
warped with it (bilinear, border filled with 0). Coordinates follow InsightFace / OpenCV:
pixel ``(c, r)`` has its center at ``x = c, y = r``. For an output size other than 112
the template is scaled by ``size / 112``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from .errors import TransfiraError

ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]])
LANDMARK_COLUMNS = [f"{axis}{i}" for i in range(1, 6) for axis in "xy"]  # x1, y1, ..., x5, y5


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix ``M`` of the similarity transform minimizing ``sum |M [src_i; 1] - dst_i|^2``.

    Umeyama's closed form: ``c = s R`` from the SVD of the points' cross-covariance, with the
    sign fix that excludes reflections; ``t = mean(dst) - s R mean(src)``.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching [N >= 2, 2] point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0 ** 2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("landmarks coincide: no transform")
    u, sigma, vt = np.linalg.svd(d0.T @ s0 / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(sigma) @ sign)) / var_s
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mu_d - scale * rotation @ mu_s
    return matrix


def arcface_transform(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The 2x3 matrix taking five landmarks [5, 2] onto the ArcFace template for a ``size`` crop."""
    return similarity_transform(np.asarray(landmarks, np.float64).reshape(5, 2), ARCFACE_TEMPLATE * (size / 112.0))


def warp_affine(image: Image.Image, matrix: np.ndarray, size: int | tuple[int, int]) -> Image.Image:
    """``image`` warped by the 2x3 ``matrix`` (input -> output pixel coordinates), bilinear, border 0.

    PIL samples the output pixel ``(c, r)`` at its center ``(c + 0.5, r + 0.5)`` and wants the
    inverse map in that convention, so the OpenCV-convention matrix is shifted by half a pixel
    on both sides before it is inverted.
    """
    width, height = (size, size) if isinstance(size, int) else size
    full = np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]])
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    unshift = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(shift @ full @ unshift)  # output (PIL coords) -> input (PIL coords)
    fill = 0 if image.mode in ("L", "I", "F") else (0,) * len(image.getbands())
    return image.transform((width, height), Image.Transform.AFFINE, data=tuple(inverse[:2].ravel()),
                           resample=Image.Resampling.BILINEAR, fillcolor=fill)


def align_face(image: Image.Image, landmarks: np.ndarray, size: int = 112) -> Image.Image:
    """The ``size`` x ``size`` ArcFace-aligned crop of ``image`` given its five landmarks [5, 2]."""
    return warp_affine(image, arcface_transform(landmarks, size), size)


def read_landmarks(frame: pd.DataFrame, columns: Sequence[str], source: str) -> np.ndarray:
    """The landmark columns (``x1, y1, ..., x5, y5`` in this order) of ``frame`` as [N, 5, 2] float64.

    Errors name ``source`` (the CSV), the missing columns or the first rows with a missing or
    non-numeric value.
    """
    columns = list(columns)
    if len(columns) != 10:
        raise TransfiraError(f"{source}: landmark_columns must name 10 columns (x1, y1, ..., x5, y5), "
                             f"got {len(columns)}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TransfiraError(f"{source}: missing landmark column(s) {', '.join(map(repr, missing))}")
    values = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(values).all(1))
    if len(bad):
        from .io import format_rows

        raise TransfiraError(f"{source}: missing or non-numeric landmarks at row(s) {format_rows(bad)}")
    return values.reshape(-1, 5, 2)
