"""Weights from other frameworks: ONNX files written by torch.onnx / onnx, Keras files written by Keras 3 itself.

Keras runs here on its PyTorch backend (``KERAS_BACKEND=torch``), so genuine ``.keras`` and ``.h5`` files are written
without TensorFlow; transferkit reads them with h5py only.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from transferkit.errors import SourceError
from transferkit.foreign import read_keras_weights, read_onnx_weights
from transferkit.io import load_state_dict
from transferkit.transfer.api import transfer

# Keras 3 on the torch backend converts tensors with np.array(x) (its own code, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


class SmallCNN(nn.Module):
    """conv + BN + ReLU + pool + linear."""

    def __init__(self, bn: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
        layers += [nn.BatchNorm2d(8)] if bn else []
        self.features = nn.Sequential(*layers, nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def _random_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN()
    bn = model.features[1]
    with torch.no_grad():  # BN statistics and affine far from the defaults, so a lost or swapped tensor shows
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 3.0)
    return model.eval()


def _export(model: nn.Module, path: Path, exporter: str, **kwargs: Any) -> Path:
    x = torch.randn(1, 3, 8, 8)
    if exporter == "legacy":
        torch.onnx.export(model, (x,), str(path), dynamo=False, **kwargs)
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False, **kwargs)
    return path


# ------------------------------------------------------------------------------------------------------------ ONNX


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("exporter", "kwargs"), [("legacy", {"do_constant_folding": False}), ("dynamo", {"optimize": False})]
)
def test_onnx_export_maps_onto_a_fresh_twin_with_identical_outputs(tmp_path, exporter, kwargs):
    source = _random_cnn()
    path = _export(source, tmp_path / "cnn.onnx", exporter, **kwargs)

    weights = read_onnx_weights(path)
    expected = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(weights) == set(expected)
    for k, v in expected.items():
        assert torch.equal(weights[k], v), k

    target, report = transfer(path, SmallCNN())  # a path: read through transferkit.io.load_state_dict
    assert report["summary"]["coverage"] == 1.0
    assert report["summary"]["matched_by"]["names"] == len(expected)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), source(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_identity_copies_of_deduplicated_initializers_keep_their_names(tmp_path):
    # a fresh BatchNorm: weight == running_var (ones), bias == running_mean (zeros); the legacy exporter stores each
    # pair once and feeds the second name through an Identity node
    torch.manual_seed(1)
    source = SmallCNN().eval()
    path = _export(source, tmp_path / "fresh.onnx", "legacy", do_constant_folding=False)
    import onnx

    graph = onnx.load(str(path)).graph
    assert "features.1.running_var" not in {i.name for i in graph.initializer}  # the situation under test
    assert any(n.op_type == "Identity" for n in graph.node)

    weights = load_state_dict(path)
    assert torch.equal(weights["features.1.running_var"], torch.ones(8))
    assert torch.equal(weights["features.1.running_mean"], torch.zeros(8))
    assert len(weights) == 8


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_folded_batchnorm_is_named_after_its_node_and_maps_onto_a_bn_free_twin(tmp_path):
    # the legacy exporter's default folds BN into the convolution: the folded kernel gets an 'onnx::Conv_N' name;
    # the reader names it after its node (/features/features.0/Conv -> features.0.weight)
    source = _random_cnn(2)
    path = _export(source, tmp_path / "folded.onnx", "legacy")
    weights = read_onnx_weights(path)
    assert list(weights) == ["fc.weight", "fc.bias", "features.0.weight", "features.0.bias"]

    target, report = transfer(path, SmallCNN(bn=False))
    assert report["summary"]["coverage"] == 1.0
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), source(x), rtol=1e-5, atol=1e-5)


def test_onnx_gemm_without_transb_is_transposed_to_pytorch_layout(tmp_path):
    # a graph as other converters write it: y = x @ W + b with W stored (in, out) under a non-PyTorch name
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "dense/kernel:0", "dense/bias:0"], ["y"], name="model/dense/Gemm", transB=0)
    inits = [numpy_helper.from_array(w, "dense/kernel:0"), numpy_helper.from_array(b, "dense/bias:0")]
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        inits,
    )
    model = helper.make_model(graph)
    onnx.checker.check_model(model)
    path = tmp_path / "gemm.onnx"
    onnx.save(model, str(path))

    weights = read_onnx_weights(path)
    assert list(weights) == ["dense.weight", "dense.bias"]
    assert weights["dense.weight"].shape == (3, 4)

    linear, report = transfer(path, nn.Linear(4, 3))
    assert report["summary"]["coverage"] == 1.0
    x = rng.normal(size=(2, 4)).astype(np.float32)
    (y,) = ReferenceEvaluator(model).run(None, {"x": x})
    with torch.no_grad():
        np.testing.assert_allclose(linear(torch.from_numpy(x)).numpy(), y, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------- Keras


def _keras() -> Any:
    os.environ["KERAS_BACKEND"] = "torch"  # read when keras is first imported: no TensorFlow needed
    import keras

    assert keras.backend.backend() == "torch"
    return keras


def _randomize(model: Any, seed: int) -> None:
    """Non-trivial weights everywhere, positive moving variances."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, var = weights
            new = [
                rng.uniform(0.5, 2.0, gamma.shape),
                rng.normal(size=beta.shape),
                rng.normal(size=mean.shape),
                rng.uniform(0.5, 3.0, var.shape),
            ]
        else:
            new = [rng.normal(scale=0.5, size=w.shape) for w in weights]
        layer.set_weights([w.astype(np.float32) for w in new])


@pytest.fixture(scope="module")
def keras_cnn(tmp_path_factory) -> tuple[Any, dict[str, Path]]:
    """A Keras CNN (Conv2D, BN, DepthwiseConv2D x2, BN, Dense) saved in every format Keras 3 writes."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, padding="same", name="stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU()(x)
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    x = layers.BatchNormalization(name="dw_bn")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(5, name="classifier")(x))
    _randomize(model, 0)
    d = tmp_path_factory.mktemp("keras")
    paths = {"keras": d / "cnn.keras", "weights_h5": d / "cnn.weights.h5", "legacy_h5": d / "cnn.h5"}
    model.save(paths["keras"])
    model.save_weights(paths["weights_h5"])
    model.save(paths["legacy_h5"])  # Keras 3 still writes the legacy HDF5 model format for a .h5 name
    return model, paths


def _torch_twin() -> nn.Sequential:
    """The Keras CNN in PyTorch: channels first, 'same' = padding 1 for 3x3 at stride 1, Keras's BN epsilon 1e-3."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6, eps=1e-3),
        nn.ReLU(),
        nn.Conv2d(6, 12, 3, padding=1, groups=6),
        nn.BatchNorm2d(12, eps=1e-3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )


@pytest.mark.parametrize("fmt", ["keras", "weights_h5", "legacy_h5"])
def test_keras_file_converts_to_pytorch_with_the_keras_outputs(keras_cnn, fmt):
    model, paths = keras_cnn
    weights = read_keras_weights(paths[fmt])
    assert [(k, tuple(v.shape)) for k, v in weights.items()] == [
        ("stem_conv.weight", (6, 3, 3, 3)),
        ("stem_conv.bias", (6,)),
        ("stem_bn.weight", (6,)),
        ("stem_bn.bias", (6,)),
        ("stem_bn.running_mean", (6,)),
        ("stem_bn.running_var", (6,)),
        ("dw.weight", (12, 1, 3, 3)),
        ("dw.bias", (12,)),
        ("dw_bn.weight", (12,)),
        ("dw_bn.bias", (12,)),
        ("dw_bn.running_mean", (12,)),
        ("dw_bn.running_var", (12,)),
        ("classifier.weight", (5, 12)),
        ("classifier.bias", (5,)),
    ]
    kernel = model.get_layer("stem_conv").get_weights()[0]  # (kh, kw, in, out)
    assert torch.equal(weights["stem_conv.weight"][4, 1], torch.from_numpy(kernel[:, :, 1, 4]))
    var = model.get_layer("dw_bn").get_weights()[3]
    assert torch.equal(weights["dw_bn.running_var"], torch.from_numpy(var))

    target, report = transfer(paths[fmt], _torch_twin())  # names differ entirely: the structure pass aligns them
    assert report["summary"]["coverage"] == 1.0
    assert report["summary"]["matched_by"] == {"names": 0, "rules": 0, "structure": 14}
    assert report["summary"]["transforms"] == {"copied": 14}
    assert report["ambiguities"] == []

    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)  # channels last, as Keras takes it
    expected = np.asarray(model.predict(x, verbose=0))
    with torch.no_grad():
        got = target.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(expected).max() > 0.1  # the comparison is not between two near-zero outputs
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_keras_embedding_and_layer_norm_convert(tmp_path):
    keras = _keras()
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(10, 4, name="tok")(inputs)
    x = keras.layers.LayerNormalization(name="norm")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(x))
    _randomize(model, 3)
    model.save(tmp_path / "text.keras")

    weights = read_keras_weights(tmp_path / "text.keras")
    assert list(weights) == ["tok.weight", "norm.weight", "norm.bias", "out.weight", "out.bias"]
    target = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4, eps=1e-3), nn.Linear(4, 3))
    target, report = transfer(tmp_path / "text.keras", target)
    assert report["summary"]["coverage"] == 1.0
    ids = np.random.default_rng(4).integers(0, 10, size=(2, 5)).astype(np.int32)
    expected = np.asarray(model.predict(ids, verbose=0))
    with torch.no_grad():
        np.testing.assert_allclose(target(torch.from_numpy(ids).long()).numpy(), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- corrupt files


def _truncate(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


@pytest.mark.parametrize("name", ["garbage.onnx", "garbage.h5", "garbage.keras"])
def test_corrupt_foreign_file_is_a_source_error_naming_it(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x08\x96\x01 this is not what the suffix promises " * 20)
    with pytest.raises(SourceError, match=re.escape(f"'{path}'")):
        load_state_dict(path)
    with pytest.raises(SourceError, match=re.escape(f"'{path}'")):
        transfer(path, SmallCNN())  # fails before building or writing anything


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_truncated_real_files_are_source_errors(tmp_path, keras_cnn):
    _, paths = keras_cnn
    onnx_path = _export(_random_cnn(), tmp_path / "whole.onnx", "legacy", do_constant_folding=False)
    for src in (onnx_path, paths["keras"], paths["weights_h5"], paths["legacy_h5"]):
        bad = _truncate(src, tmp_path / f"cut_{src.name}")
        with pytest.raises(SourceError, match=re.escape(f"'{bad}'")):
            load_state_dict(bad)


def test_keras_zip_without_weights_names_what_it_holds(tmp_path):
    path = tmp_path / "empty.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", "{}")
    with pytest.raises(SourceError, match=r"empty\.keras' is a zip without 'model\.weights\.h5'.*config\.json"):
        read_keras_weights(path)


def test_keras_batchnorm_without_scale_needs_the_config(tmp_path):
    keras = _keras()
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, use_bias=False, name="d"),
            keras.layers.BatchNormalization(scale=False, name="bn"),
        ]
    )
    model.save(tmp_path / "noscale.keras")
    model.save_weights(tmp_path / "noscale.weights.h5")

    weights = read_keras_weights(tmp_path / "noscale.keras")  # config.json says: no gamma
    assert list(weights) == ["d.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    assert torch.equal(weights["bn.running_var"], torch.ones(3))
    with pytest.raises(SourceError, match=r"noscale\.weights\.h5': layer 'bn': a batchnorm layer with 3 variables"):
        read_keras_weights(tmp_path / "noscale.weights.h5")  # no config: gamma or beta? refused, not guessed
