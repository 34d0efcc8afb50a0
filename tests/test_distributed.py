"""Multi-process training (2 Gloo processes on CPU): no rank decides alone, nothing hangs, resume is exact.

The ranks are started as plain processes (``RANK``/``WORLD_SIZE``/``MASTER_PORT`` set by
hand, no torchrun agent that would kill the survivors), so a rank that raises alone leaves
the other one waiting: the subprocess timeout turns such a hang into a test failure.
The exact-resume test runs under ``torchrun`` itself.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import ROOT
from test_training import write_toml
from transfira.config import apply_schema
from transfira.jobs.train import SCHEMA

SIZE = 16  # tiny images and encoder: the tests time the collectives, not the convolutions
TIMEOUT = 300  # seconds for a 2-process run (generous: shared CI machines); a hang fails the test, not CI


class TinyEncoder(nn.Module):
    """Conv-BN-PReLU, then a Linear and a BatchNorm1d (as in InsightFace's MobileFaceNet): a batch
    with a single image cannot go through it in training mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.PReLU(4), nn.Flatten(),
                                  nn.Linear(4 * (SIZE // 2) ** 2, 8), nn.BatchNorm1d(8))

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """``encoder.onnx`` (8-D embeddings of 16x16 images) and ``images/good_{i}.png``."""
    from transfira.demo import export_onnx

    out = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    net = TinyEncoder()
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        net(torch.randn(64, 3, SIZE, SIZE))
    export_onnx(net, out / "encoder.onnx", input_size=SIZE)
    (out / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(out / "images" / f"good_{i}.png")
    (out / "images" / "broken.png").write_bytes(b"not a png at all")
    return out


def table(tiny: Path, tmp: Path, name: str, n: int, bad: set[int] = frozenset()) -> Path:
    """A label CSV of ``n`` rows; rows in ``bad`` point at the unreadable file."""
    rng = np.random.default_rng(len(name) + n)
    paths = ["broken.png" if i in bad else f"good_{i}.png" for i in range(n)]
    frame = pd.DataFrame({"path": paths, "ccs": rng.uniform(0, 1, n), "ccas": rng.uniform(-0.5, 0.5, n)})
    frame.to_csv(tmp / f"{name}.csv", index=False)
    return tmp / f"{name}.csv"


def config(tiny: Path, tmp: Path, train_csv: Path, val_csv: Path | None, **over) -> Path:
    raw = {
        "model_path": str(tiny / "encoder.onnx"), "embedding_size": 8, "checkpoint_outdir": str(tmp / "ckpt"),
        "run_name": "run", "num_workers": 0, "seed": 3, "device": "cpu",
        "aug": {"resize_dim": SIZE, "crop_dim": SIZE},
        "data": {"data_dir": str(tiny / "images"), "annotations": str(train_csv), "batch_size": 2},
        "val": {"data_dir": str(tiny / "images"), "annotations": str(val_csv or ""), "batch_size": 2},
        "opt": {"optimizer": "SGD", "lr": 1e-2, "milestones": [5], "num_epochs": 1},
        "env": {"timeout_s": 60},
    }
    for key, value in over.items():
        section, _, sub = key.rpartition("__")
        (raw.setdefault(section, {}) if section else raw)[sub] = value
    return write_toml(tmp / "train.toml", apply_schema(raw, SCHEMA, "test"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# rank 1 runs out of memory in a training step's ``what``, the other ranks do not: "backward" raises
# inside autograd's backward (a hook on the loss), "step" in the optimizer step
OOM_ON_RANK_1 = """import os, runpy, sys, torch
if os.environ["RANK"] == "1":
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    if sys.argv[1] == "backward":
        backward = torch.Tensor.backward
        def hooked(self, *args, **kwargs):
            self.register_hook(oom)
            return backward(self, *args, **kwargs)
        torch.Tensor.backward = hooked
    else:
        torch.optim.SGD.step = oom
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# all_reduce_grads on 2 ranks: gradients on both ranks, on rank 0 only, on none; two dtypes, small buckets
ALL_REDUCE_GRADS = """import os, torch, torch.distributed as dist
from transfira import distributed
dist.init_process_group("gloo", world_size=2, rank=int(os.environ["RANK"]))
rank = dist.get_rank()
distributed.GRAD_BUCKET_BYTES = 64  # the 20-value gradient alone, the others grouped by dtype
params = [torch.nn.Parameter(torch.zeros(n, dtype=d)) for n, d in
          ((3, torch.float32), (20, torch.float32), (5, torch.float64), (4, torch.float32), (2, torch.float32))]
frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
local = lambda i: torch.arange(params[i].numel(), dtype=params[i].dtype) * (rank + 1) + i
for i in (0, 1, 2) if rank == 0 else (0, 1):
    params[i].grad = local(i)
distributed.all_reduce_grads(params + [frozen])
base = lambda i: torch.arange(params[i].numel(), dtype=params[i].dtype)
for i, want in ((0, base(0) * 1.5), (1, base(1) * 1.5 + 1), (2, (base(2) + 2) / 2)):
    assert torch.equal(params[i].grad, want), (i, params[i].grad, want)
assert params[3].grad is None and params[4].grad is None and frozen.grad is None
print("all_reduce_grads ok")
dist.barrier()
dist.destroy_process_group()  # an exit with the group alive can abort Gloo's teardown (SIGABRT)
"""


def launch(cfg: Path, world_size: int = 2, *args: str, script: str = "train.py",
           prefix: tuple[str, ...] = (), timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """``script`` (default ``train.py``) as ``world_size`` independent ranks (after ``prefix``, e.g.
    ``-c code``); kill all and fail on a hang (after ``timeout`` seconds)."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.pop("TRANSFIRA_PROGRESS", None)
        procs.append(subprocess.Popen([sys.executable, *prefix, str(ROOT / script), "--config", str(cfg), *args], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        tails = [(p.communicate()[1] or "")[-1500:] for p in procs]
        pytest.fail(f"{script} hung (rank {rank} still running after {timeout} s); stderr tails: {tails}")
    return results


def expected_skips(n: int, bad: set[int], seed: int, epoch: int, world_size: int, batch: int) -> tuple[int, list]:
    """Images a step leaves out, from DistributedSampler's documented order (randperm of seed + epoch,
    rank r taking every world_size-th index): every unreadable one, and a lone readable one (BatchNorm
    cannot normalize one sample). Also returns the readable count of every (step, rank) batch."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    skipped, good = 0, []
    for rank in range(world_size):
        mine = order[rank::world_size]
        for start in range(0, len(mine) - batch + 1, batch):
            readable = sum(i not in bad for i in mine[start:start + batch])
            good.append(readable)
            skipped += batch - (readable if readable >= 2 else 0)
    return skipped, good


def error_lines(results) -> list[str]:
    return [r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "" for r in results]


def test_unreadable_batches_are_skipped_on_every_rank(tiny, tmp_path):
    """The issue's case: 2 processes, batch 2, every other image unreadable, on_bad_image = 'skip'.
    Some steps give a rank no readable image or a single one (BatchNorm1d cannot take it): training
    must finish on both ranks and report what it skipped; validation uses rank 0's BatchNorm buffers,
    the ones in the checkpoint."""
    n, bad = 24, set(range(1, 24, 2))
    val_bad = {3, 6}
    cfg = config(tiny, tmp_path, table(tiny, tmp_path, "train", n, bad), table(tiny, tmp_path, "val", 10, val_bad),
                 on_bad_image="skip", head_init="ridge", opt__num_epochs=2, save_per_epoch=1)
    skips = [expected_skips(n, bad, 3, epoch, 2, 2) for epoch in range(2)]
    assert any(0 in good for _, good in skips) and any(1 in good for _, good in skips)  # both cases occur
    results = launch(cfg)
    assert [r.returncode for r in results] == [0, 0], error_lines(results)
    metrics = pd.read_csv(tmp_path / "ckpt" / "run" / "metrics.csv")
    assert metrics.train_skipped.tolist()[1:] == [s for s, _ in skips]
    assert (metrics.val_skipped == len(val_bad)).all()
    assert np.isfinite(metrics.train_loss.iloc[1:]).all() and np.isfinite(metrics.val_ccs_mae).all()
    log = results[0].stderr + results[0].stdout
    assert f"skipped {skips[-1][0]} training and 2 validation images" in log
    assert f"ridge regression on {n - len(bad)} training images' features ({len(bad)} unreadable images skipped)" in log
    assert "Traceback" not in results[0].stderr + results[1].stderr

    # validation metrics = the checkpoint's predictions, recomputed in one process with numpy
    from transfira.backbone import load_backbone
    from transfira.checkpoint import load_predictor_checkpoint
    from transfira.data import build_transform, load_image
    from transfira.model import RecognizabilityPredictionNetwork

    model = RecognizabilityPredictionNetwork(load_backbone("onnx", tiny / "encoder.onnx"), 8)
    load_predictor_checkpoint(tmp_path / "ckpt" / "run" / "encoder_0002.pt", model).eval()
    frame = pd.read_csv(tmp_path / "val.csv").drop(index=sorted(val_bad))
    transform = build_transform({"resize_dim": SIZE, "crop_dim": SIZE})
    with torch.no_grad():
        ccs, ccas = model(torch.stack([transform(load_image(tiny / "images" / p)) for p in frame.path]))
    mae = np.abs(ccs[:, 0].double().numpy() - frame.ccs.to_numpy()).mean()
    np.testing.assert_allclose(metrics.val_ccs_mae.iloc[-1], mae, rtol=1e-6)


def test_unreadable_image_stops_every_rank_with_one_message(tiny, tmp_path):
    """on_bad_image = 'error': the rank that meets the file and the other one both stop, same line."""
    cfg = config(tiny, tmp_path, table(tiny, tmp_path, "train", 16, {5}), None)
    results = launch(cfg)
    lines = error_lines(results)
    assert [r.returncode for r in results] == [2, 2], lines
    assert lines[0] == lines[1] and lines[0].startswith("error: epoch 1, step ")
    assert "cannot read image" in lines[0] and "broken.png" in lines[0] and ": rank " in lines[0]
    assert "Traceback" not in results[0].stderr + results[1].stderr


def test_error_in_validation_on_one_rank_stops_both(tiny, tmp_path):
    """Validation row 1 is rank 1's: rank 0 has nothing wrong and must still stop, not wait."""
    cfg = config(tiny, tmp_path, table(tiny, tmp_path, "train", 8), table(tiny, tmp_path, "val", 8, {1}))
    results = launch(cfg)
    lines = error_lines(results)
    assert [r.returncode for r in results] == [2, 2], lines
    assert lines[0] == lines[1] and lines[0].startswith("error: validation: rank 1: cannot read image")
    assert "broken.png" in lines[0] and "Traceback" not in results[0].stderr + results[1].stderr


@pytest.mark.parametrize("what, accum", [("backward", 1), ("backward", 2), ("step", 2)])
def test_out_of_memory_on_one_rank_stops_both(tiny, tmp_path, what, accum):
    """An exception in rank 1's optimizer step, or inside its backward (of a step's last micro-batch,
    accum 1, or of an accumulation micro-batch), is agreed like one in the forward: both ranks stop
    quickly with the same line instead of rank 0 waiting in a gradient all-reduce (short timeouts:
    a hang fails the test)."""
    cfg = config(tiny, tmp_path, table(tiny, tmp_path, "train", 8), None, grad_accum_steps=accum, env__timeout_s=20)
    results = launch(cfg, prefix=("-c", OOM_ON_RANK_1, what), timeout=120)
    lines = error_lines(results)
    assert [r.returncode for r in results] == [2, 2], lines
    assert lines[0] == lines[1] and lines[0].startswith("error: epoch 1, step 1: rank 1: out of memory: CUDA out of")
    assert "lower data.batch_size" in lines[0] and "Traceback" not in results[0].stderr + results[1].stderr


class PlainEncoder(nn.Module):
    """TinyEncoder without BatchNorm: training on 2 ranks then computes what one process does."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.PReLU(4), nn.Flatten(),
                                  nn.Linear(4 * (SIZE // 2) ** 2, 8))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("accum", [1, 3])
def test_two_ranks_train_as_one_process(tiny, tmp_path, accum):
    """2 ranks of batch 2 = 1 process of batch 4 (DistributedSampler deals the same 4 images to each
    step), end to end, momentum SGD, with gradient accumulation: the ranks' gradients are averaged."""
    from transfira.backbone import load_backbone
    from transfira.config import load_config
    from transfira.demo import export_onnx
    from transfira.model import RecognizabilityPredictionNetwork
    from transfira.jobs.train import run as train

    torch.manual_seed(1)
    export_onnx(PlainEncoder().eval(), tmp_path / "plain.onnx", input_size=SIZE)
    csv = table(tiny, tmp_path, "train", 32)
    runs = {}
    for world, batch in ((1, 4), (2, 2)):
        (tmp_path / str(world)).mkdir()
        cfg = config(tiny, tmp_path / str(world), csv, None, model_path=str(tmp_path / "plain.onnx"),
                     grad_accum_steps=accum, data__batch_size=batch, opt__momentum=0.9, opt__lr=0.05)
        if world == 1:
            train(load_config(cfg, SCHEMA))
        else:
            results = launch(cfg)
            assert [r.returncode for r in results] == [0, 0], error_lines(results)
        runs[world] = tmp_path / str(world) / "ckpt" / "run"
    one, two = (torch.load(runs[w] / "plain_0001.pt", weights_only=True) for w in (1, 2))
    assert one.keys() == two.keys() and any(k.startswith("backbone.") for k in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    state = torch.load(runs[2] / "resume.pt", weights_only=True)
    assert state["step"] == -(-8 // accum) and state["world_size"] == 2  # 32 images / 4 per step
    start = RecognizabilityPredictionNetwork(load_backbone("onnx", tmp_path / "plain.onnx"), 8).state_dict()
    assert all(not torch.equal(one[k], start[k]) for k in one if k.endswith("weight"))  # every layer trained


def test_all_reduce_grads_average_and_none(tmp_path):
    """A gradient None on every rank stays None; None on one rank counts as zeros there; buckets split."""
    results = launch(tmp_path / "unused.toml", prefix=("-c", ALL_REDUCE_GRADS), timeout=120)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert all("all_reduce_grads ok" in r.stdout for r in results)


def test_ridge_start_names_unreadable_image(tiny, tmp_path):
    """The ridge pass follows on_bad_image too (one process: the same agreed error)."""
    from transfira.distributed import AgreedError
    from transfira.jobs.train import run as train
    from transfira.config import load_config

    cfg = config(tiny, tmp_path, table(tiny, tmp_path, "train", 8, {2}), None, head_init="ridge")
    with pytest.raises(AgreedError, match=r"ridge head init: cannot read image .*broken\.png"):
        train(load_config(cfg, SCHEMA))


@pytest.mark.slow
def test_torchrun_resume_with_flips_is_exact(tiny, tmp_path):
    """torchrun, 2 processes, hflip_p = 0.5: killed mid-epoch and resumed = uninterrupted, every tensor."""
    csv = table(tiny, tmp_path, "train", 32)
    over = dict(save_every_steps=3, aug__hflip_p=0.5, opt__num_epochs=2, opt__milestones=[1], data__batch_size=4)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def torchrun(cfg: Path, *args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(ROOT / "train.py"), *args] + (["--config", str(cfg)] if cfg else []),
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = config(tiny, tmp_path / "a", csv, None, **over)
    torchrun(full)
    killed = config(tiny, tmp_path / "b", csv, None, **over)
    torchrun(killed, "--max-steps", "7")  # 4 steps an epoch: last save at step 6, mid-epoch 2
    run_a, run_b = tmp_path / "a" / "ckpt" / "run", tmp_path / "b" / "ckpt" / "run"
    state = torch.load(run_b / "resume.pt", weights_only=True)
    assert (state["epoch"], state["batches_done"], state["step"]) == (1, 2, 6) and len(state["ranks"]) == 2
    torchrun(None, "--resume", str(run_b))
    a = torch.load(run_a / "encoder_0002.pt", weights_only=True)
    b = torch.load(run_b / "encoder_0002.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = torch.load(run_a / "encoder_0001.pt", weights_only=True)
    assert not all(torch.equal(a[k], first[k]) for k in a)


def test_flips_depend_on_seed_epoch_and_index_only(tiny):
    """Image i of epoch e is flipped iff SeedSequence((seed, e, i)) draws below hflip_p: the same in
    any worker process, any order, after any resume; about hflip_p of the images, new ones each epoch."""
    from transfira.data import ImageDataset, build_transform, load_image, make_loader

    aug = {"resize_dim": SIZE, "crop_dim": SIZE}
    paths = [f"good_{i}.png" for i in range(40)]
    plain = [build_transform(aug)(load_image(tiny / "images" / p)) for p in paths]
    data = ImageDataset(tiny / "images", paths, build_transform(aug), hflip_p=0.5, seed=7)
    flipped = {}
    for epoch in (0, 1):
        data.set_epoch(epoch)
        batches = list(make_loader(data, 8, num_workers=2, shuffle=True, persistent=False))
        for batch in batches:
            for index, image in zip(batch["index"].tolist(), batch["image"]):
                want = np.random.default_rng((7, epoch, index)).random() < 0.5
                assert torch.equal(image, plain[index].flip(-1) if want else plain[index])
                flipped[epoch, index] = want
    share = [np.mean([flipped[e, i] for i in range(40)]) for e in (0, 1)]
    assert all(0.25 < s < 0.75 for s in share)
    assert any(flipped[0, i] != flipped[1, i] for i in range(40))
    assert not any(torch.equal(p, p.flip(-1)) for p in plain)  # the flips are visible
