"""The ``contrastive`` strategy (SetFit-style): its pair loss, its two stages, and training end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from helpers import small_mnist, tiny_source, tiny_text_folder, write_reviews
from torch import nn

import transferkit as tk
from transferkit.engine.loop import JobPaths, make_accelerator
from transferkit.engine.plan import cached_from_start
from transferkit.errors import RecipeError
from transferkit.models.base import SourceModel, load_model
from transferkit.pipeline import evaluate, feature_cache, fingerprint, plan_stages, prepare_data, train
from transferkit.recipe import DataConfig, TrainConfig
from transferkit.sources import load_source
from transferkit.strategies import STRATEGIES, get_strategy
from transferkit.strategies.contrastive import ContrastiveObjective, pair_cosine_loss, pair_stage_epochs
from transferkit.transfer import build_target

# ------------------------------------------------------------------------------------------------------ the loss


def test_pair_loss_equals_the_hand_computed_value():
    # cosines: (0,1) = 0, (0,2) = (1,2) = 1/sqrt(2); labels 0, 0, 1
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    labels = torch.tensor([0, 0, 1])
    # positive pair (0,1): (0 - 1)^2 = 1; negative pairs (0,2), (1,2): (0.7071 - 0)^2 = 0.5 each
    # mean over positives 1, over negatives 0.5: the loss is their mean, 0.75 (not 2/3, the mean over all pairs)
    assert pair_cosine_loss(emb, labels).item() == pytest.approx(0.75, abs=1e-6)
    # one class only: the positive pairs' mean, (0-1)^2, (0.7071-1)^2 twice -> (1 + 2 * 0.08579) / 3
    assert pair_cosine_loss(emb, torch.tensor([1, 1, 1])).item() == pytest.approx(
        (1 + 2 * (1 - 2**-0.5) ** 2) / 3, abs=1e-6
    )
    # all different: negatives only, (0 + 0.5 + 0.5) / 3
    assert pair_cosine_loss(emb, torch.tensor([0, 1, 2])).item() == pytest.approx(1 / 3, abs=1e-6)


def test_pair_loss_of_a_single_example_is_zero_with_a_zero_gradient():
    emb = torch.tensor([[1.0, 2.0]], requires_grad=True)
    loss = pair_cosine_loss(emb, torch.tensor([0]))
    loss.backward()
    assert loss.item() == 0.0 and emb.grad is not None and torch.equal(emb.grad, torch.zeros(1, 2))


def _mlp_model(seed: int = 0) -> SourceModel:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8))
    return SourceModel(backbone, nn.Linear(8, 2), {}, {}, ["a", "b"], 8)


def _mean_cosines(model: SourceModel, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        z = nn.functional.normalize(model.features(x), dim=1)
    cos = z @ z.T
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool)
    different = y[:, None] != y[None, :]
    return cos[same].mean().item(), cos[different].mean().item()


def test_same_label_embeddings_get_closer_and_the_head_does_not_push_the_encoder():
    model = _mlp_model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=g), torch.tensor([0, 1] * 6)
    same0, diff0 = _mean_cosines(model, x, y)
    objective = ContrastiveObjective()
    out = objective(model, x, y)
    assert set(out) == {"loss", "logits", "pairs", "ce"} and out["logits"].shape == (12, 2)
    assert out["loss"].item() == pytest.approx(out["pairs"].item() + out["ce"].item(), rel=1e-6)
    # the head's cross-entropy reaches the head only: the encoder's gradient is the pair loss's alone
    out["loss"].backward()
    encoder_grad = [p.grad.clone() for p in model.backbone.parameters()]
    model.zero_grad()
    pair_cosine_loss(model.features(x), y).backward()
    for a, p in zip(encoder_grad, model.backbone.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-7)
    model.zero_grad()
    optimizer = torch.optim.Adam(model.backbone.parameters(), lr=0.01)
    losses = []
    for _ in range(100):
        loss = objective(model, x, y)["pairs"]
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    same1, diff1 = _mean_cosines(model, x, y)
    assert losses[-1] < 0.5 * losses[0]
    assert same1 > same0 + 0.4  # same-label pairs pulled towards cosine 1 (0.16 -> 0.72)
    assert same1 - diff1 > (same0 - diff0) + 0.4  # and apart from the other label's (gap -0.08 -> 0.49)


# ------------------------------------------------------------------------------------------------------ the plans


def test_contrastive_is_registered_with_its_defaults():
    assert "contrastive" in STRATEGIES
    _, cfg = get_strategy("contrastive")
    assert (cfg.encoder_lr, cfg.pairs_per_example, cfg.pair_epochs, cfg.head_epochs, cfg.head_lr) == (
        1e-4,
        20,
        1,
        None,
        None,
    )


def test_plans_tune_the_encoder_on_pairs_then_the_head_on_cached_features():
    model = build_target(tiny_source(), ["a", "b", "c"], seed=0)
    strategy, options = get_strategy({"name": "contrastive", "encoder_lr": 1e-4, "head_epochs": 5})
    pairs, head = plan_stages(strategy, options, model, TrainConfig(strategy="contrastive", batch_size=16, lr=0.003))
    everything = {n for n, _ in model.named_parameters()}
    head_names = {n for n in everything if n.startswith("head.")}
    assert head_names == {"head.weight", "head.bias"}
    # stage 1: the encoder at encoder_lr, by the pair loss; the head (on detached features) at train.lr
    assert pairs.name == "pairs" and not pairs.cached_features and pairs.trainable() == everything
    assert {g.name: g.lr for g in pairs.groups} == {"backbone": 1e-4, "head": 0.003}
    assert pairs.epochs == 6  # ceil(4 * 20 / (16 - 1)): as many pairs as SetFit's 2 R N
    assert isinstance(pairs.objective(nn.Module()), ContrastiveObjective)
    batch_norms = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert batch_norms and set(pairs.frozen_modules) == batch_norms  # BatchNorm statistics stay the source's
    # stage 2: the head alone, on features computed once from the tuned (frozen) encoder
    assert head.name == "head" and head.cached_features and head.epochs == 5
    assert head.trainable() == head_names and head.frozen_modules == ["backbone"] and head.objective is None
    assert [g.lr for g in head.groups] == [0.003]
    # the run must not share features of the source's encoder with the head stage; a linear probe may
    assert not cached_from_start([pairs, head])
    assert cached_from_start(plan_stages(*get_strategy("linear_probe"), model, TrainConfig()))
    assert cached_from_start(plan_stages(*get_strategy("lp_ft"), model, TrainConfig(epochs=3)))


def test_pair_stage_length_follows_pairs_per_example_and_batch_size():
    _, cfg = get_strategy({"name": "contrastive", "pairs_per_example": 5, "pair_epochs": 3})
    assert pair_stage_epochs(cfg, 2) == 3 * 20  # one pair per batch of 2: 20 epochs give each example 20 partners
    assert pair_stage_epochs(cfg, 21) == 3 * 1
    assert pair_stage_epochs(cfg, 8) == 3 * math.ceil(20 / 7)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("encoder_lr", 0, "encoder_lr must be a number > 0 (1e-4 by default; SetFit's is 2e-5), got 0"),
        ("encoder_lr", float("nan"), "encoder_lr must be a number > 0"),
        ("encoder_lr", "fast", "encoder_lr must be a number > 0"),
        ("pairs_per_example", 0, "pairs_per_example must be an integer >= 1 (SetFit's num_iterations is 20), got 0"),
        ("pairs_per_example", 2.5, "pairs_per_example must be an integer >= 1"),
        ("pair_epochs", True, "pair_epochs must be an integer >= 1, got True"),
        ("head_epochs", 0, "head_epochs must be an integer >= 1 (or leave it out for train.epochs), got 0"),
        ("head_lr", -0.1, "head_lr must be a number > 0 (or leave it out for train.lr), got -0.1"),
    ],
)
def test_bad_options_are_recipe_errors_naming_the_option(option, value, message):
    with pytest.raises(RecipeError, match="strategy 'contrastive': " + message.replace("(", r"\(").replace(")", r"\)")):
        get_strategy({"name": "contrastive", option: value})


def test_unknown_option_suggests_the_right_one():
    with pytest.raises(RecipeError, match="Did you mean 'pairs_per_example'"):
        get_strategy({"name": "contrastive", "pairs_per_exampel": 4})


def test_plans_refuse_a_batch_without_pairs_and_a_regularizer():
    model = build_target(tiny_source(), ["a", "b"], seed=0)
    strategy, options = get_strategy("contrastive")
    with pytest.raises(RecipeError, match=r"train.batch_size must be >= 2, got 1"):
        plan_stages(strategy, options, model, TrainConfig(strategy="contrastive", batch_size=1))
    with pytest.raises(RecipeError, match=r"leave train.regularizer out"):
        plan_stages(strategy, options, model, TrainConfig(strategy="contrastive", regularizer="l2sp"))


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    return tiny_text_folder(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def reviews(tiny_text, tmp_path_factory):
    path = write_reviews(tmp_path_factory.mktemp("reviews") / "reviews.csv")
    source = load_source(f"hf:{tiny_text}")
    cfg = DataConfig(dataset=str(path), per_class=8, val_per_class=4, test_size=16, max_length=16)
    return prepare_data(cfg, source, seed=0)


_CFG = {"name": "contrastive", "pairs_per_example": 4, "encoder_lr": 1e-3, "head_epochs": 3}


def _text_target(tiny_text, labels):
    return build_target(load_source(f"hf:{tiny_text}"), labels, seed=0)


def test_text_training_tunes_the_encoder_then_the_head_on_its_features(tiny_text, reviews):
    model = _text_target(tiny_text, reviews.classes)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # source features given to train(): the head stage must not use them, the encoder has moved since
    stale = feature_cache(model, reviews, splits=("train", "val"))
    cfg = TrainConfig(strategy=_CFG, epochs=2, batch_size=8, lr=0.01)
    result = train(model, reviews, cfg, accelerator=make_accelerator("no"), features=stale)
    assert [s["stage"] for s in result["stages"]] == ["pairs", "head"]
    assert [s["epochs"] for s in result["stages"]] == [3, 3]  # ceil(4 * 4 / 7) pair epochs
    assert [h["stage"] for h in result["history"]] == ["pairs"] * 3 + ["head"] * 3
    assert result["cached_features"] and result["stages"][-1]["cached_features"]
    moved = [k for k, v in model.state_dict().items() if k.startswith("backbone.") and not torch.equal(v, start[k])]
    assert moved, "the pair stage did not change the encoder"
    assert not torch.equal(model.head.weight, start["head.weight"])
    # the reported validation accuracy is the trained model's own, through the tuned encoder
    val = evaluate(model, reviews.dataset("val"), len(reviews.classes))
    assert result["val"]["accuracy"] == pytest.approx(val["accuracy"])
    # the same training without the stale features gives the same weights: they were not used
    again = _text_target(tiny_text, reviews.classes)
    train(again, reviews, cfg, accelerator=make_accelerator("no"))
    assert fingerprint(again) == fingerprint(model)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_at", [2, 7])  # 2 steps an epoch in the pair stage (3 epochs), then the head stage
def test_interrupted_contrastive_training_resumes_to_the_same_weights(tiny_text, reviews, tmp_path, stop_at):
    def run(folder, resume=False, stop=None):
        model = _text_target(tiny_text, reviews.classes)
        calls = {"n": 0}

        def on_step(step: int) -> None:
            calls["n"] += 1
            if calls["n"] == stop:
                raise _Interrupt

        paths = JobPaths(folder / "last.pt", folder / "metrics.jsonl", "job")
        cfg = TrainConfig(strategy=_CFG, epochs=2, batch_size=8, lr=0.01, checkpoint_every=1)
        result = train(
            model, reviews, cfg, accelerator=make_accelerator("no"), paths=paths, resume=resume, on_step=on_step
        )
        return model, result

    reference, ref = run(tmp_path / "a")
    with pytest.raises(_Interrupt):
        run(tmp_path / "b", stop=stop_at)
    resumed, res = run(tmp_path / "b", resume=True)
    assert fingerprint(resumed) == fingerprint(reference)
    assert ref["val"] == res["val"]


def test_image_model_trains_by_pairs_too():
    data = small_mnist(per_class=3, val_per_class=1, test_size=10, image_size=32)
    model = build_target(tiny_source(), data.classes, seed=0)
    bn = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    start = fingerprint(model)
    cfg = TrainConfig(strategy={**_CFG, "pairs_per_example": 2, "head_epochs": 1}, epochs=1, batch_size=10, lr=0.01)
    result = train(model, data, cfg, accelerator=make_accelerator("no"))
    assert [s["stage"] for s in result["stages"]] == ["pairs", "head"] and fingerprint(model) != start
    assert result["history"][0]["train_loss"] > 0
    assert torch.equal(bn.running_mean, stats)  # BatchNorm statistics held in eval mode


def test_recipe_run_evaluates_the_test_set_through_the_tuned_encoder(tiny_text, tmp_path):
    """The run's first model (a linear probe) caches the source's features; contrastive must not use them."""
    data = write_reviews(tmp_path / "reviews.csv")
    recipe = {
        "name": "contrastive-test",
        "source": f"hf:{tiny_text}",
        "data": {"dataset": str(data), "per_class": 8, "val_per_class": 4, "test_size": 16, "max_length": 16},
        "train": {"strategy": "linear_probe", "epochs": 2, "batch_size": 8, "lr": 0.01},
        "compare": [{"strategy": _CFG, "label": "setfit"}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tk.run_recipe(path, out=tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    result = metrics["models"]["setfit"]
    assert [s["stage"] for s in result["stages"]] == ["pairs", "head"]
    model = load_model(run / "models" / "setfit")
    prepared = prepare_data(
        DataConfig(dataset=str(data), per_class=8, val_per_class=4, test_size=16, max_length=16),
        model,
        seed=0,
    )
    test = evaluate(model, prepared.dataset("test"), 2)
    assert result["test"]["accuracy"] == pytest.approx(test["accuracy"])
    assert result["test"]["loss"] == pytest.approx(test["loss"], rel=1e-4)
