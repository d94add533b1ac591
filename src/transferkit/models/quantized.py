"""Int8 models (what ``transferkit.compress.quantize`` makes): saved as plain tensors, rebuilt from ``model.json``.

Two kinds, told apart by the ``method`` of the ``quantized`` record in ``model.json``:

- ``int8_dynamic`` and ``int8_weight_only``: the backbone's ``nn.Linear`` layers hold torchao ``Int8Tensor``
  weights (int8 values and per-output-channel scales; activations are quantized per token at each call, or stay
  float). A tensor subclass is nothing safetensors can write, so each such layer flattens its weight into its plain
  inner tensors in ``state_dict`` (``weight.qdata`` int8, ``weight.scale`` float32) and rebuilds it in
  ``load_state_dict``: ``save_model`` writes the model as it is, and a float checkpoint cannot load into it unseen.
- ``int8_static``: a convolutional backbone quantized through PT2E (``torch.export``, the X86 inductor quantizer,
  observers run over calibration batches, ``convert_pt2e``). The result is a graph whose int8 weights and
  per-channel scales are buffers but whose activation scales and zero points are constants written in the graph;
  ``StaticInt8Backbone`` keeps those in a buffer too, so that they travel in ``state_dict`` and are written back into
  the graph on loading.

Reloading never unpickles anything: the structure is rebuilt from the float architecture (its random weights
quantized the same way, the backbone traced again), then the saved tensors are loaded over it. ``torch.export.load``
is not used because it falls back to ``torch.load(weights_only=False)`` on what it cannot read safely.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.errors import DataError, SourceError
from transferkit.io import load_state_dict

QUANTIZED_FORMAT = "transferkit.quantized/1"
LINEAR_METHODS = ("int8_dynamic", "int8_weight_only")
STATIC_METHOD = "int8_static"
METHODS = ("int8_dynamic", "int8_static", "int8_weight_only")

_PER_TENSOR_OPS = ("quantize_per_tensor.default", "dequantize_per_tensor.default")  # scale, zero point: literals


# ---------------------------------------------------------------------------------------------- int8 Linear layers


def torchao_config(method: str) -> Any:
    """The torchao config of a Linear method. ``set_inductor_config=False``: torchao would otherwise change global
    torch.compile settings as a side effect of quantizing, for every model in the process."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if method == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if method == "int8_weight_only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    raise ValueError(f"'{method}' is not a Linear-layer method; those are {', '.join(LINEAR_METHODS)}")


def backbone_linears(model: nn.Module) -> list[str]:
    """Names (from the model's root) of the backbone's ``nn.Linear`` layers: what the Linear methods quantize.

    The head stays float: it is a fraction of a percent of the work, and the logits are where rounding shows.
    """
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    return [prefix + n for n, m in backbone.named_modules() if type(m) is nn.Linear]


def is_int8_weight(t: Any) -> bool:
    from torchao.quantization import Int8Tensor

    return isinstance(t, Int8Tensor)


def quantize_linears(model: nn.Module, method: str, layers: list[str]) -> None:
    """Give the named ``nn.Linear`` layers int8 weights in place (torchao ``quantize_``), flattened in state_dict."""
    from torchao.quantization import quantize_

    wanted = set(layers)
    modules = dict(model.named_modules())
    absent = [n for n in layers if type(modules.get(n)) is not nn.Linear]
    if absent:
        raise SourceError(
            f"the quantized layers {absent[:3]} are not nn.Linear layers of this architecture; the model folder's "
            "model.json does not match its architecture: save the model again"
        )
    quantize_(model, torchao_config(method), filter_fn=lambda _m, fqn: fqn in wanted)
    for name in layers:
        layer = modules[name]
        if not is_int8_weight(layer.weight):  # torchao skips what it cannot quantize; we never save such a model
            raise SourceError(f"torchao left '{name}' unquantized ({type(layer.weight).__name__} weight)")
        layer.register_state_dict_post_hook(_flatten_weight)
        layer.register_load_state_dict_pre_hook(_unflatten_weight)


def _flatten_weight(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """state_dict hook: ``weight`` (an Int8Tensor) -> its plain inner tensors ``weight.qdata``, ``weight.scale``..."""
    weight = state.pop(prefix + "weight", None)
    if weight is None:
        return
    names, _ = weight.__tensor_flatten__()
    for name in names:
        state[f"{prefix}weight.{name}"] = getattr(weight, name)


def _unflatten_weight(
    module: nn.Module,
    state: dict[str, Any],
    prefix: str,
    _meta: Any,
    _strict: bool,
    _missing: list[str],
    _unexpected: list[str],
    errors: list[str],
) -> None:
    """load_state_dict hook: the inner tensors saved by ``_flatten_weight`` -> an Int8Tensor ``weight``, which
    load_state_dict then copies in (torch checks the shapes; torchao the inner shapes and block sizes)."""
    weight: Any = module.weight  # an Int8Tensor (torch types module attributes as Tensor | Module)
    names, meta = weight.__tensor_flatten__()
    keys = {name: f"{prefix}weight.{name}" for name in names}
    if prefix + "weight" in state and not any(k in state for k in keys.values()):
        errors.append(
            f"'{prefix}weight' is a float weight, but this layer is int8: load the float checkpoint into the float "
            "model and quantize it again"
        )
        state.pop(prefix + "weight")
        return
    if not all(k in state for k in keys.values()):
        return  # load_state_dict reports the weight missing
    inner = {name: state.pop(key) for name, key in keys.items()}
    for name, t in inner.items():
        own = getattr(weight, name)
        if t.shape != own.shape or t.dtype != own.dtype:
            errors.append(
                f"'{keys[name]}' is {t.dtype} {list(t.shape)} but this int8 layer holds {own.dtype} {list(own.shape)}"
            )
            return
    state[prefix + "weight"] = type(weight).__tensor_unflatten__(inner, meta, weight.shape, weight.stride())


# ---------------------------------------------------------------------------------------------- static (PT2E) backbone


def _per_tensor_nodes(graph_module: nn.Module) -> list[Any]:
    """The graph's activation quantize/dequantize nodes, in graph order (their args: input, scale, zero point...)."""
    graph: Any = graph_module.graph
    return [n for n in graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") in _PER_TENSOR_OPS]


class StaticInt8Backbone(nn.Module):
    """A PT2E-converted backbone graph taking image batches of one size (``input_size``), any batch size.

    Its activation scales and zero points, constants in the graph, are also kept in the ``act_qparams`` buffer
    (float64: a Python float exactly), so that ``state_dict`` holds everything and ``load_state_dict`` writes
    them back into the graph. ``train``/``eval`` leave the graph alone: an exported graph refuses both, and it was
    exported in eval mode (batch norms folded, dropout gone) for good.

    Args:
        graph: the converted graph module (``convert_pt2e``'s output).
        input_size: ``[channels, height, width]`` of the inputs it was traced with.
    """

    graph: Any  # a torch.fx GraphModule (typed Any: torch types module attributes as Tensor | Module)
    act_qparams: torch.Tensor

    def __init__(self, graph: nn.Module, input_size: list[int]):
        super().__init__()
        self.graph = graph
        self.input_size = [int(v) for v in input_size]
        nodes = _per_tensor_nodes(graph)
        values = [[float(n.args[1]), float(n.args[2])] for n in nodes]
        self.register_buffer("act_qparams", torch.tensor(values, dtype=torch.float64).reshape(len(nodes), 2))
        self.register_load_state_dict_post_hook(_write_qparams)
        self.compiled: Any = None  # set by compress.quantize.compile_static; not a submodule: state_dict stays as is

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "compiled":  # a compiled module would otherwise register as a submodule (its weights twice)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or list(x.shape[1:]) != self.input_size:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(
                f"this int8_static model was traced for image batches of {self.input_size} (channels, height, "
                f"width) and got {got}; resize the inputs to {self.input_size[1]}x{self.input_size[2]} (the "
                "model's preprocess input_size), or quantize again with calibration batches of the size you need"
            )
        if self.compiled is None:
            return self.graph(x)
        import torch._inductor.config as inductor_config

        # freezing (weights as constants) is what lets inductor prepack the int8 convolutions; it is read when a
        # compilation happens, which is on a call (the first, and each new batch size), so it is set around calls
        with inductor_config.patch(freezing=True):
            return self.compiled(x)

    def train(self, mode: bool = True) -> StaticInt8Backbone:
        self.training = mode
        return self

    def write_qparams(self) -> None:
        """Write ``act_qparams`` into the graph's quantize/dequantize nodes and regenerate its code."""
        nodes = _per_tensor_nodes(self.graph)
        if len(nodes) != self.act_qparams.shape[0]:
            raise SourceError(
                f"the saved int8_static model has {self.act_qparams.shape[0]} activation quantizers but this "
                f"architecture traces to {len(nodes)} (another torch/torchao version?); quantize the float model again"
            )
        for node, (scale, zero) in zip(nodes, self.act_qparams.tolist()):
            node.args = (node.args[0], float(scale), int(zero), *node.args[3:])
        self.graph.recompile()  # a GraphModule regenerates forward from its graph
        self.compiled = None  # compiled from the old constants


def _write_qparams(module: nn.Module, _incompatible: Any) -> None:
    assert isinstance(module, StaticInt8Backbone)
    module.write_qparams()


def trace_static(backbone: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor]) -> StaticInt8Backbone:
    """``backbone`` (in eval mode) exported with a dynamic batch size, observed on ``calibration`` and converted to
    int8 (X86 inductor quantizer: uint8 activations per tensor, int8 weights per channel)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    if example.shape[0] < 2:  # export treats a size of 1 as a constant: the batch would not stay dynamic
        example = torch.cat([example, example])
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        exported = torch.export.export(backbone, (example,), dynamic_shapes=({0: batch},))
        quantizer = X86InductorQuantizer()
        quantizer.set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported.module(), quantizer)  # type: ignore[arg-type]  # torchao types it GraphModule
        for x in calibration:
            prepared(x)
        converted = convert_pt2e(prepared)
    _drop_unused_tensors(converted)
    return StaticInt8Backbone(converted, list(example.shape[1:]))


def _drop_unused_tensors(graph_module: Any) -> None:
    """Delete the parameters and buffers the converted graph no longer reads: convert_pt2e leaves the float weights
    of the quantized convolutions in place beside their int8 copies (the saved file would be larger than float)."""
    used = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
    for name in [k for k in graph_module.state_dict() if k not in used]:
        owner, _, leaf = name.rpartition(".")
        delattr(graph_module.get_submodule(owner) if owner else graph_module, leaf)
    graph_module.delete_all_unused_submodules()


# ---------------------------------------------------------------------------------------------- reloading


@torch.no_grad()
def _finite_for_tracing(backbone: nn.Module) -> None:
    """Finite values in every float tensor before the graph is traced and observed again: a pruned architecture's
    tensors are made empty at their recorded shapes (uninitialised memory, possibly NaN), and an observer that
    sees NaN fails. The values are overwritten by the saved ones right after."""
    generator = torch.Generator().manual_seed(0)
    for name, t in [*backbone.named_parameters(), *backbone.named_buffers()]:
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            t.fill_(1.0)
        elif name.endswith("running_mean"):
            t.zero_()
        else:
            t.copy_(torch.randn(t.shape, generator=generator) * 0.02)


def load_quantized(model: nn.Module, folder: str | Path, record: dict[str, Any]) -> Any:
    """The quantized model saved in ``folder``, from ``model`` (its float architecture rebuilt from model.json,
    weights not loaded) and ``record`` (model.json's ``quantized``). Called by ``models.base.load_model``."""
    folder = Path(folder)
    fix = "save the model again with transferkit.compress.quantize"
    if not isinstance(record, dict) or record.get("format") != QUANTIZED_FORMAT:
        found = record.get("format") if isinstance(record, dict) else record
        raise SourceError(
            f"'{folder}/model.json' has a quantized record of format {found!r}; this transferkit reads "
            f"{QUANTIZED_FORMAT}; {fix}"
        )
    method = record.get("method")
    if method in LINEAR_METHODS:
        quantize_linears(model, str(method), list(record.get("layers", [])))
    elif method == STATIC_METHOD:
        size = record.get("input_size")
        if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) for v in size)):
            raise SourceError(
                f"'{folder}/model.json' has no valid quantized.input_size (channels, height, width); {fix}"
            )
        backbone: nn.Module = model.backbone  # type: ignore[assignment]
        _finite_for_tracing(backbone)
        example = torch.zeros(2, *size)  # any values: the traced structure is kept, its numbers are loaded below
        model.backbone = trace_static(backbone.eval(), example, [example])
    else:
        raise SourceError(f"'{folder}/model.json' names quantized.method {method!r}; valid: {', '.join(METHODS)}")
    state = load_state_dict(folder / "model.safetensors")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not match, or a float weight where an int8 one belongs
        raise SourceError(f"'{folder}/model.safetensors' does not match its model.json: {e}") from None
    if missing or unexpected:
        raise SourceError(
            f"'{folder}/model.safetensors' does not match its model.json: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.eval()
