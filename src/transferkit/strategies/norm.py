"""Norm tuning: only the backbone's normalisation layers (their scale and shift) and the new head are trained.

The affine parameters of BatchNorm, LayerNorm and GroupNorm re-scale every channel of the source's features at
the cost of a few thousand parameters (Frankle et al. 2021, "Training BatchNorm and only BatchNorm"; LayerNorm
tuning for transformers, Zhao et al. 2024). BatchNorm statistics stay the source's unless ``train_stats``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from transferkit.config import TrainConfig
from transferkit.models.base import SourceModel
from transferkit.strategies import STRATEGIES
from transferkit.strategies.base import ParamGroup, TrainPlan
from transferkit.strategies.basic import head_params

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass
class NormConfig:
    """Attributes:
    backbone_lr_scale: rate of the normalisation parameters relative to ``train.lr`` (the head's).
    train_stats: update the BatchNorm running statistics on the target data (default: keep the source's).
    """

    backbone_lr_scale: float = 1.0
    train_stats: bool = False

    def __post_init__(self) -> None:
        if self.backbone_lr_scale <= 0:
            raise ValueError(f"backbone_lr_scale must be > 0, got {self.backbone_lr_scale}")


def norm_plan(model: SourceModel, cfg: NormConfig, train: TrainConfig) -> TrainPlan:
    norms = [(name, m) for name, m in model.backbone.named_modules() if isinstance(m, NORMS)]
    params = [f"backbone.{name}.{p}" for name, m in norms for p, _ in m.named_parameters(recurse=False)]
    if not params:
        raise ValueError("norm: the backbone has no normalisation layer with a scale or shift to train")
    batch_norms = [f"backbone.{name}" for name, m in norms if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    groups = [
        ParamGroup("norms", params, train.lr * cfg.backbone_lr_scale, weight_decay=0.0),
        ParamGroup("head", head_params(model), train.lr),
    ]
    return TrainPlan(groups, frozen_modules=[] if cfg.train_stats else batch_norms)


@STRATEGIES.register("norm", help="train only the backbone's normalisation layers (scale, shift) and the new head")
class Norm:
    config = NormConfig
    from_scratch = False
    plan = staticmethod(norm_plan)
