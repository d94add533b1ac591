"""Recommendation as a recipe task: ``recsys:`` in a recipe, ``run_recipe`` writes a full run directory, a second
run transfers from the first (``source_run``), ``predict`` gives top-k unseen items, and the errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from transferkit.cli import main
from transferkit.errors import DataError, RecipeError
from transferkit.predict import load_run
from transferkit.recipe import load_recipe
from transferkit.runner import run_recipe

os.environ["TRANSFERKIT_PROGRESS"] = "0"

GROUPS = 4


def _domain(
    rng: np.random.Generator, users: int, items_per_group: int, per_user: int, prefix: str, offset: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Planted structure: user u belongs to group u % 4 and only takes items of that group (genre g{group})."""
    items = pd.DataFrame(
        {
            "item_id": [f"{prefix}{g}_{k}" for g in range(GROUPS) for k in range(items_per_group)],
            "genre": [f"g{g}" for g in range(GROUPS) for _ in range(items_per_group)],
            "title": [f"{prefix.upper()} film {g}-{k}" for g in range(GROUPS) for k in range(items_per_group)],
        }
    )
    rows = []
    for u in range(users):
        g = u % GROUPS
        chosen = rng.choice(items_per_group, size=per_user, replace=False)
        for t, k in enumerate(chosen):
            rows.append({"userId": f"u{u}", "itemId": f"{prefix}{g}_{k}", "ts": offset + t})
    return pd.DataFrame(rows), items


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    source, source_items = _domain(rng, 80, 12, 10, "s", 0)
    target, target_items = _domain(rng, 80, 15, 4, "t", 100)  # sparse: 2 training events per user
    paths = {}
    for name, frame in [
        ("source", source),
        ("target", target),
        ("source_items", source_items),
        ("target_items", target_items),
    ]:
        paths[name] = str(folder / f"{name}.csv")
        frame.to_csv(paths[name], index=False)
    return paths


def _recipe(interactions: str, items: str, **extra: object) -> dict[str, object]:
    recsys = {
        "interactions": interactions,
        "user_column": "userId",
        "item_column": "itemId",
        "timestamp_column": "ts",
        "item_features": {"path": items, "id_column": "item_id", "columns": [], "title_column": "title"},
        "dim": 16,
        "epochs": 15,
        "lr": 0.05,
        "seeds": [0, 1],
        "patience": None,
        **extra,
    }
    return {"name": "recsys-test", "recsys": recsys}


@pytest.fixture(scope="module")
def runs(planted: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("runs")
    source = run_recipe(load_recipe(_recipe(planted["source"], planted["source_items"], seeds=[0])), folder / "source")
    target = run_recipe(
        load_recipe(_recipe(planted["target"], planted["target_items"], source_run=str(source))), folder / "target"
    )
    return {"source": source, "target": target}


def test_run_directory_holds_every_file_with_the_right_keys(runs: dict[str, object]) -> None:
    out = runs["target"]
    for name in (
        "recipe.yaml",
        "run.json",
        "metrics.json",
        "report.html",
        "model/model.json",
        "model/model.safetensors",
        "model/seen.json",
        "model/items.json",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["task"] == "recommendation"
    assert len(meta["user_ids"]) == 80 and len(meta["item_ids"]) == 60
    assert meta["config"]["source_run"] == str(runs["source"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["arms"]) == {"transfer", "target_only", "popularity"}
    for arm in metrics["arms"].values():
        assert set(arm["seeds"]) == {"0", "1"}
        for m in ("hr@10", "ndcg@10", "recall@20"):
            assert 0.0 <= arm["mean_sd"][m]["mean"] <= 1.0 and arm["mean_sd"][m]["sd"] >= 0.0
            assert all(0.0 <= s["test"][m] <= 1.0 for s in arm["seeds"].values())
    assert metrics["transfer_report"]["users"]["matched"] == 80
    assert "target only" in (out / "report.html").read_text()


def test_transfer_from_a_source_run_beats_target_only_on_planted_data(runs: dict[str, object]) -> None:
    arms = json.loads((runs["target"] / "metrics.json").read_text())["arms"]
    transfer, alone = arms["transfer"]["mean_sd"], arms["target_only"]["mean_sd"]
    assert transfer["ndcg@10"]["mean"] > alone["ndcg@10"]["mean"]
    assert transfer["hr@10"]["mean"] >= alone["hr@10"]["mean"]
    assert transfer["hr@10"]["mean"] > 0.5  # the planted groups: 15 right items out of 58 unseen


def test_predict_gives_top_k_unseen_items_with_titles(
    runs: dict[str, object], planted: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    predictor = load_run(runs["target"])
    assert predictor.modality == "recommendation"
    out = predictor.predict(["u0", "u5"], top_k=5)
    seen = pd.read_csv(planted["target"])
    for p in out:
        assert len(p["top"]) == 5
        items = [t["item"] for t in p["top"]]
        assert not set(items) & set(seen.loc[seen["userId"] == p["user"], "itemId"])
        assert all(t["label"].startswith("T film") for t in p["top"])
    assert main(["predict", str(runs["target"]), "u0", "--top-k", "3"]) == 0
    assert capsys.readouterr().out.startswith("u0: T film")


def test_unknown_user_is_a_data_error_naming_it(runs: dict[str, object]) -> None:
    with pytest.raises(DataError, match="unknown user id.*'nobody'"):
        load_run(runs["target"]).predict(["u1", "nobody"], top_k=3)


def test_bad_recsys_keys_are_recipe_errors(planted: dict[str, str]) -> None:
    with pytest.raises(RecipeError, match=r"recsys\.epoch: unknown key.*Did you mean 'epochs'"):
        load_recipe(_recipe(planted["target"], planted["target_items"], epoch=3))
    with pytest.raises(RecipeError, match="recsys.model"):
        load_recipe(_recipe(planted["target"], planted["target_items"], model="svd"))
    with pytest.raises(RecipeError, match="metric 'hr@x'"):
        load_recipe(_recipe(planted["target"], planted["target_items"], metrics=["hr@x"]))
    with pytest.raises(RecipeError, match="data is not used with it"):
        load_recipe({**_recipe(planted["target"], planted["target_items"]), "data": {"dataset": "mnist"}})
    with pytest.raises(RecipeError, match="data: required key is missing"):
        load_recipe({"name": "x", "source": "efficientnet_lite0"})


def test_the_movielens_recipe_validates() -> None:
    from importlib.resources import files

    recipe = load_recipe(str(files("transferkit") / "recipes" / "movielens.yaml"))
    assert recipe.recsys is not None and recipe.recsys.builtin


def test_ratings_with_mse_report_rmse(planted: dict[str, str], tmp_path: Path) -> None:
    frame = pd.read_csv(planted["target"])
    frame["stars"] = np.where(frame["userId"].str[1:].astype(int) % 2 == 0, 4.0, 2.0)
    path = tmp_path / "ratings.csv"
    frame.to_csv(path, index=False)
    recipe = _recipe(
        str(path),
        planted["target_items"],
        rating_column="stars",
        loss="mse",
        seeds=[0],
        baselines=["target_only"],
        model="mf",
    )
    out = run_recipe(load_recipe(recipe), tmp_path / "run")
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["arms"]) == {"target_only"}
    assert "rmse" in metrics["metrics"]
    assert 0.0 <= metrics["arms"]["target_only"]["mean_sd"]["rmse"]["mean"] < 1.5
    assert json.loads((out / "model" / "model.json").read_text())["kind"] == "mf"


def test_an_interrupted_recsys_run_resumes_without_retraining_the_finished_seeds(
    runs: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each arm and seed is its own unit of work on disk: --resume trains only the one whose result is missing and
    gives the same metrics and the same saved model."""
    import shutil

    out = tmp_path / "target"
    shutil.copytree(runs["target"], out)
    before = json.loads((out / "metrics.json").read_text())
    weights = (out / "model" / "model.safetensors").read_bytes()
    (out / "checkpoints" / "target_only-s1" / "result.json").unlink()
    (out / "metrics.json").unlink()
    recipe = load_recipe(yaml.safe_load((out / "recipe.yaml").read_text()))
    capsys.readouterr()
    run_recipe(recipe, out, resume=True)
    log = capsys.readouterr().out
    assert "[transfer seed 0] already trained" in log and "[transfer seed 1] already trained" in log
    assert "[target_only seed 0] already trained" in log and "[target_only seed 1] test" in log
    after = json.loads((out / "metrics.json").read_text())

    def strip(arms: dict) -> dict:
        return {
            a: {s: {k: v for k, v in r.items() if k != "train_s"} for s, r in arm["seeds"].items()}
            for a, arm in arms.items()
        }

    assert strip(after["arms"]) == strip(before["arms"])
    assert after["selected"] == before["selected"]
    assert (out / "model" / "model.safetensors").read_bytes() == weights
