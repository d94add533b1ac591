"""The stages of a run, by name, and the order a recipe's stages run in.

Each stage is one module of this package with its config section in ``transferkit.config``, a ``run(ctx)``, its
outputs in the run directory and its resume rule (``stages.base.Stage``). Adding a stage is one module here, its
section in ``config/recipe.py`` and one line below.
"""

from __future__ import annotations

from typing import Any

from transferkit.config import Recipe
from transferkit.stages import (
    baselines,
    compress,
    distill,
    evaluate,
    merge,
    pretrain,
    rank,
    recsys,
    select,
    train,
    transfer,
    tts,
)
from transferkit.stages.base import RunContext, Stage

# the default order, for the stages a recipe does not write (transfer, select) and for ties
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        rank.STAGE,
        pretrain.STAGE,
        transfer.STAGE,
        train.STAGE,
        baselines.STAGE,
        merge.STAGE,
        distill.STAGE,
        compress.PRUNE,
        compress.QUANTIZE,
        compress.EXPORT,
        evaluate.STAGE,
        select.STAGE,
        recsys.TRAIN,
        recsys.BASELINES,
        recsys.SELECT,
        tts.STAGE,
    )
}


def stage_order(recipe: Recipe) -> list[Stage]:
    """The recipe's stages in the order it writes them, each preceded by the stages whose outputs it needs.

    A stage's place is its first key in ``recipe.written`` (the keys the recipe writes, then the others); a stage
    with no key of its own (``select``) comes after them, in the default order. Before a stage runs, the stages that
    give what it needs run (``rank`` before ``train``, wherever it is written), except those that need what it gives
    in turn: stages that read and write the same thing (train -> distill -> prune all give models) keep the written
    order among themselves.
    """
    written, default = recipe.written, list(STAGES)

    def position(stage: Stage) -> tuple[int, int]:
        places = [written.index(k) for k in stage.keys if k in written]
        return (min(places), 0) if places else (len(written), default.index(stage.name))

    present = sorted((s for s in STAGES.values() if s.applies(recipe)), key=position)
    order: list[Stage] = []

    def add(stage: Stage, visiting: tuple[Stage, ...] = ()) -> None:
        if stage in order or stage in visiting:
            return
        for giver in present:
            if set(giver.gives) & set(stage.needs) and not set(giver.needs) & set(stage.gives):
                add(giver, (*visiting, stage))
        order.append(stage)

    for stage in present:
        add(stage)
    return order


def check_stages(raw: dict[str, Any]) -> list[str]:
    """Every stage's own checks of its recipe section (those that need the registries)."""
    return [p for stage in STAGES.values() for p in stage.check(raw)]


__all__ = ["STAGES", "RunContext", "Stage", "check_stages", "stage_order"]
