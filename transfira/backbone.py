"""Backbone loading: an ONNX face encoder converted to a trainable torch module (SPEC §4)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import TransfiraError

BACKBONE_TYPES = ("onnx",)


def resolve_device(name: str = "auto", allow_tf32: bool = False) -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to torch.

    On CUDA the float32 precision is set (:func:`set_fp32_precision`: full fp32 unless
    ``allow_tf32``) and an explicit index becomes the current device, so nothing lands on
    GPU 0 for ``cuda:1``. ``mps`` is refused: labels and ridge heads need float64.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise TransfiraError(f"invalid device '{name}': {err}") from None
    if device.type == "mps":
        raise TransfiraError(f"device '{name}' is not supported (MPS has no float64, which labels and ridge heads "
                             "need); use 'cpu'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TransfiraError(f"device '{name}' requested but CUDA is not available")
        set_fp32_precision(allow_tf32)
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def set_fp32_precision(allow_tf32: bool = False) -> None:
    """Let float32 convolutions and matmuls round to TF32 on Ampere+ GPUs, or not (the default).

    TF32 moves encoder features by up to 1e-2, far outside the tolerance against
    onnxruntime, so features and labels are computed in full fp32 ('ieee').
    """
    mode = "tf32" if allow_tf32 else "ieee"
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        torch.backends.cudnn.conv.fp32_precision = mode
        torch.backends.cuda.matmul.fp32_precision = mode
    else:  # torch < 2.9
        torch.backends.cudnn.allow_tf32 = allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def load_backbone(backbone_type: str, model_path: str | Path) -> nn.Module:
    """Load the encoder ``phi``; every weight becomes a trainable parameter."""
    if backbone_type not in BACKBONE_TYPES:
        raise TransfiraError(f"backbone_type '{backbone_type}' is not supported (supported: {', '.join(BACKBONE_TYPES)})")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise TransfiraError(f"model file not found: {model_path} (see pretrained_weights/README.md)")
    return onnx_to_torch(model_path)


def onnx_to_torch(model_path: Path) -> nn.Module:
    """Convert with onnx2torch, then make every float initializer a weight of its own.

    onnx2torch keeps graph initializers it cannot attach to a layer (PReLU slopes, weights
    reached through ``Identity`` nodes, BatchNormalization inputs) as buffers of an
    ``initializers`` module. :func:`untie_aliased_initializers` gives each aliased tensor its
    own copy, :func:`make_initializers_trainable` turns the buffers into parameters (keeping
    BatchNorm running statistics as buffers); :func:`untrainable_initializers` then checks
    that nothing was left behind, and a warning names what was.
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
    untie_aliased_initializers(net)
    make_initializers_trainable(net)
    missing = untrainable_initializers(graph, net)
    if missing:
        warnings.warn(f"{model_path}: {missing} of {onnx_weight_count(graph)} encoder weights are not trainable "
                      "after conversion (onnx2torch turned them into constants)", stacklevel=2)
    return net


def _is_initializer(node) -> bool:
    """Whether an fx node reads a tensor of onnx2torch's ``initializers`` container."""
    return getattr(node, "op", None) == "get_attr" and str(node.target).startswith("initializers.")


def untie_aliased_initializers(net: nn.Module) -> dict[str, str]:
    """Read weights aliased through ``Identity`` nodes directly; give each use its own tensor.

    The TorchScript exporter deduplicates initializers with equal values (BatchNorm weights
    and running variances are all ones in a freshly initialized network) and re-creates the
    other names with ``Identity`` nodes. onnx2torch turns those into clones of a buffer, so
    gradients and BatchNorm running-statistic updates would be lost in the copy. Here each
    ``Identity(initializer)`` is bypassed (onnx2torch already stores one buffer per use, so
    state-dict keys stay those of a plain conversion). A buffer that still feeds several
    nodes is cloned per extra use as ``initializers.untied_<n>``; the returned mapping
    ``{copy key: source key}`` is also kept as ``net.transfira_untied`` so checkpoints written
    without the copies still load (see :mod:`transfira.checkpoint`).
    """
    from onnx2torch.node_converters.identity import OnnxCopyIdentity

    aliases: dict[str, str] = {}
    graph, holder = getattr(net, "graph", None), getattr(net, "initializers", None)
    if graph is None or holder is None:
        return aliases
    changed = False
    for node in list(graph.nodes):
        if (node.op == "call_module" and isinstance(net.get_submodule(node.target), OnnxCopyIdentity)
                and len(node.args) == 1 and _is_initializer(node.args[0])):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed = True
    for node in list(graph.nodes):
        if not _is_initializer(node):
            continue
        source = getattr(holder, str(node.target).split(".", 1)[1])
        for user in list(node.users)[1:]:
            name = f"untied_{len(aliases)}"
            holder.register_buffer(name, source.detach().clone())
            with graph.inserting_before(user):
                copy = graph.get_attr(f"initializers.{name}")
            user.replace_input_with(node, copy)
            aliases[f"initializers.{name}"] = str(node.target)
            changed = True
    if changed:
        graph.eliminate_dead_code()
        used = {str(n.target).split(".", 1)[1] for n in graph.nodes if _is_initializer(n)}
        for name, _ in list(holder.named_buffers(recurse=False)):
            if name not in used:
                delattr(holder, name)
        net.delete_all_unused_submodules()
        net.recompile()
    net.transfira_untied = aliases
    return aliases


def _running_stat_keys(net: nn.Module) -> set[str]:
    """``initializers.*`` keys fed to onnx2torch's functional BatchNorm as running mean/variance."""
    from onnx2torch.node_converters.batch_norm import OnnxBatchNorm

    keys: set[str] = set()
    for node in getattr(getattr(net, "graph", None), "nodes", ()):
        if node.op == "call_module" and isinstance(net.get_submodule(node.target), OnnxBatchNorm):
            for arg in node.args[3:5]:
                if _is_initializer(arg):
                    keys.add(str(arg.target))
    return keys


def make_initializers_trainable(net: nn.Module) -> None:
    """Register every float buffer of ``net.initializers`` as a parameter, except BatchNorm running stats."""
    holder = getattr(net, "initializers", None)
    if holder is None:
        return
    stats = _running_stat_keys(net)
    for name, buf in list(holder.named_buffers(recurse=False)):
        if buf.is_floating_point() and f"initializers.{name}" not in stats:
            delattr(holder, name)
            holder.register_parameter(name, nn.Parameter(buf.detach().clone()))




def onnx_weight_count(onnx_model) -> int:
    """Float numbers of the encoder's weights: initializers plus their ``Identity`` aliases."""
    from onnx import numpy_helper

    sizes = {i.name: numpy_helper.to_array(i).size for i in onnx_model.graph.initializer
             if numpy_helper.to_array(i).dtype.kind == "f"}
    total = sum(sizes.values())
    for node in onnx_model.graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in sizes:
            sizes[node.output[0]] = sizes[node.input[0]]
            total += sizes[node.input[0]]
    return total


def trainable_weight_count(net: nn.Module) -> int:
    """Float numbers held as parameters or as BatchNorm running statistics."""
    stats = _running_stat_keys(net)
    count = sum(p.numel() for p in net.parameters())
    for key, buf in net.named_buffers():
        if buf.is_floating_point() and (key in stats or key.rsplit(".", 1)[-1] in ("running_mean", "running_var")):
            count += buf.numel()
    return count


def untrainable_initializers(onnx_model, net: nn.Module) -> int:
    """How many float weights of ``onnx_model`` did not become parameters (or BN running stats) of ``net``.

    Zero means the converted encoder trains end to end with all of its weights (SPEC §4).
    """
    return max(0, onnx_weight_count(onnx_model) - trainable_weight_count(net))


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
