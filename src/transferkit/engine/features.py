"""Backbone features computed once: what a frozen backbone sees, for linear probes, ranking and caches."""

from __future__ import annotations

from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import Dataset

from transferkit.engine.loop import in_order, inference_pass, to_device
from transferkit.io import safe_torch_load, torch_save


@torch.no_grad()
def compute_features(
    backbone: nn.Module, dataset: Dataset, batch_size: int = 32, device: Any = "cpu", desc: str = "features"
) -> torch.Tensor:
    """Backbone features of every example, in order, in eval mode (what a frozen backbone sees).

    The default batch of 32 keeps activations small enough to stay in memory between operations on a CPU
    (``bench/linear_probe.py`` compares batch sizes).
    """
    backbone.eval().to(device)
    with inference_pass(backbone, len(cast(Sized, dataset)), batch_size) as run:
        return in_order(dataset, batch_size, lambda x: run(to_device(x, device)), desc=desc)[0]


def feature_cache(
    model: Any,
    data: Any,
    device: Any = "cpu",
    cache_file: Path | None = None,
    splits: tuple[str, ...] = ("train", "val", "test"),
    known: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Backbone features of the splits of prepared data, computed once (and read back from ``cache_file``).

    ``known`` holds splits already computed by the same backbone (the ``rank:`` step's forward pass over the
    training split), which are not computed again.
    """
    if cache_file is not None and cache_file.exists():
        return safe_torch_load(cache_file)
    feats = dict(known or {})
    feats.update(
        {
            s: compute_features(model.backbone, data.dataset(s), device=device, desc=f"features {s}")
            for s in splits
            if s not in feats
        }
    )
    if cache_file is not None:
        torch_save(cache_file, feats)
    return feats
