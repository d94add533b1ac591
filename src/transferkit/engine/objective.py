"""Objectives: ``nn.Module``s returning ``{"loss", "logits", **parts}``. The loop never changes per objective."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.models.vision import SourceModel


class ClassificationObjective(nn.Module):
    """Cross-entropy (optionally label-smoothed) on the model's logits, plus penalties (regularisers).

    Args:
        label_smoothing: cross-entropy label smoothing.
        penalties: modules ``penalty(model, features) -> scalar`` added to the loss (see strategies.regularizers).
    """

    def __init__(self, label_smoothing: float = 0.0, penalties: Sequence[nn.Module] = ()):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.penalties = list(penalties)  # not registered: they hold references to source weights, never copies

    def forward(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        for p in self.penalties:
            if hasattr(p, "prepare"):
                cast("Callable[[nn.Module], None]", p.prepare)(model)
        features = None
        if any(p.needs_features for p in self.penalties):
            if isinstance(getattr(model, "module", model), SourceModel):
                logits, features = model(inputs, return_features=True)
            else:  # the head alone, on cached features: the inputs are the features
                logits, features = model(inputs), inputs
        else:
            logits = model(inputs)
        ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        out = {"loss": ce, "logits": logits, "ce": ce}
        for p in self.penalties:
            value = p(model, features, inputs=inputs, targets=targets)
            out[type(p).__name__.lower()] = value
            out["loss"] = out["loss"] + value
        return out
