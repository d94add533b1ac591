"""``recsys:``: a recommendation task (interactions, a two-tower or MF model, transfer from a source run's users and
items), trained per seed for each arm (transfer, target-only, popularity) and summarised as mean ± sd.

Outputs: ``metrics.json`` (``"task": "recommendation"``; per arm, per seed and mean ± sd), ``model/`` (the best arm
and seed on validation), ``report.html``. Resume rule: ``metrics.json`` on disk is the finished task.
"""

from __future__ import annotations

from transferkit.config import Recipe
from transferkit.stages.base import RunContext, Stage


def done(ctx: RunContext) -> bool:
    return (ctx.out / "metrics.json").is_file()


def run(ctx: RunContext) -> None:
    from transferkit.recsys.run import run_recsys

    if ctx.main:
        run_recsys(ctx.recipe, ctx.out, ctx.resume, ctx.log)


def _applies(recipe: Recipe) -> bool:
    return recipe.recsys is not None


STAGE = Stage(
    "recsys",
    run,
    _applies,
    done,
    lambda ctx: ctx.log("[recsys] already done"),
    keys=("recsys",),
    help="a recommendation task: arms per seed, transfer from a source run, popularity",
)
