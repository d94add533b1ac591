"""The vision SourceModel: a backbone that maps images to pooled features, and a head.

The same class is the loaded source (with its original classifier as ``head``) and the target (after
``reset_head``). It follows timm's model contract: ``features`` (forward_features + pooling), ``head``,
``reset_head``, ``layer_groups`` (input -> output) and a ``preprocess`` description saved with the model.

A backbone is described by ``arch`` (a JSON-able dict: family, name, keyword arguments) from which
``build_backbone`` rebuilds it without weights, so a saved model reloads with no recipe or network.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit import __version__
from transferkit.errors import SourceError
from transferkit.io import load_state_dict, read_json, replace_dir, save_tensors, write_json

MODEL_FORMAT = "transferkit.model/1"


@dataclass
class Backbone:
    """A network without its classifier, plus what the classifier was."""

    module: nn.Module
    num_features: int
    head: nn.Module | None  # the source classifier, if the source had one
    preprocess: dict[str, Any] = field(default_factory=dict)  # input size, mean, std, interpolation
    groups: list[tuple[str, str]] = field(default_factory=list)  # (group name, regex on backbone param names)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments needed to rebuild it


class SourceModel(nn.Module):
    """Images -> ``backbone`` -> pooled features -> ``head`` -> logits.

    Args:
        backbone: the feature extractor (returns ``(batch, num_features)``).
        head: the classifier (``nn.Linear`` or the source's own head).
        arch: how to rebuild ``backbone`` (see ``build_backbone``).
        preprocess: input size, mean, std, interpolation, channels.
        labels: class names, in output order.
        num_features: width of the pooled features.
        groups: layer groups as (name, regex) over backbone parameter names, input to output.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, arch: dict[str, Any], preprocess: dict[str, Any],
                 labels: list[str] | None, num_features: int, groups: list[tuple[str, str]] | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.arch = arch
        self.preprocess = preprocess
        self.labels = labels
        self.num_features = num_features
        self.groups = groups or []
        self.adapter: dict[str, Any] | None = None  # e.g. LoRA adapters injected in the backbone

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor,
                return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits; with ``return_features`` also the pooled features (through ``forward``, so DDP sees the call)."""
        features = self.features(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits

    def reset_head(self, num_outputs: int, labels: list[str] | None = None, dropout: float = 0.0) -> nn.Module:
        """Replace the head with a fresh linear classifier for ``num_outputs`` classes."""
        linear = nn.Linear(self.num_features, num_outputs)
        nn.init.trunc_normal_(linear.weight, std=0.01)  # small logits at start: the new head learns fast
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.Dropout(dropout), linear) if dropout else linear
        self.labels = labels
        return self.head

    def layer_groups(self) -> list[tuple[str, list[str]]]:
        """Parameter names per layer group, ordered input -> output; the head is the last group."""
        names = [n for n, _ in self.backbone.named_parameters()]
        taken: set[str] = set()
        out: list[tuple[str, list[str]]] = []
        for gname, pattern in self.groups:
            rx = re.compile(pattern)
            members = [n for n in names if n not in taken and rx.search(n)]
            taken.update(members)
            if members:
                out.append((gname, [f"backbone.{n}" for n in members]))
        rest = [f"backbone.{n}" for n in names if n not in taken]
        if rest:
            out.append(("backbone_rest", rest))
        out.append(("head", [f"head.{n}" for n, _ in self.head.named_parameters()]))
        return out

    def head_spec(self) -> dict[str, Any]:
        linear = [m for m in self.head.modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise SourceError("the model head has no nn.Linear; transferkit saves linear heads only")
        dropout = [m.p for m in self.head.modules() if isinstance(m, nn.Dropout)]
        return {"type": "linear", "in_features": linear[-1].in_features, "num_classes": linear[-1].out_features,
                "dropout": dropout[0] if dropout else 0.0}


# ----------------------------------------------------------------------------------------------------------------
# Backbone families: build an architecture (optionally with pretrained weights) and cut off its classifier.


def _timm_backbone(name: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    create_kwargs = dict(kwargs)
    if weights:
        create_kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    try:
        model = timm.create_model(name, pretrained=pretrained or bool(weights), **create_kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = timm.list_models(f"*{name[:6]}*")[:8]
            raise SourceError(f"timm has no model '{name}'. Similar timm names: {', '.join(close) or 'none'}.") from e
        raise
    head = copy.deepcopy(model.get_classifier()) if model.num_classes else None
    if isinstance(head, nn.Identity):
        head = None
    model.reset_classifier(0)
    cfg = resolve_data_config({}, model=model)
    preprocess = {"input_size": list(cfg["input_size"]), "mean": list(cfg["mean"]), "std": list(cfg["std"]),
                  "interpolation": cfg.get("interpolation", "bilinear"), "crop_pct": cfg.get("crop_pct", 1.0)}
    groups = []
    if hasattr(model, "group_matcher"):
        groups = _groups_from_timm(model)
    return Backbone(model, model.num_features, head, preprocess, groups)


def _groups_from_timm(model: nn.Module) -> list[tuple[str, str]]:
    """timm's fine-grained layer groups, as (name, exact-name regex), input to output."""
    from timm.models import group_parameters

    grouped = group_parameters(model, model.group_matcher(coarse=False))
    out = []
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
        raise SourceError(f"torchvision has no model '{name}'. Choices include: "
                          f"{', '.join(torchvision.models.list_models()[:20])}...") from e
    model = torchvision.models.get_model(name, weights=tv_weights, **kwargs)
    if weights:
        model.load_state_dict(load_state_dict(weights))
    attr, head = None, None
    for candidate in ("fc", "classifier", "head", "heads"):
        if isinstance(getattr(model, candidate, None), nn.Module):
            attr, head = candidate, getattr(model, candidate)
            break
    if head is None:
        raise SourceError(f"cannot find the classifier of torchvision '{name}' (looked for fc, classifier, head)")
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
    from transformers import AutoConfig, AutoModel

    config_dict = kwargs.get("config")
    try:
        if config_dict is not None:  # rebuilding a saved model: architecture from its stored config, no weights
            config = AutoConfig.for_model(**config_dict)
            model = AutoModel.from_config(config)
        elif pretrained:
            model = AutoModel.from_pretrained(name)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(name))
    except OSError as e:
        raise SourceError(f"cannot load Hugging Face model '{name}': {e}. Give a local folder with config.json, "
                          "or a hub name on a machine with a network.") from e
    cfg = model.config
    mean, std, size = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], getattr(cfg, "image_size", 224)
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(name) if config_dict is None else None
        if proc is not None:
            mean, std = list(proc.image_mean), list(proc.image_std)
    except (OSError, ValueError):
        pass
    size = size if isinstance(size, int) else size[0]
    preprocess = {"input_size": [getattr(cfg, "num_channels", 3), size, size], "mean": mean, "std": std,
                  "interpolation": "bilinear", "crop_pct": 1.0}
    layers = getattr(cfg, "num_hidden_layers", 0)
    groups = [("embeddings", r"embeddings\.")] + [(f"layer{i}", rf"\.layers?\.{i}\.") for i in range(layers)]
    return Backbone(_HFPooled(model), cfg.hidden_size, None, preprocess, groups, {"config": cfg.to_dict()})


FAMILIES = {"timm": _timm_backbone, "torchvision": _torchvision_backbone, "hf": _hf_backbone}


def build_backbone(arch: dict[str, Any], pretrained: bool = False, weights: str | None = None) -> Backbone:
    """Build the backbone ``arch`` describes (with its source weights when ``pretrained``)."""
    family = arch.get("family")
    if family not in FAMILIES:
        raise SourceError(f"unknown backbone family '{family}'; valid: {', '.join(FAMILIES)}")
    return FAMILIES[family](arch["name"], pretrained, weights, dict(arch.get("kwargs", {})))


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading a model folder: model.safetensors + model.json.


def save_model(model: SourceModel, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/model.json`` (swapped in whole: never half-written)."""
    meta = {
        "format": MODEL_FORMAT,
        "task": "image_classification",
        "transferkit_version": __version__,
        "arch": model.arch,
        "num_features": model.num_features,
        "head": model.head_spec(),
        "labels": model.labels,
        "preprocess": model.preprocess,
        "groups": model.groups,
        "adapter": model.adapter,
        **(extra or {}),
    }
    state = model.state_dict()

    def fill(tmp: Path) -> None:
        save_tensors(tmp / "model.safetensors", state, metadata={"format": MODEL_FORMAT})
        write_json(tmp / "model.json", meta)

    return replace_dir(Path(folder), fill)


def load_model(folder: str | Path) -> SourceModel:
    """Rebuild a saved model from its folder alone (no recipe, no network)."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise SourceError(f"'{folder}' is not a transferkit model folder: it has no model.json")
    meta = read_json(meta_path)
    if meta.get("format") != MODEL_FORMAT:
        raise SourceError(f"'{meta_path}' has format {meta.get('format')!r}; this transferkit reads {MODEL_FORMAT}")
    backbone = build_backbone(meta["arch"], pretrained=False)
    head_spec = meta["head"]
    model = SourceModel(backbone.module, nn.Identity(), meta["arch"], meta["preprocess"], meta["labels"],
                        meta["num_features"], [tuple(g) for g in meta.get("groups", [])])
    model.reset_head(head_spec["num_classes"], meta["labels"], head_spec.get("dropout", 0.0))
    if meta.get("adapter"):
        from transferkit.strategies.lora import inject_lora

        inject_lora(model, {k: v for k, v in meta["adapter"].items() if k != "type"})
    state = load_state_dict(folder / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SourceError(f"'{folder}/model.safetensors' does not match its model.json: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    model.eval()
    return model
