"""Reverse and mixed transfer: which weights train, at what rate, in which stages.

``freeze``, ``gradual_unfreeze``, ``llrd`` (alias ``discriminative``), ``lp_ft``, ``bitfit``, and the regularised
fine-tunings ``l2sp`` and ``bss`` (``full`` + a penalty). Staged strategies return one TrainPlan per stage.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, cast

from torch import nn

from transferkit.config import TrainConfig
from transferkit.models.vision import SourceModel
from transferkit.strategies import STRATEGIES
from transferkit.strategies.base import ParamGroup, Strategy, TrainPlan
from transferkit.strategies.basic import FullConfig, full_groups, head_params
from transferkit.strategies.regularizers import BSSConfig, DeltaConfig, L2SPConfig

_BN = (nn.modules.batchnorm._BatchNorm,)


def bn_modules(model: nn.Module, prefix: str = "") -> list[str]:
    """The names of the BatchNorm modules of ``model`` under ``prefix`` (``backbone.``: the backbone's)."""
    return [n for n, m in model.named_modules() if isinstance(m, _BN) and n.startswith(prefix)]


def _modules_all_frozen(model: nn.Module, trainable: set[str]) -> list[str]:
    """BatchNorm modules whose parameters are all frozen: they are held in eval mode (statistics frozen too)."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, _BN):
            continue
        params = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if not any(p in trainable for p in params):
            out.append(name)
    return out


def _frozen_bn(model: SourceModel, trainable: set[str], train_bn: bool) -> list[str]:
    """BatchNorm modules held in eval mode: all in the backbone unless ``train_bn``, else those in frozen parts."""
    return bn_modules(model, "backbone.") if not train_bn else _modules_all_frozen(model, trainable)


def _layer_lrs(groups: list[tuple[str, list[str]]], lr: float, backbone_lr: float) -> list[ParamGroup]:
    """Head at ``lr``, every backbone group at ``backbone_lr``."""
    return [ParamGroup(name, params, lr if name == "head" else backbone_lr) for name, params in groups if params]


# ---------------------------------------------------------------------------------------------------------- freeze


@dataclass
class FreezeConfig:
    """Freeze the first ``groups`` layer groups (input side) and/or the parameters matching ``patterns``.

    Attributes:
        groups: how many layer groups, from the input, stay frozen.
        patterns: regular expressions on parameter names (``backbone.blocks.0``) that stay frozen.
        train_bn: train BatchNorm statistics in the trained part (False: every backbone BatchNorm in eval mode).
        backbone_lr_scale: learning rate of the trained backbone part relative to ``train.lr``.
    """

    groups: int = 0
    patterns: list[str] = field(default_factory=list)
    train_bn: bool = False
    backbone_lr_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.groups < 0:
            raise ValueError(f"groups must be >= 0, got {self.groups}")
        for p in self.patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {p!r} is not a regular expression: {e}") from e
        if not self.groups and not self.patterns:
            raise ValueError("freeze needs `groups: K` (the first K layer groups) or `patterns: [REGEX, ...]`")


def freeze_plan(model: SourceModel, cfg: FreezeConfig, train: TrainConfig) -> TrainPlan:
    groups = model.layer_groups()
    backbone_groups = [g for g in groups if g[0] != "head"]
    if cfg.groups >= len(backbone_groups) + 1:
        raise ValueError(
            f"freeze groups={cfg.groups} would freeze everything: the model has "
            f"{len(backbone_groups)} backbone layer groups and a head"
        )
    frozen = {p for _, params in backbone_groups[: cfg.groups] for p in params}
    names = [n for n, _ in model.named_parameters()]
    for pattern in cfg.patterns:
        hits = [n for n in names if re.search(pattern, n)]
        if not hits:
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter (names look like {names[0]!r})")
        frozen.update(hits)
    kept = [(g, [p for p in params if p not in frozen]) for g, params in groups]
    plan_groups = _layer_lrs(kept, train.lr, train.lr * cfg.backbone_lr_scale)
    trainable = {p for g in plan_groups for p in g.params}
    return TrainPlan(plan_groups, frozen_modules=_frozen_bn(model, trainable, cfg.train_bn))


# the strategies built with type() are Strategy classes by their attributes, which mypy cannot see
STRATEGIES.register("freeze", help="freeze the first K layer groups or parameters matching patterns")(
    cast(
        Strategy, type("Freeze", (), {"config": FreezeConfig, "from_scratch": False, "plan": staticmethod(freeze_plan)})
    )
)


# ------------------------------------------------------------------------------------------------ gradual unfreeze


@dataclass
class GradualUnfreezeConfig:
    """ULMFiT's gradual unfreezing: train the head, then unfreeze one more group from the top every ``every``
    epochs, each as its own stage (a fresh optimizer over the newly trainable set).

    Attributes:
        every: epochs per stage.
        groups_per_stage: layer groups unfrozen at each stage.
        backbone_lr_scale: learning rate of the unfrozen backbone groups relative to ``train.lr``.
        train_bn: train BatchNorm statistics of unfrozen groups.
    """

    every: int = 1
    groups_per_stage: int = 1
    backbone_lr_scale: float = 0.1
    train_bn: bool = False

    def __post_init__(self) -> None:
        if self.every < 1 or self.groups_per_stage < 1:
            raise ValueError(f"every and groups_per_stage must be >= 1, got {self.every}, {self.groups_per_stage}")


def gradual_unfreeze_plan(model: SourceModel, cfg: GradualUnfreezeConfig, train: TrainConfig) -> list[TrainPlan]:
    groups = model.layer_groups()  # input -> output; the head last
    stages: list[TrainPlan] = []
    epochs_left, unfrozen = train.epochs, 1
    while epochs_left > 0:
        top = groups[len(groups) - unfrozen :]
        plan_groups = _layer_lrs(top, train.lr, train.lr * cfg.backbone_lr_scale)
        trainable = {p for g in plan_groups for p in g.params}
        last = unfrozen >= len(groups) or epochs_left <= cfg.every
        epochs = epochs_left if last else cfg.every
        stages.append(
            TrainPlan(
                plan_groups,
                frozen_modules=_frozen_bn(model, trainable, cfg.train_bn),
                name=f"unfreeze{len(top) - 1}",
                epochs=epochs,
            )
        )
        epochs_left -= epochs
        unfrozen = min(len(groups), unfrozen + cfg.groups_per_stage)
    return stages


STRATEGIES.register("gradual_unfreeze", help="head first, then one more layer group from the top per stage (ULMFiT)")(
    cast(
        Strategy,
        type(
            "GradualUnfreeze",
            (),
            {"config": GradualUnfreezeConfig, "from_scratch": False, "plan": staticmethod(gradual_unfreeze_plan)},
        ),
    )
)


# ------------------------------------------------------------------------------------------- layer-wise lr decay


@dataclass
class LLRDConfig:
    """Discriminative learning rates: layer group ``i`` of ``L+1`` (head last) trains at ``lr * decay**(L - i)``,
    the same scales timm's ``param_groups_layer_decay`` gives its models.

    Attributes:
        decay: per-group factor, in (0, 1].
    """

    decay: float = 0.75

    def __post_init__(self) -> None:
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")


def llrd_plan(model: SourceModel, cfg: LLRDConfig, train: TrainConfig) -> TrainPlan:
    groups = [(name, params) for name, params in model.layer_groups() if params]
    last = len(groups) - 1
    return TrainPlan(
        [ParamGroup(name, params, train.lr * cfg.decay ** (last - i)) for i, (name, params) in enumerate(groups)]
    )


_LLRD = cast(Strategy, type("LLRD", (), {"config": LLRDConfig, "from_scratch": False, "plan": staticmethod(llrd_plan)}))
STRATEGIES.register("llrd", help="layer-wise learning-rate decay lr * decay**(L - i) over layer groups")(_LLRD)
STRATEGIES.register("discriminative", help="alias of llrd (fastai's discriminative learning rates)")(_LLRD)


# --------------------------------------------------------------------------------------------------------- LP-FT


@dataclass
class LpFtConfig:
    """LP-FT (Kumar et al. 2022): a linear probe on cached features, then full fine-tuning from that head.

    Attributes:
        lp_epochs: epochs of the probe stage (default: a third of ``train.epochs``, at least 1).
        ft_lr_scale: the fine-tuning stage's head rate relative to ``train.lr`` (small: the head is already good).
        backbone_lr_scale: the fine-tuning stage's backbone rate relative to its head rate.
    """

    lp_epochs: int | None = None
    ft_lr_scale: float = 0.1
    backbone_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.lp_epochs is not None and self.lp_epochs < 1:
            raise ValueError(f"lp_epochs must be >= 1, got {self.lp_epochs}")
        if self.ft_lr_scale <= 0 or self.backbone_lr_scale <= 0:
            raise ValueError("ft_lr_scale and backbone_lr_scale must be > 0")


def lp_ft_plan(model: SourceModel, cfg: LpFtConfig, train: TrainConfig) -> list[TrainPlan]:
    lp_epochs = cfg.lp_epochs or max(1, train.epochs // 3)
    if lp_epochs >= train.epochs:
        raise ValueError(f"lp_epochs={lp_epochs} leaves no epoch for fine-tuning (train.epochs={train.epochs})")
    probe = TrainPlan(
        [ParamGroup("head", head_params(model), train.lr)],
        frozen_modules=["backbone"],
        cached_features=True,
        name="lp",
        epochs=lp_epochs,
    )
    ft_lr = train.lr * cfg.ft_lr_scale
    ft = TrainPlan(
        full_groups(model, FullConfig(backbone_lr_scale=cfg.backbone_lr_scale), ft_lr),
        name="ft",
        epochs=train.epochs - lp_epochs,
    )
    return [probe, ft]


STRATEGIES.register("lp_ft", help="linear probe on cached features, then full fine-tuning from that head")(
    cast(Strategy, type("LpFt", (), {"config": LpFtConfig, "from_scratch": False, "plan": staticmethod(lp_ft_plan)}))
)


# -------------------------------------------------------------------------------------------------------- BitFit


@dataclass
class BitFitConfig:
    """BitFit (Ben Zaken et al. 2022): only the bias terms of the backbone, and the new head, are trained.

    Attributes:
        backbone_lr_scale: rate of the backbone biases relative to ``train.lr``.
    """

    backbone_lr_scale: float = 1.0


def bitfit_plan(model: SourceModel, cfg: BitFitConfig, train: TrainConfig) -> TrainPlan:
    biases = [f"backbone.{n}" for n, _ in model.backbone.named_parameters() if n.endswith("bias")]
    if not biases:
        raise ValueError("bitfit: the backbone has no bias parameters to train")
    groups = [
        ParamGroup("biases", biases, train.lr * cfg.backbone_lr_scale, weight_decay=0.0),
        ParamGroup("head", head_params(model), train.lr),
    ]
    return TrainPlan(groups, frozen_modules=bn_modules(model, "backbone."))


STRATEGIES.register("bitfit", help="train only the backbone's biases and the new head")(
    cast(
        Strategy, type("BitFit", (), {"config": BitFitConfig, "from_scratch": False, "plan": staticmethod(bitfit_plan)})
    )
)


# ---------------------------------------------------------------------------------------- regularised fine-tuning


@dataclass
class L2SPStrategyConfig(L2SPConfig):
    """``full`` fine-tuning with the L2-SP penalty instead of weight decay (see L2SPConfig)."""

    backbone_lr_scale: float = 0.1


@dataclass
class BSSStrategyConfig(BSSConfig):
    """``full`` fine-tuning with batch spectral shrinkage (see BSSConfig)."""

    backbone_lr_scale: float = 0.1


@dataclass
class DeltaStrategyConfig(DeltaConfig):
    """``full`` fine-tuning with the DELTA feature-map penalty (see DeltaConfig)."""

    backbone_lr_scale: float = 0.1


def regularised_full(regularizer: str, regularizer_config: type, no_weight_decay: bool = False) -> Any:
    """The plan of ``full`` fine-tuning plus one penalty, whose options are the config's regulariser fields."""

    def plan(model: SourceModel, cfg: Any, train: TrainConfig) -> TrainPlan:
        groups = full_groups(model, FullConfig(backbone_lr_scale=cfg.backbone_lr_scale), train.lr)
        if no_weight_decay:
            for g in groups:
                g.weight_decay = 0.0
        options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(regularizer_config)}
        return TrainPlan(groups, regularizers=[(regularizer, options)])

    return plan


for _name, _config, _base, _no_wd, _help in (
    # L2-SP replaces weight decay, which would pull towards 0 instead of towards the source
    (
        "l2sp",
        L2SPStrategyConfig,
        L2SPConfig,
        True,
        "full fine-tuning kept near the source weights (L2-SP, Li et al. 2018)",
    ),
    (
        "delta",
        DeltaStrategyConfig,
        DeltaConfig,
        False,
        "full fine-tuning with feature maps kept near the source's (DELTA, Li et al. 2019)",
    ),
    ("bss", BSSStrategyConfig, BSSConfig, False, "full fine-tuning with batch spectral shrinkage (Chen et al. 2019)"),
):
    STRATEGIES.register(_name, help=_help)(
        cast(
            Strategy,
            type(
                f"{_name}_strategy",
                (),
                {
                    "config": _config,
                    "from_scratch": False,
                    "plan": staticmethod(regularised_full(_name, _base, _no_wd)),
                },
            ),
        )
    )


def describe_plans(plans: list[TrainPlan]) -> list[dict[str, Any]]:
    """A JSON summary of the stages (for metrics.json and the printed run)."""
    return [
        {
            "stage": p.name,
            "epochs": p.epochs,
            "cached_features": p.cached_features,
            "groups": {g.name: {"lr": g.lr, "params": len(g.params)} for g in p.groups},
            "regularizers": [n for n, _ in p.regularizers],
        }
        for p in plans
    ]
