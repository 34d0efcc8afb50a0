"""Training of the recognizability predictor (paper section III-B, eq. 9), one CPU or many GPUs.

``train(config)`` runs the whole job: one process, or one per GPU under ``torchrun``
(DistributedDataParallel; NCCL on GPUs, Gloo on CPU). Rank 0 alone writes the run
directory ``{checkpoint_outdir}/{run_name}/``: ``run_params.json``, ``metrics.csv``,
checkpoints ``{model stem}_{epoch:04}.pt`` (plain state dicts) and ``resume.pt``; TensorBoard
logs go to ``{checkpoint_outdir}/runs/{run_name}/``.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import distributed as dist_utils
from .backbone import check_embedding_size, load_backbone, resolve_device
from .checkpoint import read_state, save_predictor, save_state
from .config import REQUIRED, apply_schema
from .data import (
    AUG_DEFAULTS,
    ImageDataset,
    build_transform,
    make_loader,
    read_annotations,
)
from .errors import TransfiraError
from .evaluation import spearman
from .io import format_rows, numeric_column, save_csv, save_json
from .model import RecognizabilityPredictionNetwork
from .progress import log, progress

_TABLE = {"data_dir": REQUIRED, "annotations": REQUIRED, "path_col_name": "path", "ccs_col_name": "ccs",
          "ccas_col_name": "ccas", "batch_size": 64}
SCHEMA: dict[str, Any] = {
    "backbone_type": "onnx",
    "model_path": REQUIRED,
    "embedding_size": REQUIRED,
    "checkpoint_outdir": REQUIRED,
    "save_per_epoch": 1,  # validation and checkpoint every this many epochs (and after the last)
    "run_name": "",  # default: a timestamp
    "seed": 0,
    "device": "auto",
    "num_workers": 4,
    "amp": "none",  # "bf16" | "fp16" | "none" (CUDA only)
    "grad_accum_steps": 1,
    "save_every_steps": 0,  # also write resume.pt every this many optimizer steps (0: at epoch ends only)
    "head_hidden": 0,  # 0: linear heads (paper); > 0: one ReLU hidden layer of this width
    "freeze_backbone": False,  # train the heads only, backbone in eval mode (CR-FIQA-style ablation)
    "head_init": "xavier",  # "xavier" (paper) or "ridge": linear heads start at the ridge fit on the features
    "head_init_l2": 1e-3,  # ridge penalty, relative to the mean squared feature norm
    "on_bad_image": "error",  # "error" | "skip"
    "aug": dict(AUG_DEFAULTS),
    "data": dict(_TABLE),
    "val": {**_TABLE, "annotations": ""},  # annotations = "" disables validation
    "opt": {"optimizer": "AdamW", "lr": 1e-6, "weight_decay": 1e-4, "milestones": [300], "gamma": 0.5,
            "loss_func": "MSE", "num_epochs": 500, "momentum": 0.9},
    "env": {"dist_url": "env://", "backend": "auto"},
}
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
LOSSES = {"mse": nn.functional.mse_loss, "l1": nn.functional.l1_loss, "smoothl1": nn.functional.smooth_l1_loss}
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
RESUME_FILE = "resume.pt"


def check_config(cfg: dict[str, Any], source: str = "config") -> None:
    """Value checks the schema cannot express; one-line errors naming the key."""
    def bad(key: str, value: Any, want: str) -> TransfiraError:
        return TransfiraError(f"{source}: {key} = {value!r}: {want}")

    opt = cfg["opt"]
    if str(opt["optimizer"]).lower() not in OPTIMIZERS:
        raise bad("opt.optimizer", opt["optimizer"], "expected SGD, Adam or AdamW")
    if str(opt["loss_func"]).lower() not in LOSSES:
        raise bad("opt.loss_func", opt["loss_func"], "expected MSE, L1 or SmoothL1")
    if str(cfg["amp"]).lower() not in AMP_DTYPES:
        raise bad("amp", cfg["amp"], "expected 'bf16', 'fp16' or 'none'")
    if cfg["on_bad_image"] not in ("error", "skip"):
        raise bad("on_bad_image", cfg["on_bad_image"], "expected 'error' or 'skip'")
    if cfg["head_init"] not in ("xavier", "ridge"):
        raise bad("head_init", cfg["head_init"], "expected 'xavier' or 'ridge'")
    if cfg["head_init"] == "ridge" and cfg["head_hidden"]:
        raise bad("head_init", cfg["head_init"], "the ridge start needs linear heads (head_hidden = 0)")
    positive = {"save_per_epoch": cfg["save_per_epoch"], "grad_accum_steps": cfg["grad_accum_steps"],
                "embedding_size": cfg["embedding_size"], "opt.num_epochs": opt["num_epochs"],
                "data.batch_size": cfg["data"]["batch_size"], "val.batch_size": cfg["val"]["batch_size"]}
    for key, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(key, value, "expected a positive integer")
    for key in ("save_every_steps", "num_workers", "head_hidden", "seed"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 0:
            raise bad(key, cfg[key], "expected a non-negative integer")
    if not isinstance(opt["milestones"], list) or not all(isinstance(m, int) for m in opt["milestones"]):
        raise bad("opt.milestones", opt["milestones"], "expected a list of epoch numbers")
    for key in ("lr", "weight_decay", "gamma", "momentum"):
        if not isinstance(opt[key], (int, float)) or opt[key] < 0 or (key == "lr" and opt[key] == 0):
            raise bad(f"opt.{key}", opt[key], "expected a non-negative number" + (" > 0" if key == "lr" else ""))


def read_targets(table: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """Image paths and ``[N, 2]`` float32 (CCS, CCAS) targets of a ``[data]``/``[val]`` table."""
    csv = Path(table["annotations"])
    cols = [table["path_col_name"], table["ccs_col_name"], table["ccas_col_name"]]
    frame = read_annotations(csv, cols)
    targets = np.empty((len(frame), 2), np.float32)
    for j, col in enumerate(cols[1:]):
        values, bad = numeric_column(frame, col)
        if len(bad):
            raise TransfiraError(f"{csv}: non-finite or non-numeric label in column '{col}' at row(s) {format_rows(bad)}")
        targets[:, j] = values
    return frame[cols[0]].astype(str).tolist(), targets


def build_model(cfg: dict[str, Any], device: torch.device) -> RecognizabilityPredictionNetwork:
    """The encoder from ``model_path`` plus CCS/CCAS heads, with ``embedding_size`` checked."""
    backbone = load_backbone(cfg["backbone_type"], cfg["model_path"]).to(device)
    check_embedding_size(backbone, cfg["embedding_size"], cfg["aug"]["crop_dim"], cfg["model_path"])
    return RecognizabilityPredictionNetwork(backbone, cfg["embedding_size"], cfg["head_hidden"],
                                            cfg["freeze_backbone"]).to(device)


@torch.inference_mode()
def ridge_init_heads(model: RecognizabilityPredictionNetwork, dataset: ImageDataset, batch_size: int,
                     num_workers: int, info: dist_utils.DistInfo, l2: float = 1e-3) -> None:
    """Start the linear heads at the ridge regression of (CCS, CCAS) on the encoder's features.

    Xavier-initialized heads on raw embeddings (norm ~20-70) start with outputs far outside
    [-1, 1]; short runs then spend their steps on that scale. One pass over the training
    images (eval mode, no gradients) accumulates X^T X and X^T y in float64, summed over
    processes, and solves ``(X^T X + l2 * mean|z|^2 * N * I) w = X^T y`` (bias unpenalized).
    """
    sampler = torch.utils.data.DistributedSampler(dataset, info.world_size, info.rank, shuffle=False)
    loader = make_loader(dataset, batch_size, num_workers, sampler=sampler, persistent=False)
    was_training = model.backbone.training
    model.backbone.eval()
    dim = model.ccs_layer.in_features
    xtx = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=info.device)
    xty = torch.zeros(dim + 1, 2, dtype=torch.float64, device=info.device)
    for batch in progress(loader, desc="ridge head init", leave=False, disable=not info.is_main):
        keep = batch["ok"].bool()
        z = model.backbone(batch["image"][keep].to(info.device)).flatten(1).double()
        x = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype, device=z.device)], 1)
        xtx += x.T @ x
        xty += x.T @ batch["target"][keep].to(info.device).double()
    for total in (xtx, xty):
        dist_utils.all_reduce_sum(total)
    n = xtx[dim, dim]
    penalty = l2 * xtx.diagonal()[:dim].sum()  # l2 * N * mean squared norm
    solution = torch.linalg.solve(xtx + torch.diag(torch.cat([penalty.repeat(dim), penalty.new_zeros(1)])), xty)
    for k, head in enumerate((model.ccs_layer, model.ccas_layer)):
        head.weight.copy_(solution[:dim, k].to(head.weight.dtype)[None])
        head.bias.copy_(solution[dim, k].to(head.bias.dtype)[None])
    model.backbone.train(was_training)
    if info.is_main:
        log(f"heads initialized by ridge regression on {int(n)} training images' features")


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """MAE, Pearson and Spearman correlation of ``pred`` against ``target`` (NaN when undefined)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    out = {"mae": float(np.abs(pred - target).mean()), "pearson": math.nan, "spearman": math.nan}
    if len(pred) > 1 and pred.std() > 0 and target.std() > 0:
        out["pearson"] = float(np.corrcoef(pred, target)[0, 1])
        out["spearman"] = spearman(pred, target)
    return out


class SkipSampler(torch.utils.data.Sampler):
    """The indices of ``sampler`` without the first ``skip`` (mid-epoch resume)."""

    def __init__(self, sampler: torch.utils.data.Sampler, skip: int = 0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def _check_batch(batch: dict[str, Any], policy: str) -> torch.Tensor | None:
    """Rows to keep: None (all) if every image decoded; raise or drop bad ones per ``on_bad_image``."""
    ok = batch["ok"]
    if bool(ok.all()):
        return None
    if policy == "error":
        first = [e for e, good in zip(batch["error"], ok.tolist()) if not good][0]
        raise TransfiraError(f"cannot read image {first} (set on_bad_image = 'skip' to leave such images out)")
    return ok


def _autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader, dataset: ImageDataset, info: dist_utils.DistInfo, amp: str = "none",
             policy: str = "error") -> dict[str, float]:
    """CCS and CCAS MAE, Pearson, Spearman over the whole validation set, computed once.

    Each rank predicts its shard; predictions are gathered with their dataset indices and
    de-duplicated (DistributedSampler pads shards), so every image counts exactly once.
    Returns the metrics on every rank (``{"ccs_mae": ..., "ccas_spearman": ...}``).
    """
    was_training = model.training
    model.eval()
    rows = []
    for batch in loader:
        keep = _check_batch(batch, policy)
        with _autocast(info.device, amp):
            ccs, ccas = model(batch["image"].to(info.device, non_blocking=True))
        ok = torch.ones(len(ccs), device=info.device) if keep is None else keep.to(info.device).float()
        rows.append(torch.stack([batch["index"].to(info.device).double(), ccs[:, 0].double(),
                                 ccas[:, 0].double(), ok.double()], 1))
    model.train(was_training)
    local = torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.float64, device=info.device)
    table = dist_utils.all_gather_cat(local).cpu().numpy()
    index, first = np.unique(table[:, 0].astype(np.int64), return_index=True)
    table = table[first]
    table = table[table[:, 3] > 0]
    targets = dataset.targets.numpy()[table[:, 0].astype(np.int64)]
    metrics = {}
    for j, name in enumerate(("ccs", "ccas")):
        for key, value in regression_metrics(table[:, 1 + j], targets[:, j]).items():
            metrics[f"{name}_{key}"] = value
    return metrics


# ---------------------------------------------------------------- run directory and resume state

def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached": float(cached)}, "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resume_path(path: str | Path) -> Path:
    """``--resume`` accepts a run directory or the resume file itself."""
    path = Path(path)
    return path / RESUME_FILE if path.is_dir() else path


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    """Add ``row`` to ``metrics.csv`` (replacing rows of the same or later epochs: a resumed run redoes them)."""
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if len(frame) and "epoch" in frame:
        frame = frame[frame["epoch"] < row["epoch"]]
    save_csv(pd.concat([frame, pd.DataFrame([row])], ignore_index=True), path)


# ---------------------------------------------------------------- the training job

def train(cfg: dict[str, Any] | None, resume: str | Path | None = None, max_steps: int | None = None,
          config_path: str = "config") -> Path:
    """Train the predictor as configured (see :data:`SCHEMA`); return the run directory.

    ``resume`` (run directory or resume file) continues a run from its last saved step,
    skipping the batches already done in that epoch. ``max_steps`` stops after that many
    optimizer steps (counted over the whole run) without writing anything more, as if the
    job were killed there: for smoke tests and for testing resume. With ``cfg = None`` the
    configuration stored in the resume file is used.
    """
    state = read_state(resume_path(resume), "resume file") if resume is not None else None
    if cfg is None:
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise TransfiraError("no config given and no config stored in the resume file")
        config_path = str(resume_path(resume))
        cfg = apply_schema(state["config"], SCHEMA, source=config_path)
    check_config(cfg, config_path)
    device = resolve_device(cfg["device"])
    amp = str(cfg["amp"]).lower()
    if amp != "none" and device.type != "cuda":
        raise TransfiraError(f"{config_path}: amp = '{amp}' needs a CUDA device (device is {device}); set amp = 'none'")
    info = dist_utils.init_distributed(device, cfg["env"]["backend"], cfg["env"]["dist_url"])
    try:
        return _train(cfg, info, amp, state, resume, max_steps)
    finally:
        dist_utils.cleanup()


def _train(cfg: dict[str, Any], info: dist_utils.DistInfo, amp: str, state: dict[str, Any] | None,
           resume: str | Path | None, max_steps: int | None) -> Path:
    main, device, opt_cfg = info.is_main, info.device, cfg["opt"]
    seed_everything(cfg["seed"])

    # data
    train_paths, train_targets = read_targets(cfg["data"])
    train_set = ImageDataset(cfg["data"]["data_dir"], train_paths, build_transform(cfg["aug"], train=True), train_targets)
    val_set = None
    if cfg["val"]["annotations"]:
        val_paths, val_targets = read_targets(cfg["val"])
        val_set = ImageDataset(cfg["val"]["data_dir"], val_paths, build_transform(cfg["aug"]), val_targets)
    batch_size, accum = cfg["data"]["batch_size"], cfg["grad_accum_steps"]
    sampler = torch.utils.data.DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=cfg["seed"])
    drop_last = len(sampler) >= batch_size  # full batches (BatchNorm1d needs > 1 sample); keep a lone small one
    batches_per_epoch = len(sampler) // batch_size if drop_last else 1
    val_loader = None
    if val_set is not None:
        val_sampler = torch.utils.data.DistributedSampler(val_set, info.world_size, info.rank, shuffle=False)
        val_loader = make_loader(val_set, cfg["val"]["batch_size"], cfg["num_workers"], sampler=val_sampler)

    # model, optimizer, schedule
    model = build_model(cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    name = str(opt_cfg["optimizer"]).lower()
    kwargs = {"lr": opt_cfg["lr"], "weight_decay": opt_cfg["weight_decay"]}
    if name == "sgd":
        kwargs["momentum"] = opt_cfg["momentum"]
    optimizer = OPTIMIZERS[name](params, **kwargs)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, opt_cfg["milestones"], opt_cfg["gamma"])
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    loss_fn = LOSSES[str(opt_cfg["loss_func"]).lower()]

    # run directory
    if state is not None:
        run_dir = resume_path(resume).parent
    else:
        run_name = cfg["run_name"] or dist_utils.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        run_dir = Path(cfg["checkpoint_outdir"]) / run_name
    start_epoch, batches_done, step, loss_sum, loss_count = 0, 0, 0, 0.0, 0
    if state is not None:
        _load_resume(state, model, optimizer, scheduler, scaler, info, batch_size, resume)
        start_epoch, batches_done, step = state["epoch"], state["batches_done"], state["step"]
        loss_sum, loss_count = state["loss_sum"], state["loss_count"]
    stem = Path(cfg["model_path"]).stem
    writer = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            for stale in (run_dir / RESUME_FILE, run_dir / "metrics.csv"):
                if stale.exists():
                    warnings.warn(f"{run_dir} already holds a run; starting over (its {stale.name} is replaced)")
                    stale.unlink()
        save_json(run_dir / "run_params.json", {**cfg, "world_size": info.world_size, "torch": torch.__version__,
                                                    "resumed_from": str(resume) if resume else None})
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(Path(cfg["checkpoint_outdir"]) / "runs" / run_dir.name),
                               purge_step=start_epoch + 1 if state is not None else None)

    if state is None and cfg["head_init"] == "ridge":
        ridge_init_heads(model, train_set, batch_size, cfg["num_workers"], info, cfg["head_init_l2"])
    ddp = model
    if info.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def save_resume(epoch: int, done: int) -> None:
        if main:
            save_state(run_dir / RESUME_FILE, {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "batches_done": done, "step": step, "loss_sum": loss_sum, "loss_count": loss_count,
                "rng": _rng_state(), "world_size": info.world_size, "batch_size": batch_size, "config": cfg})
        dist_utils.barrier()

    def validate(epoch: int, train_loss: float | None) -> None:
        metrics = evaluate(model, val_loader, val_set, info, amp, cfg["on_bad_image"]) if val_loader else {}
        if not main:
            return
        lr = optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch, "step": step, "train_loss": train_loss, "lr": lr,
               **{f"val_{k}": v for k, v in metrics.items()}}
        _append_metrics(run_dir / "metrics.csv", row)
        if train_loss is not None:
            writer.add_scalar("train/epoch_loss", train_loss, epoch)
            writer.add_scalar("train/lr", lr, epoch)
        for key, value in metrics.items():
            writer.add_scalar(f"val/{key}", value, epoch)
        writer.flush()
        text = f"epoch {epoch}/{opt_cfg['num_epochs']}"
        if train_loss is not None:
            text += f"  loss {train_loss:.5f}  lr {lr:.3g}"
        if metrics:
            text += "  | val " + "  ".join(
                f"{t.upper()} MAE {metrics[f'{t}_mae']:.4f} r {metrics[f'{t}_pearson']:.3f} "
                f"rho {metrics[f'{t}_spearman']:.3f}" for t in ("ccs", "ccas"))
        log(text)

    if state is None:
        validate(0, None)  # the starting point: the untrained heads
    epochs = progress(range(start_epoch, opt_cfg["num_epochs"]), desc="epochs", disable=not main,
                  initial=start_epoch, total=opt_cfg["num_epochs"])
    for epoch in epochs:
        sampler.set_epoch(epoch)
        if batches_done == 0:
            seed_everything(cfg["seed"] + 1_000_003 * (epoch + 1) + info.rank)  # per-epoch worker seeds and augmentation
        loader = make_loader(train_set, batch_size, cfg["num_workers"], sampler=SkipSampler(sampler, batches_done * batch_size),
                             persistent=False,
                             drop_last=drop_last)
        ddp.train()
        bar = progress(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not main,
                   initial=batches_done, total=batches_per_epoch)
        for i, batch in enumerate(bar, start=batches_done):
            keep = _check_batch(batch, cfg["on_bad_image"])
            images, targets = batch["image"], batch["target"]
            if keep is not None:
                images, targets = images[keep], targets[keep]
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            sync = (i + 1) % accum == 0 or i + 1 == batches_per_epoch
            no_sync = ddp.no_sync() if info.distributed and not sync else contextlib.nullcontext()
            with no_sync:
                with _autocast(device, amp):
                    ccs, ccas = ddp(images)
                loss = loss_fn(ccs[:, 0].float(), targets[:, 0]) + loss_fn(ccas[:, 0].float(), targets[:, 1])  # eq. 9
                scaler.scale(loss / accum).backward()
            if not torch.isfinite(loss):
                raise TransfiraError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                     "lower opt.lr (or use amp = 'bf16' instead of 'fp16')")
            loss_sum += float(loss.item()) * len(targets)
            loss_count += len(targets)
            bar.set_postfix(loss=f"{loss_sum / max(loss_count, 1):.5f}")
            if not sync:
                continue
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if cfg["save_every_steps"] and step % cfg["save_every_steps"] == 0 and i + 1 < batches_per_epoch:
                save_resume(epoch, i + 1)
            if max_steps is not None and step >= max_steps:
                if writer is not None:
                    writer.close()
                return run_dir
        bar.close()
        batches_done = 0
        scheduler.step()
        epoch_loss = dist_utils.all_reduce_mean(loss_sum / max(loss_count, 1), device)
        loss_sum, loss_count = 0.0, 0
        done = epoch + 1
        if done % cfg["save_per_epoch"] == 0 or done == opt_cfg["num_epochs"]:
            if main:
                save_predictor(run_dir / f"{stem}_{done:04}.pt", model)
            validate(done, epoch_loss)
        elif main:
            writer.add_scalar("train/epoch_loss", epoch_loss, done)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], done)
            epochs.set_postfix(loss=f"{epoch_loss:.5f}")
        save_resume(done, 0)
    if writer is not None:
        writer.close()
    return run_dir


def _load_resume(state: dict[str, Any], model: nn.Module, optimizer, scheduler, scaler, info: dist_utils.DistInfo,
                 batch_size: int, resume: str | Path) -> None:
    """Restore model, optimizer, schedule, scaler and RNG states from a resume file."""
    from .checkpoint import _shown

    path = resume_path(resume)
    needed = {"model", "optimizer", "scheduler", "scaler", "epoch", "batches_done", "step", "rng", "world_size",
              "batch_size", "loss_sum", "loss_count"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise TransfiraError(f"{path}: not a resume file (expected keys {', '.join(sorted(needed))})")
    if state["batches_done"] and (state["world_size"], state["batch_size"]) != (info.world_size, batch_size):
        raise TransfiraError(
            f"{path}: saved mid-epoch with {state['world_size']} process(es) x batch {state['batch_size']}; "
            f"resume with the same (now {info.world_size} x {batch_size}), or from an epoch-end resume file")
    result = model.load_state_dict(state["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise TransfiraError(f"{path}: resume file does not match the model; missing keys: "
                             f"{_shown(result.missing_keys) or '-'}; unexpected keys: {_shown(result.unexpected_keys) or '-'}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
