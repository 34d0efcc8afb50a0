"""Backbone loading: an ONNX face encoder converted to a trainable torch module (SPEC §4)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import TransfiraError

BACKBONE_TYPES = ("onnx",)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise TransfiraError(f"invalid device '{name}': {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TransfiraError(f"device '{name}' requested but CUDA is not available")
    return device


def load_backbone(backbone_type: str, model_path: str | Path) -> nn.Module:
    """Load the encoder ``phi``; every weight becomes a trainable parameter."""
    if backbone_type not in BACKBONE_TYPES:
        raise TransfiraError(f"backbone_type '{backbone_type}' is not supported (supported: {', '.join(BACKBONE_TYPES)})")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise TransfiraError(f"model file not found: {model_path} (see pretrained_weights/README.md)")
    return onnx_to_torch(model_path)


def onnx_to_torch(model_path: Path) -> nn.Module:
    """Convert with onnx2torch and turn weight buffers into parameters.

    onnx2torch keeps graph initializers it cannot attach to a layer (e.g. PReLU slopes,
    weights reached through ``Identity`` nodes) as buffers of an ``initializers`` module;
    those are weights of the encoder and must train with it.
    """
    import onnx
    from onnx2torch import convert

    try:
        graph = onnx.load(str(model_path))
    except Exception as err:  # noqa: BLE001 - onnx raises several types for bad files
        raise TransfiraError(f"{model_path}: not a readable ONNX model: {err}") from None
    try:
        net = convert(graph)
    except Exception as err:  # noqa: BLE001
        raise TransfiraError(f"{model_path}: onnx2torch cannot convert this model: {err}") from None
    make_buffers_trainable(net)
    return net


def make_buffers_trainable(net: nn.Module) -> None:
    """Register every floating-point buffer of ``net.initializers`` as a parameter."""
    holder = getattr(net, "initializers", None)
    if holder is None:
        return
    for name, buf in list(holder.named_buffers(recurse=False)):
        if buf.is_floating_point():
            delattr(holder, name)
            holder.register_parameter(name, nn.Parameter(buf.detach().clone()))


@torch.inference_mode()
def embedding_dim(backbone: nn.Module, crop_dim: int, device: torch.device | str = "cpu") -> int:
    """Output size of ``backbone`` on a ``crop_dim`` x ``crop_dim`` RGB input."""
    was_training = backbone.training
    backbone.eval()
    out = backbone(torch.zeros(1, 3, crop_dim, crop_dim, device=device))
    backbone.train(was_training)
    return int(out.reshape(1, -1).shape[1])


def check_embedding_size(backbone: nn.Module, embedding_size: int, crop_dim: int, model_path: str | Path) -> None:
    """Raise if the config's ``embedding_size`` differs from the backbone's output size."""
    device = next(iter(backbone.parameters()), torch.zeros(0)).device
    actual = embedding_dim(backbone, crop_dim, device)
    if actual != embedding_size:
        raise TransfiraError(
            f"embedding_size = {embedding_size} in the config, but {model_path} outputs {actual}-D embeddings"
        )
