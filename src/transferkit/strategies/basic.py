"""The foundation strategies: ``linear_probe``, ``full`` fine-tuning, and the ``scratch`` baseline."""

from __future__ import annotations

from dataclasses import dataclass

from transferkit.config import TrainConfig
from transferkit.models.vision import SourceModel
from transferkit.strategies import STRATEGIES
from transferkit.strategies.base import ParamGroup, TrainPlan


def head_params(model: SourceModel) -> list[str]:
    return [f"head.{n}" for n, _ in model.head.named_parameters()]


def backbone_params(model: SourceModel) -> list[str]:
    return [f"backbone.{n}" for n, _ in model.backbone.named_parameters()]


@dataclass
class LinearProbeConfig:
    """Linear probe: the backbone stays frozen; only the new head is trained, on features computed once."""


@STRATEGIES.register("linear_probe", help="train only the new head, on backbone features computed once (cached)")
class LinearProbe:
    config = LinearProbeConfig
    from_scratch = False

    @staticmethod
    def plan(model: SourceModel, cfg: LinearProbeConfig, train: TrainConfig) -> TrainPlan:
        return TrainPlan(
            [ParamGroup("head", head_params(model), train.lr)], frozen_modules=["backbone"], cached_features=True
        )


@dataclass
class FullConfig:
    """Full fine-tuning with separate learning rates for the new head and the transferred backbone.

    Attributes:
        backbone_lr: learning rate of the backbone; when None, ``backbone_lr_scale`` times the head's.
        backbone_lr_scale: backbone rate relative to the head rate (transferred weights move less).
    """

    backbone_lr: float | None = None
    backbone_lr_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.backbone_lr is not None and not self.backbone_lr > 0:
            raise ValueError(f"backbone_lr must be > 0, got {self.backbone_lr}")
        if not self.backbone_lr_scale > 0:
            raise ValueError(f"backbone_lr_scale must be > 0, got {self.backbone_lr_scale}")


def full_groups(model: SourceModel, cfg: FullConfig, lr: float) -> list[ParamGroup]:
    """Backbone at ``backbone_lr`` (or ``backbone_lr_scale * lr``), head at ``lr``."""
    backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None else lr * cfg.backbone_lr_scale
    return [ParamGroup("backbone", backbone_params(model), backbone_lr), ParamGroup("head", head_params(model), lr)]


def _full_plan(model: SourceModel, cfg: FullConfig, train: TrainConfig) -> TrainPlan:
    return TrainPlan(full_groups(model, cfg, train.lr))


@STRATEGIES.register("full", help="fine-tune every weight; the head and backbone have separate learning rates")
class Full:
    config = FullConfig
    from_scratch = False
    plan = staticmethod(_full_plan)


@dataclass
class ScratchConfig(FullConfig):
    """The baseline: the same architecture from random weights, every weight at the same rate."""

    backbone_lr_scale: float = 1.0


@STRATEGIES.register("scratch", help="baseline: the same architecture trained from random weights")
class Scratch:
    config = ScratchConfig
    from_scratch = True
    plan = staticmethod(_full_plan)
