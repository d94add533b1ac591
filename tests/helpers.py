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
