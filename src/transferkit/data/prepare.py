"""The data of a run: read, split (seeded, stratified) and with the target's preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from transferkit.config import DataConfig
from transferkit.data.modality import DEFAULT_MODALITY, get_modality, make_dataset, read_dataset
from transferkit.data.split import Labelled, Splits, split_dataset


@dataclass
class PreparedData:
    """The dataset, its split, and the target's preprocessing (and tokenizer, for text)."""

    examples: Labelled
    splits: Splits
    preprocess: dict[str, Any]
    cfg: DataConfig
    processor: Any = None

    @property
    def classes(self) -> list[str]:
        return self.examples.classes

    @property
    def modality(self) -> str:
        return str(self.preprocess.get("modality", DEFAULT_MODALITY))

    def items(self, split: str) -> Any:
        """The raw items of a split (paths, arrays, texts...), in split order; a lazy text column stays lazy."""
        idx = getattr(self.splits, split)
        source = self.examples.items
        return source.subset(idx) if hasattr(source, "subset") else [source[int(i)] for i in idx]

    def dataset(self, split: str, train: bool = False) -> Dataset:
        augment = self.cfg.augment if train and self.cfg.augment.enabled else None
        return make_dataset(
            self.modality,
            self.items(split),
            self.examples.labels[getattr(self.splits, split)],
            self.preprocess,
            self.processor,
            augment,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "dataset": self.cfg.dataset,
            "modality": self.modality,
            "classes": self.classes,
            "num_classes": len(self.classes),
            "splits": self.splits.sizes(),
            "per_class": self.cfg.per_class,
            **get_modality(self.modality).summary(self.preprocess, self.examples.items),
            "skipped": self.examples.skipped,
            "skipped_count": len(self.examples.skipped),
        }


def source_preprocess(source: Any) -> dict[str, Any]:
    """The preprocessing of a source model (its ``preprocess``), or a bare ``preprocess`` dict given instead."""
    return source if isinstance(source, dict) else source.preprocess


def adjusted_preprocess(preprocess: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """The source's preprocessing with the data config's changes (image size, token length), by its modality."""
    modality = str(preprocess.get("modality", DEFAULT_MODALITY))
    return dict(get_modality(modality).adjust(dict(preprocess), cfg))


def prepare_data(cfg: DataConfig, source: Any, seed: int) -> PreparedData:
    """Read the dataset, split it (seeded, stratified) and take the preprocessing from the source.

    ``source`` is the source model (its ``preprocess`` and, for text, its tokenizer), or a bare ``preprocess`` dict
    for images.
    """
    processor = getattr(source, "processor", None)
    preprocess = source_preprocess(source)
    modality = str(preprocess.get("modality", DEFAULT_MODALITY))
    examples = read_dataset(
        cfg.dataset, strict=cfg.strict, modality=modality, text_column=cfg.text_column, label_column=cfg.label_column
    )
    if cfg.classes:
        examples = examples.select_classes(cfg.classes)
    splits = split_dataset(
        examples.labels, examples.classes, seed, cfg.test_size, cfg.per_class, cfg.val_per_class, cfg.val_fraction
    )
    return PreparedData(examples, splits, adjusted_preprocess(preprocess, cfg), cfg, processor)
