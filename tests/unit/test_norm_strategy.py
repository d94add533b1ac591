"""The ``norm`` strategy: only the backbone's normalisation layers and the new head train."""

from __future__ import annotations

import pytest
import torch
from helpers import small_mnist, tiny_source
from torch import nn

from transferkit.config import TrainConfig
from transferkit.errors import RecipeError
from transferkit.pipeline import plan_stages, train
from transferkit.strategies import get_strategy
from transferkit.transfer import build_target


def _plan(spec: str | dict, model: nn.Module):
    strategy, options = get_strategy(spec)
    return plan_stages(strategy, options, model, TrainConfig(lr=0.01))


def test_norm_trains_the_norm_layers_and_the_head_with_source_statistics() -> None:
    model = build_target(tiny_source(), ["a", "b", "c"])
    (plan,) = _plan("norm", model)
    norms = {n for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    expected = {f"backbone.{n}.{p}" for n in norms for p in ("weight", "bias")} | {"head.weight", "head.bias"}
    assert plan.trainable() == expected
    assert {g.name: g.lr for g in plan.groups} == {"norms": 0.01, "head": 0.01}
    assert sorted(plan.frozen_modules) == sorted(f"backbone.{n}" for n in norms)  # statistics kept
    (with_stats,) = _plan({"name": "norm", "train_stats": True, "backbone_lr_scale": 0.5}, model)
    assert with_stats.frozen_modules == [] and with_stats.groups[0].lr == 0.005


def test_norm_training_changes_only_norm_and_head_weights() -> None:
    data = small_mnist()
    model = build_target(tiny_source(), data.classes)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = {n: b.clone() for n, b in model.named_buffers() if n.endswith("running_mean")}
    train(model, data, TrainConfig(strategy="norm", epochs=1, batch_size=8, lr=0.05))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("head.") or ".bn" in n for n in changed), sorted(changed)[:5]
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers() if n in stats)


def test_norm_refuses_a_backbone_without_norm_layers_and_bad_options() -> None:
    model = build_target(tiny_source(), ["a", "b"])
    model.backbone = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(RecipeError, match="norm: the backbone has no normalisation layer"):
        _plan("norm", model)
    with pytest.raises(RecipeError, match="backbone_lr_scale must be > 0"):
        get_strategy({"name": "norm", "backbone_lr_scale": 0})
