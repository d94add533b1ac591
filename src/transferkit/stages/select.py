"""Select the best trained model on validation data and write the run's summary.

Outputs: ``model/`` (a copy of the selected ``models/NAME/``), ``metrics.json`` (every model's metrics, the
data summary, what each stage added, which model was selected and by what, and ``warnings``: e.g. a baseline that
beats the selected model on validation), ``report.html``. It runs after every stage that gives models, and again
whenever a stage is added to a finished run. Resume rule: none; it is cheap and always rewrites the summary from
what the other stages hold.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

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
    warnings = baseline_warnings(ctx, selected)
    for w in warnings:
        ctx.log(f"WARNING: {w['message']}")
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
        **({"warnings": warnings} if warnings else {}),
        "timings": {**ctx.timings, "total_s": time.perf_counter() - ctx.t_start},
    }
    if ctx.main:
        replace_dir(out / "model", lambda tmp: shutil.copytree(out / "models" / selected, tmp, dirs_exist_ok=True))
        write_json(out / "metrics.json", metrics)
        write_report(out)
    ctx.wait()


def baseline_warnings(ctx: RunContext, selected: str) -> list[dict[str, Any]]:
    """One ``baseline_beats_selected`` warning per baseline whose validation score (by ``train.monitor``) beats
    the selected model's: the run still saves the selected model (a baseline is not a model folder), so the user
    must hear that the transfer did not pay off here, and what to try instead."""
    monitor = ctx.recipe.train.monitor
    key = monitor.removeprefix("val_")
    better = (lambda a, b: a < b) if key == "loss" else (lambda a, b: a > b)
    mine = ctx.results[selected]["val"].get(key)
    warnings: list[dict[str, Any]] = []
    for name, baseline in (ctx.sections.get("baselines") or {}).items():
        theirs = baseline.get("val", {}).get(key)
        if not isinstance(mine, (int, float)) or not isinstance(theirs, (int, float)) or not better(theirs, mine):
            continue
        message = (
            f"the baseline '{name}' beats the selected model '{selected}' on validation ({monitor} {theirs:.4f} "
            f"vs {mine:.4f}). The run still saves '{selected}' as its model/, because a baseline is not a model "
            "folder and cannot be saved as the run's model. The source does not pay off on this data as trained: "
            "try more labelled examples (data.per_class), another strategy (compare: entries) or another source "
            "(rank: candidates)."
        )
        warnings.append(
            {
                "warning": "baseline_beats_selected",
                "baseline": name,
                "selected": selected,
                "monitor": monitor,
                "baseline_value": theirs,
                "selected_value": mine,
                "message": message,
            }
        )
    return warnings


def _applies(recipe: Recipe) -> bool:
    return recipe.data is not None


STAGE = Stage(
    "select",
    run,
    _applies,
    needs=("models",),
    help="select the best model on validation data; write metrics.json and report.html",
)
