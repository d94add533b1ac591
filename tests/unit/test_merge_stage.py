"""The ``merge`` stage: in a recipe after training, and ``transferkit merge`` on finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_stages import TINY, _names

from transferkit.cli import main
from transferkit.errors import DataError
from transferkit.io import read_json
from transferkit.models.base import load_model
from transferkit.recipe import load_recipe
from transferkit.runner import add_stage, run_recipe

RECIPE = {
    **TINY,
    "compare": [{"strategy": "full", "label": "full-hi", "overrides": {"lr": 0.03}}],
    "merge": [
        {"method": "uniform_soup"},
        {"method": {"name": "ties", "density": 0.5}, "label": "ties"},
        {"method": "ensemble"},
        {"method": "greedy_soup"},
    ],
}


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merge") / "run"
    run_recipe(load_recipe(RECIPE), out=out)
    return out


def test_merge_runs_after_training_and_before_selection() -> None:
    assert _names(RECIPE) == ["transfer", "train", "merge", "select"]
    assert _names({"merge": RECIPE["merge"], **TINY}) == ["transfer", "train", "merge", "select"]


def test_merged_models_join_the_run_and_reload(merged_run: Path) -> None:
    metrics = read_json(merged_run / "metrics.json")
    assert list(metrics["models"]) == ["full", "full-hi", "merge-uniform_soup", "ties", "merge-greedy_soup"]
    assert metrics["selected"] in metrics["models"]
    soup = metrics["models"]["merge-uniform_soup"]
    assert soup["strategy"] == "merge:uniform_soup" and soup["merge"]["members"] == [
        str(merged_run / "models" / "full"),
        str(merged_run / "models" / "full-hi"),
    ]
    assert soup["merge"]["batchnorm_recalibrated_on"] == 30  # the training split, once, without augmentation
    # the backbone's weights by their task vectors (a soup is task arithmetic with lambda 1/n), the new head and the
    # BatchNorm statistics averaged, the step counters taken from the first model
    tensors = soup["merge"]["tensors"]
    assert tensors["task vectors"] > 0 and tensors["averaged"] > 0 and tensors["first model"] > 0
    names = load_model(merged_run / "models" / "full").state_dict()
    assert tensors["task vectors"] + tensors["averaged"] + tensors["first model"] == len(names)
    # both members trained with every BatchNorm in training mode: all their statistics differ and are recomputed
    assert tensors["statistics that differ"] == 2 * soup["merge"]["batchnorms_recalibrated"] > 0
    ties = metrics["models"]["ties"]
    assert ties["merge"]["options"] == {"density": 0.5, "lam": 1.0, "scope": "tensor", "sign": "total"}
    assert ties["merge"]["tensors"]["task vectors"] > 0
    # the uniform soup's saved weights are the mean of its members' (BatchNorm statistics aside: recomputed)
    a, b = (load_model(merged_run / "models" / n).state_dict() for n in ("full", "full-hi"))
    s = load_model(merged_run / "models" / "merge-uniform_soup").state_dict()
    w = "backbone.conv_stem.weight"
    assert torch.allclose(s[w], (a[w] + b[w]) / 2, atol=1e-6)
    # an ensemble is reported, not saved as one model
    assert "merge-ensemble" in metrics["ensembles"] and not (merged_run / "models" / "merge-ensemble").exists()
    greedy = metrics["models"]["merge-greedy_soup"]["merge"]
    assert greedy["steps"][0]["joined"] is True and len(greedy["steps"]) == 2
    assert len(greedy["kept"]) == 1 + int(greedy["steps"][1]["joined"])
    page = (merged_run / "report.html").read_text()
    assert "<h2>Merge ties</h2>" in page and "<h2>Merge merge-ensemble</h2>" in page


def test_a_resumed_run_reads_the_merges_back(merged_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = read_json(merged_run / "metrics.json")["models"]["ties"]
    stamp = (merged_run / "checkpoints" / "ties" / "result.json").stat().st_mtime_ns
    run_recipe(load_recipe(RECIPE), out=merged_run, resume=True)
    assert (merged_run / "checkpoints" / "ties" / "result.json").stat().st_mtime_ns == stamp
    assert read_json(merged_run / "metrics.json")["models"]["ties"] == before


def test_transferkit_merge_adds_a_merge_of_two_runs_to_a_copy(merged_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    run_recipe(load_recipe({**TINY, "train": {**TINY["train"], "lr": 0.02}}), out=other)
    out = tmp_path / "merged"
    code = main(
        [
            "merge",
            str(merged_run),
            str(other),
            "--method",
            "task_arithmetic",
            "--lambda",
            "0.5",
            "--label",
            "ta",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    ta = read_json(out / "metrics.json")["models"]["ta"]
    # each run gives its selected model (the copy's, then the other run's)
    selected = read_json(merged_run / "metrics.json")["selected"]
    assert ta["merge"]["members"] == [str(out / "models" / selected), str(other / "model")]
    assert ta["merge"]["options"] == {"lam": 0.5}
    assert "ta" not in read_json(merged_run / "metrics.json")["models"]  # the first run is left as it was


def test_runs_of_another_source_are_refused(merged_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({"source": "timm:test_resnet"}))
    with pytest.raises(DataError, match="started from 'timm:test_resnet', this run from 'timm:test_efficientnet'"):
        add_stage("merge", merged_run, {"runs": [str(other)], "label": "x"})


def test_lora_runs_merge_with_their_adapters_folded_in(tmp_path: Path) -> None:
    """Issue 16: a model that keeps its LoRA adapters (lora, merge: false) merges with plain models: peft folds the
    adapters into its weights first, and the soup is the soup of the folded models."""
    import torch

    from transferkit.merge.api import plain_members
    from transferkit.models.adapters import merge_lora

    recipe = {
        **TINY,
        "compare": [{"strategy": {"name": "lora", "r": 4, "merge": False}, "label": "lora"}],
        "merge": [{"method": "uniform_soup", "models": ["full", "lora"], "recalibrate_bn": False}],
    }
    out = run_recipe(load_recipe(recipe), out=tmp_path / "run")
    assert read_json(out / "models" / "lora" / "model.json")["adapter"]["type"] == "lora"
    merged = read_json(out / "metrics.json")["models"]["merge-uniform_soup"]["merge"]
    assert merged["adapters_folded"] == [str(out / "models" / "lora")]
    lora = load_model(out / "models" / "lora")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = lora(x)
        merge_lora(lora)  # what plain_members does: same outputs, plain weights
        assert torch.allclose(lora(x), before, atol=1e-5) and lora.adapter is None
    full = load_model(out / "models" / "full").state_dict()
    soup = load_model(out / "models" / "merge-uniform_soup").state_dict()
    adapted = [
        n.replace(".lora_A.default.weight", ".weight")
        for n in load_model(out / "models" / "lora").state_dict()
        if n.endswith("lora_A.default.weight")
    ]
    assert adapted  # the adapters sat on these layers: their folded weights W + scale * B A enter the soup
    folded = lora.state_dict()
    for w in adapted:
        assert torch.allclose(soup[w], (full[w] + folded[w]) / 2, atol=1e-6), w
    assert plain_members([out / "models" / "full"], tmp_path) == [out / "models" / "full"]  # plain: as it is


def test_merges_made_before_the_lora_and_refit_options_keep_their_settings() -> None:
    """A merge's settings fingerprint leaves out the options added later (lora, refit_heads...) at their defaults,
    so a run made before them resumes; set, they make other settings."""
    from transferkit.config.recipe import MergeEntry
    from transferkit.stages.base import settings_sha
    from transferkit.stages.merge import _settings_sha

    before = {"method": "ties", "models": [], "runs": [], "label": None, "recalibrate_bn": True}
    assert _settings_sha(MergeEntry(method="ties")) == settings_sha(before)
    assert _settings_sha(MergeEntry(method="ties", refit_heads=True)) != settings_sha(before)
    assert _settings_sha(MergeEntry(method="ties", lora="adapters")) != settings_sha(before)
