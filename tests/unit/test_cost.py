"""Tests of what a model costs to run (``transferkit.evaluation.cost``): parameters, MACs, CPU latency."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from transferkit.evaluation.cost import count_macs, count_params, latency_ms, model_cost


def _mlp(width: int, layers: int) -> nn.Module:
    mods: list[nn.Module] = [nn.Linear(32, width), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(width, 4))


class _DictModel(nn.Module):
    """Takes a tokenized-text-like dict, as ``model(batch)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (self.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1)
        return self.head(pooled)


def test_count_params() -> None:
    assert count_params(nn.Linear(10, 5)) == 55
    frozen = nn.Linear(10, 5)
    frozen.weight.requires_grad_(False)
    assert count_params(frozen) == 55


def test_count_macs_linear_and_conv() -> None:
    assert count_macs(nn.Linear(10, 5), torch.randn(1, 10)) == 50
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, torch.randn(1, 3, 16, 16)) == 8 * 3 * 9 * 256


def test_count_macs_resnet18_matches_published_figure() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    macs = count_macs(model, torch.randn(1, 3, 224, 224))
    assert macs == pytest.approx(1.82e9, rel=0.01)


def test_count_macs_dict_example_and_restores_mode() -> None:
    model = _DictModel().train()
    model.head.eval()  # a mixed state is put back as it was
    batch = {"input_ids": torch.randint(0, 100, (1, 6)), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    assert count_macs(model, batch) == 8 * 3
    assert model.training and model.embed.training and not model.head.training


def test_model_cost() -> None:
    cost = model_cost(nn.Linear(10, 5), torch.randn(1, 10))
    assert cost == {"params": 55, "macs": 50}


def test_latency_bigger_model_is_slower_and_modes_restored() -> None:
    small, big = _mlp(16, 4).train(), _mlp(2048, 4).train()
    x = torch.randn(1, 32)
    threads = torch.get_num_threads()
    result = latency_ms({"small": small, "big": big}, {"small": x, "big": x}, repeats=10, warmup=2, threads=1)
    assert set(result) == {"small", "big"}
    for stats in result.values():
        assert set(stats) == {"median_ms", "p90_ms", "repeats"}
        assert stats["repeats"] == 10
        assert 0 < stats["median_ms"] <= stats["p90_ms"]
    assert result["big"]["median_ms"] > result["small"]["median_ms"]
    assert small.training and big.training
    assert torch.get_num_threads() == threads


def test_latency_needs_an_example_per_model() -> None:
    with pytest.raises(ValueError, match="one example per model"):
        latency_ms({"a": nn.Linear(2, 2)}, {"b": torch.randn(1, 2)})
