"""Learning-rate schedules as multipliers of the base rate, per optimizer step."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier at optimizer ``step`` (0-based) of ``total``: linear warmup, then cosine to 0 or constant.

    ``onecycle`` is a cosine schedule whose warmup is at least 30% of training (the one-cycle shape).
    """
    if kind == "onecycle":
        warmup = max(warmup, int(0.3 * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
