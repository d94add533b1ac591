"""Prediction from a saved model alone: ``load_run(RUN_DIR).predict(inputs)``.

Inputs are what the model's modality takes: image paths, PIL images or uint8 arrays for an image model; strings
for a text model (``transferkit.exported.read_lines`` reads a file of lines). A multi-task model (a merge of models
of different label sets) predicts every task, or the one ``load_run(path, task=NAME)`` names; each of its
predictions names its task.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from transferkit.data.modality import get_modality, make_batch
from transferkit.engine.loop import inference_pass
from transferkit.errors import DataError, DataNotFoundError
from transferkit.models.base import MultiTaskModel, SourceModel, load_model

BATCH = 32


class Predictor:
    """A loaded model with its preprocessing (transform, tokenizer...) and labels."""

    def __init__(self, model: SourceModel):
        self.model = model.eval()
        self.modality = model.modality
        self.labels = model.labels or [str(i) for i in range(model.head_spec()["num_classes"])]

    @torch.no_grad()
    def predict_proba(self, inputs: list[Any]) -> torch.Tensor:
        """Class probabilities, one row per input (images, or texts for a text model).

        More than one batch runs as the engine's evaluation does (``engine.loop.inference_pass``: channels-last
        weights, batch norms folded); one batch would not pay for setting that up.
        """
        fast = len(inputs) > BATCH
        with inference_pass(self.model, len(inputs), BATCH) if fast else contextlib.nullcontext(self.model) as run:
            out = [
                torch.softmax(run(make_batch(self.model, list(inputs[i : i + BATCH]))).float(), dim=1)
                for i in range(0, len(inputs), BATCH)
            ]
        return torch.cat(out) if out else torch.empty(0, len(self.labels))

    def predict(self, inputs: list[Any], top_k: int = 3) -> list[dict[str, Any]]:
        """Top-k labels with probabilities, one entry per input."""
        if top_k < 1:
            raise DataError(f"top_k={top_k}: give 1 or more (the number of labels listed per input)")
        probs = self.predict_proba(inputs)
        k = min(top_k, probs.shape[1])
        values, idx = probs.topk(k, dim=1)
        key = get_modality(self.modality).input_key
        return [
            {
                key: _describe(item, i, self.modality),
                "top": [
                    {"label": self.labels[j], "probability": float(v)} for v, j in zip(vals.tolist(), ids.tolist())
                ],
            }
            for i, (item, vals, ids) in enumerate(zip(inputs, values, idx))
        ]


class MultiTaskPredictor:
    """A multi-task model's tasks (all, or the ones named), each predicted as a single-task model predicts: the
    backbone runs once per task."""

    def __init__(self, model: MultiTaskModel, tasks: list[str] | None = None):
        self.model = model.eval()
        self.modality = model.modality
        self.tasks = {name: Predictor(model.task(name)) for name in tasks or model.tasks}

    def predict(self, inputs: list[Any], top_k: int = 3) -> list[dict[str, Any]]:
        """Per input, one entry per task (in the model's task order): the input, ``task`` and the top-k labels."""
        by_task = {name: p.predict(inputs, top_k) for name, p in self.tasks.items()}
        key = get_modality(self.modality).input_key
        return [
            {key: rows[i][key], "task": name, "top": rows[i]["top"]}
            for i in range(len(inputs))
            for name, rows in by_task.items()
        ]


def _describe(item: Any, i: int, modality: str) -> str:
    """A prediction row's input: the path or text itself, else its position (an array, a PIL image...)."""
    if isinstance(item, (str, Path)):
        return str(item)
    return f"<{modality} {i}>"


def path_inputs(inputs: list[str], modality: str) -> list[Any]:
    """Command-line inputs for a model of ``modality``: a folder given to a model that reads files (images, audio)
    becomes the files of its kind in it (sub-folders searched, sorted); a file given to a text model is an error
    (it would be classified as the text of its name)."""
    m = get_modality(modality)
    out: list[Any] = []
    for item in inputs:
        path = Path(item).expanduser()
        if m.reads_lines and path.exists():
            raise DataError(
                f"'{item}' is a {'folder' if path.is_dir() else 'file'}, but this is a {modality} model: it takes the "
                f"texts themselves as arguments (a path would be classified as the text of its name); for a UTF-8 "
                f"file with one text per line, give --file FILE"
            )
        if not path.is_dir():
            out.append(item)
            continue
        if m.read_unlabelled is None:
            raise DataError(f"'{item}' is a folder; this {modality} model takes {m.inputs_help}: give them one by one")
        try:
            files = list(m.read_unlabelled(str(path)))
        except DataError:  # the reader's message speaks of data.unlabelled
            raise DataError(
                f"folder '{item}' holds no {m.inputs_help} (sub-folders searched, hidden files left out); give the "
                f"folder or the files this {modality} model takes"
            ) from None
        out += [str(f) for f in files]
    return out


def load_run(path: str | Path, task: str | None = None) -> Any:
    """A Predictor from a run directory (its selected ``model/``) or a model folder.

    Args:
        task: a multi-task model's task to predict (default: every task); a single-task model has none to name.
    """
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"run directory or model folder '{path}' does not exist")
    folder = path / "model" if (path / "model" / "model.json").is_file() else path
    from transferkit.recsys.run import is_recsys_folder, load_recsys_run

    if is_recsys_folder(folder):  # a recommendation model: user ids in, top-k unseen items out
        if task is not None:
            raise DataError(f"'{folder}' is a recommendation model: it has no tasks to choose from (--task {task})")
        return load_recsys_run(folder)
    if task is not None and folder != path and not _is_multi_task(folder):
        # a run whose selected model answers one task: --task names a task of the run's multi-task model
        holders = [f for f, tasks in _multi_task_models(path) if task in tasks]
        if len(holders) == 1:
            folder = holders[0]
        elif len(holders) > 1:
            raise DataError(
                f"'{path}' holds {len(holders)} multi-task models with the task '{task}': "
                + ", ".join(f"'{f}'" for f in holders)
                + "; give the one to use (transferkit predict MODEL_FOLDER INPUT --task ...)"
            )
    model = load_model(folder)
    if isinstance(model, MultiTaskModel):
        return MultiTaskPredictor(model, None if task is None else [task])  # an unknown task: the tasks listed
    if task is not None:
        raise DataError(
            f"'{folder}' is a single-task model (labels: {_labels(model)}): it has no tasks to choose "
            f"from (--task {task}).{_multi_task_hint(path)} Predict without --task"
        )
    return Predictor(model)


def _labels(model: SourceModel) -> str:
    labels = model.labels or [str(i) for i in range(model.head_spec()["num_classes"])]
    return ", ".join(labels[:10]) + (f" and {len(labels) - 10} more" if len(labels) > 10 else "")


def _multi_task_models(run: Path) -> list[tuple[Path, list[str]]]:
    """The multi-task models a run directory holds (merges of different label sets): each folder and its tasks."""
    from transferkit.io import is_temporary, read_json

    found = []
    for meta_path in sorted(run.glob("models/*/model.json")):
        if is_temporary(meta_path.parent):  # a half-built folder a killed write left (the next resume removes it)
            continue
        with contextlib.suppress(ValueError, OSError, AttributeError):
            tasks = read_json(meta_path).get("tasks")
            if isinstance(tasks, list):
                found.append((meta_path.parent, [str(t.get("name")) for t in tasks if isinstance(t, dict)]))
    return found


def _is_multi_task(folder: Path) -> bool:
    from transferkit.io import read_json

    with contextlib.suppress(ValueError, OSError, AttributeError):
        return "tasks" in read_json(folder / "model.json")
    return False


def _multi_task_hint(run: Path) -> str:
    """Where a run directory holds multi-task models: their folders and tasks, for an error message."""
    found = [f"'{folder}' (tasks: {', '.join(tasks)})" for folder, tasks in _multi_task_models(run)]
    return f" This run's multi-task models: {'; '.join(found)}; give one of them with --task." if found else ""
