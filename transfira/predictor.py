"""Score any image: the trained predictor behind a small API (``transfira.Predictor``).

    from transfira import Predictor
    predictor = Predictor.from_files("encoder.onnx", "predictor.pt")
    result = predictor.score(["a.jpg", pil_image, uint8_array])
    result.ccs, result.ccas, result.recognizable   # numpy arrays, recognizable = ccas > 0

Images go through the one preprocessing of the project (:func:`transfira.data.build_transform`,
SPEC §2): RGB, resize ``resize_dim``, center-crop ``crop_dim``, ``(x / 255 - mean) / std``.
Paths are decoded like every other image of the project (:func:`transfira.data.load_image`:
EXIF orientation, RGB). PIL images are converted to RGB. uint8 arrays (HxWx3, or HxW grey)
are read in ``channel_order`` ("RGB", or "BGR" for OpenCV sources). With a face detector
(:class:`transfira.detection.SCRFD`), :meth:`Predictor.score_photos` finds the faces of raw
photos, aligns each to the ArcFace template (:mod:`transfira.alignment`) and scores it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from .alignment import align_face
from .backbone import check_embedding_size, embedding_dim, load_backbone, resolve_device
from .checkpoint import build_predictor
from .config import read_toml
from .data import AUG_DEFAULTS, build_transform, load_image
from .errors import TransfiraError

ImageLike = Union[str, Path, Image.Image, np.ndarray]
CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass
class Scores:
    """Predicted CCS and CCAS (paper eq. 4, 6) of each image; ``recognizable = ccas > 0``."""

    ccs: np.ndarray
    ccas: np.ndarray
    recognizable: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.recognizable = self.ccas > 0

    def __len__(self) -> int:
        return len(self.ccs)


@dataclass
class FaceScores(Scores):
    """Scores of the faces found in photos: face ``face`` of photo ``image`` (its index in the
    input), with its detector box [F, 4] (x1, y1, x2, y2), ``det_score`` [F] and ``landmarks``
    [F, 5, 2] in the photo's pixels."""

    image: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    face: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    det_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5, 2), np.float32))


def check_channel_order(channel_order: str) -> str:
    """``channel_order`` upper-cased, or an error naming the allowed values."""
    order = str(channel_order).upper()
    if order not in CHANNEL_ORDERS:
        raise TransfiraError(f"channel_order must be 'RGB' or 'BGR', got '{channel_order}'")
    return order


def to_pil(image: ImageLike, channel_order: str = "RGB") -> Image.Image:
    """An RGB PIL image from a path, a PIL image or a uint8 array (HxW, HxWx3 in ``channel_order``, HxWx4)."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TransfiraError(f"image arrays must be uint8 (0-255), got {image.dtype}")
        if image.ndim == 2:
            return Image.fromarray(image).convert("RGB")
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise TransfiraError(f"image arrays must be HxW or HxWx3 (HWC), got shape {image.shape}")
        rgb = image[:, :, :3]
        if check_channel_order(channel_order) == "BGR":
            rgb = rgb[:, :, ::-1]
        return Image.fromarray(np.ascontiguousarray(rgb))
    raise TransfiraError(f"cannot score a {type(image).__name__}: give a path, a PIL image or a uint8 array")


class Predictor:
    """A trained recognizability predictor with its preprocessing (see the module docstring)."""

    def __init__(self, model: nn.Module, aug: dict[str, Any] | None = None, device: str | torch.device = "auto",
                 channel_order: str = "RGB", batch_size: int = 64, detector=None):
        self.device = resolve_device(str(device))  # also for a torch.device: full fp32 on CUDA
        self.model = model.to(self.device).eval()
        self.aug = {**AUG_DEFAULTS, **(aug or {})}
        self.transform = build_transform(self.aug)
        self.channel_order = check_channel_order(channel_order)
        if batch_size < 1:
            raise TransfiraError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.detector = detector
        self.source: Path | None = None  # the checkpoint, when it is a shipped predictor (:meth:`pretrained`)

    @classmethod
    def from_files(cls, model_path: str | Path, checkpoint_path: str | Path = "", device: str = "auto",
                   embedding_size: int | None = None, channel_order: str = "RGB", head_hidden: int | None = None,
                   aug: dict[str, Any] | None = None, batch_size: int = 64, backbone_type: str = "onnx",
                   detector_path: str | Path | None = None, det_threshold: float = 0.5) -> "Predictor":
        """Encoder architecture from ``model_path`` (ONNX), weights from ``checkpoint_path`` (a predictor
        state dict, read with ``weights_only=True``; the heads' layout is read from it, ``head_hidden`` is
        ignored; empty: the predictor shipped for this encoder file, :meth:`pretrained`); ``embedding_size``
        None = the encoder's output size. ``detector_path``: an SCRFD ONNX model for :meth:`score_photos`
        (faces with score >= ``det_threshold``)."""
        if not checkpoint_path:
            return cls.pretrained(model_path, device=device, embedding_size=embedding_size, channel_order=channel_order,
                                  aug=aug, batch_size=batch_size, backbone_type=backbone_type,
                                  detector_path=detector_path, det_threshold=det_threshold)
        aug = {**AUG_DEFAULTS, **(aug or {})}
        backbone = load_backbone(backbone_type, model_path)
        if embedding_size is None:
            embedding_size = embedding_dim(backbone, aug["crop_dim"])
        else:
            check_embedding_size(backbone, embedding_size, aug["crop_dim"], model_path)
        model = build_predictor(backbone, embedding_size, checkpoint_path)  # the heads' layout: from the file
        detector = None
        if detector_path:
            from .detection import SCRFD

            detector = SCRFD(detector_path, threshold=det_threshold)
        return cls(model, aug, device, channel_order, batch_size, detector)

    @classmethod
    def pretrained(cls, model_path: str | Path, **kwargs: Any) -> "Predictor":
        """The predictor shipped in ``pretrained_weights/`` for this encoder file (matched by its SHA-256,
        :func:`transfira.pretrained.find_pretrained`), on the file itself; ``kwargs`` as :meth:`from_files`."""
        from .pretrained import find_pretrained

        shipped = find_pretrained(model_path)
        predictor = cls.from_files(model_path, shipped.checkpoint, **kwargs)
        predictor.source = shipped.checkpoint
        return predictor

    @classmethod
    def from_config(cls, path: str | Path, checkpoint_path: str | Path | None = None, **overrides: Any
                    ) -> "Predictor":
        """From a test.toml (``predictor_model_path`` or ``model_path``, ``checkpoint_path``), a score.toml,
        or a train.toml (``model_path``; the checkpoint is ``checkpoint_path`` or the newest
        ``{checkpoint_outdir}/{run_name}/*.pt``; none: the shipped predictor, :meth:`pretrained`). Keys read: those plus ``embedding_size``,
        ``device``, ``batch_size``, ``channel_order``, ``detect``, ``det_threshold``, ``[aug]``."""
        settings = predictor_settings(read_toml(path), path)
        model_path, checkpoint = settings.pop("model_path"), settings.pop("checkpoint_path")
        return cls.from_files(model_path, checkpoint_path or checkpoint, **{**settings, **overrides})

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """[B, 3, crop_dim, crop_dim] float32 network input of ``images`` (SPEC §2)."""
        return torch.stack([self.transform(to_pil(image, self.channel_order)) for image in images])

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Predicted (CCS, CCAS) [B] of a preprocessed batch."""
        ccs, ccas = self.model(batch.to(self.device, non_blocking=True))
        return ccs.float().reshape(-1).cpu().numpy(), ccas.float().reshape(-1).cpu().numpy()

    def score(self, images: ImageLike | Iterable[ImageLike]) -> Scores:
        """CCS, CCAS and ``recognizable`` of one image or a list of them, in ``batch_size`` batches.

        An unreadable path raises (naming the file); ``score.py`` reports such files in a column instead.
        """
        images = _as_list(images)
        ccs, ccas = [np.zeros(0, np.float32)], [np.zeros(0, np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            try:
                batch = self.preprocess(chunk)
            except (OSError, ValueError) as err:
                raise TransfiraError(f"cannot read an image of batch {start}-{start + len(chunk) - 1}: {err}") from None
            a, b = self.forward(batch)
            ccs.append(a)
            ccas.append(b)
        return Scores(np.concatenate(ccs), np.concatenate(ccas))

    def align_faces(self, image: ImageLike) -> tuple[list[Image.Image], Any]:
        """The faces of one photo, each aligned to the ArcFace template at ``resize_dim`` pixels, and
        the detector's :class:`~transfira.detection.Detections`."""
        if self.detector is None:
            raise TransfiraError("no face detector: pass detector_path (an SCRFD ONNX model) to from_files")
        pil = to_pil(image, self.channel_order)
        found = self.detector.detect(np.asarray(pil))
        size = self.aug["resize_dim"]
        return [align_face(pil, landmarks, size) for landmarks in found.landmarks], found

    def score_photos(self, images: ImageLike | Iterable[ImageLike]) -> FaceScores:
        """Detect, align and score every face of each photo (a photo without a face adds no row)."""
        parts: dict[str, list] = {k: [] for k in ("image", "face", "boxes", "det_score", "landmarks")}
        crops: list[Image.Image] = []
        for index, image in enumerate(_as_list(images)):
            faces, found = self.align_faces(image)
            crops += faces
            parts["image"].append(np.full(len(found), index, np.int64))
            parts["face"].append(np.arange(len(found), dtype=np.int64))
            parts["boxes"].append(found.boxes)
            parts["det_score"].append(found.scores)
            parts["landmarks"].append(found.landmarks)
        scores = self.score(crops)
        empty = FaceScores(np.zeros(0, np.float32), np.zeros(0, np.float32))
        arrays = {k: np.concatenate(v) if v else getattr(empty, k) for k, v in parts.items()}
        return FaceScores(scores.ccs, scores.ccas, **arrays)


def _as_list(images: ImageLike | Iterable[ImageLike]) -> list[ImageLike]:
    """One image (path, PIL, array) as a one-element list; any other iterable as a list."""
    if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray) and images.dtype != object
                                                         and images.ndim in (2, 3)):
        return [images]
    return list(images)


def predictor_settings(raw: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """What a predictor needs from a test.toml, score.toml or train.toml (the one reader for
    ``Predictor.from_config``, ``score.py --config`` and ``export_onnx.py --config``): ``model_path``
    (``predictor_model_path`` when set), ``checkpoint_path`` (or a train config's newest checkpoint;
    empty for a score config without one: the shipped predictor), and the runtime keys."""
    model_path = raw.get("predictor_model_path") or raw.get("model_path")
    if not model_path:
        raise TransfiraError(f"{source}: needs model_path (the predictor's ONNX encoder)")
    checkpoint = raw.get("checkpoint_path") or (_newest_checkpoint(raw, source) if raw.get("checkpoint_outdir") else "")
    aug = raw.get("aug") if isinstance(raw.get("aug"), dict) else None
    return {"model_path": model_path, "checkpoint_path": checkpoint, "device": raw.get("device", "auto"),
            "embedding_size": raw.get("embedding_size") or None, "channel_order": raw.get("channel_order", "RGB"),
            "aug": aug, "batch_size": raw.get("batch_size") or 64, "backbone_type": raw.get("backbone_type", "onnx"),
            "detector_path": raw.get("detect") or None, "det_threshold": raw.get("det_threshold", 0.5)}


def _newest_checkpoint(raw: dict[str, Any], source: str | Path) -> Path:
    """The last epoch's ``{model stem}_{epoch:04}.pt`` in a train config's run directory."""
    outdir, run = raw.get("checkpoint_outdir"), raw.get("run_name")
    if not (outdir and run):
        raise TransfiraError(f"{source}: needs checkpoint_path (or checkpoint_outdir and run_name of a train config)")
    stem = Path(raw.get("model_path", "")).stem
    found = sorted(p for p in (Path(outdir) / run).glob(f"{stem}_*.pt") if p.stem[len(stem) + 1:].isdigit())
    if not found:
        raise TransfiraError(f"{source}: no predictor checkpoint ({stem}_<epoch>.pt) in {Path(outdir) / run}")
    return found[-1]
