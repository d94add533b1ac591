"""Two tasks on one base, merged: each task's accuracy in the merged multi-task model relative to its own model.

Per seed and modality, two runs from one source, then their models merged (the ``merge:`` stage on a copy of the
first run, the second as ``runs:``); different label sets give a multi-task model (the merged backbone, each run's
head), each task scored on its own run's validation and test splits:

- ``image``: the demo recipe (EfficientNet-Lite0, MNIST-5k, 20 labelled images per class, ``freeze`` of 6 layer
  groups, 15 epochs, 96 px) on the digits 0-4 and on the digits 5-9;
- ``text``: the text demo recipe (all-MiniLM-L6-v2, 100 labelled and 50 validation texts per class, 8 epochs) on
  fresh vs rotten reviews (``rotten_tomatoes``, 2,000 test reviews) and on plot summary vs review
  (``rotten_tomatoes_plots``, the same corpus, 1,000 test texts).

Methods: averaging (``uniform_soup``), ``task_arithmetic``, ``ties`` (density 0.2) and ``dare`` (p 0.9, then task
arithmetic), each at lambda 0.5 and 1.0; per method the lambda with the best mean validation accuracy relative to
the single-task models is reported, and "the best method" is chosen on validation the same way. The test split is
only reported.

``--refit`` adds, beside each setting, a copy with ``refit_heads: true`` (label ``...-refit``): each task's head
fitted again by a linear probe on the merged backbone's features of its training split; the copies compete with
the others of their method, still chosen on validation; ``--refit-only LABEL...`` adds the copies of those settings
only (e.g. ``--wide --refit-only ties-1.5``: the wide grid's best on validation, with refitted heads).
``--dry-run`` builds and validates the recipes (the task runs and the merge) without training anything.

Run: ``python bench/merge_tasks.py --task image --seeds 0 1 2`` (and ``--task text``); results:
``bench/results/merge-tasks-TASK.json`` (``-wide``, ``-refit`` added to the name with those flags).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFERKIT_PROGRESS", "0")

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result

from transferkit.demo import demo_recipe_path
from transferkit.io import read_json
from transferkit.recipe import load_recipe
from transferkit.runner import run_recipe

TASKS = {
    "image": {
        "low": {"dataset": "mnist5k", "classes": ["0", "1", "2", "3", "4"]},
        "high": {"dataset": "mnist5k", "classes": ["5", "6", "7", "8", "9"]},
    },
    "text": {
        "sentiment": {"dataset": "rotten_tomatoes"},
        "plot": {"dataset": "rotten_tomatoes_plots", "test_size": 1000},
    },
}
METHODS = {
    "uniform_soup": [{"name": "uniform_soup"}],
    "task_arithmetic": [{"name": "task_arithmetic", "lam": lam} for lam in (0.5, 1.0)],
    "ties": [{"name": "ties", "density": 0.2, "lam": lam} for lam in (0.5, 1.0)],
    "dare": [{"name": "dare", "p": 0.9, "lam": lam, "seed": 0} for lam in (0.5, 1.0)],
}
# --wide: more settings per method (a second attempt at the goal; still chosen on validation)
WIDE = {
    "task_arithmetic": [{"name": "task_arithmetic", "lam": lam} for lam in (0.7,)],
    "ties": [{"name": "ties", "density": d, "lam": lam} for d, lam in ((0.2, 1.5), (0.5, 1.0), (0.5, 0.7))],
    "dare": [{"name": "dare", "p": 0.7, "lam": lam, "seed": 0} for lam in (0.7, 1.0)],
}


def _label(method: str, spec: dict[str, Any]) -> str:
    extra = "".join(f"-{k[0]}{spec[k]}" for k in ("density", "p") if k in spec and spec[k] not in (0.2, 0.9))
    return f"{method}{extra}-{spec['lam']}" if "lam" in spec else method


def task_recipe(modality: str, task: str, seed: int) -> dict[str, Any]:
    raw = yaml.safe_load(demo_recipe_path(modality).read_text())
    raw["name"] = task  # the task's name in the merged model
    raw["seed"] = seed
    raw.pop("compare", None)
    raw.pop("baselines", None)
    raw["data"].update(TASKS[modality][task])
    return raw


def _run(raw: dict[str, Any], folder: Path) -> Path:
    how: dict[str, Any] = {"from_run": folder} if (folder / "run.json").is_file() else {"out": folder}
    return run_recipe(load_recipe(raw), **how)


def merge_entries(main: str, second: Path, wide: bool = False, refit: bool | set[str] = False) -> list[dict[str, Any]]:
    """The grid: each method's settings (and WIDE's), each also with ``refit_heads: true`` when ``refit`` (True:
    every setting; a set of labels: those settings only)."""
    entries = []
    for method, specs in METHODS.items():
        for spec in specs + (WIDE.get(method, []) if wide else []):
            entry = {"method": spec, "models": [main], "runs": [str(second)], "label": _label(method, spec)}
            entries.append(entry)
            if refit is True or (isinstance(refit, set) and entry["label"] in refit):
                entries.append({**entry, "label": f"{entry['label']}-refit", "refit_heads": True})
    return entries


def merge_recipe(
    modality: str, seed: int, main: str, second: Path, wide: bool, refit: bool | set[str]
) -> dict[str, Any]:
    """The first task's recipe with the grid of merges (the second task's run as ``runs:``)."""
    first, _ = TASKS[modality]
    raw = task_recipe(modality, first, seed)
    raw["merge"] = merge_entries(main, second, wide, refit)
    return raw


def dry_run(modality: str, seed: int, out: Path, wide: bool, refit: bool | set[str]) -> list[str]:
    """Build and validate every recipe this benchmark runs, training nothing; returns the merges' labels."""
    for task in TASKS[modality]:
        load_recipe(task_recipe(modality, task, seed))
    _, task = TASKS[modality]
    second = out / f"{task}-seed{seed}"
    recipe = load_recipe(merge_recipe(modality, seed, "MAIN", second, wide, refit))
    return [e.name for e in recipe.merge]


def one_seed(modality: str, seed: int, out: Path, wide: bool = False, refit: bool | set[str] = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    first, second = TASKS[modality]
    runs = {task: _run(task_recipe(modality, task, seed), out / f"{task}-seed{seed}") for task in (first, second)}
    merged_dir = out / f"merged-{modality}-seed{seed}"
    if not (merged_dir / "run.json").is_file():
        shutil.copytree(runs[first], merged_dir)
    main = read_json(runs[first] / "metrics.json")["selected"]
    raw = merge_recipe(modality, seed, main, runs[second], wide, refit)
    done = run_recipe(load_recipe(raw), from_run=merged_dir)
    metrics = read_json(done / "metrics.json")
    row: dict[str, Any] = {"seed": seed, "merges": {}}
    for label, result in metrics["multi_task"].items():
        tasks = result["tasks"]
        row["merges"][label] = {
            task: {
                "val": t["val"]["accuracy"],
                "test": t["test"]["accuracy"],
                "single_val": t["member_scores"]["val"]["accuracy"],
                "single_test": t["member_scores"]["test"]["accuracy"],
            }
            for task, t in tasks.items()
        }
    row["wall_s"] = time.perf_counter() - t0
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per merge: each task's merged / single accuracy (val, test; mean over seeds); per method the lambda chosen on
    validation; the best method on validation."""

    def relative(label: str, split: str, task: str) -> list[float]:
        return [r["merges"][label][task][split] / r["merges"][label][task][f"single_{split}"] for r in rows]

    labels = list(rows[0]["merges"])
    tasks = list(rows[0]["merges"][labels[0]])
    out: dict[str, Any] = {"merges": {}}
    for label in labels:
        out["merges"][label] = {
            task: {
                "val_relative": statistics.mean(relative(label, "val", task)),
                "test_relative": statistics.mean(relative(label, "test", task)),
                "test_relative_per_seed": relative(label, "test", task),
                "test": statistics.mean(r["merges"][label][task]["test"] for r in rows),
                "single_test": statistics.mean(r["merges"][label][task]["single_test"] for r in rows),
            }
            for task in tasks
        }

    def val_score(label: str) -> float:
        return statistics.mean(out["merges"][label][t]["val_relative"] for t in tasks)

    chosen = {m: max([lb for lb in labels if lb.split("-")[0] == m], key=val_score) for m in METHODS}
    out["chosen_on_val"] = chosen
    out["best_method_on_val"] = max(chosen.values(), key=val_score)
    return out


def markdown(s: dict[str, Any]) -> str:
    tasks = list(next(iter(s["merges"].values())))
    head = " | ".join(f"{t} test (merged / single)" for t in tasks)
    lines = [f"| merge | {head} | mean val relative |", "|---|" + "---|" * (len(tasks) + 1)]
    for label, m in s["merges"].items():
        cells = " | ".join(
            f"{m[t]['test']:.3f} / {m[t]['single_test']:.3f} = {100 * m[t]['test_relative']:.1f}%" for t in tasks
        )
        mark = " (chosen on val)" if label in s["chosen_on_val"].values() else ""
        val = statistics.mean(m[t]["val_relative"] for t in tasks)
        lines.append(f"| {label}{mark} | {cells} | {100 * val:.1f}% |")
    lines.append(f"\nbest method on validation: {s['best_method_on_val']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), default="image")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", help="where the run directories go (default: a temporary folder)")
    parser.add_argument("--wide", action="store_true", help="more settings per method (WIDE), chosen on validation")
    parser.add_argument("--refit", action="store_true", help="each setting also with refit_heads: true")
    parser.add_argument(
        "--refit-only", nargs="+", metavar="LABEL", help="refit copies of these settings only (e.g. ties-1.5)"
    )
    parser.add_argument("--dry-run", action="store_true", help="build and validate the recipes; train nothing")
    args = parser.parse_args()
    refit: bool | set[str] = set(args.refit_only) if args.refit_only else args.refit
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-merge-tasks-"))
    if args.dry_run:
        for seed in args.seeds:
            labels = dry_run(args.task, seed, out, args.wide, refit)
            print(f"seed {seed}: the task recipes and {len(labels)} merges validate: {', '.join(labels)}")
        return
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(args.task, seed, out, args.wide, refit))
        print(json.dumps(rows[-1], indent=1), flush=True)
    s = summary(rows)
    print(markdown(s))
    result = {"task": args.task, "machine": machine(), "args": vars(args), "rows": rows, "summary": s}
    name = f"merge-tasks-{args.task}" + ("-wide" if args.wide else "") + ("-refit" if refit else "")
    print(f"written: {write_result(name, result)}")


if __name__ == "__main__":
    main()
