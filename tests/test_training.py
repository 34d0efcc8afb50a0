"""train.py: learning on the demo data, checkpoints, exact resume, 2 processes on CPU, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, run_script
from transfira.backbone import load_backbone
from transfira.checkpoint import load_predictor_checkpoint, save_state
from transfira.config import apply_schema
from transfira.data import build_transform, load_image
from transfira.errors import TransfiraError
from transfira.labels import center_similarities, class_centers
from transfira.model import RecognizabilityPredictionNetwork
from transfira.jobs.train import SCHEMA, run as train


@pytest.fixture(scope="module")
def labels(demo_dir, tmp_path_factory) -> dict[str, Path]:
    """``{split}_labels.csv`` for train/val, labelled with the demo encoder (as generate.py does)."""
    out = tmp_path_factory.mktemp("labels")
    net = load_backbone("onnx", demo_dir / "encoder.onnx").eval()
    transform = build_transform({})
    paths = {}
    for split in ("train", "val"):
        frame = pd.read_csv(demo_dir / f"{split}.csv")
        with torch.no_grad():
            feats = net(torch.stack([transform(load_image(demo_dir / "images" / p)) for p in frame.path])).numpy()
        ids = frame.subject_id.to_numpy()
        center_ids, centers = class_centers(feats, ids)
        ccs, nnccs = center_similarities(feats, ids, center_ids, centers)
        frame["ccs"], frame["nnccs"], frame["ccas"] = ccs, nnccs, ccs - nnccs
        paths[split] = out / f"{split}_labels.csv"
        frame.to_csv(paths[split], index=False)
    small = pd.read_csv(paths["train"]).iloc[:96]  # 3 batches of 32: quick runs
    paths["small"] = out / "small_labels.csv"
    small.to_csv(paths["small"], index=False)
    return paths


def make_config(tmp: Path, demo_dir: Path, labels: dict, train_csv: str = "train", **over) -> dict:
    raw = {
        "model_path": str(demo_dir / "encoder.onnx"), "embedding_size": 64, "checkpoint_outdir": str(tmp / "ckpt"),
        "run_name": "run", "num_workers": 0, "save_per_epoch": 1, "device": "cpu",
        "data": {"data_dir": str(demo_dir / "images"), "annotations": str(labels[train_csv]), "batch_size": 32},
        "val": {"data_dir": str(demo_dir / "images"), "annotations": str(labels["val"]), "batch_size": 64},
        "opt": {"optimizer": "SGD", "momentum": 0.9, "lr": 1e-3, "milestones": [3], "gamma": 0.2, "num_epochs": 4},
    }
    for key, value in over.items():
        table, _, sub = key.rpartition("__")
        (raw.setdefault(table, {}) if table else raw)[sub] = value
    return apply_schema(raw, SCHEMA, "test")


def write_toml(path: Path, cfg: dict) -> Path:
    """A minimal TOML writer for the flat configs used here (json literals are valid TOML values)."""
    top = [f"{k} = {json.dumps(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
              for k, v in cfg.items() if isinstance(v, dict)]
    path.write_text("\n".join(top) + "\n" + "\n".join(tables) + "\n")
    return path


def test_training_learns_and_writes_run(tmp_path, demo_dir, labels):
    run = train(make_config(tmp_path, demo_dir, labels, opt__num_epochs=3, opt__milestones=[2]))
    assert run == tmp_path / "ckpt" / "run"
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics.epoch.tolist() == [0, 1, 2, 3]
    assert metrics.train_loss.iloc[-1] < metrics.train_loss.iloc[1]
    for head in ("ccs", "ccas"):
        assert metrics[f"val_{head}_mae"].iloc[-1] < 0.5 * metrics[f"val_{head}_mae"].iloc[0]
    params = json.loads((run / "run_params.json").read_text())
    assert params["opt"]["optimizer"] == "SGD" and params["world_size"] == 1
    assert list((tmp_path / "ckpt" / "runs" / "run").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in run.glob("encoder_*.pt")) == [f"encoder_000{i}.pt" for i in range(1, 4)]
    state = torch.load(run / "encoder_0003.pt", weights_only=True)
    fresh = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64)
    fresh.load_state_dict(state)  # strict: plain state dict in the reference layout
    assert load_predictor_checkpoint(run / "encoder_0003.pt", fresh) is fresh
    assert (run / "resume.pt").is_file() and not list(run.glob("*.tmp-*"))


def test_killed_run_resumes_to_identical_weights(tmp_path, demo_dir, labels):
    """Also with random flips: each image's flip is a function of (seed, epoch, index)."""
    over = dict(train_csv="small", save_every_steps=2, val__annotations="", opt__num_epochs=2, opt__milestones=[1],
                aug__hflip_p=0.5, num_workers=1)
    full = train(make_config(tmp_path / "a", demo_dir, labels, **over))
    killed = train(make_config(tmp_path / "b", demo_dir, labels, **over), max_steps=5)  # dies in epoch 2 after step 5
    state = torch.load(killed / "resume.pt", weights_only=True)
    assert (state["epoch"], state["batches_done"], state["step"]) == (1, 1, 4)  # last save: step 4, mid-epoch
    assert len(state["ranks"]) == 1 and state["ranks"][0]["loss_count"] == 32  # this rank's sums of its one batch
    assert not (killed / "encoder_0002.pt").exists()
    train(None, resume=killed)  # config from the resume file
    a = torch.load(full / "encoder_0002.pt", weights_only=True)
    b = torch.load(killed / "encoder_0002.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], torch.load(full / "encoder_0001.pt", weights_only=True)[k]) for k in a)


def test_frozen_backbone_and_accumulation(tmp_path, demo_dir, labels):
    cfg = make_config(tmp_path, demo_dir, labels, train_csv="small", freeze_backbone=True, grad_accum_steps=2,
                      head_hidden=8, val__annotations="", opt__num_epochs=1, opt__optimizer="AdamW", opt__lr=1e-2)
    run = train(cfg)
    state = torch.load(run / "encoder_0001.pt", weights_only=True)
    assert state and not any(k.startswith("backbone.") for k in state)  # heads only: they run on the encoder file
    assert state["ccs_layer.0.weight"].shape == (8, 64)
    resume = torch.load(run / "resume.pt", weights_only=True)["model"]
    start = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64, 8).state_dict()
    assert all(torch.equal(resume[k], v) for k, v in start.items() if k.startswith("backbone."))  # never trained
    assert torch.load(run / "resume.pt", weights_only=True)["step"] == 2  # 3 batches, accumulation 2: 2 steps


def test_bad_inputs_give_one_line_errors(tmp_path, demo_dir, labels):
    frame = pd.read_csv(labels["small"])
    frame.drop(columns="ccas").to_csv(tmp_path / "nocol.csv", index=False)
    nan = frame.copy()
    nan.loc[[2, 7], "ccs"] = np.inf
    nan.to_csv(tmp_path / "nan.csv", index=False)
    frame.iloc[:0].to_csv(tmp_path / "empty.csv", index=False)
    cases = {"nocol": r"missing column\(s\) 'ccas'", "nan": r"column 'ccs' at row\(s\) 3, 8", "empty": "no rows"}
    for name, message in cases.items():
        with pytest.raises(TransfiraError, match=message):
            train(make_config(tmp_path, demo_dir, labels, data__annotations=str(tmp_path / f"{name}.csv")))
    with pytest.raises(TransfiraError, match=r"embedding_size = 128 .* 64-D"):
        train(make_config(tmp_path, demo_dir, labels, embedding_size=128))
    with pytest.raises(TransfiraError, match="amp = 'bf16' needs a CUDA device"):
        train(make_config(tmp_path, demo_dir, labels, amp="bf16", device="cpu"))
    with pytest.raises(TransfiraError, match="device 'mps' is not supported .*float64"):
        train(make_config(tmp_path, demo_dir, labels, device="mps"))
    with pytest.raises(TransfiraError, match="allow_tf32 = 'yes': expected true or false"):
        train(make_config(tmp_path, demo_dir, labels, allow_tf32="yes"))
    with pytest.raises(TransfiraError, match="opt.optimizer"):
        train(make_config(tmp_path, demo_dir, labels, opt__optimizer="Lion"))

    model = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64)
    state = model.state_dict()
    state["extra.weight"] = state.pop("ccas_layer.weight")
    save_state(tmp_path / "bad.pt", state)
    with pytest.raises(TransfiraError, match=r"missing keys \(1\): ccas_layer.weight; unexpected keys \(1\): extra"):
        load_predictor_checkpoint(tmp_path / "bad.pt", model)
    ddp_style = {f"module.{k}": v for k, v in model.state_dict().items()}
    save_state(tmp_path / "ddp.pt", ddp_style)
    load_predictor_checkpoint(tmp_path / "ddp.pt", model)

    # through the script: exit code 2, one line, no traceback
    bad = make_config(tmp_path, demo_dir, labels, data__annotations=str(tmp_path / "nan.csv"))
    proc = run_script("train.py", "--config", write_toml(tmp_path / "bad.toml", bad), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "nan.csv" in proc.stderr


def test_resume_with_another_amp_is_refused(tmp_path, demo_dir, labels):
    """A GradScaler state (fp16) is loaded only into a GradScaler: fp16 <-> none is one line, not a traceback."""
    from transfira.distributed import DistInfo
    from transfira.jobs.train import _load_resume

    run = train(make_config(tmp_path, demo_dir, labels, train_csv="small", val__annotations="", opt__num_epochs=1))
    state = torch.load(run / "resume.pt", weights_only=True)
    assert state["scaler"] == {} and state["skipped_steps"] == 0
    model = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [3])
    fp16 = torch.amp.GradScaler("cpu", enabled=True)  # what amp = 'fp16' creates on CUDA
    with pytest.raises(TransfiraError, match=r"resume.pt: saved with amp = 'none', resumed with amp = 'fp16'"):
        _load_resume(state, model, optimizer, scheduler, fp16, DistInfo(), 32, run, "fp16")
    fp16.scale(torch.ones(()))  # an fp16 run's scaler state, resumed without amp
    state["scaler"], state["config"]["amp"] = fp16.state_dict(), "fp16"
    with pytest.raises(TransfiraError, match=r"saved with amp = 'fp16', resumed with amp = 'bf16'"):
        _load_resume(state, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), DistInfo(), 32,
                     run, "bf16")


def test_loader_pins_memory_for_cuda_runs_only():
    """A CPU run on a GPU host must not open a CUDA context (pinned memory does)."""
    from transfira.data import make_loader

    data = torch.utils.data.TensorDataset(torch.zeros(4, 2))
    assert not make_loader(data, 2, 0).pin_memory and not make_loader(data, 2, 0, device=torch.device("cpu")).pin_memory
    assert make_loader(data, 2, 0, device=torch.device("cuda", 1)).pin_memory


def test_demo_config_is_valid():
    from transfira.config import load_config
    from transfira.jobs.train import check_config

    for path in ("configs/demo/train.toml", "configs/train.toml"):
        check_config(load_config(ROOT / path, SCHEMA), path)


def test_torchrun_two_cpu_processes(tmp_path, demo_dir, labels):
    cfg = make_config(tmp_path, demo_dir, labels, train_csv="small", opt__num_epochs=1, data__batch_size=16)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train.py"), "--config", str(write_toml(tmp_path / "ddp.toml", cfg))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ckpt" / "run"
    assert sorted(p.name for p in run.iterdir()) == ["encoder_0001.pt", "metrics.csv", "resume.pt", "run_params.json"]
    assert json.loads((run / "run_params.json").read_text())["world_size"] == 2
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics.epoch.tolist() == [0, 1] and np.isfinite(metrics.val_ccs_mae).all()
    assert torch.load(run / "resume.pt", weights_only=True)["step"] == 3  # 96 rows / 2 ranks / 16
    assert proc.stdout.count("run directory") == 1
    shutil.rmtree(tmp_path / "ckpt")
