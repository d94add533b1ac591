"""Merge methods: declared parameters plus one pure tensor function.

Every weight merge here is one generalised task-arithmetic merge of the task vectors ``d_i = w_i - w_base``:

1. **trim** each ``d_i``: keep the ``density`` fraction of largest magnitudes (TIES), or keep each entry with
   probability ``density`` and rescale the kept ones by ``1/density`` (DARE), or keep everything;
2. **combine**: a weighted sum ``sum_i lambda_i d_i`` (task arithmetic), or TIES' sign election (the sign of
   ``sum_i d_i`` per entry, or of the count of signs) followed by the disjoint mean of the weighted entries that
   agree with it;
3. ``w = w_base + combined``.

Task arithmetic, TIES and DARE are parameterisations of ``merge_tensor`` (``MergeConfig``), not copies; a uniform
soup is task arithmetic with ``lambda = 1/n`` (the plain mean of the weights). The greedy soup and the output
ensembles are built on top (``merge.api``): they need the models' outputs, not only their weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from transferkit.registry import Registry

Trim = Literal["none", "magnitude", "random"]
Combine = Literal["sum", "ties"]


@dataclass(frozen=True)
class MergeConfig:
    """One generalised task-arithmetic merge (see the module docstring).

    Attributes:
        lam: the scale of each task vector (``lambda``); one value for all, or one per model.
        density: the fraction of each task vector kept by ``trim`` (1: everything).
        trim: ``magnitude`` (TIES: the largest entries), ``random`` (DARE: Bernoulli(density), rescaled by
            ``1/density``), or ``none``.
        scope: magnitude trimming per tensor, or with one threshold over the whole model (``global``).
        combine: ``sum`` (task arithmetic) or ``ties`` (sign election, then the disjoint mean).
        sign: how ``ties`` elects the sign: ``total`` (the sign of the sum) or ``frequency`` (the most common sign).
        seed: seeds DARE's random drop (the same seed gives the same merge).
    """

    lam: float | tuple[float, ...] = 1.0
    density: float = 1.0
    trim: Trim = "none"
    scope: Literal["tensor", "global"] = "tensor"
    combine: Combine = "sum"
    sign: Literal["total", "frequency"] = "total"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.trim == "random" and self.scope == "global":
            raise ValueError("scope: global applies to magnitude trimming (TIES); DARE drops entries independently")

    def weights(self, n: int) -> torch.Tensor:
        """The ``lambda`` of each of ``n`` task vectors."""
        lam = self.lam if isinstance(self.lam, tuple) else (self.lam,) * n
        if len(lam) != n:
            raise ValueError(f"lambda gives {len(lam)} values for {n} models; give one value, or one per model")
        return torch.tensor(lam, dtype=torch.float64)


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but the ``density`` fraction of largest magnitudes set to zero (``int(density * n)``
    entries kept, as TIES and peft count them)."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = True
    return delta * mask.reshape(delta.shape)


def keep_above(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """``delta`` with the entries of magnitude below ``threshold`` set to zero (global magnitude trimming)."""
    return delta * (delta.abs() >= threshold)


def drop_random(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by ``1/density``."""
    if density >= 1.0:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def combine(deltas: torch.Tensor, weights: torch.Tensor, how: Combine, sign: str = "total") -> torch.Tensor:
    """Combine stacked task vectors (``n x ...``): the weighted sum, or TIES' elected sign and disjoint mean."""
    w = weights.to(deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))
    if how == "sum":
        return (deltas * w).sum(dim=0)
    signs = deltas.sign()
    votes = deltas.sum(dim=0) if sign == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = signs == elected
    kept = (deltas * w * agree).sum(dim=0)
    return kept / agree.sum(dim=0).clamp(min=1)


def merge_tensor(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    cfg: MergeConfig,
    generator: torch.Generator | None = None,
    thresholds: Sequence[float] | None = None,
) -> torch.Tensor:
    """The merge of one tensor of ``n`` models that share ``base`` (the pure function behind every method).

    Args:
        base: the tensor of the shared starting model.
        tensors: the same tensor of each model.
        cfg: the merge's parameters.
        generator: DARE's random source (seeded from ``cfg.seed`` when None).
        thresholds: for global magnitude trimming, each model's magnitude threshold over the whole model.
    """
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    deltas = [t.to(work) - base.to(work) for t in tensors]
    if cfg.trim == "magnitude":
        if cfg.scope == "global":
            assert thresholds is not None, "global trimming needs each model's threshold (merge.api computes them)"
            deltas = [keep_above(d, th) for d, th in zip(deltas, thresholds)]
        else:
            deltas = [keep_largest(d, cfg.density) for d in deltas]
    elif cfg.trim == "random":
        g = generator or torch.Generator().manual_seed(cfg.seed)
        deltas = [drop_random(d, cfg.density, g) for d in deltas]
    merged = base.to(work) + combine(torch.stack(deltas), cfg.weights(len(deltas)), cfg.combine, cfg.sign)
    return merged.to(base.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The methods users name: each maps its own options onto a MergeConfig


@dataclass(frozen=True)
class UniformSoupConfig:
    """Uniform soup (Wortsman et al. 2022): the mean of the models' weights."""


@dataclass(frozen=True)
class GreedySoupConfig:
    """Greedy soup: models sorted by validation accuracy join the soup only if its validation accuracy improves."""


@dataclass(frozen=True)
class TaskArithmeticConfig:
    """Task arithmetic (Ilharco et al. 2023): ``w_base + lambda * sum_i (w_i - w_base)``."""

    lam: float = 1.0


@dataclass(frozen=True)
class TiesConfig:
    """TIES (Yadav et al. 2023): trim each task vector to its ``density`` largest entries (per tensor, or over the
    whole model with ``scope: global``), elect the sign by mass, average the entries that agree, scale by lambda."""

    density: float = 0.2
    lam: float = 1.0
    scope: Literal["tensor", "global"] = "tensor"
    sign: Literal["total", "frequency"] = "total"


@dataclass(frozen=True)
class DareConfig:
    """DARE (Yu et al. 2024): drop each task-vector entry with probability ``p``, rescale the rest by ``1/(1-p)``,
    then combine by task arithmetic (``combine: sum``) or TIES (``combine: ties``); seeded."""

    p: float = 0.9
    lam: float = 1.0
    combine: Combine = "sum"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"p (the drop rate) must be in [0, 1), got {self.p}")


@dataclass(frozen=True)
class EnsembleConfig:
    """An output ensemble: the mean of the models' probabilities (``vote: mean``) or a majority vote."""

    vote: Literal["mean", "majority"] = "mean"


@dataclass(frozen=True)
class Method:
    """A registered merge: its config class, how it maps onto a MergeConfig (weight merges), and its kind."""

    config: type
    kind: Literal["weights", "greedy", "ensemble"] = "weights"

    def merge_config(self, options: object, n: int) -> MergeConfig:
        """The generalised merge of ``n`` models that a weight method's options describe."""
        if isinstance(options, UniformSoupConfig | GreedySoupConfig):
            return MergeConfig(lam=1.0 / n)
        if isinstance(options, TaskArithmeticConfig):
            return MergeConfig(lam=options.lam)
        if isinstance(options, TiesConfig):
            return MergeConfig(options.lam, options.density, "magnitude", options.scope, "ties", options.sign)
        if isinstance(options, DareConfig):
            return MergeConfig(options.lam, 1.0 - options.p, "random", combine=options.combine, seed=options.seed)
        raise TypeError(f"{type(options).__name__} describes no weight merge")


METHODS: Registry[Method] = Registry("merge method")
METHODS.register("uniform_soup", help="the mean of the models' weights")(Method(UniformSoupConfig))
METHODS.register("greedy_soup", help="models join the soup, best first, only if validation accuracy improves")(
    Method(GreedySoupConfig, "greedy")
)
METHODS.register("task_arithmetic", help="base + lambda * the sum of the task vectors")(Method(TaskArithmeticConfig))
METHODS.register("ties", help="trim to density, elect the sign by mass, disjoint mean (TIES)")(Method(TiesConfig))
METHODS.register("dare", help="drop task-vector entries with probability p, rescale, then sum or TIES")(
    Method(DareConfig)
)
METHODS.register("ensemble", help="the mean of the models' probabilities, or a majority vote (outputs, not weights)")(
    Method(EnsembleConfig, "ensemble")
)
