"""Strategies: which weights are trained, and how fast.

A strategy is a config dataclass (validated in ``__post_init__``) plus ``plan(model, cfg, train) -> TrainPlan``.
The plan names the parameter groups with their learning rates, the modules held frozen (in eval mode), and
whether the loop trains only the head on cached backbone features. Freezing happens before anything is wrapped
for distributed training, never inside a wrapped model.
"""

from __future__ import annotations

from typing import Any

from transferkit.errors import RecipeError, UnknownNameError
from transferkit.registry import Registry
from transferkit.specs import parse_spec
from transferkit.strategies.base import Strategy, TrainPlan

STRATEGIES: Registry[Strategy] = Registry("strategy")


def get_strategy(spec: str | dict[str, Any]) -> tuple[Strategy, Any]:
    """The registered strategy and its validated config, from a name or ``{name: ..., option: value}``."""
    _, strategy, options = parse_spec(spec, STRATEGIES, lambda s: s.config)
    return strategy, options


def check_strategy(spec: str | dict[str, Any]) -> list[str]:
    try:
        get_strategy(spec)
    except (UnknownNameError, RecipeError) as e:
        return [str(e)]
    return []


# registering: linear_probe, full, scratch; freeze, gradual_unfreeze, llrd, lp_ft, bitfit, l2sp, bss; lora; norm;
# contrastive
from transferkit.strategies import auto, basic, catalogue, contrastive, lora, norm  # noqa: E402, F401

__all__ = ["STRATEGIES", "Strategy", "TrainPlan", "check_strategy", "get_strategy"]
