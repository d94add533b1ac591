"""What a modality plugs into the pipeline: how labelled items become a training ``Dataset``, and how raw inputs
(files, strings...) become one model batch at prediction time.

Images and text register here (``data.images``, ``data.text``); a new modality registers its own pair and the
pipeline, the engine and ``predict`` need no change: the engine batches with the dataset's ``collate`` when it has
one, and moves tensors or dicts of tensors to the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from transferkit.errors import DataError


@dataclass(frozen=True)
class Modality:
    """``dataset(items, labels, preprocess, processor, augment) -> Dataset`` and ``batch(model, inputs) -> x``."""

    name: str
    dataset: Callable[[Sequence[Any], np.ndarray, dict[str, Any], Any, Any], Dataset]
    batch: Callable[[Any, list[Any]], Any]


MODALITIES: dict[str, Modality] = {}


def register_modality(name: str, dataset: Callable[..., Dataset], batch: Callable[[Any, list[Any]], Any]) -> None:
    MODALITIES[name] = Modality(name, dataset, batch)


def get_modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise DataError(f"no data support for modality '{name}'; transferkit reads: {', '.join(sorted(MODALITIES))}")
    return MODALITIES[name]


def make_dataset(
    modality: str,
    items: Sequence[Any],
    labels: np.ndarray,
    preprocess: dict[str, Any],
    processor: Any = None,
    augment: Any = None,
) -> Dataset:
    """The modality's training/evaluation dataset for these items (``augment`` only for training splits)."""
    return get_modality(modality).dataset(items, labels, preprocess, processor, augment)


def make_batch(model: Any, inputs: list[Any]) -> Any:
    """One model batch from raw inputs (image paths or arrays, strings...) with the model's own preprocessing."""
    return get_modality(model.modality).batch(model, inputs)
