"""The GPU defaults of the training loop (issue 20), checked on a CPU: the speed record of ``fit``, the choice of the
input path (``data.input``), the fused AdamW, ``train.compile`` and ``train.gradient_checkpointing``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from helpers import small_mnist, tiny_source

from transferkit.data.gpu_images import TensorImageDataset, choose_input
from transferkit.engine import loop
from transferkit.engine.loop import JobPaths, fit, make_accelerator, set_gradient_checkpointing
from transferkit.errors import DataError, TrainingError
from transferkit.recipe import DataConfig, TrainConfig
from transferkit.strategies.base import ParamGroup, TrainPlan, apply_plan
from transferkit.transfer import build_target


class _Interrupt(Exception):
    pass


def _fit(data, folder: Path | None, input_path: str = "auto", stop_at: int | None = None, resume=False, **train):
    model = build_target(tiny_source(), data.classes, seed=0)
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 1e-3, "log_every": 1, "checkpoint_every": 2, **train})
    plan = TrainPlan([ParamGroup("all", [n for n, _ in model.named_parameters()], cfg.lr)])
    apply_plan(model, plan)

    def on_step(step: int) -> None:
        if step == stop_at:
            raise _Interrupt

    paths = JobPaths(folder / "ckpt" / "last.pt", folder / "metrics.jsonl", "m") if folder else None
    result = fit(
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
        input_path=input_path,
        compile_backend="eager",
    )
    return result


@pytest.fixture(scope="module")
def data():
    return small_mnist(per_class=2, val_per_class=1, test_size=10, random_resized_crop=(0.6, 1.0), hflip=True)


def test_the_cpu_record_keeps_the_pil_path_and_says_why(data):
    result = _fit(data, None)
    speed = result.speed
    assert speed["input"] == {"path": "pil", "reason": "the device is cpu: the PIL path is the CPU default"}
    assert (speed["mixed_precision"], speed["fused_optimizer"], speed["compiled"]) == ("no", False, False)
    assert speed["channels_last"] is True  # the tiny EfficientNet has convolutions
    assert speed["gradient_checkpointing"] == "off"
    assert "compile_s" not in speed and len(speed["first_steps_s"]) == 4


def test_data_input_key_is_validated():
    assert DataConfig(dataset="mnist5k").input == "auto"
    with pytest.raises(ValueError, match="'auto', 'pil' or 'gpu'"):
        DataConfig(dataset="mnist5k", input="cuda")


def test_input_gpu_on_a_cpu_trains_from_the_uint8_cache_and_resumes_to_the_same_weights(data, tmp_path):
    reference = _fit(data, tmp_path / "a", input_path="gpu")
    record = reference.speed["input"]
    assert record["path"] == "gpu" and record["reason"] == "data.input: gpu"
    assert record["cache"]["side"] == 37 and record["cache"]["square"] is False  # 8/7 of 32, for random crops
    assert record["cache"]["decoded"] == 20 and Path(record["cache"]["file"]).parent == tmp_path / "a/cache/images"
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in reference.history)

    with pytest.raises(_Interrupt):
        _fit(data, tmp_path / "b", input_path="gpu", stop_at=3)
    resumed = _fit(data, tmp_path / "b", input_path="gpu", resume=True)
    assert resumed.resumed_from_step == 2
    assert resumed.speed["input"]["cache"]["decoded"] == 0  # the interrupted run's cache, mapped again
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in reference.history]
    for k, v in reference.best_state.items():
        assert torch.equal(v, resumed.best_state[k]), k


def test_input_choice_refuses_what_the_tensor_path_cannot_do(tmp_path):
    rotated = small_mnist(per_class=2, val_per_class=1, test_size=10, rotation=10)
    train_set = rotated.dataset("train", train=True)
    kept, record = choose_input(train_set, "auto", "cuda")
    assert kept is train_set and record["path"] == "pil"
    assert record["reason"] == (
        "augmentation RandomAffine (data.augment.rotation / data.augment.translate) has no tensor version on this path"
    )
    with pytest.raises(DataError, match=r"data.input: gpu cannot reproduce .* RandomAffine .* set data.input: auto"):
        choose_input(train_set, "gpu", "cpu")
    assert choose_input(train_set, "pil", "cuda")[1] == {"path": "pil", "reason": "data.input: pil"}
    # no run folder: the tensor path decodes every batch
    plain = small_mnist(per_class=2, val_per_class=1, test_size=10).dataset("train", train=True)
    chosen, record = choose_input(plain, "gpu", "cpu")
    assert isinstance(chosen, TensorImageDataset) and chosen.cache is None and record["no_cache"] == "no run folder"


def test_fused_adamw_takes_the_same_step_as_the_plain_one():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    twin = copy.deepcopy(model)
    plan = TrainPlan([ParamGroup("all", ["weight", "bias"], 0.1)])
    cfg = TrainConfig(lr=0.1)
    fused, plain = loop._build_optimizer(model, plan, cfg, fused=True), loop._build_optimizer(twin, plan, cfg)
    assert [g["fused"] for g in fused.param_groups] == [True, True] and plain.param_groups[0]["fused"] is None
    x = torch.randn(5, 6)
    for m, opt in ((model, fused), (twin, plain)):
        for _ in range(3):
            m(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert torch.allclose(model.weight, twin.weight, atol=1e-6) and torch.allclose(model.bias, twin.bias, atol=1e-6)
    assert not torch.allclose(model.weight, copy.deepcopy(torch.nn.Linear(6, 3)).weight)


def test_compile_gives_the_eager_loss_trajectory_and_reports_its_time(data):
    eager = _fit(data, None, epochs=1)
    compiled = _fit(data, None, epochs=1, compile=True)
    assert compiled.speed["compiled"] is True and compiled.speed["compile_backend"] == "eager"
    assert compiled.speed["compile_s"] is not None and compiled.speed["compile_s"] >= 0
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-5)
    for k, v in eager.best_state.items():
        assert torch.allclose(v.float(), compiled.best_state[k].float(), atol=1e-5), k


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3)
    model.train()
    twin = copy.deepcopy(model)
    assert set_gradient_checkpointing(twin, True, "cpu") == "on"
    assert set_gradient_checkpointing(model, "auto", "cpu") == "off"  # auto: never on a CPU
    x = torch.randn(2, 3, *model.default_cfg["input_size"][1:])
    torch.manual_seed(1)
    model(x).logsumexp(-1).sum().backward()
    torch.manual_seed(1)
    twin(x).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in twin.named_parameters():
        assert p.grad is not None and torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_gradient_checkpointing_true_without_a_backbone_is_refused():
    with pytest.raises(TrainingError, match="needs a timm or transformers backbone; Linear has none"):
        set_gradient_checkpointing(torch.nn.Linear(2, 2), True, "cpu")
    assert set_gradient_checkpointing(torch.nn.Linear(2, 2), "auto", "cuda") == "off"


def test_the_pipeline_puts_the_record_in_the_models_summary(data):
    from transferkit.pipeline import train

    model = build_target(tiny_source(), data.classes, seed=0)
    summary = train(model, data, TrainConfig(epochs=1, batch_size=8), seed=0, accelerator=make_accelerator("no"))
    assert summary["speed"]["input"]["path"] == "pil" and summary["speed"]["fused_optimizer"] is False
    assert summary["speed"]["gradient_checkpointing"] == "off" and summary["speed"]["mixed_precision"] == "no"


@pytest.mark.slow
def test_compile_with_inductor_on_a_cpu_trains_like_eager(data):
    """The real backend (C++ code generated and compiled for the CPU): slow on 2 shared cores, so marked slow."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    twin = copy.deepcopy(model)
    cfg = TrainConfig(epochs=1, batch_size=8, log_every=1)
    plans = [TrainPlan([ParamGroup("all", [n for n, _ in m.named_parameters()], cfg.lr)]) for m in (model, twin)]
    how = {"num_classes": 10, "seed": 0, "accelerator": make_accelerator("no")}
    train_set, val_set = data.dataset("train"), data.dataset("val")
    eager = fit(model, train_set, val_set, cfg, plans[0], **how)
    compiled = fit(twin, train_set, val_set, cfg.model_copy(update={"compile": True}), plans[1], **how)
    assert compiled.speed["compile_backend"] == "inductor" and compiled.speed["compile_s"] > 0
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-4)


def test_tensor_path_batches_follow_the_models_channels_last_layout(data, tmp_path):
    """conv_layout makes a convolutional model channels-last (on any device): the tensor path's training batches
    then come channels-last too, and the input record says so; a model without convolutions gets plain batches."""
    seen: list[tuple[bool, bool]] = []

    def spy(module, args):
        if module.training:
            x = args[0]
            seen.append((x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous()))

    model = build_target(tiny_source(), data.classes, seed=0)
    model.register_forward_pre_hook(spy)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3)
    plan = TrainPlan([ParamGroup("all", [n for n, _ in model.named_parameters()], cfg.lr)])
    apply_plan(model, plan)
    how = {"num_classes": 10, "seed": 0, "accelerator": make_accelerator("no"), "input_path": "gpu"}
    result = fit(model, data.dataset("train", train=True), data.dataset("val"), cfg, plan, **how)
    record = result.speed["input"]
    assert record["channels_last"] is True and result.speed["channels_last"] is True
    assert record["resize"] == "per image (resized_crop)" and record["prefetch"] == "background thread"
    assert seen == [(True, False)] * 3  # 20 examples in batches of 8, each channels-last (not NCHW-contiguous)

    seen.clear()
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    flat.register_forward_pre_hook(spy)
    plan = TrainPlan([ParamGroup("all", [n for n, _ in flat.named_parameters()], cfg.lr)])
    result = fit(flat, data.dataset("train", train=True), data.dataset("val"), cfg, plan, **how)
    assert result.speed["input"]["channels_last"] is False and result.speed["channels_last"] is False
    assert seen == [(False, True)] * 3


def test_auto_takes_the_tensor_path_on_a_cuda_device_with_batched_resize_and_stream_prefetch():
    """The choice alone (nothing is decoded or put on the device until a batch is asked for), so it runs here."""
    plain = small_mnist(per_class=2, val_per_class=1, test_size=10, hflip=True).dataset("train", train=True)
    chosen, record = choose_input(plain, "auto", "cuda", channels_last=True)
    assert isinstance(chosen, TensorImageDataset) and chosen.device == torch.device("cuda") and chosen.prefetch
    assert record == {
        "path": "gpu",
        "reason": "a CUDA device and crop/flip/normalise only",
        "resize": "batched (roi_align)",
        "prefetch": "side CUDA stream",
        "channels_last": True,
        "cache": None,
        "no_cache": "no run folder",
    }
    assert chosen.augment.channels_last and chosen.augment.hflip == 0.5 and chosen.augment.scale is None
