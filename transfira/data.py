"""Annotations, preprocessing (SPEC §2) and the image dataset shared by all scripts."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms

from .alignment import align_face
from .io import read_annotations  # noqa: F401  (re-exported: the scripts read CSVs through data)

AUG_DEFAULTS: dict[str, Any] = {
    "train_rgb_norm": [0.5, 0.5, 0.5],  # per-channel mean
    "test_rgb_std": 0.5,  # std, all channels
    "resize_dim": 112,
    "crop_dim": 112,
    "hflip_p": 0.0,  # random horizontal flip during training (0 in the reference)
}


def build_transform(aug: dict[str, Any], train: bool = False) -> transforms.Compose:
    """Resize to ``resize_dim``, center-crop ``crop_dim``, (flip), to [0,1], normalize.

    For InsightFace ONNX encoders the defaults equal ``(pixel - 127.5) / 127.5`` on RGB.
    (The reference swaps ``resize_dim`` and ``crop_dim``; here each does what it says.)
    """
    aug = {**AUG_DEFAULTS, **aug}
    steps: list = [
        transforms.Resize(aug["resize_dim"], interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(aug["crop_dim"]),
    ]
    if train and aug["hflip_p"] > 0:
        steps.append(transforms.RandomHorizontalFlip(aug["hflip_p"]))
    std = aug["test_rgb_std"]
    steps += [transforms.ToTensor(), transforms.Normalize(aug["train_rgb_norm"], [std] * 3 if np.isscalar(std) else std)]
    return transforms.Compose(steps)


def load_image(path: str | Path) -> Image.Image:
    """Open with PIL, apply the EXIF orientation, convert to RGB."""
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def augment_draw(seed: int, epoch: int, index: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, epoch, index): numpy's
    SeedSequence hash of the three, identical on every platform, process and rank."""
    return float(np.random.default_rng((int(seed), int(epoch), int(index))).random())


class ImageDataset(torch.utils.data.Dataset):
    """Images listed by path (relative to ``data_dir``), with optional float targets.

    Items are dicts ``image, index, ok, error`` (+ ``target``). An unreadable image gives
    ``ok=False`` and a zero image instead of raising inside a worker, so the caller
    decides whether to stop (naming the file) or skip it. With ``landmarks`` [N, 5, 2]
    each image is first aligned to the ArcFace template at ``align_size`` pixels
    (:mod:`transfira.alignment`), then transformed.

    ``hflip_p`` > 0 flips image ``index`` horizontally (after ``transform``) when
    ``augment_draw(seed, epoch, index) < hflip_p``: the augmentation of an image is a function
    of (seed, epoch, index) alone, not of worker processes, ranks or RNG state, so a resumed
    run sees exactly the flips of an uninterrupted one. Call :meth:`set_epoch` before each
    epoch's DataLoader is created.
    """

    def __init__(self, data_dir: str | Path, paths: Sequence[str], transform, targets: np.ndarray | None = None,
                 landmarks: np.ndarray | None = None, align_size: int = 112, hflip_p: float = 0.0, seed: int = 0):
        self.data_dir = Path(data_dir)
        self.paths = list(map(str, paths))
        self.transform = transform
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.landmarks = None if landmarks is None else np.asarray(landmarks, np.float64).reshape(-1, 5, 2)
        if self.landmarks is not None and len(self.landmarks) != len(self.paths):
            raise ValueError(f"{len(self.landmarks)} landmark rows for {len(self.paths)} images")
        self.align_size = align_size
        self.hflip_p, self.seed, self.epoch = float(hflip_p), int(seed), 0
        self._blank: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation :meth:`__getitem__` applies."""
        self.epoch = int(epoch)

    def load(self, index: int) -> Image.Image:
        """Image ``index`` as PIL RGB, aligned when landmarks are given."""
        image = load_image(self.data_dir / self.paths[index])
        if self.landmarks is not None:
            image = align_face(image, self.landmarks[index], self.align_size)
        return image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.data_dir / self.paths[index]
        try:
            image, ok, error = self.transform(self.load(index)), True, ""
            if self.hflip_p > 0 and augment_draw(self.seed, self.epoch, index) < self.hflip_p:
                image = image.flip(-1)
        except Exception as err:  # noqa: BLE001 - any decoding failure is reported per image
            image, ok, error = None, False, f"{path}: {type(err).__name__}: {err}"
        if image is None:
            if self._blank is None:
                self._blank = self.transform(Image.new("RGB", (256, 256)))
            image = torch.zeros_like(self._blank)
        item = {"image": image, "index": index, "ok": ok, "error": error}
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


class FreshlyDegradedDataset(ImageDataset):
    """Training images drawn afresh every epoch (``train.py [degrade]``): image ``index`` of epoch ``e``
    is :func:`~transfira.degradations.draw_degradation` ``(seed, e, index, ...)`` applied to the decoded
    RGB photo (:func:`~transfira.degradations.degrade_chain`), before the transform. Items add the
    identity's position in the centers (``class``) and the draw (``kinds`` joined by ``+``, ``"none"``
    when clean; ``severity``; ``pixel_seed``), so anyone can re-render the frame from its row."""

    def __init__(self, data_dir: str | Path, paths: Sequence[str], transform, classes: np.ndarray,
                 degrade: dict[str, Any], seed: int = 0):
        super().__init__(data_dir, paths, transform, seed=seed)
        self.classes = torch.as_tensor(np.asarray(classes, np.int64))
        self.kinds, self.stack = tuple(degrade["kinds"]), int(degrade["stack"])
        self.severity, self.p_clean = tuple(map(float, degrade["severity"])), float(degrade["p_clean"])

    def draw(self, index: int) -> tuple[tuple[str, ...], float, int]:
        """The degradation of image ``index`` in the current epoch."""
        from .degradations import draw_degradation

        return draw_degradation(self.seed, self.epoch, index, self.kinds, self.stack, self.severity, self.p_clean)

    def load(self, index: int) -> Image.Image:
        from .degradations import degrade_chain

        kinds, severity, pixel_seed = self.draw(index)
        image = super().load(index)
        return degrade_chain(image, kinds, severity, pixel_seed) if kinds else image

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        kinds, severity, pixel_seed = self.draw(index)
        return {**item, "class": self.classes[index], "kinds": "+".join(kinds) or "none", "severity": severity,
                "pixel_seed": pixel_seed}


def dataset_from_table(frame, table: dict[str, Any], aug: dict[str, Any], source: str, train: bool = False,
                       targets: np.ndarray | None = None, seed: int = 0) -> ImageDataset:
    """The :class:`ImageDataset` of a config table (``data_dir``, ``path_col_name``, optional
    ``landmark_columns``: 10 columns ``x1, y1, ..., x5, y5`` that turn on five-point alignment
    to a ``resize_dim`` crop); ``source`` (the CSV) is named in errors. With ``train`` the
    flips (``hflip_p``) are drawn per (``seed``, epoch, index) by the dataset."""
    landmarks = None
    if table.get("landmark_columns"):
        from .alignment import read_landmarks

        landmarks = read_landmarks(frame, table["landmark_columns"], source)
    aug = {**AUG_DEFAULTS, **aug}
    return ImageDataset(table["data_dir"], frame[table["path_col_name"]].astype(str).tolist(),
                        build_transform(aug), targets, landmarks, aug["resize_dim"],
                        hflip_p=aug["hflip_p"] if train else 0.0, seed=seed)


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int, shuffle: bool = False,
                sampler=None, drop_last: bool = False, persistent: bool = True,
                device: torch.device | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader with the project's defaults (pinned memory when ``device`` is CUDA, so a
    CPU run on a GPU host opens no CUDA context; workers kept across iterations unless
    ``persistent`` is False, e.g. for a loader used for one epoch only)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        num_workers=num_workers, pin_memory=device is not None and torch.device(device).type == "cuda",
        drop_last=drop_last, persistent_workers=persistent and num_workers > 0,
    )
