"""``recsys:``: a recommendation task as three stages: the trained arms, the baselines, and the selection.

- ``recsys`` trains every arm (``transfer`` from a source run's users, items and towers; ``target_only``) for every
  seed. Outputs: ``models/ARM-sSEED/`` and ``checkpoints/ARM-sSEED/result.json`` (its validation and test scores).
  Resume rule, per arm and seed: the result file on disk means trained (read back, never retrained).
- ``recsys_baselines``: the popularity baseline (no training; computed again on resume, the same result).
- ``recsys_select``: the trained arm and seed with the best validation value. Outputs: ``model/``, ``metrics.json``
  (``"task": "recommendation"``; per arm, per seed and mean ± sd), ``report.html``. Always rewritten.
"""

from __future__ import annotations

from typing import Any

from transferkit.config import Recipe
from transferkit.stages.base import RunContext, Stage, result_file


def _data(ctx: RunContext) -> Any:
    """The interactions, split, and the source model: read once per run, shared by the three stages."""
    from transferkit.recsys.run import prepare_recsys

    if "recsys" not in ctx.cache:
        assert ctx.recipe.recsys is not None
        ctx.cache["recsys"] = prepare_recsys(ctx.recipe.recsys, ctx.log)
    return ctx.cache["recsys"]


def _jobs(ctx: RunContext) -> list[tuple[str, int]]:
    from transferkit.recsys.run import trained_arms

    assert ctx.recipe.recsys is not None
    return [(arm, seed) for arm in trained_arms(ctx.recipe.recsys, _data(ctx)) for seed in ctx.recipe.recsys.seeds]


def train(ctx: RunContext) -> None:
    """Every trained arm for every seed; one already trained (its result on disk) is read back."""
    if not ctx.main:  # a recommendation task runs in one process
        return
    from transferkit.io import read_json, replace_dir, write_json
    from transferkit.recsys.run import TASK, save_recsys_model, train_arm

    cfg, data = ctx.recipe.recsys, _data(ctx)
    assert cfg is not None
    arms: dict[str, dict[str, Any]] = {}
    for arm, seed in _jobs(ctx):
        done_file = result_file(ctx, f"{arm}-s{seed}")
        if ctx.resume and done_file.is_file():
            scores = read_json(done_file)
            ctx.log(f"[{arm} seed {seed}] already trained: test {scores['test']}")
        else:
            model, scores = train_arm(cfg, data, arm, seed)
            extra = {"arm": arm, "seed": seed, "run": ctx.recipe.name, "task": TASK}
            seen = data.seen()
            replace_dir(
                ctx.out / "models" / f"{arm}-s{seed}",
                lambda tmp: save_recsys_model(tmp, model, extra, seen, data.titles),  # noqa: B023 (called at once)
            )
            write_json(done_file, scores)
            ctx.log(f"[{arm} seed {seed}] test {scores['test']} | best epoch {scores['best_epoch']}")
        if "transfer_report" in scores:
            ctx.sections.setdefault("recsys_transfer_report", scores["transfer_report"])
        kept = {k: v for k, v in scores.items() if k != "transfer_report"}
        arms.setdefault(arm, {"seeds": {}})["seeds"][str(seed)] = kept
    ctx.sections["recsys_arms"] = arms


def baselines(ctx: RunContext) -> None:
    if not ctx.main:  # a recommendation task runs in one process
        return
    from transferkit.recsys.run import popularity_arm

    cfg = ctx.recipe.recsys
    assert cfg is not None
    if "popularity" in cfg.baselines:
        ctx.sections.setdefault("recsys_baselines", {})["popularity"] = popularity_arm(cfg, _data(ctx))


def select(ctx: RunContext) -> None:
    if not ctx.main:  # a recommendation task runs in one process
        return
    import time

    from transferkit.recsys.run import best_arm, load_recsys_model, summarise_arms, write_recsys_run

    cfg, data = ctx.recipe.recsys, _data(ctx)
    assert cfg is not None
    trained = ctx.sections["recsys_arms"]
    arms = summarise_arms({**trained, **ctx.sections.get("recsys_baselines", {})})
    best = best_arm(cfg, arms, list(trained))
    selected, _, _ = load_recsys_model(ctx.out / "models" / f"{best[0]}-s{best[1]}")
    report = ctx.sections.get("recsys_transfer_report")
    write_recsys_run(ctx.out, ctx.recipe, data, arms, best, selected, report, time.perf_counter() - ctx.t_start)


def _applies(recipe: Recipe) -> bool:
    return recipe.recsys is not None


TRAIN = Stage(
    "recsys",
    train,
    _applies,
    keys=("recsys",),
    gives=("recsys_models",),
    help="a recommendation task: every arm (transfer, target only) trained for every seed",
)
BASELINES = Stage(
    "recsys_baselines",
    baselines,
    _applies,
    keys=("recsys",),
    help="the recommendation baselines (popularity) on the same split",
)
SELECT = Stage(
    "recsys_select",
    select,
    _applies,
    needs=("recsys_models",),
    help="the best trained arm and seed on validation; model/, metrics.json and report.html",
)
