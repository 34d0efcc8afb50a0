"""Predictor checkpoints: plain state dicts (SPEC §4) and the resume file of a training run.

A predictor checkpoint is a plain ``state_dict`` with keys ``backbone.*``, ``ccs_layer.*``
and ``ccas_layer.*`` (the layout of the released ``w600k_r50_transfira_0025.pt``); it is
read with ``torch.load(..., weights_only=True)``, so loading never runs code from the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TransfiraError
from .io import atomic_path


def save_state(path: str | Path, obj: Any) -> None:
    """``torch.save`` atomically: readers never see a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_state(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TransfiraError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors of many types
        raise TransfiraError(f"{path}: cannot read {what} (weights_only=True): {type(err).__name__}: {err}") from None


def shown_keys(keys: list[str], most: int = 8) -> str:
    """The first ``most`` keys, comma-separated, and how many more (for error messages)."""
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def read_predictor_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a predictor checkpoint (also inside a resume file, or saved from DDP)."""
    state = read_state(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a resume file
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise TransfiraError(f"{path}: expected a state_dict (dict of tensors), found {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def build_predictor(backbone: nn.Module, embedding_size: int, path: str | Path) -> nn.Module:
    """The predictor of checkpoint ``path`` on ``backbone``: the heads' layout (hidden units, input)
    is read from the checkpoint itself (:func:`transfira.model.head_layout`), then the weights load."""
    from .model import RecognizabilityPredictionNetwork, head_layout

    state = read_predictor_state(path)
    model = RecognizabilityPredictionNetwork(backbone, embedding_size, **head_layout(state, embedding_size))
    return load_predictor_checkpoint(path, model, state)


def load_predictor_checkpoint(path: str | Path, model: nn.Module, state: dict | None = None) -> nn.Module:
    """Load a predictor ``state_dict`` from ``path`` into ``model`` (strict); return ``model``.

    Accepts our checkpoints, the authors' released ones, and state dicts saved from a
    ``DistributedDataParallel`` wrapper (``module.`` prefix). Key mismatches are reported
    in one line listing the missing and unexpected keys; shape mismatches name the key and
    both shapes (usually a different encoder or ``embedding_size``). A checkpoint without
    ``backbone.*`` keys holds the heads only: they run on the encoder file as it is (a frozen
    encoder; what :func:`save_predictor` writes for ``freeze_backbone`` runs).
    """
    state = dict(read_predictor_state(path) if state is None else state)
    target = model.module if hasattr(model, "module") else model
    expected = target.state_dict()
    if not any(k.startswith("backbone.") for k in state):
        expected = {k: v for k, v in expected.items() if not k.startswith("backbone.")}
    # copies made by backbone.untie_aliased_initializers may be absent from other files
    for copy, source in getattr(getattr(target, "backbone", None), "transfira_untied", {}).items():
        if f"backbone.{copy}" not in state and f"backbone.{source}" in state:
            state[f"backbone.{copy}"] = state[f"backbone.{source}"]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {shown_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {shown_keys(unexpected)}")
        raise TransfiraError(f"{path}: checkpoint does not match the model; " + "; ".join(parts))
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TransfiraError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
        if value.shape != expected[key].shape:
            raise TransfiraError(f"{path}: '{key}' has shape {tuple(value.shape)} in the checkpoint but "
                                 f"{tuple(expected[key].shape)} in the model (another encoder or embedding_size?)")
    target.load_state_dict(state, strict=len(expected) == len(target.state_dict()))
    return model


def save_predictor(path: str | Path, model: nn.Module, heads_only: bool = False) -> None:
    """Write ``model``'s plain state dict (unwrapped from DDP, on CPU) atomically; with ``heads_only``
    without the ``backbone.*`` entries (a frozen encoder: the checkpoint runs on the encoder file)."""
    target = model.module if hasattr(model, "module") else model
    save_state(path, {k: v.detach().cpu() for k, v in target.state_dict().items()
                      if not (heads_only and k.startswith("backbone."))})
