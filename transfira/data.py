"""Annotations, preprocessing (SPEC §2) and the image dataset shared by all scripts."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms

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


class ImageDataset(torch.utils.data.Dataset):
    """Images listed by path (relative to ``data_dir``), with optional float targets.

    Items are dicts ``image, index, ok, error`` (+ ``target``). An unreadable image gives
    ``ok=False`` and a zero image instead of raising inside a worker, so the caller
    decides whether to stop (naming the file) or skip it.
    """

    def __init__(self, data_dir: str | Path, paths: Sequence[str], transform, targets: np.ndarray | None = None):
        self.data_dir = Path(data_dir)
        self.paths = list(map(str, paths))
        self.transform = transform
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self._blank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.data_dir / self.paths[index]
        try:
            image, ok, error = self.transform(load_image(path)), True, ""
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


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int, shuffle: bool = False,
                sampler=None, drop_last: bool = False, persistent: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader with the project's defaults (pinned memory on CUDA; workers kept across
    iterations unless ``persistent`` is False, e.g. for a loader used for one epoch only)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
        persistent_workers=persistent and num_workers > 0,
    )
