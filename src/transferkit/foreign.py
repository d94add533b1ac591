"""Weights from other frameworks: ONNX initializers and Keras ``.h5`` / ``.keras`` weight files, as PyTorch tensors.

Both readers return an ordered ``{name: tensor}`` in PyTorch's conventions (``conv.weight`` as (out, in, kh, kw),
``bn.running_var``...), so the matcher (``transferkit.transfer.match``) can pair them with a PyTorch target by
name or, for names from another framework, by structure. Neither needs the framework that wrote the file: ONNX
files are read with the ``onnx`` package, Keras files with ``h5py`` (no TensorFlow, no Keras).

ONNX:
    an initializer whose name is already a PyTorch ``state_dict`` name (``features.0.weight``: what
    ``torch.onnx.export`` writes) is kept as is; any other floating-point initializer (``onnx::Conv_17`` after BN
    folding, ``dense/kernel:0`` from tf2onnx) is named after the node that consumes it (``/features/features.0/Conv``
    -> ``features.0.weight``) and, for ``MatMul`` and ``Gemm(transB=0)``, transposed to (out, in). Integer
    initializers are shapes and indices, not weights, and are left out. The legacy exporter stores identical
    tensors once and feeds the copies through ``Identity`` nodes (a fresh BatchNorm's weight and running_var are both
    ones): each such copy is returned under its own name. Both torch exporters fold a BatchNorm into the convolution
    before it unless told not to (legacy: ``do_constant_folding=False``; dynamo: ``optimize=False``); the dynamo
    exporter keeps the convolution's name for the folded kernel, so such a file fits a target without that
    BatchNorm, and a target with it gets the folded kernel and a fresh BatchNorm (which the report shows).

Keras:
    - Keras 3 ``.weights.h5`` (and the ``model.weights.h5`` inside a ``.keras`` zip) stores each layer as
      ``layers/<class_snake_name>/vars/<i>`` with the layer's name in an attribute. The group names sort by class,
      not by position, so the layers are put back in the order their weights were written (their data offsets in
      the file), which is the order of ``model.layers``. A ``.keras`` file's ``config.json`` gives each layer's class
      and options (a BatchNorm without ``scale`` has no gamma).
    - Legacy HDF5 (``model.save("x.h5")``, Keras 2 ``save_weights("x.h5")``): ``layer_names`` and ``weight_names``
      attributes give the order and the variable names; ``model_config`` the classes.

    Layouts converted: Conv1D/2D/3D kernels (*k, in, out) -> (out, in, *k); DepthwiseConv1D/2D (*k, in, mult) ->
    (in*mult, 1, *k) (a PyTorch conv with ``groups=in``); Dense (in, out) -> (out, in); BatchNormalization
    gamma/beta/moving_mean/moving_variance -> weight/bias/running_mean/running_var; LayerNormalization gamma/beta ->
    weight/bias; Embedding embeddings -> weight. Variables of other layers keep their Keras layout and name
    (``lstm.kernel``, or ``layer.<i>`` in a Keras 3 file), so the matcher reports them as unused rather than guessing.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.errors import DataNotFoundError, SourceError

SUFFIXES = (".onnx", ".h5", ".hdf5", ".keras")

# a PyTorch state_dict name: dotted identifiers (``layer1.0.conv1.weight``); ONNX-made names have '/', ':' or '::'
_TORCH_NAME = re.compile(r"^[A-Za-z_]\w*(\.\w+)+$")


def _require(module: str, path: Path) -> Any:
    """Import a reader's package, or say which one to install to read ``path``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SourceError(
            f"reading '{path}' needs the '{module.split('.')[0]}' package: "
            "pip install 'transferkit[foreign]' (onnx and h5py)"
        ) from e


def read_foreign_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an ``.onnx``, ``.h5``/``.hdf5`` or ``.keras`` file, by suffix (see the module docstring)."""
    path = Path(path)
    if path.suffix == ".onnx":
        return read_onnx_weights(path)
    if path.suffix in (".h5", ".hdf5", ".keras"):
        return read_keras_weights(path)
    raise SourceError(f"'{path}' is not an ONNX or Keras weights file (suffixes: {', '.join(SUFFIXES)})")


# ----------------------------------------------------------------------------------------------------------------
# ONNX

# (op type, input position) -> PyTorch tensor role
_ONNX_ROLES = {
    ("Conv", 1): "weight",
    ("Conv", 2): "bias",
    ("ConvTranspose", 1): "weight",
    ("ConvTranspose", 2): "bias",
    ("BatchNormalization", 1): "weight",
    ("BatchNormalization", 2): "bias",
    ("BatchNormalization", 3): "running_mean",
    ("BatchNormalization", 4): "running_var",
    ("Gemm", 1): "weight",
    ("Gemm", 2): "bias",
    ("MatMul", 1): "weight",
    ("LayerNormalization", 1): "weight",
    ("LayerNormalization", 2): "bias",
    ("InstanceNormalization", 1): "weight",
    ("InstanceNormalization", 2): "bias",
}


def _onnx_owner(node: Any, index: int) -> str:
    """The module a node belongs to: ``/features/features.0/Conv`` -> ``features.0``; else the node's name."""
    parts = [p for p in node.name.split("/") if p]
    if len(parts) >= 2:
        return parts[-2]
    return node.name or f"{node.op_type.lower()}_{index}"


def read_onnx_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The floating-point initializers of an ONNX model, in graph order, with PyTorch names and layouts.

    Args:
        path: an ``.onnx`` file (external data, if any, is read from beside it).

    Returns:
        ``{name: tensor}``; names that are PyTorch ``state_dict`` names are kept, others are derived from the
        consuming node (see the module docstring).

    Raises:
        DataNotFoundError: the file does not exist.
        SourceError: the file is not a readable ONNX model, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"ONNX file '{path}' does not exist")
    onnx = _require("onnx", path)
    numpy_helper = _require("onnx.numpy_helper", path)
    try:
        model = onnx.load(str(path))
        graph = model.graph
        arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    except Exception as e:  # protobuf's DecodeError, onnx's ValidationError, OSError for missing external data
        raise SourceError(f"'{path}' is not a readable ONNX model: {type(e).__name__}: {e}") from e
    if not graph.node and not arrays:
        raise SourceError(f"'{path}' is not a readable ONNX model: it holds no graph nodes and no initializers")

    # the first consumer of each initializer (or of an Identity copy of it) says what the tensor is
    consumers: dict[str, tuple[str, int, Any, int]] = {}
    aliases: dict[str, list[str]] = {}
    for i, node in enumerate(graph.node):
        if node.op_type == "Identity" and node.input and node.input[0] in arrays:
            aliases.setdefault(node.input[0], []).append(node.output[0])
        for pos, name in enumerate(node.input):
            consumers.setdefault(name, (node.op_type, pos, node, i))

    out: dict[str, torch.Tensor] = {}
    for init in graph.initializer:
        array = arrays[init.name]
        if not np.issubdtype(array.dtype, np.floating):
            continue  # shapes, axes, indices: graph constants, not learned weights
        for name in [init.name, *aliases.get(init.name, [])]:
            new_name, tensor = _onnx_tensor(name, array, consumers.get(name))
            if new_name in out:  # two unnamed tensors of one node role: keep both, visibly
                new_name = name
            out[new_name] = tensor
    return out


def _onnx_tensor(name: str, array: np.ndarray, consumer: tuple[str, int, Any, int] | None) -> tuple[str, torch.Tensor]:
    """(PyTorch name, tensor in PyTorch layout) for one initializer, given the node that consumes it."""
    tensor = torch.from_numpy(np.array(array, copy=True))
    if _TORCH_NAME.match(name) or consumer is None:
        return name, tensor  # written from a PyTorch state_dict: name and layout are already PyTorch's
    op, pos, node, index = consumer
    role = _ONNX_ROLES.get((op, pos))
    if role is None:
        return name, tensor
    if role == "weight" and tensor.dim() == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if op == "MatMul" or (op == "Gemm" and not trans_b):
            tensor = tensor.t().contiguous()  # x @ W with W (in, out): PyTorch's Linear keeps (out, in)
    return f"{_onnx_owner(node, index)}.{role}", tensor


# ----------------------------------------------------------------------------------------------------------------
# Keras

_CLASS_KINDS = {
    "Conv1D": "conv",
    "Conv2D": "conv",
    "Conv3D": "conv",
    "DepthwiseConv1D": "depthwise",
    "DepthwiseConv2D": "depthwise",
    "Dense": "dense",
    "BatchNormalization": "batchnorm",
    "LayerNormalization": "layernorm",
    "Embedding": "embedding",
}
# Keras 3 names a layer's group after its class in snake case, numbered when repeated: depthwise_conv2d_1
_SNAKE_KINDS = {
    "conv1d": "conv",
    "conv2d": "conv",
    "conv3d": "conv",
    "depthwise_conv1d": "depthwise",
    "depthwise_conv2d": "depthwise",
    "dense": "dense",
    "batch_normalization": "batchnorm",
    "layer_normalization": "layernorm",
    "embedding": "embedding",
}
_TORCH_ROLES = {
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
    "embeddings": "weight",
}


def _keras_layer_configs(config: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """Layer name -> (class name, config), from a Keras model config (nested models included).

    A name that occurs twice (in two nested models) is left out: the caller then falls back to the file's layout.
    """
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            cfg = obj.get("config")
            if isinstance(obj.get("class_name"), str) and isinstance(cfg, dict) and isinstance(cfg.get("name"), str):
                found.setdefault(cfg["name"], []).append((obj["class_name"], cfg))
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(config)
    return {name: entries[0] for name, entries in found.items() if len(entries) == 1}


def _keras_var_names(kind: str | None, count: int, config: dict[str, Any] | None, where: str) -> list[str]:
    """Names of a Keras 3 layer's numbered variables, in the order Keras creates them."""
    if kind in ("conv", "depthwise", "dense"):
        names = ["kernel", "bias"]
    elif kind in ("batchnorm", "layernorm"):
        stats = ["moving_mean", "moving_variance"] if kind == "batchnorm" else []
        if config is not None:
            affine = ["gamma"] * bool(config.get("scale", True)) + ["beta"] * bool(config.get("center", True))
        elif count - len(stats) in (0, 2):  # both gamma and beta, or neither
            affine = ["gamma", "beta"][: count - len(stats)]
        else:
            raise SourceError(
                f"{where}: a {kind} layer with {count} variables: without the model config (a .keras "
                "file has it) it is unclear whether it has gamma or beta"
            )
        names = affine + stats
    elif kind == "embedding":
        names = ["embeddings"]
    else:
        return [str(i) for i in range(count)]
    if count > len(names):  # e.g. a quantized or LoRA-enabled layer: more than the plain layer has
        return [str(i) for i in range(count)]
    return names[:count]


def _keras_tensor(kind: str | None, var: str, array: np.ndarray) -> tuple[str, torch.Tensor]:
    """(PyTorch role, tensor in PyTorch layout) for one Keras variable."""
    t = torch.from_numpy(np.array(array, dtype=array.dtype, copy=True))
    if var in ("kernel", "depthwise_kernel") and kind == "dense" and t.dim() == 2:
        return "weight", t.t().contiguous()
    if var in ("kernel", "depthwise_kernel") and kind == "depthwise" and t.dim() >= 3:
        # (*k, in, mult) -> (in, mult, *k) -> (in*mult, 1, *k): output channel c*mult+m, as Keras orders them
        n = t.dim()
        t = t.permute(n - 2, n - 1, *range(n - 2))
        return "weight", t.reshape(t.shape[0] * t.shape[1], 1, *t.shape[2:]).contiguous()
    if var == "kernel" and kind == "conv" and t.dim() >= 3:
        n = t.dim()
        return "weight", t.permute(n - 1, n - 2, *range(n - 2)).contiguous()
    if kind in ("batchnorm", "layernorm", "embedding") or (kind in ("conv", "depthwise", "dense") and var == "bias"):
        return _TORCH_ROLES.get(var, var), t
    return var, t


def _offset(dataset: Any) -> float:
    """Where a dataset's data starts in the file: HDF5 allocates in write order (an empty dataset has none)."""
    offset = dataset.id.get_offset()
    return float("inf") if offset is None else float(offset)


Layer = tuple[str, str | None, list[tuple[str, Any]]]  # (layer name, kind, [(variable name, dataset)])


def _keras3_layers(root: Any, configs: dict[str, tuple[str, dict[str, Any]]]) -> list[Layer]:
    """The layers of a Keras 3 weights file (``layers/<class_snake_name>/vars/<i>``), in the order written."""
    import h5py

    found: list[tuple[float, str, Any]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group) and name.rsplit("/", 1)[-1] == "vars" and not name.startswith("optimizer/"):
            offsets = [_offset(obj[k]) for k in obj if isinstance(obj[k], h5py.Dataset)]
            if offsets:
                found.append((min(offsets), name, obj))

    root.visititems(visit)
    found.sort(key=lambda x: x[0])  # write order = model.layers order (the group names sort by class)
    layers: list[Layer] = []
    for _, path, group in found:
        parents = path.split("/")[:-1]
        names = []  # the layer path as Keras names it: the attribute 'name' on each level's vars group
        for depth, part in enumerate(parents):
            if part != "layers":
                level = root.get("/".join([*parents[: depth + 1], "vars"]))
                names.append(str(level.attrs.get("name", part)) if level is not None else part)
        layer = ".".join(names) or str(group.attrs.get("name", "model"))
        class_name, config = configs.get(names[-1], (None, None)) if names else (None, None)
        if class_name is not None:
            kind = _CLASS_KINDS.get(class_name)
        else:
            kind = _SNAKE_KINDS.get(re.sub(r"_\d+$", "", parents[-1])) if parents else None
        datasets = [group[k] for k in sorted(group, key=lambda k: (len(k), k))]  # 0, 1, ..., 10
        var_names = _keras_var_names(kind, len(datasets), config, f"layer '{layer}'")
        layers.append((layer, kind, list(zip(var_names, datasets))))
    return layers


def _legacy_kind(variables: list[tuple[str, Any]]) -> str | None:
    """A legacy layer's kind from its variable names, when the file has no model config."""
    names = {v for v, _ in variables}
    if "depthwise_kernel" in names:
        return "depthwise"
    if "moving_mean" in names:
        return "batchnorm"
    if "embeddings" in names:
        return "embedding"
    if "gamma" in names or "beta" in names:
        return "layernorm"
    kernel = next((d for v, d in variables if v == "kernel"), None)
    if kernel is None:
        return None
    return "dense" if kernel.ndim == 2 else "conv"


def _legacy_layers(root: Any, configs: dict[str, tuple[str, dict[str, Any]]]) -> list[Layer]:
    """The layers of a legacy HDF5 file: ``layer_names``/``weight_names`` attributes give order and names."""
    layers: list[Layer] = []
    for raw in root.attrs["layer_names"]:
        layer = raw.decode() if isinstance(raw, bytes) else str(raw)
        group = root[layer]
        weight_names = [w.decode() if isinstance(w, bytes) else str(w) for w in group.attrs.get("weight_names", [])]
        if not weight_names:
            continue
        variables = [(w.rsplit("/", 1)[-1].split(":")[0], group[w]) for w in weight_names]  # conv2d/kernel:0
        class_name = configs.get(layer, (None, None))[0]
        kind = _CLASS_KINDS.get(class_name) if class_name is not None else _legacy_kind(variables)
        layers.append((layer, kind, variables))
    return layers


def _open_keras(path: Path) -> tuple[Any, dict[str, Any] | None]:
    """The HDF5 weights of a ``.keras`` zip or an ``.h5`` file, and the model config if the file has one."""
    h5py = _require("h5py", path)
    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "model.weights.h5" not in names:
                raise SourceError(
                    f"'{path}' is a zip without 'model.weights.h5' (it holds {names[:5]}): not a "
                    "Keras 3 .keras file with HDF5 weights (sharded weights are not supported)"
                )
            config = json.loads(z.read("config.json")) if "config.json" in names else None
            data = io.BytesIO(z.read("model.weights.h5"))
        return h5py.File(data, "r"), config
    f = h5py.File(path, "r")
    raw = f.attrs.get("model_config")
    config = json.loads(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else None
    return f, config


def read_keras_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a Keras ``.keras`` or ``.h5`` file as a PyTorch-convention state_dict, in layer order.

    Args:
        path: a Keras 3 ``.keras`` file, a Keras 3 ``.weights.h5`` file, or a legacy HDF5 model/weights file.

    Returns:
        ``{"<layer>.<role>": tensor}`` with roles weight/bias/running_mean/running_var and PyTorch layouts (see the
        module docstring); the layers in model order, each layer's tensors together.

    Raises:
        DataNotFoundError: the file does not exist.
        SourceError: the file is not a readable Keras weights file, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"Keras weights file '{path}' does not exist")
    try:
        f, model_config = _open_keras(path)
    except SourceError:
        raise
    except Exception as e:  # zipfile.BadZipFile, OSError from HDF5, JSON errors
        raise SourceError(f"'{path}' is not a readable Keras weights file: {type(e).__name__}: {e}") from e
    try:
        with f:
            root = f["model_weights"] if "model_weights" in f else f
            configs = _keras_layer_configs(model_config) if model_config is not None else {}
            layers = _legacy_layers(root, configs) if "layer_names" in root.attrs else _keras3_layers(root, configs)
            out: dict[str, torch.Tensor] = {}
            for layer, kind, variables in layers:
                for var, dataset in variables:
                    role, tensor = _keras_tensor(kind, var, dataset[()])
                    out[f"{layer}.{role}"] = tensor
    except SourceError as e:
        raise SourceError(f"'{path}': {e}") from e
    except Exception as e:  # a truncated dataset, a missing group named by an attribute
        raise SourceError(f"'{path}' is not a readable Keras weights file: {type(e).__name__}: {e}") from e
    if not out:
        raise SourceError(
            f"'{path}' holds no layer weights (neither Keras 3 'layers/*/vars' groups nor a legacy "
            "'layer_names' attribute)"
        )
    return out
