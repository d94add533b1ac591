"""The tensor input path for images: JPEG decode with ``torchvision.io.decode_jpeg`` (nvjpeg on a GPU), batched
augmentation as tensor operations, and a memory-mapped uint8 cache of decoded, resized images reused across epochs.

Why: on a GPU the PIL path (decode, crop and resize per image in DataLoader workers) caps training at the speed of
the CPU cores (issue 20: ~1,300 img/s with 8-15 workers against ~4,700 img/s the GPU trains at). Here the decode
and every pixel operation run on the training device.

The semantics are those of ``data.images.build_transform``: ``RandomResizedCrop`` (or a plain resize of the whole
image), ``RandomHorizontalFlip``, ``ToTensor`` (uint8 / 255) and ``Normalize``, in that order. The random numbers
are drawn in the order the PIL path draws them (per image: the crop box, then the flip) with the rule of
torchvision's ``RandomResizedCrop.get_params``, from torch's global generator unless another is given, so the same
seed gives the same crops and flips as the PIL path and a resumed run (which restores torch's generator) continues
with the same draws. Pixels differ from PIL's by resampling only (tensor antialiased resize vs PIL's filter).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F2

from transferkit.data.images import load_image
from transferkit.errors import DataError
from transferkit.io import write_json

_JPEG_MAGIC = b"\xff\xd8\xff"
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range, as build_transform uses it


# ---------------------------------------------------------------------------------------------------------------
# random parameters: the rule of torchvision's RandomResizedCrop.get_params and RandomHorizontalFlip, drawn in order


def crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = DEFAULT_RATIO,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """The ``(top, left, h, w)`` box ``RandomResizedCrop.get_params`` draws for an image of ``height`` x ``width``.

    The same draws in the same order (area, log aspect ratio, top, left; ten tries, then the centre-crop fallback),
    so a generator in the same state gives the same box as torchvision does from the global generator.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).
        generator: where the numbers come from; None is torch's global generator, as the PIL path uses.
    """
    area = height * width
    lo, hi = (float(v) for v in torch.log(torch.tensor(ratio)))  # float32 logs, as torchvision's
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(lo, hi, generator=generator)).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class TensorAugment:
    """The batched tensor equivalent of a ``build_transform`` pipeline made only of supported steps.

    Attributes:
        size: output side in pixels (square, as ``build_transform``).
        mean: normalisation mean per channel.
        std: normalisation std per channel.
        scale: ``RandomResizedCrop`` area range; None resizes the whole image (no random crop).
        ratio: ``RandomResizedCrop`` aspect-ratio range.
        hflip: probability of a horizontal flip (0: no flip step, and nothing drawn for it).
        interpolation: the resize's interpolation mode.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] = DEFAULT_RATIO
    hflip: float = 0.0
    interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR

    @property
    def random(self) -> bool:
        return self.scale is not None or self.hflip > 0

    def draw(self, height: int, width: int, generator: torch.Generator | None = None) -> tuple[tuple[int, ...], bool]:
        """One image's crop box and flip, drawn in the PIL path's order (crop, then flip)."""
        box = crop_box(height, width, self.scale, self.ratio, generator) if self.scale else (0, 0, height, width)
        flip = bool(torch.rand(1, generator=generator) < self.hflip) if self.hflip > 0 else False
        return box, flip

    def resize(self, image: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
        """The uint8 image cropped to ``box`` and resized to ``size`` x ``size`` (antialiased, rounded to uint8 as
        PIL's resize is), on the image's device."""
        top, left, h, w = box
        if (top, left, h, w) == (0, 0, *image.shape[-2:]) and tuple(image.shape[-2:]) == (self.size, self.size):
            return image
        return F2.resized_crop(image, top, left, h, w, [self.size, self.size], self.interpolation, antialias=True)

    def normalise(self, batch: torch.Tensor, flips: Sequence[bool]) -> torch.Tensor:
        """A uint8 ``(B, C, size, size)`` batch flipped where ``flips`` says, as floats in [0, 1], normalised."""
        if any(flips):
            mask = torch.tensor(flips, device=batch.device).view(-1, 1, 1, 1)
            batch = torch.where(mask, batch.flip(-1), batch)
        x = batch.to(torch.get_default_dtype()).div(255)  # ToTensor's scaling, to the bit
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def __call__(self, images: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """The float batch of ``images`` (uint8 ``(C, H, W)`` tensors of any sizes, on one device)."""
        crops, flips = [], []
        for image in images:
            box, flip = self.draw(int(image.shape[-2]), int(image.shape[-1]), generator)
            crops.append(self.resize(image, box))
            flips.append(flip)
        return self.normalise(torch.stack(crops), flips)


_STEP_KEYS = {
    "RandomAffine": "data.augment.rotation / data.augment.translate",
    "ColorJitter": "data.augment.color_jitter",
}


def tensor_augment(transform: Callable) -> tuple[TensorAugment | None, str]:
    """The ``TensorAugment`` equal to a ``build_transform`` pipeline, or None and the reason it has none.

    Read from the pipeline's steps rather than from the recipe, so what runs on the tensors is what the PIL path
    would have run, whatever built it.
    """
    steps = getattr(transform, "transforms", None)
    if steps is None:
        return None, f"the transform is {type(transform).__name__}, not a torchvision Compose of known steps"
    found: dict[str, Any] = {}
    for step in steps:
        name = type(step).__name__
        if isinstance(step, T.RandomResizedCrop):
            found.update(size=step.size, scale=tuple(step.scale), ratio=tuple(step.ratio), interp=step.interpolation)
        elif isinstance(step, T.Resize):
            sides = step.size if isinstance(step.size, (list, tuple)) else (step.size, step.size)
            found.update(size=tuple(sides), interp=step.interpolation)
        elif isinstance(step, T.RandomHorizontalFlip):
            found["hflip"] = float(step.p)
        elif isinstance(step, T.Normalize):
            found.update(mean=tuple(float(m) for m in step.mean), std=tuple(float(s) for s in step.std))
        elif not isinstance(step, T.ToTensor):
            key = _STEP_KEYS.get(name, "")
            return None, f"augmentation {name}{f' ({key})' if key else ''} has no tensor version on this path"
    size = found.get("size")
    if size is None or "mean" not in found or len(set(size)) != 1:
        return None, f"the transform does not resize to a square and normalise (found {sorted(found)})"
    return (
        TensorAugment(
            size=int(size[0]),
            mean=found["mean"],
            std=found["std"],
            scale=found.get("scale"),
            ratio=found.get("ratio", DEFAULT_RATIO),
            hflip=found.get("hflip", 0.0),
            interpolation=found["interp"],
        ),
        "",
    )


# ---------------------------------------------------------------------------------------------------------------
# decode


def _read_bytes(item: Any) -> bytes | None:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, Path)):
        return Path(item).read_bytes()
    return None  # an array: not a file


def decode_jpegs(items: Sequence[Any], device: torch.device | str = "cpu", channels: int = 3) -> list[torch.Tensor]:
    """Images as uint8 ``(C, H, W)`` tensors on ``device``: JPEGs in one batched ``decode_jpeg`` call (nvjpeg on a
    GPU, libjpeg-turbo on a CPU), everything else (PNG, arrays, a JPEG libjpeg refuses) through PIL's
    ``load_image``, so every file the PIL path reads is read here too, in the same channel mode.

    EXIF orientation is not applied, as ``load_image`` does not apply it: both paths see the same pixels.

    Args:
        items: paths, encoded bytes or uint8 arrays.
        device: where the decoded tensors live.
        channels: 1 (grey) or 3 (RGB), the source's input channels.
    """
    device = torch.device(device)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    out: list[torch.Tensor | None] = [None] * len(items)
    jpegs: list[int] = []
    encoded: list[torch.Tensor] = []
    for i, item in enumerate(items):
        data = _read_bytes(item)
        if data is not None and data.startswith(_JPEG_MAGIC):
            jpegs.append(i)
            encoded.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    if encoded:
        try:
            with warnings.catch_warnings():  # torchvision 0.29 warns on every call that TorchCodec will replace it
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = decode_jpeg(encoded, mode=mode, device=device)
        except RuntimeError:  # one file libjpeg refuses (CMYK, arithmetic coding...) fails the batch: PIL decides
            decoded = [None] * len(encoded)
        for i, image in zip(jpegs, decoded):
            out[i] = image
    for i, item in enumerate(items):
        if out[i] is None:
            source = Path(item) if isinstance(item, str) else item
            if isinstance(source, (bytes, bytearray, memoryview)):
                raise DataError("image bytes that are not a JPEG libjpeg decodes cannot be read; give a path")
            array = np.asarray(load_image(source, channels))
            tensor = torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)
            out[i] = tensor.contiguous().to(device)
    return [t for t in out if t is not None]


# ---------------------------------------------------------------------------------------------------------------
# the uint8 cache


def _fingerprint(items: Sequence[Any], channels: int, side: int, square: bool) -> str:
    """What the cache's contents depend on: the items (paths with size and mtime, or array bytes) and the sizes."""
    h = hashlib.sha256(f"{channels}:{side}:{square}:{len(items)}".encode())
    for item in items:
        if isinstance(item, (str, Path)):
            st = Path(item).stat()
            h.update(f"{Path(item).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(np.ascontiguousarray(item).tobytes())
    return h.hexdigest()[:16]


class Uint8Cache:
    """Images decoded once, resized, and kept as uint8 in one memory-mapped file, for training over many epochs.

    ``side`` is the short side the images are resized to, keeping their aspect ratio (``square=False``, for a
    random crop to cut from), or the model's size when ``square`` (no random crop: the cached image is the resized
    image the PIL path would have made). The file ``images-KEY.u8`` holds the images one after another and
    ``images-KEY.json`` their offsets and shapes; KEY fingerprints the items and sizes, so a later epoch or a
    later run over the same files maps the file again without decoding anything (``decoded`` counts decodes).

    Args:
        folder: where the files live (the run's cache folder).
        items: paths or uint8 arrays.
        side: the cached short side (or square side) in pixels.
        square: resize to ``side`` x ``side`` instead of keeping the aspect ratio.
        channels: 1 or 3.
        device: where decoding and resizing run; the cache itself is on the CPU.
        chunk: images decoded per ``decode_jpegs`` call.
        decode: the decoder (tests count its calls).
    """

    def __init__(
        self,
        folder: str | Path,
        items: Sequence[Any],
        side: int,
        square: bool,
        channels: int = 3,
        device: torch.device | str = "cpu",
        chunk: int = 64,
        decode: Callable[..., list[torch.Tensor]] = decode_jpegs,
    ):
        self.folder = Path(folder)
        self.side, self.square, self.channels = side, square, channels
        self.decoded = 0
        key = _fingerprint(items, channels, side, square)
        self.data_path = self.folder / f"images-{key}.u8"
        self.index_path = self.folder / f"images-{key}.json"
        if self.index_path.is_file() and self.data_path.is_file():
            index = json.loads(self.index_path.read_text())
        else:
            index = self._build(items, torch.device(device), chunk, decode)
        self.offsets = np.asarray(index["offsets"], dtype=np.int64)
        self.shapes = [tuple(s) for s in index["shapes"]]
        self._data = np.memmap(self.data_path, dtype=np.uint8, mode="r", shape=(int(index["bytes"]),))

    def _resized(self, image: torch.Tensor) -> torch.Tensor:
        if self.square:
            return F2.resize(image, [self.side, self.side], antialias=True)
        h, w = image.shape[-2:]
        if min(h, w) <= self.side:  # never upscale: a crop of the original is at least as sharp
            return image
        return F2.resize(image, self.side, antialias=True)  # an int: the short side, aspect ratio kept

    def _build(self, items: Sequence[Any], device: torch.device, chunk: int, decode: Callable) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        shapes: list[tuple[int, ...]] = []
        offsets: list[int] = []
        total = 0
        part = self.data_path.with_name(self.data_path.name + ".part")
        with part.open("wb") as f:  # written in order, then renamed: a killed build leaves no valid-looking cache
            for start in range(0, len(items), chunk):
                images = decode(items[start : start + chunk], device, self.channels)
                self.decoded += len(images)
                for image in images:
                    small = self._resized(image).contiguous().cpu()
                    offsets.append(total)
                    shapes.append(tuple(small.shape))
                    f.write(small.numpy().tobytes())
                    total += small.numel()
        part.replace(self.data_path)
        index = {"offsets": offsets, "shapes": shapes, "bytes": total, "side": self.side, "square": self.square}
        write_json(self.index_path, index)  # last: its presence says the data file is complete
        return index

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Image ``i`` as a uint8 ``(C, H, W)`` CPU tensor (a copy: the map is read-only)."""
        shape = self.shapes[i]
        start = int(self.offsets[i])
        return torch.from_numpy(np.array(self._data[start : start + int(np.prod(shape))]).reshape(shape))


# ---------------------------------------------------------------------------------------------------------------
# the dataset and its batches


class TensorImageDataset(Dataset):
    """Images for training, loaded a batch at a time as normalised float tensors on ``device``.

    ``fit`` asks for whole batches (``batches``), so decoding and augmentation run once per batch on the device;
    ``__getitem__`` gives single examples for code that iterates a dataset (as ``ImageDataset`` does).

    Args:
        items: paths or uint8 arrays.
        labels: integer labels.
        augment: the tensor pipeline (``tensor_augment`` of the PIL transform).
        channels: 1 or 3.
        device: where decoding and augmentation run and batches are put.
        cache: decoded, resized images (None: decode every batch).
        generator: random draws; None is torch's global generator (what the PIL path and a resume use).
    """

    def __init__(
        self,
        items: Sequence[Any],
        labels: np.ndarray | torch.Tensor,
        augment: TensorAugment,
        channels: int = 3,
        device: torch.device | str = "cpu",
        cache: Uint8Cache | None = None,
        generator: torch.Generator | None = None,
    ):
        self.items = items
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.augment = augment
        self.channels = channels
        self.device = torch.device(device)
        self.cache = cache
        self.generator = generator

    def __len__(self) -> int:
        return len(self.items)

    def images(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The uint8 images of ``indices`` on the device, from the cache or decoded now."""
        if self.cache is not None:
            return [self.cache[int(i)].to(self.device, non_blocking=True) for i in indices]
        return decode_jpegs([self.items[int(i)] for i in indices], self.device, self.channels)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.augment(self.images(indices), self.generator)
        return x, self.labels[torch.as_tensor(list(indices), dtype=torch.long)].to(self.device)

    def batches(self, batch_indices: Sequence[Sequence[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``batch_indices`` in order (what ``fit`` iterates instead of a DataLoader)."""
        for indices in batch_indices:
            yield self.batch(indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch([i])
        return x[0], y[0]


CACHE_LIMIT_BYTES = 8 * 1024**3  # few-shot sized: the cache is used when its images take at most this much


def cache_side(augment: TensorAugment) -> tuple[int, bool]:
    """The cached short side and whether it is square: the model's size when nothing crops; otherwise 8/7 of it
    (256 for 224, ImageNet's habit), enough for a crop of any scale to be resized down rather than up."""
    if augment.scale is None:
        return augment.size, True
    return math.ceil(augment.size * 8 / 7), False


def choose_input(
    dataset: Dataset, requested: str, device: torch.device | str, cache_dir: Path | None = None
) -> tuple[Dataset, dict[str, Any]]:
    """The training dataset ``fit`` iterates and the record of the input path chosen (``data.input``).

    ``auto`` takes the tensor path only on a CUDA device and only for an ``ImageDataset`` whose transform has a
    tensor equivalent; otherwise the dataset is returned as it is (the PIL path, the CPU default), with the reason.
    ``gpu`` takes the tensor path on any device (on a CPU it runs on CPU tensors: what CI can test) and refuses an
    augmentation it cannot reproduce rather than silently dropping it.

    Args:
        dataset: the training dataset built by the modality.
        requested: ``auto``, ``pil`` or ``gpu``.
        device: the training device.
        cache_dir: where the uint8 cache may live (the run's ``cache/images``); None decodes every batch.
    """
    from transferkit.data.images import ImageDataset

    device = torch.device(device)
    if requested == "pil":
        return dataset, {"path": "pil", "reason": "data.input: pil"}
    if not isinstance(dataset, ImageDataset):
        if requested == "gpu":
            raise DataError(
                f"data.input: gpu applies to image folders, manifests and built-in image datasets; this training "
                f"set is a {type(dataset).__name__}. Set data.input: auto (or pil)"
            )
        return dataset, {"path": "pil", "reason": f"not an image dataset ({type(dataset).__name__})"}
    if requested == "auto" and device.type != "cuda":
        return dataset, {"path": "pil", "reason": f"the device is {device.type}: the PIL path is the CPU default"}
    augment, why = tensor_augment(dataset.transform)
    if augment is None:
        if requested == "gpu":
            raise DataError(
                f"data.input: gpu cannot reproduce this training transform: {why}. Remove that augmentation "
                "(only random_resized_crop and hflip have tensor versions) or set data.input: auto or pil"
            )
        return dataset, {"path": "pil", "reason": why}
    side, square = cache_side(augment)
    estimate = len(dataset) * dataset.channels * side * side * (1 if square else 2)  # 4:3 images cut to a short side
    cache = None
    if cache_dir is not None and estimate <= CACHE_LIMIT_BYTES:
        t = time.perf_counter()
        cache = Uint8Cache(cache_dir, dataset.items, side, square, dataset.channels, device)
        build_s = time.perf_counter() - t  # decoding every image once (or mapping the file of an earlier run)
    record: dict[str, Any] = {
        "path": "gpu",
        "reason": "data.input: gpu" if requested == "gpu" else "a CUDA device and crop/flip/normalise only",
        "cache": None
        if cache is None
        else {
            "file": str(cache.data_path),
            "side": side,
            "square": square,
            "decoded": cache.decoded,
            "build_s": round(build_s, 3),
        },
    }
    if cache is None:
        record["no_cache"] = "no run folder" if cache_dir is None else f"over {CACHE_LIMIT_BYTES:,} bytes"
    return TensorImageDataset(dataset.items, dataset.labels, augment, dataset.channels, device, cache), record
