"""Audio: audio folders (WAV/FLAC, resampling, unreadable files), transformers audio encoders (wav2vec2, HuBERT, AST,
Whisper) from tiny random configs, FSDD MFCC frames with the seq: encoders, the mel front end against librosa's
reference values, the Resemblyzer speaker encoder, and runs end to end with prediction."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import tiny_audio_folder, tone, write_tones

import transferkit as tk
from transferkit.data import dataset_modality, read_dataset
from transferkit.data.audio import load_audio, read_audio_folder, resampling_note
from transferkit.data.modality import make_batch, make_dataset
from transferkit.errors import DataError, DataNotFoundError, SourceError
from transferkit.models.audio import (
    MelSpectrogram,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    partial_slices,
)
from transferkit.models.base import load_model, save_model


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    return write_tones(tmp_path_factory.mktemp("tones"))


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_audio")
    return {kind: tiny_audio_folder(root / kind, kind) for kind in ("wav2vec2", "hubert", "ast", "whisper")}


def _peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


# ---------------------------------------------------------------------------------------------------- audio data


def test_audio_folder_reads_wav_and_flac_and_skips_unreadable_files(tones):
    data = read_audio_folder(tones)
    assert data.classes == ["high", "low"] and data.modality == "audio"
    assert np.bincount(data.labels).tolist() == [6, 7]  # 6 high; 6 low + 1 at 8 kHz
    assert {p.suffix for p in data.items} == {".wav", ".flac"}
    assert len(data.skipped) == 1 and data.skipped[0]["item"].endswith("high/broken0.wav")
    assert "Error opening" in data.skipped[0]["reason"]
    with pytest.raises(DataError, match=r"audio file '.*broken0.wav' cannot be read .*data.strict: false"):
        read_audio_folder(tones, strict=True)
    assert dataset_modality(str(tones)) == "audio"
    assert read_dataset(str(tones), modality="audio").classes == ["high", "low"]


def test_bad_audio_folders_are_errors_that_say_what_to_fix(tmp_path):
    with pytest.raises(DataNotFoundError, match="audio folder '.*nope' does not exist"):
        read_audio_folder(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="class folder '.*a' has no audio files"):
        read_audio_folder(tmp_path)
    (tmp_path / "a" / "x.wav").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"no readable audio files \(all 1 were skipped"):
        read_audio_folder(tmp_path)
    cut = tmp_path / "cut" / "c"
    cut.mkdir(parents=True)
    sf.write(cut / "t.flac", tone(440, seconds=2), 16000)
    (cut / "t.flac").write_bytes((cut / "t.flac").read_bytes()[:20000])  # its header still says 32,000 frames
    with pytest.raises(DataError, match="t.flac' cannot be read"):
        read_audio_folder(tmp_path / "cut", strict=True)
    sf.write(cut / "t.flac", tone(440), 16000, subtype="PCM_16", format="WAV")  # a WAV cut short keeps what it has
    (cut / "t.flac").rename(cut / "t.wav")
    (cut / "t.wav").write_bytes((cut / "t.wav").read_bytes()[:4000])
    assert len(load_audio(read_audio_folder(tmp_path / "cut").items[0], 16000)) == 1978


def test_audio_at_another_rate_is_resampled_and_counted(tones):
    wave = load_audio(tones / "low" / "low_8k.wav", 16000)
    assert len(wave) == 8000  # 0.5 s at 16 kHz, from 4,000 samples at 8 kHz
    assert abs(_peak_hz(wave, 16000) - 320) <= 2  # the tone keeps its pitch
    assert abs(_peak_hz(load_audio((tone(1000, rate=22050), 22050), 16000), 16000) - 1000) <= 2
    stereo = np.stack([tone(500), tone(500)], axis=1)
    assert load_audio((stereo, 16000), 16000).shape == (8000,)  # mixed to mono
    assert len(load_audio(tone(300, seconds=2), 16000, max_seconds=1.5)) == 24000
    data = read_audio_folder(tones)
    assert resampling_note(data.items, 16000) == {"sampling_rate": 16000, "resampled": 1, "resampled_from": {8000: 1}}
    with pytest.raises(DataNotFoundError, match="audio file 'missing.wav' does not exist"):
        load_audio("missing.wav", 16000)


def test_decoded_waveforms_are_kept_within_a_memory_budget(tones, monkeypatch):
    import transferkit.data.audio as audio

    items = read_audio_folder(tones).items[:3]  # 0.5 s each: 8,000 float32 samples, 32,000 bytes
    monkeypatch.setattr(audio, "MEMO_BYTES", 70_000)
    ds = make_dataset("audio", items, np.zeros(3, dtype=np.int64), {"sampling_rate": 16000, "max_seconds": 10})
    waves = [ds[i][0] for i in (0, 1, 2, 2)]
    assert sorted(ds._memo) == [0, 1] and ds._memo_bytes == 64_000  # the third would pass the budget
    assert np.array_equal(waves[2], waves[3]) and ds[0][0] is waves[0]
    x, y = ds.collate([ds[0], ds[2]])  # no feature extractor: zero-padded waveforms and their mask
    assert y.tolist() == [0, 0]
    assert x["input_values"].shape == (2, 8000) and x["attention_mask"].sum().item() == 16000
    assert ds.lengths().tolist() == [0.5, 0.5, 0.5]  # seconds, from the headers (for length-sorted inference)
    with pytest.raises(DataError, match="audio data takes none: remove data.augment"):
        make_dataset("audio", items, np.zeros(3), {"sampling_rate": 16000}, augment=object())


# ---------------------------------------------------------------------------------------------------- hf_audio


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "ast", "whisper"])
def test_transformers_audio_encoders_pool_features_and_reload_with_their_extractor(kind, hf_folders, tmp_path):
    source = tk.load_source(f"hf:{hf_folders[kind]}")
    assert source.arch["family"] == "hf_audio" and source.modality == "audio"
    assert source.preprocess["sampling_rate"] == 16000 and source.num_features == 32
    assert [g for g, _ in source.layer_groups()][:3] == ["stem", "layer0", "layer1"]
    inputs = [tone(300), (tone(500, rate=8000), 8000), tone(700, seconds=0.3)]
    batch = make_batch(source, inputs)
    with torch.no_grad():
        feats = source.eval().features(batch)
        alone = source.features(make_batch(source, inputs[2:]))
    assert feats.shape == (3, 32)
    # mean pooling over the frames that hold audio: padding the short clip to the batch's longest changes nothing
    assert torch.allclose(feats[2], alone[0], atol=1e-5)
    target = tk.build_target(source, ["a", "b"])
    save_model(target, tmp_path / "m")
    assert (tmp_path / "m" / "processor" / "preprocessor_config.json").is_file()
    assert json.loads((tmp_path / "m" / "model.json").read_text())["task"] == "audio_classification"
    loaded = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(target.eval()(batch), loaded(make_batch(loaded, inputs)))


@pytest.mark.slow  # a whole recipe run on two audio encoders: left out of make test-fast
def test_audio_run_trains_one_step_and_predicts_files_and_arrays(hf_folders, tones, tmp_path):
    recipe = tk.Recipe(
        name="audio",
        source=f"hf:{hf_folders['wav2vec2']}",
        data={"dataset": str(tones), "per_class": 3, "val_per_class": 1, "test_size": 4},
        train={"strategy": "full", "epochs": 1, "batch_size": 8},
        compare=["linear_probe"],
    )
    run = tk.run_recipe(recipe, out=tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["modality"] == "audio" and metrics["data"]["skipped_count"] == 1
    assert metrics["data"]["audio"] == {"sampling_rate": 16000, "resampled": 1, "resampled_from": {"8000": 1}}
    assert "1 file(s) resampled" in (run / "report.html").read_text()
    assert metrics["data"]["splits"] == {"train": 6, "val": 2, "test": 4}
    assert metrics["models"]["full"]["epochs_run"] == 1 and metrics["models"]["full"]["test"]["n"] == 4
    predictor = tk.load_run(run)
    out = predictor.predict([str(tones / "low" / "low0.wav"), (tone(2100, rate=8000), 8000)], top_k=2)
    assert out[0]["file"].endswith("low0.wav") and {t["label"] for t in out[0]["top"]} == {"high", "low"}
    assert abs(sum(t["probability"] for t in out[1]["top"]) - 1) < 1e-5
    cli = subprocess.run(
        [sys.executable, "-m", "transferkit", "predict", str(run), str(tones / "high" / "high0.wav"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(cli.stdout)[0]["file"].endswith("high0.wav")


# ---------------------------------------------------------------------------------------------------- frames


def test_fsdd_digits_are_read_from_the_installed_package():
    data = read_dataset("fsdd_digits", modality="frames")
    assert len(data) == 3000 and data.classes == [str(i) for i in range(10)]
    assert np.bincount(data.labels).tolist() == [300] * 10
    assert sum(len(x) for x in data.items) == 53999
    assert all(x.ndim == 2 and x.shape[1] == 13 and x.dtype == np.float32 for x in data.items)
    assert min(len(x) for x in data.items) == 6 and max(len(x) for x in data.items) == 92
    with pytest.raises(DataError, match="holds frames data but the source takes image inputs"):
        read_dataset("fsdd_digits", modality="image")


@pytest.mark.parametrize("kind", ["gru", "cnn1d"])
def test_sequence_encoders_ignore_padding_frames(kind):
    torch.manual_seed(0)
    source = tk.load_source({"name": f"seq:{kind}", "pretrained": False}).eval()
    assert source.arch["kwargs"]["width"] == 64 and source.num_features == (128 if kind == "gru" else 64)
    rng = np.random.default_rng(0)
    utterances = [rng.normal(size=(n, 13)).astype(np.float32) for n in (7, 30, 12)]
    ds = make_dataset("frames", utterances, np.array([0, 1, 0]), source.preprocess)
    x, labels = ds.collate([ds[i] for i in range(3)])
    assert x["frames"].shape == (3, 30, 13) and x["attention_mask"].sum(1).tolist() == [7, 30, 12]
    assert ds.lengths().tolist() == [7, 30, 12]
    assert labels.tolist() == [0, 1, 0]
    assert torch.allclose(x["frames"][0, :7].mean(0), torch.zeros(13), atol=1e-5)  # CMVN per utterance
    with torch.no_grad():
        batched = source.features(x)
        alone = torch.cat([source.features(ds.collate([ds[i]])[0]) for i in range(3)])
    assert batched.shape == (3, source.num_features)
    assert torch.allclose(batched, alone, atol=1e-5)
    with pytest.raises(SourceError, match="built for 13 features per frame but the data has 40"):
        source.features({"frames": torch.zeros(1, 5, 40)})


def test_sequence_source_names_and_options_are_checked():
    with pytest.raises(
        SourceError, match="seq:gru has no pretrained weights: use source: {name: 'seq:gru', pretrained: false}"
    ):
        tk.load_source("seq:gru")
    with pytest.raises(SourceError, match="unknown sequence encoder 'seq:lstm'; valid: seq:gru, seq:cnn1d"):
        tk.load_source({"name": "seq:lstm", "pretrained": False})
    from transferkit.transfer.api import model_from_arch

    wide = model_from_arch({"family": "seq", "name": "gru", "kwargs": {"width": 32, "layers": 3, "input_dim": 40}})
    assert wide.num_features == 64 and [g for g, _ in wide.layer_groups()] == [
        "input",
        "layer0",
        "layer1",
        "layer2",
        "head",
    ]
    with pytest.raises(SourceError, match=r"does not take \['depth'\]"):
        model_from_arch({"family": "seq", "name": "gru", "kwargs": {"depth": 3}})


def test_pretrain_on_some_digits_then_transfer_to_others_and_predict(tmp_path):
    recipe = tk.Recipe(
        name="speech",
        source={"name": "seq:cnn1d", "pretrained": False},
        pretrain={
            "data": {
                "dataset": "fsdd_digits",
                "classes": ["0", "1", "2"],
                "per_class": 20,
                "val_per_class": 5,
                "test_size": 30,
            },
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.003},
        },
        data={"dataset": "fsdd_digits", "classes": ["5", "6"], "per_class": 3, "val_per_class": 2, "test_size": 10},
        train={"strategy": "full", "epochs": 1},
        compare=["scratch"],
    )
    run = tk.run_recipe(recipe, out=tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["pretrain"]["classes"] == ["0", "1", "2"] and metrics["pretrain"]["test"]["n"] == 30
    assert metrics["data"]["modality"] == "frames" and metrics["data"]["classes"] == ["5", "6"]
    assert set(metrics["models"]) == {"full", "scratch"}
    report = json.loads((run / "transfer_report.json").read_text())
    assert report["summary"]["coverage"] > 0.9  # the pretrained backbone moved; only the head is new
    predictor = tk.load_run(run)
    assert predictor.modality == "frames" and predictor.labels == ["5", "6"]
    fsdd = read_dataset("fsdd_digits", modality="frames")
    out = predictor.predict([fsdd.items[0], fsdd.items[1]], top_k=1)
    assert len(out) == 2 and out[0]["top"][0]["label"] in ("5", "6")


# ---------------------------------------------------------------------------------------------------- mel + speaker


def test_mel_filterbank_matches_librosa_reference_values():
    """librosa.filters.mel(sr=22050, n_fft=2048) (Slaney scale and norm, htk=False): first values of the first two
    filters, as published by librosa's docs and the mel_filter crate's tests."""
    fb = mel_filterbank(22050, 2048, 128)
    assert fb.shape == (128, 1025) and fb.dtype == np.float32
    np.testing.assert_allclose(
        fb[0, :6],
        [0, 0.016182853208219942, 0.032365706416439884, 0.028990088037379964, 0.012807234829160026, 0],
        atol=1e-8,
    )
    np.testing.assert_allclose(
        fb[1, :9],
        [
            0,
            0,
            0,
            0.009779235793639925,
            0.025962089001859864,
            0.035393705451959974,
            0.01921085224374004,
            0.003027999035520103,
            0,
        ],
        atol=1e-8,
    )
    assert float(hz_to_mel(1000)) == pytest.approx(15.0) and float(mel_to_hz(15.0)) == pytest.approx(1000.0)
    assert float(hz_to_mel(2000)) == pytest.approx(15 + np.log(2) * 27 / np.log(6.4))  # log above 1 kHz
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=40,
        min_frequency=0,
        max_frequency=8000,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_allclose(mel_filterbank(16000, 400, 40), ref.T, atol=1e-8)


def test_mel_spectrogram_is_librosas_power_mel_with_reflect_padding():
    wave = tone(440, seconds=0.4, seed=3) * np.hanning(6400).astype(np.float32)
    ours = MelSpectrogram()(torch.from_numpy(wave)).numpy()
    assert ours.shape == (1 + 6400 // 160, 40)
    padded = np.pad(wave.astype(np.float64), 200, mode="reflect")  # center=True, pad_mode='reflect'
    frames = np.lib.stride_tricks.sliding_window_view(padded, 400)[::160]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    expected = power @ mel_filterbank(16000, 400, 40).T.astype(np.float64)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6 * expected.max())
    assert ours[:, np.argmax(ours.sum(0))].sum() > 0.5 * ours.sum() / 4  # 440 Hz lands in one band


def test_resemblyzer_partial_windows_follow_the_original():
    assert partial_slices(16000) == [(0, 160)]  # 1 s: one 1.6 s window, zero-padded
    assert partial_slices(48000) == [(0, 160), (77, 237), (154, 314)]  # 3 s at 1.3 windows per second
    assert partial_slices(16000 * 2) == [(0, 160), (77, 237)]  # 2 s: the second window covers 0.77 of its span


def test_resemblyzer_speaker_encoder_loads_the_shipped_weights():
    source = tk.load_source("resemblyzer-speaker-encoder")
    assert source.modality == "audio" and source.num_features == 256
    assert sum(p.numel() for p in source.backbone.parameters()) == 1_423_616
    from transferkit.models.audio import resemblyzer_weights

    state = resemblyzer_weights()
    assert torch.equal(source.backbone.lstm.weight_hh_l2, state["lstm.weight_hh_l2"])
    batch = make_batch(source, [tone(200, seconds=1.0), (tone(250, seconds=2.5, rate=22050), 22050)])
    with torch.no_grad():
        emb = source.eval().features(batch)
        alone = source.features(make_batch(source, [tone(200, seconds=1.0)]))
    assert emb.shape == (2, 256) and (emb >= 0).all()
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(emb[0], alone[0], atol=1e-5)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_resemblyzer_tells_synthetic_voices_apart(tmp_path):
    """espeak-ng speech (synthetic): two sentences per voice; each recording is nearest to its own voice's other."""
    sentences = ["the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore today"]
    waves = []
    for voice in ("en+m3", "en+f4", "en-us+m7"):
        for j, text in enumerate(sentences):
            path = tmp_path / f"{voice}{j}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
            waves.append(str(path))
    source = tk.load_source("resemblyzer-speaker-encoder").eval()
    with torch.no_grad():
        emb = source.features(make_batch(source, waves))
    sim = emb @ emb.T
    sim.fill_diagonal_(-1)
    assert sim.argmax(1).tolist() == [1, 0, 3, 2, 5, 4]
