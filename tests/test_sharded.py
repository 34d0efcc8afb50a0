"""generate.py, test.py and score.py under two Gloo ranks on CPU give the one-process outputs; errors stop both ranks.

One process and two ranks are both launched by :func:`test_distributed.launch` (plain
processes, one thread each, so that the float results can be compared; a hang fails the
test instead of blocking CI).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_distributed import launch
from test_generate import write_config
from test_ijb import predictor, release, run_ijb_cli, write_ijb_config  # noqa: F401 - module fixtures
from test_test_script import N_IMAGES, quality_config, setup  # noqa: F401 - the module fixture
from test_training import write_toml


def assert_same_outputs(one: Path, two: Path) -> None:
    """The same files in both folders: arrays within 1e-6, tables and other files identical."""
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    for name in names:
        a, b = one / name, two / name
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(b), np.load(a), rtol=1e-6, atol=1e-6, err_msg=name)
        elif name.endswith(".npz"):
            with np.load(a) as x, np.load(b) as y:
                assert sorted(x.files) == sorted(y.files), name
                for key in x.files:
                    if x[key].dtype.kind == "f":
                        np.testing.assert_allclose(y[key], x[key], rtol=1e-6, atol=1e-6, err_msg=f"{name}:{key}")
                    else:
                        np.testing.assert_array_equal(y[key], x[key], err_msg=f"{name}:{key}")
        elif name.endswith(".csv"):
            pd.testing.assert_frame_equal(pd.read_csv(b), pd.read_csv(a), rtol=1e-6, atol=1e-6, obj=name)
        else:
            assert a.read_bytes() == b.read_bytes(), name


def run_ok(cfg: Path, ranks: int, *args: str, script: str) -> None:
    """``script`` as ``ranks`` processes (1: plain, no process group), one thread each, successfully."""
    for proc in launch(cfg, ranks, *args, script=script):
        assert proc.returncode == 0, proc.stderr[-2000:]


def generate_tables(demo: Path, tmp: Path, bad_rows: tuple[int, ...]) -> dict:
    """A standalone table (rows ``bad_rows`` unreadable) and a gallery/probe pair of the demo data."""
    train = pd.read_csv(demo / "train.csv").head(90)
    train.loc[list(bad_rows), "path"] = str(tmp / "broken.png")
    (tmp / "broken.png").write_bytes(b"not an image")
    train.to_csv(tmp / "train.csv", index=False)
    return {"train": {"annotations": tmp / "train.csv"},
            "test_gallery": {"annotations": demo / "test_gallery.csv"},
            "test_probes": {"annotations": demo / "test_probes.csv"}}


def test_generate_two_ranks_match_one(demo_dir, tmp_path):
    tables = generate_tables(demo_dir, tmp_path, bad_rows=(3, 60))  # batches of 50: one bad image per rank
    common = dict(on_bad_image="skip", device="cpu")
    for ranks in (1, 2):
        cfg = write_config(tmp_path / f"{ranks}.toml", demo_dir, tmp_path / f"ranks{ranks}", tables, **common)
        run_ok(cfg, ranks, script="generate.py")
    assert len(pd.read_csv(tmp_path / "ranks1" / "train_skipped.csv")) == 2
    assert_same_outputs(tmp_path / "ranks1", tmp_path / "ranks2")


def test_two_ranks_resume_what_one_process_flushed(demo_dir, tmp_path, monkeypatch):
    """One process stops in the second batch of ``train`` (the first flushed, row 4 skipped); two ranks
    finish it (one batch left: rank 1 has none) and give the uninterrupted outputs."""
    import torch

    from transfira import features
    from transfira.jobs import generate as generation
    from transfira.config import load_config

    tables = generate_tables(demo_dir, tmp_path, bad_rows=(3, 60))
    tables = {"train": tables["train"]}
    cfg = {ranks: write_config(tmp_path / f"{ranks}.toml", demo_dir, tmp_path / f"ranks{ranks}", tables,
                               on_bad_image="skip", device="cpu") for ranks in (1, 2)}
    run_ok(cfg[1], 1, script="generate.py")
    monkeypatch.setattr(features, "FLUSH_EVERY", 1)
    real = generation.load_backbone

    def stops_in_batch_2(*args):
        net = real(*args)
        forward = net.forward

        def stopped(x):
            if len(x) == 40:  # 90 rows: batches of 50 and 40
                raise KeyboardInterrupt
            return forward(x)

        net.forward = stopped
        return net

    monkeypatch.setattr(generation, "load_backbone", stops_in_batch_2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes
    try:
        with pytest.raises(KeyboardInterrupt):
            generation.run(load_config(cfg[2], generation.SCHEMA))
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "ranks2" / "train_features.partial.json").is_file()
    procs = launch(cfg[2], 2, script="generate.py")
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    assert "resuming at image 51 of 90" in procs[0].stdout + procs[0].stderr
    assert_same_outputs(tmp_path / "ranks1", tmp_path / "ranks2")


def test_unreadable_image_on_rank_1_stops_both(demo_dir, tmp_path):
    tables = generate_tables(demo_dir, tmp_path, bad_rows=(60,))  # row 61: batch 1 of 50 images, rank 1's
    cfg = write_config(tmp_path / "bad.toml", demo_dir, tmp_path / "out", {"train": tables["train"]}, device="cpu")
    procs = launch(cfg, 2, script="generate.py")
    errors = [[line for line in p.stderr.splitlines() if line.startswith("error: ")] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [p.stderr[-2000:] for p in procs]
    assert len(errors[0]) == 1 and errors[0] == errors[1], errors
    assert "rank 1: unreadable image at row 61" in errors[0][0] and "rank 0" not in errors[0][0]
    assert not (tmp_path / "out" / "train_features.npy").exists()


def test_test_script_two_ranks_match_one(setup, demo_dir):  # noqa: F811 - the fixture
    args = ["--generate_features", "--predict_scores", "--aggregate_features", "--all_variants"]
    for ranks in (1, 2):  # 9 batches of 7 images: 5 on rank 0, 4 on rank 1
        run_ok(Path(quality_config(setup, demo_dir, f"sharded{ranks}.toml", f"sharded{ranks}", 7)), ranks, *args,
               script="test.py")
    assert len(np.load(setup / "sharded1" / "test_serfiq.npy")) == N_IMAGES
    assert_same_outputs(setup / "sharded1", setup / "sharded2")


def test_ijb_features_stage_two_ranks_match_one(release, demo_dir, predictor, tmp_path):  # noqa: F811
    for ranks in (1, 2):
        cfg = write_ijb_config(tmp_path / f"{ranks}.toml", release, demo_dir, predictor, tmp_path / f"ijb{ranks}",
                               batch_size=8)
        run_ijb_cli("--config", cfg, "--to", "meta")
        run_ok(cfg, ranks, "--from", "features", "--to", "features", script="data/IJB/run_ijb.py")
    assert_same_outputs(tmp_path / "ijb1" / "features", tmp_path / "ijb2" / "features")
    assert run_ijb_cli("--config", cfg, "--from", "features", "--to", "features") == {"features": "skipped"}


def test_other_ijb_stages_refuse_torchrun(monkeypatch):
    from transfira.errors import TransfiraError
    from transfira.jobs.ijb import run as run_ijb

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TransfiraError, match=r"run_ijb.py runs the features stage alone \(--from features"):
        run_ijb({}, "meta", "features")


def score_config(demo: Path, checkpoint: Path, tmp: Path, name: str, bad_row: int, **over) -> Path:
    """score.py on 23 demo images (batches of 5: rank 1 gets batches 1 and 3), row ``bad_row``
    pointing at ``tmp/broken.png``, written to ``tmp/<name>.csv``."""
    paths = pd.read_csv(demo / "test.csv")["path"].head(23).tolist()
    paths[bad_row] = str(tmp / "broken.png")
    pd.DataFrame({"path": paths}).to_csv(tmp / "input.csv", index=False)
    if not (tmp / "broken.png").exists():
        (tmp / "broken.png").write_bytes(b"not an image")
    return write_toml(tmp / f"{name}.toml", {
        "model_path": str(demo / "encoder.onnx"), "checkpoint_path": str(checkpoint), "csv": str(tmp / "input.csv"),
        "data_dir": str(demo / "images"), "out": str(tmp / f"{name}.csv"), "batch_size": 5, "num_workers": 0,
        "device": "cpu", **over})


def launch_score(cfg: Path, ranks: int, returncode: int = 0) -> list:
    procs = launch(cfg, ranks, script="score.py")
    assert [p.returncode for p in procs] == [returncode] * ranks, [p.stderr[-2000:] for p in procs]
    return procs


def test_score_py_two_ranks_match_one(demo_dir, demo_predictor, tmp_path):
    logs = {}
    for ranks in (1, 2):  # row 7: batch 1, rank 1's; the last batch (3 rows) is rank 0's alone
        procs = launch_score(score_config(demo_dir, demo_predictor, tmp_path, f"ranks{ranks}", 7), ranks)
        logs[ranks] = procs[0].stdout.replace(f"ranks{ranks}.csv", "out.csv").splitlines()
        assert ranks == 1 or procs[1].stdout + procs[1].stderr == ""  # rank 1 reports nothing
    one = (tmp_path / "ranks1.csv").read_bytes()
    assert (tmp_path / "ranks2.csv").read_bytes() == one
    frame = pd.read_csv(tmp_path / "ranks1.csv", keep_default_na=False)
    assert len(frame) == 23 and "broken.png" in frame["error"][7] and (frame["error"] != "").sum() == 1
    assert logs[2] == logs[1] and "22 image(s) scored, 1 error row(s)" in logs[1][-1]


def test_score_py_error_on_rank_1_stops_both_and_resumes_with_another_count(demo_dir, demo_predictor, tmp_path):
    """Row 17 (batch 3, rank 1's) unreadable with on_bad_image = "error": one process stops after 3
    flushed batches, two ranks after one round (2 batches), both with one line. Once the file is
    readable, each run is finished with the other number of processes: the uninterrupted file."""
    cfg = {ranks: score_config(demo_dir, demo_predictor, tmp_path, f"ranks{ranks}", 17, on_bad_image="error")
           for ranks in (1, 2)}
    for ranks, flushed in ((1, 15), (2, 10)):
        procs = launch_score(cfg[ranks], ranks, returncode=2)
        errors = [[line for line in p.stderr.splitlines() if line.startswith("error: ")] for p in procs]
        assert all(len(e) == 1 for e in errors) and all(e == errors[0] for e in errors), errors
        assert "cannot read image" in errors[0][0] and "broken.png" in errors[0][0]
        assert ranks == 1 or ("rank 1: " in errors[0][0] and "rank 0" not in errors[0][0])
        assert len(pd.read_csv(tmp_path / f"ranks{ranks}.csv")) == flushed
    (tmp_path / "broken.png").write_bytes((demo_dir / "images" / pd.read_csv(demo_dir / "test.csv")["path"][0])
                                          .read_bytes())
    launch_score(cfg[1], 2)
    launch_score(cfg[2], 1)
    launch_score(score_config(demo_dir, demo_predictor, tmp_path, "whole", 17), 1)
    whole = (tmp_path / "whole.csv").read_bytes()
    assert (tmp_path / "ranks1.csv").read_bytes() == whole and (tmp_path / "ranks2.csv").read_bytes() == whole
