"""Prediction from a saved model alone: ``load_run(RUN_DIR).predict(files)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.data import build_transform, load_image
from transferkit.errors import DataNotFoundError
from transferkit.models.vision import SourceModel, load_model


class Predictor:
    """A loaded model with its preprocessing and labels."""

    def __init__(self, model: SourceModel):
        self.model = model.eval()
        self.transform = build_transform(model.preprocess)
        self.labels = model.labels or [str(i) for i in range(model.head_spec()["num_classes"])]

    @torch.no_grad()
    def predict_proba(self, images: list[Any]) -> torch.Tensor:
        """Class probabilities for image paths, PIL images or uint8 arrays."""
        channels = self.model.preprocess["input_size"][0]
        batch = []
        for item in images:
            if isinstance(item, (str, Path)) and not Path(item).is_file():
                raise DataNotFoundError(f"image '{item}' does not exist")
            img = item.convert("L" if channels == 1 else "RGB") if hasattr(item, "convert") else load_image(
                item if isinstance(item, np.ndarray) else Path(item), channels)
            batch.append(self.transform(img))
        return torch.softmax(self.model(torch.stack(batch)).float(), dim=1)

    def predict(self, images: list[Any], top_k: int = 3) -> list[dict[str, Any]]:
        """Top-k labels with probabilities, one entry per image."""
        probs = self.predict_proba(images)
        k = min(top_k, probs.shape[1])
        values, idx = probs.topk(k, dim=1)
        return [{"file": str(item) if isinstance(item, (str, Path)) else f"<image {i}>",
                 "top": [{"label": self.labels[j], "probability": float(v)}
                         for v, j in zip(vals.tolist(), ids.tolist())]}
                for i, (item, vals, ids) in enumerate(zip(images, values, idx))]


def load_run(path: str | Path) -> Predictor:
    """A Predictor from a run directory (its selected ``model/``) or a model folder."""
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"run directory or model folder '{path}' does not exist")
    folder = path / "model" if (path / "model" / "model.json").is_file() else path
    return Predictor(load_model(folder))
