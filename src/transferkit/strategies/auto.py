"""``auto``: a strategy chosen from the number of labelled examples per class and the size of the model.

The rule (printed in the run and recorded in metrics.json, and written down in the README):

1. a backbone over ``lora_above`` parameters (default 300 M) -> ``lora``: the adapters keep the optimizer's memory
   small (two Adam moments for a few million parameters instead of hundreds of millions);
2. fewer than ``probe_below`` labelled examples in the smallest class (default 5) -> ``linear_probe``: too few
   examples to move millions of weights, while the source's features are already good;
3. otherwise -> ``full``: fine-tuning every weight, the head faster than the backbone, was the best strategy of
   the comparison table (docs/benchmarks.md) at 20 examples per class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from transferkit.strategies import STRATEGIES


@dataclass
class AutoConfig:
    """Thresholds of the rule (see the module docstring).

    Attributes:
        probe_below: below this many examples in the smallest class, ``linear_probe``.
        lora_above: above this many backbone parameters, ``lora``.
    """

    probe_below: int = 5
    lora_above: int = 300_000_000

    def __post_init__(self) -> None:
        if self.probe_below < 1 or self.lora_above < 1:
            raise ValueError("probe_below and lora_above must be >= 1")


def choose_strategy(per_class: int, backbone_params: int, cfg: AutoConfig | None = None) -> tuple[str, str]:
    """The strategy the rule picks, and why (one readable sentence)."""
    cfg = cfg or AutoConfig()
    if backbone_params > cfg.lora_above:
        return "lora", (f"auto: the backbone has {backbone_params / 1e6:.0f} M parameters (> {cfg.lora_above / 1e6:.0f}"
                        " M): lora keeps the trained part and the optimizer state small")
    if per_class < cfg.probe_below:
        return "linear_probe", (f"auto: {per_class} labelled example(s) in the smallest class (< {cfg.probe_below}): "
                                "linear_probe trains only the head on the source's features")
    return "full", (f"auto: {per_class} labelled examples per class and {backbone_params / 1e6:.1f} M backbone "
                    "parameters: full fine-tuning (the head faster than the backbone)")


def resolve_auto(options: AutoConfig, model: nn.Module, per_class: int) -> tuple[str, str]:
    backbone = getattr(model, "backbone", model)
    return choose_strategy(per_class, sum(p.numel() for p in backbone.parameters()), options)


class Auto:
    """Resolved by ``pipeline.train`` before planning (it needs the data); never planned itself."""

    config = AutoConfig
    from_scratch = False

    @staticmethod
    def plan(model: Any, cfg: AutoConfig, train: Any) -> Any:
        raise ValueError("'auto' is resolved from the data before training; call transferkit.train or run a recipe")


STRATEGIES.register("auto", help="pick a strategy from examples per class and model size (rule in the docs)")(Auto)
