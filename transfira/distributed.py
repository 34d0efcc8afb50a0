"""Distributed plumbing (torchvision ``references/classification/utils.py`` style).

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them everything runs
in one process. NCCL is used on GPUs and Gloo on CPU unless ``backend`` says otherwise.

No rank may decide alone: a rank that raises by itself leaves the others waiting in the
next collective until the job's wall time runs out. Decisions that depend on local data
(a batch with unreadable images, an exception while loading or forwarding, a non-finite
loss) therefore go through :func:`agree` (one ``all_reduce`` of a few numbers), and
:func:`raise_agreed` turns an error on any rank into the same :class:`AgreedError` on every
rank, naming what went wrong on each. Training averages the gradients itself
(:func:`all_reduce_grads`) once the ranks agree that every backward succeeded, instead of
DistributedDataParallel's all-reduce hooks inside the backward, where a rank that fails
(out of memory) would leave the others waiting. The process group's ``timeout`` is the
last guard for anything that still escapes (e.g. a rank killed from outside).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .errors import TransfiraError, describe

GRAD_BUCKET_BYTES = 25 << 20  # gradients per all_reduce in all_reduce_grads (DDP's default bucket_cap_mb)


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, backend: str = "auto", dist_url: str = "env://",
                     timeout_s: float | None = None) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); else a single process.

    With CUDA each process takes ``cuda:{LOCAL_RANK}``. ``dist_url`` is the init method
    (``env://`` reads ``MASTER_ADDR``/``MASTER_PORT`` set by torchrun; a ``tcp://host:port``
    from the reference config works too). ``timeout_s`` bounds every collective: a rank left
    waiting that long fails instead of hanging (NCCL aborts with its async error handling).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TransfiraError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise TransfiraError("backend 'nccl' needs CUDA devices; use backend = 'gloo' (or 'auto') on CPU")
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    dist.init_process_group(backend=backend, init_method=dist_url or "env://", world_size=world_size, rank=rank,
                            **({"timeout": timeout} if timeout else {}))
    return DistInfo(rank, world_size, local_rank, device)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[DistInfo]:
    """:func:`init_distributed` for a job (generate.py, test.py) that runs alone or under torchrun;
    leaves the group when the job ends."""
    info = init_distributed(device)
    try:
        yield info
    finally:
        cleanup()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def cleanup() -> None:
    """Leave the process group (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a Python number over all processes."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped ``tensor``s of all processes along dim 0 (rank order)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every process (e.g. a run directory name)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class AgreedError(TransfiraError):
    """An error that every rank raises together, with the same message (see :func:`raise_agreed`)."""


def _device() -> torch.device:
    """The device collectives use: the current CUDA device under NCCL, else CPU."""
    if _initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(values: Sequence[float] | float, op: str = "sum") -> list[float]:
    """The ``sum`` / ``max`` / ``min`` over all ranks of a few numbers (one ``all_reduce``).

    Every rank gets the same result, so every rank takes the same decision from it (e.g.
    the number of usable images in a step, or whether any rank failed). In a single process
    the values come back unchanged.
    """
    single = not isinstance(values, Sequence)
    values = [float(values)] if single else [float(v) for v in values]
    if _initialized():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        t = torch.tensor(values, dtype=torch.float64, device=_device())
        dist.all_reduce(t, op=ops[op])
        values = t.cpu().tolist()
    return values[:1] if single else values


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not _initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_agreed(error: str | None, what: str = "") -> None:
    """Collective check: if any rank passes an ``error``, raise :class:`AgreedError` on all ranks.

    Every rank must call this at the same point (it costs one ``all_reduce``; the messages
    are gathered only when there is an error). The message names each failing rank's error
    (in a single process: the error itself), prefixed by ``what`` (e.g. ``"epoch 3, step 12"``).
    """
    if not _initialized():
        if error:
            raise AgreedError(f"{what}: {error}" if what else error)
        return
    if agree(1.0 if error else 0.0, "max")[0] == 0:
        return
    errors = gather_objects(error)
    parts = [e if len(errors) == 1 else f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    text = "; ".join(parts)
    raise AgreedError(f"{what}: {text}" if what else text)


def _broadcast(tensors: Iterable[torch.Tensor], src: int) -> None:
    if _initialized():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=src)


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` without a process group)."""
    return (dist.get_rank(), dist.get_world_size()) if _initialized() else (0, 1)


def on_main(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` run by rank 0 alone (e.g. reading or repairing a file it owns), its result given
    to every rank; an exception there is raised on every rank as the same :class:`AgreedError`.
    In one process: ``fn(*args)``, its exceptions as they are."""
    if not _initialized():
        return fn(*args)
    result = error = None
    if dist.get_rank() == 0:
        try:
            result = fn(*args)
        except Exception as err:  # noqa: BLE001 - raised on every rank below
            error = describe(err)
    error, result = broadcast_object((error, result))
    if error:
        raise AgreedError(error)
    return result


def dealt_rows(n: int, batch_size: int, start: int = 0) -> list[int]:
    """This rank's rows of ``start .. n - 1`` when the batches of ``batch_size`` (the same rows as in
    one process) are dealt out in turn: batch k goes to rank k mod W."""
    rank, world = rank_world()
    batches = range(start, n, batch_size)
    return [i for b in batches[rank::world] for i in range(b, min(b + batch_size, n))]


def dealt_rounds(loader: Iterable, run: Callable[[Any], Any], n_batches: int, what: str = "") -> Iterator[list]:
    """``run(batch)`` on this rank's batches (``loader`` over its :func:`dealt_rows`), round by round.

    Each round yields the results of every rank's batch in rank order, which is the batch order
    of one process (``n_batches`` in all). Before they are gathered every rank agrees on errors
    (:func:`raise_agreed`, prefixed by ``what``): an exception while loading or in ``run`` on any
    rank stops all of them with one message, and nothing of that round is yielded. In one process:
    ``[run(batch)]`` per batch, its exceptions raised as they are.
    """
    world = rank_world()[1]
    batches = iter(loader)
    for _ in range(-(-n_batches // world)):
        if world == 1:
            yield [run(next(batches))]
            continue
        part = error = None
        try:
            batch = next(batches, None)
            part = None if batch is None else run(batch)
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            error = describe(err)
        raise_agreed(error, what)
        yield [p for p in gather_objects(part) if p is not None]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics), in place.

    Training-mode BatchNorm normalizes with batch statistics, so the ranks' running
    statistics drift apart; validation and checkpoints must use one agreed set.
    """
    _broadcast(module.buffers(), src)


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters, in place: one starting point for training."""
    _broadcast(module.parameters(), src)


def _buckets(params: Iterable[torch.nn.Parameter]) -> Iterator[list[torch.nn.Parameter]]:
    """``params`` in order, grouped by (device, dtype) into runs of at most :data:`GRAD_BUCKET_BYTES`
    (a larger parameter alone): the same buckets on every rank."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    for group in groups.values():
        bucket, size = [], 0
        for p in group:
            if bucket and size + p.numel() * p.element_size() > GRAD_BUCKET_BYTES:
                yield bucket
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel() * p.element_size()
        if bucket:
            yield bucket


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` (those with ``requires_grad``) over all ranks, in place.

    As DistributedDataParallel does: each rank's gradient divided by the world size, then
    summed. Every rank must call this with the same parameters in the same order, after
    agreeing that every backward succeeded (a backward runs no collective, so a rank that
    fails in it leaves no other rank waiting). The gradients travel in flat buckets of one
    dtype (:func:`_buckets`), one ``all_reduce`` each. A gradient that is None on every rank
    stays None (the optimizer then leaves the parameter alone, weight decay and momentum
    included); one that is None on some ranks only counts as zeros there and is set on every
    rank. For that each bucket also carries one flag per parameter (1 where this rank has a
    gradient); the flags are read back only when this rank lacks a gradient.
    """
    if not _initialized():
        return
    world = dist.get_world_size()
    for bucket in _buckets(p for p in params if p.requires_grad):
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in bucket]
        flags = torch.tensor([p.grad is not None for p in bucket], dtype=bucket[0].dtype, device=bucket[0].device)
        flat = _flatten_dense_tensors(grads + [flags]).div_(world)
        dist.all_reduce(flat)
        *averaged, flags = _unflatten_dense_tensors(flat, grads + [flags])
        present = flags.tolist() if any(p.grad is None for p in bucket) else [1] * len(bucket)
        for p, grad, anywhere in zip(bucket, averaged, present):
            if p.grad is not None:
                p.grad.copy_(grad)
            elif anywhere:
                p.grad = grad.clone()
