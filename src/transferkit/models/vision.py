"""Vision backbone families: timm, torchvision and Hugging Face transformers vision encoders.

Each builder returns a ``Backbone`` (see ``models.base``): the network without its classifier, the classifier it
had, its preprocessing and its layer groups.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from transferkit.errors import SourceError
from transferkit.io import load_state_dict
from transferkit.models.base import (  # noqa: F401  (re-exported: the model contract lives in models.base)
    MODEL_FORMAT,
    Backbone,
    SourceModel,
    build_backbone,
    check_tensor_kinds,
    load_hf_model,
    load_model,
    load_weights,
    register_family,
    save_model,
    weights_mismatch,
)


def _timm_backbone(name: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    create_kwargs = dict(kwargs)
    if weights:
        # transferkit reads the file (a pickle that would run code is refused, naming what it imports), never
        # timm's own loader; timm then fits the tensors to the model as it does its checkpoints (checkpoint filter,
        # classifier, input channels). clean_state_dict drops DDP / torch.compile prefixes, as timm's loader did.
        from timm.models import clean_state_dict

        state = clean_state_dict(load_state_dict(weights))
        create_kwargs["pretrained_cfg_overlay"] = {"state_dict": state}
    try:
        model = timm.create_model(name, pretrained=pretrained or bool(weights), **create_kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = timm.list_models(f"*{name[:6]}*")[:8]
            raise SourceError(f"timm has no model '{name}'. Similar timm names: {', '.join(close) or 'none'}.") from e
        if weights and "state_dict" in str(e):  # timm's load_state_dict refused the file's shapes or names
            raise weights_mismatch(weights, e) from e
        raise
    if weights:  # the tensors are in already (timm copied them); integers copied into floats are refused after all
        check_tensor_kinds(model, state, weights)
    # get_classifier, reset_classifier and num_features are timm's additions to nn.Module
    head = copy.deepcopy(cast("Callable[[], nn.Module]", model.get_classifier)()) if model.num_classes else None
    if isinstance(head, nn.Identity):
        head = None
    cast("Callable[[int], None]", model.reset_classifier)(0)
    cfg = resolve_data_config({}, model=model)
    preprocess = {
        "input_size": list(cfg["input_size"]),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": cfg.get("crop_pct", 1.0),
    }
    groups = []
    if hasattr(model, "group_matcher"):
        groups = groups_from_timm(model)
    # models with a pre-logits layer after pooling (MobileNetV3, LCNet: conv_head) give head_hidden_size features,
    # not num_features (the width before it)
    width = getattr(model, "head_hidden_size", None) or model.num_features
    return Backbone(model, cast(int, width), head, preprocess, groups)


def groups_from_timm(model: nn.Module) -> list[tuple[str, str]]:
    """timm's fine-grained layer groups, as (name, exact-name regex), input to output."""
    from timm.models import group_parameters

    grouped = group_parameters(model, cast("Callable[..., Any]", model.group_matcher)(coarse=False))
    out: list[tuple[str, str]] = []
    for _gid, names in sorted(grouped.items(), key=lambda kv: kv[0]):
        names = [n for n in names if not n.startswith(("classifier", "head", "fc."))]
        if names:
            out.append((f"group{len(out)}", "^(" + "|".join(re.escape(n) for n in names) + ")$"))
    return out


def _torchvision_backbone(name: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]) -> Backbone:
    import torchvision

    try:
        tv_weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained and not weights else None
    except ValueError as e:
        raise SourceError(
            f"torchvision has no model '{name}'. Choices include: {', '.join(torchvision.models.list_models()[:20])}..."
        ) from e
    model = torchvision.models.get_model(name, weights=tv_weights, **kwargs)
    if weights:
        load_weights(model, load_state_dict(weights), weights)
    attr, head = None, None
    for candidate in ("fc", "classifier", "head", "heads"):
        if isinstance(getattr(model, candidate, None), nn.Module):
            attr, head = candidate, getattr(model, candidate)
            break
    if head is None:
        raise SourceError(f"cannot find the classifier of torchvision '{name}' (looked for fc, classifier, head)")
    assert attr is not None  # found together with the head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    num_features = linears[0].in_features
    setattr(model, attr, nn.Identity())
    mean, std, size, interp = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 224, "bilinear"
    if tv_weights is not None:
        t = tv_weights.transforms()
        mean, std, size = list(t.mean), list(t.std), t.crop_size[0]
    preprocess = {"input_size": [3, size, size], "mean": mean, "std": std, "interpolation": interp, "crop_pct": 0.875}
    groups = [(f"group{i}", rf"^{re.escape(n)}\.") for i, (n, _) in enumerate(model.named_children())]
    return Backbone(model, num_features, head, preprocess, groups)


class _HFPooled(nn.Module):
    """A transformers vision encoder returning pooled features (pooler output, else the CLS token)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        return pooled.flatten(1)


def _hf_backbone(name: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]) -> Backbone:
    config_dict = kwargs.get("config")
    try:
        model = load_hf_model(name, pretrained, config_dict)
    except OSError as e:
        raise SourceError(
            f"cannot load Hugging Face model '{name}': {e}. Give a local folder with config.json, "
            "or a hub name on a machine with a network."
        ) from e
    if weights:  # a local weights file of this architecture (the AutoModel's state_dict), by the safe loader
        load_weights(model, load_state_dict(weights), weights)
    cfg: Any = model.config  # a transformers config: its fields depend on the model type
    mean, std, size = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], getattr(cfg, "image_size", 224)
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(name) if config_dict is None else None
        if proc is not None:
            mean, std = list(proc.image_mean), list(proc.image_std)
    except (OSError, ValueError):
        pass
    size = size if isinstance(size, int) else size[0]
    preprocess = {
        "input_size": [getattr(cfg, "num_channels", 3), size, size],
        "mean": mean,
        "std": std,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    layers = getattr(cfg, "num_hidden_layers", 0)
    groups = [("embeddings", r"embeddings\.")] + [(f"layer{i}", rf"\.layers?\.{i}\.") for i in range(layers)]
    return Backbone(_HFPooled(model), cfg.hidden_size, None, preprocess, groups, {"config": cfg.to_dict()})


register_family("timm", _timm_backbone)
register_family("torchvision", _torchvision_backbone)
register_family("hf", _hf_backbone)
