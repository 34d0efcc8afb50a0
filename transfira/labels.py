"""Recognizability labels in the encoder's embedding space (paper eq. 2-6).

All functions take numpy arrays (or memory-mapped ``.npy``) and return float32 numpy
arrays; the work is done in torch, in row chunks, on the GPU when one is given, so peak
memory is bounded by the chunk size, not by N x C.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .errors import TransfiraError

CR_EPS = 1e-9
CHUNK_BYTES = 256 * 2**20  # similarity block size per chunk


def _rows_per_chunk(width: int, chunk_size: int | None) -> int:
    return chunk_size or max(1, CHUNK_BYTES // (4 * max(width, 1)))


def _as_tensor(block: np.ndarray, device: torch.device | str) -> torch.Tensor:
    return torch.from_numpy(np.array(block, dtype=np.float32)).to(device)  # copy: memmaps are read-only


def class_index(ids: np.ndarray, center_ids: np.ndarray, what: str = "identity") -> np.ndarray:
    """Position of each of ``ids`` in ``center_ids``; unknown ids raise, listing them."""
    ids, center_ids = np.asarray(ids), np.asarray(center_ids)
    if (ids.dtype.kind in "iu") != (center_ids.dtype.kind in "iu"):  # e.g. ids saved as strings
        ids, center_ids = ids.astype(str), center_ids.astype(str)
    index = pd.Index(center_ids).get_indexer(pd.Index(ids))
    if (index < 0).any():
        missing = pd.unique(np.asarray(ids)[index < 0])
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise TransfiraError(f"{len(missing)} {what}(s) have no class center: {shown}")
    return index


def class_centers(features: np.ndarray, ids: np.ndarray, normalize: bool = False, chunk_size: int | None = None,
                  device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Class centers ``mu_c`` = mean of the embeddings of each identity (eq. 2/3).

    With ``normalize`` the embeddings are L2-normalized before averaging (the reference
    averages raw embeddings, the default). Returns ``(center_ids, centers)``, ids sorted.
    """
    features, ids = _check_inputs(features, ids)
    center_ids, inverse = np.unique(ids, return_inverse=True)
    sums = torch.zeros(len(center_ids), features.shape[1], dtype=torch.float64, device=device)
    index = torch.as_tensor(inverse.reshape(-1), device=device)
    step = chunk_size or 65536
    for start in range(0, len(features), step):
        block = _as_tensor(features[start:start + step], device)
        if normalize:
            block = F.normalize(block, dim=1)
        sums.index_add_(0, index[start:start + step], block.double())
    counts = torch.bincount(index, minlength=len(center_ids)).double()
    return center_ids, (sums / counts[:, None]).float().cpu().numpy()


def center_similarities(features: np.ndarray, ids: np.ndarray, center_ids: np.ndarray, centers: np.ndarray,
                        leave_one_out: bool = False, counts: np.ndarray | None = None, normalize: bool = False,
                        chunk_size: int | None = None, device: torch.device | str = "cpu",
                        exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``CCS_i = cos(z_i, mu_{y_i})`` (eq. 4) and ``NNCCS_i = max_{j != y_i} cos(z_i, mu_j)`` (eq. 5).

    With ``leave_one_out`` the own center excludes image i: ``(n mu - z_i) / (n - 1)``;
    this needs ``counts`` (images per center) and the same ``normalize`` flag as
    :func:`class_centers`, and every identity must have at least two images. ``exclude``
    [N, D] (leave-one-out only) is the embedding to take out of the own center instead of
    ``features`` itself: explain.py scores a degraded copy against the center without the
    undegraded photo it was made from.
    """
    features, ids = _check_inputs(features, ids)
    centers = np.asarray(centers, dtype=np.float32)
    if len(center_ids) < 2:
        raise TransfiraError(f"NNCCS needs at least two identities, found {len(center_ids)}")
    if centers.shape != (len(center_ids), features.shape[1]):
        raise TransfiraError(f"centers have shape {centers.shape}, expected ({len(center_ids)}, {features.shape[1]})")
    own_all = class_index(ids, center_ids)
    if leave_one_out:
        counts = np.asarray(counts)
        single = np.asarray(center_ids)[counts < 2]
        if len(single):
            raise TransfiraError(f"leave-one-out centers need two images per identity; these have one: "
                                 f"{', '.join(map(str, single[:10]))}{' ...' if len(single) > 10 else ''}")
    mu = _as_tensor(centers, device)
    mu_unit = F.normalize(mu, dim=1)
    sums = mu * torch.as_tensor(counts, dtype=torch.float32, device=device)[:, None] if leave_one_out else None
    ccs = np.empty(len(features), np.float32)
    nnccs = np.empty(len(features), np.float32)
    step = _rows_per_chunk(len(center_ids), chunk_size)
    for start in range(0, len(features), step):
        z = _as_tensor(features[start:start + step], device)
        own = torch.as_tensor(own_all[start:start + step], device=device)
        ccs_block, nnccs_block = batch_center_similarities(z, own, mu_unit)
        if leave_one_out:
            out = z if exclude is None else _as_tensor(exclude[start:start + step], device)
            own_center = sums[own] - (F.normalize(out, dim=1) if normalize else out)
            ccs_block = F.cosine_similarity(z, own_center, dim=1, eps=1e-12)
        ccs[start:start + len(z)] = ccs_block.cpu().numpy()
        nnccs[start:start + len(z)] = nnccs_block.cpu().numpy()
    return ccs, nnccs


def batch_center_similarities(z: torch.Tensor, own: torch.Tensor, unit_centers: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """CCS (eq. 4) and NNCCS (eq. 5) of one batch of embeddings ``z`` [B, D] in torch, against
    L2-normalized centers [C, D]; ``own`` [B] is each image's row in the centers. The block
    behind :func:`center_similarities`, and the online labels of ``train.py [degrade]``."""
    sims = F.normalize(z.float(), dim=1) @ unit_centers.T
    own = own[:, None]
    ccs = sims.gather(1, own)[:, 0]
    return ccs, sims.scatter(1, own, -torch.inf).amax(1)


def nearest_nonmatch(features: np.ndarray, ids: np.ndarray, center_ids: np.ndarray, centers: np.ndarray,
                     chunk_size: int | None = None, device: torch.device | str = "cpu") -> np.ndarray:
    """Index into ``center_ids`` of ``argmax_{j != y_i} cos(z_i, mu_j)``: the identity behind NNCCS (eq. 5).

    Row chunks as in :func:`center_similarities`; returns int64 [N].
    """
    features, ids = _check_inputs(features, ids)
    if len(center_ids) < 2:
        raise TransfiraError(f"a non-match center needs at least two identities, found {len(center_ids)}")
    own_all = class_index(ids, center_ids)
    mu_unit = F.normalize(_as_tensor(centers, device), dim=1)
    nearest = np.empty(len(features), np.int64)
    step = _rows_per_chunk(len(center_ids), chunk_size)
    for start in range(0, len(features), step):
        sims = F.normalize(_as_tensor(features[start:start + step], device), dim=1) @ mu_unit.T
        own = torch.as_tensor(own_all[start:start + step], device=device)[:, None]
        sims.scatter_(1, own, -torch.inf)
        nearest[start:start + len(sims)] = sims.argmax(1).cpu().numpy()
    return nearest


def certainty_ratio(ccs: np.ndarray, nnccs: np.ndarray, eps: float = CR_EPS) -> np.ndarray:
    """CR-FIQA's certainty ratio ``CCS / (NNCCS + 1 + eps)``."""
    return (np.asarray(ccs, np.float32) / (np.asarray(nnccs, np.float32) + 1.0 + eps)).astype(np.float32)


def _check_inputs(features: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids)
    if ids.dtype == object:  # mixed types (e.g. numbers and names in one CSV column): compare as text
        ids = ids.astype(str)
    if features.ndim != 2:
        raise TransfiraError(f"features must be [N, D], got shape {features.shape}")
    if len(ids) != len(features):
        raise TransfiraError(f"{len(features)} feature rows but {len(ids)} identity labels")
    if len(ids) == 0:
        raise TransfiraError("no images")
    return features, ids
