"""The strategy catalogue: parameter selection, learning rates against timm, stages, penalties by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import small_mnist, tiny_source
from torch import nn

from transferkit.engine.loop import make_accelerator
from transferkit.engine.objective import ClassificationObjective
from transferkit.errors import RecipeError
from transferkit.models.base import SourceModel
from transferkit.pipeline import plan_stages, train
from transferkit.recipe import TrainConfig, validate_recipe
from transferkit.sources import load_source
from transferkit.strategies import STRATEGIES, get_strategy
from transferkit.strategies.base import apply_plan, set_train_mode
from transferkit.strategies.regularizers import BSS, L2SP, regularizer_config
from transferkit.transfer import build_target


def _plans(name: str | dict, model=None, **train):
    model = model or build_target(tiny_source(), ["a", "b", "c"])
    strategy, options = get_strategy(name)
    return model, plan_stages(strategy, options, model, TrainConfig(**{"lr": 0.01, **train}))


def test_catalogue_is_registered():
    assert {"freeze", "gradual_unfreeze", "llrd", "discriminative", "lp_ft", "bitfit", "l2sp", "bss"} <= set(STRATEGIES)


# ------------------------------------------------------------------------------------------------ penalties by hand


def test_l2sp_penalty_against_hand_computed_value():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        model[0].bias.copy_(torch.tensor([0.5, -0.5]))
        model[1].weight.copy_(torch.tensor([[2.0, -1.0]]))
        model[1].bias.copy_(torch.tensor([3.0]))
    # transferred: layer 0 (w0 given); new: layer 1 (no reference) and 0.bias (reference has another shape)
    reference = {"0.weight": torch.tensor([[1.0, 1.0], [1.0, 1.0]]), "0.bias": torch.zeros(3)}
    penalty = L2SP(reference, alpha=0.1, beta=0.01)(model)
    # alpha/2 * ((0)^2 + 1^2 + 2^2 + 3^2) + beta/2 * (0.25 + 0.25 + 4 + 1 + 9)
    assert penalty.item() == pytest.approx(0.05 * 14 + 0.005 * 14.5)
    penalty.backward()
    assert torch.allclose(model[0].weight.grad, 0.1 * torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert torch.allclose(model[1].bias.grad, torch.tensor([0.01 * 3.0]))


class _Captured(Exception):
    pass


def _tiny_transfer_target():
    """A hand-sized source (a 2->2 linear backbone, its own 3-class head, every tensor recorded as coming from
    it) and its target for 3 classes: the new head has the source head's shape but none of its values."""
    source = SourceModel(
        nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 3), {"family": "none", "name": "tiny"}, {}, None, 2
    )
    with torch.no_grad():
        source.backbone[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        source.backbone[0].bias.copy_(torch.tensor([0.5, -0.5]))
        source.head.weight.fill_(9.0)
        source.head.bias.fill_(9.0)
    source.origin = {k: f"tiny:{k}" for k in source.state_dict()}  # as load_source records a pretrained source
    target = build_target(source, ["a", "b", "c"], seed=0)
    with torch.no_grad():
        target.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))  # ||w||^2 = 7
        target.head.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))  # ||b||^2 = 1
    return source, target


@pytest.mark.parametrize("path", ["python_api", "recipe", "cached_features", "no_record"])
def test_l2sp_in_train_pulls_only_transferred_weights(data, monkeypatch, path):
    """w0 holds the transferred backbone only: the new head gets beta/2 ||w||^2, never a pull towards its random
    start (Python API), towards the source's unrelated head of the same shape (recipe: w0 is the source's
    state_dict) or, training on cached features, towards its start either. A model that records no provenance
    (built by hand, reloaded with load_model) counts its backbone as transferred."""
    import transferkit.pipeline as pipeline

    source, target = _tiny_transfer_target()
    if path == "no_record":
        del target.report, target.origin
    captured = {}

    def fake_fit(model, *args, objective, **kwargs):
        captured["module"], captured["penalty"] = model, objective.penalties[0]
        raise _Captured

    monkeypatch.setattr(pipeline, "fit", fake_fit)
    l2sp = {"name": "l2sp", "alpha": 0.1, "beta": 0.01}
    kwargs = {}
    if path == "cached_features":
        cfg = TrainConfig(strategy="linear_probe", regularizer=l2sp, epochs=1)
        kwargs["features"] = {s: torch.zeros(len(getattr(data.splits, s)), 2) for s in ("train", "val")}
    else:
        cfg = TrainConfig(strategy=l2sp, epochs=1)
        kwargs["reference"] = source.state_dict() if path == "recipe" else None
    with pytest.raises(_Captured):
        train(target, data, cfg, accelerator=make_accelerator("no"), **kwargs)
    with torch.no_grad():  # the backbone moves away from w0 (the source's weights) by known amounts
        target.backbone[0].weight.add_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        target.backbone[0].bias.add_(torch.tensor([0.0, 3.0]))
    penalty = captured["penalty"](captured["module"])
    if path == "cached_features":  # only the head trains: beta/2 * (7 + 1)
        assert captured["module"] is target.head
        assert penalty.item() == pytest.approx(0.005 * 8)
    else:  # alpha/2 * (1 + 4 + 9) on the backbone + beta/2 * (7 + 1) on the new head
        assert penalty.item() == pytest.approx(0.05 * 14 + 0.005 * 8)
    penalty.backward()
    assert torch.allclose(target.head.weight.grad, 0.01 * target.head.weight.detach())
    assert torch.allclose(target.head.bias.grad, torch.tensor([0.0, 0.0, 0.01]))
    if path != "cached_features":
        assert torch.allclose(target.backbone[0].bias.grad, torch.tensor([0.0, 0.3]))


def test_l2sp_skips_frozen_parameters():
    model = nn.Linear(2, 2)
    model.weight.requires_grad_(False)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([1.0, 2.0]))
    assert L2SP({}, alpha=1.0, beta=2.0)(model).item() == pytest.approx(1.0 * 5.0)


def test_bss_penalty_is_the_smallest_squared_singular_values():
    features = torch.diag(torch.tensor([3.0, 2.0, 0.5]))  # singular values 3, 2, 0.5
    assert BSS(k=1, weight=0.1)(nn.Identity(), features).item() == pytest.approx(0.1 * 0.25)
    assert BSS(k=2, weight=1.0)(nn.Identity(), features).item() == pytest.approx(4.0 + 0.25)
    rotated = torch.linalg.qr(torch.randn(3, 3))[0] @ features  # invariant to an orthogonal change of basis
    assert BSS(k=1, weight=1.0)(nn.Identity(), rotated).item() == pytest.approx(0.25, rel=1e-4)


def test_objective_adds_penalties_and_reports_parts():
    model = build_target(tiny_source(), ["a", "b"])
    objective = ClassificationObjective(penalties=[BSS(1, 1.0), L2SP({}, 0.0, 1e-3)])
    out = objective(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    assert set(out) == {"loss", "logits", "ce", "bss", "l2sp"}
    assert out["loss"].item() == pytest.approx((out["ce"] + out["bss"] + out["l2sp"]).item(), rel=1e-6)


def test_regularizer_options_are_validated():
    with pytest.raises(RecipeError, match="valid options: alpha, beta"):
        regularizer_config({"name": "l2sp", "gamma": 1})
    with pytest.raises(RecipeError, match="alpha and beta must be >= 0"):
        regularizer_config({"name": "l2sp", "alpha": -1})
    _, problems = validate_recipe(
        {"source": "efficientnet_lite0", "data": {"dataset": "mnist5k"}, "train": {"regularizer": "l2p"}}
    )
    assert any(
        p.startswith("train.regularizer: unknown regularizer 'l2p'") and "Did you mean 'l2sp'" in p for p in problems
    )


# ----------------------------------------------------------------------------------------------- parameter choice


def test_llrd_matches_timm_layer_decay():
    import timm
    from timm.optim import param_groups_layer_decay

    ours = load_source("efficientnet_lite0")  # the source keeps its ImageNet classifier as the head
    _, (plan,) = _plans({"name": "llrd", "decay": 0.7}, model=ours, lr=1.0)
    our_scale = {p: g.lr for g in plan.groups for p in g.params}
    reference = timm.create_model("tf_efficientnet_lite0")
    timm_scale = {}
    named = {id(p): n for n, p in reference.named_parameters()}
    for group in param_groups_layer_decay(reference, layer_decay=0.7):
        for p in group["params"]:
            timm_scale[named[id(p)]] = group["lr_scale"]
    assert len(timm_scale) == len(our_scale)
    for name, scale in timm_scale.items():
        ours_name = name.replace("classifier.", "head.") if name.startswith("classifier.") else f"backbone.{name}"
        assert our_scale[ours_name] == pytest.approx(scale), name
    assert min(timm_scale.values()) == pytest.approx(0.7**17)


def test_freeze_first_groups_and_patterns():
    model, (plan,) = _plans({"name": "freeze", "groups": 2})
    groups = model.layer_groups()
    frozen = set(groups[0][1]) | set(groups[1][1])
    assert plan.trainable() == {n for n, _ in model.named_parameters()} - frozen
    # BatchNorm statistics of the whole backbone frozen by default (train_bn: false), explicitly listed
    assert "backbone.bn1" in plan.frozen_modules and all(m.startswith("backbone.") for m in plan.frozen_modules)
    _, (plan,) = _plans({"name": "freeze", "patterns": [r"^backbone\.blocks\.0\."], "train_bn": True}, model=model)
    assert not any(p.startswith("backbone.blocks.0.") for p in plan.trainable())
    assert "backbone.bn1" not in plan.frozen_modules and "backbone.blocks.0.0.bn1" in plan.frozen_modules
    with pytest.raises(RecipeError, match="matches no parameter"):
        _plans({"name": "freeze", "patterns": ["^nothing"]}, model=model)
    with pytest.raises(RecipeError, match="needs `groups: K`"):
        get_strategy("freeze")


def test_frozen_batchnorm_keeps_its_statistics_while_training():
    model, (plan,) = _plans({"name": "freeze", "groups": 1})
    apply_plan(model, plan)
    set_train_mode(model, plan)
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(before, model.backbone.bn1.running_mean)
    assert not model.backbone.bn1.training and model.head.training


def test_bitfit_trains_biases_and_head_only():
    model, (plan,) = _plans("bitfit")
    trainable = plan.trainable()
    assert trainable and all(n.endswith("bias") or n.startswith("head.") for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    total = sum(p.numel() for p in model.parameters())
    assert sum(model.get_parameter(n).numel() for n in trainable) < 0.05 * total


def test_gradual_unfreeze_stages_unfreeze_from_the_top():
    model, plans = _plans({"name": "gradual_unfreeze", "every": 2}, epochs=7)
    groups = [g for g, _ in model.layer_groups()]
    assert [p.epochs for p in plans] == [2, 2, 2, 1]
    assert [sorted(g.name for g in p.groups) for p in plans[:2]] == [["head"], sorted(["head", groups[-2]])]
    trainable = [p.trainable() for p in plans]
    assert all(a < b for a, b in itertools.pairwise(trainable))  # each stage trains strictly more


def test_lp_ft_is_a_probe_then_fine_tuning():
    model, (lp, ft) = _plans("lp_ft", epochs=6)
    assert lp.cached_features and lp.epochs == 2 and lp.trainable() == {"head.weight", "head.bias"}
    assert not ft.cached_features and ft.epochs == 4
    assert ft.trainable() == {n for n, _ in model.named_parameters()}
    assert [g.lr for g in ft.groups] == pytest.approx([0.001, 0.001])
    with pytest.raises(RecipeError, match="leaves no epoch for fine-tuning"):
        _plans({"name": "lp_ft", "lp_epochs": 3}, epochs=3)


def test_l2sp_strategy_replaces_weight_decay():
    _, (plan,) = _plans({"name": "l2sp", "alpha": 0.1})
    assert all(g.weight_decay == 0.0 for g in plan.groups)
    assert plan.regularizers == [("l2sp", {"alpha": 0.1, "beta": 0.01})]


# ------------------------------------------------------------------------------------------------ staged training


@pytest.fixture(scope="module")
def data():
    return small_mnist()


class _Interrupt(Exception):
    pass


def _train(data, tmp_path, strategy, resume=False, stop_at=None, **train_kw):
    from transferkit.engine.loop import JobPaths

    model = build_target(tiny_source(), data.classes, seed=0)
    cfg = TrainConfig(
        strategy=strategy, batch_size=8, lr=0.02, checkpoint_every=2, log_every=1, **{"epochs": 4, **train_kw}
    )
    calls = {"n": 0}

    def on_step(step: int) -> None:
        calls["n"] += 1
        if stop_at is not None and calls["n"] == stop_at:
            raise _Interrupt

    paths = JobPaths(tmp_path / "ckpt" / "last.pt", tmp_path / "metrics.jsonl", "job")
    result = train(
        model, data, cfg, seed=0, accelerator=make_accelerator("no"), paths=paths, resume=resume, on_step=on_step
    )
    return model, result


@pytest.mark.parametrize(
    ("strategy", "stop_at"),
    [
        ("lp_ft", 3),  # in the probe stage
        ("lp_ft", 12),  # in the fine-tuning stage (the probe has 5 steps per epoch, 1 epoch)
        ({"name": "gradual_unfreeze", "every": 1}, 13),  # in the third stage
    ],
)
def test_staged_strategies_resume_to_the_same_result(data, tmp_path, strategy, stop_at):
    reference, ref = _train(data, tmp_path / "a", strategy)
    with pytest.raises(_Interrupt):
        _train(data, tmp_path / "b", strategy, stop_at=stop_at)
    resumed, res = _train(data, tmp_path / "b", strategy, resume=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    strip = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]  # noqa: E731
    assert strip(ref["history"]) == strip(res["history"])
    assert ref["val"] == res["val"]


def test_lp_ft_with_l2sp_combines_selection_and_penalty(data):
    model = build_target(tiny_source(), data.classes, seed=0)
    cfg = TrainConfig(strategy="lp_ft", epochs=3, batch_size=8, regularizer={"name": "l2sp", "alpha": 0.5})
    result = train(model, data, cfg, accelerator=make_accelerator("no"))
    assert [s["stage"] for s in result["stages"]] == ["lp", "ft"]
    assert [h["stage"] for h in result["history"]] == ["lp", "ft", "ft"]
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert math.isfinite(result["val"]["loss"])


# ------------------------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_adapters_and_head_and_reloads_the_same(data, tmp_path):
    from transferkit.models.vision import load_model, save_model

    model = build_target(tiny_source(), data.classes, seed=0)
    frozen_before = model.backbone.conv_stem.weight.detach().clone()
    result = train(
        model,
        data,
        TrainConfig(strategy={"name": "lora", "r": 4}, epochs=2, batch_size=8, lr=0.02),
        accelerator=make_accelerator("no"),
    )
    names = [n for n, _ in model.named_parameters()]
    lora = [n for n in names if ".lora_" in n]
    assert lora and all(".conv_pw" in n for n in lora)  # the EfficientNet default: 1x1 convolutions
    assert result["trainable_params"] == sum(model.get_parameter(n).numel() for n in lora) + 10 * 256 + 10
    assert torch.equal(model.backbone.conv_stem.weight, frozen_before)
    assert any(model.get_parameter(n).abs().sum() > 0 for n in lora if "lora_B" in n)  # B starts at 0: it trained
    x = torch.randn(3, 3, 32, 32)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.adapter["r"] == 4
    assert torch.allclose(again(x), model.eval()(x), atol=1e-6)  # the head and adapters came back together


def test_lora_merge_gives_plain_weights_with_the_same_outputs(data):
    from transferkit.strategies.lora import merge_lora

    model = build_target(tiny_source(), data.classes, seed=0)
    train(
        model,
        data,
        TrainConfig(strategy={"name": "lora", "r": 2}, epochs=1, batch_size=8, lr=0.05),
        accelerator=make_accelerator("no"),
    )
    x = torch.randn(2, 3, 32, 32)
    before = model.eval()(x)
    merge_lora(model)
    assert model.adapter is None and not any(".lora_" in n for n, _ in model.named_parameters())
    assert torch.allclose(model(x), before, atol=1e-5)
    merged = build_target(tiny_source(), data.classes, seed=0)
    train(
        merged,
        data,
        TrainConfig(strategy={"name": "lora", "r": 2, "merge": True}, epochs=1, batch_size=8, lr=0.05),
        accelerator=make_accelerator("no"),
    )
    assert merged.adapter is None and set(merged.state_dict()) == set(model.state_dict())


def test_lora_bad_target_modules_is_a_recipe_error():
    with pytest.raises(RecipeError, match="match no layer of the backbone"):
        _plans({"name": "lora", "target_modules": ["nothing_here"]})


# ------------------------------------------------------------------------------------------------------------ DELTA


def _conv_model(w: list[float]):
    from transferkit.models.vision import SourceModel

    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(w).view(2, 1, 1, 1))
    backbone = nn.Sequential()
    backbone.add_module("blocks", nn.Sequential(conv))
    backbone.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)))
    model = SourceModel(backbone, nn.Identity(), {"family": "none", "name": "test"}, {}, None, 2)
    model.reset_head(2, ["a", "b"])
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    return model


def test_delta_penalty_against_hand_computed_value():
    from transferkit.strategies.regularizers import Delta, default_delta_layers

    source, target = _conv_model([1.0, 2.0]), _conv_model([1.0, 3.0])
    assert default_delta_layers(source.backbone) == ["blocks.0"]
    reference = {n: p for n, p in source.named_parameters() if n.startswith("backbone.")}
    delta = Delta(source.backbone, ["blocks.0"], reference, alpha=0.2, beta=0.1)
    x = torch.ones(1, 1, 2, 2)
    delta.prepare(target)  # as the objective does before its forward: hooks catch the target's maps
    target(x)
    value = delta(target, inputs=x)
    # channel 0: 1 vs 1 -> 0; channel 1: 3 vs 2 -> 1 per pixel; head (new): 1 + 4 = 5
    assert value.item() == pytest.approx(0.2 / 2 * 1.0 + 0.1 / 2 * 5.0)
    assert not any(p.requires_grad for p in source.backbone.parameters()) and not source.backbone.training


def test_delta_attention_weights_important_channels_more():
    from transferkit.strategies.regularizers import Delta

    source = _conv_model([1.0, 2.0])
    x, y = torch.ones(4, 1, 2, 2), torch.tensor([1, 1, 1, 1])
    delta = Delta(source.backbone, ["blocks.0"], {}, alpha=1.0, beta=0.0, attention=True, attention_batch=(x, y))
    weights = delta._channel_attention(source.head, x, y)["blocks.0"]
    # class 1 is read from channel 1 (head weight 2): removing channel 1 hurts, removing channel 0 helps
    assert weights[1] > weights[0] and weights.sum().item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="pass attention_batch"):
        Delta(source.backbone, ["blocks.0"], {}, alpha=1.0, beta=0.0, attention=True)


@pytest.mark.slow
def test_delta_attention_on_a_real_source_is_not_uniform():
    """Issue 18, defect 4: weights from a fresh head (near-zero logits) were near uniform, so inert; a probe fitted
    on EfficientNet-Lite0's own features first makes them tell channels apart."""
    from transferkit.config import DataConfig, SourceSpec
    from transferkit.data import prepare_data
    from transferkit.pipeline import _first_examples
    from transferkit.strategies.regularizers import Delta

    source = load_source(SourceSpec(name="efficientnet_lite0"))
    data = prepare_data(
        DataConfig(dataset="mnist5k", per_class=4, val_per_class=1, test_size=10, image_size=48), source, 0
    )
    x, y = _first_examples(data, 32)
    delta = Delta(source.backbone, ["blocks.1"], {}, 1.0, 0.0, attention=True, attention_batch=(x, y))
    weights = delta.fit_attention("cpu")["blocks.1"]
    assert weights.shape == (24,) and weights.sum().item() == pytest.approx(24.0, rel=1e-5)
    assert weights.max() / weights.min() > 1.4 and weights.std() > 0.1  # measured: 1.60 and 0.16
    fresh = build_target(source, data.classes, seed=0).head  # what the weights came from before
    inert = delta._channel_attention(fresh, x, y)["blocks.1"]
    assert inert.max() / inert.min() < 1.1 and inert.std() < weights.std() / 3  # measured: 1.08, 0.02


def test_delta_attention_is_measured_once_and_kept_in_the_checkpoint(data, tmp_path, monkeypatch):
    from transferkit.io import safe_torch_load
    from transferkit.strategies.regularizers import Delta

    strategy = {"name": "delta", "alpha": 0.1, "attention": True, "attention_examples": 8}
    calls = []
    measure = Delta.fit_attention
    monkeypatch.setattr(Delta, "fit_attention", lambda self, device=None: calls.append(1) or measure(self, device))
    reference, _ = _train(data, tmp_path / "a", strategy, epochs=2)
    assert len(calls) == 1  # once, before the first step
    with pytest.raises(_Interrupt):
        _train(data, tmp_path / "b", strategy, epochs=2, stop_at=3)
    saved = safe_torch_load(tmp_path / "b" / "ckpt" / "last.pt")["objective"]["0"]["delta_weights"]
    assert saved and all(w.sum().item() == pytest.approx(w.numel(), rel=1e-5) for w in saved.values())

    def refuse(self, device=None):
        raise AssertionError("a resumed run must read the channel weights from its checkpoint")

    monkeypatch.setattr(Delta, "fit_attention", refuse)
    resumed, _ = _train(data, tmp_path / "b", strategy, epochs=2, resume=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_delta_strategy_trains_and_leaves_the_source_untouched(data):
    source = tiny_source()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    model = build_target(source, data.classes, seed=0)
    result = train(
        model,
        data,
        TrainConfig(strategy={"name": "delta", "alpha": 0.1}, epochs=1, batch_size=8),
        accelerator=make_accelerator("no"),
        source=source,
        reference=source.state_dict(),
    )
    assert math.isfinite(result["val"]["loss"])
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    assert not torch.equal(model.backbone.conv_stem.weight, source.backbone.conv_stem.weight)


# ------------------------------------------------------------------------------------------------------------- auto


def test_auto_rule():
    from transferkit.strategies.auto import AutoConfig, choose_strategy

    assert choose_strategy(101, 3_400_000, 17)[0] == "full"
    assert choose_strategy(100, 3_400_000, 17)[0] == {"name": "freeze", "groups": 6}
    spec, reason = choose_strategy(5, 3_400_000, 17)
    assert spec == {"name": "freeze", "groups": 6}
    assert (
        "5 labelled example(s) in the smallest class (fewer than 101): freeze the first 6 of 17 layer groups" in reason
    )
    assert choose_strategy(100, 400_000_000, 17)[0] == "lora"
    assert choose_strategy(5, 3_400_000, 17, AutoConfig(freeze_below=3))[0] == "full"


def test_auto_resolves_from_the_data_and_says_why(data, capsys):
    model = build_target(tiny_source(), data.classes, seed=0)  # 4 examples per class -> freeze
    result = train(
        model, data, TrainConfig(strategy="auto", epochs=1, batch_size=8), accelerator=make_accelerator("no")
    )
    groups = len(model.layer_groups()) - 1
    assert result["strategy"] == "freeze" and not result["cached_features"]
    assert (
        f"auto: 4 labelled example(s) in the smallest class (fewer than 101): freeze the first {-(-groups // 3)} of"
    ) in result["auto"]
    assert result["auto"] in capsys.readouterr().out


def test_delta_on_a_text_encoder_compares_hidden_states(tmp_path):
    """Transformer layers return tuples and take a dict batch: DELTA compares the hidden units, per token."""
    from helpers import tiny_text_folder

    from transferkit.sources import load_source
    from transferkit.strategies.regularizers import Delta, default_delta_layers

    source = load_source(f"hf:{tiny_text_folder(tmp_path / 'bert')}")
    target = build_target(load_source(f"hf:{tmp_path / 'bert'}"), ["a", "b"], seed=0)
    layers = default_delta_layers(source.backbone)
    assert layers == ["model.encoder.layer.0", "model.encoder.layer.1"]
    batch = source.processor(["a fine film", "dull"], padding=True, return_tensors="pt")
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    delta = Delta(source.backbone, layers, {}, alpha=2.0, beta=0.0)
    delta.prepare(target)
    target(batch)
    assert delta(target, inputs=batch).item() == pytest.approx(0.0, abs=1e-10)  # same weights, same maps
    with torch.no_grad():  # shift layer 1's output dense bias of unit 3 by 0.5: after LayerNorm, unit 3 moves
        target.backbone.model.encoder.layer[1].output.LayerNorm.bias[3] += 0.5
    target(batch)
    # only hidden unit 3 of layer 1 differs, by exactly 0.5 at every token: alpha/2 * 0.5^2
    assert delta(target, inputs=batch).item() == pytest.approx(2.0 / 2 * 0.25, rel=1e-5)
    with pytest.raises(ValueError, match="without attention"):
        Delta(source.backbone, layers, {}, 1.0, 0.0, attention=True, attention_batch=(batch, torch.tensor([0, 1])))


def test_unwrap_sees_through_compile_and_ddp_wrappers_in_any_order() -> None:
    """Penalties and objectives read parameters by name: a compiled (``_orig_mod``) or DDP-style (``module``)
    wrapper, or both, must give back the model itself, so the names are the model's own."""
    from transferkit.strategies.regularizers import unwrap

    class Wrapper(torch.nn.Module):  # what DDP looks like to unwrap: the model as the ``module`` child
        def __init__(self, module: torch.nn.Module):
            super().__init__()
            self.module = module

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    compiled = torch.compile(model)  # lazy: nothing compiles until it is called
    assert [n for n, _ in compiled.named_parameters()] == ["_orig_mod.0.weight", "_orig_mod.0.bias"]
    for wrapped in (model, compiled, Wrapper(model), Wrapper(compiled), torch.compile(Wrapper(model))):
        assert unwrap(wrapped) is model
        assert [n for n, _ in unwrap(wrapped).named_parameters()] == ["0.weight", "0.bias"]
