"""The whole TransFIRA pipeline on aligned LFW, one command: protocol -> generate -> train -> test -> evaluate.

    python data/lfw/run_protocol.py                       # the configs in configs/examples/lfw/
    python data/lfw/run_protocol.py --from train          # re-run from a stage (earlier outputs kept)
    python data/lfw/run_protocol.py --workdir /tmp/lfw_small \\
        --set protocol.max_ids=40 --set train.opt.num_epochs=1    # a small version

Run from the project root. Each stage's config is the TOML file of that name in ``--configs``,
with ``--set STAGE.KEY[.KEY]=VALUE`` overrides applied and, when ``--workdir`` is not
``output/lfw``, every path starting with ``output/lfw/`` moved under the work dir. The configs
actually used are written to ``<workdir>/configs/``, the time per stage to
``<workdir>/timings.json``. test.py gets the last checkpoint of the train run and train.py's
``head_hidden``; it reuses generate.py's test features (same encoder, same preprocessing)
unless ``--recompute-features`` is given.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from transfira.config import toml_text  # noqa: E402

STAGES = ("protocol", "generate", "train", "test", "evaluate")
DEFAULT_WORKDIR = "output/lfw"


def write_configs(configs: dict[str, dict[str, Any]], workdir: str | Path) -> dict[str, Path]:
    """Write each stage's config to ``<workdir>/configs/<stage>.toml``; the paths by stage."""
    config_dir = Path(workdir) / "configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    paths = {stage: config_dir / f"{stage}.toml" for stage in configs}
    for stage, cfg in configs.items():
        paths[stage].write_text(toml_text(cfg))
    return paths


def parse_override(text: str, stages: tuple[str, ...] = STAGES) -> tuple[str, list[str], Any]:
    """``stage.key[.key]=value`` -> (stage, keys, value); the value is read as TOML, else as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise SystemExit(f"--set {text!r}: expected STAGE.KEY=VALUE, e.g. train.opt.num_epochs=1")
    key, raw = text.split("=", 1)
    stage, *keys = key.strip().split(".")
    if stage not in stages:
        raise SystemExit(f"--set {text!r}: unknown stage '{stage}' (stages: {', '.join(stages)})")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return stage, keys, value


def relocate(value: Any, workdir: str) -> Any:
    """Move paths under ``output/lfw/`` to ``workdir``."""
    if isinstance(value, dict):
        return {k: relocate(v, workdir) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, workdir) for v in value]
    if isinstance(value, str) and workdir != DEFAULT_WORKDIR:
        for prefix in (DEFAULT_WORKDIR + "/", "./" + DEFAULT_WORKDIR + "/"):
            if value.startswith(prefix):
                return str(Path(workdir) / value[len(prefix):]) + ("/" if value.endswith("/") else "")
        if value == DEFAULT_WORKDIR:
            return workdir
    return value


def load_configs(config_dir: Path, workdir: str, overrides: list[str]) -> dict[str, dict[str, Any]]:
    configs = {}
    for stage in STAGES:
        path = config_dir / f"{stage}.toml"
        if not path.is_file():
            raise SystemExit(f"missing config {path}")
        configs[stage] = relocate(tomllib.loads(path.read_text()), workdir)
    for text in overrides:
        stage, keys, value = parse_override(text)
        node = configs[stage]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    train = configs["train"]
    epochs = train["opt"]["num_epochs"]
    stem = Path(train["model_path"]).stem
    configs["test"]["checkpoint_path"] = str(Path(train["checkpoint_outdir"]) / train["run_name"] / f"{stem}_{epochs:04}.pt")
    configs["test"]["head_hidden"] = train.get("head_hidden", 0)
    return configs


def protocol_command(cfg: dict[str, Any]) -> list[str]:
    args = []
    for key, value in cfg.items():
        args += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return [sys.executable, "data/lfw/make_protocol.py", *args]


def commands(configs: dict[str, dict[str, Any]], config_paths: dict[str, Path], recompute: bool) -> dict[str, list[str]]:
    py = sys.executable
    features = str(Path(configs["generate"]["outdir"]) / "test_features.npy")
    test = [py, "test.py", "--config", str(config_paths["test"]), "--predict_scores", "--aggregate_features",
            "--all_variants"] + (["--generate_features"] if recompute else ["--features_path", features])
    return {
        "protocol": protocol_command(configs["protocol"]),
        "generate": [py, "generate.py", "--config", str(config_paths["generate"])],
        "train": [py, "train.py", "--config", str(config_paths["train"]), "--overwrite"],  # re-running the stage trains again
        "test": test,
        "evaluate": [py, "evaluate.py", "--config", str(config_paths["evaluate"])],
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="configs/examples/lfw", help="folder with protocol/generate/train/test/evaluate.toml")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where outputs go (paths output/lfw/... are moved here)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a config value (repeatable), e.g. train.opt.num_epochs=1")
    p.add_argument("--from", dest="first", choices=STAGES, default=STAGES[0], help="first stage to run")
    p.add_argument("--to", dest="last", choices=STAGES, default=STAGES[-1], help="last stage to run")
    p.add_argument("--recompute-features", action="store_true",
                   help="test.py embeds the test images again instead of reusing generate.py's features")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    workdir = args.workdir.rstrip("/")
    configs = load_configs(Path(args.configs), workdir, args.overrides)
    paths = write_configs(configs, workdir)
    cmds = commands(configs, paths, args.recompute_features)
    todo = STAGES[STAGES.index(args.first): STAGES.index(args.last) + 1]
    timings_path = Path(workdir) / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    total = time.perf_counter()
    for stage in todo:
        print(f"\n=== [{stage}] {' '.join(cmds[stage][1:])}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(cmds[stage], cwd=ROOT)
        timings[stage] = round(time.perf_counter() - start, 1)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        if result.returncode != 0:
            raise SystemExit(f"[{stage}] failed with exit status {result.returncode} after {timings[stage]} s")
        print(f"=== [{stage}] done in {timings[stage]:.1f} s", flush=True)
    print(f"\nall stages: {time.perf_counter() - total:.1f} s  ("
          + ", ".join(f"{s} {timings[s]:.1f} s" for s in todo) + ")")
    if "evaluate" in todo:  # only a run that evaluated has a results file to name
        print(f"results: {Path(configs['evaluate']['outdir']) / 'results.md'}")
    return timings


if __name__ == "__main__":
    main()
