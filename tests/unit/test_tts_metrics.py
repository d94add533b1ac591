"""The measurements of speech synthesis (issue 17, point 3): WER (own Levenshtein, pocketsphinx on real speech),
speaker similarity (Resemblyzer), mel-cepstral distortion (own DTW), real-time factor, measure_voice on the joe
voice, compare_voices, and the report with playable samples.

The target speaker is synthetic: espeak-ng's formant synthesiser, variant ``en-us+f3`` (a female voice very unlike
joe), as in the adaptation tests.
"""

from __future__ import annotations

import base64
import io
import itertools
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from transferkit.errors import DataError
from transferkit.tts import metrics as M
from transferkit.tts.data import read_tts_folder
from transferkit.tts.report import report_samples, wav_data_uri, write_tts_report

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
try:
    import pocketsphinx  # noqa: F401

    HAVE_SPHINX = True
except ImportError:
    HAVE_SPHINX = False
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng binary not installed: it speaks the test audio")
needs_sphinx = pytest.mark.skipif(not HAVE_SPHINX, reason="pocketsphinx not installed: pip install pocketsphinx==5.1.1")

SENTENCES = [
    "The sun is warm today.",
    "Please open the door.",
    "We walk to the old mill.",
    "Hello there, my friend.",
]


def espeak(path: Path, text: str, variant: str = "en-us+f3", speed: int = 175) -> tuple[np.ndarray, int]:
    subprocess.run(["espeak-ng", "-v", variant, "-s", str(speed), "-w", str(path), text], check=True, timeout=60)
    wave, rate = sf.read(str(path), dtype="float32")
    return wave, rate


def espeak_speaker(root: Path, variant: str = "en-us+f3") -> Path:
    """A synthetic target speaker folder (metadata.csv + one WAV per sentence)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(SENTENCES):
        espeak(root / f"u{i}.wav", text, variant)
    (root / "metadata.csv").write_text("".join(f"u{i}|{t}\n" for i, t in enumerate(SENTENCES)), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """{variant: [(wave, rate)] per sentence} for the f3 target and espeak's default (male) en-us voice."""
    if not HAVE_ESPEAK:
        pytest.skip("espeak-ng binary not installed: it speaks the test audio")
    root = tmp_path_factory.mktemp("espeak")
    return {v: [espeak(root / f"{v}-{i}.wav", t, v) for i, t in enumerate(SENTENCES)] for v in ("en-us+f3", "en-us")}


class RecordedVoice:
    """A stand-in voice that "speaks" stored recordings (compare_voices' logic without a neural model)."""

    def __init__(self, by_text: dict[str, np.ndarray], rate: int):
        self.by_text, self.sample_rate = by_text, rate

    def speak(self, text: str, *, generator=None) -> np.ndarray:
        return self.by_text[text]


# ----------------------------------------------------------------------------------------------------------------
# Levenshtein and WER


@pytest.mark.parametrize(
    ("ref", "hyp", "expected"),
    [
        ("a b c", "a b c", (0, 0, 0, 0)),
        ("a b c", "a x c", (1, 1, 0, 0)),
        ("a b c", "a c", (1, 0, 1, 0)),
        ("a b", "a b c", (1, 0, 0, 1)),
        ("", "x y", (2, 0, 0, 2)),
        ("x", "", (1, 0, 1, 0)),
        ("k i t t e n", "s i t t i n g", (3, 2, 0, 1)),  # the textbook kitten -> sitting
        ("the cat sat on the mat", "cat sat on a mat today", (3, 1, 1, 1)),
    ],
)
def test_levenshtein_hand_cases(ref, hyp, expected):
    e = M.levenshtein(ref.split(), hyp.split())
    assert (e["distance"], e["substitutions"], e["deletions"], e["insertions"]) == expected
    assert e["distance"] == e["substitutions"] + e["deletions"] + e["insertions"]


def test_normalisation_lowercases_strips_punctuation_and_spells_numbers():
    assert M.normalize_words("Hello, World! It's 42 -- 'quoted'.") == [
        "hello",
        "world",
        "it's",
        "forty",
        "two",
        "quoted",
    ]
    assert M.normalize_words("Café co-op_x") == ["cafe", "co", "op", "x"]
    assert [M.number_words(n) for n in (0, 13, 40, 105, 1905, 2000000)] == [
        "zero",
        "thirteen",
        "forty",
        "one hundred five",
        "one thousand nine hundred five",
        "two million",
    ]


def test_wer_pools_edits_over_the_corpus_and_refuses_bad_inputs():
    r = M.wer_of(["The cat sat.", "A dog!"], ["the cat sat on", ""])
    assert (r["errors"], r["reference_words"]) == (3, 5)  # one insertion, two deletions
    assert r["wer"] == pytest.approx(0.6)
    assert [u["wer"] for u in r["per_utterance"]] == [pytest.approx(1 / 3), 1.0]
    with pytest.raises(DataError, match="2 reference text.* but 1 transcript"):
        M.wer_of(["a", "b"], ["a"])
    with pytest.raises(DataError, match="no sentences"):
        M.wer_of([], [])
    with pytest.raises(DataError, match="no words after normalisation"):
        M.wer_of(["?!"], ["x"])


def test_word_error_rate_refuses_empty_and_mismatched_inputs():
    wave = np.zeros(1600, dtype=np.float32)
    with pytest.raises(DataError, match="waves is empty"):
        M.word_error_rate([], 16000, [])
    with pytest.raises(DataError, match="1 waveform.* but 2 text"):
        M.word_error_rate([wave], 16000, ["a", "b"])
    with pytest.raises(DataError, match=r"waves\[0\] holds NaN"):
        M.word_error_rate([np.full(10, np.nan, dtype=np.float32)], 16000, ["a"])
    with pytest.raises(DataError, match="list of waveforms"):
        M.word_error_rate(wave, 16000, ["a"])  # type: ignore[arg-type]


def test_missing_pocketsphinx_names_the_pip_command(monkeypatch):
    M._decoder.cache_clear()
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # makes `import pocketsphinx` raise ImportError
    try:
        with pytest.raises(DataError, match=re.escape("pip install pocketsphinx==5.1.1")):
            M.word_error_rate([np.zeros(1600, dtype=np.float32)], 16000, ["hello"])
    finally:
        M._decoder.cache_clear()


@needs_espeak
@needs_sphinx
def test_pocketsphinx_recognises_real_espeak_speech(tmp_path):
    # measured with pocketsphinx 5.1.1: the f3 variant at 140 words/min is heard exactly ("the sun is warm today");
    # espeak's default male en-us voice is mostly not ("so we were very"), so the test speaks the one it can hear
    wave, rate = espeak(tmp_path / "a.wav", SENTENCES[0], "en-us+f3", speed=140)
    r = M.word_error_rate([wave], rate, [SENTENCES[0]])
    assert r["wer"] < 0.5, r["hypotheses"]
    assert r["hypotheses"][0].split()[:3] == ["the", "sun", "is"]
    # silence is heard as nothing (or next to nothing): every reference word is then an error
    silent = M.word_error_rate([np.zeros(rate, dtype=np.float32)], rate, ["one two three"])
    assert silent["wer"] >= 2 / 3


# ----------------------------------------------------------------------------------------------------------------
# speaker similarity


def test_the_same_espeak_voice_is_more_similar_to_itself_than_a_different_variant(recordings):
    f3, male = recordings["en-us+f3"], recordings["en-us"]
    rate = f3[0][1]
    refs = [w for w, _ in f3[:2]]  # the target's "held-out" recordings: sentences 0, 1
    same = M.speaker_similarity([w for w, _ in f3[2:]], rate, refs, rate)  # sentences 2, 3 by the same voice
    other = M.speaker_similarity([w for w, _ in male[2:]], rate, refs, rate)  # ... by espeak's male voice
    assert -1.0 <= other < same <= 1.0
    assert same - other > 0.05, (same, other)
    per = M.per_utterance_similarity([w for w, _ in f3[2:]] + [w for w, _ in male[2:]], rate, refs, rate)
    assert min(per[:2]) > max(per[2:]), per
    # an embedding is L2-normalised, and a recording is identical to itself
    emb = M.speaker_embeddings(refs, rate)
    assert emb.shape == (2, 256) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert M.speaker_similarity(refs[:1], rate, refs[:1], rate) == pytest.approx(1.0, abs=1e-6)


def test_speaker_similarity_refuses_empty_lists_and_bad_rates():
    wave = np.zeros(1600, dtype=np.float32)
    with pytest.raises(DataError, match="references is empty|waves is empty"):
        M.speaker_similarity([wave], 16000, [], 16000)
    with pytest.raises(DataError, match="rate must be a positive"):
        M.speaker_similarity([wave], 0, [wave], 16000)
    with pytest.raises(DataError, match=r"waves\[0\] must be a non-empty 1-D"):
        M.speaker_similarity([np.zeros((2, 10), dtype=np.float32)], 16000, [wave], 16000)


# ----------------------------------------------------------------------------------------------------------------
# DTW and mel-cepstral distortion


def brute_force_dtw(cost: np.ndarray) -> float:
    """Least total cost over every monotonic path (steps (1,0), (0,1), (1,1)) by enumeration."""
    n, m = cost.shape
    best = math.inf

    def walk(i: int, j: int, total: float) -> None:
        nonlocal best
        total += cost[i, j]
        if (i, j) == (n - 1, m - 1):
            best = min(best, total)
            return
        for di, dj in ((1, 0), (0, 1), (1, 1)):
            if i + di < n and j + dj < m:
                walk(i + di, j + dj, total)

    walk(0, 0, 0.0)
    return best


@pytest.mark.parametrize(("n", "m"), [(1, 1), (1, 4), (3, 1), (3, 3), (4, 5), (5, 3)])
def test_dtw_equals_brute_force_and_returns_a_valid_path(n, m):
    rng = np.random.default_rng(n * 10 + m)
    for _ in range(5):
        cost = rng.random((n, m))
        total, path = M.dtw(cost)
        assert total == pytest.approx(brute_force_dtw(cost))
        assert path[0] == (0, 0) and path[-1] == (n - 1, m - 1)
        steps = {(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(path)}
        assert steps <= {(1, 0), (0, 1), (1, 1)}
        assert sum(cost[i, j] for i, j in path) == pytest.approx(total)
    with pytest.raises(DataError, match="non-empty"):
        M.dtw(np.zeros((0, 3)))


def test_dtw_follows_a_time_shift():
    a = np.array([0.0, 0.0, 1.0, 2.0, 3.0, 0.0])
    b = np.array([0.0, 1.0, 2.0, 3.0, 0.0, 0.0])  # a one step earlier
    total, path = M.dtw(np.abs(a[:, None] - b[None, :]))
    assert total == 0.0
    assert (2, 1) in path and (4, 3) in path


def harmonic(seconds: float = 1.0, rate: int = 22050, f0: float = 140.0, seed: int = 0) -> np.ndarray:
    """A voiced-like test signal: harmonics of a gliding f0 under a slow envelope, plus a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (f0 * t + 20 * t**2)
    x = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.5 * t))
    x += 0.003 * np.random.default_rng(seed).standard_normal(len(t))
    return (0.2 * x).astype(np.float32)


def test_mcd_is_zero_on_itself_grows_with_distortion_and_ignores_loudness():
    rate = 22050
    x = harmonic(rate=rate)
    noise = np.random.default_rng(1).standard_normal(len(x)).astype(np.float32)
    assert M.mel_cepstral_distortion(x, x, rate) == 0.0
    mcds = [M.mel_cepstral_distortion(x + s * noise, x, rate) for s in (0.003, 0.03, 0.3)]
    assert 0.0 < mcds[0] < mcds[1] < mcds[2], mcds
    assert M.mel_cepstral_distortion(x, x + 0.3 * noise, rate) == pytest.approx(mcds[2], rel=0.05)  # ~symmetric
    # c0 is dropped: halving the volume shifts every log-mel band by the same log 2, which only c0 sees
    assert M.mel_cepstral_distortion(0.5 * x, x, rate) < 0.05
    # a delayed copy costs little: DTW aligns the frames
    delayed = np.concatenate([np.zeros(2048, dtype=np.float32), x])
    assert M.mel_cepstral_distortion(delayed, x, rate) < 0.2 * mcds[1]
    cep = M.mel_cepstrum(x, rate, n_coeffs=24)
    assert cep.shape == (len(x) // 256, 24)
    with pytest.raises(DataError, match="n_coeffs must be between 1 and 79"):
        M.mel_cepstrum(x, rate, n_coeffs=80)
    with pytest.raises(DataError, match="non-empty 1-D"):
        M.mel_cepstral_distortion(np.zeros(0, dtype=np.float32), x, rate)


def test_real_time_factor():
    assert M.real_time_factor(1.5, 3.0) == 0.5
    with pytest.raises(DataError, match="audio longer than 0 s"):
        M.real_time_factor(1.0, 0.0)
    with pytest.raises(DataError, match="cannot be negative"):
        M.real_time_factor(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# a voice on held-out sentences


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    if not HAVE_ESPEAK:
        pytest.skip("espeak-ng binary not installed: it speaks the synthetic target")
    return espeak_speaker(tmp_path_factory.mktemp("f3"))


@needs_sphinx
def test_measure_voice_on_the_joe_voice_against_an_espeak_target(target):
    from transferkit.tts.voice import load_voice

    voice = load_voice()
    data = read_tts_folder(target, voice.sample_rate, held_out=2, seed=0)
    m = M.measure_voice(voice, data.held_out)
    assert set(m) >= {"speaker_similarity", "speaker_similarity_per_utterance", "wer", "hypotheses", "mcd_db", "rtf"}
    assert 0.0 <= m["speaker_similarity"] <= 1.0
    assert len(m["speaker_similarity_per_utterance"]) == 2
    assert all(0.0 <= s <= 1.0 for s in m["speaker_similarity_per_utterance"])
    # joe is intelligible: measured 0.0-0.2 here ("hello there, my friend" is heard "oh they're my friend")
    assert 0.0 <= m["wer"] <= 0.34, m["hypotheses"]
    assert 1.0 < m["mcd_db"] < 20.0  # another speaker, another synthesiser: measured ~5.2 dB
    assert 0.0 < m["rtf"] < 5.0 and math.isfinite(m["rtf"])
    assert [u["text"] for u in m["utterances"]] == [u.text for u in data.held_out]
    assert all(len(w) > 0.5 * voice.sample_rate for w in m["waves"])
    assert "waves" not in M.without_waves(m) and M.without_waves(m)["wer"] == m["wer"]
    # same seed, same noise: the synthesis is reproducible
    again, _ = M.synthesize_all(voice, [data.held_out[0].text], seed=0)
    assert np.array_equal(again[0], m["waves"][0])
    with pytest.raises(DataError, match="no held-out utterances"):
        M.measure_voice(voice, [])
    with pytest.raises(DataError, match="1 text.* for 2 held-out"):
        M.measure_voice(voice, data.held_out, texts=["one"])


@needs_sphinx
def test_compare_voices_adds_similarity_to_the_source_and_the_report_plays_every_sample(target, recordings, tmp_path):
    data = read_tts_folder(target, 22050, held_out=2, seed=0)
    f3 = {u.text: u.wave for u in data.held_out}  # the target's recordings as read (cut to whole hops)
    male = {t: w for (w, _), t in zip(recordings["en-us"], SENTENCES, strict=True)}
    voices = {"source": RecordedVoice(male, 22050), "adapted": RecordedVoice(f3, 22050)}
    c = M.compare_voices(voices, data.held_out)
    # "adapted" speaks the target's own recordings: identical to the references
    assert c["adapted"]["speaker_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert c["adapted"]["mcd_db"] == pytest.approx(0.0, abs=1e-9)
    assert c["source"]["similarity_to_source"] == pytest.approx(1.0, abs=1e-6)
    assert c["adapted"]["similarity_to_source"] < c["adapted"]["speaker_similarity"]
    assert c["source"]["speaker_similarity"] < c["adapted"]["speaker_similarity"]
    with pytest.raises(DataError, match="no voice named 'source' among \\['adapted'\\]"):
        M.compare_voices({"adapted": voices["adapted"]}, data.held_out)

    samples = report_samples(c, data.held_out, n=2)
    samples["adapted"][0] = ("<b>Tom & Jerry</b>", samples["adapted"][0][1])
    path = write_tts_report(tmp_path, c, samples, 22050, notes=["the target is a synthetic espeak-ng speaker"])
    page = path.read_text(encoding="utf-8")
    assert path.name == "report.html" and not list(tmp_path.glob("*.tmp"))
    assert page.count("<audio controls") == 6 == sum(len(v) for v in samples.values())  # target + 2 voices, 2 each
    assert "&lt;b&gt;Tom &amp; Jerry&lt;/b&gt;" in page and "<b>Tom" not in page
    row = re.search(r"<tr><th>source</th>(.*?)</tr>", page)
    assert row is not None
    cells = re.findall(r'<td class="num">([^<]*)</td>', row.group(1))
    src = c["source"]
    expected = [f"{src['speaker_similarity']:.3f}", "1.000", f"{src['wer']:.1%}", f"{src['mcd_db']:.2f}"]
    assert cells[:4] == [html_escape(e) for e in expected]
    assert page.index("target (held-out recordings)") < page.index("<h3>source</h3>")
    # a sample decodes back to the waveform it was given (16-bit PCM)
    uri = re.search(r'src="data:audio/wav;base64,([^"]+)"', page)
    assert uri is not None
    wave, rate = sf.read(io.BytesIO(base64.b64decode(uri.group(1))), dtype="float32")
    assert rate == 22050 and np.allclose(wave, samples["target"][0][1], atol=1 / 32767 + 1e-6)


def html_escape(s: str) -> str:
    import html

    return html.escape(s)


def test_report_refuses_nothing_to_report_and_unplayable_samples(tmp_path):
    with pytest.raises(DataError, match="no measurements"):
        write_tts_report(tmp_path, {}, {}, 22050)
    with pytest.raises(DataError, match="non-empty finite 1-D"):
        wav_data_uri(np.array([np.nan], dtype=np.float32), 22050)
    # a missing value shows as "-", not as an error
    path = write_tts_report(tmp_path, {"scratch": {"wer": 1.0, "mcd_db": float("nan")}}, {}, 22050)
    page = path.read_text(encoding="utf-8")
    assert page.count('<td class="num">-</td>') == 4 and "100.0%" in page
