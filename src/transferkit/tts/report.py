"""``report.html`` of a speech-synthesis run: the measurements of each voice in one table, and what they sound like.

One self-contained file (inline CSS, every sample a base64 WAV in a ``data:`` URI, no script), so it can be mailed or
opened from an archive: each voice's samples play beside their sentence and pocketsphinx's transcript, and the
target's held-out recordings are there to compare by ear.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import DataError

REPORT = "report.html"
TARGET = "target"  # the key of ``samples`` holding the target speaker's recordings
# (column title, key in a voice's measurements, format, what a reader should look for)
COLUMNS = (
    ("similarity to target", "speaker_similarity", "{:.3f}", "cosine of Resemblyzer embeddings; higher is closer"),
    ("similarity to source", "similarity_to_source", "{:.3f}", "the same against the source voice's output"),
    ("WER", "wer", "{:.1%}", "pocketsphinx word error rate; lower is more intelligible"),
    ("MCD (dB)", "mcd_db", "{:.2f}", "mel-cepstral distortion against the target recordings, DTW-aligned; lower"),
    ("RTF", "rtf", "{:.3f}", "synthesis seconds per audio second; below 1 is faster than real time"),
)
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.sample{margin:.5em 0}.sample p{margin:.2em 0}.hyp{color:#666;font-size:.9em}audio{height:2em}
"""


def wav_data_uri(wave: np.ndarray, rate: int) -> str:
    """``data:audio/wav;base64,...`` of a mono float waveform as 16-bit PCM (clipped to [-1, 1]).

    Raises:
        DataError: the waveform is empty, not 1-D or not finite, or the rate is not positive.
    """
    import soundfile as sf

    data = np.asarray(wave, dtype=np.float32)
    if data.ndim != 1 or data.size == 0 or not np.isfinite(data).all():
        raise DataError(f"a sample must be a non-empty finite 1-D waveform, got shape {data.shape}")
    if rate <= 0:
        raise DataError(f"sample rate must be positive, got {rate}")
    buf = io.BytesIO()
    sf.write(buf, np.clip(data, -1.0, 1.0), int(rate), subtype="PCM_16", format="WAV")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '<td class="num">-</td>'
    return f'<td class="num">{html.escape(fmt.format(value))}</td>'


def _table(measurements: Mapping[str, Mapping[str, Any]]) -> str:
    head = "".join(f'<th title="{html.escape(tip)}">{html.escape(title)}</th>' for title, _, _, tip in COLUMNS)
    rows = [
        f"<tr><th>{html.escape(str(name))}</th>"
        + "".join(_cell(m.get(key), fmt) for _, key, fmt, _ in COLUMNS)
        + "</tr>"
        for name, m in measurements.items()
    ]
    return f"<table>\n<tr><th>voice</th>{head}</tr>\n" + "\n".join(rows) + "\n</table>"


def _samples(name: str, items: Sequence[tuple[str, np.ndarray]], rate: int, hyps: Sequence[str]) -> str:
    out = [f"<h3>{html.escape(str(name))}</h3>"]
    for i, (text, wave) in enumerate(items):
        hyp = f'<p class="hyp">heard: {html.escape(hyps[i])}</p>' if i < len(hyps) else ""
        out.append(
            f'<div class="sample"><p>{html.escape(str(text))}</p>{hyp}'
            f'<audio controls preload="none" src="{wav_data_uri(wave, rate)}"></audio></div>'
        )
    return "\n".join(out)


def write_tts_report(
    folder: str | Path,
    measurements: Mapping[str, Mapping[str, Any]],
    samples: Mapping[str, Sequence[tuple[str, np.ndarray]]],
    rate: int,
    *,
    title: str = "Speech synthesis",
    notes: Sequence[str] = (),
) -> Path:
    """Write ``folder/report.html`` atomically: the measurements table and the playable samples.

    Args:
        measurements: voice name -> its measurements (``compare_voices``'s result, or ``measure_voice``'s plus
            ``similarity_to_source``); a missing or non-finite value shows as "-".
        samples: voice name -> [(sentence, waveform)], the waveforms at ``rate``; the key ``"target"`` holds the
            target speaker's held-out recordings, shown first as the reference.
        rate: samples per second of every waveform.
        title: the page's heading.
        notes: lines shown under the heading (e.g. "the target is a synthetic espeak-ng speaker").

    Returns:
        The report's path.

    Raises:
        DataError: no measurements, or a sample that is not a playable waveform.
    """
    from transferkit.io import atomic_write

    if not measurements:
        raise DataError("no measurements to report; run compare_voices (or measure_voice) first")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p>{html.escape(str(n))}</p>" for n in notes),
        "<h2>Measurements on held-out sentences</h2>",
        _table(measurements),
        "<h2>Samples</h2>",
    ]
    order = [TARGET] * (TARGET in samples) + [k for k in samples if k != TARGET]
    for name in order:
        hyps = [] if name == TARGET else list((measurements.get(name) or {}).get("hypotheses", []))
        label = "target (held-out recordings)" if name == TARGET else name
        parts.append(_samples(label, samples[name], rate, hyps))
    parts.append("</body></html>\n")
    text = "\n".join(parts)
    return atomic_write(Path(folder) / REPORT, lambda p: p.write_text(text, encoding="utf-8"))


def report_samples(
    comparison: Mapping[str, Mapping[str, Any]], held_out: Sequence[Any], n: int = 3
) -> dict[str, list[tuple[str, np.ndarray]]]:
    """The first ``n`` sentences of each voice in ``compare_voices``'s result (its ``waves``) and the target's
    recordings of them, as ``write_tts_report``'s ``samples`` (the recordings must be at the voices' rate)."""
    out: dict[str, list[tuple[str, np.ndarray]]] = {TARGET: [(u.text, u.wave) for u in held_out[:n]]}
    for name, m in comparison.items():
        texts = [u["text"] for u in m.get("utterances", [])]
        out[name] = list(zip(texts[:n], list(m.get("waves", []))[:n], strict=False))
    return out
