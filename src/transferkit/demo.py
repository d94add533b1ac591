"""``transferkit demo``: the shipped recipe, run offline on real weights and data, with a readable summary."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transferkit.io import read_json
from transferkit.pipeline import run_recipe
from transferkit.recipe import load_recipe


def demo_recipe_path() -> Path:
    return Path(str(resources.files("transferkit") / "recipes" / "demo.yaml"))


def run_demo(out: str | Path = "demo_runs", overwrite: bool = True, overrides: list[str] | None = None) -> Path:
    """Run the image demo under ``out``; prints a table (strategy, test accuracy, time) and the report path."""
    recipe = load_recipe(demo_recipe_path(), overrides)
    run_dir = run_recipe(recipe, out=Path(out) / recipe.name, overwrite=overwrite)
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
    print(f"total {metrics['timings']['total_s']:.1f}s | report: {run_dir / 'report.html'}")
