"""``pretrain:`` trains the source on its own task inside the run; ``data.classes`` picks the task's classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_SOURCE

import transferkit as tk
from transferkit.errors import DataError, RecipeError
from transferkit.io import load_state_dict
from transferkit.recipe import load_recipe


def _recipe(tmp_path, **extra):
    recipe = {
        "name": "pretrain-test",
        "seed": 0,
        "source": TINY_SOURCE,
        "pretrain": {
            "data": {
                "dataset": "mnist5k",
                "classes": ["0", "1", "2", "3", "4"],
                "per_class": 8,
                "val_per_class": 2,
                "test_size": 20,
                "image_size": 32,
            },
            "train": {"epochs": 1, "batch_size": 8, "lr": 0.01},
        },
        "data": {
            "dataset": "mnist5k",
            "classes": ["5", "6", "7", "8", "9"],
            "per_class": 4,
            "val_per_class": 2,
            "test_size": 20,
            "image_size": 32,
        },
        "train": {"strategy": "full", "epochs": 1, "batch_size": 8, "lr": 0.01},
        "compare": ["scratch"],
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_classes_keeps_only_the_named_classes_relabelled_in_order(mnist5k):
    five = mnist5k.select_classes(["9", "5"])
    assert five.classes == ["9", "5"]
    assert np.bincount(five.labels).tolist() == [500, 500]
    assert (mnist5k.labels[mnist5k.labels == 9].size, len(five)) == (500, 1000)
    first_nine = int(np.flatnonzero(mnist5k.labels == 9)[0])
    assert np.array_equal(five.items[int(np.flatnonzero(five.labels == 0)[0])], mnist5k.items[first_nine])
    with pytest.raises(DataError, match=r"data.classes names \['10'\], not classes of 'mnist5k'; its classes are"):
        mnist5k.select_classes(["1", "10"])
    with pytest.raises(DataError, match="lists a class twice"):
        mnist5k.select_classes(["1", "1"])


def test_pretrain_trains_the_source_then_the_target_starts_from_it(tmp_path):
    run = tk.run_recipe(_recipe(tmp_path), out=tmp_path / "run")
    pre = json.loads((run / "pretrain" / "metrics.json").read_text())
    assert pre["data"]["classes"] == ["0", "1", "2", "3", "4"]
    assert pre["data"]["splits"] == {"train": 40, "val": 10, "test": 20}
    assert pre["stages"][0]["groups"]["backbone"]["lr"] == pytest.approx(0.01)  # every weight at the same rate
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["pretrain"]["classes"] == ["0", "1", "2", "3", "4"]
    assert metrics["pretrain"]["test"]["n"] == 20
    assert metrics["data"]["classes"] == ["5", "6", "7", "8", "9"]
    assert set(metrics["models"]) == {"full", "scratch"}
    report = json.loads((run / "transfer_report.json").read_text())
    assert report["source"].endswith("pretrain/model")
    assert report["summary"]["coverage"] > 0.9  # every backbone tensor came from the pretrained source
    # the pretrained model is a real model folder whose weights are not the random initialisation
    pretrained = load_state_dict(run / "pretrain" / "model" / "model.safetensors")
    torch.manual_seed(0)  # the run's seed: the random initialisation the pretraining started from
    random_init = tk.load_source(TINY_SOURCE).state_dict()
    key = "backbone.conv_stem.weight"
    assert not torch.equal(pretrained[key], random_init[key])
    assert "Source pretrained in this run" in (run / "report.html").read_text()
    # train.checkpoints: until_done (the default): the finished pretraining keeps no resume files (defect 7)
    assert not list((run / "pretrain" / "checkpoints").glob("*.pt"))


def test_pretrain_is_reused_on_resume(tmp_path, capsys):
    path = _recipe(tmp_path, compare=[])
    run = tk.run_recipe(path, out=tmp_path / "run")
    before = (run / "pretrain" / "model" / "model.safetensors").read_bytes()
    (run / "checkpoints" / "full" / "result.json").unlink()  # the main job must run again, the pretraining not
    capsys.readouterr()
    tk.run_recipe(path, out=tmp_path / "run", resume=True)
    assert "[pretrain] already trained" in capsys.readouterr().out
    assert not list((run / "pretrain" / "checkpoints").glob("*.pt"))
    assert (run / "pretrain" / "model" / "model.safetensors").read_bytes() == before


def test_pretrain_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="pretrain: trains the recipe's source, rank: chooses"):
        load_recipe(_recipe(tmp_path, rank={"candidates": ["efficientnet_lite0"]}))
    with pytest.raises(RecipeError, match=r"pretrain.train.strategy: .*unknown strategy 'fulll'"):
        load_recipe(_recipe(tmp_path), ["pretrain.train.strategy=fulll"])
    recipe = load_recipe(_recipe(tmp_path))
    assert recipe.pretrain.train.strategy == {"name": "full", "backbone_lr_scale": 1.0}
    assert recipe.train.strategy == "full"


def test_transfer_step_in_a_recipe_builds_a_one_channel_target(tmp_path):
    """``transfer: {in_chans: 1}``: the data comes in grey, the first convolution is summed, every strategy
    (and the scratch baseline, from random weights) trains the 1-channel target."""
    path = _recipe(tmp_path, transfer={"in_chans": 1}, compare=["scratch", "l2sp"])
    recipe = yaml.safe_load(path.read_text())
    del recipe["pretrain"]
    path.write_text(yaml.safe_dump(recipe))
    run = tk.run_recipe(path, out=tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["models"]) == {"full", "scratch", "l2sp"}
    assert json.loads((run / "model" / "model.json").read_text())["preprocess"]["input_size"][0] == 1
    rows = {r["name"]: r for r in json.loads((run / "transfer_report.json").read_text())["tensors"]}
    assert rows["backbone.conv_stem.weight"]["transform"] == "summed over 3 input channels"
    assert rows["backbone.conv_stem.weight"]["shape"][1] == 1
    predictor = tk.load_run(run)
    image = np.zeros((28, 28), dtype=np.uint8)
    assert len(predictor.predict([image], top_k=1)) == 1


def test_transfer_step_errors_are_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="transfer.img_size=64 builds the target for 64 px but data.image_size=32"):
        load_recipe(_recipe(tmp_path, transfer={"img_size": 64}))
    with pytest.raises(RecipeError, match="transfer.in_chanz: unknown key"):
        load_recipe(_recipe(tmp_path, transfer={"in_chanz": 1}))
