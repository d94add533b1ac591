"""Forward transfer: build the target from the source (``transfer:`` configures another architecture, input
channels, image size, rules...) and write what moved.

Outputs: ``transfer_report.json`` (every target tensor: transferred from which source tensor and how, or fresh and
why; the coverage). Resume rule: the file on disk is the report.
"""

from __future__ import annotations

from transferkit.config import Recipe
from transferkit.stages.base import RunContext, Stage


def done(ctx: RunContext) -> bool:
    return (ctx.out / "transfer_report.json").is_file()


def run(ctx: RunContext) -> None:
    """The report of the main model's target (from random weights when its strategy trains from scratch)."""
    from transferkit.io import write_json
    from transferkit.strategies import get_strategy

    strategy, _ = get_strategy(ctx.recipe.train.strategy)
    target = ctx.make_target(ctx.data().classes, pretrained=not strategy.from_scratch)
    if ctx.main:
        write_json(ctx.out / "transfer_report.json", target.report)


def _applies(recipe: Recipe) -> bool:
    return recipe.data is not None


STAGE = Stage(
    "transfer",
    run,
    _applies,
    done,
    lambda ctx: None,
    keys=("transfer",),
    needs=("source",),
    gives=("target",),
    help="build the target from the source and report, tensor by tensor, what moved",
)
