"""Network outputs for every image, streamed into memory-mapped ``.npy`` files.

One pass over a dataset feeds each decoded image to a model with one or several outputs
(generate.py: encoder features; test.py: encoder features, predicted CCS / CCAS and
SER-FIQ scores).
N x D never has to fit in RAM, and an interrupted run resumes from the last flushed
batch: rows go to ``<out>.partial.npy`` files with a progress record
``<first out>.partial.json``, renamed onto the final names when complete.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import distributed as dist_utils
from .data import ImageDataset, make_loader
from .errors import TransfiraError
from .io import save_csv, save_json
from .progress import log, progress

FLUSH_EVERY = 50  # batches between progress records


def _partial(path: Path, suffix: str = ".partial.npy") -> Path:
    return path.with_name(path.stem + suffix)


def _resume_point(meta_path: Path, info: dict, partials: list[Path]) -> tuple[int, list[dict]]:
    """Rows done and images skipped by an earlier run with the same inputs ((0, []) if none)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return 0, []
    if any(meta.get(k) != v for k, v in info.items()) or not all(p.exists() for p in partials):
        return 0, []
    return int(meta.get("rows_done", 0)), list(meta.get("skipped", []))


@torch.inference_mode()
def extract_outputs(model: nn.Module, dataset: ImageDataset, outputs: Mapping[str, tuple[Path, int]],
                    batch_size: int = 64, num_workers: int = 2, device: torch.device | str = "cpu",
                    on_bad_image: str = "error", desc: str = "images",
                    fingerprint: Any = None) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Run ``model`` over ``dataset`` and write each of its outputs to its own ``.npy``.

    ``outputs`` maps a name to ``(path, width)``, in the order of the model's outputs (a
    tensor, or a tuple of tensors); width D gives an [N, D] array, width 0 an [N] vector.
    Returns the read-only memmaps by name and the skipped images (``row`` 1-based,
    ``path``, ``error``); their rows are NaN. Non-finite outputs are errors. A run resumes
    only when the images, outputs and ``fingerprint`` (model files, preprocessing; any JSON
    value) are those of the interrupted one.

    Under ``torchrun`` (a process group of W ranks) the batches are dealt out in turn: batch
    k (the same rows as in one process) goes to rank k mod W. After each round of W batches
    every rank agrees on errors (:func:`distributed.raise_agreed`: an unreadable image or an
    exception on any rank stops all of them with one message) and rank 0 gathers the rows
    and alone writes the files and the progress record, so the outputs, their resume point
    and the skipped list are those of one process (a run resumes with any number of ranks).
    Ranks other than 0 get no arrays back (an empty dict), only the skipped images.
    """
    names = list(outputs)
    paths = [Path(outputs[k][0]) for k in names]
    shapes = [(len(dataset), outputs[k][1]) if outputs[k][1] else (len(dataset),) for k in names]
    partials = [_partial(p) for p in paths]
    meta_path = _partial(paths[0], ".partial.json")
    info = {"rows": len(dataset), "outputs": [[str(p), list(s)] for p, s in zip(paths, shapes)],
            "paths_hash": hashlib.sha1("\n".join(dataset.paths).encode()).hexdigest(),
            "fingerprint": json.loads(json.dumps(fingerprint))}
    rank = dist_utils.rank_world()[0]
    start, skipped = dist_utils.on_main(_resume_point, meta_path, info, partials)
    arrays = []
    if rank == 0:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        if start:
            arrays = [np.load(p, mmap_mode="r+") for p in partials]
            log(f"{desc}: resuming at image {start + 1} of {len(dataset)}")
        else:
            arrays = [np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=s)
                      for p, s in zip(partials, shapes)]
    mine = dist_utils.dealt_rows(len(dataset), batch_size, start)
    loader = make_loader(torch.utils.data.Subset(dataset, mine), batch_size, num_workers, device=device)
    model.eval()

    def run(batch: dict[str, Any]) -> tuple[np.ndarray, list[np.ndarray], list[dict]]:
        """This rank's batch: its dataset rows, one array per output, the skipped images."""
        index = batch["index"].numpy()
        good = batch["ok"].numpy().astype(bool)
        bad = []
        for i in np.flatnonzero(~good):
            row = int(index[i]) + 1
            if on_bad_image != "skip":
                raise TransfiraError(f"unreadable image at row {row}: {batch['error'][i]} "
                                     "(set on_bad_image = \"skip\" to go on without it)")
            bad.append({"row": row, "path": dataset.paths[row - 1], "error": batch["error"][i]})
        images = batch["image"].to(device, non_blocking=True)
        results = model(images)
        values = []
        for name, result in zip(names, results if isinstance(results, tuple) else (results,)):
            value = result.float().reshape(len(index), -1).cpu().numpy()
            if value.shape[1] != max(outputs[name][1], 1):
                raise TransfiraError(f"the model gives {value.shape[1]} values per image for '{name}', "
                                     f"expected {max(outputs[name][1], 1)} (check embedding_size)")
            finite = np.isfinite(value).all(1)
            if not finite[good].all():
                row = int(index[np.flatnonzero(good & ~finite)[0]])
                raise TransfiraError(f"non-finite {name} for row {row + 1} ({dataset.paths[row]}): "
                                     "check the model file and the preprocessing")
            value[~good] = np.nan
            values.append(value if outputs[name][1] else value[:, 0])
        return index, values, bad

    with progress(total=len(dataset), initial=start, desc=desc, unit="img") as bar:
        rounds = dist_utils.dealt_rounds(loader, run, len(range(start, len(dataset), batch_size)), desc)
        for step, parts in enumerate(rounds, 1):
            for index, values, bad in parts:
                for image in bad:
                    log(f"skipping row {image['row']}: {image['error']}")
                skipped.extend(bad)
                for array, value in zip(arrays, values):
                    array[index] = value
                bar.update(len(index))
            if rank == 0 and step % FLUSH_EVERY == 0:
                for array in arrays:
                    array.flush()
                save_json(meta_path, {**info, "rows_done": int(parts[-1][0][-1]) + 1, "skipped": skipped})
    if rank:
        dist_utils.barrier()  # rank 0 has renamed the outputs
        return {}, skipped
    for array, partial, path in zip(arrays, partials, paths):
        array.flush()
        del array
        partial.replace(path)
    meta_path.unlink(missing_ok=True)
    dist_utils.barrier()
    return {name: np.load(path, mmap_mode="r") for name, path in zip(names, paths)}, skipped


def readable_mask(n: int, skipped: list[dict[str, Any]]) -> np.ndarray:
    """Boolean mask of the images not in ``skipped``."""
    ok = np.ones(n, bool)
    ok[[s["row"] - 1 for s in skipped]] = False
    return ok


def write_skipped(frame: pd.DataFrame, skipped: list[dict[str, Any]], path: Path) -> None:
    """List skipped images (the input rows plus ``row`` and ``error``), or remove an old list."""
    if not skipped:
        path.unlink(missing_ok=True)
        return
    rows = np.array([s["row"] for s in skipped])
    save_csv(frame.iloc[rows - 1].assign(row=rows, error=[s["error"] for s in skipped]), path)
    print(f"warning: {len(rows)} unreadable image(s) skipped (NaN rows), listed in {path}")
