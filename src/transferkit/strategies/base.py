"""The Strategy contract; the TrainPlan it produces lives in the engine (``engine.plan``), which runs it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from transferkit.engine.plan import ParamGroup, TrainPlan, apply_plan, set_train_mode

if TYPE_CHECKING:
    from transferkit.models.base import SourceModel


class Strategy(Protocol):
    """A registered strategy: a config dataclass and a function from (model, config, train config) to plans.

    ``plan`` returns one TrainPlan, or a list of them for a staged strategy (each stage rebuilds the optimizer
    and the distributed wrapper; ``requires_grad`` is never flipped inside a wrapped model).
    """

    config: type[Any]  # the strategy's own config dataclass
    from_scratch: bool

    def plan(self, model: SourceModel, cfg: Any, train: Any) -> TrainPlan | list[TrainPlan]: ...


__all__ = ["ParamGroup", "Strategy", "TrainPlan", "apply_plan", "set_train_mode"]
