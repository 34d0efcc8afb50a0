"""train.py's job: training of the recognizability predictor (paper section III-B, eq. 9), one CPU or many GPUs.

``train(config)`` runs the whole job: one process, or one per GPU under ``torchrun`` (data
parallel, gradients averaged by :func:`transfira.distributed.all_reduce_grads`; NCCL on GPUs, Gloo
on CPU). Rank 0 alone writes the run directory ``{checkpoint_outdir}/{run_name}/``:
``run_params.json``, ``metrics.csv``, checkpoints ``{model stem}_{epoch:04}.pt`` (plain state
dicts) and ``resume.pt``; TensorBoard logs go to ``{checkpoint_outdir}/runs/{run_name}/``.
The building blocks (ridge heads, online labels, validation) are :mod:`transfira.training`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import distributed as dist_utils
from ..backbone import check_embedding_size, load_backbone, resolve_device
from ..checkpoint import read_state, save_predictor, save_state, shown_keys
from ..config import REQUIRED, apply_schema
from ..data import (
    AUG_DEFAULTS,
    FreshlyDegradedDataset,
    ImageDataset,
    build_transform,
    make_loader,
    read_annotations,
)
from ..degradations import DEGRADATIONS
from ..errors import TransfiraError, describe
from ..io import format_rows, numeric_column, save_csv, save_json
from ..labels import class_index
from ..model import HEAD_INPUTS, RecognizabilityPredictionNetwork
from ..progress import log, progress
from ..training import (AMP_DTYPES, OnlineLabels, SkipSampler, autocast_for, bad_images, ridge_init_heads, rng_state,
                        seed_everything, set_rng_state, validation_pass)

_TABLE = {"data_dir": REQUIRED, "annotations": REQUIRED, "path_col_name": "path", "ccs_col_name": "ccs",
          "ccas_col_name": "ccas", "label_col_name": "subject_id", "batch_size": 64}


# [degrade]: fresh degradations every epoch, labelled online by the frozen deployed encoder (kinds = [] : off)
DEGRADE_DEFAULTS: dict[str, Any] = {"kinds": [], "stack": 1, "severity": [0.3, 1.0], "p_clean": 0.25,
                                    "centers_path": "", "save_labels": False}


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
    "allow_tf32": False,  # let fp32 convolutions and matmuls round to TF32 on Ampere+ GPUs (faster, ~1e-3 error)
    "grad_accum_steps": 1,
    "save_every_steps": 0,  # also write resume.pt every this many optimizer steps (0: at epoch ends only)
    "head_hidden": 0,  # 0: linear heads (paper); > 0: one ReLU hidden layer of this width
    "freeze_backbone": False,  # train the heads only, backbone in eval mode (CR-FIQA-style ablation)
    "head_init": "xavier",  # "xavier" (paper) or "ridge": linear heads start at the ridge fit on the features
    "head_init_l2": 1e-3,  # ridge penalty, relative to the mean squared feature norm
    "head_input": "raw",  # "raw" (paper): heads on z; "unit_lognorm": heads on [z / |z|, log |z|]
    "on_bad_image": "error",  # "error" | "skip"
    "aug": dict(AUG_DEFAULTS),
    "data": dict(_TABLE),
    "val": {**_TABLE, "data_dir": "", "annotations": ""},  # annotations = "" disables validation
    "degrade": dict(DEGRADE_DEFAULTS),
    "opt": {"optimizer": "AdamW", "lr": 1e-6, "weight_decay": 1e-4, "milestones": [300], "gamma": 0.5,
            "loss_func": "MSE", "num_epochs": 500, "momentum": 0.9},
    "env": {"dist_url": "env://", "backend": "auto", "timeout_s": 1800},  # timeout_s: the longest wait in a collective
}


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


LOSSES = {"mse": nn.functional.mse_loss, "l1": nn.functional.l1_loss, "smoothl1": nn.functional.smooth_l1_loss}


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
    if not isinstance(cfg["allow_tf32"], bool):
        raise bad("allow_tf32", cfg["allow_tf32"], "expected true or false")
    if cfg["on_bad_image"] not in ("error", "skip"):
        raise bad("on_bad_image", cfg["on_bad_image"], "expected 'error' or 'skip'")
    if cfg["head_init"] not in ("xavier", "ridge"):
        raise bad("head_init", cfg["head_init"], "expected 'xavier' or 'ridge'")
    if cfg["head_init"] == "ridge" and cfg["head_hidden"]:
        raise bad("head_init", cfg["head_init"], "the ridge start needs linear heads (head_hidden = 0)")
    if cfg["head_input"] not in HEAD_INPUTS:
        raise bad("head_input", cfg["head_input"], f"expected one of {', '.join(HEAD_INPUTS)}")
    if opt["num_epochs"] == 0 and cfg["head_init"] != "ridge":
        raise bad("opt.num_epochs", 0, "0 epochs (the ridge predictor alone) needs head_init = 'ridge'")
    _check_degrade(cfg["degrade"], bad)
    if cfg["val"]["annotations"] and not cfg["val"]["data_dir"]:
        raise bad("val.data_dir", "", "validation annotations need their image folder")
    positive = {"save_per_epoch": cfg["save_per_epoch"], "grad_accum_steps": cfg["grad_accum_steps"],
                "embedding_size": cfg["embedding_size"], "opt.num_epochs": opt["num_epochs"] or 1,
                "data.batch_size": cfg["data"]["batch_size"], "val.batch_size": cfg["val"]["batch_size"]}
    for key, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(key, value, "expected a positive integer")
    for key in ("save_every_steps", "num_workers", "head_hidden", "seed"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 0:
            raise bad(key, cfg[key], "expected a non-negative integer")
    timeout = cfg["env"]["timeout_s"]
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise bad("env.timeout_s", timeout, "expected a positive number of seconds")
    if not isinstance(opt["milestones"], list) or not all(isinstance(m, int) for m in opt["milestones"]):
        raise bad("opt.milestones", opt["milestones"], "expected a list of epoch numbers")
    for key in ("lr", "weight_decay", "gamma", "momentum"):
        if not isinstance(opt[key], (int, float)) or opt[key] < 0 or (key == "lr" and opt[key] == 0):
            raise bad(f"opt.{key}", opt[key], "expected a non-negative number" + (" > 0" if key == "lr" else ""))


def _check_degrade(deg: dict[str, Any], bad) -> None:
    """The ``[degrade]`` table's values (only when ``kinds`` is not empty: the table is on)."""
    kinds = deg["kinds"]
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise bad("degrade.kinds", kinds, "expected a list of degradation names")
    if not kinds:
        return
    unknown = [k for k in kinds if k not in DEGRADATIONS]
    if unknown or len(set(kinds)) != len(kinds):
        raise bad("degrade.kinds", kinds, f"expected distinct names from {', '.join(DEGRADATIONS)}")
    if not isinstance(deg["stack"], int) or isinstance(deg["stack"], bool) or not 1 <= deg["stack"] <= len(kinds):
        raise bad("degrade.stack", deg["stack"], f"expected an integer from 1 to {len(kinds)} (the number of kinds)")
    sev = deg["severity"]
    if (not isinstance(sev, list) or len(sev) != 2 or not all(isinstance(v, (int, float)) for v in sev)
            or not 0 <= sev[0] <= sev[1] <= 1):
        raise bad("degrade.severity", sev, "expected [lo, hi] with 0 <= lo <= hi <= 1")
    if not isinstance(deg["p_clean"], (int, float)) or not 0 <= deg["p_clean"] <= 1:
        raise bad("degrade.p_clean", deg["p_clean"], "expected a probability in [0, 1]")
    if not deg["centers_path"]:
        raise bad("degrade.centers_path", "", "the online labels need class centers (a generate.py *_centers.npz)")


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
                                            cfg["freeze_backbone"], cfg["head_input"]).to(device)


def read_identities(table: dict[str, Any], center_ids: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Image paths and each image's row in the centers (``[data]`` with ``[degrade]``: no label columns)."""
    csv = Path(table["annotations"])
    cols = [table["path_col_name"], table["label_col_name"]]
    frame = read_annotations(csv, cols)
    try:
        classes = class_index(frame[cols[1]].to_numpy(), center_ids)
    except TransfiraError as err:
        raise TransfiraError(f"{csv}: column '{cols[1]}': {err} (degrade.centers_path)") from None
    return frame[cols[0]].astype(str).tolist(), classes


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


def run(cfg: dict[str, Any] | None, resume: str | Path | None = None, max_steps: int | None = None,
          config_path: str = "config", overwrite: bool = False) -> Path:
    """Train the predictor as configured (see :data:`SCHEMA`); return the run directory.

    ``resume`` (run directory or resume file) continues a run from its last saved step,
    skipping the batches already done in that epoch. ``max_steps`` stops after that many
    optimizer steps (counted over the whole run) without writing anything more, as if the
    job were killed there: for smoke tests and for testing resume. With ``cfg = None`` the
    configuration stored in the resume file is used. A run directory that already holds a run
    is refused unless ``overwrite`` (or the run is resumed).
    """
    state = read_state(resume_path(resume), "resume file") if resume is not None else None
    if cfg is None:
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise TransfiraError("no config given and no config stored in the resume file")
        config_path = str(resume_path(resume))
        cfg = apply_schema(state["config"], SCHEMA, source=config_path)
    check_config(cfg, config_path)
    device = resolve_device(cfg["device"], cfg["allow_tf32"])
    amp = str(cfg["amp"]).lower()
    if amp != "none" and device.type != "cuda":
        raise TransfiraError(f"{config_path}: amp = '{amp}' needs a CUDA device (device is {device}); set amp = 'none'")
    info = dist_utils.init_distributed(device, cfg["env"]["backend"], cfg["env"]["dist_url"], cfg["env"]["timeout_s"])
    try:
        return _train(cfg, info, amp, state, resume, max_steps, overwrite)
    finally:
        dist_utils.cleanup()


def _train(cfg: dict[str, Any], info: dist_utils.DistInfo, amp: str, state: dict[str, Any] | None,
           resume: str | Path | None, max_steps: int | None, overwrite: bool = False) -> Path:
    device, opt_cfg = info.device, cfg["opt"]
    seed_everything(cfg["seed"])

    # data: fixed frames with label columns, or fresh degradations labelled online ([degrade])
    labels = OnlineLabels(cfg, device, None) if cfg["degrade"]["kinds"] else None
    if labels is None:
        train_paths, train_targets = read_targets(cfg["data"])
        train_set = ImageDataset(cfg["data"]["data_dir"], train_paths, build_transform(cfg["aug"]), train_targets,
                                 hflip_p={**AUG_DEFAULTS, **cfg["aug"]}["hflip_p"], seed=cfg["seed"])
    else:
        train_paths, classes = read_identities(cfg["data"], labels.center_ids)
        train_set = FreshlyDegradedDataset(cfg["data"]["data_dir"], train_paths, build_transform(cfg["aug"]), classes,
                                           cfg["degrade"], seed=cfg["seed"])
    val_set = None
    if cfg["val"]["annotations"]:
        val_paths, val_targets = read_targets(cfg["val"])
        val_set = ImageDataset(cfg["val"]["data_dir"], val_paths, build_transform(cfg["aug"]), val_targets)
    batch_size, policy = cfg["data"]["batch_size"], cfg["on_bad_image"]
    sampler = torch.utils.data.DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=cfg["seed"])
    drop_last = len(sampler) >= batch_size  # full batches (BatchNorm1d needs > 1 sample); keep a lone small one
    batches_per_epoch = len(sampler) // batch_size if drop_last else 1
    val_loader = None
    if val_set is not None:
        val_sampler = torch.utils.data.DistributedSampler(val_set, info.world_size, info.rank, shuffle=False)
        val_loader = make_loader(val_set, cfg["val"]["batch_size"], cfg["num_workers"], sampler=val_sampler,
                                 device=device)

    # model, optimizer, schedule
    model = build_model(cfg, device)
    if labels is not None and not cfg["freeze_backbone"]:  # end to end: the labels need the unchanged encoder
        labels.encoder = load_backbone(cfg["backbone_type"], cfg["model_path"]).to(device).eval().requires_grad_(False)
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
    start_epoch, batches_done, step, skipped_steps = 0, 0, 0, 0
    counts = _EpochCounts()
    if state is not None:
        counts = _load_resume(state, model, optimizer, scheduler, scaler, info, batch_size, resume, amp)
        start_epoch, batches_done, step = state["epoch"], state["batches_done"], state["step"]
        skipped_steps = int(state.get("skipped_steps", 0))
    stem = Path(cfg["model_path"]).stem
    writer = None

    def start_run_dir() -> None:
        nonlocal writer
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            stale = [f for f in (run_dir / RESUME_FILE, run_dir / "metrics.csv") if f.exists()]
            if stale and not overwrite:
                raise TransfiraError(f"{run_dir} already holds a run ({stale[0].name}); continue it with "
                                     f"--resume {run_dir}, or start it again with --overwrite")
            for old in stale:
                old.unlink()
        save_json(run_dir / "run_params.json", {**cfg, "world_size": info.world_size, "torch": torch.__version__,
                                                    "resumed_from": str(resume) if resume else None})
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(Path(cfg["checkpoint_outdir"]) / "runs" / run_dir.name),
                               purge_step=start_epoch + 1 if state is not None else None)

    try:
        _main_does(info, "preparing the run directory", start_run_dir)
        if state is None and cfg["head_init"] == "ridge":
            ridge_init_heads(model, train_set, batch_size, cfg["num_workers"], info, cfg["head_init_l2"], policy,
                             labels)
        return _loop(cfg, info, amp, model, optimizer, scheduler, scaler, loss_fn, train_set, sampler, val_loader,
                     val_set, run_dir, stem, writer, state is None, start_epoch, batches_done, step, skipped_steps,
                     counts, batches_per_epoch, drop_last, max_steps, labels)
    finally:
        if writer is not None:
            writer.close()


class _EpochCounts:
    """This rank's running sums within the current epoch (saved per rank in ``resume.pt``)."""

    def __init__(self, loss_sum: float = 0.0, loss_count: int = 0, skipped: int = 0, rows: list | None = None):
        self.loss_sum, self.loss_count, self.skipped = float(loss_sum), int(loss_count), int(skipped)
        self.rows = list(rows or [])  # online labels: [index, kinds, severity, pixel_seed, ccs, nnccs] per image

    def as_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "loss_count": self.loss_count, "skipped": self.skipped, "rows": self.rows}


def _main_does(info: dist_utils.DistInfo, what: str, fn) -> None:
    """Rank 0 runs ``fn`` (file output); an exception there stops every rank with its message."""
    error = None
    if info.is_main:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            error = describe(err)
    dist_utils.raise_agreed(error, what)


def _min_batch(model: nn.Module) -> int:
    """The fewest images a training forward can take: 2 with BatchNorm in training mode, else 1."""
    return 2 if any("BatchNorm" in type(m).__name__ and m.training for m in model.modules()) else 1


def _loop(cfg, info, amp, model, optimizer, scheduler, scaler, loss_fn, train_set, sampler, val_loader, val_set,
          run_dir: Path, stem: str, writer, fresh: bool, start_epoch: int, batches_done: int, step: int,
          skipped_steps: int, counts: _EpochCounts, batches_per_epoch: int, drop_last: bool,
          max_steps: int | None, labels: OnlineLabels | None = None) -> Path:
    """The epochs of :func:`train`. Every batch ends with two agreements over all ranks, a batch that
    ends an optimizer step with three (see below).

    ``step`` counts applied optimizer steps only; fp16 steps that GradScaler skips (inf/NaN
    gradients) are counted in ``skipped_steps`` (``metrics.csv``).
    """
    main, device, opt_cfg, batch_size = info.is_main, info.device, cfg["opt"], cfg["data"]["batch_size"]
    accum, policy = cfg["grad_accum_steps"], cfg["on_bad_image"]
    # rank 0's weights everywhere; buffers are broadcast from rank 0 where they are used (validation, checkpoints)
    dist_utils.broadcast_parameters(model)

    def save_resume(epoch: int, done: int) -> None:
        ranks = dist_utils.gather_objects({"rng": rng_state(device), **counts.as_dict()})

        def write() -> None:
            save_state(run_dir / RESUME_FILE, {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": _to_cpu(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "batches_done": done, "step": step,
                "skipped_steps": skipped_steps, "loss_sum": counts.loss_sum, "loss_count": counts.loss_count,
                "rng": ranks[0]["rng"], "ranks": ranks, "world_size": info.world_size, "batch_size": batch_size,
                "config": cfg})
        _main_does(info, "writing resume.pt", write)

    def validate(epoch: int, train_loss: float | None, train_skipped: int | None) -> None:
        dist_utils.broadcast_buffers(model)  # one agreed set of BatchNorm statistics
        metrics = validation_pass(model, val_loader, val_set, info, amp, policy) if val_loader else {}
        val_skipped = metrics.pop("skipped", None)

        def write() -> None:
            lr = optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch, "step": step, "skipped_steps": skipped_steps, "train_loss": train_loss, "lr": lr,
                   **{f"val_{k}": v for k, v in metrics.items()}, "train_skipped": train_skipped,
                   "val_skipped": val_skipped}
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
            skipped = [f"{n} {what}" for n, what in ((train_skipped, "training"), (val_skipped, "validation")) if n]
            if skipped:
                text += f"  | skipped {' and '.join(skipped)} images (unreadable)"
            log(text)
        _main_does(info, "writing metrics", write)

    def save_checkpoint(epoch: int) -> None:
        dist_utils.broadcast_buffers(model)  # the checkpoint holds rank 0's BatchNorm statistics
        _main_does(info, "writing the checkpoint", lambda: save_predictor(
            run_dir / f"{stem}_{epoch:04}.pt", model, heads_only=cfg["freeze_backbone"]))

    def save_online_labels(epoch: int) -> None:
        ranks = dist_utils.gather_objects(counts.rows)

        def write() -> None:
            table = pd.DataFrame([r for rows in ranks for r in rows],
                                 columns=["index", "kinds", "severity", "seed", "ccs", "nnccs"])
            table = table.drop_duplicates("index").sort_values("index")  # DistributedSampler pads the shards
            table.insert(0, "path", [train_set.paths[i] for i in table["index"]])
            save_csv(table.drop(columns="index").assign(ccas=table["ccs"] - table["nnccs"]),
                     run_dir / f"online_labels_epoch{epoch:04}.csv")
        _main_does(info, "writing the online labels", write)

    if fresh:
        validate(0, None, None)  # the starting point: the untrained (or ridge-started) heads
        if not opt_cfg["num_epochs"]:  # the ridge predictor alone
            save_checkpoint(0)
            return run_dir
    min_batch = _min_batch(model.train())
    epochs = progress(range(start_epoch, opt_cfg["num_epochs"]), desc="epochs", disable=not main,
                      initial=start_epoch, total=opt_cfg["num_epochs"])
    for epoch in epochs:
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)  # flips are a function of (seed, epoch, image index)
        if batches_done == 0:
            seed_everything(cfg["seed"] + 1_000_003 * (epoch + 1) + info.rank)  # per-epoch worker seeds
        loader = make_loader(train_set, batch_size, cfg["num_workers"], sampler=SkipSampler(sampler, batches_done * batch_size),
                             persistent=False, drop_last=drop_last, device=device)
        model.train()
        window = 0  # images used over all ranks since the last optimizer step
        bar = progress(total=batches_per_epoch, initial=batches_done, desc=f"epoch {epoch + 1}", leave=False,
                       disable=not main)
        batches = iter(loader)
        for i in range(batches_done, batches_per_epoch):
            batch, error = None, None
            try:
                batch = next(batches)
            except Exception as err:  # noqa: BLE001 - reported on every rank after the forward
                error = f"loading a batch: {describe(err)}"
            sync = (i + 1) % accum == 0 or i + 1 == batches_per_epoch
            where = f"epoch {epoch + 1}, step {step + 1}"
            loss, used, error, saved = _forward(model, batch, error, policy, min_batch, loss_fn, device, amp, labels,
                                                counts.rows if cfg["degrade"]["save_labels"] else None)
            # the first agreement: errors, images used, non-finite losses, on every rank
            n_err, n_total, n_nonfinite = dist_utils.agree(
                [error is not None, used, loss is not None and not bool(torch.isfinite(loss))])
            if n_err or n_nonfinite:
                if error is None and loss is not None and not bool(torch.isfinite(loss)):
                    error = (f"loss became {loss.item()}; lower opt.lr "
                             "(or use amp = 'bf16' instead of 'fp16')")
                dist_utils.raise_agreed(error, where)
            # each image weighs the same over all ranks: all_reduce_grads averages the ranks' gradients
            weight = used * info.world_size / n_total if n_total else 0.0
            window += int(n_total)
            # the backward runs no collective (the gradients stay local until all_reduce_grads)
            error = _attempt(lambda: (scaler.scale(loss * (weight / accum)).backward(),
                                      _restore_buffers(model, saved)))
            applied = False
            if sync:
                # the second agreement: an error (out of memory) in any rank's backward stops every rank
                # before the gradients are averaged; a micro-step's backward is agreed on below
                dist_utils.raise_agreed(error, where)
                if window:  # no usable image on any rank: no step on any rank
                    dist_utils.all_reduce_grads(model.parameters())
                    scale = scaler.get_scale()
                    error = _attempt(lambda: (scaler.step(optimizer), scaler.update()))
                    applied = scaler.get_scale() >= scale  # GradScaler lowers the scale exactly when it skips a step
                    step, skipped_steps = step + applied, skipped_steps + (not applied)
            # the last agreement: an error in the step (or in an accumulation micro-step's backward) stops every rank
            dist_utils.raise_agreed(error, where)
            counts.loss_sum += float(loss.item()) * used
            counts.loss_count += used
            counts.skipped += len(batch["ok"]) - used
            bar.update(1)
            bar.set_postfix(loss=f"{counts.loss_sum / max(counts.loss_count, 1):.5f}")
            if not sync:
                continue
            optimizer.zero_grad(set_to_none=True)
            window = 0
            every = cfg["save_every_steps"]
            if applied and every and step % every == 0 and i + 1 < batches_per_epoch:
                save_resume(epoch, i + 1)
            if max_steps is not None and step >= max_steps:
                bar.close()
                return run_dir
        bar.close()
        batches_done = 0
        scheduler.step()
        loss_sum, loss_count, skipped = dist_utils.agree([counts.loss_sum, counts.loss_count, counts.skipped])
        epoch_loss = loss_sum / max(loss_count, 1) if loss_count else math.nan
        done = epoch + 1
        if cfg["degrade"]["save_labels"]:
            save_online_labels(done)
        counts = _EpochCounts()
        epochs.set_postfix(loss=f"{epoch_loss:.5f}")
        if done % cfg["save_per_epoch"] == 0 or done == opt_cfg["num_epochs"]:
            save_checkpoint(done)
            validate(done, epoch_loss, int(skipped))
        elif main:
            writer.add_scalar("train/epoch_loss", epoch_loss, done)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], done)
            if skipped:
                log(f"epoch {done}/{opt_cfg['num_epochs']}: skipped {int(skipped)} unreadable training images")
        save_resume(done, 0)
    return run_dir


def _forward(model: nn.Module, batch: dict[str, Any] | None, error: str | None, policy: str, min_batch: int,
             loss_fn, device: torch.device, amp: str, labels: OnlineLabels | None = None,
             rows: list | None = None) -> tuple:
    """This rank's part of a training step before the agreement: ``(loss, images used, error, saved)``.

    The usable images of the batch go forward. With fewer than ``min_batch`` of them (all
    unreadable, or a lone image that BatchNorm cannot normalize) the whole batch goes
    forward with the unreadable ones as blank placeholders (``saved``: the buffers to restore
    after the backward); it is used with weight 0 (0 images): every rank has gradients (zeros)
    to average. An exception becomes ``error`` (nothing is raised here).
    With ``labels`` (``[degrade]``) the targets are measured online (a frozen backbone's one pass
    gives both them and the heads' input) and, with ``rows``, recorded there per image.
    """
    if error is not None:
        return None, 0, error, None
    try:
        keep, error = bad_images(batch, policy)
        if error is not None:
            return None, 0, error, None
        used = int(keep.sum())
        rows_used = keep if 0 < used < len(keep) and used >= min_batch else torch.ones_like(keep)
        if used < min_batch:
            used = 0
        batch = {k: v[rows_used] if isinstance(v, torch.Tensor) else [x for x, r in zip(v, rows_used.tolist()) if r]
                 for k, v in batch.items()}
        images = batch["image"].to(device, non_blocking=True)
        saved = [b.detach().clone() for b in model.buffers()] if used == 0 else None
        features = None
        if labels is None:
            targets = batch["target"].to(device, non_blocking=True)
        else:
            if model.freeze_backbone:  # the deployed encoder itself: one pass for labels and heads
                with torch.no_grad():
                    features = model.backbone(images)
            targets, nnccs = labels(images, batch["class"], features)
            if rows is not None and used:
                rows.extend([int(i), k, float(sv), int(sd), float(c), float(n)] for i, k, sv, sd, c, n in zip(
                    batch["index"].tolist(), batch["kinds"], batch["severity"].tolist(),
                    batch["pixel_seed"].tolist(), targets[:, 0].tolist(), nnccs.tolist()))
        with autocast_for(device, amp):
            ccs, ccas = model(images) if features is None else model(features=features)
        targets = targets.float()  # the loss is fp32 whatever amp says
        loss = loss_fn(ccs[:, 0].float(), targets[:, 0]) + loss_fn(ccas[:, 0].float(), targets[:, 1])  # eq. 9
        return loss, used, None, saved
    except Exception as err:  # noqa: BLE001 - reported on every rank by the caller
        return None, 0, describe(err), None


def _to_cpu(tree):
    """``tree`` (nested dicts and lists) with every tensor copied to the CPU: a resume file loads anywhere."""
    return torch.utils._pytree.tree_map(lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x, tree)


def _attempt(fn) -> str | None:
    """Run ``fn``; an exception becomes its one-line description, for the caller's agreement."""
    try:
        fn()
    except torch.OutOfMemoryError as err:
        return f"out of memory: {str(err).splitlines()[0]} (lower data.batch_size, raise grad_accum_steps)"
    except Exception as err:  # noqa: BLE001 - reported on every rank by the caller
        return describe(err)
    return None


@torch.no_grad()
def _restore_buffers(model: nn.Module, saved: list[torch.Tensor] | None) -> None:
    """Undo a placeholder forward's BatchNorm statistics updates (after its backward)."""
    for buffer, old in zip(model.buffers(), saved or []):
        buffer.copy_(old)


def _load_resume(state: dict[str, Any], model: nn.Module, optimizer, scheduler, scaler, info: dist_utils.DistInfo,
                 batch_size: int, resume: str | Path, amp: str = "none") -> _EpochCounts:
    """Restore model, optimizer, schedule, scaler and this rank's RNG state and running sums.

    The GradScaler state (fp16 only) is loaded when both the saved run and this one have
    one; between fp16 and another ``amp`` the resume is refused."""

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
                             f"{shown_keys(result.missing_keys) or '-'}; unexpected keys: {shown_keys(result.unexpected_keys) or '-'}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if bool(state["scaler"]) != scaler.is_enabled():
        saved = (state.get("config") or {}).get("amp", "fp16" if state["scaler"] else "none")
        raise TransfiraError(f"{path}: saved with amp = '{saved}', resumed with amp = '{amp}'; fp16 keeps a "
                             "GradScaler state the others lack: resume with the saved amp")
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    ranks = state.get("ranks")
    if isinstance(ranks, list) and len(ranks) == info.world_size:  # each rank continues from its own state
        mine = ranks[info.rank]
        set_rng_state(mine["rng"])
        return _EpochCounts(mine["loss_sum"], mine["loss_count"], mine.get("skipped", 0), mine.get("rows"))
    set_rng_state(state["rng"])  # an older resume file, or an epoch end with another number of processes
    if state["batches_done"]:
        return _EpochCounts(state["loss_sum"], state["loss_count"])
    return _EpochCounts()
