"""The data of a run: read, split (seeded, stratified) and with the target's preprocessing; the unlabelled pool."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from transferkit.config import DataConfig
from transferkit.data.modality import (
    DEFAULT_MODALITY,
    UNLABELLED_REST,
    get_modality,
    make_dataset,
    read_dataset,
    read_unlabelled,
    strong_dataset,
)
from transferkit.data.split import Labelled, Splits, split_dataset
from transferkit.errors import DataError


@dataclass(frozen=True)
class Pool:
    """The unlabelled examples of a run (``data.unlabelled``).

    Attributes:
        items: the pool's items, of the kind the modality's dataset takes (paths, arrays, texts...).
        labels: for ``rest``, the examples' true labels, kept only to measure the accuracy of pseudo-labels (never
            for training); None for a path, whose examples have none.
        source: ``rest`` or the path given.
    """

    items: Sequence[Any]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class PreparedData:
    """The dataset, its split, and the target's preprocessing (and tokenizer, for text)."""

    examples: Labelled
    splits: Splits
    preprocess: dict[str, Any]
    cfg: DataConfig
    processor: Any = None
    _pool: Pool | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def classes(self) -> list[str]:
        return self.examples.classes

    @property
    def modality(self) -> str:
        return str(self.preprocess.get("modality", DEFAULT_MODALITY))

    def items(self, split: str) -> Any:
        """The raw items of a split (paths, arrays, texts...), in split order; a lazy text column stays lazy."""
        return self._subset(getattr(self.splits, split))

    def _subset(self, idx: np.ndarray) -> Any:
        source = self.examples.items
        return source.subset(idx) if hasattr(source, "subset") else [source[int(i)] for i in idx]

    def unlabelled(self) -> Pool | None:
        """The unlabelled pool of ``data.unlabelled`` (read once, then kept), or None when it is not set.

        ``rest``: the examples of the dataset (of ``data.classes``, when set) in none of train, validation and test,
        with their true labels; a path: the items the modality reads there, without labels.
        """
        spec = self.cfg.unlabelled
        if spec is None:
            return None
        if self._pool is None:
            if spec == UNLABELLED_REST:
                idx = self.splits.rest(len(self.examples))
                if not len(idx):
                    sizes = self.splits.sizes()
                    raise DataError(
                        f"data.unlabelled: {UNLABELLED_REST} holds no examples: the {len(self.examples)} examples "
                        f"of '{self.cfg.dataset}' are all in train ({sizes['train']}), validation ({sizes['val']}) "
                        f"or test ({sizes['test']}). Set data.per_class (or lower it) so that some are left over, "
                        "or give a folder or file of unlabelled examples"
                    )
                self._pool = Pool(self._subset(idx), self.examples.labels[idx], UNLABELLED_REST)
            else:
                self._pool = Pool(read_unlabelled(spec, self.modality, self.cfg.text_column), None, spec)
            limit = self.cfg.unlabelled_max
            if limit is not None and len(self._pool) > limit:  # a fixed random subset, kept in pool order
                keep = np.sort(np.random.default_rng(0).permutation(len(self._pool))[:limit])
                items = self._pool.items
                items = items.subset(keep) if hasattr(items, "subset") else [items[int(i)] for i in keep]
                labels = self._pool.labels[keep] if self._pool.labels is not None else None
                self._pool = Pool(items, labels, self._pool.source)
        return self._pool

    def pool_dataset(self, train: bool = False) -> Dataset:
        """The modality's dataset of the pool's items, every label -1 (augmented when ``train``, as ``dataset``)."""
        pool = self.unlabelled()
        if pool is None:
            raise DataError(
                f"data.unlabelled is not set: there is no unlabelled pool; set data.unlabelled: {UNLABELLED_REST} "
                "or a folder or file of unlabelled examples"
            )
        augment = self.cfg.augment if train and self.cfg.augment.enabled else None
        labels = np.full(len(pool), -1, dtype=np.int64)
        return make_dataset(self.modality, pool.items, labels, self.preprocess, self.processor, augment)

    def strong_pool_dataset(self, ops: int = 2, magnitude: int = 10) -> Dataset:
        """The pool's items strongly augmented (FixMatch's strong view), every label -1, in pool order."""
        pool = self.unlabelled()
        if pool is None:
            raise DataError("data.unlabelled is not set: there is no unlabelled pool to augment")
        labels = np.full(len(pool), -1, dtype=np.int64)
        return strong_dataset(self.modality, pool.items, labels, self.preprocess, ops, magnitude)

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
            **({"unlabelled": len(pool)} if (pool := self.unlabelled()) is not None else {}),
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
