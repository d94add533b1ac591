"""How good a voice is, measured on held-out sentences of the target speaker (issue 17, point 3).

- **Speaker similarity**: cosine of Resemblyzer speaker embeddings (transferkit's ``SpeakerEncoder`` with the weights
  of the ``resemblyzer`` wheel, on 16 kHz audio) between the mean embedding of the synthesised sentences and the mean
  embedding of the target's held-out recordings. It says *whose* voice it is, not what is said.
- **Word error rate**: pocketsphinx's default US-English recogniser (acoustic model, dictionary and language model
  shipped in its wheel) transcribes each synthesised sentence; WER = word-level Levenshtein distance / reference
  words, both sides normalised (lower case, punctuation stripped, integers spelled out). It says whether the words
  are intelligible, which speaker similarity cannot: a voice that mumbles in the right timbre scores well there.
- **Mel-cepstral distortion** (dB): mel cepstra (DCT of the log-mel spectrum, c0 dropped: loudness is not the
  speaker) of the synthesised and recorded sentence, aligned by dynamic time warping since the two never have the
  same timing, ``(10 / ln 10) * sqrt(2 * sum (c - c')^2)`` averaged over the warping path.
- **Real-time factor**: seconds spent synthesising / seconds of audio (below 1 is faster than real time), on the
  threads torch is given.

``compare_voices`` measures the source voice, the adapted one and the one trained from scratch on the same sentences,
and adds each voice's similarity to the *source* voice's own output: adaptation worked when a voice is closer to the
target than to the source.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from transferkit.data.audio import resample
from transferkit.errors import DataError

ENCODER_RATE = 16000  # Resemblyzer and pocketsphinx's en-us model both take 16 kHz
POCKETSPHINX_PIN = "pocketsphinx==5.1.1"
MCD_CONSTANT = 10.0 / math.log(10.0) * math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------------------------
# input checks


def _waves(waves: Sequence[np.ndarray], what: str) -> list[np.ndarray]:
    """Mono float32 arrays, each non-empty and finite (the message names the bad one)."""
    if isinstance(waves, np.ndarray) and waves.ndim == 1:
        raise DataError(f"{what} must be a list of waveforms, got one 1-D array; wrap it in a list")
    out = []
    for i, w in enumerate(waves):
        a = np.asarray(w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else w, dtype=np.float32)
        if a.ndim != 1 or a.size == 0:
            raise DataError(f"{what}[{i}] must be a non-empty 1-D waveform, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise DataError(f"{what}[{i}] holds NaN or inf samples; a diverged voice cannot be measured")
        out.append(a)
    if not out:
        raise DataError(f"{what} is empty: give at least one waveform to measure")
    return out


def _rate(rate: int, what: str) -> int:
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise DataError(f"{what} must be a positive number of samples per second, got {rate!r}")
    return int(rate)


def _to_16k(waves: Sequence[np.ndarray], rate: int) -> list[np.ndarray]:
    return [resample(w, rate, ENCODER_RATE).astype(np.float32) for w in waves]


# ----------------------------------------------------------------------------------------------------------------
# speaker similarity


@lru_cache(maxsize=1)
def speaker_encoder() -> torch.nn.Module:
    """Resemblyzer's speaker encoder with its shipped weights, in eval mode (loaded once per process).

    Raises:
        SourceError: the ``resemblyzer`` wheel that holds the weights is not installed (naming the pip command).
    """
    from transferkit.models.audio import RESEMBLYZER, SpeakerEncoder, resemblyzer_weights

    enc = SpeakerEncoder(RESEMBLYZER["n_mels"], RESEMBLYZER["hidden"], RESEMBLYZER["embedding"], RESEMBLYZER["layers"])
    enc.load_state_dict(resemblyzer_weights())
    return enc.eval()


def speaker_embeddings(waves: Sequence[np.ndarray], rate: int) -> np.ndarray:
    """L2-normalised speaker embeddings ``(len(waves), 256)``, one per recording (resampled to 16 kHz first)."""
    clean = _to_16k(_waves(waves, "waves"), _rate(rate, "rate"))
    enc = speaker_encoder()
    rows = []
    with torch.inference_mode():
        for w in clean:  # one at a time: no padding, and each recording's embedding is its own
            x = torch.from_numpy(w)[None]
            rows.append(enc({"input_values": x, "attention_mask": torch.ones_like(x, dtype=torch.long)})[0].numpy())
    return np.stack(rows).astype(np.float64)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0  # an all-zero embedding (ReLU output of silence) is like nothing: no similarity
    return float(np.dot(a, b) / (na * nb))


def _similarities(emb: np.ndarray, ref_emb: np.ndarray) -> tuple[float, list[float]]:
    """(mean embedding vs mean reference embedding, each embedding vs the mean reference embedding)."""
    centre = ref_emb.mean(axis=0)
    return _cosine(emb.mean(axis=0), centre), [_cosine(e, centre) for e in emb]


def speaker_similarity(
    waves: Sequence[np.ndarray], rate: int, references: Sequence[np.ndarray], ref_rate: int
) -> float:
    """Cosine similarity of the mean speaker embedding of ``waves`` and that of ``references`` (in [-1, 1]; the
    encoder's ReLU output makes it >= 0 in practice).

    Args:
        waves: synthesised sentences at ``rate``.
        references: recordings of the target speaker (held-out ones) at ``ref_rate``.

    Raises:
        DataError: an empty list, a waveform that is empty, not 1-D or not finite, or a bad rate.
    """
    return _similarities(speaker_embeddings(waves, rate), speaker_embeddings(references, ref_rate))[0]


def per_utterance_similarity(
    waves: Sequence[np.ndarray], rate: int, references: Sequence[np.ndarray], ref_rate: int
) -> list[float]:
    """Each synthesised sentence's cosine similarity to the mean embedding of ``references`` (finds the sentences
    where the voice slips back to its source)."""
    return _similarities(speaker_embeddings(waves, rate), speaker_embeddings(references, ref_rate))[1]


# ----------------------------------------------------------------------------------------------------------------
# word error rate

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
_ONES += "seventeen eighteen nineteen"
ONES = _ONES.split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER = re.compile(r"\d+")


def number_words(n: int) -> str:
    """``n`` (0 <= n < 10**9) in English words as a speaker reads it: 1905 -> "one thousand nine hundred five" (no
    "and", no year reading; pocketsphinx's dictionary has these words, not digits)."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    for size, name in ((10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            head, rest = divmod(n, size)
            return f"{number_words(head)} {name}" + ("" if rest == 0 else " " + number_words(rest))
    raise AssertionError("unreachable")


def normalize_words(text: str) -> list[str]:
    """The words of ``text`` as WER compares them: lower case, accents and punctuation removed (apostrophes inside
    words kept: pocketsphinx says "don't"), integers below a billion spelled out, hyphens splitting words."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = _NUMBER.sub(lambda m: f" {number_words(int(m.group()))} " if len(m.group()) <= 9 else m.group(), text)
    text = re.sub(r"[^\w\s']|_", " ", text)  # punctuation and symbols -> spaces
    return [w.strip("'") for w in text.split() if w.strip("'")]


def levenshtein(reference: Sequence[str], hypothesis: Sequence[str]) -> dict[str, int]:
    """Word-level edit distance and its kinds: {"distance", "substitutions", "deletions", "insertions"}.

    One dynamic-programming table; among the optimal alignments the backtrace prefers a match/substitution, then a
    deletion, then an insertion, so the counts are deterministic (the distance never depends on the preference).
    """
    n, m = len(reference), len(hypothesis)
    d = np.zeros((n + 1, m + 1), dtype=np.int64)
    d[:, 0] = np.arange(n + 1)
    d[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost = 0 if reference[i - 1] == hypothesis[j - 1] else 1
            d[i, j] = min(d[i - 1, j - 1] + cost, d[i - 1, j] + 1, d[i, j - 1] + 1)
    subs = dels = ins = 0
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and d[i, j] == d[i - 1, j - 1] + (reference[i - 1] != hypothesis[j - 1]):
            subs += int(reference[i - 1] != hypothesis[j - 1])
            i, j = i - 1, j - 1
        elif i > 0 and d[i, j] == d[i - 1, j] + 1:
            dels, i = dels + 1, i - 1
        else:
            ins, j = ins + 1, j - 1
    return {"distance": int(d[n, m]), "substitutions": subs, "deletions": dels, "insertions": ins}


def wer_of(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any]:
    """Corpus WER of transcripts against reference texts (both normalised): total edits / total reference words,
    with each sentence's own WER. Pooling over the corpus, not averaging sentence WERs, keeps a two-word sentence
    from weighing as much as a twenty-word one.

    Raises:
        DataError: the lists differ in length, are empty, or the references hold no word at all.
    """
    if len(references) != len(hypotheses):
        raise DataError(
            f"{len(references)} reference text(s) but {len(hypotheses)} transcript(s); give one text per waveform"
        )
    if not references:
        raise DataError("no sentences to score: give at least one reference text")
    per, edits, words = [], 0, 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        r, h = normalize_words(ref), normalize_words(hyp)
        e = levenshtein(r, h)
        edits, words = edits + e["distance"], words + len(r)
        per.append({**e, "words": len(r), "wer": e["distance"] / len(r) if r else float(bool(h))})
    if words == 0:
        raise DataError("the reference texts hold no words after normalisation (only punctuation?); give sentences")
    return {"wer": edits / words, "errors": edits, "reference_words": words, "per_utterance": per}


@lru_cache(maxsize=1)
def _decoder() -> Any:
    """pocketsphinx's default US-English decoder (loaded once: 0.3 s and ~40 MB of models)."""
    try:
        from pocketsphinx import Decoder
    except ImportError as e:
        raise DataError(
            f"word error rate needs the pocketsphinx speech recogniser: pip install {POCKETSPHINX_PIN} "
            "(BSD; its wheel ships the US-English acoustic model, dictionary and language model)"
        ) from e
    return Decoder(loglevel="FATAL")  # its default model is en-us at 16 kHz


def recognize(waves: Sequence[np.ndarray], rate: int) -> list[str]:
    """pocketsphinx's transcript of each waveform (lower-case words; "" when it hears nothing)."""
    clean = _to_16k(_waves(waves, "waves"), _rate(rate, "rate"))
    dec = _decoder()
    out = []
    for w in clean:
        pcm = (np.clip(w, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()  # 16 kHz mono int16, as its model wants
        dec.start_utt()
        dec.process_raw(pcm, no_search=False, full_utt=True)
        dec.end_utt()
        hyp = dec.hyp()
        out.append(hyp.hypstr.strip() if hyp is not None else "")
    return out


def word_error_rate(waves: Sequence[np.ndarray], rate: int, texts: Sequence[str]) -> dict[str, Any]:
    """WER of pocketsphinx's transcripts of ``waves`` against ``texts`` (see ``wer_of``), with the transcripts.

    Returns:
        {"wer", "errors", "reference_words", "hypotheses", "per_utterance"}.

    Raises:
        DataError: empty inputs, as many texts as waveforms not given, bad waveforms, or pocketsphinx missing (the
            message names ``pip install pocketsphinx==5.1.1``).
    """
    waves = _waves(waves, "waves")
    if len(texts) != len(waves):
        raise DataError(f"{len(waves)} waveform(s) but {len(texts)} text(s); give one text per waveform")
    hyps = recognize(waves, rate)
    return {**wer_of(list(texts), hyps), "hypotheses": hyps}


# ----------------------------------------------------------------------------------------------------------------
# mel-cepstral distortion


def dtw(cost: np.ndarray) -> tuple[float, list[tuple[int, int]]]:
    """Dynamic time warping on a cost matrix ``(n, m)``: the monotonic path from (0, 0) to (n-1, m-1), steps
    (1, 0), (0, 1) and (1, 1), of least total cost. Returns (total cost, path).

    Ties go to the diagonal step, then to advancing the first sequence, so the path is deterministic.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise DataError(f"DTW needs a non-empty (n, m) cost matrix, got shape {cost.shape}")
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        row, prev = acc[i], acc[i - 1]
        c = cost[i - 1]
        # the diagonal and vertical moves depend on the row above only: vectorised; the horizontal one runs along
        best = np.minimum(prev[:-1], prev[1:])
        for j in range(1, m + 1):
            row[j] = c[j - 1] + min(best[j - 1], row[j - 1])
    path = [(n - 1, m - 1)]
    i, j = n, m
    while (i, j) != (1, 1):
        moves = ((acc[i - 1, j - 1], i - 1, j - 1), (acc[i - 1, j], i - 1, j), (acc[i, j - 1], i, j - 1))
        _, i, j = min(moves, key=lambda t: t[0])  # min keeps the first of equal costs: diagonal first
        path.append((i - 1, j - 1))
    return float(acc[n, m]), path[::-1]


def mel_cepstrum(wave: np.ndarray, rate: int, n_coeffs: int = 13, n_mels: int = 80) -> np.ndarray:
    """Mel cepstra ``(frames, n_coeffs)`` of ``wave``: the DCT-II of the natural-log mel amplitude spectrum (VITS's
    80-band log-mel, 1,024-point STFT, hop 256 scaled to the rate), c0 (the frame's loudness) dropped."""
    from scipy.fft import dct

    from transferkit.tts.data import mel_spectrogram

    if not 1 <= n_coeffs < n_mels:
        raise DataError(f"n_coeffs must be between 1 and {n_mels - 1} (c0 is dropped), got {n_coeffs}")
    scale = rate / 22050
    n_fft = 1 << max(6, round(math.log2(1024 * scale)))  # the same ~46 ms window at any rate
    hop = max(1, round(256 * scale))
    w = _waves([wave], "wave")[0]
    if len(w) <= n_fft:
        w = np.pad(w, (0, n_fft + 1 - len(w)))  # a very short clip still gets frames (and the STFT its padding)
    logmel = mel_spectrogram(torch.from_numpy(w), rate, n_fft=n_fft, hop=hop, n_mels=n_mels)[0].numpy()
    # unnormalised DCT-II / (2 * bands): the coefficients of log S = c0 + 2 * sum_k c_k cos(...), the cepstrum scale
    # the MCD constant is defined on (an orthonormal DCT would inflate every distance by sqrt(2 * bands))
    cep = dct(logmel.T.astype(np.float64), type=2, axis=1) / (2 * n_mels)
    return cep[:, 1 : n_coeffs + 1]


def mel_cepstral_distortion(wave: np.ndarray, reference: np.ndarray, rate: int, n_coeffs: int = 13) -> float:
    """MCD in dB between a synthesised ``wave`` and a recorded ``reference`` of the same sentence at ``rate``:
    per-frame ``(10 / ln 10) * sqrt(2 * sum_k (c_k - c'_k)^2)`` over mel cepstra c1..c_n, averaged over the DTW path
    that minimises it (0 for identical audio; a few dB between two good renderings of one speaker).

    Raises:
        DataError: an empty, non-1-D or non-finite waveform, or a bad rate.
    """
    rate = _rate(rate, "rate")
    a, b = mel_cepstrum(wave, rate, n_coeffs), mel_cepstrum(reference, rate, n_coeffs)
    frame_mcd = MCD_CONSTANT * np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    total, path = dtw(frame_mcd)
    return total / len(path)


def real_time_factor(seconds_to_synthesize: float, audio_seconds: float) -> float:
    """Seconds of compute per second of audio (below 1: faster than real time).

    Raises:
        DataError: no audio (zero or negative seconds), or a negative time.
    """
    if not audio_seconds > 0:
        raise DataError(f"real-time factor needs audio longer than 0 s, got {audio_seconds}; nothing was synthesised")
    if seconds_to_synthesize < 0:
        raise DataError(f"the synthesis time cannot be negative, got {seconds_to_synthesize}")
    return float(seconds_to_synthesize) / float(audio_seconds)


# ----------------------------------------------------------------------------------------------------------------
# a voice on held-out sentences


def synthesize_all(voice: Any, texts: Sequence[str], seed: int = 0) -> tuple[list[np.ndarray], list[float]]:
    """Each text spoken by ``voice`` (sentence ``i`` with noise from ``torch.Generator().manual_seed(seed + i)``, so
    every voice hears the same randomness), and the wall seconds each took."""
    waves, seconds = [], []
    for i, text in enumerate(texts):
        gen = torch.Generator().manual_seed(seed + i)
        start = time.perf_counter()
        with torch.inference_mode():
            wave = voice.speak(text, generator=gen)
        seconds.append(time.perf_counter() - start)
        waves.append(np.asarray(wave, dtype=np.float32))
    return waves, seconds


def measure_voice(
    voice: Any,
    held_out: Sequence[Any],
    *,
    texts: Sequence[str] | None = None,
    references: Sequence[np.ndarray] | None = None,
    seed: int = 0,
    n_coeffs: int = 13,
) -> dict[str, Any]:
    """Synthesise each held-out sentence with ``voice`` and measure it against the target's recordings.

    Args:
        voice: a ``transferkit.tts.voice.Voice`` (anything with ``speak(text, generator=)`` and ``sample_rate``).
        held_out: the target's held-out ``Utterance``s (``TtsData.held_out``): their texts are spoken, their
            recordings are the references.
        texts: other sentences to speak instead (one per held-out utterance).
        references: other recordings instead (one per held-out utterance, at the utterances' rate).
        seed: sentence ``i``'s noise seed is ``seed + i``.
        n_coeffs: mel cepstra in the MCD.

    Returns:
        {"speaker_similarity", "speaker_similarity_per_utterance", "wer", "hypotheses", "mcd_db", "rtf",
        "utterances": [{"name", "text", "hypothesis", "wer", "speaker_similarity", "mcd_db", "seconds",
        "synthesis_seconds"}], "rate", "threads", "waves"}; ``waves`` (the synthesised float32 arrays, for the
        report's samples) is the only entry that is not JSON: drop it before saving (``without_waves``).

    Raises:
        DataError: no held-out utterance, lengths that do not match, rates that differ between utterances, or a
            failure of a metric (pocketsphinx missing...).
    """
    if not held_out:
        raise DataError("no held-out utterances to measure the voice on; keep some out (read_tts_folder held_out=)")
    texts = [u.text for u in held_out] if texts is None else list(texts)
    if len(texts) != len(held_out):
        raise DataError(f"{len(texts)} text(s) for {len(held_out)} held-out utterance(s); give one text each")
    ref_rates = {int(u.rate) for u in held_out}
    if len(ref_rates) != 1:
        raise DataError(f"the held-out utterances have different rates {sorted(ref_rates)}; read them at one rate")
    ref_rate = ref_rates.pop()
    refs = _waves([u.wave for u in held_out] if references is None else list(references), "references")
    if len(refs) != len(held_out):
        raise DataError(f"{len(refs)} reference(s) for {len(held_out)} held-out utterance(s); give one each")
    rate = _rate(voice.sample_rate, "voice.sample_rate")
    waves, seconds = synthesize_all(voice, texts, seed)
    waves = _waves(waves, "synthesised waves")
    sim, per_sim = _similarities(speaker_embeddings(waves, rate), speaker_embeddings(refs, ref_rate))
    wer = word_error_rate(waves, rate, texts)
    refs_at_rate = [resample(r, ref_rate, rate) for r in refs]
    mcds = [mel_cepstral_distortion(w, r, rate, n_coeffs) for w, r in zip(waves, refs_at_rate, strict=True)]
    audio = [len(w) / rate for w in waves]
    names = [str(getattr(u, "name", i)) for i, u in enumerate(held_out)]
    rows = [
        {
            "name": names[i],
            "text": texts[i],
            "hypothesis": wer["hypotheses"][i],
            "wer": wer["per_utterance"][i]["wer"],
            "speaker_similarity": per_sim[i],
            "mcd_db": mcds[i],
            "seconds": audio[i],
            "synthesis_seconds": seconds[i],
        }
        for i in range(len(texts))
    ]
    return {
        "speaker_similarity": sim,
        "speaker_similarity_per_utterance": per_sim,
        "wer": wer["wer"],
        "hypotheses": wer["hypotheses"],
        "mcd_db": float(np.mean(mcds)),
        "rtf": real_time_factor(sum(seconds), sum(audio)),
        "utterances": rows,
        "rate": rate,
        "threads": torch.get_num_threads(),
        "waves": waves,
    }


def without_waves(measurements: Mapping[str, Any]) -> dict[str, Any]:
    """``measure_voice``'s / ``compare_voices``'s result without the waveforms (JSON-ready)."""
    if "waves" in measurements:
        return {k: v for k, v in measurements.items() if k != "waves"}
    return {k: without_waves(v) if isinstance(v, Mapping) else v for k, v in measurements.items()}


def compare_voices(
    voices: Mapping[str, Any], held_out: Sequence[Any], *, source: str = "source", seed: int = 0, **kwargs: Any
) -> dict[str, dict[str, Any]]:
    """``measure_voice`` for each voice on the same sentences and noise, plus ``similarity_to_source``: each voice's
    mean speaker embedding against that of the ``source`` voice's own output (1.0 for the source itself). An
    adapted voice should be closer to the target (``speaker_similarity``) than to its source.

    Args:
        voices: name -> voice, e.g. {"source": v0, "adapted": v1, "scratch": v2}; must hold ``source``.
        kwargs: passed to ``measure_voice`` (texts, references, n_coeffs).

    Raises:
        DataError: no voices, or no voice named ``source`` (naming the ones given).
    """
    if not voices:
        raise DataError("no voices to compare; give e.g. {'source': voice, 'adapted': adapted_voice}")
    if source not in voices:
        raise DataError(f"no voice named {source!r} among {sorted(voices)}; name the unadapted voice {source!r}")
    results = {name: measure_voice(v, held_out, seed=seed, **kwargs) for name, v in voices.items()}
    src = results[source]
    src_emb = speaker_embeddings(src["waves"], src["rate"])
    for r in results.values():
        r["similarity_to_source"] = _similarities(speaker_embeddings(r["waves"], r["rate"]), src_emb)[0]
    return results


__all__ = [
    "compare_voices",
    "dtw",
    "levenshtein",
    "measure_voice",
    "mel_cepstral_distortion",
    "mel_cepstrum",
    "normalize_words",
    "number_words",
    "per_utterance_similarity",
    "real_time_factor",
    "recognize",
    "speaker_embeddings",
    "speaker_encoder",
    "speaker_similarity",
    "synthesize_all",
    "wer_of",
    "without_waves",
    "word_error_rate",
]
