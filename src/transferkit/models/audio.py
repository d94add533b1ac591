"""Audio backbone families: waveform encoders from ``transformers``, small sequence encoders over precomputed frames,
and the Resemblyzer speaker encoder with its mel front end in torch.

- ``hf_audio`` (reached through ``hf:NAME_OR_FOLDER``): wav2vec2, HuBERT, WavLM, AST, the Whisper encoder... with
  their feature extractor as the model's ``processor``. Hidden states are mean-pooled over the frames that hold
  audio (padding excluded). Inputs are a dict from the feature extractor (``input_values`` or ``input_features``,
  ``attention_mask``).
- ``seq`` (``seq:gru``, ``seq:cnn1d``): random-init encoders for frame features (MFCC...), a dict ``{"frames":
  (batch, time, features), "attention_mask": (batch, time)}``; outputs mean-pooled over the valid frames. Padding
  never changes an utterance's features: the GRU runs on packed sequences and the CNN re-zeroes padding after each
  layer.
- ``resemblyzer`` (the built-in source ``resemblyzer-speaker-encoder``): a 3-layer LSTM over 40 power-mel bands
  giving a 256-d L2-normalised speaker embedding; the waveform -> mel step runs inside the module, so the model takes
  raw 16 kHz waveforms (``{"input_values", "attention_mask"}``) like the ``hf_audio`` family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypedDict, cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from transferkit.errors import SourceError
from transferkit.models.base import Backbone, register_family

# transformers model types that take audio: their feature extractor is the processor
AUDIO_MODEL_TYPES = (
    "wav2vec2",
    "wav2vec2-conformer",
    "wav2vec2-bert",
    "hubert",
    "wavlm",
    "data2vec-audio",
    "unispeech",
    "unispeech-sat",
    "sew",
    "sew-d",
    "audio-spectrogram-transformer",
    "whisper",
    "clap_audio_model",
)
DEFAULT_MAX_SECONDS = 10.0  # longer recordings are cut: a keyword or an utterance, not a podcast


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` (batch, time, dim) over the time steps where ``mask`` (batch, time) is non-zero."""
    if mask is None:
        return hidden.mean(1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def is_audio_config(config: Any) -> bool:
    """Whether a transformers config describes an audio model (it takes waveforms or spectrograms)."""
    return (
        getattr(config, "model_type", None) in AUDIO_MODEL_TYPES
        or hasattr(config, "num_mel_bins")
        or hasattr(config, "feat_extract_norm")
    )


# ----------------------------------------------------------------------------------------------------------------
# hf_audio: transformers waveform / spectrogram encoders


class AudioEncoder(nn.Module):
    """A transformers audio encoder returning features mean-pooled over the frames that hold audio.

    Args:
        model: the encoder (``Wav2Vec2Model``, ``WhisperEncoder``, ``ASTModel``...).
        input_key: the feature extractor's output the model reads (``input_values`` or ``input_features``).
        pass_mask: give the attention mask to the model (wav2vec2-style models with layer-norm feature encoders
            are trained with it; the group-norm ones are not, and see zero-padded audio instead).
    """

    def __init__(self, model: nn.Module, input_key: str, pass_mask: bool):
        super().__init__()
        self.model = model
        self.input_key = input_key
        self.pass_mask = pass_mask

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(batch, dict) or self.input_key not in batch:
            raise TypeError(f"an audio backbone takes a dict from its feature extractor with '{self.input_key}'")
        mask = batch.get("attention_mask")
        inputs = {self.input_key: batch[self.input_key]}
        if self.pass_mask and mask is not None:
            inputs["attention_mask"] = mask
        hidden = self.model(**inputs).last_hidden_state
        return masked_mean(hidden, self.frame_mask(mask, hidden.shape[1]))

    def frame_mask(self, mask: torch.Tensor | None, frames: int) -> torch.Tensor | None:
        """The input mask (samples or spectrogram frames) brought to the encoder's output frames."""
        if mask is None:
            return None
        reduce = getattr(self.model, "_get_feature_vector_attention_mask", None)
        if reduce is not None:  # wav2vec2 family: the exact lengths after the strided convolutions
            return reduce(frames, mask)
        if mask.shape[1] == frames:
            return mask
        if mask.shape[1] % frames == 0:  # Whisper: the second convolution halves the mel frames
            return mask[:, :: mask.shape[1] // frames]
        return None


def _encoder_only(model: nn.Module) -> nn.Module:
    """The encoder of an encoder-decoder model (Whisper); the model itself otherwise."""
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return cast("Callable[[], nn.Module]", model.get_encoder)()
    return model


def _build_from_config(config: Any) -> nn.Module:
    if config.model_type == "whisper":  # build the encoder alone: the decoder would be initialised for nothing
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder(config)
    from transformers import AutoModel

    return _encoder_only(AutoModel.from_config(config))


def _processor_kwargs(model_type: str) -> dict[str, Any]:
    """How the feature extractor is called: Whisper pads to its fixed window itself, AST to its fixed number of
    frames (and takes no mask); wav2vec2-style extractors pad each batch to its longest recording."""
    if model_type == "audio-spectrogram-transformer":
        return {}
    if model_type == "whisper":
        return {"return_attention_mask": True}
    return {"padding": "longest", "return_attention_mask": True}


def _hf_audio_backbone(name: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]) -> Backbone:
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

    config_dict = kwargs.get("config")
    try:
        if config_dict is not None:  # rebuilding a saved model: architecture from its stored config, no weights
            model = _build_from_config(AutoConfig.for_model(**config_dict))
        elif pretrained:
            model = _encoder_only(AutoModel.from_pretrained(name))
        else:
            model = _build_from_config(AutoConfig.from_pretrained(name))
        extractor = AutoFeatureExtractor.from_pretrained(kwargs.get("processor_dir") or name)
    except OSError as e:
        raise SourceError(
            f"cannot load Hugging Face audio model '{name}': {e}. Give a local folder with config.json "
            "and preprocessor_config.json (the feature extractor), or a hub name on a machine with a "
            "network."
        ) from e
    if weights:
        from transferkit.io import load_state_dict
        from transferkit.models.base import load_weights

        load_weights(model, load_state_dict(weights), weights)
    cfg: Any = model.config  # a transformers config: its fields depend on the model type
    if getattr(model, "pooler", None) is not None:  # unused by mean pooling of the hidden states
        model.pooler = None  # type: ignore[assignment]  # torch types Module.__setattr__ without the None it accepts
    rate = int(extractor.sampling_rate)
    max_seconds = float(kwargs.get("max_seconds") or DEFAULT_MAX_SECONDS)
    if cfg.model_type == "whisper":  # the extractor pads or cuts every recording to its window (30 s for Whisper)
        max_seconds = min(max_seconds, float(extractor.chunk_length))
    input_key = cast(str, model.main_input_name)  # a transformers model's class attribute
    preprocess = {
        "modality": "audio",
        "sampling_rate": rate,
        "max_seconds": max_seconds,
        "pooling": "mean",
        "input_key": input_key,
        "processor_kwargs": _processor_kwargs(cfg.model_type),
        "input_size": [1, None],
    }  # mono, any length
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "encoder_layers", 0))
    stem = r"^model\.(feature_extractor|feature_projection|masked_spec_embed|conv1|conv2|embed_positions|embeddings)"
    groups = [("stem", stem)] + [(f"layer{i}", rf"\.layers?\.{i}\.") for i in range(layers)]
    pass_mask = getattr(cfg, "feat_extract_norm", "layer") == "layer" and cfg.model_type not in (
        "whisper",
        "audio-spectrogram-transformer",
    )
    hidden = int(getattr(cfg, "hidden_size", 0) or cfg.d_model)
    return Backbone(
        AudioEncoder(model, input_key, pass_mask),
        hidden,
        None,
        preprocess,
        groups,
        {"config": cfg.to_dict(), "max_seconds": max_seconds},
        processor=extractor,
    )


register_family("hf_audio", _hf_audio_backbone, prefix=False)


# ----------------------------------------------------------------------------------------------------------------
# seq: small encoders over precomputed frame features (MFCC...)

SEQ_KINDS = ("gru", "cnn1d")
SEQ_DEFAULTS: dict[str, Any] = {
    "input_dim": 13,
    "width": 64,
    "layers": 2,
    "dropout": 0.1,
    "bidirectional": True,
    "kernel_size": 5,
}


class SequenceEncoder(nn.Module):
    """Frames ``(batch, time, input_dim)`` -> a linear projection -> GRU or 1-D conv layers -> mean over valid frames.

    Args:
        kind: ``gru`` (bidirectional by default) or ``cnn1d`` (residual convolutions, same length in and out).
        input_dim: features per frame (13 for the usual MFCCs).
        width: hidden size per direction (GRU) or channels (CNN).
        layers: number of GRU or convolution layers.
        dropout: between layers, during training.
        bidirectional: GRU only.
        kernel_size: CNN only (odd).
    """

    def __init__(
        self,
        kind: str = "gru",
        input_dim: int = 13,
        width: int = 64,
        layers: int = 2,
        dropout: float = 0.1,
        bidirectional: bool = True,
        kernel_size: int = 5,
    ):
        super().__init__()
        if kind not in SEQ_KINDS:
            raise SourceError(
                f"unknown sequence encoder 'seq:{kind}'; valid: {', '.join('seq:' + k for k in SEQ_KINDS)}"
            )
        if kind == "cnn1d" and kernel_size % 2 == 0:
            raise SourceError(f"seq:cnn1d needs an odd kernel_size (same length in and out); got {kernel_size}")
        self.kind, self.input_dim = kind, input_dim
        self.input = nn.Linear(input_dim, width)
        self.drop = nn.Dropout(dropout)
        dirs = 2 if (bidirectional and kind == "gru") else 1
        if kind == "gru":
            self.layers = nn.ModuleList(
                nn.GRU(width if i == 0 else width * dirs, width, batch_first=True, bidirectional=dirs == 2)
                for i in range(layers)
            )
        else:
            self.layers = nn.ModuleList(
                nn.Conv1d(width, width, kernel_size, padding=kernel_size // 2) for _ in range(layers)
            )
        self.num_features = width * dirs

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(batch, dict) or "frames" not in batch:
            raise TypeError("a seq: backbone takes a dict with 'frames' (batch, time, features) and 'attention_mask'")
        frames = batch["frames"]
        if frames.shape[-1] != self.input_dim:
            raise SourceError(
                f"seq:{self.kind} was built for {self.input_dim} features per frame but the data has "
                f"{frames.shape[-1]}; build it with input_dim={frames.shape[-1]}"
            )
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones(frames.shape[:2], dtype=torch.long, device=frames.device)
        keep = mask.to(frames.dtype).unsqueeze(-1)
        x = self.input(frames) * keep
        lengths = mask.sum(1).clamp(min=1).cpu()
        for layer in self.layers:
            x = self.drop(x)
            if self.kind == "gru":
                packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
                x, _ = pad_packed_sequence(layer(packed)[0], batch_first=True, total_length=frames.shape[1])
            else:  # padding frames are zero before each convolution: a shorter utterance sees what it sees alone
                x = x + torch.relu(layer(x.transpose(1, 2))).transpose(1, 2) * keep
        return masked_mean(x, mask)


def _seq_backbone(name: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]) -> Backbone:
    if name not in SEQ_KINDS:
        raise SourceError(f"unknown sequence encoder 'seq:{name}'; valid: {', '.join('seq:' + k for k in SEQ_KINDS)}")
    if pretrained and not weights:
        raise SourceError(
            f"seq:{name} has no pretrained weights: use source: {{name: 'seq:{name}', pretrained: "
            "false}} (random initialisation, e.g. with pretrain: to train it on your source task), or "
            "weights: FILE"
        )
    unknown = sorted(set(kwargs) - set(SEQ_DEFAULTS) - {"processor_dir"})
    if unknown:
        raise SourceError(f"seq:{name} does not take {unknown}; its options are {', '.join(SEQ_DEFAULTS)}")
    options = {**SEQ_DEFAULTS, **{k: v for k, v in kwargs.items() if k in SEQ_DEFAULTS}}
    module = SequenceEncoder(name, **options)
    if weights:
        from transferkit.io import load_state_dict
        from transferkit.models.base import load_weights

        load_weights(module, load_state_dict(weights), weights)
    preprocess = {"modality": "frames", "normalize": "cmvn", "input_size": [options["input_dim"], None]}
    groups = [("input", r"^input\.")] + [(f"layer{i}", rf"^layers\.{i}\.") for i in range(options["layers"])]
    return Backbone(module, module.num_features, None, preprocess, groups, options)


register_family("seq", _seq_backbone)


# ----------------------------------------------------------------------------------------------------------------
# The mel front end (librosa's melspectrogram, in torch) and the Resemblyzer speaker encoder


def hz_to_mel(freqs: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale (librosa's default, ``htk=False``): linear below 1 kHz, logarithmic above."""
    freqs = np.asarray(freqs, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    linear = freqs / f_sp
    log = min_log_hz / f_sp + np.log(np.maximum(freqs, 1e-10) / min_log_hz) / logstep
    return np.where(freqs >= min_log_hz, log, linear)


def mel_to_hz(mels: np.ndarray | float) -> np.ndarray:
    """Inverse of ``hz_to_mel``."""
    mels = np.asarray(mels, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


def mel_filterbank(
    sampling_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular mel filters ``(n_mels, 1 + n_fft // 2)``, as ``librosa.filters.mel`` builds them by default:
    Slaney mel scale, each filter scaled to unit area (``norm='slaney'``)."""
    fmax = sampling_rate / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0, sampling_rate / 2, 1 + n_fft // 2)
    mel_freqs = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_freqs)
    ramps = np.subtract.outer(mel_freqs, fft_freqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2:] - mel_freqs[:-2]))[:, None]
    return weights.astype(np.float32)


class MelSpectrogram(nn.Module):
    """Power mel spectrogram ``(time, n_mels)`` of one waveform: a centred STFT (reflect padding, periodic Hann
    window), squared magnitudes, mel filters. The defaults are Resemblyzer's: 16 kHz, 25 ms windows, 10 ms hops,
    40 bands, not log."""

    window: torch.Tensor
    filters: torch.Tensor

    def __init__(self, sampling_rate: int = 16000, n_fft: int = 400, hop_length: int = 160, n_mels: int = 40):
        super().__init__()
        self.sampling_rate, self.n_fft, self.hop_length, self.n_mels = sampling_rate, n_fft, hop_length, n_mels
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        self.register_buffer(
            "filters", torch.from_numpy(mel_filterbank(sampling_rate, n_fft, n_mels)), persistent=False
        )

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            wav.float(),
            self.n_fft,
            self.hop_length,
            window=self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        return (self.filters @ spec.abs().pow(2)).T


class _ResemblyzerSettings(TypedDict):
    """The fixed settings of Resemblyzer's encoder and preprocessing (sizes are ints, rates and levels floats)."""

    sampling_rate: int
    n_mels: int
    hidden: int
    embedding: int
    layers: int
    partial_frames: int
    rate: float
    min_coverage: float
    target_dbfs: float


RESEMBLYZER: _ResemblyzerSettings = {
    "sampling_rate": 16000,
    "n_mels": 40,
    "hidden": 256,
    "embedding": 256,
    "layers": 3,
    "partial_frames": 160,
    "rate": 1.3,
    "min_coverage": 0.75,
    "target_dbfs": -30.0,
}


def partial_slices(
    n_samples: int,
    hop: int = 160,
    partial_frames: int = 160,
    rate: float = 1.3,
    min_coverage: float = 0.75,
    sampling_rate: int = 16000,
) -> list[tuple[int, int]]:
    """Resemblyzer's partial utterances: windows of ``partial_frames`` mel frames, ``rate`` windows per second,
    the last one kept only if the audio covers ``min_coverage`` of it (always at least one). Mel frame ranges."""
    n_frames = math.ceil((n_samples + 1) / hop)
    step = round((sampling_rate / rate) / hop)
    slices = [(i, i + partial_frames) for i in range(0, max(1, n_frames - partial_frames + step + 1), step)]
    start, stop = slices[-1][0] * hop, slices[-1][1] * hop
    if (n_samples - start) / (stop - start) < min_coverage and len(slices) > 1:
        slices = slices[:-1]
    return slices


class SpeakerEncoder(nn.Module):
    """Resemblyzer's voice encoder: waveform -> volume normalisation -> mel -> partial windows of 1.6 s -> 3-layer
    LSTM -> ReLU(linear(last hidden state)), L2-normalised -> mean over the windows, L2-normalised again.

    It takes ``{"input_values": (batch, samples), "attention_mask": (batch, samples)}`` at 16 kHz, and computes each
    recording's mel spectrogram on its own samples (a batch gives every recording the embedding it has alone).
    Resemblyzer also trims long silences with webrtcvad; that step is left out here.
    """

    def __init__(self, n_mels: int = 40, hidden: int = 256, embedding: int = 256, layers: int = 3):
        super().__init__()
        self.mel = MelSpectrogram(RESEMBLYZER["sampling_rate"], n_mels=n_mels)
        self.lstm = nn.LSTM(n_mels, hidden, layers, batch_first=True)
        self.linear = nn.Linear(hidden, embedding)

    def embed_partials(self, mels: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of mel windows ``(windows, frames, n_mels)``."""
        _, (hidden, _) = self.lstm(mels)
        raw = torch.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(batch, dict) or "input_values" not in batch:
            raise TypeError(
                "the speaker encoder takes a dict with 'input_values' (16 kHz waveforms) and 'attention_mask'"
            )
        waves = batch["input_values"]
        mask = batch.get("attention_mask")
        lengths = mask.sum(1).tolist() if mask is not None else [waves.shape[1]] * len(waves)
        windows, owner = [], []
        for i, n in enumerate(lengths):
            wav = normalize_volume(waves[i, : int(n)].float(), RESEMBLYZER["target_dbfs"])
            slices = partial_slices(len(wav))
            end = slices[-1][1] * self.mel.hop_length
            if end >= len(wav):
                wav = torch.nn.functional.pad(wav, (0, end - len(wav)))
            mel = self.mel(wav)
            windows += [mel[a:b] for a, b in slices]
            owner += [i] * len(slices)
        partials = self.embed_partials(torch.stack(windows))
        index = torch.as_tensor(owner, device=partials.device)
        sums = torch.zeros(len(lengths), partials.shape[1], device=partials.device, dtype=partials.dtype)
        sums = sums.index_add(0, index, partials)
        return sums / sums.norm(dim=1, keepdim=True).clamp(min=1e-12)


def normalize_volume(wav: torch.Tensor, target_dbfs: float) -> torch.Tensor:
    """Raise a quiet recording to ``target_dbfs`` (never lower a loud one), as Resemblyzer's preprocessing does."""
    rms = wav.pow(2).mean().sqrt()
    if rms <= 0:
        return wav
    change = target_dbfs - 20 * torch.log10(rms)
    return wav * 10 ** (change / 20) if change > 0 else wav


def resemblyzer_weights() -> dict[str, torch.Tensor]:
    """The LSTM and linear weights shipped in the ``resemblyzer`` wheel (the package is not imported)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "the built-in source 'resemblyzer-speaker-encoder' needs its weights package: "
            "pip install --no-deps resemblyzer==0.1.4"
        )
    path = Path(spec.submodule_search_locations[0]) / "pretrained.pt"
    if not path.is_file():
        raise SourceError(f"'{path}' is missing from the installed resemblyzer package; reinstall it")
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    return {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}  # not the GE2E loss scalars


def _resemblyzer_backbone(name: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]) -> Backbone:
    module = SpeakerEncoder(
        RESEMBLYZER["n_mels"], RESEMBLYZER["hidden"], RESEMBLYZER["embedding"], RESEMBLYZER["layers"]
    )
    if pretrained or weights:
        from transferkit.io import load_state_dict

        # pretrained or weights holds here, so the branch that does not take the shipped weights has weights set
        module.load_state_dict(
            resemblyzer_weights() if pretrained and not weights else load_state_dict(cast(str, weights))
        )
    preprocess = {
        "modality": "audio",
        "sampling_rate": RESEMBLYZER["sampling_rate"],
        "max_seconds": DEFAULT_MAX_SECONDS,
        "input_key": "input_values",
        "input_size": [1, None],
    }
    groups = [(f"layer{i}", rf"^lstm\.\w+_l{i}$") for i in range(RESEMBLYZER["layers"])] + [("linear", r"^linear\.")]
    return Backbone(module, RESEMBLYZER["embedding"], None, preprocess, groups, {})


register_family("resemblyzer", _resemblyzer_backbone, prefix=False)
