"""Strategies and the training loop: linear probe equivalence, learning rates, exact resume, NaN losses."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import small_mnist, tiny_source

from transferkit.engine import loop
from transferkit.engine.loop import JobPaths, conv_layout, fit, make_accelerator
from transferkit.engine.schedule import lr_factor
from transferkit.errors import RecipeError, TrainingError
from transferkit.models.base import save_model
from transferkit.pipeline import fingerprint, train
from transferkit.recipe import TrainConfig
from transferkit.sources import load_source
from transferkit.strategies import get_strategy
from transferkit.strategies.base import ParamGroup, TrainPlan, apply_plan
from transferkit.transfer import build_target


@pytest.fixture(scope="module")
def data():
    return small_mnist()


def test_linear_probe_on_cached_features_equals_frozen_backbone_training(data):
    source = tiny_source()
    cfg = TrainConfig(strategy="linear_probe", epochs=3, batch_size=8, lr=0.05, log_every=1)
    probe = build_target(source, data.classes, seed=0)
    train(probe, data, cfg, seed=0, accelerator=make_accelerator("no"))

    # the same head trained through the frozen backbone, held in eval mode, on images
    frozen = build_target(source, data.classes, seed=0)
    plan = TrainPlan([ParamGroup("head", ["head.weight", "head.bias"], cfg.lr)], frozen_modules=["backbone"])
    apply_plan(frozen, plan)
    result = fit(
        frozen,
        data.dataset("train"),
        data.dataset("val"),
        cfg,
        plan,
        num_classes=10,
        seed=0,
        accelerator=make_accelerator("no"),
    )
    frozen.load_state_dict(result.best_state)

    assert torch.allclose(probe.head.weight, frozen.head.weight, atol=1e-5)
    assert torch.allclose(probe.head.bias, frozen.head.bias, atol=1e-5)
    # and the backbone really stayed untouched (BatchNorm statistics included)
    assert torch.equal(probe.backbone.bn1.running_mean, frozen.backbone.bn1.running_mean)
    assert torch.equal(frozen.backbone.bn1.running_mean, source.backbone.bn1.running_mean)


def test_full_strategy_learning_rates():
    model = build_target(tiny_source(), ["a", "b"])
    strategy, options = get_strategy({"name": "full", "backbone_lr": 1e-4})
    plan = strategy.plan(model, options, TrainConfig(lr=1e-2))
    lrs = {g.name: g.lr for g in plan.groups}
    assert lrs == {"backbone": 1e-4, "head": 1e-2}
    assert plan.trainable() == {n for n, _ in model.named_parameters()}
    strategy, options = get_strategy("full")
    lrs = {g.name: g.lr for g in strategy.plan(model, options, TrainConfig(lr=1e-2)).groups}
    assert lrs["backbone"] == pytest.approx(1e-3)
    strategy, options = get_strategy("scratch")
    assert strategy.from_scratch
    assert {g.lr for g in strategy.plan(model, options, TrainConfig(lr=1e-2)).groups} == {1e-2}


def test_strategy_options_are_validated():
    with pytest.raises(RecipeError, match="valid options: backbone_lr, backbone_lr_scale"):
        get_strategy({"name": "full", "backbone_lr_sale": 0.1})
    with pytest.raises(RecipeError, match="backbone_lr_scale must be > 0, got -1"):
        get_strategy({"name": "full", "backbone_lr_scale": -1})


def test_schedule_shapes():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(50, 100, 0, "constant") == 1.0
    assert lr_factor(29, 100, 0, "onecycle") == pytest.approx(1.0)  # 30% warmup
    assert lr_factor(99, 100, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))


class _Interrupt(Exception):
    pass


def _fit_full(data, tmp_path, resume: bool, stop_at: int | None = None):
    source = tiny_source()
    cfg = TrainConfig(strategy="full", epochs=3, batch_size=8, lr=0.01, checkpoint_every=2, log_every=1)
    model = build_target(source, data.classes, seed=0)
    strategy, options = get_strategy("full")
    plan = strategy.plan(model, options, cfg)
    apply_plan(model, plan)

    def on_step(step: int) -> None:
        if stop_at is not None and step == stop_at:
            raise _Interrupt

    paths = JobPaths(tmp_path / "ckpt" / "last.pt", tmp_path / "metrics.jsonl", "full")
    return fit(
        model,
        data.dataset("train", train=True),
        data.dataset("val"),
        cfg,
        plan,
        num_classes=10,
        seed=0,
        accelerator=make_accelerator("no"),
        paths=paths,
        resume=resume,
        on_step=on_step,
    )


@pytest.mark.parametrize(("stop_at", "checkpoint_step"), [(5, 4), (6, 5)])
def test_resume_after_interruption_gives_the_same_result(tmp_path, stop_at, checkpoint_step):
    # augmentation and dropout both draw random numbers: resume must restore exactly where they were.
    # 5 steps per epoch, a checkpoint every 2 steps and at each epoch end: stopping at step 5 resumes from the
    # mid-epoch checkpoint of step 4, stopping at step 6 from the end of epoch 1 (best weights = current ones)
    data = small_mnist(rotation=15, translate=0.1)
    reference = _fit_full(data, tmp_path / "a", resume=False)
    with pytest.raises(_Interrupt):
        _fit_full(data, tmp_path / "b", resume=False, stop_at=stop_at)
    resumed = _fit_full(data, tmp_path / "b", resume=True)
    assert resumed.resumed_from_step == checkpoint_step
    assert resumed.history == [{**h, "time_s": r["time_s"]} for h, r in zip(reference.history, resumed.history)]
    for k, v in reference.best_state.items():
        assert torch.equal(v, resumed.best_state[k]), k
    # the log has each step once, as the uninterrupted run's
    lines = [ln for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    ref_lines = [ln for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert len(lines) == len(ref_lines) == 15


def test_nan_loss_stops_with_a_clear_error(data):
    model = build_target(tiny_source(), data.classes, seed=0)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    cfg = TrainConfig(strategy="full", epochs=1, batch_size=8, log_every=1)
    with pytest.raises(TrainingError, match=r"loss became nan in epoch 1 before step 1\. Lower the learning rate"):
        train(model, data, cfg, accelerator=make_accelerator("no"))


def test_gradient_accumulation_matches_a_larger_batch(data):
    """2 micro-batches of 4 with accumulation = 1 batch of 8 (no BatchNorm in the trained part: the head)."""
    heads = []
    for batch, accum in ((8, 1), (4, 2)):
        model = build_target(tiny_source(), data.classes, seed=0)
        cfg = TrainConfig(strategy="linear_probe", epochs=2, batch_size=batch, grad_accum=accum, lr=0.05)
        train(model, data, cfg, accelerator=make_accelerator("no"))
        heads.append(model.head.weight.detach().clone())
    # same examples per step: the order differs only by batch boundaries, which accumulation removes
    assert torch.allclose(heads[0], heads[1], atol=1e-5)


def test_early_stopping_stops_after_patience(data):
    model = build_target(tiny_source(), data.classes, seed=0)
    # a zero-ish learning rate: validation cannot improve after the first epoch
    cfg = TrainConfig(strategy="linear_probe", epochs=10, batch_size=8, lr=1e-12, early_stopping_patience=2)
    result = train(model, data, cfg, accelerator=make_accelerator("no"))
    assert result["epochs_run"] == 3 and result["best_epoch"] == 1


def test_python_api_is_plain_functions(data, tmp_path):
    import transferkit as tk

    model = tk.build_target(tiny_source(), data.classes)
    tk.train(model, data, tk.TrainConfig(strategy="linear_probe", epochs=1, batch_size=8))
    metrics = tk.evaluate(model, data.dataset("test"))
    assert metrics["n"] == 40 and len(metrics["confusion"]) == 10
    tk.save_model(model, tmp_path / "m")
    probs = tk.load_run(tmp_path / "m").predict_proba([data.examples.items[0]])
    assert probs.shape == (1, 10) and abs(float(probs.sum()) - 1) < 1e-5


def _pretrained_source(folder):
    """A source loaded from a model folder: every tensor came from it, as a downloaded source's do."""
    model = tiny_source(seed=5)
    model.reset_head(3, ["x", "y", "z"])
    save_model(model, folder)
    return load_source(str(folder))


def test_scratch_refuses_a_model_holding_transferred_weights(data, tmp_path):
    source = _pretrained_source(tmp_path / "src")
    model = build_target(source, data.classes, seed=0)
    before = fingerprint(model)
    cfg = TrainConfig(strategy="scratch", epochs=1, batch_size=8)
    with pytest.raises(RecipeError) as info:
        train(model, data, cfg, accelerator=make_accelerator("no"))
    backbone = len(list(model.backbone.parameters()))
    assert str(info.value).startswith(
        f"train.strategy 'scratch' trains from random weights, but the model holds {backbone} parameter tensors "
        f"transferred from its source (backbone.conv_stem.weight from {tmp_path / 'src'}:backbone.conv_stem.weight"
        ", ...); training it would fine-tune them. Build the target from random weights, as a recipe does: "
        "build_target(source, labels, pretrained=False)"
    )
    assert fingerprint(model) == before  # refused before any weight moved
    # the target a recipe builds for scratch: random weights, nothing transferred
    scratch = build_target(source, data.classes, pretrained=False, seed=0)
    assert not torch.equal(scratch.backbone.conv_stem.weight, source.backbone.conv_stem.weight)
    result = train(scratch, data, cfg, accelerator=make_accelerator("no"))
    assert result["from_scratch"] is True and result["epochs_run"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Channels-last weights while the engine runs a convolutional model


def _layouts(model: torch.nn.Module) -> set[str]:
    """The layouts of the convolution weights that have one (1x1 and depthwise kernels are both at once)."""
    out = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1 and m.weight.shape[-1] > 1:
            out.add(
                "channels_last"
                if m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
                else "contiguous"
            )
    return out


def test_conv_layout_is_channels_last_inside_restored_after_and_nests():
    model = tiny_source().backbone
    weight = model.conv_stem.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert _layouts(model) == {"contiguous"}
    with conv_layout(model):
        assert _layouts(model) == {"channels_last"}
        with conv_layout(model):  # e.g. fit's validation pass: no change, and nothing restored on exit
            assert _layouts(model) == {"channels_last"}
        assert _layouts(model) == {"channels_last"}
    assert _layouts(model) == {"contiguous"}
    assert all(p.is_contiguous() for p in model.parameters())
    assert model.conv_stem.weight is weight  # the same Parameter objects: an optimizer built before still holds them
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), conv_layout(model):
        raise RuntimeError("boom")
    assert _layouts(model) == {"contiguous"}  # restored on an exception too
    text_like = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with conv_layout(text_like):  # no 2-D convolution: left alone
        assert text_like[0].weight.is_contiguous()


def test_fit_trains_in_channels_last_and_gives_the_same_result(data):
    """Training sees channels-last weights, the result matches the default layout to float rounding, and the
    model comes back with ordinary (contiguous) weights, as saving and export expect."""
    cfg = TrainConfig(strategy="full", epochs=2, batch_size=8, lr=0.01, log_every=1)
    seen = []

    def run(layout: bool):
        model = build_target(tiny_source(), data.classes, seed=0)
        strategy, options = get_strategy("full")
        plan = strategy.plan(model, options, cfg)
        apply_plan(model, plan)
        if not layout:  # the baseline: mark the model as already inside conv_layout, so fit leaves it as it is
            loop._CHANNELS_LAST.add(model)
        result = fit(
            model,
            data.dataset("train", train=True),
            data.dataset("val"),
            cfg,
            plan,
            num_classes=10,
            seed=0,
            accelerator=make_accelerator("no"),
            on_step=lambda step: seen.append((layout, _layouts(model.backbone))),
        )
        loop._CHANNELS_LAST.discard(model)
        return model, result

    model, result = run(layout=True)
    _, base_result = run(layout=False)
    assert {on for on, _ in seen} == {True, False}
    assert all(layouts == {"channels_last"} for on, layouts in seen if on)
    assert all(layouts == {"contiguous"} for on, layouts in seen if not on)
    assert all(p.is_contiguous() for p in model.parameters())
    assert result.history[-1]["train_loss"] == pytest.approx(base_result.history[-1]["train_loss"], rel=1e-4)
    # weight by weight, Adam magnifies rounding where a gradient is ~0 (a BatchNorm bias of 0.002 may move by 0.002);
    # the weights as a whole agree to 1e-3 relative
    names = [n for n, _ in model.named_parameters()]
    a = torch.cat([result.best_state[n].flatten() for n in names])
    b = torch.cat([base_result.best_state[n].flatten() for n in names])
    assert ((a - b).norm() / b.norm()).item() < 1e-3
    assert result.best_val["accuracy"] == base_result.best_val["accuracy"]


def test_compute_features_agree_between_layouts(data):
    from transferkit.pipeline import compute_features

    backbone = tiny_source().backbone.eval()
    dataset = data.dataset("val")
    fast = compute_features(backbone, dataset, batch_size=8)
    assert _layouts(backbone) == {"contiguous"}
    loop._CHANNELS_LAST.add(backbone)  # the default layout, for comparison
    try:
        plain = compute_features(backbone, dataset, batch_size=8)
    finally:
        loop._CHANNELS_LAST.discard(backbone)
    assert fast.shape == plain.shape == (len(dataset), backbone.num_features)
    assert torch.allclose(fast, plain, atol=1e-5, rtol=1e-4)


def test_the_config_seed_takes_the_place_of_the_seed_argument(data):
    """TrainConfig.seed (a recipe's train.seed) is honoured by the Python API too: the same weights as seed=."""
    cfg = TrainConfig(strategy="full", epochs=1, batch_size=8, lr=0.01)
    by_argument = build_target(tiny_source(), data.classes)
    train(by_argument, data, cfg, seed=3)
    by_config = build_target(tiny_source(), data.classes)
    train(by_config, data, cfg.model_copy(update={"seed": 3}), seed=0)
    other = build_target(tiny_source(), data.classes)
    train(other, data, cfg, seed=0)
    assert fingerprint(by_config) == fingerprint(by_argument) != fingerprint(other)


def test_a_checkpoint_holds_every_random_stream_and_the_loss_scaler(tmp_path):
    """Exact resume on a GPU needs the CUDA generators and the fp16 loss scaler too: both are saved and put back
    (checked here with a CPU GradScaler standing in for the accelerator's; the CUDA list is empty on a CPU)."""
    import random

    import numpy as np

    from transferkit.engine.loop import restore_random_state
    from transferkit.io import safe_torch_load

    accelerator = make_accelerator("no")
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    data = small_mnist()
    model = build_target(tiny_source(), data.classes, seed=0)
    cfg = TrainConfig(strategy="full", epochs=1, batch_size=8, lr=0.01)
    strategy, options = get_strategy("full")
    plan = strategy.plan(model, options, cfg)
    apply_plan(model, plan)
    paths = JobPaths(tmp_path / "last.pt", tmp_path / "m.jsonl", "full")
    fit(model, data.dataset("train"), data.dataset("val"), cfg, plan, num_classes=10, seed=0,
        accelerator=accelerator, paths=paths)  # fmt: skip
    ckpt = safe_torch_load(paths.checkpoint)
    assert ckpt["scaler"]["scale"] == 1024.0 and ckpt["scaler"]["growth_interval"] == 7
    assert len(ckpt["cuda_rng"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert ckpt["rng"].dtype == torch.uint8 and ckpt["python_rng"] and ckpt["numpy_rng"]
    # restoring puts every stream and the scaler back where the checkpoint was taken
    after = (torch.rand(1), random.random(), np.random.rand())
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    restore_random_state(ckpt, accelerator)
    assert accelerator.scaler.get_scale() == 1024.0
    assert (torch.rand(1), random.random(), np.random.rand()) == after
