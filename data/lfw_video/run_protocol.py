"""The LFW video protocol for one encoder, one command: calibrate -> protocol -> generate -> prepare
-> train -> test -> analyse -> evaluate.

    python data/lfw_video/run_protocol.py --configs configs/examples/lfw_video/mobilefacenet_arcface
    python data/lfw_video/run_protocol.py --configs configs/examples/lfw_video/w600k_mbf --from train
    python data/lfw_video/run_protocol.py --configs ... --workdir /tmp/small \\
        --set protocol.max_ids_train=30 --set train.opt.num_epochs=1      # a small version

Run from the project root. Each stage's config is ``<configs>/<stage>.toml`` with ``--set
STAGE.KEY[.KEY]=VALUE`` overrides; with ``--workdir`` every path under the configs' own work dir
(``output/lfw_video/<encoder>``) moves there. The configs used go to ``<workdir>/configs/``, the time
per stage to ``<workdir>/timings.json``. Stages are resumable: generate.py / test.py resume their
feature passes, train.py its resume file; ``--from`` re-runs from a stage. ``calibrate`` only
reports (the protocol's severities are set in protocol.toml, see docs/results_lfw_video.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from data.lfw.run_protocol import parse_override, write_configs  # noqa: E402
from data.lfw_video.make_protocol import _hash  # noqa: E402

STAGES = ("calibrate", "protocol", "generate", "prepare", "train", "test", "analyse", "evaluate")
SCRIPTS = {"calibrate": "data/lfw_video/calibrate_severity.py", "protocol": "data/lfw_video/make_protocol.py",
           "analyse": "data/lfw_video/analyse.py"}


def relocate(value: Any, old: str, new: str) -> Any:
    """Every path under ``old`` moved under ``new``."""
    if isinstance(value, dict):
        return {k: relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, old, new) for v in value]
    if isinstance(value, str) and old != new and (value == old or value.startswith(old + "/")):
        return new + value[len(old):]
    return value


def train_runs(configs: dict[str, dict]) -> list[str]:
    """The training configs: ``train`` (the recipe) and the ablation runs ``train_<name>``, in name order."""
    return ["train"] + sorted(k for k in configs if k.startswith("train_"))


def evaluate_runs(configs: dict[str, dict]) -> list[str]:
    """The evaluate configs: ``evaluate`` (the test split) and ``evaluate_<name>`` (the transfer sets)."""
    return ["evaluate"] + sorted(k for k in configs if k.startswith("evaluate_"))


def final_checkpoint(train: dict[str, Any]) -> Path:
    epochs = train["opt"]["num_epochs"]
    return Path(train["checkpoint_outdir"]) / train["run_name"] / f"{Path(train['model_path']).stem}_{epochs:04}.pt"


def load_configs(config_dir: Path, workdir: str | None, overrides: list[str]) -> tuple[dict[str, dict], str]:
    """Stage configs with overrides applied; the work dir is analyse.toml's ``workdir``. Besides one
    TOML per stage, ``train_<name>.toml`` files are further training runs of the train stage and
    ``evaluate_<name>.toml`` further evaluations of the evaluate stage."""
    names = list(STAGES) + sorted(p.stem for pattern in ("train_*.toml", "evaluate_*.toml")
                                  for p in config_dir.glob(pattern))
    configs = {s: tomllib.loads((config_dir / f"{s}.toml").read_text()) for s in names}
    default = configs["analyse"]["workdir"].rstrip("/")
    workdir = (workdir or default).rstrip("/")
    configs = {s: relocate(c, default, workdir) for s, c in configs.items()}
    for text in overrides:
        stage, keys, value = parse_override(text, tuple(names))
        node = configs[stage]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    if "transfira" in configs["analyse"].get("heads", {}):  # the recipe's run: its last checkpoint
        configs["analyse"]["heads"]["transfira"] = str(final_checkpoint(configs["train"]))
    if not configs["test"].get("checkpoint_path"):  # test.py's predictor: the recipe's run unless the config names one
        configs["test"]["checkpoint_path"] = str(final_checkpoint(configs["train"]))
    return configs, workdir


def cli_command(script: str, cfg: dict[str, Any]) -> list[str]:
    args = []
    for key, value in cfg.items():
        args += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return [sys.executable, script, *args]


def e2e_identities(subjects: pd.Series, seed: int, limit: int) -> set:
    """The first ``limit`` identities in ``sha1(seed:identity:name)`` order (0: all)."""
    names = sorted(set(subjects), key=lambda n: _hash(seed, "identity", n))
    return set(names[:limit] if limit else names)


def prepare(cfg: dict[str, Any]) -> None:
    """The end-to-end training subset of the train photos (whole identities in hash order; CPU budget)."""
    photos = pd.read_csv(Path(cfg["protocol_dir"]) / "train_photos.csv")
    keep = e2e_identities(photos["subject_id"], cfg["seed"], cfg["e2e_train_ids"])
    subset = photos[photos["subject_id"].isin(keep)]
    out = Path(cfg["labels_dir"]) / "train_photos_e2e.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    subset.to_csv(out.with_name(out.name + ".tmp"), index=False)
    out.with_name(out.name + ".tmp").replace(out)
    print(f"e2e training subset: {len(keep)} identities / {len(subset)} photos of {len(photos)}")


def train_command(cfg: dict[str, Any], path: Path) -> list[str] | None:
    """train.py for one run: None when its last checkpoint exists, ``--resume`` when it was interrupted."""
    if final_checkpoint(cfg).is_file():
        return None
    run_dir = final_checkpoint(cfg).parent
    resume = ["--resume", str(run_dir)] if (run_dir / "resume.pt").is_file() else []
    return [sys.executable, "train.py", "--config", str(path), *resume]


def commands(configs: dict[str, dict], paths: dict[str, Path]) -> dict[str, list[str]]:
    py = sys.executable
    features = str(Path(configs["prepare"]["labels_dir"]) / "test_probes_features.npy")
    return {
        "calibrate": cli_command(SCRIPTS["calibrate"], configs["calibrate"]),
        "protocol": cli_command(SCRIPTS["protocol"], configs["protocol"]),
        "generate": [py, "generate.py", "--config", str(paths["generate"])],
        "test": [py, "test.py", "--config", str(paths["test"]), "--predict_scores", "--aggregate_features",
                 "--all_variants", "--features_path", features],
        "analyse": [py, SCRIPTS["analyse"], "--config", str(paths["analyse"])],
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="configs/examples/lfw_video/mobilefacenet_arcface",
                   help="folder with one TOML per stage")
    p.add_argument("--workdir", default=None, help="where outputs go (default: analyse.toml's workdir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a config value (repeatable), e.g. train.opt.num_epochs=1")
    p.add_argument("--from", dest="first", choices=STAGES, default="protocol", help="first stage (default: protocol)")
    p.add_argument("--to", dest="last", choices=STAGES, default=STAGES[-1], help="last stage to run")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    configs, workdir = load_configs(Path(args.configs), args.workdir, args.overrides)
    paths = write_configs(configs, workdir)
    cmds = commands(configs, paths)
    todo = STAGES[STAGES.index(args.first): STAGES.index(args.last) + 1]
    timings_path = Path(workdir) / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    total = time.perf_counter()
    for stage in todo:
        start = time.perf_counter()
        if stage == "prepare":
            print("\n=== [prepare]", flush=True)
            prepare(configs["prepare"])
            code = 0
        elif stage == "train":
            code = 0
            for run in train_runs(configs):
                cmd = train_command(configs[run], paths[run])
                print(f"\n=== [train] {run}: " + (" ".join(cmd[1:]) if cmd else "done already"), flush=True)
                begin = time.perf_counter()
                code = subprocess.run(cmd, cwd=ROOT).returncode if cmd else 0
                timings[run] = round(time.perf_counter() - begin, 1)
                if code:
                    break
        elif stage == "evaluate":
            code = 0
            for run in evaluate_runs(configs):
                labels = configs[run].get("images", {}).get("labels", "")
                if run != "evaluate" and not Path(labels).is_file():  # a transfer set analyse.py did not write
                    print(f"\n=== [evaluate] {run}: skipped, no {labels}", flush=True)
                    continue
                print(f"\n=== [evaluate] {run}: evaluate.py --config {paths[run]}", flush=True)
                code = subprocess.run([sys.executable, "evaluate.py", "--config", str(paths[run])], cwd=ROOT).returncode
                if code:
                    break
        else:
            print(f"\n=== [{stage}] {' '.join(cmds[stage][1:])}", flush=True)
            code = subprocess.run(cmds[stage], cwd=ROOT).returncode
        timings[stage] = round(time.perf_counter() - start, 1)
        tmp = timings_path.with_name("timings.json.tmp")
        tmp.write_text(json.dumps(timings, indent=2) + "\n")
        tmp.replace(timings_path)
        if code != 0:
            raise SystemExit(f"[{stage}] failed with exit status {code} after {timings[stage]} s")
        print(f"=== [{stage}] done in {timings[stage]:.1f} s", flush=True)
    print(f"\nall stages: {time.perf_counter() - total:.1f} s  (" + ", ".join(f"{s} {timings[s]:.1f} s" for s in todo) + ")")
    return timings


if __name__ == "__main__":
    main()
