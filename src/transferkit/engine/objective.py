"""Objectives: ``nn.Module``s returning ``{"loss", "logits", **parts}``. The loop never changes per objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationObjective(nn.Module):
    """Cross-entropy (optionally label-smoothed) on the model's logits."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits}
