"""Validation on the tensor input path (issue 20): inside ``fit``, when the training set took the tensor path, the
validation set is evaluated from tensors too, with the evaluation transform of ``build_transform`` (a plain resize
of the whole image, ``ToTensor``, ``Normalize``). Checked on CPU tensors against the PIL path it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import small_mnist, tiny_source
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision import transforms as T

from transferkit.config import AugmentConfig
from transferkit.data.gpu_images import TensorImageDataset, Uint8Cache, choose_eval_input
from transferkit.data.images import ImageDataset, build_transform
from transferkit.engine.loop import JobPaths, evaluate_model, fit, make_accelerator, predict_logits
from transferkit.recipe import TrainConfig
from transferkit.strategies.base import ParamGroup, TrainPlan, apply_plan
from transferkit.transfer import build_target

GPU_RECORD = {"path": "gpu"}  # what choose_input records when the training set took the tensor path


def _arrays(n: int = 5, seed: int = 0) -> list[np.ndarray]:
    """uint8 (H, W, 3) images of assorted sizes, larger and smaller than the model's 48 px, with fine detail."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        h, w = (90 + 13 * k, 120 - 7 * k) if k < n - 1 else (30, 41)  # the last one is upscaled
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, 127 + 100 * np.sin(xx / 7.0) * np.cos(yy / 5.0)], -1)
        out.append(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))
    return out


def _levels(a: torch.Tensor, b: torch.Tensor, std: list[float]) -> torch.Tensor:
    """The difference of two normalised batches in uint8 levels."""
    return (a - b).abs() * torch.tensor(std).view(1, -1, 1, 1) * 255


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("cached", [True, False])
def test_the_tensor_eval_batch_is_the_pil_eval_transform_to_a_level(tmp_path, interpolation, cached):
    """build_transform's evaluation pipeline on PIL images against the tensor path on the same images: the resize
    of PIL and of torchvision's antialiased uint8 kernels round differently by at most one level on a few pixels
    (measured: max 1.0, mean 0.003 levels, for both filters, cached or not)."""
    pre = {"input_size": [3, 48, 48], "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "interpolation": interpolation}
    images = _arrays()
    pil_set = ImageDataset(images, np.arange(5), build_transform(pre), 3, memoize=True)
    chosen, record = choose_eval_input(pil_set, GPU_RECORD, "cpu", tmp_path if cached else None)
    assert isinstance(chosen, TensorImageDataset) and record["val"] == "tensor"
    assert (record["val_cache"] is not None) == cached
    if cached:
        assert record["val_cache"]["side"] == 48 and record["val_cache"]["square"] is True
        assert record["val_cache"]["decoded"] == 5
    else:
        assert record["val_no_cache"] == "no run folder"
    x, y = chosen.__getitems__([4, 0, 2])
    ref = torch.stack([pil_set[i][0] for i in (4, 0, 2)])
    assert x.shape == ref.shape == (3, 3, 48, 48) and y.tolist() == [4, 0, 2] and y.device.type == "cpu"
    levels = _levels(x, ref, pre["std"])
    assert levels.max().item() <= 1.0 + 1e-4 and levels.mean().item() < 0.02


def test_jpeg_files_on_the_tensor_eval_path_match_pil_to_a_level(tmp_path):
    """From files: libjpeg-turbo's decode (decode_jpeg) and PIL's, then the resize (measured: max 1.0, mean 0.006
    levels)."""
    paths = []
    for k, image in enumerate(_arrays(4)):
        paths.append(tmp_path / f"im{k}.jpg")
        Image.fromarray(image).save(paths[-1], quality=90)
    pre = {"input_size": [3, 40, 40], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    pil_set = ImageDataset(paths, np.arange(4), build_transform(pre), 3, memoize=True)
    chosen, _ = choose_eval_input(pil_set, GPU_RECORD, "cpu", tmp_path / "cache")
    x, _ = chosen.__getitems__([0, 1, 2, 3])
    levels = _levels(x, torch.stack([pil_set[i][0] for i in range(4)]), pre["std"])
    assert levels.max().item() <= 1.0 + 1e-4 and levels.mean().item() < 0.02


def test_the_square_cache_resizes_with_the_pipelines_filter(tmp_path):
    """mnist5k at 32 px with the tiny source's bicubic resize: the cached images are PIL's to the bit, and a
    bilinear cache (what the cache made before it took the filter) would be several levels off."""
    data = small_mnist(per_class=2, val_per_class=1, test_size=10)
    val = data.dataset("val")
    assert val.transform.transforms[0].interpolation == T.InterpolationMode.BICUBIC
    chosen, _ = choose_eval_input(val, GPU_RECORD, "cpu", tmp_path)
    assert isinstance(chosen, TensorImageDataset) and chosen.cache is not None
    x, _ = chosen.__getitems__(list(range(len(val))))
    ref = torch.stack([val[i][0] for i in range(len(val))])
    assert torch.equal(x, ref)
    bilinear = Uint8Cache(tmp_path / "other", val.items, 32, True, 3)
    assert bilinear.data_path != chosen.cache.data_path  # the filter is part of the key
    pixels = torch.stack([bilinear[i] for i in range(len(val))])
    cached = torch.stack([chosen.cache[i] for i in range(len(val))])
    assert (pixels.int() - cached.int()).abs().max().item() >= 5


def test_evaluation_draws_nothing_and_follows_channels_last(tmp_path):
    data = small_mnist(per_class=2, val_per_class=1, test_size=10)
    chosen, _ = choose_eval_input(data.dataset("val"), GPU_RECORD, "cpu", tmp_path, channels_last=True)
    state = torch.get_rng_state()
    x, _ = chosen.__getitems__([0, 1, 2])
    assert torch.equal(torch.get_rng_state(), state)  # the training draws after validation are the PIL path's
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_what_stays_on_the_pil_path_and_why():
    data = small_mnist(per_class=2, val_per_class=1, test_size=10)
    val = data.dataset("val")
    # the training set on the PIL path (the CPU default): the validation set and the record are left as they are
    assert choose_eval_input(val, {"path": "pil", "reason": "x"}, "cpu") == (val, {})
    features = TensorDataset(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    assert choose_eval_input(features, GPU_RECORD, "cpu") == (
        features,
        {"val": "pil: not an image dataset (TensorDataset)"},
    )
    rotated = ImageDataset(val.items, val.labels.numpy(), build_transform(data.preprocess, AugmentConfig(rotation=5)))
    kept, record = choose_eval_input(rotated, GPU_RECORD, "cpu")
    assert kept is rotated
    assert record == {
        "val": "pil: augmentation RandomAffine (data.augment.rotation / data.augment.translate) has no tensor "
        "version on this path"
    }
    flipped = ImageDataset(val.items, val.labels.numpy(), build_transform(data.preprocess, AugmentConfig(hflip=True)))
    assert choose_eval_input(flipped, GPU_RECORD, "cpu")[1] == {
        "val": "pil: the validation transform is random (crop or flip); evaluation has none"
    }


def test_evaluate_model_gives_the_pil_paths_logits_from_the_tensor_dataset(tmp_path):
    """evaluate_model's DataLoader takes whole batches from __getitems__: the logits of the PIL path (the pixels
    are the same here, so only float rounding of the convolutions' layout may differ)."""
    data = small_mnist(per_class=2, val_per_class=1, test_size=10)
    model = build_target(tiny_source(), data.classes, seed=0)
    val = data.dataset("val")
    chosen, _ = choose_eval_input(val, GPU_RECORD, "cpu", tmp_path)
    pil_logits, pil_labels = predict_logits(model, val, 8)
    tensor_logits, tensor_labels = predict_logits(model, chosen, 8)
    assert torch.equal(pil_labels, tensor_labels)
    assert (pil_logits - tensor_logits).abs().max().item() < 1e-5
    assert evaluate_model(model, chosen, 8, 10)["loss"] == pytest.approx(evaluate_model(model, val, 8, 10)["loss"])


@pytest.mark.parametrize("image_size", [32, 40])
def test_fit_validates_on_the_tensor_path_with_the_pil_paths_metrics(tmp_path, image_size):
    """data.input: gpu on a CPU: each epoch's validation ran from tensors (the record says so, the model saw
    channels-last eval batches) and equals the PIL path's validation of the same weights within 1e-4: at 32 px the
    pixels are PIL's to the bit; at 40 px the bicubic upscale of the 28 px digits rounds one level apart on 0.1% of
    the pixels, which moved the loss of this model by less than float rounding (measured 0.0)."""
    data = small_mnist(per_class=2, val_per_class=1, test_size=10, image_size=image_size, hflip=True)
    model = build_target(tiny_source(), data.classes, seed=0)
    seen: list[bool] = []
    model.register_forward_pre_hook(
        lambda module, args: None if module.training else seen.append(args[0].is_contiguous())
    )
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3)
    plan = TrainPlan([ParamGroup("all", [n for n, _ in model.named_parameters()], cfg.lr)])
    apply_plan(model, plan)
    paths = JobPaths(tmp_path / "ckpt" / "last.pt", tmp_path / "metrics.jsonl", "m")
    how = {"num_classes": 10, "seed": 0, "accelerator": make_accelerator("no"), "input_path": "gpu", "paths": paths}
    result = fit(model, data.dataset("train", train=True), data.dataset("val"), cfg, plan, **how)
    record = result.speed["input"]
    assert record["path"] == "gpu" and record["val"] == "tensor"
    assert record["val_cache"]["side"] == image_size and record["val_cache"]["square"] is True
    assert record["val_cache"]["decoded"] == 10
    assert record["val_cache"]["file"] != record["cache"]["file"]  # the training set's crops have their own cache
    assert seen and not any(seen)  # channels-last eval batches (the PIL loader's are NCHW-contiguous)

    pil = evaluate_model(model, data.dataset("val"), 8, 10)  # the epoch's weights (one epoch: the best ones)
    assert result.history[0]["val_loss"] == pytest.approx(pil["loss"], abs=1e-4)
    assert result.history[0]["val_accuracy"] == pil["accuracy"]
    assert result.best_val["loss"] == pytest.approx(pil["loss"], abs=1e-4)
