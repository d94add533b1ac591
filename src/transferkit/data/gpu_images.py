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
with the same draws; from the uint8 cache too, where the boxes are drawn on the original sizes and cut from the
cached copies at the same place. Pixels differ from PIL's by resampling only: on a CPU the per-image antialiased
``resized_crop``, on a GPU one batched ``roi_align`` per batch (``resize_boxes``: a triangle filter built from two
box filters, about one uint8 level from the antialiased resize). The next batch is loaded (decoded or read from
the cache, copied to the device) in a background thread, on a GPU on a side stream, while the draws stay where the
PIL path makes them.

When the training set takes this path, ``fit`` validates on it too (``choose_eval_input``): the evaluation transform's
plain resize, from a square uint8 cache at the model's size, a batch per ``DataLoader`` fetch (``__getitems__``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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


TENT_FROM = 1.5  # downscale factor from which resize_boxes uses the two-stage (tent) filter: see resize_boxes
_TENT = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8  # the triangle filter's weights over four half-bins (see resize_boxes)


def _as_float_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """The images as one float ``(B, C, H, W)`` tensor; smaller ones padded by repeating their last row and column,
    so a bilinear sample near their edge reads their edge pixel (as a per-image resize clamps), never a neighbour's
    zeros."""
    if len({tuple(im.shape) for im in images}) == 1:
        return torch.stack(list(images)).float()
    height = max(int(im.shape[-2]) for im in images)
    width = max(int(im.shape[-1]) for im in images)
    padded = [
        torch.nn.functional.pad(im.float(), (0, width - im.shape[-1], 0, height - im.shape[-2]), mode="replicate")
        for im in images
    ]
    return torch.stack(padded)


def resize_boxes(
    images: Sequence[torch.Tensor], boxes: Sequence[Sequence[float]], size: int, tent_from: float = TENT_FROM
) -> torch.Tensor:
    """The ``boxes`` (``(top, left, h, w)``, fractional allowed) of ``images`` resized to ``size`` x ``size``, for the
    whole batch at once: a uint8 ``(B, C, size, size)`` tensor.

    Why: a per-image ``resized_crop`` is several kernel launches per image, which on a GPU costs more than the
    pixels. ``torchvision.ops.roi_align`` (``aligned=True``: pixel ``i`` covers ``[i, i + 1)``, as a resize's
    coordinates) cuts and resamples every box in one call. Its adaptive sampling (``sampling_ratio=0``) averages
    ``ceil(h / size) x ceil(w / size)`` bilinear samples per output pixel: a box filter as wide as an output pixel.
    The antialiased resize of torchvision (and PIL's bilinear) weighs a triangle twice that wide; for boxes shrunk
    by ``tent_from`` or more the triangle is built from two box filters: ``roi_align`` to twice the size (half-bins),
    then the weights 1, 3, 3, 1 (the triangle's integral over its four half-bins) with stride 2 in one grouped
    convolution. That halves the distance to the antialiased reference when shrinking by 2 or more (mean 0.9-1.4
    uint8 levels against 1.8-3.4 for the box alone on noisy images, ``tests/unit/test_gpu_images.py``); below
    ``tent_from`` it blurs what a bilinear resize keeps, so those boxes take the single stage. The result is rounded
    to uint8, as the per-image path's resize is.

    Args:
        images: uint8 ``(C, H, W)`` tensors on one device, any sizes.
        boxes: one ``(top, left, h, w)`` per image, in that image's pixels.
        size: the output side.
        tent_from: the smaller of a box's two shrink factors from which its pixels get the triangle filter.
    """
    from torchvision.ops import roi_align

    x = _as_float_batch(images)
    # the boxes and the choice of filter stay on the CPU: no device synchronisation to decide what to launch
    rois = torch.tensor([[k, left, top, left + w, top + h] for k, (top, left, h, w) in enumerate(boxes)])
    tent = torch.minimum(rois[:, 4] - rois[:, 2], rois[:, 3] - rois[:, 1]) / size >= tent_from
    out = torch.empty(len(boxes), x.shape[1], size, size, dtype=x.dtype, device=x.device)
    for use_tent in (False, True):
        chosen = tent if use_tent else ~tent
        if not bool(chosen.any()):
            continue
        picked = rois[chosen].to(x)
        if use_tent:
            half = roi_align(x, picked, (2 * size, 2 * size), 1.0, 0, aligned=True)
            half = torch.nn.functional.pad(half, (1, 1, 1, 1), mode="replicate")  # the box's edge, as at image edges
            weights = (_TENT[:, None] * _TENT[None, :]).to(x).expand(x.shape[1], 1, 4, 4)
            resized = torch.nn.functional.conv2d(half, weights, stride=2, groups=x.shape[1])
        else:
            resized = roi_align(x, picked, (size, size), 1.0, 0, aligned=True)
        if bool(chosen.all()):
            out = resized
        else:
            out[chosen.to(x.device)] = resized
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _scaled(box: Sequence[int], source: Sequence[int], shape: Sequence[int]) -> tuple[float, float, float, float]:
    """``box`` drawn on an image of ``source`` (h, w) pixels, in the pixels of its copy of ``shape`` (cached)."""
    sy, sx = shape[-2] / source[0], shape[-1] / source[1]
    top, left, h, w = box
    return top * sy, left * sx, h * sy, w * sx


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
        batched: crop and resize the batch in one ``resize_boxes`` call (True) or per image with
            ``resized_crop`` (False); None chooses by device: batched on a GPU, where a launch per image costs
            more than the pixels, per image on a CPU, where launches cost nothing and ``resized_crop``'s uint8
            kernels beat ``roi_align`` on floats (64 images 500x375 to 224 on one core: 119 ms per image against
            618 ms batched, ``bench/gpu.py``'s ``augment_speed``).
        channels_last: give the batch in channels-last layout (for a model whose convolutions run channels-last).
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] = DEFAULT_RATIO
    hflip: float = 0.0
    interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR
    batched: bool | None = None
    channels_last: bool = False

    @property
    def random(self) -> bool:
        return self.scale is not None or self.hflip > 0

    def draw(self, height: int, width: int, generator: torch.Generator | None = None) -> tuple[tuple[int, ...], bool]:
        """One image's crop box and flip, drawn in the PIL path's order (crop, then flip)."""
        box = crop_box(height, width, self.scale, self.ratio, generator) if self.scale else (0, 0, height, width)
        flip = bool(torch.rand(1, generator=generator) < self.hflip) if self.hflip > 0 else False
        return box, flip

    def uses_batched(self, device: torch.device) -> bool:
        """Whether the crop and resize run as one batched call on ``device`` (see ``batched``)."""
        return self.batched if self.batched is not None else device.type == "cuda"

    def resize(self, image: torch.Tensor, box: Sequence[float]) -> torch.Tensor:
        """The uint8 image cropped to ``box`` and resized to ``size`` x ``size`` (antialiased, rounded to uint8 as
        PIL's resize is), on the image's device. A fractional box (a crop drawn on the original image, mapped onto
        its cached copy) is rounded to whole pixels: ``resized_crop`` cuts whole pixels."""
        top, left, h, w = (round(v) for v in box)
        if (top, left, h, w) == (0, 0, *image.shape[-2:]) and tuple(image.shape[-2:]) == (self.size, self.size):
            return image
        return F2.resized_crop(image, top, left, h, w, [self.size, self.size], self.interpolation, antialias=True)

    def normalise(self, batch: torch.Tensor, flips: Sequence[bool]) -> torch.Tensor:
        """A uint8 ``(B, C, size, size)`` batch flipped where ``flips`` says, as floats in [0, 1], normalised."""
        if any(flips):
            mask = torch.tensor(flips, device=batch.device).view(-1, 1, 1, 1)
            batch = torch.where(mask, batch.flip(-1), batch)
        if self.channels_last:  # before the float copy: the layout change moves a quarter of the bytes
            batch = batch.contiguous(memory_format=torch.channels_last)
        x = batch.to(torch.get_default_dtype()).div(255)  # ToTensor's scaling, to the bit; keeps the layout
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def __call__(
        self,
        images: Sequence[torch.Tensor],
        generator: torch.Generator | None = None,
        sources: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """The float batch of ``images`` (uint8 ``(C, H, W)`` tensors of any sizes, on one device).

        Args:
            images: the images to augment.
            generator: random draws; None is torch's global generator.
            sources: each image's original ``(h, w)`` when ``images`` are resized copies (the uint8 cache): the
                boxes are drawn on the original size, as the PIL path draws them, and cut from the copy at the
                same place, so the crops are those of the PIL path for the same seed. None: the images' own sizes.
        """
        boxes: list[tuple[float, ...]] = []
        flips: list[bool] = []
        for k, image in enumerate(images):
            shape = tuple(int(v) for v in image.shape[-2:])
            source = tuple(sources[k]) if sources is not None else shape
            box, flip = self.draw(source[0], source[1], generator)
            boxes.append(_scaled(box, source, shape) if source != shape else tuple(float(v) for v in box))
            flips.append(flip)
        if not self.random and all(tuple(im.shape[-2:]) == (self.size, self.size) for im in images):
            crops = torch.stack(list(images))  # already the model's size (the square cache, evaluation): no resize
        elif images and self.uses_batched(images[0].device):
            crops = resize_boxes(images, boxes, self.size)
        else:
            crops = torch.stack([self.resize(image, box) for image, box in zip(images, boxes)])
        return self.normalise(crops, flips)


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


def _fingerprint(
    items: Sequence[Any],
    channels: int,
    side: int,
    square: bool,
    interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR,
) -> str:
    """What the cache's contents depend on: the items (paths with size and mtime, or array bytes), the sizes and
    the resize's filter (named only when it is not bilinear, so the bilinear caches of earlier runs keep their key)."""
    # v2: the index holds each image's original size (the boxes are drawn on it); v1 files are rebuilt
    filt = "" if interpolation == T.InterpolationMode.BILINEAR else f":{interpolation.value}"
    h = hashlib.sha256(f"v2:{channels}:{side}:{square}{filt}:{len(items)}".encode())
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
    ``images-KEY.json`` their offsets, shapes and original sizes (``sources``: random crops are drawn on the
    original size, as the PIL path draws them, then cut from the cached copy at the same place); KEY fingerprints
    the items and sizes, so a later epoch or a later run over the same files maps the file again without decoding
    anything (``decoded`` counts decodes).

    Args:
        folder: where the files live (the run's cache folder).
        items: paths or uint8 arrays.
        side: the cached short side (or square side) in pixels.
        square: resize to ``side`` x ``side`` instead of keeping the aspect ratio.
        channels: 1 or 3.
        device: where decoding and resizing run; the cache itself is on the CPU.
        chunk: images decoded per ``decode_jpegs`` call.
        decode: the decoder (tests count its calls).
        interpolation: the resize's filter. For a ``square`` cache it is the filter of the pipeline's own resize
            (a bicubic source's images cached with a bilinear resize would not be the images the PIL path sees);
            ``choose_input`` keeps bilinear for the short-side copies of a random-crop cache, which are resized
            again after the crop.
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
        interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR,
    ):
        self.folder = Path(folder)
        self.side, self.square, self.channels = side, square, channels
        self.interpolation = interpolation
        self.decoded = 0
        key = _fingerprint(items, channels, side, square, interpolation)
        self.data_path = self.folder / f"images-{key}.u8"
        self.index_path = self.folder / f"images-{key}.json"
        if self.index_path.is_file() and self.data_path.is_file():
            index = json.loads(self.index_path.read_text())
        else:
            index = self._build(items, torch.device(device), chunk, decode)
        self.offsets = np.asarray(index["offsets"], dtype=np.int64)
        self.shapes = [tuple(s) for s in index["shapes"]]
        self.sources = [tuple(s) for s in index["sources"]]
        self._data = np.memmap(self.data_path, dtype=np.uint8, mode="r", shape=(int(index["bytes"]),))

    def _resized(self, image: torch.Tensor) -> torch.Tensor:
        if self.square:
            return F2.resize(image, [self.side, self.side], self.interpolation, antialias=True)
        h, w = image.shape[-2:]
        if min(h, w) <= self.side:  # never upscale: a crop of the original is at least as sharp
            return image
        # an int: the short side, aspect ratio kept
        return F2.resize(image, self.side, self.interpolation, antialias=True)

    def _build(self, items: Sequence[Any], device: torch.device, chunk: int, decode: Callable) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        shapes: list[tuple[int, ...]] = []
        sources: list[tuple[int, int]] = []
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
                    sources.append((int(image.shape[-2]), int(image.shape[-1])))
                    f.write(small.numpy().tobytes())
                    total += small.numel()
        part.replace(self.data_path)
        index = {
            "offsets": offsets,
            "shapes": shapes,
            "sources": sources,
            "bytes": total,
            "side": self.side,
            "square": self.square,
        }
        write_json(self.index_path, index)  # last: its presence says the data file is complete
        return index

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Image ``i`` as a uint8 ``(C, H, W)`` CPU tensor (a copy: the map is read-only)."""
        return self.load([i])[0]

    def load(self, indices: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Images ``indices`` on ``device`` with one copy: their bytes gathered into one buffer (pinned for a GPU,
        so the copy is asynchronous on the current stream) and split into views there."""
        device = torch.device(device)
        sizes = [int(np.prod(self.shapes[int(i)])) for i in indices]
        flat = np.concatenate([self._data[int(self.offsets[int(i)]) :][:n] for i, n in zip(indices, sizes)])
        buffer = torch.from_numpy(flat)
        if device.type == "cuda":
            buffer = buffer.pin_memory().to(device, non_blocking=True)
        parts = torch.split(buffer, sizes)
        return [part.view(self.shapes[int(i)]) for part, i in zip(parts, indices)]


# ---------------------------------------------------------------------------------------------------------------
# the dataset and its batches


class TensorImageDataset(Dataset):
    """Images for training, loaded a batch at a time as normalised float tensors on ``device``.

    ``fit`` asks for whole batches (``batches``), so decoding and augmentation run once per batch on the device;
    ``__getitem__`` gives single examples for code that iterates a dataset (as ``ImageDataset`` does).

    A batch is made in two steps: ``load`` (decode, or read the cache, and copy to the device; no random numbers)
    and the augmentation (the crop and flip draws, then the tensor operations). With ``prefetch`` the next batch's
    load runs in a background thread (on a GPU on a side CUDA stream, so its copies and decodes overlap the
    training step) while the draws stay where the PIL path makes them: when the batch is asked for. So the random
    numbers come in the same order, interleaved with the training step's, with or without prefetch, and a resumed
    run (which restores the generator) continues with the same crops.

    Args:
        items: paths or uint8 arrays.
        labels: integer labels.
        augment: the tensor pipeline (``tensor_augment`` of the PIL transform).
        channels: 1 or 3.
        device: where decoding and augmentation run and batches are put.
        cache: decoded, resized images (None: decode every batch).
        generator: random draws; None is torch's global generator (what the PIL path and a resume use).
        prefetch: load the next batch while the current one trains.
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
        prefetch: bool = True,
    ):
        self.items = items
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.augment = augment
        self.channels = channels
        self.device = torch.device(device)
        self.cache = cache
        self.generator = generator
        self.prefetch = prefetch

    def __len__(self) -> int:
        return len(self.items)

    def load(self, indices: Sequence[int]) -> tuple[list[torch.Tensor], list[tuple[int, ...]] | None]:
        """The uint8 images of ``indices`` on the device, from the cache or decoded now, and their original sizes
        when they are cached copies (None: the images are the originals). Draws no random numbers."""
        if self.cache is not None:
            return self.cache.load(indices, self.device), [self.cache.sources[int(i)] for i in indices]
        return decode_jpegs([self.items[int(i)] for i in indices], self.device, self.channels), None

    def _augmented(
        self, indices: Sequence[int], loaded: tuple[list[torch.Tensor], Any], labels_on: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of ``indices`` from their ``load``-ed images: the inputs augmented on the device, the labels
        on ``labels_on`` (None: the device)."""
        images, sources = loaded
        x = self.augment(images, self.generator, sources)
        labels = self.labels[torch.as_tensor(list(indices), dtype=torch.long)]
        return x, labels.to(labels_on or self.device)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._augmented(indices, self.load(indices))

    def batches(self, batch_indices: Sequence[Sequence[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``batch_indices`` in order (what ``fit`` iterates instead of a DataLoader)."""
        if not self.prefetch or len(batch_indices) < 2:
            for indices in batch_indices:
                yield self.batch(indices)
            return
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def load(indices: Sequence[int]) -> tuple[list[torch.Tensor], Any]:
            if side is None:
                return self.load(indices)
            with torch.cuda.stream(side):
                return self.load(indices)

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transferkit-prefetch")
        try:
            pending = pool.submit(load, batch_indices[0])
            for k, indices in enumerate(batch_indices):
                loaded = pending.result()
                if k + 1 < len(batch_indices):
                    pending = pool.submit(load, batch_indices[k + 1])
                if side is not None:  # the side stream's copies and decodes finish before this stream reads them
                    current = torch.cuda.current_stream(self.device)
                    current.wait_stream(side)
                    for image in loaded[0]:
                        image.record_stream(current)  # memory made on the side stream, used on this one
                yield self._augmented(indices, loaded)
        finally:  # also when the training step raises or the loop stops early: no thread outlives the epoch
            pool.shutdown(wait=True, cancel_futures=True)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch([i])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch for a ``DataLoader``, which calls this (when a dataset has it) with the batch's indices
        instead of ``__getitem__`` once per example: so ``engine.loop.evaluate_model`` runs the tensor path a batch at
        a time with no change. The inputs are on the device; the labels stay on the CPU, where the PIL path's loader
        gives them and where the metrics gather the logits."""
        return self._augmented(indices, self.load(indices), labels_on=torch.device("cpu"))

    @staticmethod
    def collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loader's collate function (``make_loader`` takes a dataset's ``collate``): ``__getitems__`` already
        made the batch."""
        return batch


CACHE_LIMIT_BYTES = 8 * 1024**3  # few-shot sized: the cache is used when its images take at most this much


def cache_side(augment: TensorAugment) -> tuple[int, bool]:
    """The cached short side and whether it is square: the model's size when nothing crops; otherwise 8/7 of it
    (256 for 224, ImageNet's habit), enough for a crop of any scale to be resized down rather than up."""
    if augment.scale is None:
        return augment.size, True
    return math.ceil(augment.size * 8 / 7), False


def choose_input(
    dataset: Dataset,
    requested: str,
    device: torch.device | str,
    cache_dir: Path | None = None,
    channels_last: bool = False,
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
        channels_last: the model's convolutions run channels-last (``engine.loop.conv_layout``): the tensor path's
            batches come in that layout, so the first convolution does not convert them.
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
    found, why = tensor_augment(dataset.transform)
    if found is None:
        if requested == "gpu":
            raise DataError(
                f"data.input: gpu cannot reproduce this training transform: {why}. Remove that augmentation "
                "(only random_resized_crop and hflip have tensor versions) or set data.input: auto or pil"
            )
        return dataset, {"path": "pil", "reason": why}
    augment = dataclasses.replace(found, channels_last=channels_last)
    cache, cache_record = _cache_for(dataset, augment, device, cache_dir)
    record: dict[str, Any] = {
        "path": "gpu",
        "reason": "data.input: gpu" if requested == "gpu" else "a CUDA device and crop/flip/normalise only",
        "resize": "batched (roi_align)" if augment.uses_batched(device) else "per image (resized_crop)",
        "prefetch": "side CUDA stream" if device.type == "cuda" else "background thread",
        "channels_last": channels_last,
        **cache_record,
    }
    return TensorImageDataset(dataset.items, dataset.labels, augment, dataset.channels, device, cache), record


def _cache_for(
    dataset: Any, augment: TensorAugment, device: torch.device, cache_dir: Path | None
) -> tuple[Uint8Cache | None, dict[str, Any]]:
    """The uint8 cache of an ``ImageDataset``'s images for ``augment`` (None without a run folder or over
    ``CACHE_LIMIT_BYTES``) and its part of the input record: ``cache`` and, without one, ``no_cache``."""
    side, square = cache_side(augment)
    estimate = len(dataset) * dataset.channels * side * side * (1 if square else 2)  # 4:3 images cut to a short side
    if cache_dir is None or estimate > CACHE_LIMIT_BYTES:
        why = "no run folder" if cache_dir is None else f"over {CACHE_LIMIT_BYTES:,} bytes"
        return None, {"cache": None, "no_cache": why}
    # a square cache holds the pipeline's resized images, so it resizes with the pipeline's filter
    interpolation = augment.interpolation if square else T.InterpolationMode.BILINEAR
    t = time.perf_counter()
    cache = Uint8Cache(cache_dir, dataset.items, side, square, dataset.channels, device, interpolation=interpolation)
    build_s = time.perf_counter() - t  # decoding every image once (or mapping the file of an earlier run)
    record = {"file": str(cache.data_path), "side": side, "square": square, "decoded": cache.decoded}
    return cache, {"cache": {**record, "build_s": round(build_s, 3)}}


def choose_eval_input(
    dataset: Dataset,
    train_record: dict[str, Any],
    device: torch.device | str,
    cache_dir: Path | None = None,
    channels_last: bool = False,
) -> tuple[Dataset, dict[str, Any]]:
    """The validation dataset ``fit`` evaluates each epoch, on the tensor path when the training set took it.

    Why: on a GPU the PIL path decodes and resizes the validation images on the CPU every epoch, so validation is
    CPU-bound however fast the model runs. The evaluation transform of ``build_transform`` is a plain resize of the
    whole image to the model's square size (no centre crop), ``ToTensor`` and ``Normalize``: here the same steps on
    tensors (``tensor_augment`` reads them from the dataset's own pipeline), with the images resized once into a
    square uint8 cache at the model's size when there is a run folder, so later epochs only copy and normalise.
    Nothing random is drawn, so the training draws are those of the PIL path's validation.

    Args:
        dataset: the validation dataset built by the modality.
        train_record: ``choose_input``'s record for the training set: the tensor path only where it says ``gpu``.
        device: the training device.
        cache_dir: where the uint8 cache may live (the run's ``cache/images``); None decodes every epoch.
        channels_last: the model's convolutions run channels-last, as for ``choose_input``.

    Returns:
        The dataset to evaluate (a ``TensorImageDataset`` or ``dataset`` itself) and the keys to add to the input
        record: ``val`` (``tensor``, or ``pil: REASON``) and, on the tensor path, ``val_cache`` (as ``cache``) or
        ``val_no_cache``; nothing when the training set took the PIL path, whose record stays as it was.
    """
    from transferkit.data.images import ImageDataset

    if train_record.get("path") != "gpu":
        return dataset, {}
    if not isinstance(dataset, ImageDataset):
        return dataset, {"val": f"pil: not an image dataset ({type(dataset).__name__})"}
    found, why = tensor_augment(dataset.transform)
    if found is None:
        return dataset, {"val": f"pil: {why}"}
    if found.random:  # an evaluation that draws would shift the training draws of the epochs after it
        return dataset, {"val": "pil: the validation transform is random (crop or flip); evaluation has none"}
    device = torch.device(device)
    augment = dataclasses.replace(found, channels_last=channels_last)
    cache, cache_record = _cache_for(dataset, augment, device, cache_dir)
    record = {"val": "tensor", "val_cache": cache_record["cache"]}
    if "no_cache" in cache_record:
        record["val_no_cache"] = cache_record["no_cache"]
    chosen = TensorImageDataset(dataset.items, dataset.labels, augment, dataset.channels, device, cache, prefetch=False)
    return chosen, record
