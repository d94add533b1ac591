"""The shipped recipes validate, and the demo reaches its accuracy on real weights and data (about 2 minutes)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from transferkit.demo import run_demo
from transferkit.io import read_json
from transferkit.recipe import load_recipe
from transferkit.stages import stage_order

RECIPES = sorted(Path(str(resources.files("transferkit") / "recipes")).glob("*.yaml"))

# what each shipped recipe runs: its stages in order, and the models its train stage trains (None: it has none)
SHIPPED = {
    "demo.yaml": (["transfer", "train", "select"], ["freeze", "linear_probe", "scratch"]),
    "demo_speech.yaml": (["pretrain", "transfer", "train", "select"], ["full", "scratch", "linear_probe"]),
    "demo_text.yaml": (["transfer", "train", "baselines", "select"], ["freeze", "linear_probe"]),
    "movielens.yaml": (["recsys", "recsys_baselines", "recsys_select"], None),
    "movielens_source.yaml": (["recsys", "recsys_baselines", "recsys_select"], None),
}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path: Path):
    recipe = load_recipe(path)
    assert path.name in SHIPPED, f"a new shipped recipe: add what {path.name} runs to SHIPPED"
    stages, models = SHIPPED[path.name]
    assert [s.name for s in stage_order(recipe)] == stages
    if models is not None:
        assert [name for name, _ in recipe.trainings()] == models


def test_recipes_are_shipped():
    assert {"demo.yaml", "demo_text.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.slow
def test_demo_transfer_beats_scratch_and_reaches_90_percent(tmp_path: Path, capsys):
    run_dir = run_demo("image", out=tmp_path)
    metrics = read_json(run_dir / "metrics.json")
    models = metrics["models"]
    assert set(models) == {"freeze", "linear_probe", "scratch"}
    assert metrics["data"]["splits"] == {"train": 200, "val": 200, "test": 1000}
    # the model is chosen on validation data; its test accuracy is the demo's result
    selected = models[metrics["selected"]]
    assert metrics["selected"] != "scratch"
    assert selected["test"]["accuracy"] >= 0.90
    assert models["linear_probe"]["test"]["accuracy"] > models["scratch"]["test"]["accuracy"] + 0.05
    assert read_json(run_dir / "transfer_report.json")["summary"]["coverage"] > 0.99
    out = capsys.readouterr().out
    assert "<- selected on validation" in out and "report.html" in out


@pytest.mark.slow
def test_text_demo_beats_the_tfidf_baseline_by_ten_points(tmp_path: Path, capsys):
    run_dir = run_demo("text", out=tmp_path)
    metrics = read_json(run_dir / "metrics.json")
    models = metrics["models"]
    assert set(models) == {"freeze", "linear_probe"}
    assert metrics["data"]["splits"] == {"train": 200, "val": 100, "test": 2000}
    tfidf = metrics["baselines"]["tfidf"]["test"]["accuracy"]
    selected = models[metrics["selected"]]["test"]["accuracy"]
    assert 0.55 <= tfidf <= 0.65  # a bag of words learns little from 200 short reviews
    assert selected >= tfidf + 0.10
    assert models["linear_probe"]["test"]["accuracy"] >= tfidf + 0.05
    assert "tfidf (baseline)" in capsys.readouterr().out


def test_recsys_demo_writes_metrics_and_summary(tmp_path: Path):
    """``transferkit demo recsys`` (the MovieLens scenario, about 40 s): transfer ranks better than target-only."""
    out = subprocess.run(
        [sys.executable, "-m", "transferkit", "demo", "recsys", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "TRANSFERKIT_PROGRESS": "0"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = read_json(tmp_path / "recsys" / "metrics.json")
    assert {"ranking", "ratings"} <= set(metrics)
    ranking = metrics["ranking"]["test_summary"]
    hr = next(k for k in ranking["transfer"] if k.lower().startswith("hr"))
    assert ranking["transfer"][hr]["mean"] > ranking["target_only"][hr]["mean"] + 0.02
    assert ranking["transfer"][hr]["mean"] > ranking["popularity"][hr]["mean"]
    assert "(a) transfer" in (tmp_path / "recsys" / "summary.md").read_text()
