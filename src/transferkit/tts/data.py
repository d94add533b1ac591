"""The target speaker's data for adapting a voice: a folder of recordings with their transcripts, and the two
spectrograms VITS trains on.

The folder follows the LJSpeech convention: ``metadata.csv`` beside the audio (or the audio under ``wavs/``), one
utterance a line, pipe-separated: ``file|text`` (or LJSpeech's ``file|text|normalised text``, whose last column is
used when it is not empty); ``file`` is the WAV's name with or without ``.wav``. Every recording is mixed to mono and
resampled to the voice's rate (``transferkit.data.audio``), so the target may be recorded at any rate.

Spectrograms (paper section 2.1 and its training setup): the posterior encoder reads the *linear* magnitude
spectrogram; the reconstruction loss compares *log-mel* spectrograms. Both use the same hop as the decoder's
upsampling (256 samples for a 22,050 Hz Piper voice), so frame ``j`` of a spectrogram is latent frame ``j``: the STFT
pads ``(n_fft - hop) / 2`` samples on each side and does not centre, which gives exactly ``samples // hop`` frames.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transferkit.data.audio import audio_info, load_audio
from transferkit.errors import DataError, DataNotFoundError
from transferkit.models.audio import mel_filterbank

METADATA = "metadata.csv"


@dataclass(frozen=True)
class Utterance:
    """One target recording.

    Attributes:
        name: its ``file`` column (without ``.wav``).
        text: what is said.
        wave: mono float32 samples at ``TtsData.rate``, cut to a whole number of hops.
        path: the audio file.
        rate: samples per second of ``wave``.
    """

    name: str
    text: str
    wave: np.ndarray = field(repr=False)
    path: Path
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.wave) / self.rate


@dataclass
class TtsData:
    """A target speaker's utterances at the voice's rate, split into training and held-out sets.

    Attributes:
        train: utterances the voice adapts on.
        held_out: utterances kept for measuring the adapted voice (speaker similarity, WER, mel-cepstral distortion).
        rate: samples per second of every waveform.
        root: the folder read.
    """

    train: list[Utterance]
    held_out: list[Utterance]
    rate: int
    root: Path

    def summary(self) -> dict[str, float | int]:
        """Counts and minutes of each split (for the run's report)."""
        return {
            "train_utterances": len(self.train),
            "held_out_utterances": len(self.held_out),
            "train_minutes": round(sum(len(u.wave) for u in self.train) / self.rate / 60, 3),
            "held_out_minutes": round(sum(len(u.wave) for u in self.held_out) / self.rate / 60, 3),
            "rate": self.rate,
        }


def _rows(meta: Path) -> list[tuple[int, str, str]]:
    """``(line, file, text)`` of each non-blank line of a metadata file (pipe-separated, no quoting: LJSpeech texts
    hold quotes)."""
    try:
        raw = meta.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"'{meta}' is not UTF-8 text ({e}); save it as UTF-8") from e
    rows = []
    for line_no, cols in enumerate(csv.reader(io.StringIO(raw), delimiter="|", quoting=csv.QUOTE_NONE), start=1):
        if not cols or all(not c.strip() for c in cols):
            continue
        if line_no == 1 and [c.strip().lower() for c in cols[:2]] == ["file", "text"]:
            continue  # a header line
        if len(cols) < 2:
            raise DataError(
                f"'{meta}' line {line_no} ({'|'.join(cols)[:60]!r}) has no '|': each line must be file|text "
                "(LJSpeech convention); separate the file name from its transcript with a pipe"
            )
        text = cols[-1].strip() if len(cols) >= 3 and cols[-1].strip() else cols[1].strip()
        rows.append((line_no, cols[0].strip(), text))
    return rows


def _audio_path(root: Path, name: str) -> Path | None:
    """The recording a ``file`` column names: ``root/NAME``, ``root/NAME.wav`` or the same under ``wavs/``."""
    names = [name] if name.lower().endswith(".wav") else [name, f"{name}.wav"]
    for folder in (root, root / "wavs"):
        for n in names:
            if (folder / n).is_file():
                return folder / n
    return None


def read_metadata(root: str | Path) -> list[tuple[str, str, Path]]:
    """``(name, text, audio path)`` of each utterance a target folder lists, every row checked.

    Raises:
        DataNotFoundError: the folder or its ``metadata.csv`` is missing.
        DataError: a row without ``|``, without a file name or a transcript, naming a file listed twice, a WAV that
            does not exist or audio that cannot be read (each naming the line and the fix), or no rows at all.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(
            f"target speaker folder '{root}' does not exist; give a folder of WAV files with a {METADATA} (file|text)"
        )
    meta = root / METADATA
    if not meta.is_file():
        wavs = len(list(root.glob("*.wav")) + list((root / "wavs").glob("*.wav")))
        raise DataNotFoundError(
            f"'{meta}' is missing ({wavs} WAV file(s) in the folder); write one line per recording, "
            "'file|text' (LJSpeech convention: file without .wav, pipe-separated, no header needed)"
        )
    out: list[tuple[str, str, Path]] = []
    seen: dict[str, int] = {}
    for line_no, name, text in _rows(meta):
        where = f"'{meta}' line {line_no}"
        if not name:
            raise DataError(f"{where} has an empty file name; put the WAV's name before the '|'")
        if not text:
            raise DataError(
                f"{where} ({name}) has an empty transcript; write what is said after the '|', or remove the line"
            )
        stem = name[:-4] if name.lower().endswith(".wav") else name
        if stem in seen:
            raise DataError(f"{where} names '{name}' again (first on line {seen[stem]}); list each recording once")
        seen[stem] = line_no
        path = _audio_path(root, name)
        if path is None:
            raise DataError(
                f"{where} names '{name}', but neither '{root / name}' nor '{root / (stem + '.wav')}' (nor the same "
                f"under wavs/) exists; fix the name or add the recording"
            )
        info = audio_info(path)
        if isinstance(info, str):
            raise DataError(
                f"{where}: the audio '{path}' cannot be read ({info}); re-export it as WAV, or remove the line"
            )
        out.append((stem, text, path))
    if not out:
        raise DataError(f"'{meta}' lists no utterances; write one line per recording, 'file|text'")
    return out


def read_tts_folder(
    root: str | Path,
    rate: int,
    *,
    held_out: int | float = 0.1,
    seed: int = 0,
    hop: int = 256,
    max_seconds: float | None = 30.0,
) -> TtsData:
    """Read a target speaker's folder (see the module docstring), resample to ``rate`` and split it.

    Args:
        root: the folder holding ``metadata.csv`` and the WAV files.
        rate: the voice's sample rate (every recording is resampled to it).
        held_out: utterances kept out of training: a count (int) or a fraction of the folder (float in [0, 1)).
        seed: the split's seed (the same seed, the same held-out utterances).
        hop: samples per latent frame; each waveform is cut to a whole number of hops.
        max_seconds: the longest recording accepted (the alignment search's time and memory grow with frames x
            phonemes, and a few-minute target is sentences of a few seconds); None: no limit.

    Raises:
        DataNotFoundError, DataError: see ``read_metadata``; also a recording shorter than a few frames, or a split
            that leaves no training utterance.
    """
    rows = read_metadata(root)
    n = len(rows)
    if isinstance(held_out, float):
        if not 0.0 <= held_out < 1.0:
            raise DataError(f"held_out as a fraction must be in [0, 1), got {held_out}")
        n_held = round(n * held_out)
    else:
        n_held = int(held_out)
    if n_held < 0 or n_held >= n:
        raise DataError(
            f"held_out={held_out} keeps {n_held} of the {n} utterances out of training, leaving none to adapt on; "
            "lower held_out or add recordings"
        )
    utts = []
    for name, text, path in rows:
        full = load_audio(path, rate)
        if max_seconds is not None and len(full) > max_seconds * rate:
            raise DataError(
                f"'{path}' is {len(full) / rate:.1f} s long, over max_seconds={max_seconds}; cutting it would leave "
                "its transcript longer than its audio: split it into sentences (one line each), or raise max_seconds"
            )
        wave = np.ascontiguousarray(full[: len(full) // hop * hop])
        if len(wave) < 4 * hop:
            raise DataError(
                f"'{path}' holds {len(full) / rate * 1000:.0f} ms of audio, under 4 frames of {hop} samples; "
                "give a recording of a spoken phrase, or remove its line from metadata.csv"
            )
        utts.append(Utterance(name, text, wave, path, rate))
    order = np.random.default_rng(seed).permutation(n)
    held = sorted(order[:n_held].tolist())
    held_set = set(held)
    return TtsData(
        train=[u for i, u in enumerate(utts) if i not in held_set],
        held_out=[utts[i] for i in held],
        rate=rate,
        root=Path(root).expanduser(),
    )


# ----------------------------------------------------------------------------------------------------------------
# Spectrograms


def _frames_stft(wave: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """|STFT| (batch, 1 + n_fft // 2, samples // hop) with VITS's framing: reflect-pad (n_fft - hop) / 2 each side,
    not centred, periodic Hann window of n_fft."""
    if wave.dim() == 1:
        wave = wave[None]
    pad = (n_fft - hop) // 2
    if wave.shape[-1] <= pad:
        raise DataError(f"a waveform of {wave.shape[-1]} samples is too short for an STFT of {n_fft}; give more audio")
    x = F.pad(wave[:, None], (pad, pad), mode="reflect")[:, 0]
    window = torch.hann_window(n_fft, periodic=True, dtype=wave.dtype, device=wave.device)
    spec = torch.stft(x, n_fft, hop, window=window, center=False, return_complex=True)
    # sqrt(|X|^2 + 1e-6): the reference's floor, so silence has a finite log and a gradient
    return torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-6)


def linear_spectrogram(wave: torch.Tensor, n_fft: int = 1024, hop: int = 256) -> torch.Tensor:
    """Magnitude spectrogram (batch, 1 + n_fft // 2, samples // hop): the posterior encoder's input."""
    return _frames_stft(wave, n_fft, hop)


_FILTERS: dict[tuple[int, int, int, float, float | None], torch.Tensor] = {}


def mel_spectrogram(
    wave: torch.Tensor,
    rate: int,
    n_fft: int = 1024,
    hop: int = 256,
    n_mels: int = 80,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> torch.Tensor:
    """Log-mel spectrogram (batch, n_mels, samples // hop): ``log(max(mel @ |STFT|, 1e-5))`` (Slaney mel filters,
    as librosa's and the VITS reference's), the target and the prediction of the reconstruction loss."""
    return log_mel(linear_spectrogram(wave, n_fft, hop), rate, n_fft, n_mels, fmin, fmax)


def log_mel(
    spec: torch.Tensor, rate: int, n_fft: int = 1024, n_mels: int = 80, fmin: float = 0.0, fmax: float | None = None
) -> torch.Tensor:
    """``log(max(filters @ spec, 1e-5))`` of a linear magnitude spectrogram (batch, 1 + n_fft // 2, frames)."""
    key = (rate, n_fft, n_mels, fmin, fmax)
    if key not in _FILTERS:
        _FILTERS[key] = torch.from_numpy(mel_filterbank(rate, n_fft, n_mels, fmin, fmax))
    filters = _FILTERS[key].to(spec.dtype).to(spec.device)
    return torch.log(torch.clamp(filters @ spec, min=1e-5))


def pad_stack(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad tensors along their last dimension to the longest and stack them; (batch, ...), lengths."""
    lengths = torch.tensor([s.shape[-1] for s in seqs], dtype=torch.long)
    longest = int(lengths.max())
    out = torch.stack([F.pad(s, (0, longest - s.shape[-1])) for s in seqs])
    return out, lengths
