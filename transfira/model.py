"""The recognizability predictor: encoder plus CCS and CCAS regression heads (SPEC §4)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

HEAD_INPUTS = ("raw", "unit_lognorm")


def _head(in_features: int, hidden: int) -> nn.Module:
    """``in_features -> 1`` linear (default), or with a ReLU hidden layer; Xavier-uniform, zero bias."""
    if hidden <= 0:
        layer = nn.Linear(in_features, 1)
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
        return layer
    head = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
    for layer in (head[0], head[2]):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return head


def head_features(features: torch.Tensor, head_input: str = "raw") -> torch.Tensor:
    """What the heads see of the embedding ``z`` [B, D]: ``z`` itself (``"raw"``, the paper) or
    ``[z / |z|, log |z|]`` [B, D + 1] (``"unit_lognorm"``: direction and norm as separate inputs,
    so a linear head can use the norm, which a linear function of raw ``z`` cannot represent)."""
    if head_input == "raw":
        return features
    norm = features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.cat([features / norm, norm.log()], 1)


def head_layout(state: dict[str, torch.Tensor], embedding_size: int) -> dict[str, int | str]:
    """``{"head_hidden": H, "head_input": ...}`` read off a predictor state dict's head shapes:
    checkpoints describe themselves (the authors' plain layout reads as linear heads on raw ``z``)."""
    first = state.get("ccs_layer.weight", state.get("ccs_layer.0.weight"))
    hidden = int(first.shape[0]) if "ccs_layer.0.weight" in state else 0
    width = int(first.shape[1]) if first is not None and first.ndim == 2 else embedding_size
    return {"head_hidden": hidden, "head_input": "unit_lognorm" if width == embedding_size + 1 else "raw"}


class RecognizabilityPredictionNetwork(nn.Module):
    """``backbone`` followed by two heads; ``forward`` returns ``(ccs, ccas)``, each [B, 1].

    With ``freeze_backbone`` only the heads train and the backbone stays in eval mode (the
    CR-FIQA-style "head on top of a fixed encoder" ablation); by default everything trains
    end to end (paper section III-B). ``head_input`` chooses what the heads see
    (:func:`head_features`). The heads always run in float32, also under ``torch.autocast``
    (AMP would otherwise round the predictions to bf16/fp16). State-dict keys are
    ``backbone.*``, ``ccs_layer.*`` and ``ccas_layer.*``: the layout of the authors' released
    ``w600k_r50_transfira_0025.pt`` (with the default linear heads on raw embeddings).
    """

    def __init__(self, backbone: nn.Module, embedding_size: int, head_hidden: int = 0, freeze_backbone: bool = False,
                 head_input: str = "raw"):
        super().__init__()
        if head_input not in HEAD_INPUTS:
            raise ValueError(f"head_input must be one of {', '.join(HEAD_INPUTS)}, got {head_input!r}")
        self.backbone = backbone
        self.head_input = head_input
        width = embedding_size + (head_input == "unit_lognorm")
        self.ccs_layer = _head(width, head_hidden)
        self.ccas_layer = _head(width, head_hidden)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "RecognizabilityPredictionNetwork":
        """Like ``nn.Module.train``, but a frozen backbone stays in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ccs, ccas)`` from the encoder's embeddings [B, D], in the heads' dtype (float32)."""
        kind = features.device.type
        with torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else contextlib.nullcontext():
            dtype = next(self.ccs_layer.parameters()).dtype  # float32 (half only in an fp16 export)
            x = head_features(features.flatten(1).to(dtype), self.head_input)
            return self.ccs_layer(x), self.ccas_layer(x)

    def forward(self, images: torch.Tensor | None = None, features: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict from ``images``, or from the backbone's ``features`` when they are already at hand
        (a frozen backbone whose pass also gave the online labels)."""
        if features is None:
            features = self.backbone(images)
        return self.heads(features)
