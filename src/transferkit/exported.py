"""Prediction from an exported folder with ONNX Runtime, without torch: ``OnnxPredictor(folder).predict(inputs)``.

An exported folder (``transferkit.compress.export.export_onnx``, or its int8 copy from ``ort_quant``) holds
``model.onnx``, ``model.json`` (labels, preprocessing) and, for text, ``processor/tokenizer.json``. This module
imports numpy, PIL, onnxruntime and tokenizers only (import-linter holds it to that), so a deployment installs
those and not torch. The preprocessing is the torch path's (``transferkit.data.images`` / ``text`` / ``audio``)
redone in numpy: the tests hold the two to the same batches (images within 1e-5, token ids exactly).

- images: the file or array in the model's channel mode (16-bit scaled to 8, transparency composited on white),
  the whole image resized to the input size with PIL (as torchvision's ``Resize`` does for PIL images), scaled to
  0..1 and normalised;
- text: the ``tokenizers`` library on the saved ``tokenizer.json``, truncated to ``max_length`` and padded to the
  batch's longest, as the transformers tokenizer does at prediction;
- frames (``seq:gru``, ``seq:cnn1d``): per-utterance CMVN and zero padding with an attention mask.

Audio models that read waveforms through a transformers feature extractor are refused (their log-mel or
normalisation front ends are not reimplemented here); predict them with ``transferkit.predict``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from transferkit.errors import CompressError, DataError, DataNotFoundError

BATCH = 32  # as transferkit.predict: inputs run 32 at a time
_INPUT_KEY = {"text": "text"}  # what a prediction row calls its input, by modality (else "file"), as data.* registers
_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_INTERPOLATION["nearest"] = Image.Resampling.NEAREST
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def read_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, one text per line (``predict --file``; torch-free, so the exported
    path can read them too)."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"text file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"'{path}' is not a UTF-8 text file ({e.reason} at byte {e.start}); --file takes a text file with one "
            "text per line"
        ) from None
    lines = [line.strip() for line in text.splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise DataError(f"'{path}' holds no text (one text per line expected)")
    return texts


def is_exported(folder: str | Path) -> bool:
    """Whether ``folder`` is an exported model folder (``model.onnx`` and ``model.json``)."""
    folder = Path(folder)
    return (folder / "model.onnx").is_file() and (folder / "model.json").is_file()


class OnnxPredictor:
    """An exported model with its preprocessing and labels; predicts as ``transferkit.predict.Predictor`` does.

    Args:
        folder: an exported folder.
        threads: ONNX Runtime's intra-op threads (default: ONNX Runtime's choice, one per core).
    """

    def __init__(self, folder: str | Path, threads: int | None = None):
        folder = Path(folder)
        if not folder.exists():
            raise DataNotFoundError(f"exported model folder '{folder}' does not exist")
        if not is_exported(folder):
            missing = [f for f in ("model.onnx", "model.json") if not (folder / f).is_file()]
            raise CompressError(
                f"'{folder}' is not an exported model folder: it has no {' or '.join(missing)}. Export the model "
                "with transferkit.compress.export.export_onnx (the export step of a run writes exports/NAME/)"
            )
        try:
            meta = json.loads((folder / "model.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CompressError(f"'{folder}/model.json' is not valid JSON ({e}); export the model again") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("preprocess"), dict) or "head" not in meta:
            raise CompressError(
                f"'{folder}/model.json' has no preprocess or head: it is not an exported single-task model; export "
                "the model again"
            )
        self.folder = folder
        self.meta = meta
        self.preprocess: dict[str, Any] = meta["preprocess"]
        self.modality = str(self.preprocess.get("modality", "image"))
        self.labels: list[str] = meta.get("labels") or [str(i) for i in range(int(meta["head"]["num_classes"]))]
        self._prepare = self._preprocessor()
        self.session = _session(folder / "model.onnx", threads)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def _preprocessor(self) -> Any:
        # the torch-free counterparts of the modalities' batch hooks (transferkit.data.modality needs torch)
        builders = {
            "image": lambda: _ImagePreprocess(self.preprocess),
            "text": lambda: _TextPreprocess(self.folder / "processor", self.preprocess),
            "frames": lambda: _FramesPreprocess(self.preprocess),
        }
        refused = {
            "audio": f"'{self.folder}' is an audio model whose waveforms go through a transformers feature extractor "
            "(log-mel spectrograms, normalisation) that transferkit.exported does not reimplement without torch; "
            "predict it with transferkit.predict.load_run on the saved model, or export a frames model (seq:gru, "
            "seq:cnn1d) over precomputed features"
        }
        if self.modality in builders:
            return builders[self.modality]()
        raise CompressError(
            refused.get(
                self.modality,
                f"'{self.folder}' holds a {self.modality} model; transferkit.exported predicts "
                f"{', '.join(builders)} models",
            )
        )

    def batch(self, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
        """The model inputs of one batch, as the ONNX graph takes them (names to arrays)."""
        arrays = self._prepare(list(inputs))
        if not isinstance(arrays, dict):
            return {self.inputs[0]: arrays}
        missing = [n for n in self.inputs if n not in arrays]
        if missing:
            raise CompressError(
                f"the exported graph reads {', '.join(missing)}, which this {self.modality} preprocessing does not "
                f"give (it gives {', '.join(arrays)}); export the model again"
            )
        return {n: arrays[n] for n in self.inputs}

    def predict_proba(self, inputs: Sequence[Any]) -> np.ndarray:
        """Class probabilities (float32), one row per input."""
        inputs = list(inputs)
        out = [_softmax(self._run(self.batch(inputs[i : i + BATCH]))) for i in range(0, len(inputs), BATCH)]
        return np.concatenate(out) if out else np.empty((0, len(self.labels)), dtype=np.float32)

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        try:
            return np.asarray(self.session.run(None, feed)[0])
        except Exception as e:  # onnxruntime's InvalidArgument & co. have no public base class
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feed.items())
            raise DataError(
                f"the inputs do not fit the exported {self.modality} model ({shapes}): {type(e).__name__}: {e}"
            ) from None

    def predict(self, inputs: Sequence[Any], top_k: int = 3) -> list[dict[str, Any]]:
        """Top-k labels with probabilities, one entry per input (the rows ``transferkit.predict.Predictor`` gives)."""
        if top_k < 1:
            raise DataError(f"top_k={top_k}: give 1 or more (the number of labels listed per input)")
        inputs = list(inputs)
        probs = self.predict_proba(inputs)
        k = min(top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        key = _INPUT_KEY.get(self.modality, "file")
        return [
            {
                key: _describe(item, i, self.modality),
                "top": [{"label": self.labels[j], "probability": float(row[j])} for j in ids.tolist()],
            }
            for i, (item, row, ids) in enumerate(zip(inputs, probs, order))
        ]


def _describe(item: Any, i: int, modality: str) -> str:
    """A prediction row's input: the path or text itself, else its position (an array, a PIL image...)."""
    if isinstance(item, (str, Path)):
        return str(item)
    return f"<{modality} {i}>"


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's InvalidProtobuf, Fail... share no base class worth naming
        raise CompressError(
            f"ONNX Runtime cannot load '{path}': {type(e).__name__}: {e}. The file is corrupt or was cut short; "
            "export the model again"
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# Images: data.images (load_image, as_mode, build_transform without augmentation) in numpy and PIL


class _ImagePreprocess:
    def __init__(self, preprocess: dict[str, Any]):
        self.channels = int(preprocess["input_size"][0])
        self.size = int(preprocess["input_size"][-1])
        self.resample = _INTERPOLATION.get(preprocess.get("interpolation", "bilinear"), Image.Resampling.BILINEAR)
        shape = (-1, 1, 1)
        self.mean = np.asarray(preprocess["mean"], dtype=np.float32).reshape(shape)
        self.std = np.asarray(preprocess["std"], dtype=np.float32).reshape(shape)

    def __call__(self, items: list[Any]) -> np.ndarray:
        return np.stack([self.one(item) for item in items])

    def one(self, item: Any) -> np.ndarray:
        mode = "L" if self.channels == 1 else "RGB"
        if isinstance(item, Image.Image):
            im = _as_mode(item, mode)
        elif isinstance(item, np.ndarray):
            im = _as_mode(Image.fromarray(item), mode)
        elif isinstance(item, (str, Path)):
            im = _read_image(Path(item), mode)
        else:
            raise DataError(
                f"an image model predicts from image paths, PIL images or uint8 arrays; got a {type(item).__name__}"
            )
        im = im.resize((self.size, self.size), self.resample)
        pixels = np.asarray(im, dtype=np.uint8)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (channels, height, width)
        return (pixels.astype(np.float32) / np.float32(255) - self.mean) / self.std


def _as_mode(im: Image.Image, mode: str) -> Image.Image:
    """``im`` as ``mode``: 16-bit scaled to 8 bits, transparency composited on white (``data.images.as_mode``)."""
    if im.mode in _SIXTEEN_BIT:
        a = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        im = Image.fromarray(((a + 128) // 257).astype(np.uint8))
    if "transparency" in im.info and im.mode in ("P", "L", "RGB"):
        im = im.convert("RGBA")
    if im.mode in _ALPHA:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert(mode)


def _read_image(path: Path, mode: str) -> Image.Image:
    try:
        found = path.is_file()
    except OSError:  # a name too long for the file system, say: no such image either
        found = False
    if not found:
        raise DataNotFoundError(f"image '{str(path)[:200]}' does not exist")
    try:
        with _open_image(path) as im:
            return _as_mode(im, mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image '{path}' cannot be read: {e}") from e


@contextmanager
def _open_image(path: Path) -> Iterator[Image.Image]:
    """``Image.open``, refusing an image over PIL's pixel limit before decoding it (PIL only warns below twice the
    limit, then decodes: a few-kilobyte PNG can claim gigabytes of pixels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DataError(
                f"image '{path}' cannot be read: too large: over the limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
                "(PIL's Image.MAX_IMAGE_PIXELS); it is not decoded, as it could be a decompression bomb. Replace it "
                "with a smaller (downscaled) copy."
            ) from None
    with im:
        yield im


# ----------------------------------------------------------------------------------------------------------------
# Text: data.text.text_batch (the transformers tokenizer, truncated, padded to the longest) with ``tokenizers``


class _TextPreprocess:
    def __init__(self, processor: Path, preprocess: dict[str, Any]):
        from tokenizers import Tokenizer

        path = processor / "tokenizer.json"
        if not path.is_file():
            raise CompressError(
                f"'{path}' does not exist: an exported text model needs its fast tokenizer file (tokenizer.json, "
                "written by a Hugging Face fast tokenizer's save_pretrained); export the model again from a source "
                "with a fast tokenizer"
            )
        config_path = processor / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_truncation()  # tokenizer.json may hold the settings of its last use
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(
            int(preprocess["max_length"]), direction=config.get("truncation_side", "right")
        )
        pad_token = config.get("pad_token")
        if isinstance(pad_token, dict):  # older tokenizer_config.json files store AddedToken dicts
            pad_token = pad_token.get("content")
        pad_id = self.tokenizer.token_to_id(pad_token) if isinstance(pad_token, str) else None
        if pad_id is None:
            raise CompressError(
                f"'{config_path}' names no pad token the tokenizer knows ({pad_token!r}); batches of texts of "
                "different lengths cannot be padded. Export the model again from a tokenizer with a pad token"
            )
        self.tokenizer.enable_padding(
            direction=config.get("padding_side", "right"),
            pad_id=pad_id,
            pad_type_id=int(config.get("pad_token_type_id", 0)),
            pad_token=pad_token,
        )

    def __call__(self, texts: list[Any]) -> dict[str, np.ndarray]:
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise DataError(f"a text model predicts from non-empty strings; input {bad[0]} is {texts[bad[0]]!r}")
        encoded = self.tokenizer.encode_batch(texts)
        return {
            "input_ids": np.asarray([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encoded], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encoded], dtype=np.int64),
        }


# ----------------------------------------------------------------------------------------------------------------
# Frames: data.audio.frames_batch (normalize_frames, pad_frames) in numpy


class _FramesPreprocess:
    def __init__(self, preprocess: dict[str, Any]):
        self.normalize = str(preprocess.get("normalize", "cmvn"))
        if self.normalize not in ("cmvn", "none"):
            raise DataError(f"unknown frame normalisation '{self.normalize}'; valid: cmvn, none")

    def __call__(self, items: list[Any]) -> dict[str, np.ndarray]:
        frames = [self.one(x) for x in items]
        longest = max(len(f) for f in frames)
        out = np.zeros((len(frames), longest, frames[0].shape[1]), dtype=np.float32)
        mask = np.zeros((len(frames), longest), dtype=np.int64)
        for i, f in enumerate(frames):
            out[i, : len(f)] = f
            mask[i, : len(f)] = 1
        return {"frames": out, "attention_mask": mask}

    def one(self, item: Any) -> np.ndarray:
        if isinstance(item, (str, Path)):
            path = Path(item)
            if not path.is_file():
                raise DataNotFoundError(f"frame features file '{path}' does not exist")
            try:
                item = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise DataError(f"frame features file '{path}' cannot be read as a .npy array: {e}") from e
        frames = np.asarray(item, dtype=np.float32)
        if frames.ndim != 2 or len(frames) == 0:
            raise DataError(f"frame features must be a non-empty (time, features) array; got shape {frames.shape}")
        if self.normalize == "none":
            return frames
        return (frames - frames.mean(0)) / np.maximum(frames.std(0), 1e-5)
