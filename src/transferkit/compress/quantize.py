"""Int8 quantization of a trained model for PyTorch inference on CPU, with torchao.

Three methods:

- ``int8_dynamic`` (Linear-heavy models: text and audio transformers, ViTs): the backbone's ``nn.Linear`` weights
  become int8 per output channel, and each call quantizes the activations per token
  (``Int8DynamicActivationInt8WeightConfig``); the matrix products run in int8 (``torch._int_mm``) in eager mode.
  No calibration data.
- ``int8_weight_only``: int8 weights, float activations (``Int8WeightOnlyConfig``): a smaller file and memory, but
  in eager mode on CPU each call turns the weights back to float, so it is not faster.
- ``int8_static`` (convolutional image models): the backbone is exported (``torch.export``), observed on calibration
  batches and converted (torchao's PT2E ``prepare_pt2e``/``convert_pt2e`` with the X86 inductor quantizer: uint8
  activations per tensor, int8 weights per channel, batch norms folded). In eager mode the converted graph runs
  each int8 convolution as dequantize -> float convolution -> quantize, slower than float; it is the form that
  ``torch.compile`` (inductor, ``freezing``) lowers to oneDNN int8 convolutions, where the speed is.
  ``compile_static`` does that. ONNX Runtime's static int8 is the other route
  (``transferkit compress --quantize int8 --export onnx``).

The head stays float in every method (a fraction of a percent of the work, and the logits are where rounding
shows). Save the result with ``save_model(result.model, folder, extra={"quantized": result.record})``: its
state_dict holds plain tensors only (see ``transferkit.models.quantized``), and ``load_model(folder)`` rebuilds it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transferkit.errors import CompressError, did_you_mean
from transferkit.models.base import MultiTaskModel, SourceModel
from transferkit.models.quantized import (
    LINEAR_METHODS,
    METHODS,
    QUANTIZED_FORMAT,
    STATIC_METHOD,
    StaticInt8Backbone,
    backbone_linears,
    is_int8_weight,
    quantize_linears,
    trace_static,
)

ONNX_ROUTE = "ONNX Runtime's int8 (transferkit compress --quantize int8 --export onnx)"


@dataclass
class QuantizeResult:
    """A quantized model and what ``model.json`` records of it (under ``quantized``).

    Attributes:
        model: the quantized model (a new one: the float model given is left as it was).
        record: JSON-able: format, method, what was quantized, calibration size, and the agreement with the float
            model on ``example`` when one was given.
    """

    model: SourceModel | MultiTaskModel
    record: dict[str, Any]


def quantize(
    model: SourceModel | MultiTaskModel,
    *,
    method: str = "int8_dynamic",
    calibration: Iterable[Any] | None = None,
    example: Any = None,
) -> QuantizeResult:
    """Quantize a trained model to int8 (see the module docstring for the methods).

    Args:
        model: a trained float model (LoRA adapters merged).
        method: ``int8_dynamic``, ``int8_static`` or ``int8_weight_only``.
        calibration: ``int8_static`` only: input batches (image tensors, or ``(inputs, labels)`` pairs as a
            DataLoader yields them) whose activation ranges set the static scales; training examples, a few hundred.
        example: an input batch: ``int8_static`` traces with it (default: the first calibration batch); every method
            records the top-1 agreement and largest logit difference with the float model on it.

    Raises:
        CompressError: an unknown method, a model with nothing that method quantizes, ``int8_static`` without
            calibration data, LoRA adapters still injected, or a model quantized already.
    """
    if method not in METHODS:
        raise CompressError(
            f"unknown quantization method '{method}'.{did_you_mean(method, METHODS)} Valid: {', '.join(METHODS)}"
        )
    if not isinstance(model, (SourceModel, MultiTaskModel)):
        raise CompressError(f"quantize takes a transferkit SourceModel or MultiTaskModel, not {type(model).__name__}")
    if model.adapter:
        raise CompressError(
            f"the model carries {model.adapter.get('type', 'LoRA')} adapters: merge them into the weights first "
            "(transferkit.models.adapters.merge_lora(model)), then quantize the merged model"
        )
    if isinstance(model.backbone, StaticInt8Backbone) or any(is_int8_weight(p) for p in model.parameters()):
        raise CompressError("the model is quantized already: quantize the float model it came from")
    was_training = model.training
    model.eval()  # batch norms on their running statistics, no dropout: what is quantized is the inference model
    try:
        if method in LINEAR_METHODS:
            if calibration is not None:
                raise CompressError(
                    f"{method} takes no calibration data (activations are quantized per batch, or not at all); "
                    "drop calibration, or use int8_static for calibrated activation scales"
                )
            quantized, record = _quantize_linears(model, method)
        else:
            quantized, record = _quantize_static(model, calibration, example)
        if example is not None:
            record["check"] = agreement(model, quantized, example if method in LINEAR_METHODS else _inputs(example))
    finally:
        model.train(was_training)
    return QuantizeResult(quantized, record)


def _quantize_linears(model: SourceModel | MultiTaskModel, method: str) -> tuple[Any, dict[str, Any]]:
    layers = backbone_linears(model)
    if not layers:
        convs = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.backbone.modules())
        raise CompressError(
            f"{method} quantizes nn.Linear layers and the backbone of '{model.arch.get('name')}' has none"
            + (" (it is convolutional)" if convs else "")
            + f"; use method int8_static (calibrated, for convolutions) or {ONNX_ROUTE}"
        )
    quantized = copy.deepcopy(model)
    quantize_linears(quantized, method, layers)
    linears: list[Any] = [quantized.get_submodule(n) for n in layers]  # Any: torch types .weight as Tensor | Module
    weights = sum(int(m.weight.numel()) for m in linears)
    record = {
        "format": QUANTIZED_FORMAT,
        "method": method,
        "backend": _backend(),
        "layers": layers,
        "int8_weights": int(weights),
        "activations": "int8 per token, symmetric, at each call" if method == "int8_dynamic" else "float",
        "head": "float32",
    }
    return quantized, record


def _inputs(batch: Any) -> Any:
    """The inputs of a batch: a DataLoader's ``(inputs, labels)`` pair gives its first element."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _quantize_static(model: SourceModel | MultiTaskModel, calibration: Any, example: Any) -> tuple[Any, dict]:
    if not isinstance(model, SourceModel):
        raise CompressError(
            f"int8_static traces one backbone with one head; a multi-task model is not supported: quantize it with "
            f"int8_dynamic, or each task (model.task(name)) on its own, or use {ONNX_ROUTE}"
        )
    if not any(isinstance(m, nn.Conv2d) for m in model.backbone.modules()):
        raise CompressError(
            f"int8_static quantizes 2-D convolutions and the backbone of '{model.arch.get('name')}' has none; use "
            f"int8_dynamic for Linear layers (transformers), or {ONNX_ROUTE}"
        )
    if calibration is None:
        raise CompressError(
            "int8_static needs calibration data: pass calibration= an iterable of input batches (a few hundred "
            "training images, preprocessed as for training); or use int8_dynamic, which needs none"
        )
    batches = [_inputs(b) for b in calibration]
    if not batches:
        raise CompressError("int8_static got an empty calibration iterable: give a few batches of training images")
    first = batches[0]
    bad = [i for i, b in enumerate(batches) if not _image_batch(b) or b.shape[1:] != first.shape[1:]]
    if bad:
        b = batches[bad[0]]
        raise CompressError(
            f"calibration batch {bad[0]} is {_describe(b)}; int8_static takes image tensors (batch, channels, "
            f"height, width), all of one size ({_describe(first)} first)"
        )
    traced_with = _inputs(example) if example is not None else first
    if not _image_batch(traced_with) or traced_with.shape[1:] != first.shape[1:]:
        raise CompressError(f"example is {_describe(traced_with)}; give a batch of the calibration images' size")
    try:
        backbone = trace_static(model.backbone, traced_with, batches)
    except Exception as e:  # torch.export and PT2E raise many kinds, all meaning "this graph does not go through"
        raise CompressError(
            f"int8_static could not export and quantize the backbone of '{model.arch.get('name')}' "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); use int8_dynamic for its "
            f"Linear layers, or {ONNX_ROUTE}"
        ) from e
    quantized = SourceModel(
        backbone,
        copy.deepcopy(model.head),
        model.arch,
        model.preprocess,
        model.labels,
        model.num_features,
        model.groups,
    )
    quantized.processor = model.processor
    quantized.eval()
    weights = sum(int(t.numel()) for t in backbone.state_dict().values() if t.dtype == torch.int8)
    record = {
        "format": QUANTIZED_FORMAT,
        "method": STATIC_METHOD,
        "backend": _backend() + ", PT2E X86InductorQuantizer",
        "input_size": [int(v) for v in first.shape[1:]],
        "calibration_batches": len(batches),
        "calibration_examples": int(sum(b.shape[0] for b in batches)),
        "int8_weights": weights,
        "activations": "uint8 per tensor, calibrated (min/max)",
        "head": "float32",
    }
    return quantized, record


def _image_batch(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point()


def _describe(x: Any) -> str:
    return f"a {x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


def _backend() -> str:
    import torchao

    return f"torchao {torchao.__version__}"


@torch.no_grad()
def agreement(reference: nn.Module, quantized: nn.Module, batch: Any) -> dict[str, float]:
    """Top-1 agreement and the largest absolute logit difference of two models on one batch (both in eval mode)."""
    ref, out = reference(batch), quantized(batch)
    return {
        "examples": int(ref.shape[0]),
        "top1_agreement": float((ref.argmax(1) == out.argmax(1)).float().mean()),
        "max_abs_logit_diff": float((ref - out).abs().max()),
    }


def compile_static(model: SourceModel) -> SourceModel:
    """``model`` (an ``int8_static`` result) with its backbone graph compiled by inductor with frozen weights, which
    lowers the quantize/dequantize pairs around each convolution to oneDNN int8 convolutions (x86 CPUs).

    The compilation happens on the first call (tens of seconds for an EfficientNet) and again for each new batch
    size it has not seen; it needs a C++ compiler. Run it under ``torch.no_grad()`` (as evaluation and prediction do):
    inductor freezes the weights only for inference. The model is changed in place and returned; its state_dict is
    unchanged (save it as before), and a reloaded model runs uncompiled until compiled again.
    """
    if not isinstance(model.backbone, StaticInt8Backbone):
        raise CompressError("compile_static takes an int8_static model (quantize(model, method='int8_static', ...))")
    model.backbone.compiled = torch.compile(model.backbone.graph)  # run with inductor's freezing: see forward
    return model
