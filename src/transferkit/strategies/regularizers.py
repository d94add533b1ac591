"""Regularisers of fine-tuning, as penalties the objective adds to the loss.

Each is a config dataclass (validated in ``__post_init__``) and an ``nn.Module`` ``penalty(model, features)``.
They combine with any parameter selection: ``strategy: l2sp`` is ``full`` + L2-SP, and
``train.regularizer: {name: l2sp, alpha: 0.01}`` adds L2-SP to any other strategy (``lp_ft``, ``llrd``...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transferkit.errors import RecipeError
from transferkit.registry import Registry


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


@dataclass
class L2SPConfig:
    """L2-SP (Li et al. 2018): ``alpha/2 ||w - w0||^2`` on transferred weights + ``beta/2 ||w||^2`` on new ones.

    Attributes:
        alpha: strength of the pull towards the source weights ``w0``.
        beta: plain L2 on weights that have no source counterpart (the new head).
    """

    alpha: float = 0.01
    beta: float = 0.01

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"l2sp alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")


class L2SP(nn.Module):
    """The L2-SP penalty.

    Args:
        reference: the starting point ``w0`` by parameter name (of the trained module). These are references to
            the source's tensors, not copies; a parameter whose name is missing or whose shape differs is "new".
        alpha: see L2SPConfig.
        beta: see L2SPConfig.
    """

    needs_features = False

    def __init__(self, reference: dict[str, torch.Tensor], alpha: float, beta: float):
        super().__init__()
        self.reference = reference  # a plain dict: not buffers, so never moved, copied or saved with the model
        self.alpha = alpha
        self.beta = beta

    def forward(self, model: nn.Module, features: torch.Tensor | None = None) -> torch.Tensor:
        transferred, new = [], []
        for name, w in unwrap(model).named_parameters():
            if not w.requires_grad:
                continue
            w0 = self.reference.get(name)
            if w0 is not None and w0.shape == w.shape:
                transferred.append((w - w0.to(w.device, w.dtype)).pow(2).sum())
            else:
                new.append(w.pow(2).sum())
        zero = next(unwrap(model).parameters()).new_zeros(())
        return self.alpha / 2 * sum(transferred, zero) + self.beta / 2 * sum(new, zero)


@dataclass
class BSSConfig:
    """Batch Spectral Shrinkage (Chen et al. 2019): ``weight * sum of the k smallest squared singular values``
    of the batch feature matrix, which suppresses the feature directions that transfer negatively.

    Attributes:
        k: how many of the smallest singular values are shrunk.
        weight: the penalty's weight (eta in the paper; 0.001 there).
    """

    k: int = 1
    weight: float = 0.001

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"bss k must be >= 1, got {self.k}")
        if self.weight < 0:
            raise ValueError(f"bss weight must be >= 0, got {self.weight}")


class BSS(nn.Module):
    """The BSS penalty on the pooled features of a batch."""

    needs_features = True

    def __init__(self, k: int, weight: float):
        super().__init__()
        self.k = k
        self.weight = weight

    def forward(self, model: nn.Module, features: torch.Tensor | None = None) -> torch.Tensor:
        if features is None:
            raise ValueError("BSS needs the batch features")
        singular = torch.linalg.svdvals(features.float())  # descending
        k = min(self.k, singular.numel())
        return self.weight * singular[-k:].pow(2).sum()


# name -> (config dataclass, builder(config, reference) -> penalty module)
REGULARIZERS: Registry[tuple[type, Callable[[Any, dict[str, torch.Tensor]], nn.Module]]] = Registry("regularizer")
REGULARIZERS.register("l2sp", help="pull transferred weights towards the source (Li et al. 2018)")(
    (L2SPConfig, lambda c, ref: L2SP(ref, c.alpha, c.beta)))
REGULARIZERS.register("bss", help="shrink the smallest singular values of batch features (Chen et al. 2019)")(
    (BSSConfig, lambda c, ref: BSS(c.k, c.weight)))


def regularizer_config(spec: str | dict[str, Any]) -> tuple[str, Any]:
    """Name and validated config from ``"l2sp"`` or ``{name: l2sp, alpha: 0.1}``."""
    name = spec if isinstance(spec, str) else str(spec.get("name", ""))
    options = {} if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "name"}
    config_cls, _ = REGULARIZERS.get(name)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise RecipeError(f"regularizer '{name}' has no option(s) {unknown}; valid options: "
                          f"{', '.join(sorted(fields))}")
    try:
        return name, config_cls(**options)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"regularizer '{name}': {e}") from e


def build_penalties(specs: list[tuple[str, dict[str, Any]]], reference: dict[str, torch.Tensor]) -> list[nn.Module]:
    out = []
    for name, options in specs:
        _, cfg = regularizer_config({"name": name, **options})
        out.append(REGULARIZERS.get(name)[1](cfg, reference))
    return out
