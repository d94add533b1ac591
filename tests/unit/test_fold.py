"""Batch norms folded into convolutions for inference (engine.fold): same outputs, the model put back, and no fold
where it would be wrong."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import small_mnist
from torch import nn
from torch.utils.data import TensorDataset

from transferkit.engine.fold import folded_batch_norms
from transferkit.engine.loop import conv_layout, predict_logits
from transferkit.pipeline import compute_features
from transferkit.sources import load_source


def _drawn_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch-norm statistics and affine weights away from the identity, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, type]]:
    """Values, object identities of the parameters, and the module types by name."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: id(p) for k, p in model.named_parameters()},
        {k: type(m) for k, m in model.named_modules()},
    )


def _assert_put_back(model: nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, int], dict[str, type]]):
    values, ids, types = before
    after = model.state_dict()
    assert after.keys() == values.keys()
    assert all(torch.equal(after[k], v) for k, v in values.items())
    assert {k: id(p) for k, p in model.named_parameters()} == ids  # the very objects (optimizers hold them)
    assert {k: type(m) for k, m in model.named_modules()} == types


def test_efficientnet_lite0_features_are_the_same_with_every_batch_norm_folded() -> None:
    # the real ImageNet weights (their running statistics are far from the identity), real MNIST images
    source = load_source("efficientnet_lite0")
    backbone = source.backbone.eval()
    data = small_mnist(per_class=3, image_size=64)
    x = torch.stack([data.dataset("train")[i][0] for i in range(len(data.splits.train))])
    before = _snapshot(backbone)
    with torch.no_grad():
        plain = backbone(x)
        with folded_batch_norms(backbone) as run:
            folded = torch.cat([run(x[:16]), run(x[16:])])
            assert len(run.pairs) == 49  # every BatchNormAct2d follows its convolution
            assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())  # taken out while folded
    _assert_put_back(backbone, before)
    assert (folded - plain).abs().max() <= 1e-4 * plain.abs().max()
    assert not torch.equal(folded, plain)  # it did compute differently (rounding): the fold was used
    # compute_features (channels-last and folded, through the data loader) gives the same
    dataset = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    feats = compute_features(backbone, dataset, batch_size=8)
    assert (feats - plain).abs().max() <= 1e-4 * plain.abs().max()
    _assert_put_back(backbone, before)


class _PreNormAlsoUsed(nn.Module):
    """The convolution's output feeds the norm and, unnormalised, a residual sum: folding it would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return (self.bn(y) + y).mean(dim=(2, 3))


class _SharedConv(nn.Module):
    """One convolution called twice, a norm after the second call only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.conv(x))).mean(dim=(2, 3))


@pytest.mark.parametrize("model_cls", [_PreNormAlsoUsed, _SharedConv])
def test_no_fold_where_the_convolution_output_is_used_otherwise(model_cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = _drawn_statistics(model_cls())
    x = torch.randn(6, 3, 8, 8)
    before = _snapshot(model)
    with torch.no_grad(), folded_batch_norms(model) as run:
        out = run(x)
        assert run.pairs == []
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.equal(out, model(x))  # the model ran as it is
    _assert_put_back(model, before)


def test_a_fold_that_changes_the_outputs_is_undone_at_once() -> None:
    # The residual use of the convolution's output is an addition outside any module: the hooks cannot see it and
    # pair the two. The check on the batch's first examples refuses the fold, before the batch runs.
    from transferkit.engine.fold import conv_bn_pairs

    torch.manual_seed(0)
    model = _drawn_statistics(_PreNormAlsoUsed())
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        assert conv_bn_pairs(model, x)[0] == [("conv", "bn")]
        before = _snapshot(model)
        with folded_batch_norms(model) as run:
            out = run(x)
            assert run.pairs == []
            _assert_put_back(model, before)  # undone at once, not only on leaving the block
        assert torch.equal(out, model(x))


def test_conv1d_batchnorm1d_is_folded_and_train_mode_norms_are_not() -> None:
    torch.manual_seed(0)
    model = _drawn_statistics(
        nn.Sequential(
            nn.Conv1d(2, 4, 5),
            nn.BatchNorm1d(4),
            nn.ReLU(),
            nn.Conv1d(4, 3, 3),
            nn.BatchNorm1d(3),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
    )
    x = torch.randn(5, 2, 40)
    with torch.no_grad():
        plain = model(x)
        with folded_batch_norms(model) as run:
            folded = run(x)
            assert run.pairs == [("0", "1"), ("3", "4")]
        assert (folded - plain).abs().max() <= 1e-5 * plain.abs().max()
        model[4].train()  # a norm in train mode uses the batch's statistics: not a fixed affine map
        with folded_batch_norms(model) as run:
            run(x)
            assert run.pairs == [("0", "1")]


def test_models_without_convolution_and_norm_run_unchanged() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    with torch.no_grad(), folded_batch_norms(model) as run:
        assert run.pairs == []  # known before any batch: nothing to fold, no hooks
        assert torch.equal(run(x), model(x))


def test_the_model_is_put_back_when_the_pass_raises() -> None:
    torch.manual_seed(0)
    model = _drawn_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()))
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="stop"), torch.no_grad(), folded_batch_norms(model) as run:
        run(torch.randn(2, 3, 6, 6))
        assert run.pairs == [("0", "1")]
        raise RuntimeError("stop")
    _assert_put_back(model, before)


def test_predict_logits_folds_inside_channels_last_and_matches_the_plain_model() -> None:
    torch.manual_seed(0)
    model = _drawn_statistics(
        nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3),
            nn.BatchNorm2d(8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
    )
    model.train()  # predict_logits switches to eval and back
    x = torch.randn(20, 3, 12, 12)
    before = _snapshot(model)
    logits, labels = predict_logits(model, TensorDataset(x, torch.arange(20) % 3), batch_size=6)
    assert model.training
    _assert_put_back(model, before)
    with torch.no_grad():
        plain = model.eval()(x)
    assert torch.equal(labels, torch.arange(20) % 3)
    assert (logits - plain).abs().max() <= 1e-5 * plain.abs().max()
    # the fused weights kept the channels-last layout inside conv_layout
    with conv_layout(model), torch.no_grad(), folded_batch_norms(model) as run:
        run(x[:4])
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_predictor_folds_more_than_one_batch_and_gives_the_same_probabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    from helpers import tiny_source

    import transferkit.predict as predict_module
    from transferkit.engine.loop import inference_pass
    from transferkit.predict import BATCH, Predictor

    folded: list[Any] = []  # the pairs folded by each inference pass predict_proba set up

    @contextlib.contextmanager
    def spy(model: nn.Module, num_examples: int, batch_size: int):
        with inference_pass(model, num_examples, batch_size) as run:
            yield run
        folded.append(run.pairs)

    monkeypatch.setattr(predict_module, "inference_pass", spy)
    data = small_mnist(per_class=8)
    model = tiny_source()
    _drawn_statistics(model.backbone)
    predictor = Predictor(model)
    items = list(data.examples.items[: BATCH + 6])
    before = _snapshot(model)
    fast = predictor.predict_proba(items)  # more than one batch: channels-last and folded
    _assert_put_back(model, before)
    assert len(folded) == 1 and len(folded[0]) > 5  # the tiny EfficientNet's batch norms were folded
    plain = torch.cat([predictor.predict_proba(items[i : i + BATCH]) for i in range(0, len(items), BATCH)])
    assert len(folded) == 1  # one batch at a time: the model as it is, no inference pass set up
    assert fast.shape == plain.shape and fast.shape[0] == len(items)
    assert torch.allclose(fast, plain, atol=1e-5)


def test_a_pass_of_one_batch_runs_the_model_as_it_is() -> None:
    # folding costs about a small forward pass: one batch (fit's 8-example validation in bench/engine_overhead.py)
    # does not earn it back
    from transferkit.engine.fold import folded_for_pass

    torch.manual_seed(0)
    model = _drawn_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()))
    with torch.no_grad():
        with folded_for_pass(model, num_examples=32, batch_size=32) as run:
            assert run is model
        with folded_for_pass(model, num_examples=33, batch_size=32) as run:
            run(torch.randn(4, 3, 6, 6))
            assert run.pairs == [("0", "1")]
