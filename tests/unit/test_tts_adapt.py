"""Speaker adaptation of the joe voice (issue 17, point 2): the target speaker's folder, spectrograms, monotonic
alignment search, the VITS losses, and ``adapt`` (what trains, exact resume, NaN, saving and reloading the voice).

The "new speaker" of the training tests is synthetic: espeak-ng's formant synthesiser with a female variant
(``en-us+f3``), a voice very unlike joe; the metadata tests use sine tones written with soundfile.
"""

from __future__ import annotations

import itertools
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from transferkit.cli import main
from transferkit.errors import DataError, DataNotFoundError, SourceError, TrainingError
from transferkit.models.audio import mel_filterbank
from transferkit.tts.data import linear_spectrogram, mel_spectrogram, read_metadata, read_tts_folder
from transferkit.tts.train import (
    AdaptConfig,
    adapt,
    apply_strategy,
    batch_indices,
    discriminator_loss,
    duration_loss,
    evaluate_losses,
    feature_matching_loss,
    fingerprints,
    flow_forward,
    generator_adversarial_loss,
    kl_loss,
    mel_loss,
    monotonic_alignment,
    new_posterior,
    prepare_items,
    prior_log_likelihood,
)
from transferkit.tts.vits import VITS, VitsConfig
from transferkit.tts.voice import load_saved_voice, load_voice, resolve_voice, save_voice

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng binary not installed")

SENTENCES = [
    "Hello there, my friend.",
    "The sun is warm today.",
    "Please open the door.",
    "We walk to the old mill.",
    "A cat sat on the mat.",
]
# a tiny configuration: two WaveNet layers in the fresh posterior, 8-frame decoder windows (2,048 samples)
TINY = {"batch_size": 2, "segment_frames": 8, "posterior_layers": 2, "lr": 1e-3, "checkpoint_every": 1}


def espeak_speaker(root: Path, n: int = 5, variant: str = "en-us+f3") -> Path:
    """A synthetic target speaker: ``n`` utterances spoken by espeak-ng's ``variant`` + ``metadata.csv``."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, text in enumerate(SENTENCES[:n]):
        subprocess.run(["espeak-ng", "-v", variant, "-w", str(root / f"u{i}.wav"), text], check=True, timeout=60)
        lines.append(f"u{i}|{text}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def tone(path: Path, seconds: float = 0.5, rate: int = 16000, freq: float = 440.0) -> None:
    t = np.arange(int(seconds * rate)) / rate
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * freq * t), rate)


@pytest.fixture(scope="module")
def voice():
    return load_voice()


@pytest.fixture(scope="module")
def speaker(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng binary not installed: it speaks the synthetic target speaker")
    return espeak_speaker(tmp_path_factory.mktemp("speaker"))


@pytest.fixture(scope="module")
def data(speaker, voice):
    return read_tts_folder(speaker, voice.sample_rate, held_out=1, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# the target speaker's folder


def test_metadata_with_and_without_wav_suffix_header_ljspeech_columns_and_resampling(tmp_path):
    tone(tmp_path / "a.wav")
    tone(tmp_path / "wavs" / "b.wav", seconds=0.25)
    tone(tmp_path / "c.wav", rate=22050)
    (tmp_path / "metadata.csv").write_text(
        'file|text\na|Say "hi".\nb.wav|raw 2 words|two words\n\nc|plain||\n', encoding="utf-8"
    )
    rows = read_metadata(tmp_path)
    assert [(n, t, p.relative_to(tmp_path).as_posix()) for n, t, p in rows] == [
        ("a", 'Say "hi".', "a.wav"),
        ("b", "two words", "wavs/b.wav"),  # LJSpeech: the normalised (last) column
        ("c", "plain", "c.wav"),  # an empty last column falls back to the text
    ]
    d = read_tts_folder(tmp_path, 22050, held_out=0)
    assert [u.name for u in d.train] == ["a", "b", "c"] and d.held_out == []
    # 0.5 s at 16 kHz -> 11,025 samples at 22.05 kHz, cut to whole hops of 256: 43 * 256
    assert [len(u.wave) for u in d.train] == [43 * 256, 21 * 256, 43 * 256]
    assert all(u.rate == 22050 and u.wave.dtype == np.float32 for u in d.train)
    assert d.train[0].seconds == pytest.approx(43 * 256 / 22050)
    assert d.summary()["train_utterances"] == 3


def test_split_is_seeded_and_disjoint(tmp_path):
    for i in range(10):
        tone(tmp_path / f"u{i}.wav", seconds=0.1)
    (tmp_path / "metadata.csv").write_text("".join(f"u{i}|word {i}\n" for i in range(10)))
    a = read_tts_folder(tmp_path, 16000, held_out=3, seed=1)
    b = read_tts_folder(tmp_path, 16000, held_out=3, seed=1)
    c = read_tts_folder(tmp_path, 16000, held_out=0.3, seed=2)
    names = [u.name for u in a.held_out]
    assert names == [u.name for u in b.held_out] and len(names) == 3
    assert sorted(names + [u.name for u in a.train]) == sorted(f"u{i}" for i in range(10))
    assert len(c.held_out) == 3 and [u.name for u in c.held_out] != names  # another seed, another split
    with pytest.raises(DataError, match="held_out=10 keeps 10 of the 10 utterances.*leaving none"):
        read_tts_folder(tmp_path, 16000, held_out=10)
    with pytest.raises(DataError, match=r"fraction must be in \[0, 1\)"):
        read_tts_folder(tmp_path, 16000, held_out=1.5)


def test_every_bad_input_names_the_row_and_the_fix(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist; give a folder of WAV files"):
        read_metadata(tmp_path / "nowhere")
    tone(tmp_path / "a.wav")
    with pytest.raises(DataNotFoundError, match=r"metadata\.csv' is missing \(1 WAV file\(s\).*'file\|text'"):
        read_metadata(tmp_path)
    meta = tmp_path / "metadata.csv"
    cases = [
        ("a|hello\nb\n", r"line 2 \('b'\) has no '\|'"),
        ("a|hello\na|   \n", r"line 2 \(a\) has an empty transcript; write what is said"),
        ("|hello\n", "line 1 has an empty file name"),
        ("a|hello\nmissing|hi\n", r"line 2 names 'missing', but neither .*missing' nor .*missing\.wav'.*add the"),
        ("a|one\na.wav|two\n", r"line 2 names 'a\.wav' again \(first on line 1\)"),
        ("", "lists no utterances"),
    ]
    for text, message in cases:
        meta.write_text(text)
        with pytest.raises(DataError, match=message):
            read_metadata(tmp_path)
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEnot audio")
    meta.write_text("a|fine\nbad|broken\n")
    with pytest.raises(DataError, match=r"line 2: the audio '.*bad\.wav' cannot be read .*re-export it as WAV"):
        read_metadata(tmp_path)
    tone(tmp_path / "short.wav", seconds=0.02)
    meta.write_text("short|too short\n")
    with pytest.raises(DataError, match=r"short\.wav' holds 20 ms of audio, under 4 frames"):
        read_tts_folder(tmp_path, 22050)
    tone(tmp_path / "long.wav", seconds=1.5)
    meta.write_text("long|a long one\n")
    with pytest.raises(DataError, match=r"long\.wav' is 1\.5 s long, over max_seconds=1\.0.*split it into sentences"):
        read_tts_folder(tmp_path, 22050, max_seconds=1.0)


# ----------------------------------------------------------------------------------------------------------------
# spectrograms


def test_spectrograms_frame_like_the_decoder_and_find_the_tone():
    rate, hop, n_fft = 22050, 256, 1024
    freq = 43 * rate / n_fft  # exactly bin 43
    t = torch.arange(40 * hop, dtype=torch.float32) / rate
    wave = 0.5 * torch.sin(2 * math.pi * freq * t)
    spec = linear_spectrogram(wave, n_fft, hop)
    assert spec.shape == (1, 513, 40)  # samples // hop frames: latent frame j is spectrogram frame j
    assert int(spec[0, :, 20].argmax()) == 43
    # a full-scale tone's periodic Hann STFT peak is amplitude * sum(window) / 2 = 0.5 * 512 / 2
    assert float(spec[0, 43, 20]) == pytest.approx(128.0, rel=1e-3)
    mel = mel_spectrogram(wave, rate, n_fft, hop, 80)
    filters = torch.from_numpy(mel_filterbank(rate, n_fft, 80))
    assert mel.shape == (1, 80, 40)
    assert torch.allclose(mel, torch.log(torch.clamp(filters @ spec, min=1e-5)), atol=1e-5)
    silent = mel_spectrogram(torch.zeros(8 * hop), rate)
    # silence: sqrt(1e-6) in every bin, through the filters (each of unit area) -> log of a small positive number
    assert torch.isfinite(silent).all() and float(silent.max()) < math.log(1e-2)


# ----------------------------------------------------------------------------------------------------------------
# monotonic alignment search


def brute_force_alignment(log_p: np.ndarray) -> tuple[float, np.ndarray]:
    """Best score and path over every monotonic surjective alignment (each phoneme a run of >= 1 frames)."""
    ty, tx = log_p.shape
    best, best_path = -math.inf, None
    for cuts in itertools.combinations(range(1, ty), tx - 1):
        bounds = (0, *cuts, ty)
        path = np.zeros((ty, tx), dtype=np.float32)
        for i in range(tx):
            path[bounds[i] : bounds[i + 1], i] = 1
        score = float((log_p * path).sum())
        if score > best:
            best, best_path = score, path
    assert best_path is not None
    return best, best_path


def test_mas_equals_brute_force_on_small_cases():
    rng = np.random.default_rng(0)
    for ty, tx in [(6, 3), (7, 4), (5, 5), (8, 1), (9, 2)]:
        for _ in range(5):
            log_p = rng.normal(size=(ty, tx))
            score, path = brute_force_alignment(log_p)
            got = monotonic_alignment(log_p)
            assert float((log_p * got).sum()) == pytest.approx(score)
            assert np.array_equal(got, path)
            assert (got.sum(axis=1) == 1).all() and (got.sum(axis=0) >= 1).all()
    with pytest.raises(ValueError, match="3 frames cannot align to 4 phonemes"):
        monotonic_alignment(np.zeros((3, 4)))


def test_prior_log_likelihood_is_the_gaussian_log_density():
    g = torch.Generator().manual_seed(0)
    z_p, m_p, logs_p = (
        torch.randn(2, 3, 5, generator=g),
        torch.randn(2, 3, 4, generator=g),
        torch.randn(2, 3, 4, generator=g),
    )
    got = prior_log_likelihood(z_p, m_p, logs_p)
    normal = torch.distributions.Normal(m_p[:, :, None, :], torch.exp(logs_p)[:, :, None, :])  # (b, c, 1, tx)
    want = normal.log_prob(z_p[:, :, :, None]).sum(dim=1)  # (b, ty, tx)
    assert got.shape == (2, 5, 4) and torch.allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# losses, by hand


def test_kl_loss_by_hand():
    z_p = torch.tensor([[[1.0, 2.0, 9.0]]])
    logs_q = torch.tensor([[[0.0, -1.0, 5.0]]])
    m_p = torch.tensor([[[0.0, 1.0, 0.0]]])
    logs_p = torch.tensor([[[0.0, math.log(2.0), 0.0]]])
    mask = torch.tensor([[[1.0, 1.0, 0.0]]])  # the third frame is padding
    # frame 0: 0 - 0 - 0.5 + 0.5 * 1 * 1 = 0; frame 1: ln 2 + 1 - 0.5 + 0.5 * 1 / 4 = ln 2 + 0.625
    assert float(kl_loss(z_p, logs_q, m_p, logs_p, mask)) == pytest.approx((math.log(2) + 0.625) / 2)


def test_duration_mel_and_adversarial_losses_by_hand():
    logw = torch.tensor([[0.0, 1.0, 7.0]])
    d = torch.tensor([[1.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    want = ((0 - math.log(1 + 1e-6)) ** 2 + (1 - math.log(2 + 1e-6)) ** 2) / 2
    assert float(duration_loss(logw, d, mask)) == pytest.approx(want, rel=1e-6)
    assert float(mel_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]))) == pytest.approx(1.5)
    real, fake = [torch.tensor([1.0, 0.5]), torch.tensor([0.0])], [torch.tensor([0.0, 1.0]), torch.tensor([2.0])]
    # D: mean((1-r)^2) + mean(f^2) per sub-discriminator: (0.125 + 0.5) + (1 + 4)
    assert float(discriminator_loss(real, fake)) == pytest.approx(5.625)
    # G: mean((1-f)^2): 0.5 + 1
    assert float(generator_adversarial_loss(fake)) == pytest.approx(1.5)
    fm = feature_matching_loss([[torch.tensor([1.0, 3.0])]], [[torch.tensor([0.0, 0.0])]])
    assert float(fm) == pytest.approx(2.0)


def test_flow_forward_inverts_the_inference_direction():
    torch.manual_seed(0)
    model = VITS(VitsConfig(n_vocab=10, hidden=8, inter=4, filter=16, n_layers=1, dp_filter=8, flow_layers=2))
    for layer in model.flow.flows:  # the reference zero-initialises 'post'; random weights make the test bite
        if hasattr(layer, "post"):
            torch.nn.init.normal_(layer.post.weight, std=0.5)
    z = torch.randn(2, 4, 7)
    mask = torch.ones(2, 1, 7)
    mask[1, :, 5:] = 0
    z = z * mask
    z_p = flow_forward(model.flow, z, mask)
    assert not torch.allclose(z_p, z, atol=1e-2)
    assert torch.allclose(model.flow.reverse(z_p, mask), z, atol=1e-5)


def test_config_errors_and_batch_order():
    with pytest.raises(ValueError, match="frozen part 'enc' is not a part of VITS.*Did you mean 'enc_p'"):
        AdaptConfig(frozen=("enc",))
    with pytest.raises(ValueError, match="init='scratch' with frozen=.*set frozen=\\(\\)"):
        AdaptConfig(init="scratch")
    with pytest.raises(ValueError, match="every part is frozen"):
        AdaptConfig(frozen=("enc_p", "dp", "flow", "dec", "enc_q"))
    # two steps of batch 3 over 6 items: one permutation (an epoch); the next epoch another permutation
    first = batch_indices(6, 3, 0, 0) + batch_indices(6, 3, 1, 0)
    second = batch_indices(6, 3, 2, 0) + batch_indices(6, 3, 3, 0)
    assert sorted(first) == sorted(second) == list(range(6)) and first != second
    assert batch_indices(6, 3, 1, 0) == batch_indices(6, 3, 1, 0)
    assert batch_indices(2, 5, 0, 0) in ([0, 1], [1, 0])  # a batch larger than the data: the data once


# ----------------------------------------------------------------------------------------------------------------
# adaptation of the real voice


@needs_espeak
def test_a_few_steps_reduce_the_loss_and_leave_the_frozen_parts(voice, data, tmp_path):
    cfg = AdaptConfig(steps=10, **TINY)
    before_voice = fingerprints(voice.model)
    items = prepare_items(voice, data.train)
    assert len(items) == 4 and all(i.spec.shape[0] == 513 and i.spec.shape[1] >= len(i.ids) for i in items)
    start = evaluate_losses(voice.model, new_posterior(voice.model, cfg), items, cfg, voice.sample_rate)
    res = adapt(voice, data, cfg)
    end = evaluate_losses(res["voice"].model, res["posterior"], items, cfg, voice.sample_rate)
    assert end["loss"] < 0.6 * start["loss"], (start, end)
    assert end["kl"] < start["kl"]
    assert len(res["history"]) == 10 and res["history"][-1]["loss"] < res["history"][0]["loss"]
    after = fingerprints(res["voice"].model)
    assert after["enc_p"] == before_voice["enc_p"] and after["dp"] == before_voice["dp"]  # frozen
    assert after["flow"] != before_voice["flow"] and after["dec"] != before_voice["dec"]  # trained
    assert fingerprints(voice.model) == before_voice  # the source voice is left as it was
    assert res["trainable"] == ["flow", "dec", "enc_q"] and res["frozen"] == ["enc_p", "dp"]
    n_flow_dec = sum(p.numel() for m in (voice.model.flow, voice.model.dec) for p in m.parameters())
    assert res["trainable_parameters"] == n_flow_dec + sum(p.numel() for p in res["posterior"].parameters())
    assert res["seconds_per_step"] > 0 and res["out"] is None
    with pytest.raises(ValueError, match="segment_frames=1 \\(256 samples\\) is too short.*at least 2 frames"):
        adapt(voice, data, AdaptConfig(steps=1, **{**TINY, "segment_frames": 1}))


def test_strategy_freezes_what_it_names():
    torch.manual_seed(0)
    model = VITS(VitsConfig(n_vocab=10, hidden=8, inter=4, filter=16, n_layers=1, dp_filter=8, flow_layers=2))
    posterior = new_posterior(model, AdaptConfig(posterior_layers=1, n_fft=64))
    params = apply_strategy(model, posterior, ("enc_p", "dp", "dec"))
    assert all(not p.requires_grad for m in (model.enc_p, model.dp, model.dec) for p in m.parameters())
    assert all(p.requires_grad for m in (model.flow, posterior) for p in m.parameters())
    assert len(params) == len(list(model.flow.parameters())) + len(list(posterior.parameters()))


@needs_espeak
def test_resume_after_an_interruption_equals_an_uninterrupted_run(voice, data, tmp_path):
    cfg = AdaptConfig(steps=4, **TINY)
    whole = adapt(voice, data, cfg, out=tmp_path / "whole")

    def stop_after_2(step, losses):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        adapt(voice, data, cfg, out=tmp_path / "cut", on_step=stop_after_2)
    assert not (tmp_path / "cut" / "voice").exists()
    resumed = adapt(voice, data, cfg, out=tmp_path / "cut", resume=True)
    assert resumed["history"] == whole["history"]
    a, b = whole["voice"].model.state_dict(), resumed["voice"].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = whole["posterior"].state_dict(), resumed["posterior"].state_dict()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    with pytest.raises(TrainingError, match="another configuration \\(differs in lr\\)"):
        adapt(voice, data, AdaptConfig(steps=4, **{**TINY, "lr": 5e-4}), out=tmp_path / "cut", resume=True)


@needs_espeak
def test_a_nan_loss_names_the_step(voice, data, monkeypatch):
    import transferkit.tts.train as train_mod

    cfg = AdaptConfig(steps=5, **TINY)
    made = []
    real = train_mod.new_posterior
    monkeypatch.setattr(train_mod, "new_posterior", lambda model, c: made.append(real(model, c)) or made[-1])

    def poison(step, losses):
        if step == 2:  # the next forward reads a NaN weight of the posterior encoder
            with torch.no_grad():
                made[0].proj.weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"step 3: the loss is not finite \(loss=nan.*lower lr, set grad_clip"):
        adapt(voice, data, cfg, on_step=poison)


@needs_espeak
def test_adversarial_training_runs_with_its_losses(voice, data):
    cfg = AdaptConfig(steps=2, adversarial=True, periods=(2, 3), disc_channels=4, **TINY)
    res = adapt(voice, data, cfg)
    for row in res["history"]:
        assert {"loss", "mel", "kl", "dur", "adv", "fm", "disc"} <= set(row)
        assert all(math.isfinite(v) for v in row.values())
        assert row["loss"] == pytest.approx(
            45 * row["mel"] + row["kl"] + row["dur"] + row["adv"] + 2 * row["fm"], rel=1e-5
        )


@needs_espeak
def test_the_adapted_voice_saves_reloads_and_speaks(voice, data, tmp_path, capsys):
    elsewhere = adapt(voice, data, AdaptConfig(steps=1, **TINY), out=tmp_path / "c", save_to=tmp_path / "m" / "a")
    assert elsewhere["out"] == tmp_path / "m" / "a" and (tmp_path / "m" / "a" / "voice.json").is_file()
    res = adapt(voice, data, AdaptConfig(steps=1, **TINY), out=tmp_path / "run")
    folder = res["out"]
    assert folder == tmp_path / "run" / "voice"
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "posterior.safetensors", "voice.json"]
    assert resolve_voice(tmp_path / "run") == folder and resolve_voice(folder) == folder
    back = load_voice(tmp_path / "run")
    assert back.sample_rate == 22050 and back.phoneme_id_map == voice.phoneme_id_map
    assert back.config["adaptation"]["trained"] == ["flow", "dec", "enc_q"]
    assert back.config["adaptation"]["data"]["train_utterances"] == 4
    a = res["voice"].speak("Good morning.", generator=torch.Generator().manual_seed(3))
    b = back.speak("Good morning.", generator=torch.Generator().manual_seed(3))
    sa, sb = res["voice"].model.state_dict(), back.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # the weights, bit for bit
    assert len(a) > 2205 and np.array_equal(a, b)  # the same weights and noise: the same wave
    src = voice.speak("Good morning.", generator=torch.Generator().manual_seed(3))
    assert len(src) != len(a) or not np.allclose(src, a, atol=1e-4)  # it is another model than the source
    out = tmp_path / "a.wav"
    assert main(["speak", str(tmp_path / "run"), "Good morning.", "--out", str(out), "--seed", "3"]) == 0
    assert "voice voice" in capsys.readouterr().out
    wave, rate = sf.read(out)
    assert rate == 22050 and len(wave) == len(a)


def test_saved_voice_errors(tmp_path):
    torch.manual_seed(0)
    from transferkit.tts.voice import Voice, VoiceSettings

    model = VITS(VitsConfig(n_vocab=10, hidden=8, inter=4, filter=16, n_layers=1, dp_filter=8, flow_layers=2))
    v = Voice(model.eval(), 16000, {"_": [0], "^": [1], "$": [2]}, VoiceSettings(), {}, "en-us", tmp_path)
    folder = save_voice(v, tmp_path / "v")
    back = load_saved_voice(folder)
    assert back.model.cfg == model.cfg and back.sample_rate == 16000
    assert all(torch.equal(back.model.state_dict()[k], t) for k, t in model.state_dict().items())
    (folder / "model.safetensors").rename(tmp_path / "w.safetensors")
    with pytest.raises(DataNotFoundError, match=r"model\.safetensors' is missing: a saved voice is a folder"):
        load_voice(folder)
    other = VITS(VitsConfig(n_vocab=12, hidden=8, inter=4, filter=16, n_layers=1, dp_filter=8, flow_layers=2))
    from transferkit.io import save_tensors

    save_tensors(folder / "model.safetensors", other.state_dict())
    with pytest.raises(SourceError, match=r"does not fit the architecture in voice\.json: wrong shape enc_p\.emb"):
        load_voice(folder)
    (folder / "voice.json").write_text('{"format": "something else"}')
    with pytest.raises(SourceError, match="is not a saved transferkit voice"):
        load_voice(folder)
    (tmp_path / "run" / "models" / "a").mkdir(parents=True)
    (tmp_path / "run" / "models" / "b").mkdir(parents=True)
    (tmp_path / "run" / "models" / "a" / "voice.json").write_text("{}")
    (tmp_path / "run" / "models" / "b" / "voice.json").write_text("{}")
    with pytest.raises(DataError, match=r"2 voices \(models/a, models/b\)"):
        resolve_voice(tmp_path / "run")
    (tmp_path / "run" / "voice").mkdir()
    (tmp_path / "run" / "voice" / "voice.json").write_text("{}")
    assert resolve_voice(tmp_path / "run") == tmp_path / "run" / "voice"  # the run's own voice comes first


@needs_espeak
def test_from_scratch_reinitialises_and_trains_every_part_with_progress_shown(voice, data, monkeypatch, capsys):
    monkeypatch.setenv("TRANSFERKIT_PROGRESS", "1")
    cfg = AdaptConfig(steps=1, init="scratch", frozen=(), **TINY)
    res = adapt(voice, data, cfg)
    assert res["trainable"] == ["enc_p", "dp", "flow", "dec", "enc_q"] and res["frozen"] == []
    assert res["trainable_parameters"] == 15_650_459 + sum(p.numel() for p in res["posterior"].parameters())
    import transferkit.tts.train as train_mod

    fresh = fingerprints(train_mod._scratch(voice.model, cfg.seed))  # the re-initialised model, before its step
    got, source = fingerprints(res["voice"].model), fingerprints(voice.model)
    for part in ("enc_p", "dp", "flow", "dec"):
        assert fresh[part] != source[part]  # re-initialised, not the voice's weights
        # and trained: the duration predictor too (its loss reaches it through the spline flow's inverse)
        assert got[part] != fresh[part]
    assert "adapt voice" in capsys.readouterr().err
    monkeypatch.setenv("TRANSFERKIT_PROGRESS", "0")
    adapt(voice, data, AdaptConfig(steps=1, **TINY))
    assert "adapt voice" not in capsys.readouterr().err


@needs_espeak
def test_posterior_warmup_updates_only_the_posterior_first(voice, data, monkeypatch):
    import transferkit.tts.train as train_mod

    source = fingerprints(voice.model)
    trained: list = []  # the model adapt trains (its copy of the voice's), caught where the strategy is applied
    real = train_mod.apply_strategy
    monkeypatch.setattr(train_mod, "apply_strategy", lambda m, q, f: trained.extend([m, q]) or real(m, q, f))
    seen = []
    posterior_0 = fingerprints(voice.model, new_posterior(voice.model, AdaptConfig(**TINY)))["enc_q"]

    def on_step(step, losses):
        seen.append(fingerprints(trained[0], trained[1]))

    adapt(voice, data, AdaptConfig(steps=3, posterior_warmup=2, **TINY), on_step=on_step)
    assert [s["flow"] == source["flow"] and s["dec"] == source["dec"] for s in seen] == [True, True, False]
    assert all(s["enc_q"] != posterior_0 for s in seen)  # the posterior trains from the first step
    with pytest.raises(ValueError, match="posterior_warmup trains only enc_q"):
        AdaptConfig(posterior_warmup=2, frozen=("enc_q",))
