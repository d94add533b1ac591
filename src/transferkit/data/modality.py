"""The modality registry: everything the pipeline needs to know about a kind of input, in one place.

A modality (``data.images``, ``data.text``, ``data.audio``) registers a ``Modality``: how a dataset path is read,
whether a path holds its kind of data, how the data config adjusts the source's preprocessing, what the data
summary says, how labelled items become a training ``Dataset`` and how raw inputs become one model batch at
prediction time. The pipeline, the engine, ranking and ``predict`` call these hooks and hold no ``if modality``
chains: a new modality registers its own and nothing else changes.

The built-in datasets live here too (``DATASETS``, with the modality each one holds).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from transferkit.data.split import Labelled
from transferkit.errors import DataError, did_you_mean, unusable_path
from transferkit.registry import Registry

DEFAULT_MODALITY = "image"  # what a path holds when no other modality claims it


def _same(preprocess: dict[str, Any], cfg: Any) -> dict[str, Any]:
    return preprocess


def _nothing(preprocess: dict[str, Any], items: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Modality:
    """The hooks of one modality.

    Attributes:
        name: the modality's name, as a source's ``preprocess["modality"]`` gives it.
        dataset: ``(items, labels, preprocess, processor, augment) -> Dataset`` (``augment`` only for training).
        batch: ``(model, inputs) -> x``, one model batch from raw inputs with the model's own preprocessing.
        read: ``(spec, strict=, text_column=, label_column=) -> Labelled`` for a dataset path (None: read as
            the default modality's paths are).
        read_unlabelled: ``(spec, text_column=) -> items`` for a ``data.unlabelled`` path: the pool's items, of the
            kind ``dataset`` takes (None: this modality reads no unlabelled path; only ``rest`` gives it a pool).
        strong: ``(items, labels, preprocess, ops, magnitude) -> Dataset``: the items strongly augmented
            (RandAugment-style, for consistency training such as FixMatch); None: the modality has no such views.
        detect: ``(path, text_column) -> bool``: the path holds this modality's data, judged without reading it.
        adjust: ``(preprocess, data_cfg) -> preprocess``: the data config's changes (image size, token length).
        summary: ``(preprocess, items) -> dict``: what the data summary adds for this modality.
        input_key: what a prediction row calls its input (``file``, ``text``).
        reads_lines: prediction inputs can come one per line of a text file (``predict --file``).
        inputs_help: what prediction takes, for messages.
        task: the task a classifier of this modality does, as ``model.json`` records it.
        int8: how int8 quantization suits its models by default: ``static`` (conv nets: activation ranges calibrated
            on training examples) or ``dynamic`` (Linear-heavy encoders: ranges measured on each batch).
    """

    name: str
    dataset: Callable[[Sequence[Any], np.ndarray, dict[str, Any], Any, Any], Dataset]
    batch: Callable[[Any, list[Any]], Any]
    read: Callable[..., Labelled] | None = None
    read_unlabelled: Callable[..., Sequence[Any]] | None = None
    strong: Callable[[Sequence[Any], np.ndarray, dict[str, Any], int, int], Dataset] | None = None
    detect: Callable[[Path, str], bool] | None = None
    adjust: Callable[[dict[str, Any], Any], dict[str, Any]] = _same
    summary: Callable[[dict[str, Any], Any], dict[str, Any]] = _nothing
    input_key: str = "file"
    reads_lines: bool = False
    inputs_help: str = ""
    task: str = ""
    int8: str = "dynamic"

    def __post_init__(self) -> None:
        if not self.inputs_help:
            object.__setattr__(self, "inputs_help", f"{self.name} files")
        if not self.task:
            object.__setattr__(self, "task", f"{self.name}_classification")


MODALITIES: dict[str, Modality] = {}


def register_modality(
    name: str, dataset: Callable[..., Dataset], batch: Callable[[Any, list[Any]], Any], **hooks: Any
) -> Modality:
    """Register a modality's hooks (see ``Modality``); registering a name twice is an error."""
    if name in MODALITIES:
        raise ValueError(f"modality '{name}' is registered twice")
    MODALITIES[name] = Modality(name, dataset, batch, **hooks)
    return MODALITIES[name]


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


# ----------------------------------------------------------------------------------------------------------------
# Built-in datasets and reading a dataset spec

DATASETS: Registry[Callable[[], Labelled]] = Registry("dataset")
DATASET_MODALITY: dict[str, str] = {}  # the modality of each built-in dataset, known without reading it


def register_dataset(name: str, modality: str, help: str = "") -> Callable[[Callable[[], Labelled]], Callable]:
    """Register a built-in dataset (a function returning its ``Labelled``) and the modality it holds."""
    DATASET_MODALITY[name] = modality
    return DATASETS.register(name, help=help)


def read_dataset(
    spec: str,
    strict: bool = False,
    modality: str = DEFAULT_MODALITY,
    text_column: str = "text",
    label_column: str = "label",
) -> Labelled:
    """A built-in name, or a path read by the modality's reader: for images an image folder or a ``.csv``
    manifest, for text a CSV/JSONL/Parquet file, for audio a folder of recordings (one sub-folder per class).

    ``modality`` is the source's: it says how a file is read (a CSV is an image manifest for an image source and a
    table of texts for a text source), and a built-in dataset of another modality is refused.
    """
    if spec in DATASETS:
        data = DATASETS.get(spec)()
        if data.modality != modality:
            raise DataError(
                f"dataset '{spec}' holds {data.modality} data but the source takes {modality} inputs; "
                f"choose a {data.modality} source or a {modality} dataset (transferkit ls)"
            )
        return data
    reader = get_modality(modality).read or get_modality(DEFAULT_MODALITY).read
    assert reader is not None, f"the default modality '{DEFAULT_MODALITY}' registers a reader"
    return reader(spec, strict=strict, text_column=text_column, label_column=label_column)


def dataset_modality(spec: str, text_column: str = "text") -> str:
    """The modality a dataset spec holds, without reading it: a built-in's own; otherwise the first modality whose
    ``detect`` claims the path (text for JSONL/Parquet files and CSVs with ``text_column``, audio for a folder
    whose first media file is a recording), else images (a folder or a CSV manifest)."""
    if spec in DATASETS:
        return DATASET_MODALITY.get(spec, DEFAULT_MODALITY)
    path = Path(spec).expanduser()
    for m in MODALITIES.values():
        if m.detect is not None and m.detect(path, text_column):
            return m.name
    return DEFAULT_MODALITY


def check_dataset_spec(spec: str) -> list[str]:
    """Problems of a dataset spec found without reading it (a recipe check): unknown names, missing paths."""
    if spec in DATASETS:
        return []
    try:
        path = Path(spec).expanduser()
        if path.is_dir():
            return _class_folder_problems(path)
        if (path.is_file() and dataset_modality(spec) != DEFAULT_MODALITY) or (
            path.is_file() and path.suffix.lower() == ".csv"
        ):
            return []
        exists = path.exists()
    except (OSError, RuntimeError) as e:  # a name too long for a path, ~user of no such user
        return [unusable_path(spec, e, f"a built-in dataset ({', '.join(DATASETS)}) or an existing folder or file")]
    if exists:
        return [f"'{spec}' is neither an image folder, a .csv manifest nor a CSV/JSONL/Parquet file of texts"]
    return [
        f"'{spec}' is not a built-in dataset ({', '.join(DATASETS)}) and no such folder or file exists."
        f"{did_you_mean(spec, DATASETS)}"
    ]


def check_classes_spec(spec: str, classes: list[str], label_column: str = "label") -> list[str]:
    """``data.classes`` naming classes the dataset does not have, found without reading its examples: the class
    sub-folders of a folder, the label column of a CSV file (an image manifest's ``label``, a text table's
    ``label_column``). Built-in datasets and other files are checked when they are read."""
    try:
        path = Path(spec).expanduser()
        if path.is_dir():
            have = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        elif path.is_file() and path.suffix.lower() == ".csv":
            have = _csv_labels(path, label_column)
        else:
            return []
    except (OSError, RuntimeError, UnicodeDecodeError, csv.Error):
        return []  # the dataset check, or the reader, names the problem with the path
    if not have:
        return []
    missing = [str(c) for c in classes if str(c) not in have]
    if not missing:
        return []
    shown = ", ".join(have[:20]) + (f" ... ({len(have)} in all)" if len(have) > 20 else "")
    hint = "".join(did_you_mean(m, have) for m in missing[:3])
    return [
        f"names {missing}, not classes of '{spec}'.{hint} Its classes are: {shown}; list only these (or leave "
        "data.classes unset to keep every class)"
    ]


def _csv_labels(path: Path, label_column: str) -> list[str]:
    """The distinct values of a CSV's label column (an image manifest's 'label', else ``label_column``), sorted."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        names = [c.strip() for c in reader.fieldnames or []]
        column = "label" if "path" in names and "label" in names else label_column
        if column not in names:
            return []
        reader.fieldnames = names
        return sorted({(row.get(column) or "").strip() for row in reader} - {""})


def _class_folder_problems(root: Path) -> list[str]:
    """A folder dataset with a single class folder (``root/CLASS/file``) cannot train a classifier: said at
    validation, not after the run has started. Only the first level is looked at (cheap)."""
    try:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    if not classes:
        files = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
        found = f"it holds {len(files)} file(s) directly, e.g. '{sorted(files)[0]}'" if files else "it is empty"
        return [
            f"'{root}' has no class sub-folders ({found}); expected {root}/CLASS_NAME/FILE: make one sub-folder per "
            "class (at least 2) and put the examples of that class in it"
        ]
    if len(classes) != 1:
        return []  # two or more: a classification
    return [
        f"'{root}' holds one class folder ('{classes[0]}'): classification needs at least 2, one folder per class "
        "(root/CLASS/file)"
    ]


def repeated_columns(header: list[str]) -> str:
    """'column 'label' twice (columns 2 and 3)' for each name a header repeats, joined; '' when none repeats.

    Readers of CSV keep one of two equal names without a word (csv.DictReader the last, pandas renames the second
    'label.1'), so the file's author never learns which column was read.
    """
    where: dict[str, list[int]] = {}
    for i, name in enumerate(header):
        where.setdefault(name, []).append(i + 1)
    return "; ".join(
        f"column '{name}' {len(cols)} times (columns {', '.join(map(str, cols))})"
        for name, cols in where.items()
        if len(cols) > 1
    )


# ----------------------------------------------------------------------------------------------------------------
# The unlabelled pool (``data.unlabelled``)

UNLABELLED_REST = "rest"  # data.unlabelled: the dataset's examples outside the labelled splits


def unlabelled_path(spec: str, what: str) -> Path:
    """The existing path of a ``data.unlabelled`` spec; ``what`` (e.g. "a folder of images") is what the modality
    expects there, for the message."""
    path = Path(spec).expanduser()
    if not spec.strip() or not path.exists():
        raise DataError(
            f"data.unlabelled: '{spec}' does not exist; expected {what}. Fix the path, or set data.unlabelled: "
            f"{UNLABELLED_REST} to use the dataset's examples outside the labelled splits"
        )
    return path


def unlabelled_files(spec: str, extensions: Sequence[str], kind: str) -> list[Path]:
    """The files with ``extensions`` under the folder ``spec`` (recursively, hidden files and folders left out),
    sorted; ``kind`` names them in messages ("images", "audio recordings")."""
    what = f"a folder of {kind} ({', '.join(extensions)}), searched recursively"
    root = unlabelled_path(spec, what)
    if not root.is_dir():
        raise DataError(
            f"data.unlabelled: '{root}' is a file; expected {what}. Set data.unlabelled to the folder that holds them"
        )
    files = sorted(
        f
        for f in root.rglob("*")
        if f.is_file()
        and f.suffix.lower() in extensions
        and not any(part.startswith(".") for part in f.relative_to(root).parts)
    )
    if not files:
        raise DataError(
            f"data.unlabelled: folder '{root}' holds no {kind} ({', '.join(extensions)}) in it or its sub-folders; "
            f"add {kind} there or point data.unlabelled at the folder that holds them"
        )
    return files


def strong_dataset(
    modality: str, items: Sequence[Any], labels: np.ndarray, preprocess: dict[str, Any], ops: int, magnitude: int
) -> Dataset:
    """Strongly augmented views of ``items`` (consistency training), by the modality's ``strong`` hook."""
    hook = get_modality(modality).strong
    if hook is None:
        raise DataError(
            f"consistency training (fixmatch) needs strong augmentations of the inputs; transferkit has none for "
            f"{modality} data (images have them): use kd, dkd or pseudo_label with the unlabelled pool instead"
        )
    return hook(items, labels, preprocess, ops, magnitude)


def read_unlabelled(spec: str, modality: str = DEFAULT_MODALITY, text_column: str = "text") -> Sequence[Any]:
    """The items of an unlabelled pool at a path, read by the modality's ``read_unlabelled`` (for images a folder,
    for audio a folder of recordings, for text a ``.txt`` file or a CSV/JSONL/Parquet file); ``rest`` is not a path
    (``PreparedData.unlabelled`` takes it from the splits)."""
    reader = get_modality(modality).read_unlabelled
    if reader is None:
        raise DataError(
            f"data.unlabelled: {modality} data reads no unlabelled path ('{spec}'); set data.unlabelled: "
            f"{UNLABELLED_REST} to use the dataset's examples outside the labelled splits"
        )
    return reader(spec, text_column=text_column)


def check_unlabelled_spec(spec: str, per_class: int | None) -> list[str]:
    """Problems of a ``data.unlabelled`` spec found without reading it (a recipe check): a path that does not exist;
    ``rest`` without ``data.per_class`` (every example outside the test split is then labelled: the rest is empty)."""
    if spec == UNLABELLED_REST:
        if per_class is None:
            return [
                f"'{UNLABELLED_REST}' is empty without data.per_class: every example outside the test split is "
                "then in train or validation. Set data.per_class (labelled training examples kept per class), or "
                "give a folder or file of unlabelled examples"
            ]
        return []
    try:
        if spec.strip() and Path(spec).expanduser().exists():
            return []
    except (OSError, RuntimeError) as e:  # a name too long for a path, ~user of no such user
        return [unusable_path(spec, e, f"'{UNLABELLED_REST}' or an existing folder or file")]
    return [
        f"'{spec}' is neither '{UNLABELLED_REST}' (the dataset's examples outside the labelled splits) nor an "
        f"existing folder or file.{did_you_mean(spec, [UNLABELLED_REST])} Fix the path or set data.unlabelled: "
        f"{UNLABELLED_REST}"
    ]
