"""Stages: the order a recipe's stages run in, their checks, and stages added to a finished run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from transferkit.cli import main
from transferkit.config import dump_recipe
from transferkit.errors import RecipeError, RunDirError, UnknownNameError
from transferkit.io import read_json
from transferkit.recipe import load_recipe
from transferkit.runner import run_recipe, run_stage
from transferkit.stages import STAGES, stage_order

TINY = {
    "name": "tiny",
    "seed": 0,
    "source": {"name": "timm:test_efficientnet", "pretrained": False},
    "data": {"dataset": "mnist5k", "per_class": 3, "val_per_class": 2, "test_size": 30, "image_size": 32},
    "train": {"strategy": "full", "epochs": 1, "batch_size": 8, "lr": 0.01},
}


def _names(recipe: dict[str, Any]) -> list[str]:
    return [s.name for s in stage_order(load_recipe(recipe))]


# ----------------------------------------------------------------------------------------------------------------
# Order


def test_default_order_puts_transfer_before_train_and_select_last() -> None:
    assert _names(TINY) == ["transfer", "train", "select"]


def test_a_stage_written_after_the_one_that_needs_it_runs_first() -> None:
    """rank gives the source that train needs: written last, it still runs before train, and transfer (which builds
    the target train needs) right before it; baselines keep their written place."""
    recipe = {k: v for k, v in TINY.items() if k != "source"}
    recipe["baselines"] = ["tfidf"]
    recipe["rank"] = {"candidates": ["timm:test_efficientnet", "timm:test_resnet"]}
    assert _names(recipe) == ["rank", "transfer", "train", "baselines", "select"]
    with_source = {**TINY, "baselines": ["tfidf"]}
    assert _names(with_source) == ["transfer", "train", "baselines", "select"]
    first = {"baselines": ["tfidf"], **with_source}
    assert _names(first) == ["baselines", "transfer", "train", "select"]
    ranked_first = {"baselines": ["tfidf"], **recipe}  # baselines read the data, read with the ranked source
    assert _names(ranked_first) == ["rank", "baselines", "transfer", "train", "select"]


def test_the_written_order_survives_the_run_directory_recipe() -> None:
    recipe = load_recipe({"baselines": ["tfidf"], **TINY})
    again = load_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again.written == recipe.written and again.written[0] == "baselines"
    assert [s.name for s in stage_order(again)] == [s.name for s in stage_order(recipe)]


def test_every_stage_declares_its_contract() -> None:
    for name, stage in STAGES.items():
        assert stage.name == name and stage.help, name
        assert callable(stage.run) and callable(stage.done) and callable(stage.applies)
    assert {n for n, s in STAGES.items() if s.extend is not None} == {
        "train",
        "baselines",
        "evaluate",
        "merge",
        "distill",
        "prune",
        "quantize",
        "export",
    }


def test_compression_stages_run_after_what_they_compress_in_the_written_order() -> None:
    """export is written first, yet runs after the models exist; prune and quantize (both read and give models)
    keep their written order among themselves, after train."""
    recipe = {
        "export": {"quantize": "int8"},
        **TINY,
        "quantize": {"method": "int8_dynamic"},
        "prune": {"ratio": 0.5},
    }
    assert _names(recipe) == ["transfer", "train", "quantize", "prune", "export", "select"]


# ----------------------------------------------------------------------------------------------------------------
# Stages on a finished run


def test_unknown_and_pre_training_stages_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="unknown stage 'trian'. Did you mean 'train'?"):
        run_stage("trian", tmp_path)
    with pytest.raises(RecipeError, match="the stage 'rank' cannot be added to a finished run"):
        run_stage("rank", tmp_path)
    with pytest.raises(RunDirError, match="is not a transferkit run directory \\(recipe.yaml is missing\\)"):
        run_stage("train", tmp_path, ["strategy=bitfit"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stages") / "run"
    run_recipe(load_recipe(TINY), out=out)
    return out


def test_train_on_a_finished_run_adds_a_model_and_retrains_nothing(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    import shutil

    shutil.copytree(finished_run, out)
    before = read_json(out / "metrics.json")
    result_file = out / "checkpoints" / "full" / "result.json"
    stamp = result_file.stat().st_mtime_ns
    old_hash = read_json(out / "run.json")["recipe_hash"]

    assert main(["train", str(out), "strategy=linear_probe", "label=probe"]) == 0
    assert "[full] already trained" in capsys.readouterr().out
    after = read_json(out / "metrics.json")
    assert list(after["models"]) == ["full", "probe"]
    assert after["models"]["full"]["weights_sha256"] == before["models"]["full"]["weights_sha256"]
    assert result_file.stat().st_mtime_ns == stamp  # read back, not written again
    assert after["models"]["probe"]["strategy"] == "linear_probe"
    assert (out / "models" / "probe" / "model.safetensors").is_file()
    assert "probe" in (out / "report.html").read_text()
    run = read_json(out / "run.json")
    assert run["status"] == "done" and run["history"] == [old_hash] and run["recipe_hash"] != old_hash
    assert yaml.safe_load((out / "recipe.yaml").read_text())["compare"] == [
        {"strategy": "linear_probe", "label": "probe", "overrides": {}}
    ]
    # a second model of the same name is a recipe error; the same name with other settings (a recipe run --from
    # the run) would silently mix two trainings: refused
    with pytest.raises(RecipeError, match=r"trained models need distinct names; \['probe'\] appear twice"):
        run_stage("train", out, ["strategy=linear_probe", "label=probe", "overrides.lr=0.5"])
    other = yaml.safe_load((out / "recipe.yaml").read_text())
    other["compare"][0]["overrides"] = {"lr": 0.5}
    with pytest.raises(RunDirError, match="already holds a model 'probe' trained with other settings"):
        run_recipe(load_recipe(other), from_run=out)


def test_run_from_a_finished_run_keeps_its_inputs(finished_run: Path, tmp_path: Path) -> None:
    changed = json.loads(json.dumps(TINY))
    changed["data"]["per_class"] = 4
    with pytest.raises(RunDirError, match="the recipe changes data, which the run's models were trained on"):
        run_recipe(load_recipe(changed), from_run=finished_run)


def test_bad_options_of_a_stage_on_a_finished_run_name_the_fix(finished_run: Path) -> None:
    with pytest.raises(RecipeError) as info:
        run_stage("train", finished_run, ["strategy=full", "lable=x"])
    assert str(info.value) == (
        "train on a finished run takes a compare entry (strategy=NAME label=... overrides.KEY=value): lable: unknown "
        "key. Did you mean 'label'? Valid keys here: strategy, label, overrides."
    )
    with pytest.raises(
        RecipeError,
        match=r"evaluate on a finished run takes dataset=PATH \[label=NAME\]: dataset: "
        "required key is missing.",
    ):
        run_stage("evaluate", finished_run, ["label=x"])
    with pytest.raises(
        RecipeError,
        match=r"transferkit baselines: 'tfidf' is not a key=value option; e.g. transferkit baselines RUN_DIR "
        r"names=\[tfidf\]",
    ):
        run_stage("baselines", finished_run, ["tfidf"])
    with pytest.raises(RecipeError, match=r"baselines on a finished run takes names=\[NAME, ...\]"):
        run_stage("baselines", finished_run, ["name=tfidf"])


def test_a_training_seed_changes_the_data_order_not_the_split(tmp_path: Path) -> None:
    """train.seed (here a compare override): another data order and dropout, the same split and the same new head."""
    recipe = {
        **TINY,
        "compare": [
            {"strategy": "full", "label": "seed1", "overrides": {"seed": 1}},
            {"strategy": "full", "label": "seed0", "overrides": {"seed": 0}},
        ],
    }
    out = run_recipe(load_recipe(recipe), out=tmp_path / "run")
    models = read_json(out / "metrics.json")["models"]
    assert models["seed0"]["weights_sha256"] == models["full"]["weights_sha256"]  # seed 0 is the recipe's own
    assert models["seed1"]["weights_sha256"] != models["full"]["weights_sha256"]
    assert models["seed1"]["settings_sha256"] != models["seed0"]["settings_sha256"]


# ----------------------------------------------------------------------------------------------------------------
# train.checkpoints: what a finished model keeps


def test_a_finished_model_keeps_its_result_but_not_its_optimizer_checkpoint(finished_run: Path) -> None:
    assert sorted(p.name for p in (finished_run / "checkpoints" / "full").iterdir()) == ["result.json"]
    assert (finished_run / "models" / "full" / "model.safetensors").is_file()
    assert (finished_run / "model" / "model.safetensors").is_file()


def test_checkpoints_keep_keeps_last_pt_with_the_same_fingerprint(finished_run: Path, tmp_path: Path) -> None:
    from transferkit.io import safe_torch_load

    out = run_recipe(load_recipe(TINY, ["train.checkpoints=keep"]), out=tmp_path / "run")
    files = sorted(p.name for p in (out / "checkpoints" / "full").iterdir())
    assert files == ["last.done.json", "last.done.safetensors", "last.pt", "result.json"]
    sizes = {f: (out / "checkpoints" / "full" / f).stat().st_size for f in files}
    print(f"checkpoint bytes kept by a finished tiny model: {sizes}")
    assert "optimizer" in safe_torch_load(out / "checkpoints" / "full" / "last.pt")
    # what is kept on disk is not a training setting: the fingerprint is the default run's
    kept, default = read_json(out / "metrics.json"), read_json(finished_run / "metrics.json")
    assert kept["models"]["full"]["settings_sha256"] == default["models"]["full"]["settings_sha256"]
    assert kept["models"]["full"]["weights_sha256"] == default["models"]["full"]["weights_sha256"]


def test_checkpoints_option_is_checked() -> None:
    with pytest.raises(RecipeError, match="train.checkpoints"):
        load_recipe(TINY, ["train.checkpoints=last_only"])


def test_an_interrupted_model_keeps_its_checkpoint_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first model is done (its last.pt deleted); the second is interrupted at step 3, after the checkpoint of
    step 2: it keeps it, and --resume continues from it, then deletes it."""
    import transferkit.pipeline as pipeline

    second = {"strategy": "full", "label": "second", "overrides": {"lr": 0.02, "checkpoint_every": 1}}
    recipe = {**TINY, "compare": [second]}
    real_train = pipeline.train

    def stop(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if kwargs["paths"].job == "second":
            kwargs["on_step"] = stop
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(recipe), out=out)
    assert sorted(p.name for p in (out / "checkpoints" / "full").iterdir()) == ["result.json"]
    assert sorted(p.name for p in (out / "checkpoints" / "second").iterdir()) == ["last.pt"]
    monkeypatch.undo()

    run_recipe(load_recipe(recipe), out=out, resume=True)
    metrics = read_json(out / "metrics.json")
    assert metrics["models"]["second"]["resumed_from_step"] == 2
    assert metrics["models"]["full"]["resumed_from_step"] is None  # read back, not trained again
    for name in ("full", "second"):
        assert sorted(p.name for p in (out / "checkpoints" / name).iterdir()) == ["result.json"], name
    # a stage added to the finished run reads both back
    assert main(["train", str(out), "strategy=linear_probe", "label=probe"]) == 0
    assert list(read_json(out / "metrics.json")["models"]) == ["full", "second", "probe"]
    assert sorted(p.name for p in (out / "checkpoints" / "probe").iterdir()) == ["result.json"]


def test_the_same_recipe_from_a_finished_run_retrains_nothing_and_adds_no_history(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = read_json(out / "run.json")
    run_recipe(load_recipe(yaml.safe_load((out / "recipe.yaml").read_text())), from_run=out)
    assert "[full] already trained" in capsys.readouterr().out
    after = read_json(out / "run.json")
    assert after["recipe_hash"] == before["recipe_hash"] and "history" not in after and after["status"] == "done"


def test_models_trained_before_compile_and_gradient_checkpointing_keep_their_settings() -> None:
    """A trained model's fingerprint leaves out train options added later (compile, gradient_checkpointing) at
    their defaults, so a run made before they existed resumes (``--from``); set, they make other settings. The same
    holds for a distill entry's training settings."""
    from transferkit.config import TrainConfig
    from transferkit.stages.base import settings_sha
    from transferkit.stages.train import _settings_sha

    cfg = TrainConfig(strategy="freeze")
    before = cfg.model_dump(mode="json", exclude={"checkpoints", "compile", "gradient_checkpointing"})
    assert _settings_sha(cfg) == settings_sha(before)
    assert _settings_sha(TrainConfig(strategy="freeze", compile=True)) != settings_sha(before)
    assert _settings_sha(TrainConfig(strategy="freeze", gradient_checkpointing=True)) != settings_sha(before)
    assert _settings_sha(TrainConfig(strategy="freeze", epochs=cfg.epochs + 1)) != settings_sha(before)
