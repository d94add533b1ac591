"""Bad inputs through the command line: hostile or broken recipes, run folders, model folders and arguments.

Each is refused with a transferkit error that names the file, key or argument, what is wrong and the fix, and
``transferkit.cli.main`` prints it without a traceback (exit 2 for a recipe or an argument, 1 otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from transferkit.cli import main
from transferkit.errors import RecipeError, RunDirError, SourceError
from transferkit.io import load_state_dict, safe_torch_load
from transferkit.models.base import load_model, save_model
from transferkit.recipe import load_recipe, read_yaml

RECIPE = "name: t\nsource: {name: timm:test_efficientnet, pretrained: false}\ndata: {dataset: mnist5k}\n"


def _cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str]:
    """Exit code and stderr of ``transferkit ARGS`` (a traceback would be an uncaught exception here)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 1. Recipe YAML


def _bomb(levels: int = 9) -> str:
    """A 'billion laughs': a few hundred bytes whose aliases expand to 9**levels strings."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(RECIPE + _bomb())
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    rc, err = _cli(capsys, "validate", path)
    assert time.perf_counter() - start < 0.5
    assert rc == 2 and str(path) in err and "aliases" in err and "expand to more than" in err
    with pytest.raises(RecipeError):
        read_yaml(path)


def test_a_few_aliases_still_work_and_an_override_changes_one_place(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: t\nsource: timm:test_efficientnet\ndata: {dataset: mnist5k}\ntrain: &t {epochs: 2}\n"
        "compare: [{strategy: linear_probe, overrides: *t}]\n"
    )
    recipe = load_recipe(path, ["train.epochs=3"])
    assert recipe.train.epochs == 3 and recipe.compare[0].overrides == {"epochs": 2}


def test_cyclic_alias_is_a_recipe_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + "loop: &x [*x]\n")
    with pytest.raises(RecipeError, match="cannot be cyclic"):
        read_yaml(path)


@pytest.mark.parametrize(
    "text, key, first, again",
    [
        (RECIPE + "train: {epochs: 2}\ntrain: {epochs: 3}\n", "train", 4, 5),
        (RECIPE + "train:\n  epochs: 2\n  lr: 0.01\n  epochs: 3\n", "epochs", 5, 7),
    ],
    ids=["section", "nested-key"],
)
def test_a_key_given_twice_names_the_key_and_its_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, first: int, again: int
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    rc, err = _cli(capsys, "validate", path)
    assert rc == 2
    assert f"'{key}' is given twice" in err and f"line {again}" in err and f"first on line {first}" in err
    assert str(path) in err and "Remove one of them" in err


def test_merge_keys_may_override_what_they_merge(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + "base: &b {epochs: 2, lr: 0.01}\ntrain: {<<: *b, epochs: 3}\n")
    assert read_yaml(path)["train"] == {"epochs": 3, "lr": 0.01}


def test_non_utf8_recipe_is_a_recipe_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xff\xfe\x00name: t\n")
    rc, err = _cli(capsys, "validate", path)
    assert rc == 2 and "is not a UTF-8 text file" in err


def test_bad_override_value_is_a_recipe_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    rc, err = _cli(capsys, "validate", path, "train.lr=[0.1")
    assert rc == 2 and "override 'train.lr=[0.1' is not valid YAML" in err


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "a\\b", ""])
def test_run_name_must_be_a_plain_folder_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE.replace("name: t\n", f"name: {json.dumps(name)}\n", 1))
    rc, err = _cli(capsys, "run", "r.yaml")
    assert rc == 2 and "name:" in err and "plain folder name" in err and "--out" in err
    assert sorted(os.listdir(tmp_path)) == ["r.yaml"]  # nothing written, under runs/ or above it


# ---------------------------------------------------------------------------------------------------------------
# 2. Run directories


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE)
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        rc, err = _cli(capsys, "run", tmp_path / "r.yaml", "--out", out)
        assert rc == 1 and f"'{tmp_path / 'notes.txt'}' is a file, not a folder" in err and "--out" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_run_that_fails_is_marked_failed_and_can_be_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nnope1.png,a\nnope2.png,b\n")  # valid recipe; the data stage fails
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("mnist5k", str(manifest)) + "train: {epochs: 1}\n")
    out = tmp_path / "run"
    rc, err = _cli(capsys, "run", recipe, "--out", out)
    assert rc == 1 and "nope1.png" in err
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed"
    assert "DataNotFoundError" in info["error"] and "nope1.png" in info["error"]
    rc, err = _cli(capsys, "run", recipe, "--out", out, "--resume")  # the same recipe: resumed, no --overwrite
    assert rc == 1 and "nope1.png" in err and "--overwrite" not in err
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------------------------------------------------------
# 3. Model folders and weights files


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from transferkit.sources import load_source

    torch.manual_seed(0)
    model = load_source({"name": "timm:test_efficientnet", "pretrained": False})
    model.reset_head(2, ["a", "b"])
    return save_model(model.eval(), tmp_path_factory.mktemp("models") / "m")


def _broken(model_dir: Path, tmp_path: Path, name: str, content: bytes | Callable[[bytes], bytes]) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(model_dir, folder)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(content(data) if callable(content) else content)
    return folder


@pytest.mark.parametrize(
    "content, what",
    [
        (lambda b: b[: len(b) // 2], "is corrupt or truncated: it is not valid JSON"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "is corrupt or truncated: it is not valid JSON"),
        (b"[1, 2]", "is corrupt: it holds a list"),
        (json.dumps({"format": "transferkit.model/1", "labels": ["a", "b"]}).encode(), "misses arch, num_features"),
        (lambda b: json.dumps({**json.loads(b), "head": {"type": "linear"}}).encode(), "has no valid head.num_classes"),
    ],
    ids=["truncated", "binary", "a-list", "missing-keys", "no-num-classes"],
)
def test_corrupt_model_json_is_named(
    model_dir: Path, tmp_path: Path, write_image: Callable[..., Path], capsys: pytest.CaptureFixture[str], content, what
) -> None:
    folder = _broken(model_dir, tmp_path, "model.json", content)
    with pytest.raises(SourceError, match="model.json' ") as info:
        load_model(folder)
    assert what in str(info.value) and "save the model again" in str(info.value)
    rc, err = _cli(capsys, "predict", folder, write_image(tmp_path / "x.png"))
    assert rc == 1 and str(folder / "model.json") in err and what in err


@pytest.mark.parametrize("cut", [4, 9, 100, 0.5, -1], ids=["4-bytes", "9-bytes", "header", "half", "last-byte"])
def test_truncated_safetensors_is_named(
    model_dir: Path, tmp_path: Path, write_image: Callable[..., Path], capsys: pytest.CaptureFixture[str], cut
) -> None:
    folder = _broken(model_dir, tmp_path, "model.safetensors", lambda b: b[: int(len(b) * cut) if cut == 0.5 else cut])
    rc, err = _cli(capsys, "predict", folder, write_image(tmp_path / "x.png"))
    assert rc == 1 and str(folder / "model.safetensors") in err and "corrupt or truncated" in err


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_random_bytes_as_weights_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str) -> None:
    weights = tmp_path / f"w{suffix}"
    weights.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(SourceError) as info:
        load_state_dict(weights)
    message = str(info.value)
    assert str(weights) in message and "corrupt or truncated" in message and "weights_only" not in message
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("pretrained: false", f"weights: {weights}"))
    rc, err = _cli(capsys, "run", recipe, "--out", tmp_path / "run")
    assert rc == 1 and str(weights) in err and "corrupt or truncated" in err


def test_truncated_checkpoint_is_named(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "w.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(SourceError, match="corrupt or truncated") as info:
        safe_torch_load(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# 4. transfer --out DIR --overwrite


def _transfer(capsys: pytest.CaptureFixture[str], source: Path, out: Path, *more: str) -> tuple[int, str]:
    return _cli(capsys, "transfer", source, "timm:test_efficientnet", "--labels", "a,b", "--out", out, *more)


def test_overwrite_never_deletes_the_users_own_folder(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("months of work")
    rc, err = _transfer(capsys, model_dir, mine, "--overwrite")
    assert rc == 1 and f"'{mine}' holds files transferkit did not write (chapter1.tex)" in err
    assert os.listdir(mine) == ["chapter1.tex"]
    # a transfer's output with a file of the user's added to it: refused too
    out = tmp_path / "out"
    assert _transfer(capsys, model_dir, out)[0] == 0
    (out / "notes.md").write_text("mine")
    rc, err = _transfer(capsys, model_dir, out, "--overwrite")
    assert rc == 1 and "(notes.md)" in err and (out / "notes.md").read_text() == "mine"


def test_overwrite_replaces_what_transferkit_wrote_and_leaves_nothing_behind(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _transfer(capsys, model_dir, out)[0] == 0
    rc, err = _transfer(capsys, model_dir, out)
    assert rc == 1 and "is not empty" in err and "--overwrite" in err
    assert _transfer(capsys, model_dir, out, "--overwrite")[0] == 0
    assert os.listdir(tmp_path) == ["out"]  # no .out.old, no temporary folder
    assert load_model(out).labels == ["a", "b"]
    # a model folder transferkit saved (no transfer report) may be overwritten too
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert _transfer(capsys, model_dir, copy, "--overwrite")[0] == 0
    assert (copy / "transfer_report.json").is_file()


def test_transfer_onto_a_file_is_refused(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"mine")
    for extra in ([], ["--overwrite"]):
        rc, err = _transfer(capsys, model_dir, target, *extra)
        assert rc == 1 and f"'{target}' is a file, not a folder" in err
    assert target.read_bytes() == b"mine" and os.listdir(tmp_path) == ["model.bin"]


# ---------------------------------------------------------------------------------------------------------------
# 5. predict and rank arguments


@pytest.mark.parametrize("k", ["0", "-1"])
def test_predict_top_k_must_be_positive(
    model_dir: Path, tmp_path: Path, write_image: Callable[..., Path], capsys: pytest.CaptureFixture[str], k: str
) -> None:
    rc, err = _cli(capsys, "predict", model_dir, write_image(tmp_path / "x.png"), "--top-k", k)
    assert rc == 2 and f"--top-k {k}: give 1 or more" in err


def test_predict_a_folder_predicts_every_image_in_it(
    model_dir: Path, tmp_path: Path, write_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("b.png", "a.jpg", "sub/c.png"):
        write_image(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    capsys.readouterr()
    assert main(["predict", str(model_dir), str(tmp_path / "imgs"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [Path(r["file"]).relative_to(tmp_path / "imgs").as_posix() for r in rows] == ["a.jpg", "b.png", "sub/c.png"]
    (tmp_path / "empty").mkdir()
    rc, err = _cli(capsys, "predict", model_dir, tmp_path / "empty")
    assert rc == 1 and f"folder '{tmp_path / 'empty'}' holds no image files" in err


class _TextPredictor:
    """Stands in for a loaded text model (a real one takes seconds to build): predict must not be reached."""

    modality = "text"

    def predict(self, inputs: list[Any], top_k: int = 3) -> list[dict[str, Any]]:
        raise AssertionError(f"predicted {inputs}")


def test_predict_a_text_model_on_a_file_says_it_takes_texts(
    tmp_path: Path,
    write_image: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import transferkit.data.text  # registers the text modality
    import transferkit.predict

    monkeypatch.setattr(transferkit.predict, "load_run", lambda path, task=None: _TextPredictor())
    image = write_image(tmp_path / "x.png")
    rc, err = _cli(capsys, "predict", tmp_path / "run", image)
    assert rc == 1 and f"'{image}' is a file, but this is a text model" in err and "--file" in err
    rc, err = _cli(capsys, "predict", tmp_path / "run", "--file", image)  # not a text file either
    assert rc == 1 and f"'{image}' is not a UTF-8 text file" in err


def test_rank_bad_candidates_json_and_per_class(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _cli(capsys, "rank", "--data", "mnist5k", "--candidates", "{name: timm:test_efficientnet}")
    assert rc == 2 and "--candidates '{name: timm:test_efficientnet}' is not valid JSON" in err and "double" in err
    for flag in ("--per-class", "--max-examples"):
        rc, err = _cli(capsys, "rank", "--data", "mnist5k", "--candidates", "timm:test_efficientnet", flag, "0")
        assert rc == 2 and f"{flag} 0:" in err
    rc, err = _cli(capsys, "rank", "--data", "mnist5k", "--candidates", "timm:test_efficientnet", "--image-size", "2")
    assert rc == 2 and "--image-size 2:" in err


def test_run_dir_error_is_raised_before_a_transfer(model_dir: Path, tmp_path: Path) -> None:
    from transferkit.transfer.api import check_transfer_out

    (tmp_path / "x").write_text("")
    with pytest.raises(RunDirError, match="is a file"):
        check_transfer_out(tmp_path / "x", overwrite=True)
    check_transfer_out(tmp_path / "new")
    check_transfer_out(model_dir, overwrite=True)


def test_replace_dir_over_a_file_leaves_no_old_copy(tmp_path: Path) -> None:
    from transferkit.io import replace_dir

    (tmp_path / "out").write_text("a file in the way")
    replace_dir(tmp_path / "out", lambda tmp: (tmp / "model.json").write_text("{}"))
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["model.json"]
