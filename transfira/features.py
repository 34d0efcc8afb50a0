"""Feature extraction: encoder outputs for every image, streamed into a memory-mapped ``.npy``.

N x D never has to fit in RAM, and an interrupted run resumes from the last flushed batch:
rows are written to ``<out>.partial.npy`` with a ``<out>.partial.json`` progress record,
renamed onto ``<out>`` when complete.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data import ImageDataset, make_loader
from .errors import TransfiraError
from .io import atomic_path, save_npy

FLUSH_EVERY = 50  # batches between progress records


def _progress_matches(meta_path: Path, expected: dict) -> int:
    """Rows already done by an earlier run with the same inputs (0 if none or different)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return 0
    return int(meta.get("rows_done", 0)) if all(meta.get(k) == v for k, v in expected.items()) else 0


def _write_progress(meta_path: Path, info: dict, rows_done: int) -> None:
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps({**info, "rows_done": rows_done}))


@torch.inference_mode()
def extract_features(backbone: nn.Module, dataset: ImageDataset, out_path: str | Path, embedding_size: int,
                     batch_size: int = 64, num_workers: int = 2, device: torch.device | str = "cpu",
                     on_bad_image: str = "error", desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Embed every image of ``dataset`` into ``out_path`` ([N, D] float32 ``.npy``).

    Returns ``(features, ok)``: the read-only memmap and a boolean mask of readable
    images (rows of unreadable images are NaN when ``on_bad_image == "skip"``).
    """
    out_path = Path(out_path)
    n = len(dataset)
    partial = out_path.with_name(out_path.stem + ".partial.npy")
    meta_path = out_path.with_name(out_path.stem + ".partial.json")
    info = {"rows": n, "dim": embedding_size, "paths_hash": _paths_hash(dataset.paths)}
    start = _progress_matches(meta_path, info) if partial.exists() else 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if start:
        features = np.load(partial, mmap_mode="r+")
        print(f"{desc}: resuming at image {start} of {n}")
    else:
        features = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, embedding_size))
    ok_path = out_path.with_name(out_path.stem + ".partial_ok.npy")
    ok = np.load(ok_path) if start and ok_path.exists() else np.ones(n, bool)
    subset = torch.utils.data.Subset(dataset, range(start, n))
    loader = make_loader(subset, batch_size, num_workers)
    backbone.eval()
    with tqdm(total=n, initial=start, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for step, batch in enumerate(loader, 1):
            index = batch["index"].numpy()
            good = batch["ok"].numpy().astype(bool)
            if not good.all():
                bad = np.flatnonzero(~good)
                if on_bad_image != "skip":
                    raise TransfiraError(f"unreadable image at row {index[bad[0]] + 1}: {batch['error'][bad[0]]} "
                                         "(set on_bad_image = \"skip\" to go on without it)")
                for i in bad:
                    tqdm.write(f"skipping row {index[i] + 1}: {batch['error'][i]}")
            out = backbone(batch["image"].to(device, non_blocking=True)).float().flatten(1).cpu().numpy()
            if out.shape[1] != embedding_size:
                raise TransfiraError(f"embedding_size = {embedding_size}, but the encoder outputs {out.shape[1]}-D")
            finite = np.isfinite(out).all(1)
            if not finite[good].all():
                row = index[np.flatnonzero(good & ~finite)[0]]
                raise TransfiraError(f"non-finite embedding for row {row + 1} ({dataset.paths[row]}): "
                                     "check the model file and the preprocessing")
            out[~good] = np.nan
            features[index] = out
            ok[index] = good
            bar.update(len(index))
            if step % FLUSH_EVERY == 0:
                features.flush()
                save_npy(ok_path, ok)
                _write_progress(meta_path, info, int(index[-1]) + 1)
    features.flush()
    del features
    partial.replace(out_path)
    for leftover in (meta_path, ok_path):
        leftover.unlink(missing_ok=True)
    return np.load(out_path, mmap_mode="r"), ok


def _paths_hash(paths: list[str]) -> str:
    import hashlib

    return hashlib.sha1("\n".join(paths).encode()).hexdigest()
