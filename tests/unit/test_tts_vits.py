"""The source voice of issue 17: the PyTorch VITS loaded from the packaged ONNX voice, its parity with ONNX Runtime,
text -> phoneme ids through espeak-ng, WAV writing and ``transferkit speak``."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from transferkit.cli import main
from transferkit.errors import DataError, DataNotFoundError, SourceError
from transferkit.tts import voice as voice_mod
from transferkit.tts.vits import VITS, RelativeAttention, VitsConfig, alignment_path, rational_quadratic_inverse
from transferkit.tts.voice import (
    load_voice,
    onnx_with_noise_inputs,
    ort_session,
    phoneme_ids,
    phonemize,
    resolve_voice,
    write_wav,
)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng binary not installed")

SENTENCE = "The quick brown fox jumps over the lazy dog."
# espeak-ng 1.51 (en-us): 'ðə kwˈɪk bɹˈaʊn fˈɑːks dʒˈʌmps ˌoʊvɚ ðə lˈeɪzi dˈɑːɡ.' through the joe voice's map
SENTENCE_IPA = "ðə kwˈɪk bɹˈaʊn fˈɑːks dʒˈʌmps ˌoʊvɚ ðə lˈeɪzi dˈɑːɡ."
SENTENCE_IDS = (
    [1, 0]
    + [
        i
        for p in [41, 59, 3, 23, 35, 120, 74, 23, 3, 15, 88, 120, 14, 100, 26, 3, 19, 120, 51, 122, 23, 31, 3, 17, 108]
        + [120, 102, 25, 28, 31, 3, 121, 27, 100, 34, 60, 3, 41, 59, 3, 24, 120, 18, 74, 38, 21, 3, 17, 120, 51, 122]
        + [66, 10]
        for i in (p, 0)
    ]
    + [2]
)


@pytest.fixture(scope="module")
def voice():
    return load_voice()


def _ort(session, ids: list[int], scales: list[float], **noise: torch.Tensor) -> np.ndarray:
    feed = {
        "input": np.array([ids], dtype=np.int64),
        "input_lengths": np.array([len(ids)], dtype=np.int64),
        "scales": np.array(scales, dtype=np.float32),
    }
    feed.update({k: v.numpy() for k, v in noise.items()})
    return session.run(None, feed)[0].reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# loading


def test_load_voice_fills_every_tensor_with_the_onnx_weights(voice):
    s = voice.report["summary"]
    assert s["coverage"] == 1.0 and s["fresh"] == 0 and s["source_tensors_unused"] == 0
    # named by name; the embedding table (called 'sid' by the exporter) by a rule read from its Gather node; the
    # 32 anonymous WaveNet kernels of the flow (onnx::Conv_*) by order and shape
    assert s["matched_by"] == {"names": 317, "rules": 1, "structure": 0, "order": 32}
    assert s["ambiguities"] == 0
    assert sum(p.numel() for p in voice.model.parameters()) == 15_650_459
    assert isinstance(voice.model, VITS) and not voice.model.training
    assert voice.sample_rate == 22050
    assert voice.settings.noise_scale == pytest.approx(0.667) and voice.settings.noise_w == pytest.approx(0.8)
    assert voice.settings.length_scale == 1.0
    assert voice.phoneme_id_map["^"] == [1] and voice.phoneme_id_map["ð"] == [41]
    rows = {r["name"]: r for r in voice.report["tensors"]}
    assert rows["enc_p.emb.weight"]["from"] == "sid" and rows["enc_p.emb.weight"]["match"] == "rules"
    assert rows["flow.flows.6.enc.in_layers.0.weight"]["match"] == "order"
    assert rows["flow.flows.6.enc.in_layers.0.weight"]["from"] == "onnx::Conv_8168"  # the first one the graph runs


def test_order_pairs_agree_with_the_nodes_consuming_them(voice):
    graph = voice_mod._graph(voice.path)
    consumer = {n.input[1]: voice_mod._scope(n.name) for n in graph.graph.node if n.op_type == "Conv"}
    order = [r for r in voice.report["tensors"] if r["match"] == "order"]
    assert len(order) == 32
    assert all(f"{consumer[r['from']]}.weight" == r["name"] for r in order)
    # the affine's logs came back from the folded exp(-logs) constant
    logs = voice.model.dp.flows[0].logs.detach()
    folded = next(i for i in graph.graph.initializer if i.name == "/dp/flows.0/Exp_output_0")
    from onnx import numpy_helper

    assert torch.allclose(torch.exp(-logs), torch.from_numpy(numpy_helper.to_array(folded).copy()), atol=1e-6)


def test_load_voice_errors_name_the_problem(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_voice(tmp_path / "none.onnx")
    (tmp_path / "v.onnx").write_bytes(b"not onnx")
    with pytest.raises(DataNotFoundError, match=r"v\.onnx\.json' is missing"):
        load_voice(tmp_path / "v.onnx")


# ----------------------------------------------------------------------------------------------------------------
# parity with ONNX Runtime


def test_parity_with_onnxruntime_without_noise(voice):
    ids = SENTENCE_IDS
    out = voice.model.infer(torch.tensor([ids]), noise_scale=0.0, length_scale=1.0, noise_w=0.0)
    ref = _ort(ort_session(voice.path), ids, [0.0, 1.0, 0.0])
    wave = out.wave[0].numpy()
    assert wave.shape == ref.shape == (int(out.lengths[0]),)
    assert len(wave) == 256 * int(out.durations.sum())
    assert np.abs(wave - ref).max() <= 1e-3
    assert np.abs(ref).max() > 0.1  # speech, not silence


def test_parity_with_onnxruntime_on_the_same_noise(voice):
    """The graph's two RandomNormalLike nodes become inputs, fed the noise the PyTorch model drew."""
    ids = SENTENCE_IDS
    scales = [0.667, 1.2, 0.8]
    out = voice.model.infer(
        torch.tensor([ids]),
        noise_scale=0.667,
        length_scale=1.2,
        noise_w=0.8,
        generator=torch.Generator().manual_seed(3),
    )
    assert out.noise_dp.shape == (1, 2, len(ids)) and out.noise_z.shape[:2] == (1, 192)
    session = ort_session(onnx_with_noise_inputs(voice.path))
    ref = _ort(session, ids, scales, noise_dp=out.noise_dp, noise_z=out.noise_z)
    wave = out.wave[0].numpy()
    assert wave.shape == ref.shape
    assert np.abs(wave - ref).max() <= 1e-3


def test_the_noise_changes_durations_and_audio_only_when_scaled(voice):
    ids = torch.tensor([SENTENCE_IDS[:41]])  # "the quick brown fox": short and fast
    det = [
        voice.model.infer(ids, noise_scale=0.0, noise_w=0.0, generator=torch.Generator().manual_seed(s)) for s in (0, 1)
    ]
    assert torch.equal(det[0].wave, det[1].wave)
    noisy = [voice.model.infer(ids, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    frames = [int(o.durations.sum()) for o in noisy]
    assert len(set(frames)) > 1  # noise_w 0.8 moves the durations
    again = voice.model.infer(ids, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.wave, noisy[0].wave)  # the generator fixes the result
    # stochastic durations scatter around the deterministic ones (same speaking rate within 25 %)
    assert abs(np.mean(frames) / int(det[0].durations.sum()) - 1) < 0.25


def test_batch_of_two_matches_each_item_alone(voice):
    a, b = SENTENCE_IDS[:21], SENTENCE_IDS[:41]
    ids = torch.zeros(2, len(b), dtype=torch.long)
    ids[0, : len(a)], ids[1] = torch.tensor(a), torch.tensor(b)
    out = voice.model.infer(ids, torch.tensor([len(a), len(b)]), noise_scale=0.0, noise_w=0.0)
    alone = voice.model.infer(torch.tensor([a]), noise_scale=0.0, noise_w=0.0)
    assert torch.equal(out.durations[0, : len(a)], alone.durations[0])
    assert int(out.lengths[0]) == int(alone.lengths[0])
    # the decoder sees zeros after the item in the batch, alone it sees the end: only the last frames may differ
    n = int(alone.lengths[0]) - 256 * 8
    assert (out.wave[0, :n] - alone.wave[0, :n]).abs().max() < 1e-3


# ----------------------------------------------------------------------------------------------------------------
# the pieces, against hand-written references


def _rq_forward(x, widths, heights, derivs, bound):
    """The spline's forward map, written directly from Durkan et al. 2019 eq. 4 (for inverting-tests)."""
    import torch.nn.functional as F

    k = widths.shape[-1]

    def knots(u):
        s = 1e-3 + (1 - 1e-3 * k) * torch.softmax(u, -1)
        return torch.cat([torch.zeros(1), torch.cumsum(s, -1)]) * 2 * bound - bound

    xk, yk = knots(widths), knots(heights)
    xk[-1], yk[-1] = bound, bound
    d = torch.cat([torch.ones(1), 1e-3 + F.softplus(derivs), torch.ones(1)])
    if not -bound <= x <= bound:
        return x
    i = int(torch.searchsorted(xk, torch.tensor([x]), right=True)[0]) - 1
    i = min(max(i, 0), k - 1)
    w, h = xk[i + 1] - xk[i], yk[i + 1] - yk[i]
    s, xi = h / w, (x - xk[i]) / w
    num = h * (s * xi**2 + d[i] * xi * (1 - xi))
    den = s + (d[i + 1] + d[i] - 2 * s) * xi * (1 - xi)
    return float(yk[i] + num / den)


def test_rational_quadratic_inverse_inverts_the_spline_and_is_identity_outside():
    g = torch.Generator().manual_seed(0)
    widths, heights, derivs = torch.randn(10, generator=g), torch.randn(10, generator=g), torch.randn(9, generator=g)
    xs = [-6.0, -4.9, -2.5, -0.3, 0.0, 1.7, 3.3, 4.99, 7.5]
    ys = torch.tensor([_rq_forward(x, widths, heights, derivs, 5.0) for x in xs])
    back = rational_quadratic_inverse(
        ys, widths.expand(len(xs), 10), heights.expand(len(xs), 10), derivs.expand(len(xs), 9), 5.0
    )
    assert torch.allclose(back, torch.tensor(xs), atol=1e-4)
    assert back[0] == -6.0 and back[-1] == 7.5  # linear tails: the identity


def test_relative_attention_matches_a_loop_over_positions():
    torch.manual_seed(0)
    attn = RelativeAttention(8, 2, window=2).eval()
    x = torch.randn(1, 8, 6)
    mask = torch.ones(1, 1, 6, 6)
    got = attn(x, mask)
    q = attn.conv_q(x).view(2, 4, 6) / 2.0  # sqrt(k_channels=4)
    k, v = attn.conv_k(x).view(2, 4, 6), attn.conv_v(x).view(2, 4, 6)
    ek, ev = attn.emb_rel_k[0], attn.emb_rel_v[0]
    out = torch.zeros(2, 4, 6)
    for h in range(2):
        for i in range(6):
            logits = torch.stack(
                [q[h, :, i] @ k[h, :, j] + (q[h, :, i] @ ek[j - i + 2] if abs(j - i) <= 2 else 0) for j in range(6)]
            )
            p = torch.softmax(logits, 0)
            for j in range(6):
                out[h, :, i] += p[j] * (v[h, :, j] + (ev[j - i + 2] if abs(j - i) <= 2 else 0))
    want = attn.conv_o(out.reshape(1, 8, 6))
    assert torch.allclose(got, want, atol=1e-5)


def test_alignment_path_gives_each_phoneme_its_frames():
    d = torch.tensor([[2.0, 0.0, 3.0]])
    path = alignment_path(d, torch.ones(1, 1, 3), torch.ones(1, 1, 5))
    assert path[0].tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]]


def test_tiny_vits_runs_and_hops():
    cfg = VitsConfig(
        n_vocab=20, hidden=16, inter=8, filter=32, n_layers=1, dp_filter=16, up_initial=16, up_rates=(2, 2),
        up_kernels=(4, 4), res_kernels=(3,), res_dilations=((1, 2),),
    )  # fmt: skip
    out = VITS(cfg).eval().infer(torch.tensor([[1, 5, 7, 2]]), generator=torch.Generator().manual_seed(0))
    assert out.wave.shape[1] == 4 * int(out.durations.sum()) == int(out.lengths[0])
    assert out.wave.abs().max() <= 1.0


# ----------------------------------------------------------------------------------------------------------------
# text -> ids


def test_phoneme_ids_convention():
    id_map = {"_": [0], "^": [1], "$": [2], "a": [5], "b": [6], " ": [3]}
    assert phoneme_ids("ab a", id_map) == [1, 0, 5, 0, 6, 0, 3, 0, 5, 0, 2]
    with pytest.raises(DataError, match=r"no id for phoneme\(s\) 'z' \(U\+007A\)"):
        phoneme_ids("az", id_map)
    with pytest.raises(DataError, match="lacks"):
        phoneme_ids("a", {"a": [1]})


@needs_espeak
def test_phonemes_of_a_sentence(voice):
    assert phonemize(SENTENCE) == SENTENCE_IPA
    assert voice.phonemes(SENTENCE) == SENTENCE_IDS
    assert phonemize("Hello, world!") == "həlˈoʊ, wˈɜːld!"  # the clause punctuation espeak-ng drops is kept


@needs_espeak
def test_speak_gives_a_waveform(voice):
    wave = voice.speak("Hello, world!", generator=torch.Generator().manual_seed(0))
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.5 < len(wave) / voice.sample_rate < 3.0 and np.abs(wave).max() > 0.1


def test_bad_text_errors(voice, monkeypatch):
    with pytest.raises(DataError, match="empty"):
        voice.phonemes("   ")
    with pytest.raises(DataError, match=r"U\+0001"):
        voice.phonemes("hi \x01 there")
    if shutil.which("espeak-ng"):
        with pytest.raises(DataError, match="nothing to pronounce"):
            voice.phonemes("...")
        with pytest.raises(DataError, match="voice"):
            phonemize("hello", voice="xx-nonexistent")
    monkeypatch.setattr(voice_mod.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="espeak-ng is not installed.*apt-get install espeak-ng"):
        voice.phonemes("hello")


# ----------------------------------------------------------------------------------------------------------------
# WAV and CLI


def test_write_wav_roundtrip_and_refusals(tmp_path):
    wave = 0.5 * np.sin(np.linspace(0, 200 * math.pi, 2205)).astype(np.float32)
    path = write_wav(tmp_path / "a.wav", wave, 22050)
    back, rate = sf.read(path, dtype="float32")
    assert rate == 22050 and back.shape == wave.shape and np.abs(back - wave).max() < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]  # no temporary file left
    with pytest.raises(DataError, match="NaN"):
        write_wav(tmp_path / "b.wav", np.array([0.0, np.nan]), 22050)
    with pytest.raises(DataError, match="1-D"):
        write_wav(tmp_path / "b.wav", np.zeros((2, 2)), 22050)
    assert not (tmp_path / "b.wav").exists()


def test_resolve_voice(tmp_path, voice):
    assert resolve_voice(None) == voice.path
    assert resolve_voice(voice.path) == voice.path
    with pytest.raises(DataError, match="no NAME.onnx voice.*adapted voices"):
        resolve_voice(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="not an .onnx file"):
        resolve_voice(tmp_path / "x.txt")


@needs_espeak
def test_cli_speak_writes_the_wav(tmp_path, capsys):
    out = tmp_path / "a.wav"
    assert main(["speak", "Hello, world!", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    wave, rate = sf.read(out)
    assert rate == 22050 and len(wave) > 11025
    assert f"{len(wave) / rate:.2f} s of audio" in printed and "real-time factor" in printed


def test_cli_speak_refuses_a_path_that_is_no_voice(tmp_path, capsys):
    assert main(["speak", str(tmp_path), "Hello.", "--out", str(tmp_path / "a.wav")]) == 1
    err = capsys.readouterr().err
    assert "no NAME.onnx voice" in err and "give one .onnx voice file" in err
    assert not (tmp_path / "a.wav").exists()
    assert main(["speak", str(Path(tmp_path) / "missing.onnx"), "Hello.", "--out", str(tmp_path / "a.wav")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_wrong_order_of_anonymous_tensors_is_caught(monkeypatch):
    """Handed over in the graph's execution order (the flow runs backwards: flows.6 first), the anonymous kernels
    would pair with the wrong couplings; the check against the consuming nodes refuses the voice."""
    real = voice_mod.onnx_source_tensors

    def graph_order(model):
        state, rules, scopes = real(model)
        file_order = [i.name for i in model.graph.initializer if i.name in state]
        return {n: state[n] for n in file_order + [n for n in state if n not in file_order]}, rules, scopes

    monkeypatch.setattr(voice_mod, "onnx_source_tensors", graph_order)
    with pytest.raises(SourceError, match=r"paired against the graph: flow\.flows\.0\.enc\.in_layers\.0\.weight"):
        load_voice()
