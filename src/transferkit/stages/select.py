"""Select the best trained model on validation data and write the run's summary.

Outputs: ``model/`` (a copy of the selected ``models/NAME/``), ``metrics.json`` (every model's metrics, the
data summary, what each stage added, which model was selected and by what), ``report.html``. It runs after every
stage that gives models, and again whenever a stage is added to a finished run. Resume rule: none; it is cheap and
always rewrites the summary from what the other stages hold.
"""

from __future__ import annotations

import shutil
import time

from transferkit.config import Recipe
from transferkit.stages.base import RunContext, Stage


def run(ctx: RunContext) -> None:
    from transferkit import __version__
    from transferkit.evaluation.report import write_report
    from transferkit.io import replace_dir, write_json

    results, out, train = ctx.results, ctx.out, ctx.recipe.train
    monitor = train.monitor.removeprefix("val_")
    pick = max if monitor != "loss" else min
    selected = pick(results, key=lambda n: results[n]["val"].get(monitor, float("-inf")))
    metrics = {
        "run": ctx.recipe.name,
        "source": ctx.source_spec.name if ctx.source_spec else None,
        "selected": selected,
        "selected_by": train.monitor,
        "transferkit_version": __version__,
        "data": ctx.data().summary(),
        "models": results,
        **{k: v for k, v in ctx.sections.items() if v},
        **({"tables": ctx.tables} if ctx.tables else {}),
        "timings": {**ctx.timings, "total_s": time.perf_counter() - ctx.t_start},
    }
    if ctx.main:
        replace_dir(out / "model", lambda tmp: shutil.copytree(out / "models" / selected, tmp, dirs_exist_ok=True))
        write_json(out / "metrics.json", metrics)
        write_report(out)
    ctx.wait()


def _applies(recipe: Recipe) -> bool:
    return recipe.data is not None


STAGE = Stage(
    "select",
    run,
    _applies,
    needs=("models",),
    help="select the best model on validation data; write metrics.json and report.html",
)
