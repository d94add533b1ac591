"""Prediction from a saved model alone: ``load_run(RUN_DIR).predict(inputs)``.

Inputs are what the model's modality takes: image paths, PIL images or uint8 arrays for an image model; strings
for a text model (``texts_from_file`` reads a file of lines).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from transferkit.data.modality import get_modality, make_batch
from transferkit.engine.loop import inference_pass
from transferkit.errors import DataError, DataNotFoundError
from transferkit.models.base import SourceModel, load_model

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


def _describe(item: Any, i: int, modality: str) -> str:
    """A prediction row's input: the path or text itself, else its position (an array, a PIL image...)."""
    if isinstance(item, (str, Path)):
        return str(item)
    return f"<{modality} {i}>"


def texts_from_file(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, one text per line."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"text file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"'{path}' is not a UTF-8 text file ({e.reason} at byte {e.start}); --file takes a text file with one "
            "text per line"
        ) from None
    lines = [line.strip() for line in text.splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise DataError(f"'{path}' holds no text (one text per line expected)")
    return texts


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


def load_run(path: str | Path) -> Any:
    """A Predictor from a run directory (its selected ``model/``) or a model folder."""
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"run directory or model folder '{path}' does not exist")
    folder = path / "model" if (path / "model" / "model.json").is_file() else path
    from transferkit.recsys.run import is_recsys_folder, load_recsys_run

    if is_recsys_folder(folder):  # a recommendation model: user ids in, top-k unseen items out
        return load_recsys_run(folder)
    return Predictor(load_model(folder))
