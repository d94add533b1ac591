"""The Strategy contract and the TrainPlan it produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn


@dataclass
class ParamGroup:
    """Parameter names (of the trained module) that share a learning rate."""

    name: str
    params: list[str]
    lr: float
    weight_decay: float | None = None


@dataclass
class TrainPlan:
    """What the loop trains.

    Attributes:
        groups: parameter groups with their learning rates; parameters in no group are frozen.
        frozen_modules: names of modules held in eval mode while training (frozen BatchNorm statistics).
        cached_features: train only the head, on backbone features computed once.
        from_scratch: the target starts from random weights instead of the source's.
    """

    groups: list[ParamGroup]
    frozen_modules: list[str] = field(default_factory=list)
    cached_features: bool = False
    from_scratch: bool = False

    def trainable(self) -> set[str]:
        return {p for g in self.groups for p in g.params}


class Strategy(Protocol):
    """A registered strategy: a config dataclass and a function from (model, config, train config) to a plan."""

    config: type
    from_scratch: bool

    def plan(self, model: nn.Module, cfg: Any, lr: float) -> TrainPlan: ...


def apply_plan(model: nn.Module, plan: TrainPlan) -> None:
    """Set ``requires_grad`` from the plan (before any DDP wrapping) and check every name exists."""
    names = dict(model.named_parameters())
    trainable = plan.trainable()
    unknown = trainable - set(names)
    if unknown:
        raise ValueError(f"the plan names parameters the model does not have: {sorted(unknown)[:5]}")
    for n, p in names.items():
        p.requires_grad_(n in trainable)


def set_train_mode(model: nn.Module, plan: TrainPlan) -> None:
    """``model.train()`` but with the plan's frozen modules (and their BatchNorm statistics) in eval mode."""
    model.train()
    modules = dict(model.named_modules())
    for name in plan.frozen_modules:
        modules[name].eval()
