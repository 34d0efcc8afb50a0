"""The recognizability predictor: encoder plus CCS and CCAS regression heads (SPEC §4)."""
from __future__ import annotations

from torch import nn
import torch


def _head(embedding_size: int, hidden: int) -> nn.Module:
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

    State-dict keys are ``backbone.*``, ``ccs_layer.*`` and ``ccas_layer.*``: the layout
    of the authors' released ``w600k_r50_transfira_0025.pt`` (with the default linear heads).
    """

    def __init__(self, backbone: nn.Module, embedding_size: int, head_hidden: int = 0, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        self.ccs_layer = _head(embedding_size, head_hidden)
        self.ccas_layer = _head(embedding_size, head_hidden)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images).flatten(1)
        return self.ccs_layer(features), self.ccas_layer(features)
