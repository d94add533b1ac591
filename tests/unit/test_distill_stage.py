"""The ``distill`` stage: in a recipe after training, on a finished run, and ``transferkit distill --out``."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_stages import TINY, _names

from transferkit.cli import main
from transferkit.errors import RecipeError, RunDirError
from transferkit.io import read_json
from transferkit.models.base import load_model
from transferkit.recipe import load_recipe, validate_recipe
from transferkit.runner import run_recipe

DATA = {**TINY["data"], "classes": ["0", "1"], "unlabelled": "rest"}
RECIPE = {
    **TINY,
    "data": DATA,
    "distill": [
        {"loss": {"name": "kd", "temperature": 2.0}, "train": {"batch_size": 64}},
        {
            "loss": {"name": "pseudo_label", "threshold": 0.5},
            "student": {"name": "timm:test_efficientnet", "pretrained": False},
            "rounds": 2,
            "train": {"batch_size": 64},
            "label": "noisy",
        },
    ],
}


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "run"
    run_recipe(load_recipe(RECIPE), out=out)
    return out


def test_distill_runs_after_training_and_before_selection() -> None:
    assert _names(RECIPE) == ["transfer", "train", "distill", "select"]
    assert _names({"distill": RECIPE["distill"], **{k: v for k, v in RECIPE.items() if k != "distill"}}) == [
        "transfer",
        "train",
        "distill",
        "select",
    ]


def test_students_join_the_run_with_their_pool_rounds_and_costs(distilled_run: Path) -> None:
    metrics = read_json(distilled_run / "metrics.json")
    assert list(metrics["models"]) == ["full", "distill-kd", "noisy"]
    kd = metrics["models"]["distill-kd"]
    assert kd["strategy"] == "distill:kd" and kd["distill"]["teacher_outputs"] == "cached"
    pool = kd["distill"]["pool"]
    sizes = metrics["data"]["splits"]
    assert pool == metrics["data"]["unlabelled"] > 900  # every example of 0 and 1 outside the splits
    assert kd["teachers"] == [{"name": "full", "test_accuracy": metrics["models"]["full"]["test"]["accuracy"]}]
    assert kd["history"][-1]["step"] == -(-(sizes["train"] + pool) // 64)  # one epoch over labelled + pool
    assert set(kd["cost"]) == {"teacher full", "student"}
    assert kd["cost"]["student"]["params"] == kd["cost"]["teacher full"]["params"] > 0
    assert kd["cost"]["student"]["macs"] > 0 and kd["cost"]["student"]["latency_ms"] > 0
    noisy = metrics["models"]["noisy"]["distill"]
    assert [r["round"] for r in noisy["rounds"]] == [1, 2]
    assert all(0 < r["kept"] <= pool and 0 <= r["test_accuracy"] <= 1 for r in noisy["rounds"])
    titles = [t["title"] for t in metrics["tables"]]
    assert "Distill distill-kd" in titles and "Distill noisy: rounds" in titles
    assert "Distill noisy" in (distilled_run / "report.html").read_text()
    # the student reloads from the run directory alone and its teacher's cached outputs are gone
    student = load_model(distilled_run / "models" / "noisy")
    assert student.labels == ["0", "1"]
    assert not list((distilled_run / "checkpoints" / "distill-kd").glob("teacher-round*.pt"))
    # done: nothing kept to resume from (train.checkpoints: until_done), in one round or several
    for name in ("distill-kd", "noisy"):
        assert sorted(p.name for p in (distilled_run / "checkpoints" / name).iterdir()) == ["result.json"]
    assert metrics["selected"] in metrics["models"]


def test_a_resumed_run_reads_the_students_back(distilled_run: Path) -> None:
    before = read_json(distilled_run / "checkpoints" / "noisy" / "result.json")
    run_recipe(load_recipe(RECIPE), out=distilled_run, resume=True)
    assert read_json(distilled_run / "checkpoints" / "noisy" / "result.json") == before


def test_distill_cli_makes_a_new_run_with_the_teacher_runs_split(distilled_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    rc = main(
        [
            "distill",
            str(distilled_run),
            "--student",
            "{name: timm:test_efficientnet, pretrained: false}",
            "--loss",
            "dkd",
            "--beta",
            "2",
            "--epochs",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    metrics = read_json(out / "metrics.json")
    # the same student trained on the labels alone (train:), beside the distilled one
    assert list(metrics["models"]) == ["full", "distill-dkd"]
    entry = metrics["models"]["distill-dkd"]
    assert entry["distill"]["options"]["beta"] == 2.0
    assert entry["teachers"][0]["name"] == str(distilled_run / "model")
    assert metrics["data"]["splits"] == read_json(distilled_run / "metrics.json")["data"]["splits"]


def test_a_teacher_run_with_another_split_is_refused(distilled_run: Path, tmp_path: Path) -> None:
    other = {
        **RECIPE,
        "seed": 1,
        "distill": [{"teacher_runs": [str(distilled_run)], "train": {"batch_size": 64}}],
    }
    with pytest.raises(RunDirError, match="split its data otherwise.*seed: 0 there, 1 here"):
        run_recipe(load_recipe(other), out=tmp_path / "r")


def test_distill_entries_are_validated() -> None:
    bad = {
        **TINY,
        "distill": [
            {"loss": {"name": "kd", "temperature": -1}},
            {"loss": "kdd"},
            {"teacher": "full", "teacher_runs": ["x"]},
            {"train": {"epochs": 0}},
        ],
    }
    _, problems = validate_recipe(bad)
    text = "\n".join(problems)
    assert "distill.0.loss: distillation loss 'kd': temperature must be > 0" in text
    assert "distill.1.loss: unknown distillation loss 'kdd'" in text
    assert "give one teacher: teacher, teacher_runs are all set" in text
    assert "distill.3.train.epochs" in text
    with pytest.raises(RecipeError, match="distinct names"):
        load_recipe({**TINY, "distill": [{"label": "full"}]})
