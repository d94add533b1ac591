"""``contrastive``: SetFit-style few-label training (Tunstall et al. 2022), in two stages.

1. ``pairs``: the encoder (backbone) is tuned so that the cosine similarity of two examples' pooled features is 1
   when they share a label and 0 when they do not (SetFit's ``CosineSimilarityLoss``).
2. ``head``: the new head is trained on the tuned encoder's features, computed once (as ``linear_probe``).

SetFit draws explicit pairs: for each labelled example ``R`` partners of its label and ``R`` of another
(``num_iterations``), ``2 R N`` pairs, two encoder passes per pair. Here every pair of a training batch counts
instead: a batch of ``B`` examples gives ``B (B - 1) / 2`` pairs for ``B`` encoder passes, so the same number of
pairs costs ``(B - 1) / 2`` times fewer passes, and the stage runs in the training loop as it is (the loop's batches
are the pairs' source; no pair dataset). The loss averages positive and negative pairs separately, then the two
means, so the classes weigh as in SetFit's half-positive, half-negative pair set whatever a batch holds.

The loop validates after every epoch through the head and keeps the best epoch's weights. An untrained head would
make that choice by chance, so the pair stage also trains the head, by cross-entropy on *detached* features: the
head follows the encoder (the choice of epoch means something), while the encoder's gradient comes from the pairs
alone, as in SetFit.

Images and audio work the same way: the pair loss needs pooled features and labels only. Backbone BatchNorm layers
stay in eval mode (their statistics the source's), as ``freeze`` holds them by default: batches of a few examples
make poor estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.config import TrainConfig
from transferkit.engine.objective import ClassificationObjective
from transferkit.models.base import SourceModel
from transferkit.strategies import STRATEGIES
from transferkit.strategies.base import ParamGroup, TrainPlan
from transferkit.strategies.basic import backbone_params, head_params
from transferkit.strategies.catalogue import bn_modules
from transferkit.strategies.regularizers import unwrap


def pair_cosine_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SetFit's cosine-similarity loss over every pair of a batch, positives and negatives weighed equally.

    For each pair ``i < j``: ``(cos(e_i, e_j) - t_ij)^2`` with ``t_ij`` 1 for the same label and 0 otherwise; the
    mean over positive pairs and the mean over negative pairs are averaged (a batch with only one kind uses that
    kind's mean; a batch of one example, which has no pair, gives 0 with a gradient of 0).

    Args:
        embeddings: ``(batch, dim)`` pooled features.
        labels: ``(batch,)`` class indices.
    """
    z = F.normalize(embeddings.float(), dim=1)
    cos = z @ z.T
    same = labels[:, None] == labels[None, :]
    error = (cos - same.to(cos.dtype)) ** 2
    upper = torch.ones_like(same).triu(diagonal=1)  # each unordered pair once, never an example with itself
    means = [error[mask].mean() for mask in (upper & same, upper & ~same) if bool(mask.any())]
    if not means:
        return embeddings.sum() * 0.0  # keeps the graph, so the backward pass and DDP see every parameter
    return torch.stack(means).mean()


def _source_model(model: nn.Module) -> SourceModel:
    """The SourceModel inside what the loop runs (a DDP wrapper, a compiled module, or the model itself)."""
    inner = unwrap(model)
    if not isinstance(inner, SourceModel):
        raise TypeError(f"the contrastive objective trains a SourceModel (backbone + head), got {type(model).__name__}")
    return inner


class ContrastiveObjective(nn.Module):
    """The pair stage's objective: ``pair_cosine_loss`` on the backbone's pooled features, plus cross-entropy of the
    head on the same features detached (the head follows, the encoder learns from the pairs only).

    Args:
        label_smoothing: the head's cross-entropy label smoothing (``train.label_smoothing``).
    """

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        _, features = model(inputs, return_features=True)  # through forward, so a DDP wrapper sees the call
        pairs = pair_cosine_loss(features, targets)
        logits = _source_model(model).head(features.detach())
        ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        return {"loss": pairs + ce, "logits": logits, "pairs": pairs, "ce": ce}


def _contrastive_objective(base: nn.Module) -> nn.Module:
    """The pair stage's objective, with the label smoothing of the objective it replaces."""
    return ContrastiveObjective(base.label_smoothing if isinstance(base, ClassificationObjective) else 0.0)


def _positive_int(name: str, value: Any, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{why}, got {value!r}")


def _positive_float(name: str, value: Any, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a number > 0{why}, got {value!r}")


@dataclass
class ContrastiveConfig:
    """SetFit-style training: the encoder tuned on pairs of labelled examples, then the head on its features.

    Attributes:
        encoder_lr: the encoder's learning rate in the pair stage. SetFit's ``body_learning_rate`` is 2e-5 over
            its 500 steps (200 examples, R = 20, 16 pairs a step); the in-batch pairs take 78 steps (batches of 16),
            so the encoder moves less at the same rate. Chosen on the validation split of the text demo (MiniLM,
            Rotten Tomatoes, 100 per class, seed 0): 2e-5 0.67, 1e-4 0.77, 3e-4 0.72 (R = 60 at 2e-5: 0.69).
        pairs_per_example: ``R``, SetFit's ``num_iterations`` (20): the pair stage sees as many pairs as SetFit's
            ``2 R N``; with batches of ``B``, that is ``ceil(4 R / (B - 1))`` epochs over the training examples.
        pair_epochs: passes over that many pairs (SetFit's ``num_epochs``, 1).
        head_epochs: epochs of the head stage; None: ``train.epochs``.
        head_lr: the head's learning rate in both stages; None: ``train.lr``.
    """

    encoder_lr: float = 1e-4
    pairs_per_example: int = 20
    pair_epochs: int = 1
    head_epochs: int | None = None
    head_lr: float | None = None

    def __post_init__(self) -> None:
        _positive_float("encoder_lr", self.encoder_lr, " (1e-4 by default; SetFit's is 2e-5)")
        _positive_int("pairs_per_example", self.pairs_per_example, " (SetFit's num_iterations is 20)")
        _positive_int("pair_epochs", self.pair_epochs)
        if self.head_epochs is not None:
            _positive_int("head_epochs", self.head_epochs, " (or leave it out for train.epochs)")
        if self.head_lr is not None:
            _positive_float("head_lr", self.head_lr, " (or leave it out for train.lr)")


def pair_stage_epochs(cfg: ContrastiveConfig, batch_size: int) -> int:
    """Epochs of the pair stage: enough for ``pair_epochs`` times SetFit's ``2 R N`` pairs, at ``N (B - 1) / 2``
    pairs an epoch."""
    return cfg.pair_epochs * math.ceil(4 * cfg.pairs_per_example / (batch_size - 1))


def contrastive_plan(model: SourceModel, cfg: ContrastiveConfig, train: TrainConfig) -> list[TrainPlan]:
    if train.batch_size < 2:
        raise ValueError(
            f"contrastive pairs the examples of a batch: train.batch_size must be >= 2, got {train.batch_size}"
        )
    if train.regularizer:
        raise ValueError(
            f"contrastive's pair stage learns by its pair loss, which train.regularizer ({train.regularizer!r}) does "
            "not combine with; leave train.regularizer out, or choose a strategy that trains by cross-entropy"
        )
    head_lr = cfg.head_lr if cfg.head_lr is not None else train.lr
    batch_norms = bn_modules(model, "backbone.")
    pairs = TrainPlan(
        [
            ParamGroup("backbone", backbone_params(model), cfg.encoder_lr),
            ParamGroup("head", head_params(model), head_lr),
        ],
        frozen_modules=batch_norms,
        name="pairs",
        epochs=pair_stage_epochs(cfg, train.batch_size),
        objective=_contrastive_objective,
    )
    head = TrainPlan(
        [ParamGroup("head", head_params(model), head_lr)],
        frozen_modules=["backbone"],
        cached_features=True,
        name="head",
        epochs=cfg.head_epochs or train.epochs,
    )
    return [pairs, head]


@STRATEGIES.register(
    "contrastive",
    help="SetFit-style: tune the encoder on pairs of labelled examples (cosine 1 same label, 0 other), then the head",
)
class Contrastive:
    config = ContrastiveConfig
    from_scratch = False
    plan = staticmethod(contrastive_plan)
