"""``baselines:``: models computed on the run's splits without the source (text: TF-IDF + logistic regression).

Outputs: ``baselines.json``. Resume rule: a ``baselines.json`` holding every named baseline is done.
"""

from __future__ import annotations

from typing import Any

from transferkit.config import Recipe
from transferkit.errors import did_you_mean
from transferkit.stages.base import RunContext, Stage


def _file(ctx: RunContext) -> Any:
    return ctx.out / "baselines.json"


def done(ctx: RunContext) -> bool:
    from transferkit.io import read_json

    return _file(ctx).is_file() and set(ctx.recipe.baselines) <= set(read_json(_file(ctx)))


def _use(ctx: RunContext, baselines: dict[str, Any]) -> None:
    ctx.sections["baselines"] = {name: baselines[name] for name in ctx.recipe.baselines}
    for name, b in ctx.sections["baselines"].items():
        ctx.log(f"[baseline {name}] test accuracy {b['test']['accuracy']:.4f} | macro-F1 {b['test']['macro_f1']:.4f}")


def load(ctx: RunContext) -> None:
    from transferkit.io import read_json

    _use(ctx, read_json(_file(ctx)))


def run(ctx: RunContext) -> None:
    from transferkit.errors import RecipeError
    from transferkit.evaluation.baselines import run_baselines
    from transferkit.io import write_json

    try:
        baselines = run_baselines(ctx.recipe.baselines, ctx.data())
    except ValueError as e:
        raise RecipeError(f"baselines: {e}") from e
    if ctx.main:
        write_json(_file(ctx), baselines)
    _use(ctx, baselines)


def check(raw: dict[str, Any]) -> list[str]:
    from transferkit.evaluation.baselines import BASELINES

    baselines = raw.get("baselines")
    if not isinstance(baselines, list):
        return []
    return [
        f"baselines.{i}: unknown baseline {b!r}.{did_you_mean(str(b), BASELINES)} Valid choices: "
        f"{', '.join(BASELINES)}."
        for i, b in enumerate(baselines)
        if b not in BASELINES
    ]


def extend(raw: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``transferkit baselines RUN_DIR names=[tfidf]``: more baselines on the run's splits."""
    from transferkit.errors import RecipeError

    names = options.get("names")
    if set(options) != {"names"} or not isinstance(names, list):
        raise RecipeError("baselines on a finished run takes names=[NAME, ...] (transferkit ls lists them)")
    return {**raw, "baselines": list(dict.fromkeys([*raw.get("baselines", []), *map(str, names)]))}


def _applies(recipe: Recipe) -> bool:
    return bool(recipe.baselines)


STAGE = Stage(
    "baselines",
    run,
    _applies,
    done,
    load,
    keys=("baselines",),
    needs=("source",),  # the data is read with the source's preprocessing
    check=check,
    extend=extend,
    example="names=[tfidf]",
    help="baselines computed on the run's splits without the source (e.g. tfidf)",
)
