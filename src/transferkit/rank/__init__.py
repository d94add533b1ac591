"""Choosing the source: rank candidate pretrained models for a target dataset before training.

The scores are plain functions on NumPy arrays (no model needed)::

    from transferkit.rank import logme, leep, nce, hscore, hscore_shrinkage, correlation
    logme(features, labels)          # (N, D) features, (N,) integer labels -> float

``rank_candidates(data, candidates)`` loads each candidate, runs one forward pass over the target's labelled
examples and returns the candidates sorted by a score (``transferkit rank`` on the command line).
"""

from __future__ import annotations

import importlib
from typing import Any

from transferkit.rank.scores import (
    check_features,
    check_labels,
    correlation,
    hscore,
    hscore_shrinkage,
    leep,
    logme,
    nce,
)

# imported on first use: they pull in torch and the pipeline, the scores need only NumPy
_LAZY = {
    "rank_candidates": "transferkit.rank.candidates",
    "Candidate": "transferkit.rank.candidates",
    "SCORES": "transferkit.rank.candidates",
    "select_examples": "transferkit.rank.candidates",
}

__all__ = [
    "check_features",
    "check_labels",
    "correlation",
    "hscore",
    "hscore_shrinkage",
    "leep",
    "logme",
    "nce",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'transferkit.rank' has no attribute '{name}'")
