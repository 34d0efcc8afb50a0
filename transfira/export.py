"""ONNX export of a trained predictor: one graph ``image -> (ccs, ccas)`` for onnxruntime.

The graph's input ``image`` is float32 ``[N, 3, crop_dim, crop_dim]`` (dynamic ``N``), RGB,
NCHW, normalized exactly as for PyTorch (SPEC §2): ``(pixel / 255 - mean) / std`` after
resizing to ``resize_dim`` (bilinear) and center-cropping ``crop_dim``. Outputs ``ccs`` and
``ccas`` are float32 ``[N]``; an image is recognizable when ``ccas > 0``. These facts are
stored in the model's metadata (``metadata_props``; values are JSON) so a deployment
without this package can read them: see :func:`read_metadata` and docs/scoring.md.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TransfiraError
from .io import atomic_path

INPUT, OUTPUTS = "image", ("ccs", "ccas")
OPSET = 17


class ScoreGraph(nn.Module):
    """The predictor with flat ``[N]`` outputs; with ``fp16`` the weights are half precision while
    the input and outputs stay float32 (casts inside the graph)."""

    def __init__(self, model: nn.Module, fp16: bool = False):
        super().__init__()
        self.model = model.half() if fp16 else model
        self.fp16 = fp16

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ccs, ccas = self.model(image.half() if self.fp16 else image)
        return ccs.float().reshape(-1), ccas.float().reshape(-1)


def preprocessing_metadata(aug: dict[str, Any], fp16: bool = False) -> dict[str, Any]:
    """The facts a runtime needs to feed the exported graph (stored in the ONNX metadata)."""
    std = aug["test_rgb_std"]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(s) for s in std]
    return {
        "input_name": INPUT, "output_names": list(OUTPUTS), "layout": "NCHW", "channel_order": "RGB",
        "input_size": [int(aug["crop_dim"]), int(aug["crop_dim"])], "resize_dim": int(aug["resize_dim"]),
        "crop_dim": int(aug["crop_dim"]), "pixel_scale": 1.0 / 255.0,
        "mean": [float(m) for m in aug["train_rgb_norm"]], "std": std,
        "normalization": "(pixel / 255 - mean) / std per channel, pixel in 0..255",
        "resize": "shorter side to resize_dim (bilinear, antialiased), then center crop crop_dim",
        "recognizable": "ccas > 0", "weights": "float16" if fp16 else "float32",
    }


def export_onnx(model: nn.Module, aug: dict[str, Any], out: str | Path, fp16: bool = False, opset: int = OPSET,
                extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` (a :class:`~transfira.model.RecognizabilityPredictionNetwork`) to ``out``;
    return the metadata stored with it."""
    import copy

    import onnx

    graph = ScoreGraph(copy.deepcopy(model).float().cpu().eval(), fp16).eval()
    size = int(aug["crop_dim"])
    example = torch.zeros(2, 3, size, size)
    metadata = {**preprocessing_metadata(aug, fp16), **(extra_metadata or {})}
    out = Path(out)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # onnx2torch's shape checks, constant here
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter (dynamo=False) on purpose
        warnings.filterwarnings("ignore", message="Constant folding")  # notes on Slice ops of some encoders
        try:
            torch.onnx.export(graph, (example,), str(tmp), input_names=[INPUT], output_names=list(OUTPUTS),
                              dynamic_axes={INPUT: {0: "batch"}, **{o: {0: "batch"} for o in OUTPUTS}},
                              opset_version=opset, dynamo=False)
        except Exception as err:  # noqa: BLE001 - the exporter raises many types
            raise TransfiraError(f"ONNX export failed: {type(err).__name__}: {err}") from None
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        proto.producer_name = "transfira"
        onnx.save(proto, str(tmp))
    return metadata


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported predictor, read with onnxruntime only (values decoded from JSON)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
