"""``evaluate:``: every trained model evaluated on further labelled datasets (a shifted domain, a new test set).

Each model is reloaded from ``models/NAME/`` and evaluated on every example of the dataset, read with the model's
own preprocessing; the dataset's classes must be among the model's labels (matched by name). Outputs:
``evaluations/LABEL.json`` (per model: accuracy, macro-F1, loss, confusion matrix over the model's labels). Resume
rule: the file on disk, holding every model, is the evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferkit.config import Recipe
from transferkit.config.recipe import EvaluateConfig
from transferkit.stages.base import RunContext, Stage, append_entry


def _file(ctx: RunContext, entry: EvaluateConfig) -> Path:
    return ctx.out / "evaluations" / f"{entry.name}.json"


def done(ctx: RunContext) -> bool:
    from transferkit.io import read_json

    files = [_file(ctx, e) for e in ctx.recipe.evaluate]
    return all(f.is_file() and set(ctx.results) <= set(read_json(f)["models"]) for f in files)


def _use(ctx: RunContext, entry: EvaluateConfig, result: dict[str, Any]) -> None:
    ctx.sections.setdefault("evaluations", {})[entry.name] = result
    rows = [[name, m["accuracy"], m["macro_f1"], m["loss"]] for name, m in result["models"].items()]
    ctx.tables.append(
        {
            "title": f"Evaluation on {entry.name}",
            "note": f"{result['dataset']}: {result['n']} examples, every model as trained (models/NAME)",
            "columns": ["model", "accuracy", "macro-F1", "loss"],
            "rows": rows,
        }
    )
    for name, acc, f1, _ in rows:
        ctx.log(f"[evaluate {entry.name}] {name}: accuracy {acc:.4f} | macro-F1 {f1:.4f}")


def load(ctx: RunContext) -> None:
    from transferkit.io import read_json

    for entry in ctx.recipe.evaluate:
        _use(ctx, entry, read_json(_file(ctx, entry)))


def evaluate_on(model: Any, entry: EvaluateConfig, device: Any = "cpu") -> dict[str, Any]:
    """One model on every example of the entry's dataset, its classes mapped to the model's labels by name."""
    import numpy as np

    from transferkit.data import make_dataset, read_dataset
    from transferkit.errors import DataError
    from transferkit.pipeline import evaluate

    labels = list(model.labels or [])
    examples = read_dataset(entry.dataset, entry.strict, model.modality, entry.text_column, entry.label_column)
    unknown = [c for c in examples.classes if c not in labels]
    if unknown:
        raise DataError(
            f"evaluate: the classes {unknown} of '{entry.dataset}' are not among the model's labels {labels}; "
            "evaluate on data with the classes the model was trained on"
        )
    mapped = np.array([labels.index(examples.classes[i]) for i in examples.labels], dtype=np.int64)
    dataset = make_dataset(model.modality, examples.items, mapped, model.preprocess, model.processor)
    return evaluate(model, dataset, len(labels), device=device)


def run(ctx: RunContext) -> None:
    from transferkit.io import write_json

    for entry in ctx.recipe.evaluate:
        models = {}
        for name in ctx.results:
            m = evaluate_on(ctx.model(name), entry, ctx.accelerator.device)
            models[name] = m
        result = {"dataset": entry.dataset, "n": next(iter(models.values()))["n"] if models else 0, "models": models}
        if ctx.main:
            write_json(_file(ctx, entry), result)
        _use(ctx, entry, result)


def check(raw: dict[str, Any]) -> list[str]:
    from transferkit.data import check_dataset_spec

    entries = raw.get("evaluate")
    problems = []
    for i, e in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(e, dict) and isinstance(e.get("dataset"), str):
            problems += [f"evaluate.{i}.dataset: {p}" for p in check_dataset_spec(e["dataset"])]
    return problems


def extend(raw: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``transferkit evaluate RUN_DIR dataset=PATH [label=NAME]``: one more evaluation dataset."""
    usage = "evaluate on a finished run takes dataset=PATH [label=NAME]"
    return append_entry(raw, "evaluate", EvaluateConfig, options, usage)


def _applies(recipe: Recipe) -> bool:
    return bool(recipe.evaluate)


STAGE = Stage(
    "evaluate",
    run,
    _applies,
    done,
    load,
    keys=("evaluate",),
    needs=("models",),
    check=check,
    extend=extend,
    example="dataset=path/to/images label=shifted",
    help="evaluate every trained model on further labelled datasets (a shifted domain, a new test set)",
)
