"""The recognizability predictor: encoder plus CCS and CCAS regression heads (SPEC §4)."""
from __future__ import annotations

import torch
from torch import nn


def _head(embedding_size: int, hidden: int) -> nn.Module:
    """``embedding_size -> 1`` linear (default), or with a ReLU hidden layer; Xavier-uniform, zero bias."""
    if hidden <= 0:
        layer = nn.Linear(embedding_size, 1)
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
        return layer
    head = nn.Sequential(nn.Linear(embedding_size, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
    for layer in (head[0], head[2]):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return head


class RecognizabilityPredictionNetwork(nn.Module):
    """``backbone`` followed by two heads; ``forward`` returns ``(ccs, ccas)``, each [B, 1].

    With ``freeze_backbone`` only the heads train and the backbone stays in eval mode (the
    CR-FIQA-style "head on top of a fixed encoder" ablation); by default everything trains
    end to end (paper section III-B). State-dict keys are ``backbone.*``, ``ccs_layer.*`` and
    ``ccas_layer.*``: the layout of the authors' released ``w600k_r50_transfira_0025.pt``
    (with the default linear heads).
    """

    def __init__(self, backbone: nn.Module, embedding_size: int, head_hidden: int = 0, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        self.ccs_layer = _head(embedding_size, head_hidden)
        self.ccas_layer = _head(embedding_size, head_hidden)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "RecognizabilityPredictionNetwork":
        """Like ``nn.Module.train``, but a frozen backbone stays in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images).flatten(1)
        return self.ccs_layer(features), self.ccas_layer(features)
