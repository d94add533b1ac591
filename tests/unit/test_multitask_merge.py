"""Merging models of different label sets: a multi-task model (the merged backbone, one head per task), saved and
reloaded, evaluated task by task on each run's own split, predicted with ``--task``; and the merges it refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_source
from test_stages import TINY

from transferkit.cli import main
from transferkit.data import prepare_data
from transferkit.errors import DataError, SourceError, UnknownNameError
from transferkit.io import load_state_dict, read_json, save_tensors
from transferkit.merge import check_compatible, merge_state, method_of, multi_task_model, same_labels
from transferkit.models.base import MultiTaskModel, SourceModel, linear_head, load_model, save_model
from transferkit.pipeline import evaluate
from transferkit.recipe import load_recipe
from transferkit.runner import run_recipe
from transferkit.sources import load_source
from transferkit.transfer import build_target

LOW, HIGH = ["0", "1", "2", "3", "4"], ["5", "6", "7", "8", "9"]


def _recipe(name: str, classes: list[str]) -> dict[str, Any]:
    return {**TINY, "name": name, "data": {**TINY["data"], "classes": classes}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny runs from one source, on MNIST digits 0-4 and 5-9, and their merges by TIES and by task arithmetic
    with lambda 0 (``transferkit merge ... --out``)."""
    root = tmp_path_factory.mktemp("multitask")
    out = {"low": root / "low", "high": root / "high", "ties": root / "ties", "zero": root / "zero"}
    run_recipe(load_recipe(_recipe("low", LOW)), out=out["low"])
    run_recipe(load_recipe(_recipe("high", HIGH)), out=out["high"])
    assert main(["merge", str(out["low"]), str(out["high"]), "--method", "ties", "--out", str(out["ties"])]) == 0
    zero = ["--method", "task_arithmetic", "--lambda", "0", "--label", "zero", "--no-recalibrate"]
    assert main(["merge", str(out["low"]), str(out["high"]), *zero, "--out", str(out["zero"])]) == 0
    return out


def _test_split(run: Path, model: Any) -> Any:
    """A run's data as it split it, read again from its recipe.yaml."""
    recipe = load_recipe(run / "recipe.yaml")
    assert recipe.data is not None
    return prepare_data(recipe.data, model, recipe.seed).dataset("test")


def test_a_merge_of_different_label_sets_is_a_multi_task_model(runs: dict[str, Path]) -> None:
    folder = runs["ties"] / "models" / "merge-ties"
    meta = read_json(folder / "model.json")
    assert [(t["name"], t["labels"], t["head"]["num_classes"]) for t in meta["tasks"]] == [
        ("low", LOW, 5),
        ("high", HIGH, 5),
    ]
    assert "head" not in meta and "labels" not in meta
    model = load_model(folder)
    assert isinstance(model, MultiTaskModel) and model.tasks == ["low", "high"]
    # each task keeps its member's head as trained; the backbone is the merge
    for i, run in enumerate((runs["low"], runs["high"])):
        member = load_model(run / "model")
        assert isinstance(member, SourceModel)
        assert torch.equal(model.heads[i].weight, member.head.weight)
        assert not torch.equal(model.backbone.conv_stem.weight, member.backbone.conv_stem.weight)
    # reported beside the run's models, not among them: select still picks a model of the run's own task
    metrics = read_json(runs["ties"] / "metrics.json")
    assert "merge-ties" not in metrics["models"] and metrics["selected"] in metrics["models"]
    result = metrics["multi_task"]["merge-ties"]
    assert list(result["tasks"]) == ["low", "high"]
    assert result["merge"]["tensors"]["task heads"] == 4  # weight and bias of each head
    # BatchNorm statistics recomputed on both tasks' training splits (5 digits x 3 examples each)
    assert result["merge"]["batchnorm_recalibrated_on"] == 30
    page = (runs["ties"] / "report.html").read_text()
    assert "Merge merge-ties (multi-task)" in page and "merged test accuracy" in page


def test_each_task_is_scored_on_its_own_runs_test_split(runs: dict[str, Path]) -> None:
    model = load_model(runs["ties"] / "models" / "merge-ties")
    assert isinstance(model, MultiTaskModel)
    tasks = read_json(runs["ties"] / "metrics.json")["multi_task"]["merge-ties"]["tasks"]
    for name, run in (("low", runs["low"]), ("high", runs["high"])):
        # the member scored on the split its run made: the accuracy that run recorded
        recorded = read_json(run / "metrics.json")["models"]["full"]["test"]
        for key in ("accuracy", "confusion"):
            assert tasks[name]["member_scores"]["test"][key] == recorded[key]
        # the merged backbone + this task's head, put together by hand, on that split
        i = model.tasks.index(name)
        by_hand = SourceModel(
            model.backbone, model.heads[i], model.arch, model.preprocess, model.task_labels[i], model.num_features
        ).eval()
        test = evaluate(by_hand, _test_split(run, by_hand))
        assert test["accuracy"] == tasks[name]["test"]["accuracy"]
        assert test["confusion"] == tasks[name]["test"]["confusion"]


def test_a_later_stage_reads_the_multi_task_merge_back(runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from transferkit.runner import add_stage

    run = Path(shutil.copytree(runs["ties"], tmp_path / "run"))
    result = run / "checkpoints" / "merge-ties" / "result.json"
    before, stamp = read_json(result), result.stat().st_mtime_ns
    add_stage("merge", run, {"models": ["full"], "runs": [str(runs["high"])], "label": "soup"})
    metrics = read_json(run / "metrics.json")
    assert result.stat().st_mtime_ns == stamp  # read back, not merged again
    assert metrics["multi_task"]["merge-ties"]["tasks"] == before["tasks"]
    assert list(metrics["multi_task"]["soup"]["tasks"]) == ["low", "high"]  # a uniform soup of the backbones
    assert [t["title"] for t in metrics["tables"]] == ["Merge merge-ties (multi-task)", "Merge soup (multi-task)"]


def test_lambda_zero_leaves_the_backbone_at_the_base(runs: dict[str, Path]) -> None:
    model = load_model(runs["zero"] / "models" / "zero")
    assert isinstance(model, MultiTaskModel)
    base = tiny_source(seed=0)  # the runs' source: seeded with the recipe's seed, not pretrained
    for name, p in model.backbone.named_parameters():
        assert torch.equal(p, base.backbone.get_parameter(name)), name
    low = load_model(runs["low"] / "model")
    assert isinstance(low, SourceModel) and torch.equal(model.heads[0].bias, low.head.bias)


def test_a_multi_task_model_saves_and_reloads_with_the_same_logits_per_task(tmp_path: Path) -> None:
    source = tiny_source()
    torch.manual_seed(1)
    heads = [linear_head(source.num_features, 3), linear_head(source.num_features, 2, dropout=0.2)]
    model = MultiTaskModel(
        source.backbone, heads, ["shapes", "yes.no"], [["a", "b", "c"], ["y", "n"]], source.arch,
        source.preprocess, source.num_features, source.groups,
    ).eval()  # fmt: skip
    save_model(model, tmp_path / "mt")
    again = load_model(tmp_path / "mt")
    assert isinstance(again, MultiTaskModel)
    assert again.tasks == ["shapes", "yes.no"] and again.task_labels == [["a", "b", "c"], ["y", "n"]]
    assert [t["head"]["dropout"] for t in read_json(tmp_path / "mt" / "model.json")["tasks"]] == [0.0, 0.2]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for task in model.tasks:
            assert torch.equal(model(x, task), again(x, task))
            assert torch.equal(model.task(task)(x), again(x, task))  # the view: the same backbone and head
    with pytest.raises(UnknownNameError, match="unknown task 'shape'. Did you mean 'shapes'?.*shapes, yes.no"):
        model(x, "shape")
    # a model.json edited by hand: the task at fault is named
    meta = read_json(tmp_path / "mt" / "model.json")
    for tasks, what in (
        ([meta["tasks"][0], meta["tasks"][0]], "has no valid tasks (one or more, each named once)"),
        ([meta["tasks"][0], {**meta["tasks"][1], "head": {}}], "has no valid tasks.1.head.num_classes"),
        ([{"name": "x"}], "has no valid tasks.0 (name, labels, head)"),
    ):
        (tmp_path / "mt" / "model.json").write_text(json.dumps({**meta, "tasks": tasks}))
        with pytest.raises(SourceError, match="model.json' is incomplete or corrupt") as info:
            load_model(tmp_path / "mt")
        assert what in str(info.value)
    # a multi-task model is no source: it has one head per task
    (tmp_path / "mt" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SourceError, match=r"is a multi-task model \(tasks: shapes, yes.no\): a source has one head"):
        load_source(str(tmp_path / "mt"))


def test_merge_state_keeps_one_head_per_label_set(tmp_path: Path) -> None:
    """The API on two saved models of 2 and 3 classes: only the backbones must match; heads are kept as they are."""
    torch.manual_seed(0)
    a, b = build_target(tiny_source(), ["a", "b"], seed=1), build_target(tiny_source(), ["x", "y", "z"], seed=2)
    with torch.no_grad():
        for p in b.backbone.parameters():
            p.add_(0.01)
    fa, fb = save_model(a, tmp_path / "a"), save_model(b, tmp_path / "b")
    assert not same_labels(check_compatible([fa, fb]))
    _, method, options = method_of("task_arithmetic")
    base = {k: v for k, v in tiny_source().state_dict().items() if k.startswith("backbone.")}
    state, how = merge_state([fa, fb], method.merge_config(options, 2), base)
    assert sorted(how["task heads"]) == ["heads.0.bias", "heads.0.weight", "heads.1.bias", "heads.1.weight"]
    assert not any(n.startswith("head.") for n in state)
    model = multi_task_model([fa, fb], ["ab", "xyz"], state)
    assert torch.equal(model.heads[1].weight, b.head.weight)
    w = "backbone.conv_stem.weight"  # base + (a - base) + (b - base): a kept the base, b moved by 0.01
    assert torch.allclose(state[w], base[w] + 0.01, atol=1e-6)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x, "xyz").shape == (2, 3) and model(x, "ab").shape == (2, 2)


def test_backbones_that_differ_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    a, b = build_target(tiny_source(), ["a", "b"], seed=1), build_target(tiny_source(), ["x", "y", "z"], seed=2)
    fa, fb = save_model(a, tmp_path / "a"), save_model(b, tmp_path / "b")
    state = load_state_dict(fb / "model.safetensors")
    state["backbone.conv_stem.weight"] = torch.zeros(4, 3, 3, 3)  # another width of the first convolution
    save_tensors(fb / "model.safetensors", state)
    with pytest.raises(DataError, match=r"tensor 'backbone.conv_stem.weight' is \[4, 3, 3, 3\] in '.*b' but"):
        check_compatible([fa, fb])


@pytest.mark.parametrize("method", ["greedy_soup", "ensemble"])
def test_greedy_soups_and_ensembles_of_different_label_sets_are_refused(
    runs: dict[str, Path], method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    code = main(["merge", str(runs["low"]), str(runs["high"]), "--method", method, "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"predicts {HIGH}" in err and f"{method} needs the same labels in the same order" in err
    assert "gives a multi-task model" in err


def test_predict_takes_a_task_or_predicts_every_task(
    runs: dict[str, Path], write_image: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, image = runs["ties"] / "models" / "merge-ties", write_image(tmp_path / "x.png", color=(200, 200, 200))
    capsys.readouterr()
    assert main(["predict", str(folder), str(image), "--task", "high", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["file"] == str(image) and row["task"] == "high" and {t["label"] for t in row["top"]} <= set(HIGH)
    assert main(["predict", str(folder), str(image), str(image), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in rows] == ["low", "high", "low", "high"]  # per input, every task in order
    assert {t["label"] for t in rows[0]["top"]} <= set(LOW)
    assert [t["label"] for t in rows[1]["top"]] == [t["label"] for t in row["top"]]
    assert main(["predict", str(folder), str(image), "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"{image} [low]", f"{image} [high]"]


def test_predict_refuses_tasks_that_are_not_there(
    runs: dict[str, Path], write_image: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = write_image(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["predict", str(runs["ties"] / "models" / "merge-ties"), str(image), "--task", "hihg"]) == 1
    assert "unknown task 'hihg'. Did you mean 'high'? This multi-task model has the tasks: low, high" in (
        capsys.readouterr().err
    )
    # the run directory's selected model answers one task: --task finds the run's multi-task model that has it
    assert main(["predict", str(runs["ties"]), str(image), "--task", "low", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["task"] == "low" and {t["label"] for t in row["top"]} <= set(LOW)
    # a task no multi-task model of the run has: the selected model is single-task, and the error lists the tasks
    assert main(["predict", str(runs["ties"]), str(image), "--task", "middle"]) == 1
    err = capsys.readouterr().err
    assert f"'{runs['ties'] / 'model'}' is a single-task model (labels: 0, 1, 2, 3, 4)" in err
    assert f"multi-task models: '{runs['ties'] / 'models' / 'merge-ties'}' (tasks: low, high)" in err


def test_a_refit_fits_each_tasks_head_on_the_merged_features(runs: dict[str, Path], tmp_path: Path) -> None:
    """``refit_heads``: after the merge (and BatchNorm recalibration) each task's head is fitted again by the
    linear probe's fit (``pipeline.train`` with ``linear_probe``) on the merged backbone's features of that task's
    training split; the backbone is left as the merge made it."""
    import shutil

    from transferkit.config import TrainConfig
    from transferkit.pipeline import train
    from transferkit.runner import add_stage

    run = Path(shutil.copytree(runs["low"], tmp_path / "run"))
    refit_train = {"epochs": 5, "lr": 0.05}
    entry = {"runs": [str(runs["high"])], "method": "ties", "label": "refit", "refit_heads": True}
    add_stage("merge", run, {**entry, "refit_train": refit_train})
    result = read_json(run / "metrics.json")["multi_task"]["refit"]
    refitted, merged = load_model(run / "models" / "refit"), load_model(runs["ties"] / "models" / "merge-ties")
    assert isinstance(refitted, MultiTaskModel) and isinstance(merged, MultiTaskModel)
    # the same merge as merge-ties (same members, method and recalibration): the backbones are equal, the heads not
    for k, v in merged.backbone.state_dict().items():
        assert torch.equal(refitted.backbone.state_dict()[k], v), k
    records = {r["task"]: r for r in result["merge"]["refit_heads"]}
    assert list(records) == ["low", "high"]
    recipe = load_recipe(run / "recipe.yaml")
    cfg = TrainConfig.model_validate({**recipe.train.model_dump(), "strategy": "linear_probe", **refit_train})
    for name, folder in (("low", run), ("high", runs["high"])):
        i = merged.tasks.index(name)
        assert not torch.equal(refitted.heads[i].weight, merged.heads[i].weight)
        # by hand: the same linear-probe fit, on the merged model's features of the task's split, gives this head
        view = merged.task(name)
        theirs = load_recipe(folder / "recipe.yaml")
        assert theirs.data is not None
        data = prepare_data(theirs.data, view, theirs.seed)
        train(view, data, cfg, seed=recipe.seed)
        assert torch.allclose(refitted.heads[i].weight, merged.heads[i].weight, atol=1e-6)
        assert torch.allclose(refitted.heads[i].bias, merged.heads[i].bias, atol=1e-6)
        # the accuracy on the task's training split does not drop, as recorded and as measured here
        record = records[name]
        assert record["train_accuracy_after"] >= record["train_accuracy_before"]
        assert evaluate(view, data.dataset("train"))["accuracy"] == record["train_accuracy_after"]
        assert result["tasks"][name]["val"]["accuracy"] == record["val_accuracy_after"]


def test_merge_cli_refits_heads_and_refuses_refit_settings_without_it(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``transferkit merge --refit-heads --refit-epochs N``: the options of the recipe's merge entry;
    ``--refit-epochs`` alone is refused before anything is copied."""
    out = tmp_path / "cli-refit"
    base = ["merge", str(runs["low"]), str(runs["high"]), "--method", "ties", "--label", "refit"]
    assert main([*base, "--refit-epochs", "2", "--out", str(out)]) == 2
    assert "give --refit-heads as well" in capsys.readouterr().err and not out.exists()
    assert main([*base, "--refit-heads", "--refit-epochs", "3", "--out", str(out)]) == 0
    records = read_json(out / "metrics.json")["multi_task"]["refit"]["merge"]["refit_heads"]
    assert [r["task"] for r in records] == ["low", "high"]
    assert [r["epochs_run"] for r in records] == [3, 3]  # the run trains 1 epoch: the flag took effect
