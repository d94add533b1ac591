"""Tests of the recipe: one-pass validation, overrides, YAML reading, ``trainings()`` and ``transferkit validate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from transferkit.cli import main
from transferkit.errors import RecipeError
from transferkit.recipe import Recipe, apply_overrides, dump_recipe, load_recipe, parse_override, validate_recipe
from transferkit.strategies import STRATEGIES


def _keys(problems: list[str]) -> list[str]:
    """The key path each problem starts with (``'train.epochs: ...'`` -> ``'train.epochs'``)."""
    return [p.split(":", 1)[0] for p in problems]


def _problem(problems: list[str], key: str) -> str:
    found = [p for p in problems if p.split(":", 1)[0] == key]
    assert len(found) == 1, f"expected one problem at {key!r}, got {problems}"
    return found[0]


def _write(tmp_path: Path, raw: Any, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# Structural problems (pydantic: unknown keys, bad values) and semantic ones (registries, files).
STRUCTURAL = {
    "trian": {"epochs": 3},
    "data": {"per_clas": 5},
    "train": {"epochs": 0},
}
SEMANTIC = {
    "data": {"dataset": "/nonexistent/x"},
    "train": {"strategy": "ful"},
    "compare": [{"strategy": {"name": "full", "backbone_lr_scale": -1}}],
}


def _recipe(*parts: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {"source": "timm:test_efficientnet", "data": {"dataset": "mnist5k"}}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
    return raw


# ---------------------------------------------------------------------------------------------------------------
# validate_recipe


def test_valid_recipe_has_no_problems(base_recipe: dict[str, Any]) -> None:
    recipe, problems = validate_recipe(base_recipe)
    assert problems == []
    assert isinstance(recipe, Recipe)
    assert recipe.source.name == "timm:test_efficientnet"
    assert recipe.source.pretrained is True
    assert recipe.train.strategy == "full"
    assert recipe.train.epochs == 10


def test_structural_problems_are_all_reported_with_key_paths_and_fixes() -> None:
    recipe, problems = validate_recipe(_recipe(STRUCTURAL))
    assert recipe is None
    assert sorted(_keys(problems)) == ["data.per_clas", "train.epochs", "trian"]

    trian = _problem(problems, "trian")
    assert "unknown key" in trian
    assert "Did you mean 'train'?" in trian
    assert (
        "Valid keys here: name, seed, source, rank, pretrain, transfer, data, train, compare, baselines, evaluate, "
        "merge, distill, prune, quantize, export, tts, recsys."
    ) in trian

    per_clas = _problem(problems, "data.per_clas")
    assert "unknown key" in per_clas
    assert "Did you mean 'per_class'?" in per_clas
    assert "val_per_class" in per_clas  # the valid keys of data:, not of the top level

    epochs = _problem(problems, "train.epochs")
    assert "greater than or equal to 1" in epochs
    assert "(got 0)" in epochs


def test_semantic_problems_are_all_reported_with_key_paths_and_fixes() -> None:
    recipe, problems = validate_recipe(_recipe(SEMANTIC))
    assert recipe is not None  # the structure is fine; names and files are not
    assert len(problems) == 3
    assert sorted(_keys(problems)) == ["compare.0.strategy", "data.dataset", "train.strategy"]

    strategy = _problem(problems, "train.strategy")
    assert "unknown strategy 'ful'" in strategy
    assert "Did you mean 'full'?" in strategy
    assert f"Valid choices: {', '.join(STRATEGIES)}." in strategy

    option = _problem(problems, "compare.0.strategy")
    assert "strategy 'full'" in option
    assert "backbone_lr_scale must be > 0, got -1" in option

    dataset = _problem(problems, "data.dataset")
    assert "'/nonexistent/x'" in dataset
    assert "no such folder or file exists" in dataset
    assert "mnist5k" in dataset  # the built-in alternative is named


def test_every_problem_is_reported_in_one_call() -> None:
    _, problems = validate_recipe(_recipe(STRUCTURAL, SEMANTIC))
    assert len(problems) == 6, problems
    assert sorted(_keys(problems)) == [
        "compare.0.strategy",
        "data.dataset",
        "data.per_clas",
        "train.epochs",
        "train.strategy",
        "trian",
    ]
    assert "Did you mean 'full'?" in _problem(problems, "train.strategy")


def test_unknown_strategy_option_lists_valid_options() -> None:
    _, problems = validate_recipe(_recipe({"train": {"strategy": {"name": "full", "backbone_rl": 0.1}}}))
    message = _problem(problems, "train.strategy")
    assert "strategy 'full' has no option(s) ['backbone_rl']" in message
    assert "valid options: backbone_lr, backbone_lr_scale" in message


def test_unknown_source_is_reported() -> None:
    _, problems = validate_recipe(_recipe({"source": "efficientnet_lite"}))
    message = _problem(problems, "source.name")
    assert "unknown source 'efficientnet_lite'" in message
    assert "Did you mean 'efficientnet_lite0'?" in message
    assert "timm:NAME" in message


def test_missing_required_keys_are_reported() -> None:
    recipe, problems = validate_recipe({"name": "x"})
    assert recipe is None
    assert sorted(problems) == [
        "data: required key is missing.",
        "source: required key is missing (or give rank: {candidates: [...]} to choose the source).",
    ]


def test_nested_unknown_key_in_augment_and_compare_suggests_the_right_level() -> None:
    _, problems = validate_recipe(
        _recipe({"data": {"augment": {"rotaton": 5}}, "compare": [{"strategy": "scratch", "lable": "s"}]})
    )
    rot = _problem(problems, "data.augment.rotaton")
    assert "Did you mean 'rotation'?" in rot
    lab = _problem(problems, "compare.0.lable")
    assert "Did you mean 'label'?" in lab
    assert "Valid keys here: strategy, label, overrides." in lab


def test_bad_compare_override_value_is_reported_under_its_entry() -> None:
    _, problems = validate_recipe(_recipe({"compare": [{"strategy": "scratch", "overrides": {"epochs": 0}}]}))
    message = _problem(problems, "compare.0.overrides.epochs")
    assert "greater than or equal to 1" in message


def test_unknown_compare_override_key_suggests_a_train_key() -> None:
    _, problems = validate_recipe(_recipe({"compare": [{"strategy": "scratch", "overrides": {"lrr": 0.1}}]}))
    message = _problem(problems, "compare.0.overrides.lrr")
    assert "Did you mean 'lr'?" in message
    assert "batch_size" in message


# ---------------------------------------------------------------------------------------------------------------
# load_recipe and YAML


def test_load_recipe_raises_recipe_error_with_every_problem(tmp_path: Path) -> None:
    path = _write(tmp_path, _recipe(STRUCTURAL))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert len(err.problems) == 3
    text = str(err)
    assert text.startswith("the recipe has 3 problem(s):")
    for key in ("trian", "data.per_clas", "train.epochs"):
        assert f"  - {key}: " in text
    assert "Did you mean 'train'?" in text
    assert "Did you mean 'per_class'?" in text


def test_load_recipe_raises_for_semantic_problems(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, _recipe(SEMANTIC)))
    assert len(info.value.problems) == 3
    assert "the recipe has 3 problem(s)" in str(info.value)
    assert "Did you mean 'full'?" in str(info.value)


def test_load_recipe_from_yaml_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "name": "demo",
            "seed": 3,
            "source": "timm:test_efficientnet",
            "data": {"dataset": "mnist5k", "per_class": 20},
            "train": {"strategy": "linear_probe", "lr": 0.05},
        },
    )
    recipe = load_recipe(path)
    assert (recipe.name, recipe.seed) == ("demo", 3)
    assert recipe.data.per_class == 20
    assert recipe.train.strategy_name == "linear_probe"
    assert recipe.train.lr == 0.05


def test_dump_recipe_roundtrips(tmp_path: Path, base_recipe: dict[str, Any]) -> None:
    recipe = load_recipe(base_recipe, ["train.lr=0.02", "compare=[scratch]"])
    again = load_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe


def test_missing_recipe_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError) as info:
        load_recipe(missing)
    assert f"recipe file '{missing}' does not exist" in str(info.value)
    assert "pass the path of a YAML recipe" in str(info.value)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("", "NoneType")])
def test_non_mapping_yaml(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "must be a mapping of keys (source:, data:, train:...)" in str(info.value)
    assert f"not {kind}" in str(info.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("source: [unclosed\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load_recipe(path)


# ---------------------------------------------------------------------------------------------------------------
# Overrides


def test_parse_override_values_are_yaml() -> None:
    assert parse_override("train.lr=0.01") == (["train", "lr"], 0.01)
    assert parse_override("source.pretrained=false") == (["source", "pretrained"], False)
    assert parse_override("compare=[scratch]") == (["compare"], ["scratch"])
    assert parse_override("data.augment.rotation=10") == (["data", "augment", "rotation"], 10)
    assert parse_override("name=a=b") == (["name"], "a=b")  # only the first '=' splits
    assert parse_override("name=") == (["name"], "")


def test_malformed_override_names_the_form() -> None:
    with pytest.raises(RecipeError) as info:
        parse_override("train.lr")
    assert "override 'train.lr' is not of the form key.path=value" in str(info.value)
    assert "train.epochs=5" in str(info.value)  # an example of the right form
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe({"source": "x", "data": {"dataset": "mnist5k"}}, ["epochs"])


def test_overrides_apply(base_recipe: dict[str, Any]) -> None:
    recipe = load_recipe(
        base_recipe, ["train.lr=0.01", "data.augment.rotation=10", "source.pretrained=false", "compare=[scratch]"]
    )
    assert recipe.train.lr == 0.01
    assert recipe.data.augment.rotation == 10.0
    assert recipe.data.augment.enabled
    assert recipe.source.name == "timm:test_efficientnet"  # the plain string became {name: ...}
    assert recipe.source.pretrained is False
    assert [c.strategy for c in recipe.compare] == ["scratch"]


def test_apply_overrides_does_not_change_its_input(base_recipe: dict[str, Any]) -> None:
    before = yaml.safe_dump(base_recipe)
    out = apply_overrides(base_recipe, ["source.pretrained=false", "data.per_class=5"])
    assert yaml.safe_dump(base_recipe) == before
    assert out["source"] == {"name": "timm:test_efficientnet", "pretrained": False}
    assert out["data"] == {"dataset": "mnist5k", "per_class": 5}


def test_override_into_a_list_by_index(base_recipe: dict[str, Any]) -> None:
    raw = {**base_recipe, "compare": ["linear_probe", {"strategy": "scratch"}]}
    out = apply_overrides(raw, ["compare.1.label=baseline", "compare.0=full"])
    assert out["compare"] == ["full", {"strategy": "scratch", "label": "baseline"}]


def test_override_with_a_bad_value_is_reported_by_key(base_recipe: dict[str, Any]) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(base_recipe, ["train.epochs=0", "train.optimizer=adam"])
    keys = sorted(_keys(info.value.problems))
    assert keys == ["train.epochs", "train.optimizer"]
    assert "'adamw' or 'sgd'" in _problem(info.value.problems, "train.optimizer")


@pytest.mark.parametrize("override", ["compare.5.label=x", "compare.first.label=x"])
def test_override_with_a_bad_list_index_is_a_recipe_error(base_recipe: dict[str, Any], override: str) -> None:
    with pytest.raises(RecipeError, match="compare"):
        apply_overrides({**base_recipe, "compare": ["scratch"]}, [override])


# ---------------------------------------------------------------------------------------------------------------
# Recipe.trainings


def test_trainings_main_first_then_compare_with_overrides(base_recipe: dict[str, Any]) -> None:
    recipe = load_recipe(
        {
            **base_recipe,
            "train": {"strategy": {"name": "full", "backbone_lr": 0.001}, "lr": 0.1, "epochs": 3, "batch_size": 8},
            "compare": ["linear_probe", {"strategy": "scratch", "label": "scr", "overrides": {"lr": 0.5, "epochs": 7}}],
        }
    )
    trainings = recipe.trainings()
    assert [name for name, _ in trainings] == ["full", "linear_probe", "scr"]
    (_, main_cfg), (_, probe), (_, scratch) = trainings
    assert main_cfg is recipe.train
    assert main_cfg.strategy_options == {"backbone_lr": 0.001}
    assert (probe.strategy, probe.lr, probe.epochs, probe.batch_size) == ("linear_probe", 0.1, 3, 8)
    assert (scratch.strategy, scratch.lr, scratch.epochs, scratch.batch_size) == ("scratch", 0.5, 7, 8)
    assert recipe.train.lr == 0.1  # the compare overrides do not leak into the main config


def test_duplicate_training_names_are_rejected(base_recipe: dict[str, Any]) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe({**base_recipe, "compare": ["full"]})
    assert len(info.value.problems) == 1
    message = info.value.problems[0]
    assert "trained models need distinct names" in message
    assert "['full'] appear twice" in message
    assert "give compare entries a label" in message


def test_labels_make_duplicate_strategies_distinct(base_recipe: dict[str, Any]) -> None:
    recipe = load_recipe(
        {**base_recipe, "compare": [{"strategy": "full", "label": "full_lr_small", "overrides": {"lr": 1e-4}}]}
    )
    assert [n for n, _ in recipe.trainings()] == ["full", "full_lr_small"]


# ---------------------------------------------------------------------------------------------------------------
# transferkit validate


def test_cli_validate_prints_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, _recipe(STRUCTURAL))
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}: 3 problem(s)" in err
    for key in ("trian", "data.per_clas", "train.epochs"):
        assert f"  - {key}: " in err
    assert "Did you mean 'train'?" in err
    assert "Did you mean 'per_class'?" in err


def test_cli_validate_prints_semantic_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, _recipe(SEMANTIC))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: 3 problem(s)" in err
    assert f"Valid choices: {', '.join(STRATEGIES)}." in err
    assert "/nonexistent/x" in err
    assert "backbone_lr_scale must be > 0" in err


def test_cli_validate_valid_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], base_recipe: dict[str, Any]
) -> None:
    path = _write(tmp_path, base_recipe)
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: valid"
    assert err == ""


def test_cli_validate_applies_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], base_recipe: dict[str, Any]
) -> None:
    path = _write(tmp_path, base_recipe)
    assert main(["validate", str(path), "train.epochs=0"]) == 1
    assert "  - train.epochs: " in capsys.readouterr().err


def test_cli_validate_missing_file_and_bad_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], base_recipe: dict[str, Any]
) -> None:
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = _write(tmp_path, base_recipe)
    assert main(["validate", str(path), "train.epochs"]) == 2
    assert "key.path=value" in capsys.readouterr().err
