"""Recipe keys that are read or refused (issue 18, defect 2): no key is accepted and then silently ignored.

``source.weights`` loads for every ``hf:`` family and is refused at validation where it would not be read (built-in
sources, transferkit model folders); ``pretrained: false`` is refused for a model folder; ``mixed_precision``
outside ``train:`` is refused unless it is the run's own (one accelerator per run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from transferkit.errors import SourceError
from transferkit.io import save_tensors
from transferkit.recipe import validate_recipe
from transferkit.sources import load_source


def _recipe(**parts: Any) -> dict[str, Any]:
    return {"source": "timm:test_efficientnet", "data": {"dataset": "mnist5k"}, **parts}


def _tiny_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    ViTModel(cfg).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# source.weights


def test_hf_vision_source_loads_its_weights_file(tmp_path: Path) -> None:
    folder = _tiny_vit(tmp_path / "vit")
    reference = load_source({"name": f"hf:{folder}", "pretrained": False})
    state = {k.removeprefix("model."): v + 1.0 for k, v in reference.backbone.state_dict().items()}
    save_tensors(tmp_path / "w.safetensors", state)
    for name in (f"hf:{folder}", str(folder)):  # the hf: prefix and the Hugging Face folder path
        loaded = load_source({"name": name, "pretrained": False, "weights": str(tmp_path / "w.safetensors")})
        for key, value in loaded.backbone.state_dict().items():
            assert torch.equal(value, state[key.removeprefix("model.")]), key


BUILTIN_WEIGHTS = (
    "source.weights: the built-in source '{name}' loads the weights its package ships and reads no weights file; "
    "drop weights, or name the architecture with the file: {{name: 'timm:ARCH' (or 'hf:FOLDER'), weights: 'w.pt'}}"
)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "all-minilm-l6-v2"])
def test_weights_for_a_builtin_source_are_refused_at_validation(name: str) -> None:
    _, problems = validate_recipe(_recipe(source={"name": name, "weights": "w.pt"}))
    assert problems == [BUILTIN_WEIGHTS.format(name=name)]
    with pytest.raises(SourceError) as err:
        load_source({"name": name, "weights": "w.pt"})
    assert str(err.value) == BUILTIN_WEIGHTS.format(name=name).removeprefix("source.")


def test_weights_for_a_builtin_rank_candidate_are_refused() -> None:
    raw = _recipe(rank={"candidates": ["timm:test_efficientnet", {"name": "efficientnet_lite0", "weights": "w.pt"}]})
    del raw["source"]
    _, problems = validate_recipe(raw)
    assert problems == [
        "rank.candidates.1." + BUILTIN_WEIGHTS.format(name="efficientnet_lite0").removeprefix("source.")
    ]


def _saved_model(tmp_path: Path) -> Path:
    from transferkit.models.base import save_model

    model = load_source({"name": "timm:test_efficientnet", "pretrained": False})
    model.reset_head(2, ["a", "b"])
    return save_model(model, tmp_path / "saved")


def test_weights_for_a_model_folder_are_refused_at_validation(tmp_path: Path) -> None:
    folder = _saved_model(tmp_path)
    for name in (str(folder), str(folder / "model.safetensors")):
        _, problems = validate_recipe(_recipe(source={"name": name, "weights": "w.pt"}))
        assert problems == [
            f"source.weights: '{name}' is a transferkit model and carries its own weights; a weights file is not read "
            "with it: drop weights, or name the architecture with the file: {name: 'timm:ARCH', weights: 'w.pt'}"
        ]


# ---------------------------------------------------------------------------------------------------------------
# pretrained: false for a path


def test_pretrained_false_for_a_model_folder_is_refused_at_validation(tmp_path: Path) -> None:
    folder = _saved_model(tmp_path)
    for name in (str(folder), str(folder / "model.safetensors")):
        _, problems = validate_recipe(_recipe(source={"name": name, "pretrained": False}))
        assert problems == [
            f"source.pretrained: '{name}' is a transferkit model and always loads its trained weights; pretrained: "
            "false is not read with it: to start from random weights, name its architecture: "
            "{name: 'timm:ARCH' (or 'hf:NAME'), pretrained: false}"
        ]
        with pytest.raises(SourceError, match="^pretrained: "):
            load_source({"name": name, "pretrained": False})


def test_pretrained_false_for_a_hugging_face_folder_builds_random_weights(tmp_path: Path) -> None:
    folder = _tiny_vit(tmp_path / "vit")
    _, problems = validate_recipe(_recipe(source={"name": str(folder), "pretrained": False}))
    assert problems == []
    trained = load_source(str(folder)).backbone.state_dict()
    fresh = load_source({"name": str(folder), "pretrained": False}).backbone.state_dict()
    assert not torch.equal(trained["model.layers.0.mlp.fc1.weight"], fresh["model.layers.0.mlp.fc1.weight"])


# ---------------------------------------------------------------------------------------------------------------
# mixed_precision outside train: one accelerator per run


def _one_accelerator(key: str, value: str, main: str) -> str:
    return (
        f"{key}: {value!r} differs from train.mixed_precision ({main!r}); a run makes one accelerator, from "
        "train.mixed_precision, for every model it trains: set train.mixed_precision instead, or drop this key"
    )


def test_a_compare_entry_with_another_mixed_precision_is_refused() -> None:
    compare = [{"strategy": "linear_probe", "overrides": {"mixed_precision": "bf16"}}]
    _, problems = validate_recipe(_recipe(compare=compare))
    assert problems == [_one_accelerator("compare.0.overrides.mixed_precision", "bf16", "auto")]
    _, problems = validate_recipe(_recipe(train={"mixed_precision": "no"}, compare=compare))
    assert problems == [_one_accelerator("compare.0.overrides.mixed_precision", "bf16", "no")]


def test_pretrain_with_another_mixed_precision_is_refused() -> None:
    pretrain = {"data": {"dataset": "mnist5k"}, "train": {"mixed_precision": "fp16"}}
    _, problems = validate_recipe(_recipe(train={"mixed_precision": "no"}, pretrain=pretrain))
    assert problems == [_one_accelerator("pretrain.train.mixed_precision", "fp16", "no")]


def test_the_runs_own_mixed_precision_is_accepted_outside_train() -> None:
    raw = _recipe(
        train={"mixed_precision": "no"},
        compare=[{"strategy": "linear_probe", "overrides": {"mixed_precision": "no"}}],
        pretrain={"data": {"dataset": "mnist5k"}, "train": {"mixed_precision": "no"}},
    )
    _, problems = validate_recipe(raw)
    assert problems == []
    _, problems = validate_recipe(_recipe(compare=[{"strategy": "linear_probe", "overrides": {"epochs": 2}}]))
    assert problems == []
