"""Prediction from an exported folder without torch (``transferkit.exported``), against the torch path.

The preprocessing is held to the torch path's batches (``make_batch``) on real inputs: MNIST-5k digits and colour,
transparent and 16-bit images for Lite0; Rotten Tomatoes reviews for MiniLM's tokenizer; FSDD frames for seq:gru.
Predictions are held to ``transferkit.predict.Predictor``'s rows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from transferkit.compress.export import export_onnx
from transferkit.config import SourceSpec
from transferkit.data import read_dataset
from transferkit.data.modality import make_batch
from transferkit.errors import CompressError, DataError, DataNotFoundError
from transferkit.exported import OnnxPredictor, is_exported
from transferkit.models.base import SourceModel, save_model
from transferkit.predict import Predictor
from transferkit.sources import load_source
from transferkit.transfer import build_target

MNIST = [str(i) for i in range(10)]


def spread_head(model: SourceModel) -> SourceModel:
    """Head weights of a trained model's scale (a fresh head's logits all but tie, and top-1 would be noise)."""
    torch.manual_seed(1)
    nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def exported(model: SourceModel, items: list[Any], folder: Path) -> Path:
    export_onnx(model, [make_batch(model, items[i : i + 10]) for i in range(0, len(items), 10)], folder)
    return folder


@pytest.fixture(scope="module")
def lite0(mnist5k, tmp_path_factory) -> tuple[SourceModel, Path]:
    model = build_target(load_source(SourceSpec(name="efficientnet_lite0")), MNIST)
    model.preprocess = {**model.preprocess, "input_size": [3, 64, 64]}
    spread_head(model)
    return model, exported(model, list(mnist5k.items[::250]), tmp_path_factory.mktemp("lite0") / "onnx")


@pytest.fixture(scope="module")
def reviews() -> Any:
    return read_dataset("rotten_tomatoes", modality="text")


@pytest.fixture(scope="module")
def minilm(reviews, tmp_path_factory) -> tuple[SourceModel, Path]:
    model = build_target(load_source(SourceSpec(name="all-minilm-l6-v2")), reviews.classes)
    model.preprocess = {**model.preprocess, "max_length": 16}
    spread_head(model)
    return model, exported(model, list(reviews.items[:20]), tmp_path_factory.mktemp("minilm") / "onnx")


@pytest.fixture(scope="module")
def fsdd() -> Any:
    return read_dataset("fsdd_digits", modality="frames")


@pytest.fixture(scope="module")
def gru(fsdd, tmp_path_factory) -> tuple[SourceModel, Path]:
    torch.manual_seed(0)
    model = spread_head(build_target(load_source(SourceSpec(name="seq:gru", pretrained=False)), MNIST))
    return model, exported(model, list(fsdd.items[:20]), tmp_path_factory.mktemp("gru") / "onnx")


def torch_batch(preprocess: dict[str, Any], inputs: list[Any], processor: Any = None) -> Any:
    """What the torch path makes of ``inputs`` for a model of this preprocessing."""

    class Stub:
        modality = preprocess.get("modality", "image")

    stub = Stub()
    stub.preprocess, stub.processor = preprocess, processor  # type: ignore[attr-defined]
    return make_batch(stub, inputs)


def with_preprocess(folder: Path, tmp: Path, **changes: Any) -> Path:
    """A copy of an exported folder whose model.json's preprocessing is changed (the graph is not run)."""
    copy = tmp / f"copy-{len(list(tmp.iterdir()))}"
    shutil.copytree(folder, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["preprocess"] = {**meta["preprocess"], **changes}
    (copy / "model.json").write_text(json.dumps(meta))
    return copy


def colour_images(folder: Path) -> list[Path]:
    """Real colour, transparent, palette and 16-bit grey images, not square, written with PIL."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:37, 0:50]
    rgb = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1).astype(np.uint8) + rng.integers(0, 40, (37, 50, 3), np.uint8)
    Image.fromarray(rgb).save(folder / "colour.png")
    Image.fromarray(rgb).save(folder / "colour.jpg", quality=85)
    rgba = np.concatenate([rgb, (xx * 5).astype(np.uint8)[..., None]], -1)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray((xx * 1300 + yy * 7).astype(np.uint16)).save(folder / "grey16.png")
    return sorted(folder.iterdir())


# ---------------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.slow  # the Lite0 export: ~12 s
def test_image_preprocessing_equals_the_torch_path(lite0, mnist5k, tmp_path) -> None:
    model, folder = lite0
    predictor = OnnxPredictor(folder)
    digits = list(mnist5k.items[:20])
    assert np.abs(predictor.batch(digits)["pixel_values"] - make_batch(model, digits).numpy()).max() < 1e-5
    files = colour_images(tmp_path / "images")
    for f in files:
        assert np.abs(predictor.batch([f])["pixel_values"] - make_batch(model, [f]).numpy()).max() < 1e-5, f.name
    pil = [Image.open(files[0]), Image.open(files[2])]
    assert np.abs(predictor.batch(pil)["pixel_values"] - make_batch(model, pil).numpy()).max() < 1e-5
    # other preprocessings than Lite0's: one grey channel and bilinear; nearest at another size and normalisation
    for changes in (
        {"input_size": [1, 40, 40], "interpolation": "bilinear", "mean": [0.1307], "std": [0.3081]},
        {"input_size": [3, 24, 24], "interpolation": "nearest", "mean": [0.485, 0.456, 0.406], "std": [0.2, 0.3, 0.4]},
    ):
        variant = OnnxPredictor(with_preprocess(folder, tmp_path, **changes))
        pre = {**model.preprocess, **changes}
        for inputs in (digits[:5], files):
            ours = variant.batch(inputs)["pixel_values"]
            assert ours.shape == (len(inputs), *pre["input_size"])
            assert np.abs(ours - torch_batch(pre, inputs).numpy()).max() < 1e-5


@pytest.mark.slow  # the MiniLM export: ~11 s
def test_text_tokens_equal_the_transformers_tokenizer(minilm, reviews) -> None:
    model, folder = minilm
    predictor = OnnxPredictor(folder)
    texts = list(reviews.items[100:140]) + ["café naïve 😀 — déjà vu", "short", "UPPER lower 123 !!! ???"]
    assert max(len(model.processor(t)["input_ids"]) for t in texts) > 16  # some are truncated at max_length
    for chunk in (texts, texts[-3:], texts[:1]):
        ours, theirs = predictor.batch(chunk), make_batch(model, chunk)
        assert sorted(ours) == sorted(theirs) == ["attention_mask", "input_ids", "token_type_ids"]
        for key in ours:
            assert ours[key].dtype == np.int64
            np.testing.assert_array_equal(ours[key], theirs[key].numpy(), err_msg=key)


@pytest.mark.slow  # the seq:gru export: ~16 s
def test_frames_preprocessing_equals_the_torch_path(gru, fsdd, tmp_path) -> None:
    model, folder = gru
    predictor = OnnxPredictor(folder)
    items = list(fsdd.items[30:50])
    np.save(tmp_path / "one.npy", fsdd.items[60])
    for inputs in (items, [tmp_path / "one.npy", str(tmp_path / "one.npy"), items[0]]):
        ours, theirs = predictor.batch(inputs), make_batch(model, inputs)
        assert np.abs(ours["frames"] - theirs["frames"].numpy()).max() < 1e-6
        np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"].numpy())


# ---------------------------------------------------------------------------------------------------- predictions


def assert_same_rows(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], key: str) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert list(a) == list(b) == [key, "top"]
        assert a[key] == b[key]
        assert a["top"][0]["label"] == b["top"][0]["label"]
        assert [list(t) for t in a["top"]] == [["label", "probability"]] * len(b["top"])
        assert isinstance(a["top"][0]["probability"], float)
        top = {t["label"]: t["probability"] for t in b["top"]}
        for t in a["top"]:  # the same probabilities (the order of near-ties below top-1 may differ)
            if t["label"] in top:
                assert abs(t["probability"] - top[t["label"]]) < 1e-4


@pytest.mark.slow
def test_image_predictions_equal_the_torch_predictor(lite0, mnist5k, tmp_path) -> None:
    model, folder = lite0
    files = []
    for i in range(0, 5000, 125):  # 40 digits as PNG files: more than one batch of 32
        files.append(tmp_path / f"digit{i}.png")
        Image.fromarray(mnist5k.items[i]).save(files[-1])
    inputs: list[Any] = [str(f) for f in files[:36]] + [files[36], mnist5k.items[0], Image.open(files[38])]
    ours, theirs = OnnxPredictor(folder).predict(inputs, top_k=3), Predictor(model).predict(inputs, top_k=3)
    assert_same_rows(ours, theirs, "file")
    assert ours[0]["file"] == str(files[0]) and ours[37]["file"] == "<image 37>"
    probs = OnnxPredictor(folder).predict_proba(inputs)
    assert probs.shape == (39, 10) and probs.dtype == np.float32
    assert np.abs(probs - Predictor(model).predict_proba(inputs).numpy()).max() < 1e-4
    assert len({r["top"][0]["label"] for r in ours}) > 1  # the head tells the digits apart: top-1 is not constant
    assert [len(r["top"]) for r in OnnxPredictor(folder).predict(inputs[:2], top_k=20)] == [10, 10]


@pytest.mark.slow
def test_text_and_frames_predictions_equal_the_torch_predictor(minilm, gru, reviews, fsdd) -> None:
    model, folder = minilm
    texts = list(reviews.items[200:240])
    assert_same_rows(OnnxPredictor(folder).predict(texts, 2), Predictor(model).predict(texts, 2), "text")
    assert OnnxPredictor(folder).predict(texts[:1])[0]["text"] == texts[0]
    assert OnnxPredictor(folder).labels == ["fresh", "rotten"] and OnnxPredictor(folder).modality == "text"
    model, folder = gru
    items = list(fsdd.items[100:140])
    assert_same_rows(OnnxPredictor(folder).predict(items, 3), Predictor(model).predict(items, 3), "file")
    assert OnnxPredictor(folder).labels == MNIST and OnnxPredictor(folder).modality == "frames"


# ---------------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.slow
def test_bad_inputs_raise_what_the_torch_predictor_raises(lite0, minilm, gru, tmp_path, write_truncated_jpeg) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    truncated = write_truncated_jpeg(tmp_path / "cut.jpg")
    cases = [
        (lite0, [tmp_path / "missing.png"], DataNotFoundError, "image '.*missing.png' does not exist"),
        (lite0, [str(tmp_path / "notes.png")], DataError, "image '.*notes.png' cannot be read"),
        (lite0, [truncated], DataError, "image '.*cut.jpg' cannot be read"),
        (minilm, ["fine", "  "], DataError, "non-empty strings; input 1 is '  '"),
        (gru, [tmp_path / "missing.npy"], DataNotFoundError, "frame features file '.*missing.npy' does not exist"),
        (gru, [np.zeros(13, dtype=np.float32)], DataError, r"non-empty \(time, features\) array; got shape \(13,\)"),
    ]
    for (model, folder), inputs, error, message in cases:
        with pytest.raises(error, match=message):
            Predictor(model).predict(inputs)
        with pytest.raises(error, match=message):
            OnnxPredictor(folder).predict(inputs)
    with pytest.raises(DataError, match="top_k=0: give 1 or more"):
        OnnxPredictor(lite0[1]).predict([tmp_path / "notes.png"], top_k=0)
    with pytest.raises(DataError, match=r"the inputs do not fit the exported frames model \(frames \(1, 4, 7\)"):
        OnnxPredictor(gru[1]).predict([np.ones((4, 7), dtype=np.float32)])


@pytest.mark.slow
def test_folders_that_are_not_exports_are_named(lite0, tmp_path, tiny_model) -> None:
    _, folder = lite0
    assert is_exported(folder)
    saved = save_model(tiny_model(), tmp_path / "saved")
    assert not is_exported(saved) and not is_exported(tmp_path / "nowhere")
    with pytest.raises(
        CompressError, match=r"'.*saved' is not an exported model folder: it has no model.onnx.*export_onnx"
    ):
        OnnxPredictor(saved)
    with pytest.raises(DataNotFoundError, match="exported model folder '.*nowhere' does not exist"):
        OnnxPredictor(tmp_path / "nowhere")
    audio = with_preprocess(folder, tmp_path, modality="audio")
    with pytest.raises(CompressError, match="audio model .* transformers feature extractor .* transferkit.predict"):
        OnnxPredictor(audio)
    cut = with_preprocess(folder, tmp_path)
    data = (cut / "model.onnx").read_bytes()
    (cut / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(CompressError, match="ONNX Runtime cannot load '.*model.onnx'.*export the model again"):
        OnnxPredictor(cut)
    (cut / "model.json").write_text("{not json")
    with pytest.raises(CompressError, match="model.json' is not valid JSON"):
        OnnxPredictor(cut)


# ---------------------------------------------------------------------------------------------------- without torch


@pytest.mark.slow
def test_exported_prediction_runs_without_importing_torch(lite0, minilm, mnist5k, tmp_path) -> None:
    files = []
    for i in (0, 1500, 4999):
        files.append(str(tmp_path / f"d{i}.png"))
        Image.fromarray(mnist5k.items[i]).save(files[-1])
    code = (
        "import json, sys\n"
        "import transferkit.exported as e\n"
        "rows = e.OnnxPredictor(sys.argv[1]).predict(json.loads(sys.argv[2]), top_k=1)\n"
        "rows += e.OnnxPredictor(sys.argv[3]).predict(['a wonderful, moving film', 'a dull mess'], top_k=1)\n"
        "heavy = [m for m in ('torch', 'torchvision', 'timm', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(json.dumps([r['top'][0]['label'] for r in rows]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(lite0[1]), json.dumps(files), str(minilm[1])],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    labels = json.loads(run.stdout.strip().splitlines()[-1])
    expected = [r["top"][0]["label"] for r in Predictor(lite0[0]).predict(files, 1)]
    expected += [
        r["top"][0]["label"] for r in Predictor(minilm[0]).predict(["a wonderful, moving film", "a dull mess"], 1)
    ]
    assert labels == expected
