"""The ``evaluate`` stage: every trained model scored on further labelled datasets, also on a finished run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_stages import TINY, _names

from transferkit.cli import main
from transferkit.config.recipe import EvaluateConfig
from transferkit.errors import DataError
from transferkit.io import read_json
from transferkit.models.base import load_model
from transferkit.recipe import load_recipe, validate_recipe
from transferkit.runner import run_recipe
from transferkit.stages import STAGES
from transferkit.stages.evaluate import evaluate_on


def test_a_stage_that_needs_models_waits_for_training_whatever_its_place() -> None:
    recipe = {"evaluate": [{"dataset": "mnist5k"}], **TINY}
    assert _names(recipe) == ["transfer", "train", "evaluate", "select"]


def test_stage_checks_report_with_key_paths() -> None:
    _, problems = validate_recipe({**TINY, "evaluate": [{"dataset": "/nowhere/at/all"}]})
    assert problems == [
        "evaluate.0.dataset: '/nowhere/at/all' is not a built-in dataset (fsdd_digits, mnist5k, rotten_tomatoes, "
        "rotten_tomatoes_plots) and no such folder or file exists."
    ]


def test_evaluate_can_be_added_to_a_finished_run() -> None:
    assert STAGES["evaluate"].extend is not None


def _digit_folder(root: Path, digits: tuple[str, ...], per_digit: int = 3) -> Path:
    """A folder of real MNIST digits (one sub-folder per class) as PNG files."""
    from transferkit.data import read_dataset

    data = read_dataset("mnist5k")
    for d in digits:
        (root / d).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(data.labels == int(d))[-per_digit:]):
            Image.fromarray(data.items[i]).save(root / d / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "run"
    run_recipe(load_recipe(TINY), out=out)
    return out


def test_evaluate_on_a_finished_run_scores_every_model_on_another_dataset(finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    digits = _digit_folder(tmp_path / "digits", ("3", "7"))
    assert main(["evaluate", str(out), f"dataset={digits}", "label=shifted"]) == 0
    saved = read_json(out / "evaluations" / "shifted.json")
    assert saved["n"] == 6 and list(saved["models"]) == ["full"]
    full = saved["models"]["full"]
    assert full["n"] == 6 and 0.0 <= full["accuracy"] <= 1.0
    # the confusion matrix is over the model's 10 labels: only rows 3 and 7 hold examples
    rows = np.array(full["confusion"])
    assert rows.shape == (10, 10) and rows.sum(axis=1).tolist() == [0, 0, 0, 3, 0, 0, 0, 3, 0, 0]
    metrics = read_json(out / "metrics.json")
    assert metrics["evaluations"]["shifted"]["models"]["full"] == full
    assert metrics["tables"][0]["rows"] == [["full", full["accuracy"], full["macro_f1"], full["loss"]]]
    assert "<h2>Evaluation on shifted</h2>" in (out / "report.html").read_text()


def test_evaluate_refuses_classes_the_models_do_not_know(finished_run: Path, tmp_path: Path) -> None:
    folder = _digit_folder(tmp_path / "letters", ("3",))
    (folder / "x").mkdir()
    Image.new("L", (28, 28)).save(folder / "x" / "0.png")
    with pytest.raises(DataError, match=r"the classes \['x'\] of '.*letters' are not among the model's labels"):
        evaluate_on(load_model(finished_run / "models" / "full"), EvaluateConfig(dataset=str(folder)))
