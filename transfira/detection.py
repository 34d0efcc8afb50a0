"""Face detection for raw photos: InsightFace SCRFD (boxes + 5 keypoints) run with onnxruntime.

SCRFD models with keypoints (e.g. ``scrfd_500m_bnkps.onnx``) take a ``[1, 3, H, W]`` float32
RGB image normalized as ``(pixel - 127.5) / 128`` (H, W multiples of 32; InsightFace
letterboxes the photo into a 640 x 640 canvas at the top-left corner, keeping its aspect
ratio) and give nine outputs, for strides 8, 16 and 32 in that order: three score maps
``[K, 1]``, three box-distance maps ``[K, 4]`` and three keypoint-offset maps ``[K, 10]``
(a leading batch axis of 1 may be present), with ``K = (H / s) (W / s) x 2`` anchors.
Anchor ``k`` of stride ``s`` sits at cell ``k // 2`` (row-major) with center
``(column * s, row * s)``; its box is ``center -/+ distance * s`` (left, top, right, bottom)
and its keypoints ``center + offset * s``. Candidates above a score threshold are reduced
by greedy non-maximum suppression (IoU 0.4, InsightFace's default).

Keypoint order is InsightFace's: left eye, right eye, nose tip, left and right mouth corner
(in image coordinates: "left" is the one with the smaller x on a frontal face), the order
:mod:`transfira.alignment` expects.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import TransfiraError

STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
INPUT_SIZE = 640
SCORE_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4


@dataclass
class Detections:
    """Faces found in one photo, best first: ``boxes`` [F, 4] (x1, y1, x2, y2), ``scores`` [F],
    ``landmarks`` [F, 5, 2] (x, y), all in the photo's pixel coordinates."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def letterbox(image: np.ndarray, size: int = INPUT_SIZE) -> tuple[np.ndarray, float]:
    """``image`` (uint8 HWC) resized to fit ``size`` x ``size`` keeping its aspect ratio, pasted
    at the top-left of a black canvas; returns ``(canvas, scale)`` with canvas = photo x scale."""
    height, width = image.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    if height / width > 1.0:
        new_h, new_w = size, max(1, int(size * width / height))
    else:
        new_w, new_h = size, max(1, int(size * height / width))
    scale = new_h / height
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:new_h, :new_w] = resized
    return canvas, scale


def anchor_centers(height: int, width: int, stride: int, num_anchors: int = NUM_ANCHORS) -> np.ndarray:
    """[(height // stride) (width // stride) num_anchors, 2] anchor centers (x, y), row-major cells,
    each repeated ``num_anchors`` times."""
    rows, cols = height // stride, width // stride
    ys, xs = np.mgrid[:rows, :cols]
    centers = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centers, num_anchors, axis=0)


def decode(outputs: list[np.ndarray], height: int, width: int, threshold: float = SCORE_THRESHOLD,
           strides: tuple[int, ...] = STRIDES, num_anchors: int = NUM_ANCHORS
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates of the raw SCRFD outputs for an input of ``height`` x ``width``: boxes [M, 4],
    scores [M], landmarks [M, 5, 2] (input pixels), for all anchors with score >= ``threshold``."""
    n = len(strides)
    if len(outputs) != 3 * n:
        raise ValueError(f"expected {3 * n} SCRFD outputs (scores, boxes, keypoints per stride), got {len(outputs)}")
    boxes, scores, landmarks = [], [], []
    for i, stride in enumerate(strides):
        centers = anchor_centers(height, width, stride, num_anchors)
        score = np.asarray(outputs[i], np.float32).reshape(-1)
        dist = np.asarray(outputs[i + n], np.float32).reshape(-1, 4) * stride
        kps = np.asarray(outputs[i + 2 * n], np.float32).reshape(-1, 5, 2) * stride
        if not len(score) == len(dist) == len(kps) == len(centers):
            raise ValueError(f"stride {stride}: {len(score)} scores, {len(dist)} boxes, {len(kps)} keypoint sets "
                             f"for {len(centers)} anchors")
        keep = np.flatnonzero(score >= threshold)
        c = centers[keep]
        boxes.append(np.concatenate([c - dist[keep, :2], c + dist[keep, 2:]], 1))
        scores.append(score[keep])
        landmarks.append(c[:, None, :] + kps[keep])
    return np.concatenate(boxes), np.concatenate(scores), np.concatenate(landmarks)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_THRESHOLD) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first: a box is
    dropped when its IoU with a better kept box exceeds ``threshold``."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, j] for j in range(4))
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-12)
        order = rest[iou <= threshold]
    return np.asarray(keep, dtype=np.int64)


def postprocess(outputs: list[np.ndarray], height: int, width: int, scale: float = 1.0,
                threshold: float = SCORE_THRESHOLD, nms_threshold: float = NMS_THRESHOLD) -> Detections:
    """Decode, suppress and map back to the photo (divide by the letterbox ``scale``)."""
    boxes, scores, landmarks = decode(outputs, height, width, threshold)
    keep = nms(boxes, scores, nms_threshold)
    return Detections(boxes[keep] / scale, scores[keep], landmarks[keep] / scale)


class SCRFD:
    """An SCRFD detector with keypoints, run with onnxruntime on CPU (or the given providers)."""

    def __init__(self, model_path: str | Path, input_size: int = INPUT_SIZE, threshold: float = SCORE_THRESHOLD,
                 nms_threshold: float = NMS_THRESHOLD, providers: list[str] | None = None, threads: int = 0):
        import onnxruntime

        model_path = Path(model_path)
        if not model_path.is_file():
            raise TransfiraError(f"detector model not found: {model_path}")
        if input_size % 32:
            raise TransfiraError(f"detector input_size must be a multiple of 32, got {input_size}")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(model_path), options,
                                                        providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises several types for bad files
            raise TransfiraError(f"{model_path}: not a readable ONNX model: {err}") from None
        outputs = self.session.get_outputs()
        if len(outputs) != 3 * len(STRIDES):
            raise TransfiraError(f"{model_path}: {len(outputs)} outputs; an SCRFD model with 5 keypoints has 9 "
                                 "(scores, boxes, keypoints for strides 8, 16, 32)")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in outputs]
        self.input_size, self.threshold, self.nms_threshold = input_size, threshold, nms_threshold
        self.model_path = model_path

    def detect(self, image: np.ndarray) -> Detections:
        """Faces in a uint8 RGB HWC photo (grey HW is expanded), best first."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")
        canvas, scale = letterbox(image, self.input_size)
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        return postprocess(outputs, self.input_size, self.input_size, scale, self.threshold, self.nms_threshold)
