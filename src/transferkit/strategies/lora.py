"""LoRA through the ``peft`` library: low-rank adapters on the backbone, the new head trained beside them.

peft's own ``PeftModel`` wraps a whole model and treats a new classification head as an afterthought
(``modules_to_save``), which users lose on reload. Here the adapters are injected into the backbone only, the
head stays transferkit's, and the adapter description is saved in ``model.json`` so a reloaded model rebuilds the
same adapters before its weights are loaded. ``merge: true`` folds the adapters into plain weights after training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from torch import nn

from transferkit.config import TrainConfig
from transferkit.models.adapters import inject_lora, merge_lora
from transferkit.models.base import SourceModel
from transferkit.strategies import STRATEGIES
from transferkit.strategies.base import ParamGroup, Strategy, TrainPlan
from transferkit.strategies.basic import head_params

# sensible defaults per model family: regular expressions on backbone module names
DEFAULT_TARGETS = {
    "efficientnet": r".*\.(conv_pw|conv_pwl)$",  # the 1x1 convolutions of inverted residual blocks
    "vit": r".*\.(qkv|attn\.proj|q_proj|v_proj|query|value)$",
    "linear": "__all_linear__",
}


@dataclass
class LoRAConfig:
    """LoRA (Hu et al. 2021) on the backbone, through peft.

    Attributes:
        r: rank of the adapters.
        alpha: scaling numerator (the update is ``alpha / r * B A``).
        dropout: dropout on the adapter input.
        target_modules: a regular expression on backbone module names, or a list of name suffixes; default: a
            sensible choice for the model family (1x1 convolutions for EfficientNets, attention projections for
            ViTs, every linear layer otherwise).
        merge: after training, fold the adapters into plain weights (a plain model, no peft needed to load it).
        backbone_lr_scale: adapter learning rate relative to ``train.lr`` (the head's).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] | None = None
    merge: bool = False
    backbone_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def default_targets(model: SourceModel) -> str | list[str]:
    names = [n for n, _ in model.backbone.named_modules()]
    if any(n.endswith(("conv_pw", "conv_pwl")) for n in names):
        return DEFAULT_TARGETS["efficientnet"]
    if any(n.endswith(("qkv", "q_proj", "query")) for n in names):
        return DEFAULT_TARGETS["vit"]
    return [n for n, m in model.backbone.named_modules() if isinstance(m, nn.Linear)]


def lora_plan(model: SourceModel, cfg: LoRAConfig, train: TrainConfig) -> TrainPlan:
    if getattr(model, "adapter", None) is None:  # resuming a stage or a second call: inject once
        targets = cfg.target_modules if cfg.target_modules is not None else default_targets(model)
        inject_lora(model, {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": targets})
    adapters = [f"backbone.{n}" for n, _ in model.backbone.named_parameters() if ".lora_" in n]
    return TrainPlan(
        [
            ParamGroup("adapters", adapters, train.lr * cfg.backbone_lr_scale, weight_decay=0.0),
            ParamGroup("head", head_params(model), train.lr),
        ],
        frozen_modules=[n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)],
    )


def lora_finish(model: SourceModel, cfg: LoRAConfig) -> None:
    if cfg.merge:
        merge_lora(model)


# a class built with type(): a Strategy by its attributes, which mypy cannot see
STRATEGIES.register("lora", help="low-rank adapters on the backbone (peft) + the new head; merge on request")(
    cast(
        Strategy,
        type(
            "LoRA",
            (),
            {
                "config": LoRAConfig,
                "from_scratch": False,
                "plan": staticmethod(lora_plan),
                "finish": staticmethod(lora_finish),
            },
        ),
    )
)
