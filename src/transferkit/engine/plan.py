"""The TrainPlan: what the loop trains in one stage of a strategy (parameter groups, frozen modules, caching)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    """What the loop trains in one stage.

    Attributes:
        groups: parameter groups with their learning rates; parameters in no group are frozen.
        frozen_modules: names of modules held in eval mode while training (frozen BatchNorm statistics).
        cached_features: train only the head, on backbone features computed once.
        from_scratch: the target starts from random weights instead of the source's.
        name: the stage's name (staged strategies: ``lp``, ``ft``, ``unfreeze3``...).
        epochs: epochs of this stage; None = the whole ``train.epochs``.
        regularizers: (name, options) of penalties added to the loss (see ``strategies.regularizers``).
        objective: makes this stage's objective from the one it would have (cross-entropy with the label smoothing
            and penalties), for a stage that learns by another loss (``contrastive``'s pair stage); None keeps it.
    """

    groups: list[ParamGroup]
    frozen_modules: list[str] = field(default_factory=list)
    cached_features: bool = False
    from_scratch: bool = False
    name: str = "main"
    epochs: int | None = None
    regularizers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    objective: Callable[[nn.Module], nn.Module] | None = None

    def trainable(self) -> set[str]:
        return {p for g in self.groups for p in g.params}


def trains_backbone(plan: TrainPlan) -> bool:
    """Whether the stage changes weights outside the head: backbone features cached before it no longer hold."""
    return any(not p.startswith("head.") for p in plan.trainable())


def cached_from_start(plans: list[TrainPlan]) -> bool:
    """Whether a stage trains the head on features of the starting backbone (computable before training, shareable
    between the models of a run): a stage that trains on cached features comes before any stage that trains the
    backbone. ``contrastive`` tunes the encoder first, so its head stage needs the tuned encoder's features."""
    for plan in plans:
        if plan.cached_features:
            return True
        if trains_backbone(plan):
            return False
    return False


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
