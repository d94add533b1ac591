"""Tests of the error classes (each also a builtin) and of the name registry."""

from __future__ import annotations

import pytest

from transferkit.data import DATASETS
from transferkit.errors import (
    DataError,
    DataNotFoundError,
    RecipeError,
    RunDirError,
    SourceError,
    TrainingError,
    TransferKitError,
    UnknownNameError,
    UnsafeCheckpointError,
    did_you_mean,
)
from transferkit.registry import Registry
from transferkit.strategies import STRATEGIES, get_strategy


@pytest.mark.parametrize(
    "cls, builtin",
    [
        (RecipeError, ValueError),
        (UnknownNameError, KeyError),
        (SourceError, ValueError),
        (UnsafeCheckpointError, SourceError),
        (DataError, ValueError),
        (DataNotFoundError, FileNotFoundError),
        (RunDirError, FileExistsError),
        (TrainingError, RuntimeError),
    ],
)
def test_every_error_is_also_the_matching_builtin(cls: type, builtin: type) -> None:
    assert issubclass(cls, TransferKitError)
    assert issubclass(cls, builtin)
    with pytest.raises(builtin):
        raise cls("x")


def test_recipe_error_keeps_its_problems() -> None:
    err = RecipeError("2 problems", ["a: bad", "b: bad"])
    assert err.problems == ["a: bad", "b: bad"]
    assert RecipeError("x").problems == []


def test_unknown_name_error_message_is_not_quoted() -> None:
    err = UnknownNameError("unknown thing 'x'. Valid choices: a.")
    assert str(err) == "unknown thing 'x'. Valid choices: a."  # a bare KeyError would add quotes


def test_did_you_mean() -> None:
    assert did_you_mean("ful", ["full", "scratch"]) == " Did you mean 'full'?"
    assert did_you_mean("linear_prob", ["full", "linear_probe"]) == " Did you mean 'linear_probe'?"
    assert did_you_mean("zzz", ["full", "scratch"]) == ""
    assert did_you_mean("x", []) == ""


@pytest.fixture
def widgets() -> Registry:
    reg: Registry = Registry("widget")

    @reg.register("alpha", help="the first")
    def alpha() -> int:
        return 1

    @reg.register("beta")
    def beta() -> int:
        """The second widget.

        More text that is not the summary.
        """
        return 2

    return reg


def test_registry_get_and_listing(widgets: Registry) -> None:
    assert widgets.get("alpha")() == 1
    assert "beta" in widgets and "gamma" not in widgets
    assert list(widgets) == ["alpha", "beta"]
    assert widgets.describe() == {"alpha": "the first", "beta": "The second widget."}


def test_registry_unknown_name_lists_choices_and_suggests(widgets: Registry) -> None:
    with pytest.raises(UnknownNameError) as info:
        widgets.get("alpah")
    assert isinstance(info.value, KeyError)
    assert str(info.value) == "unknown widget 'alpah'. Did you mean 'alpha'? Valid choices: alpha, beta."


def test_registry_unknown_name_without_a_close_match(widgets: Registry) -> None:
    with pytest.raises(UnknownNameError) as info:
        widgets.get("zzz")
    assert "Did you mean" not in str(info.value)
    assert "Valid choices: alpha, beta." in str(info.value)


def test_registering_a_name_twice_raises(widgets: Registry) -> None:
    with pytest.raises(ValueError, match="widget 'alpha' is registered twice"):
        widgets.register("alpha")(lambda: 3)
    assert widgets.get("alpha")() == 1  # the first registration is kept


def test_real_registries() -> None:
    assert {"full", "linear_probe", "scratch"} <= set(STRATEGIES)
    assert list(STRATEGIES) == sorted(STRATEGIES)
    assert "mnist5k" in DATASETS
    with pytest.raises(UnknownNameError) as info:
        get_strategy("ful")
    assert str(info.value) == f"unknown strategy 'ful'. Did you mean 'full'? Valid choices: {', '.join(STRATEGIES)}."


def test_strategy_options_are_validated() -> None:
    _, cfg = get_strategy({"name": "full", "backbone_lr_scale": 0.5})
    assert cfg.backbone_lr_scale == 0.5 and cfg.backbone_lr is None
    with pytest.raises(RecipeError, match="strategy 'full': backbone_lr_scale must be > 0, got -1"):
        get_strategy({"name": "full", "backbone_lr_scale": -1})
    with pytest.raises(RecipeError, match=r"strategy 'linear_probe' has no option\(s\) \['lr'\]; valid options: none"):
        get_strategy({"name": "linear_probe", "lr": 1})
