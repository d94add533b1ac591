"""int8 quantization with torchao (transferkit.compress.quantize): agreement with the float model on real data,
int8 weights, saving as plain tensors and reloading with equal logits, evaluate/Predictor on the reloaded model,
and every refusal."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import small_mnist, tiny_source, tiny_text_folder
from safetensors import safe_open

import transferkit as tk
from transferkit.compress.quantize import QuantizeResult, quantize
from transferkit.data.prepare import prepare_data
from transferkit.engine.loop import make_loader
from transferkit.errors import CompressError, DataError, SourceError
from transferkit.models.base import load_model, save_model
from transferkit.models.quantized import QUANTIZED_FORMAT, StaticInt8Backbone
from transferkit.pipeline import evaluate
from transferkit.predict import Predictor
from transferkit.recipe import DataConfig


def _features_and_labels(model, dataset):
    feats, labels = [], []
    with torch.no_grad():
        for x, y in make_loader(dataset, batch_size=64):
            feats.append(model.features(x))
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _fit_head(model, dataset) -> None:
    """A ridge-regression head on the float features of ``dataset``: logits that separate the classes, so that
    top-1 agreement measures the quantization and not ties between near-equal random logits."""
    model.eval()
    feats, labels = _features_and_labels(model, dataset)
    x = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
    y = torch.nn.functional.one_hot(labels, model.head.out_features).double() * 2 - 1
    ridge = 1e-2 * x.pow(2).sum() / x.shape[1] * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(x.T @ x + ridge, x.T @ y)
    with torch.no_grad():
        model.head.weight.copy_(w[:-1].T.float())
        model.head.bias.copy_(w[-1].float())


def _batches(dataset, batch_size: int = 32):
    return [x for x, _ in make_loader(dataset, batch_size=batch_size)]


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(x) for x in batches])


@pytest.fixture(scope="module")
def text_target(tmp_path_factory):
    """A tiny random BERT (the hf_text family, as MiniLM) with a head fitted on real rotten_tomatoes reviews."""
    folder = tiny_text_folder(tmp_path_factory.mktemp("tiny_bert"))
    source = tk.load_source(f"hf:{folder}")
    cfg = DataConfig(dataset="rotten_tomatoes", per_class=48, val_per_class=2, test_size=64, max_length=48)
    data = prepare_data(cfg, source, seed=0)
    target = tk.build_target(source, data.classes)
    target.preprocess = data.preprocess
    _fit_head(target, data.dataset("train"))
    return target, data


@pytest.fixture(scope="module")
def text_int8(text_target) -> QuantizeResult:
    target, data = text_target
    return quantize(target, method="int8_dynamic", example=_batches(data.dataset("test"))[0])


@pytest.fixture(scope="module")
def image_target():
    """The tiny timm EfficientNet at 32 px with a head fitted on real MNIST-5k digits."""
    data = small_mnist(per_class=8, test_size=40, image_size=32)
    target = tk.build_target(tiny_source(), data.classes)
    target.preprocess = data.preprocess
    _fit_head(target, data.dataset("train"))
    return target, data


@pytest.fixture(scope="module")
def image_int8(image_target) -> QuantizeResult:
    target, data = image_target
    return quantize(target, method="int8_static", calibration=make_loader(data.dataset("train"), batch_size=16))


# ---------------------------------------------------------------------------------------------------- int8_dynamic


def test_int8_dynamic_agrees_with_float_on_real_reviews(text_target, text_int8):
    target, data = text_target
    batches = _batches(data.dataset("test"))
    ref, out = _logits(target, batches), _logits(text_int8.model, batches)
    assert ref.shape == (64, 2)
    agreement = float((ref.argmax(1) == out.argmax(1)).float().mean())
    assert agreement >= 0.95
    assert float((ref - out).abs().max()) < 0.05 * float(ref.abs().max())
    assert not torch.equal(ref, out)  # it did change: int8 products, not the float model again
    check = text_int8.record["check"]
    assert check["examples"] == 32 and check["top1_agreement"] >= 0.95 and 0 < check["max_abs_logit_diff"] < 0.05


def test_int8_dynamic_gives_the_backbone_linears_int8_weights_and_keeps_the_head_float(text_target, text_int8):
    from torchao.quantization import Int8Tensor

    target, _ = text_target
    model, record = text_int8.model, text_int8.record
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert record["layers"] == [n for n in linears if n.startswith("backbone.")]
    assert len(record["layers"]) == 12  # 2 layers x (query, key, value, attention output, intermediate, output)
    for name in record["layers"]:
        w = model.get_submodule(name).weight
        assert isinstance(w, Int8Tensor)
        assert w.qdata.dtype == torch.int8 and w.qdata.shape == w.shape
        assert w.scale.dtype == torch.float32 and w.scale.shape == (w.shape[0], 1)  # one scale per output channel
        assert w.act_quant_kwargs is not None  # activations quantized at each call
        assert int(w.qdata.abs().max()) == 127  # symmetric: each row's largest weight maps to +-127
    assert type(model.head.weight) is torch.nn.Parameter and model.head.weight.dtype == torch.float32
    assert torch.equal(model.head.weight, target.head.weight)
    assert record["int8_weights"] == sum(model.get_submodule(n).weight.numel() for n in record["layers"])
    assert record["format"] == QUANTIZED_FORMAT and record["method"] == "int8_dynamic" and record["head"] == "float32"
    # the float model is left as it was
    assert all(type(target.get_submodule(n).weight) is torch.nn.Parameter for n in record["layers"])


def test_int8_text_model_saves_plain_tensors_and_reloads_with_equal_logits(text_target, text_int8, tmp_path):
    target, data = text_target
    save_model(text_int8.model, tmp_path / "m", extra={"quantized": text_int8.record})
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["quantized"] == json.loads(json.dumps(text_int8.record))
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        query = "backbone.model.encoder.layer.0.attention.self.query.weight"
        assert f"{query}.qdata" in keys and f"{query}.scale" in keys and query not in keys
        assert f.get_tensor(f"{query}.qdata").dtype == torch.int8
        assert f.get_tensor("head.weight").dtype == torch.float32

    save_model(target, tmp_path / "float")
    float_bytes, int8_bytes = ((tmp_path / f / "model.safetensors").stat().st_size for f in ("float", "m"))
    # 3 bytes fewer per int8 weight, 4 more per output channel (its scale); the float embeddings stay
    scales = sum(text_int8.model.get_submodule(n).weight.shape[0] for n in text_int8.record["layers"])
    assert float_bytes - int8_bytes == pytest.approx(3 * text_int8.record["int8_weights"] - 4 * scales, abs=4096)

    loaded = load_model(tmp_path / "m")
    batches = _batches(data.dataset("test"))
    assert torch.allclose(_logits(loaded, batches), _logits(text_int8.model, batches), atol=1e-5, rtol=0)
    assert type(loaded.get_submodule(query[: -len(".weight")]).weight).__name__ == "Int8Tensor"

    test = data.dataset("test")
    assert evaluate(loaded, test) == evaluate(text_int8.model, test)
    assert evaluate(loaded, test)["accuracy"] == pytest.approx(evaluate(target, test)["accuracy"], abs=0.05)
    texts = list(data.items("test"))
    predictor = Predictor(loaded)
    assert predictor.labels == data.classes and predictor.modality == "text"
    got = predictor.predict_proba(texts)  # more than one batch: the engine's inference pass
    assert got.shape == (64, 2)
    assert torch.allclose(got, Predictor(text_int8.model).predict_proba(texts), atol=1e-6)
    assert predictor.predict(texts[:1], top_k=1)[0]["top"][0]["label"] in data.classes
    # saved again from the reloaded model: the same file contents
    save_model(loaded, tmp_path / "again", extra={"quantized": meta["quantized"]})
    again = load_model(tmp_path / "again")
    assert torch.equal(_logits(again, batches[:1]), _logits(loaded, batches[:1]))


def test_int8_weight_only_keeps_float_activations_and_reloads(text_target, tmp_path):
    target, data = text_target
    result = quantize(target, method="int8_weight_only")
    w = result.model.get_submodule(result.record["layers"][0]).weight
    assert w.qdata.dtype == torch.int8 and w.act_quant_kwargs is None
    assert result.record["activations"] == "float" and "check" not in result.record
    batches = _batches(data.dataset("test"))
    ref, out = _logits(target, batches), _logits(result.model, batches)
    assert float((ref.argmax(1) == out.argmax(1)).float().mean()) >= 0.95
    save_model(result.model, tmp_path / "w", extra={"quantized": result.record})
    assert torch.allclose(_logits(load_model(tmp_path / "w"), batches), out, atol=1e-5, rtol=0)


def test_int8_dynamic_on_the_real_minilm_agrees_on_real_reviews():
    source = tk.load_source("all-minilm-l6-v2")
    cfg = DataConfig(dataset="rotten_tomatoes", per_class=32, val_per_class=2, test_size=64, max_length=64)
    data = prepare_data(cfg, source, seed=0)
    target = tk.build_target(source, data.classes)
    target.preprocess = data.preprocess
    _fit_head(target, data.dataset("train"))
    result = quantize(target, method="int8_dynamic")
    assert len(result.record["layers"]) == 36  # 6 layers x 6 Linear
    batches = _batches(data.dataset("test"))
    ref, out = _logits(target, batches), _logits(result.model, batches)
    assert float((ref.argmax(1) == out.argmax(1)).float().mean()) >= 0.95
    assert float((ref - out).abs().max()) < 0.1 * float(ref.abs().max())


# ---------------------------------------------------------------------------------------------------- int8_static


def test_int8_static_agrees_with_float_on_real_digits(image_target, image_int8):
    target, data = image_target
    batches = _batches(data.dataset("test"), 20)
    ref, out = _logits(target, batches), _logits(image_int8.model, batches)
    assert ref.shape == (40, 10)
    assert float((ref.argmax(1) == out.argmax(1)).float().mean()) >= 0.9
    assert float((ref - out).abs().max()) < 0.15 * float(ref.abs().max())
    assert not torch.equal(ref, out)
    record = image_int8.record
    assert record["method"] == "int8_static" and record["input_size"] == [3, 32, 32]
    assert record["calibration_batches"] == 5 and record["calibration_examples"] == 80  # 8 per class x 10 classes
    backbone = image_int8.model.backbone
    assert isinstance(backbone, StaticInt8Backbone)
    int8 = {k: v for k, v in backbone.state_dict().items() if v.dtype == torch.int8}
    convs = [m for m in target.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert record["int8_weights"] == sum(v.numel() for v in int8.values())
    assert len(int8) == len(convs) == 17  # every convolution, squeeze-excitation ones included, holds int8 weights
    assert backbone.act_qparams.shape[0] > 2 * len(int8)  # a quantize and a dequantize per activation at least


def test_int8_static_model_reloads_with_equal_logits_and_predicts(image_target, image_int8, tmp_path):
    target, data = image_target
    save_model(image_int8.model, tmp_path / "s", extra={"quantized": image_int8.record})
    save_model(target, tmp_path / "float")
    # int8 convolution weights, float biases and scales: about a quarter of the float file (no float copy left)
    float_bytes, int8_bytes = ((tmp_path / f / "model.safetensors").stat().st_size for f in ("float", "s"))
    assert int8_bytes < 0.4 * float_bytes
    loaded = load_model(tmp_path / "s")
    assert isinstance(loaded.backbone, StaticInt8Backbone)
    batches = _batches(data.dataset("test"), 20)
    assert torch.allclose(_logits(loaded, batches), _logits(image_int8.model, batches), atol=1e-5, rtol=0)
    test = data.dataset("test")
    assert evaluate(loaded, test) == evaluate(image_int8.model, test)
    items = list(data.items("test"))
    predictor = Predictor(loaded)
    probs = predictor.predict_proba(items)
    assert probs.shape == (40, 10) and torch.allclose(
        probs, Predictor(image_int8.model).predict_proba(items), atol=1e-6
    )
    one = predictor.predict(items[:1], top_k=2)[0]  # a batch of one: the traced batch size is dynamic
    assert len(one["top"]) == 2 and one["top"][0]["label"] in data.classes
    with pytest.raises(DataError, match=r"traced for image batches of \[3, 32, 32\].*got \[2, 3, 48, 48\]"):
        loaded(torch.zeros(2, 3, 48, 48))


@pytest.mark.slow
def test_compiled_int8_static_model_agrees_with_the_eager_one_and_saves_the_same(image_target, image_int8, tmp_path):
    import copy

    from transferkit.compress.quantize import compile_static

    _, data = image_target
    batches = _batches(data.dataset("test"), 20)
    eager = _logits(image_int8.model, batches)
    model = compile_static(copy.deepcopy(image_int8.model))
    compiled = _logits(model, batches)  # inductor's oneDNN int8 convolutions: other roundings than the eager graph
    assert float((compiled.argmax(1) == eager.argmax(1)).float().mean()) >= 0.9
    assert float((compiled - eager).abs().max()) < 0.1 * float(eager.abs().max())
    assert model.state_dict().keys() == image_int8.model.state_dict().keys()
    with pytest.raises(CompressError, match="compile_static takes an int8_static model"):
        compile_static(image_target[0])


@pytest.mark.slow
def test_int8_static_on_efficientnet_lite0_agrees_on_real_digits():
    from transferkit.sources import load_source

    source = load_source("efficientnet_lite0")
    data = prepare_data(DataConfig(dataset="mnist5k", per_class=16, test_size=60, image_size=64), source, seed=0)
    target = tk.build_target(source, data.classes)
    target.preprocess = data.preprocess
    _fit_head(target, data.dataset("train"))
    result = quantize(target, method="int8_static", calibration=make_loader(data.dataset("train"), batch_size=32))
    batches = _batches(data.dataset("test"))
    ref, out = _logits(target, batches), _logits(result.model, batches)
    assert float((ref.argmax(1) == out.argmax(1)).float().mean()) >= 0.9


# ---------------------------------------------------------------------------------------------------- refusals


def test_an_unknown_method_is_refused_with_the_valid_ones(text_target):
    with pytest.raises(CompressError, match=r"unknown quantization method 'int8_dynamc'\. Did you mean 'int8_dynamic'"):
        quantize(text_target[0], method="int8_dynamc")
    with pytest.raises(CompressError, match="Valid: int8_dynamic, int8_static, int8_weight_only"):
        quantize(text_target[0], method="int4")


def test_a_model_without_what_the_method_quantizes_is_refused(image_target, text_target):
    with pytest.raises(
        CompressError,
        match=r"int8_dynamic quantizes nn.Linear layers and the backbone of 'test_efficientnet' has none \(it is "
        r"convolutional\); use method int8_static .* ONNX Runtime's int8 \(transferkit compress --quantize int8 "
        r"--export onnx\)",
    ):
        quantize(image_target[0], method="int8_dynamic")
    with pytest.raises(CompressError, match="int8_static quantizes 2-D convolutions .* has none; use int8_dynamic"):
        quantize(text_target[0], method="int8_static", calibration=[torch.zeros(2, 3, 32, 32)])


def test_static_quantization_needs_calibration_images(image_target):
    target = image_target[0]
    with pytest.raises(CompressError, match="int8_static needs calibration data: pass calibration="):
        quantize(target, method="int8_static")
    with pytest.raises(CompressError, match="empty calibration iterable"):
        quantize(target, method="int8_static", calibration=[])
    with pytest.raises(CompressError, match=r"calibration batch 1 is a torch.float32 tensor of shape \[2, 3, 40, 40\]"):
        quantize(target, method="int8_static", calibration=[torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 40, 40)])
    with pytest.raises(CompressError, match="int8_dynamic takes no calibration data"):
        quantize(target, method="int8_dynamic", calibration=[torch.zeros(2, 3, 32, 32)])


def test_a_lora_model_must_be_merged_first(text_target):
    import copy

    from transferkit.models.adapters import inject_lora

    model = copy.deepcopy(text_target[0])
    inject_lora(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["query", "value"]})
    with pytest.raises(CompressError, match=r"carries lora adapters: merge them .*merge_lora\(model\)"):
        quantize(model, method="int8_dynamic")


def test_a_quantized_model_is_not_quantized_again(text_int8, image_int8):
    with pytest.raises(CompressError, match="quantized already: quantize the float model"):
        quantize(text_int8.model, method="int8_dynamic")
    with pytest.raises(CompressError, match="quantized already"):
        quantize(image_int8.model, method="int8_static", calibration=[torch.zeros(2, 3, 32, 32)])


def test_a_tampered_quantized_folder_is_named(text_int8, text_target, tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(text_int8.model, tmp_path / "m", extra={"quantized": text_int8.record})
    meta_path = tmp_path / "m" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "quantized": {**meta["quantized"], "method": "int3"}}))
    with pytest.raises(SourceError, match="names quantized.method 'int3'; valid: int8_dynamic, int8_static"):
        load_model(tmp_path / "m")
    meta_path.write_text(json.dumps({**meta, "quantized": {**meta["quantized"], "format": "other/9"}}))
    with pytest.raises(SourceError, match="quantized record of format 'other/9'"):
        load_model(tmp_path / "m")
    meta_path.write_text(json.dumps(meta))
    # a float checkpoint where the int8 weights belong
    save_file(
        {k: v.contiguous() for k, v in text_target[0].state_dict().items()}, str(tmp_path / "m" / "model.safetensors")
    )
    with pytest.raises(SourceError, match="is a float weight, but this layer is int8"):
        load_model(tmp_path / "m")
    # an int8 weight of the wrong shape
    save_model(text_int8.model, tmp_path / "m", extra={"quantized": text_int8.record})
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    key = f"{text_int8.record['layers'][0]}.weight.qdata"
    state[key] = state[key][:-1].contiguous()
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(SourceError, match=rf"'{key}' is torch.int8 \[31, 32\] but this int8 layer holds torch.int8"):
        load_model(tmp_path / "m")
