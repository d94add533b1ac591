"""Seeded, stratified train/val/test splits, with few-shot ``per_class`` selection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from transferkit.errors import DataError


@dataclass
class Labelled:
    """A labelled dataset of any modality: items (image paths or arrays, texts, audio files...), integer labels,
    class names in label order, and the items skipped as unreadable (each with a reason)."""

    name: str
    items: Sequence[Any]
    labels: np.ndarray
    classes: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)
    modality: str = "image"

    def __len__(self) -> int:
        return len(self.items)

    def select_classes(self, classes: Sequence[str]) -> Labelled:
        """Only the examples of ``classes``, relabelled ``0..len(classes)-1`` in the order given."""
        wanted = [str(c) for c in classes]
        missing = [c for c in wanted if c not in self.classes]
        if missing:
            raise DataError(
                f"data.classes names {missing}, not classes of '{self.name}'; its classes are {self.classes}"
            )
        if len(set(wanted)) != len(wanted):
            raise DataError(f"data.classes lists a class twice: {wanted}")
        old = np.array([self.classes.index(c) for c in wanted])
        idx = np.flatnonzero(np.isin(self.labels, old))
        remap = np.full(len(self.classes), -1, dtype=np.int64)
        remap[old] = np.arange(len(old))
        items = self.items.subset(idx) if hasattr(self.items, "subset") else [self.items[int(i)] for i in idx]
        return Labelled(self.name, items, remap[self.labels[idx]], wanted, self.skipped, self.modality)


@dataclass
class Splits:
    """Index arrays into a ``Labelled``."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def rest(self, n: int) -> np.ndarray:
        """The sorted indices of the ``n`` examples that are in none of train, validation and test."""
        used = np.concatenate([self.train, self.val, self.test]).astype(np.int64)
        if len(used) and (used.min() < 0 or used.max() >= n):
            raise ValueError(f"the splits index examples outside 0..{n - 1}")
        return np.setdiff1d(np.arange(n, dtype=np.int64), used)


def _per_class_counts(labels: np.ndarray, total: int, classes: np.ndarray) -> dict[int, int]:
    """Split ``total`` over classes in proportion to their size (largest remainders)."""
    sizes = np.array([(labels == c).sum() for c in classes], dtype=float)
    exact = sizes / sizes.sum() * total
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts))[: total - counts.sum()]:
        counts[i] += 1
    return {int(c): int(n) for c, n in zip(classes, counts)}


def split_dataset(
    labels: np.ndarray,
    classes: list[str],
    seed: int,
    test_size: float,
    per_class: int | None = None,
    val_per_class: int | None = None,
    val_fraction: float = 0.1,
) -> Splits:
    """Stratified split: the test set first, then validation, then (up to ``per_class``) training examples.

    Args:
        labels: integer label per example.
        classes: class names (for messages).
        seed: the split depends on it alone.
        test_size: a count (>= 1) or a fraction of all examples.
        per_class: keep this many training examples per class (few-shot); all remaining when None.
        val_per_class: validation examples per class; else ``val_fraction`` of the non-test examples.
        val_fraction: used when ``val_per_class`` is None.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    present = np.unique(labels)
    if len(present) < 2:
        named = ", ".join(f"'{classes[i]}'" for i in present) or "none"
        raise DataError(
            f"the data has {len(present)} class ({named}); classification needs at least 2: give the dataset a "
            "folder (or label) per class, or name two or more in data.classes"
        )
    n_test = int(test_size) if test_size >= 1 else round(test_size * len(labels))
    if n_test >= len(labels):
        raise DataError(f"data.test_size={test_size} asks for {n_test} test examples but there are only {len(labels)}")
    test_counts = _per_class_counts(labels, n_test, present)
    train, val, test = [], [], []
    for c in present:
        idx = rng.permutation(np.flatnonzero(labels == c))
        t = test_counts[int(c)]
        test.append(idx[:t])
        rest = idx[t:]
        n_val = val_per_class if val_per_class is not None else max(1, round(val_fraction * len(rest)))
        n_train = per_class if per_class is not None else len(rest) - n_val
        if n_val + n_train > len(rest) or n_train < 1:
            raise DataError(
                f"class '{classes[int(c)]}' has {len(idx)} examples: {t} go to test, leaving {len(rest)} for "
                f"{n_val} validation + {n_train if per_class is not None else 'at least 1'} training. Lower "
                "data.per_class / data.val_per_class / data.test_size, or add examples to this class."
            )
        val.append(rest[:n_val])
        train.append(rest[n_val : n_val + n_train])
    return Splits(np.sort(np.concatenate(train)), np.sort(np.concatenate(val)), np.sort(np.concatenate(test)))
