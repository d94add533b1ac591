"""``auto``: a strategy chosen from the number of labelled examples per class and the size of the model.

The rule (printed in the run and recorded in metrics.json, and written down in the README):

1. a backbone over ``lora_above`` parameters (default 300 M) -> ``lora``: the adapters keep the optimizer's memory
   small (two Adam moments for a few million parameters instead of hundreds of millions);
2. fewer than ``freeze_below`` labelled examples in the smallest class (default 101: up to 100 per class, the
   largest level measured) -> ``freeze`` the first third of the backbone's layer groups with every BatchNorm's
   statistics frozen. In the comparison table (docs/benchmarks.md, EfficientNet-Lite0 -> MNIST, 3 seeds) it is the
   best or within noise of the best at every level, and never below ``full``, whose BatchNorm statistics drift on
   a few images per class; it is also cheaper than ``full``;
3. otherwise -> ``full``: fine-tuning every weight, the head faster than the backbone. Above 100 per class the
   table has no evidence; with many labels the usual practice of fine-tuning everything is the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from transferkit.strategies import STRATEGIES


@dataclass
class AutoConfig:
    """Thresholds of the rule (see the module docstring).

    Attributes:
        freeze_below: below this many examples in the smallest class, ``freeze`` (first third of the groups).
        lora_above: above this many backbone parameters, ``lora``.
    """

    freeze_below: int = 101
    lora_above: int = 300_000_000

    def __post_init__(self) -> None:
        if self.freeze_below < 1 or self.lora_above < 1:
            raise ValueError("freeze_below and lora_above must be >= 1")


def choose_strategy(
    per_class: int, backbone_params: int, backbone_groups: int, cfg: AutoConfig | None = None
) -> tuple[str | dict[str, Any], str]:
    """The strategy the rule picks (a name or ``{name, options}``), and why (one readable sentence)."""
    cfg = cfg or AutoConfig()
    if backbone_params > cfg.lora_above:
        return "lora", (
            f"auto: the backbone has {backbone_params / 1e6:.0f} M parameters (> {cfg.lora_above / 1e6:.0f}"
            " M): lora keeps the trained part and the optimizer state small"
        )
    if per_class < cfg.freeze_below:
        groups = math.ceil(backbone_groups / 3)
        return {"name": "freeze", "groups": groups}, (
            f"auto: {per_class} labelled example(s) in the smallest class (fewer than {cfg.freeze_below}): freeze the "
            f"first {groups} of {backbone_groups} layer groups and every BatchNorm's statistics, train the rest"
        )
    return "full", (
        f"auto: {per_class} labelled examples per class and {backbone_params / 1e6:.1f} M backbone "
        "parameters: full fine-tuning (the head faster than the backbone)"
    )


def resolve_auto(options: AutoConfig, model: nn.Module, per_class: int) -> tuple[str | dict[str, Any], str]:
    backbone = getattr(model, "backbone", model)
    groups = 1
    if hasattr(model, "layer_groups"):  # a SourceModel
        layer_groups = cast("Callable[[], list[tuple[str, list[str]]]]", model.layer_groups)
        groups = len([g for g, _ in layer_groups() if g != "head"])
    return choose_strategy(per_class, sum(p.numel() for p in backbone.parameters()), max(1, groups), options)


class Auto:
    """Resolved by ``pipeline.train`` before planning (it needs the data); never planned itself."""

    config = AutoConfig
    from_scratch = False

    @staticmethod
    def plan(model: Any, cfg: AutoConfig, train: Any) -> Any:
        raise ValueError("'auto' is resolved from the data before training; call transferkit.train or run a recipe")


STRATEGIES.register("auto", help="pick a strategy from examples per class and model size (rule in the docs)")(Auto)
