"""Classification metrics from logits: one implementation used by training, evaluation and reports."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[i, j]`` = examples of true class i predicted as j."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def macro_f1(cm: torch.Tensor) -> float:
    """Mean over classes of F1; a class absent from both labels and predictions is left out."""
    tp = cm.diag().double()
    support = cm.sum(1).double()
    predicted = cm.sum(0).double()
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    return float(f1[present].mean()) if present.any() else 0.0


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1, mean cross-entropy, example count and confusion matrix."""
    if len(labels) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "loss": float("nan"), "n": 0, "confusion": []}
    preds = logits.argmax(1)
    cm = confusion_matrix(preds, labels, num_classes)
    return {
        "accuracy": float((preds == labels).double().mean()),
        "macro_f1": macro_f1(cm),
        "loss": float(F.cross_entropy(logits.float(), labels.long())),
        "n": len(labels),
        "confusion": cm.tolist(),
    }
