"""Objectives: ``nn.Module``s returning ``{"loss", "logits", **parts}``. The loop never changes per objective."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.models.vision import SourceModel


def prepare_penalties(penalties: Sequence[nn.Module], model: nn.Module) -> None:
    """Before an objective's forward pass: penalties that watch the model's layers (DELTA) set up their hooks."""
    for p in penalties:
        if hasattr(p, "prepare"):
            cast("Callable[[nn.Module], None]", p.prepare)(model)


def add_penalties(
    penalties: Sequence[nn.Module], model: nn.Module, features: Any, inputs: Any, labels: Any, out: dict[str, Any]
) -> torch.Tensor:
    """Each penalty's value into ``out`` (by its class name) and their sum, to add to the loss."""
    total = torch.zeros((), device=out["logits"].device)
    for p in penalties:
        value = p(model, features, inputs=inputs, targets=labels)
        out[type(p).__name__.lower()] = value
        total = total + value
    return total


def penalty_states(penalties: Sequence[nn.Module]) -> dict[str, Any]:
    """What a checkpoint keeps of the penalties (by position): state measured once at the start of training, such
    as DELTA's channel weights, so a resumed run uses the same."""
    states = {
        str(i): cast("Callable[[], dict]", p.extra_state)()
        for i, p in enumerate(penalties)
        if hasattr(p, "extra_state")
    }
    return {k: v for k, v in states.items() if v}


def load_penalty_states(penalties: Sequence[nn.Module], states: dict[str, Any]) -> None:
    for i, p in enumerate(penalties):
        if str(i) in states and hasattr(p, "load_extra_state"):
            cast("Callable[[dict], None]", p.load_extra_state)(states[str(i)])


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

    def extra_state(self) -> dict[str, Any]:
        """What the checkpoint keeps of this objective (``fit`` saves it and gives it back on resume)."""
        return penalty_states(self.penalties)

    def load_extra_state(self, state: dict[str, Any]) -> None:
        load_penalty_states(self.penalties, state)

    def forward(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        prepare_penalties(self.penalties, model)
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
        out["loss"] = ce + add_penalties(self.penalties, model, features, inputs, targets, out)
        return out
