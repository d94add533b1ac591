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
    """Zero, in place, all but the ``density`` fraction of largest magnitudes of ``delta`` (``int(density * n)``
    entries kept, as TIES and peft count them); returns ``delta``."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    keep[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = True
    return delta.mul_(keep.reshape(delta.shape))


def keep_above(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero, in place, the entries of ``delta`` of magnitude below ``threshold`` (global trimming)."""
    return delta.mul_(delta.abs() >= threshold)


def drop_random(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE, in place: keep each entry with probability ``density`` and rescale the kept ones by ``1/density``."""
    if density >= 1.0:
        return delta
    return delta.mul_(torch.bernoulli(torch.full_like(delta, density), generator=generator)).div_(density)


def combine(deltas: Sequence[torch.Tensor], weights: torch.Tensor, how: Combine, sign: str = "total") -> torch.Tensor:
    """Combine task vectors: the weighted sum, or TIES' elected sign and the disjoint mean of the weighted entries
    that agree with it. Accumulates model by model, so that it holds a few tensors beside the task vectors."""
    w = [float(x) for x in weights]
    out = torch.zeros_like(deltas[0])
    if how == "sum":
        for d, wi in zip(deltas, w):
            out.add_(d, alpha=wi)
        return out
    votes = torch.zeros_like(deltas[0])
    for d in deltas:
        votes.add_(d if sign == "total" else d.sign())
    elected = torch.where(votes >= 0, 1.0, -1.0).to(deltas[0].dtype)
    del votes
    count = torch.zeros_like(deltas[0])
    for d, wi in zip(deltas, w):
        agree = d.sign() == elected  # a zero (trimmed) entry agrees with neither sign
        out.add_(d * agree, alpha=wi)
        count.add_(agree)
    return out.div_(count.clamp_(min=1))


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
        tensors: the same tensor of each model (not modified).
        cfg: the merge's parameters.
        generator: DARE's random source (seeded from ``cfg.seed`` when None).
        thresholds: for global magnitude trimming, each model's magnitude threshold over the whole model.
    """
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    start = base.to(work)
    g = generator or torch.Generator().manual_seed(cfg.seed)
    deltas = []
    for i, t in enumerate(tensors):
        d = t.to(work, copy=True).sub_(start)  # one copy per model: its task vector, trimmed in place
        if cfg.trim == "magnitude" and cfg.scope == "global":
            assert thresholds is not None, "global trimming needs each model's threshold (merge.api computes them)"
            keep_above(d, thresholds[i])
        elif cfg.trim == "magnitude":
            keep_largest(d, cfg.density)
        elif cfg.trim == "random":
            drop_random(d, cfg.density, g)
        deltas.append(d)
    merged = combine(deltas, cfg.weights(len(deltas)), cfg.combine, cfg.sign).add_(start)
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
