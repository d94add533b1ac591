"""More of the bad-input corpus (issue 18): safetensors with lying headers, mislabelled and empty image files, CSV
details of text tables and interaction files, Unicode class names, absurd numbers, an output folder that cannot be
written, and what ``validate`` refuses before any training.

Each case ends in a transferkit error naming the file, row or key and the fix (``transferkit.cli.main`` prints it
with exit 1 or 2 and no traceback), or is accepted and its outcome checked; nothing is left half-written.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from transferkit.cli import main
from transferkit.data import read_dataset
from transferkit.data.text import read_text_file
from transferkit.errors import DataError, SourceError
from transferkit.models.base import load_model, save_model
from transferkit.recipe import validate_recipe
from transferkit.recsys.data import read_interactions

TINY = {"name": "timm:test_efficientnet", "pretrained": False}


def _cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``transferkit ARGS`` (a traceback would be an uncaught exception here)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def _hidden_files(folder: Path) -> list[str]:
    """Temporary files of an atomic write (``.NAME.RANDOM``) left anywhere under ``folder``: half-written files."""
    return sorted(str(p) for p in folder.rglob(".*")) if folder.exists() else []


def _recipe(tmp_path: Path, dataset: Path | str, extra: str = "", name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        f"name: t\nsource: {{name: timm:test_efficientnet, pretrained: false}}\n"
        f"data: {{dataset: '{dataset}', image_size: 32, test_size: 4}}\n{extra}",
        encoding="utf-8",
    )
    return path


def _noise_folder(root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 6) -> Path:
    """``root/CLASS/i.png``: 32 px noise images, a different brightness per class (learnable, seeded)."""
    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 40, (32, 32, 3)) + 60 + 120 * k
            Image.fromarray(pixels.astype(np.uint8)).save(root / c / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------------------------
# 1. Safetensors with lying headers


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A timm test_efficientnet weights file (for ``source.weights``) and a saved transferkit model folder."""
    import timm
    import torch
    from safetensors.torch import save_file

    from transferkit.sources import load_source

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "w.safetensors"))
    model = load_source(TINY)
    model.reset_head(2, ["a", "b"])
    return {"file": root / "w.safetensors", "folder": save_model(model.eval(), root / "m")}


def _lie(data: bytes, kind: str) -> bytes:
    """``data`` (a safetensors file) with its header lying about the largest tensor; the file length kept."""
    n = struct.unpack("<Q", data[:8])[0]
    if kind == "prefix-past-the-end":
        return struct.pack("<Q", len(data) * 10) + data[8:]
    if kind == "prefix-2**63":
        return struct.pack("<Q", 2**63) + data[8:]
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    big = max(names, key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    entry = header[big]
    start, end = entry["data_offsets"]
    if kind == "offsets":
        entry["data_offsets"] = [start, end + 4]
    elif kind == "dtype-other-width":
        entry["dtype"] = "F16"
    elif kind == "dtype-same-width":
        entry["dtype"] = "I32"
    elif kind == "shape-more-elements":
        entry["shape"] = [entry["shape"][0] * 2, *entry["shape"][1:]]
    elif kind == "shape-swapped":
        entry["shape"] = list(reversed(entry["shape"]))
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # the same header length: offsets still valid
    assert len(text) == n
    return data[:8] + text + data[8 + n :]


LIES = {
    "offsets": "not a valid safetensors file",
    "dtype-other-width": "not a valid safetensors file",
    "dtype-same-width": "is stored as torch.int32 but the model's is torch.float32",
    "shape-more-elements": "not a valid safetensors file",
    "shape-swapped": "does not fit the model: size mismatch for",
    "prefix-past-the-end": "not a valid safetensors file",
    "prefix-2**63": "not a valid safetensors file",
}


@pytest.mark.parametrize("kind", list(LIES))
def test_a_lying_header_as_source_weights_is_named(
    weights: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    from transferkit.sources import load_source

    original = weights["file"].read_bytes()
    path = tmp_path / "w.safetensors"
    path.write_bytes(_lie(original, kind))
    assert kind.startswith("prefix") or len(path.read_bytes()) == len(original)
    with pytest.raises(SourceError) as info:
        load_source({"name": "timm:test_efficientnet", "weights": str(path)})
    message = str(info.value)
    assert f"'{path}'" in message and LIES[kind] in message and "again" in message
    data = _noise_folder(tmp_path / "data", per_class=3)
    recipe = tmp_path / "r.yaml"
    source = f"source: {{name: timm:test_efficientnet, weights: '{path}'}}\n"
    recipe.write_text(f"name: t\n{source}data: {{dataset: '{data}'}}\n")
    rc, _, err = _cli(capsys, "run", recipe, "--out", tmp_path / "run")
    assert rc == 1 and err.startswith("error: ") and str(path) in err and LIES[kind] in err
    assert _hidden_files(tmp_path / "run") == []


@pytest.mark.parametrize("kind", list(LIES))
def test_a_lying_header_in_a_model_folder_is_named(
    weights: dict[str, Path],
    tmp_path: Path,
    write_image: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    folder = tmp_path / "m"
    shutil.copytree(weights["folder"], folder)
    file = folder / "model.safetensors"
    file.write_bytes(_lie(file.read_bytes(), kind))
    with pytest.raises(SourceError) as info:
        load_model(folder)
    assert f"'{file}'" in str(info.value) and LIES[kind] in str(info.value) and "again" in str(info.value)
    rc, out, err = _cli(capsys, "predict", folder, write_image(tmp_path / "x.png"))
    assert rc == 1 and out == "" and err.startswith("error: ") and str(file) in err and LIES[kind] in err
    assert _hidden_files(folder) == []


# ---------------------------------------------------------------------------------------------------------------
# 2. Mislabelled and empty image files


def _mislabelled(root: Path, write_image: Callable[..., Path]) -> dict[str, Path]:
    """A JPEG named .png and a PNG named .jpg (readable), a text file named .jpg and a 0-byte .png (not)."""
    files = {
        "jpeg-as-png": write_image(root / "a" / "jpeg.png", fmt="JPEG"),
        "png-as-jpg": write_image(root / "b" / "png.jpg", fmt="PNG"),
        "good-a": write_image(root / "a" / "ok.png"),
        "good-b": write_image(root / "b" / "ok.jpg"),
    }
    (root / "a" / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "b" / "empty.png").write_bytes(b"")
    return {**files, "text-as-jpg": root / "a" / "notes.jpg", "zero-bytes": root / "b" / "empty.png"}


def test_mislabelled_images_read_by_content_and_bad_ones_skipped_in_a_folder(
    tmp_path: Path, write_image: Callable[..., Path]
) -> None:
    files = _mislabelled(tmp_path / "d", write_image)
    ds = read_dataset(str(tmp_path / "d"))
    kept = {Path(p).name for p in ds.items}
    assert kept == {"jpeg.png", "png.jpg", "ok.png", "ok.jpg"}
    skipped = {Path(s["path"]).name: s["reason"] for s in ds.skipped}
    assert set(skipped) == {"notes.jpg", "empty.png"}
    assert all("cannot identify image file" in r for r in skipped.values())
    with pytest.raises(DataError) as info:
        read_dataset(str(tmp_path / "d"), strict=True)
    assert f"image '{files['text-as-jpg']}' cannot be read" in str(info.value)
    assert "data.strict: false" in str(info.value) and "Remove or replace it" in str(info.value)


def test_mislabelled_and_empty_images_in_a_manifest(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    _mislabelled(tmp_path, write_image)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na/jpeg.png,x\nb/png.jpg,y\na/ok.png,x\nb/ok.jpg,y\na/notes.jpg,x\nb/empty.png,y\n")
    ds = read_dataset(str(manifest))
    assert ds.labels.tolist() == [0, 1, 0, 1] and ds.classes == ["x", "y"]
    assert sorted(Path(s["path"]).name for s in ds.skipped) == ["empty.png", "notes.jpg"]
    with pytest.raises(DataError, match=r"image '.*notes\.jpg' cannot be read .*data\.strict: false"):
        read_dataset(str(manifest), strict=True)
    only_empty = tmp_path / "only_empty.csv"
    only_empty.write_text("path,label\na/ok.png,x\nb/empty.png,y\n")
    with pytest.raises(DataError) as info:
        read_dataset(str(only_empty))
    assert "label 'y' has no readable images (all 1 were skipped" in str(info.value)
    assert "empty.png" in str(info.value) and "replace them or remove the label's rows" in str(info.value)


def test_predict_reads_mislabelled_images_and_names_an_unreadable_one(
    weights: dict[str, Path], tmp_path: Path, write_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    files = _mislabelled(tmp_path, write_image)
    rc, out, _ = _cli(capsys, "predict", weights["folder"], files["jpeg-as-png"], files["png-as-jpg"], "--json")
    assert rc == 0 and [Path(r["file"]).name for r in json.loads(out)] == ["jpeg.png", "png.jpg"]
    for kind in ("text-as-jpg", "zero-bytes"):
        rc, out, err = _cli(capsys, "predict", weights["folder"], files[kind])
        assert rc == 1 and out == ""
        assert err.startswith(f"error: image '{files[kind]}' cannot be read") and "cannot identify image file" in err


# ---------------------------------------------------------------------------------------------------------------
# 3. CSV details of text tables, interaction files and image manifests

REVIEW_ROWS = "".join(f"great film {i},good\nawful film {i},bad\n" for i in range(4))


def test_text_table_with_a_byte_order_mark_is_read_and_detected_as_text(tmp_path: Path) -> None:
    from transferkit.data.modality import dataset_modality

    path = tmp_path / "t.csv"
    path.write_bytes(("\ufefftext,label\n" + REVIEW_ROWS).encode("utf-8"))
    assert dataset_modality(str(path)) == "text"  # the header read without the BOM: a table of texts
    data = read_text_file(path)
    assert data.classes == ["bad", "good"] and len(data) == 8 and data.items[0] == "great film 0"


def test_text_table_with_a_quoted_newline_keeps_it_in_the_text(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('text,label\n"two\nlines, one review",good\n' + REVIEW_ROWS)
    data = read_text_file(path)
    assert len(data) == 9 and data.items[0] == "two\nlines, one review" and data.labels[0] == 1


def test_text_table_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(("text,label\ncafé crème,good\n" + REVIEW_ROWS).encode("latin-1"))
    with pytest.raises(DataError) as info:
        read_text_file(path)
    assert f"'{path}' is not UTF-8 text" in str(info.value) and "save it as UTF-8" in str(info.value)


@pytest.mark.parametrize("header, column", [("text,label,label", "label"), ("text,text,label", "text")])
def test_text_table_with_a_column_twice_is_refused(tmp_path: Path, header: str, column: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(header + "\n" + "".join(f"t{i},good,bad\n" for i in range(6)))
    with pytest.raises(DataError) as info:
        read_text_file(path)
    message = str(info.value)
    assert f"'{path}' has column '{column}' 2 times" in message and "Give every column its own name" in message


INTERACTIONS = "".join(f"u{i % 3},i{i},{i % 5 + 1},{1000 + i}\n" for i in range(9))


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_interactions_with_a_byte_order_mark_and_a_quoted_newline(tmp_path: Path, suffix: str) -> None:
    sep = "," if suffix == ".csv" else "\t"
    path = tmp_path / f"ratings{suffix}"
    text = "\ufeffuser,item,rating,timestamp\n" + '"new\nuser",i99,4,5\n' + INTERACTIONS
    path.write_bytes(text.replace(",", sep).encode("utf-8"))
    data = read_interactions(path)
    assert list(data.frame.columns) == ["user", "item", "rating", "timestamp"]
    assert data.describe() == {"interactions": 10, "users": 4, "items": 10}
    assert data.frame["user"].iloc[0] == "new\nuser" and data.frame["rating"].iloc[0] == 4.0


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".inter"])
def test_interactions_that_are_not_utf8_are_named(tmp_path: Path, suffix: str) -> None:
    sep = "," if suffix == ".csv" else "\t"
    path = tmp_path / f"ratings{suffix}"
    path.write_bytes(("user,item,rating,timestamp\nJosé,i1,3,5\n" + INTERACTIONS).replace(",", sep).encode("latin-1"))
    with pytest.raises(DataError) as info:
        read_interactions(path)
    assert f"'{path}' is not UTF-8 text" in str(info.value) and "save it as UTF-8" in str(info.value)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".inter"])
def test_interactions_with_a_column_twice_are_refused(tmp_path: Path, suffix: str) -> None:
    sep = "," if suffix == ".csv" else "\t"
    path = tmp_path / f"ratings{suffix}"
    rows = "".join(f"u{i % 3},i{i},j{i},3,{i}\n" for i in range(6))
    path.write_text(("user,item,item,rating,timestamp\n" + rows).replace(",", sep))
    with pytest.raises(DataError) as info:
        read_interactions(path)
    message = str(info.value)
    assert f"'{path}' has column 'item' 2 times (columns 2, 3)" in message and "its own name" in message


def test_manifest_with_the_label_column_twice_is_refused(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    path = tmp_path / "m.csv"
    path.write_text("path,label,label\na.png,x,y\nb.png,y,x\n")
    with pytest.raises(DataError) as info:
        read_dataset(str(path))
    message = str(info.value)
    assert f"CSV manifest '{path}' has column 'label' 2 times (columns 2, 3)" in message
    assert "Keep one 'path' and one 'label' column" in message


# ---------------------------------------------------------------------------------------------------------------
# 4. Unicode class names, and a batch larger than the data


def test_unicode_class_names_train_save_and_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Folders 'café' and '猫' (a batch of 10**6: one batch of the whole training split) train, are written to
    model.json and read back, and come out of predict as they were written."""
    data = _noise_folder(tmp_path / "data", ("café", "猫"))
    recipe = _recipe(tmp_path, data, "train: {epochs: 1, batch_size: 1000000}\n")
    rc, _, err = _cli(capsys, "run", recipe, "--out", tmp_path / "run")
    assert rc == 0, err
    folder = next(p.parent for p in (tmp_path / "run").rglob("model.json"))
    assert json.loads((folder / "model.json").read_text(encoding="utf-8"))["labels"] == ["café", "猫"]
    assert load_model(folder).labels == ["café", "猫"]
    rc, out, _ = _cli(capsys, "predict", folder, data / "猫" / "0.png", "--json")
    assert rc == 0 and {r["label"] for r in json.loads(out)[0]["top"]} == {"café", "猫"}
    assert _hidden_files(tmp_path / "run") == []


def test_unicode_labels_in_a_manifest_and_a_text_table(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    for name in ("1.png", "2.png", "3.png"):
        write_image(tmp_path / name)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n1.png,chien\n2.png,猫\n3.png,Ünïcødé\n", encoding="utf-8")
    ds = read_dataset(str(manifest))
    assert ds.classes == ["chien", "Ünïcødé", "猫"] and ds.labels.tolist() == [0, 2, 1]
    table = tmp_path / "t.csv"
    table.write_text("text,label\n" + "".join(f"bien {i},positif\nmal {i},négatif\n" for i in range(3)))
    assert read_text_file(table).classes == ["négatif", "positif"]


# ---------------------------------------------------------------------------------------------------------------
# 5. Absurd numbers


def test_a_huge_learning_rate_ends_in_a_training_error_naming_the_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _noise_folder(tmp_path / "data")
    recipe = _recipe(tmp_path, data, "train: {epochs: 3, lr: 1.0e+6, batch_size: 2, log_every: 1}\n")
    rc, _, err = _cli(capsys, "run", recipe, "--out", tmp_path / "run")
    assert rc == 1
    # whichever shows it first: a logged training loss, or the validation loss at the end of an epoch
    said = re.search(r"the (training|validation) loss became nan (before step|after epoch) \d+", err)
    assert said is not None, err
    assert "Lower the learning rate (train.lr=1e+06 now)" in err and "train.max_grad_norm" in err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed" and info["error"].startswith(f"TrainingError: {said.group(0)}")
    assert not list((tmp_path / "run").rglob("model.safetensors"))  # no model of the diverged training saved
    assert _hidden_files(tmp_path / "run") == []


def test_a_diverged_validation_loss_is_a_training_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _noise_folder(tmp_path / "data")
    recipe = _recipe(tmp_path, data, "train: {epochs: 2, lr: 1.0e+6, batch_size: 4}\n")
    rc, _, err = _cli(capsys, "run", recipe, "--out", tmp_path / "run")
    assert rc == 1 and "Lower the learning rate" in err


def _problems(tmp_path: Path, **sections: Any) -> list[str]:
    raw = {"name": "t", "source": TINY, "data": {"dataset": "mnist5k"}, **sections}
    return validate_recipe(raw)[1]


def test_a_huge_image_size_is_refused_at_validation_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    [problem] = _problems(tmp_path, data={"dataset": "mnist5k", "image_size": 100000})
    assert problem.startswith("data.image_size: 100000 pixels a side is over the limit of 4096")
    assert "120.0 GB as float32" in problem and "Leave image_size unset" in problem
    assert _problems(tmp_path, data={"dataset": "mnist5k", "image_size": 4096}) == []
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nsource: {name: timm:test_efficientnet, pretrained: false}\ndata: {dataset: mnist5k}\n")
    rc, out, err = _cli(capsys, "validate", recipe, "data.image_size=100000")
    assert rc in (1, 2) and "data.image_size: 100000 pixels a side" in out + err


def test_a_billion_epochs_validates_and_its_schedule_stays_finite(tmp_path: Path) -> None:
    from transferkit.engine.schedule import lr_factor

    assert _problems(tmp_path, train={"epochs": 10**9, "batch_size": 10**9}) == []
    total = 10**9 * 10**6  # a billion epochs of a million steps: Python ints, no overflow
    for kind in ("cosine", "onecycle", "constant"):
        factors = [lr_factor(s, total, 10**6, kind) for s in (0, 10**6 - 1, 10**6, total // 2, total - 1)]
        warmup = int(0.3 * total) if kind == "onecycle" else 10**6  # one-cycle warms up over 30% of training
        assert all(0.0 <= f <= 1.0 for f in factors) and factors[0] == pytest.approx(1 / warmup)
    assert lr_factor(total // 2, total, 0, "cosine") == pytest.approx(0.5)


@pytest.mark.parametrize("seed, key", [(-1, "seed"), (2**64, "seed"), (-1, "train.seed"), (2**70, "train.seed")])
def test_seeds_numpy_or_torch_would_refuse_are_refused_at_validation(tmp_path: Path, seed: int, key: str) -> None:
    sections = {"seed": seed} if key == "seed" else {"train": {"seed": seed}}
    [problem] = _problems(tmp_path, **sections)
    assert problem.startswith(f"{key}: a seed is an integer from 0 to 2**64-1") and f"(got {seed})" in problem
    edge = {"seed": 2**64 - 1} if key == "seed" else {"train": {"seed": 0}}
    assert _problems(tmp_path, **edge) == []


TRAIN_NUMBERS = {  # key: (the smallest accepted value, the words of the bound)
    "epochs": (1, "greater than or equal to 1"),
    "batch_size": (1, "greater than or equal to 1"),
    "lr": (None, "greater than 0"),
    "weight_decay": (0, "greater than or equal to 0"),
    "warmup_epochs": (0, "greater than or equal to 0"),
    "grad_accum": (1, "greater than or equal to 1"),
    "max_grad_norm": (None, "greater than 0"),
    "label_smoothing": (0, "greater than or equal to 0"),
    "early_stopping_patience": (1, "greater than or equal to 1"),
    "checkpoint_every": (0, "greater than or equal to 0"),
    "log_every": (1, "greater than or equal to 1"),
    "threads": (1, "greater than or equal to 1"),
}


@pytest.mark.parametrize("key", list(TRAIN_NUMBERS))
def test_zero_and_negative_train_numbers(tmp_path: Path, key: str) -> None:
    least, bound = TRAIN_NUMBERS[key]
    for value in (0, -1):
        problems = _problems(tmp_path, train={key: value})
        if least == 0 and value == 0:
            assert problems == []
        else:
            assert problems == [f"train.{key}: Input should be {bound} (got {value})"]


# ---------------------------------------------------------------------------------------------------------------
# 6. An output folder that cannot be written


def test_an_output_folder_that_cannot_be_written_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """chmod 0500 does not stop root (the tests' machine): the kernel's EACCES is injected into mkdir and open."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir, real_open = os.mkdir, os.open

    def inside(p: Any) -> bool:
        return os.path.abspath(p).startswith(str(locked) + os.sep)

    def mkdir(p: Any, *args: Any, **kwargs: Any) -> None:
        if inside(p):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        real_mkdir(p, *args, **kwargs)

    def open_(p: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if inside(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    recipe = _recipe(tmp_path, _noise_folder(tmp_path / "data"), "train: {epochs: 1}\n")
    try:
        rc, _, err = _cli(capsys, "run", recipe, "--out", locked / "run")
    except PermissionError:
        pytest.fail("PermissionError escaped transferkit.cli.main")
    assert rc == 1 and str(locked) in err and "--out" in err
    assert os.listdir(locked) == []


# ---------------------------------------------------------------------------------------------------------------
# 7. What validate refuses before training


def test_validate_refuses_an_unknown_timm_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nsource: {name: timm:resnet_bogus, pretrained: false}\ndata: {dataset: mnist5k}\n")
    rc, out, err = _cli(capsys, "validate", recipe)
    assert rc == 1 and out == ""
    assert "source.name: timm has no model 'resnet_bogus'. Similar timm names:" in err and "cspresnet50" in err
    [problem] = validate_recipe({"name": "t", "source": "torchvision:resnet5", "data": {"dataset": "mnist5k"}})[1]
    assert problem == "source.name: torchvision has no model 'resnet5'. Did you mean 'resnet50'? " + (
        "(torchvision.models.list_models())"
    )


def test_validate_refuses_freeze_groups_beyond_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = {"strategy": {"name": "freeze", "groups": 99}}
    compare = [
        {"strategy": {"name": "freeze", "groups": 7}, "label": "f7"},
        {"strategy": {"name": "freeze", "groups": 6}, "label": "f6"},
    ]
    problems = _problems(tmp_path, train=train, compare=compare)
    assert problems == [
        f"{key}: freeze groups={k} is more than 'timm:test_efficientnet' has: 6 backbone layer groups and a head; "
        "give groups from 1 to 6 (6 freezes the whole backbone, as linear_probe does)"
        for key, k in (("train.strategy", 99), ("compare.0.strategy", 7))
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\nsource: {name: timm:test_efficientnet, pretrained: false}\ndata: {dataset: mnist5k}\n"
        "train: {strategy: {name: freeze, groups: 99}}\n"
    )
    rc, _, err = _cli(capsys, "validate", recipe)
    assert rc == 1 and "freeze groups=99 is more than" in err


def test_validate_refuses_an_empty_data_folder(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    (tmp_path / "empty").mkdir()
    [problem] = _problems(tmp_path, data={"dataset": str(tmp_path / "empty")})
    assert problem == (
        f"data.dataset: '{tmp_path / 'empty'}' has no class sub-folders (it is empty); expected "
        f"{tmp_path / 'empty'}/CLASS_NAME/FILE: make one sub-folder per class (at least 2) and put the examples of "
        "that class in it"
    )
    write_image(tmp_path / "loose" / "x.png")
    [problem] = _problems(tmp_path, data={"dataset": str(tmp_path / "loose")})
    assert "has no class sub-folders (it holds 1 file(s) directly, e.g. 'x.png')" in problem


def test_validate_refuses_unknown_data_classes(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    folder = _noise_folder(tmp_path / "d", ("cat", "dog"), per_class=1)
    [problem] = _problems(tmp_path, data={"dataset": str(folder), "classes": ["cat", "dgo"]})
    assert problem == (
        f"data.classes: names ['dgo'], not classes of '{folder}'. Did you mean 'dog'? Its classes are: cat, dog; "
        "list only these (or leave data.classes unset to keep every class)"
    )
    assert _problems(tmp_path, data={"dataset": str(folder), "classes": ["dog", "cat"]}) == []
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nd/cat/0.png,cat\nd/dog/0.png,dog\n")
    [problem] = _problems(tmp_path, data={"dataset": str(manifest), "classes": ["cat", "bird"]})
    assert problem.startswith("data.classes: names ['bird'], not classes of") and "cat, dog" in problem
    table = tmp_path / "t.csv"
    table.write_text("text,y\ngood,pos\nbad,neg\n")
    [problem] = _problems(tmp_path, data={"dataset": str(table), "label_column": "y", "classes": ["pos", "neutral"]})
    assert problem.startswith("data.classes: names ['neutral']") and "neg, pos" in problem
