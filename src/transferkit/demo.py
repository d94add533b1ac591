"""``transferkit demo``: the shipped recipe, run offline on real weights and data, with a readable summary."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transferkit.errors import RunDirError, UnknownNameError, did_you_mean
from transferkit.io import read_json
from transferkit.recipe import load_recipe
from transferkit.runner import run_recipe

DEMOS = {"image": "demo.yaml", "text": "demo_text.yaml", "speech": "demo_speech.yaml"}


def demo_recipe_path(task: str = "image") -> Path:
    """The shipped recipe of a demo (``image``: EfficientNet-Lite0 -> MNIST, ``text``: MiniLM -> Rotten Tomatoes)."""
    if task not in DEMOS:
        if task == "recsys":
            raise UnknownNameError("the recsys demo has no recipe: run it with run_demo('recsys')")
        raise UnknownNameError(f"unknown demo '{task}'.{did_you_mean(task, DEMOS)} Valid choices: {', '.join(DEMOS)}.")
    return Path(str(resources.files("transferkit") / "recipes" / DEMOS[task]))


def run_demo(
    task: str = "image",
    out: str | Path = "demo_runs",
    overwrite: bool = True,
    overrides: list[str] | None = None,
    resume: bool = False,
) -> Path:
    """Run a demo under ``out``; prints a table (model, test accuracy, time) and the report path.

    A demo starts afresh by default (``overwrite``: an earlier demo run in ``out`` is replaced), so running it
    twice shows the same thing twice; ``resume`` continues an interrupted demo run instead (the run directory's
    resume rule: finished models are read back, an interrupted one continues from its checkpoint).

    ``recsys`` is not a recipe: it runs the MovieLens 100K cross-domain scenario of ``transferkit.recsys``
    (old films -> new releases, 5 ratings per user; ``metrics.json`` and ``summary.md`` under ``out/recsys``).
    It has no checkpoints (about a minute on two cores), so ``resume`` is refused for it.
    """
    if task == "recsys":
        if resume:
            raise RunDirError(
                "the recsys demo has no checkpoints to resume from (it takes about a minute): run "
                "`transferkit demo recsys` without --resume"
            )
        from transferkit.recsys import run_recsys_demo

        run_recsys_demo(Path(out) / "recsys")
        return Path(out) / "recsys"
    recipe = load_recipe(demo_recipe_path(task), overrides)
    run_dir = run_recipe(recipe, out=Path(out) / recipe.name, overwrite=overwrite and not resume, resume=resume)
    print_summary(run_dir)
    return run_dir


def print_summary(run_dir: Path) -> None:
    metrics = read_json(run_dir / "metrics.json")
    print(f"\n{metrics['source']} -> {metrics['data']['dataset']}: {metrics['data']['splits']}")
    print(f"{'model':<14} {'test acc':>9} {'val acc':>8} {'time (s)':>9}")
    for name, m in metrics["models"].items():
        t = sum(m["timing"].values())
        mark = "  <- selected on validation" if name == metrics["selected"] else ""
        print(f"{name:<14} {m['test']['accuracy']:>9.4f} {m['val']['accuracy']:>8.4f} {t:>9.1f}{mark}")
    for name, b in metrics.get("baselines", {}).items():
        print(
            f"{name + ' (baseline)':<14} {b['test']['accuracy']:>9.4f} {b['val']['accuracy']:>8.4f} "
            f"{b['train_s']:>9.1f}"
        )
    print(f"total {metrics['timings']['total_s']:.1f}s | report: {run_dir / 'report.html'}")
