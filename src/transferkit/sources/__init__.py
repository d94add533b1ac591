"""Where weights come from. ``load_source`` is the one door every source goes through.

A source is named the same way everywhere (recipe, CLI, Python):

- ``timm:NAME`` — a timm architecture; pretrained weights fetched by timm (network), or a local ``weights`` file;
- ``torchvision:NAME`` — a torchvision architecture and its default weights;
- ``hf:NAME_OR_FOLDER`` — a Hugging Face transformers encoder: vision (ViT, ...), text (BERT, MiniLM, ...) or audio
  (wav2vec2, HuBERT, AST, Whisper...), told apart by its config;
- ``seq:gru``, ``seq:cnn1d`` — small encoders of frame features (MFCC...), random initialisation;
- a path: a transferkit model folder (``model.json``), its ``model.safetensors``, or a Hugging Face folder;
- a built-in name for weights shipped by an installed package (``transferkit ls``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transferkit.config import SourceSpec
from transferkit.errors import SourceError, UnknownNameError, did_you_mean, unusable_path
from transferkit.models.base import PREFIXES as PREFIXES
from transferkit.models.base import Backbone, SourceModel, build_backbone, load_model, source_prefixes
from transferkit.registry import Registry

BUILTIN_SOURCES: Registry[Callable[[bool], SourceModel]] = Registry("source")


def _as_spec(spec: str | SourceSpec | Mapping[str, Any]) -> SourceSpec:
    if isinstance(spec, SourceSpec):
        return spec
    if isinstance(spec, str):
        return SourceSpec(name=spec)
    return SourceSpec(**spec)


def _from_backbone(bb: Backbone, arch: dict[str, Any], source_labels: list[str] | None) -> SourceModel:
    arch = {**arch, "kwargs": {**arch.get("kwargs", {}), **bb.arch_kwargs}}
    head = bb.head if bb.head is not None else __import__("torch").nn.Identity()
    model = SourceModel(bb.module, head, arch, bb.preprocess, source_labels, bb.num_features, bb.groups)
    model.processor = bb.processor
    return model


def hf_family(name: str) -> str:
    """The backbone family of a Hugging Face model by its config: ``hf_audio`` for audio encoders (wav2vec2, HuBERT,
    AST, Whisper...), ``hf_text`` for text encoders, else ``hf``."""
    from transformers import AutoConfig

    from transferkit.models.audio import is_audio_config

    try:
        cfg = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        return "hf"  # the builder reports the problem with the full message
    if is_audio_config(cfg):
        return "hf_audio"
    vision = hasattr(cfg, "image_size") or hasattr(cfg, "vision_config") or hasattr(cfg, "num_channels")
    return "hf_text" if hasattr(cfg, "vocab_size") and not vision else "hf"


def _imagenet_labels(num_classes: int | None) -> list[str] | None:
    """The 1000 ImageNet class names (a new list each call: callers may change theirs), None for other heads."""
    return list(_imagenet_names()) if num_classes == 1000 else None


@functools.cache
def _imagenet_names() -> tuple[str, ...]:
    """Read once: timm's ImageNetInfo parses its files on every construction (26 ms of the 152 ms that loading
    efficientnet_lite0 took under cProfile)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i).split(",")[0] for i in range(1000))


def load_source(spec: str | SourceSpec | Mapping[str, Any]) -> SourceModel:
    """Load a source model: its backbone, its own classifier (if any) and its preprocessing.

    Args:
        spec: a source name (see the module docstring), or ``{name, pretrained, weights}``.

    Returns:
        A ``SourceModel`` whose ``origin`` maps each tensor to the source tensor it came from.
    """
    spec = _as_spec(spec)
    problems = source_option_problems(spec)
    if problems:
        raise SourceError("; ".join(problems))
    name = spec.name
    prefix, _, rest = name.partition(":")
    if prefix in source_prefixes() and rest:
        arch = {"family": hf_family(rest) if prefix == "hf" else prefix, "name": rest, "kwargs": {}}
        bb = build_backbone(arch, pretrained=spec.pretrained, weights=spec.weights)
        num_out = getattr(bb.head, "out_features", None)
        model = _from_backbone(bb, arch, _imagenet_labels(num_out) if spec.pretrained else None)
        model.origin = {k: f"{name}:{k}" for k in model.state_dict()} if (spec.pretrained or spec.weights) else {}
        return model
    if name in BUILTIN_SOURCES:
        return BUILTIN_SOURCES.get(name)(spec.pretrained)
    path = Path(name).expanduser()
    if path.exists():
        if _is_model_path(path):
            saved = load_model(path)
            if not isinstance(saved, SourceModel):
                raise SourceError(
                    f"'{path}' is a multi-task model (tasks: {', '.join(saved.tasks)}): a source has one head; give "
                    "one of the models it merged"
                )
            saved.origin = {k: f"{path}:{k}" for k in saved.state_dict()}
            return saved
        if path.is_dir() and (path / "config.json").is_file():
            return load_source(SourceSpec(name=f"hf:{path}", pretrained=spec.pretrained, weights=spec.weights))
        raise SourceError(
            f"'{path}' holds weights but not their architecture. Name the architecture and point at the file: "
            f"source: {{name: 'timm:ARCH', weights: '{path}'}} (or save it with transferkit to get a model folder)."
        )
    raise UnknownNameError(
        f"unknown source '{name}'.{did_you_mean(name, BUILTIN_SOURCES)} A source is timm:NAME, torchvision:NAME, "
        f"hf:NAME_OR_FOLDER, an existing path, or a built-in: {', '.join(BUILTIN_SOURCES)}."
    )


def check_source_spec(spec: SourceSpec) -> list[str]:
    """Problems with a source name that can be seen without loading it."""
    prefix, sep, rest = spec.name.partition(":")
    if sep and prefix in source_prefixes():
        if not rest:
            return [f"'{spec.name}' names no model after '{prefix}:'"]
        return _unknown_architecture(prefix, rest)
    try:
        if spec.name in BUILTIN_SOURCES or Path(spec.name).expanduser().exists():
            return []
    except (OSError, RuntimeError) as e:  # a name too long for a path, ~user of no such user
        return [unusable_path(spec.name, e, "timm:NAME, torchvision:NAME, hf:NAME_OR_FOLDER or an existing path")]
    return [
        f"unknown source '{spec.name}'.{did_you_mean(spec.name, BUILTIN_SOURCES)} Use timm:NAME, torchvision:NAME, "
        f"hf:NAME_OR_FOLDER, an existing path, or a built-in: {', '.join(BUILTIN_SOURCES)}."
    ]


def _unknown_architecture(prefix: str, name: str) -> list[str]:
    """A ``timm:`` or ``torchvision:`` name its library does not know, found from the library's model list (no
    weights, no network). Hugging Face names are not checked: a hub name is only known to the hub."""
    if prefix == "timm":
        import timm

        if timm.is_model(name):
            return []
        close = timm.list_models(f"*{name[:6]}*")[:8]
        return [f"timm has no model '{name}'. Similar timm names: {', '.join(close) or 'none'} (timm.list_models())"]
    if prefix == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if name in names:
            return []
        return [f"torchvision has no model '{name}'.{did_you_mean(name, names)} (torchvision.models.list_models())"]
    return []


def backbone_group_count(spec: SourceSpec) -> int | None:
    """How many backbone layer groups a ``timm:`` source has, from its architecture built on the meta device (no
    memory, no weights: milliseconds), so that ``validate`` can check ``freeze: {groups: K}`` before any training.
    None for other sources (built-ins, folders, Hugging Face: their groups are counted when they load)."""
    prefix, _, name = spec.name.partition(":")
    if prefix != "timm" or not name or _unknown_architecture("timm", name):
        return None
    import timm
    import torch

    from transferkit.models.vision import groups_from_timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return len(groups_from_timm(model)) if hasattr(model, "group_matcher") else None


def _is_model_path(path: Path) -> bool:
    """A transferkit model folder, or a file inside one (its ``model.safetensors``): weights and architecture."""
    return (path / "model.json").is_file() or (path.is_file() and (path.parent / "model.json").is_file())


def source_option_problems(spec: SourceSpec) -> list[str]:
    """Problems of ``weights`` and ``pretrained`` for a source that would not read them, each as ``KEY: reason``.

    A built-in source loads the weights its package ships, and a transferkit model folder (or its weights file)
    carries its own: a ``weights`` file given with either would be silently dropped, so it is refused instead; so is
    ``pretrained: false`` for a model folder, which always loads its trained weights (a Hugging Face folder reads
    it: its architecture is built from config.json with random weights).
    """
    name = spec.name
    prefix, sep, _ = name.partition(":")
    if sep and prefix in source_prefixes():
        return []
    problems = []
    if name in BUILTIN_SOURCES:
        if spec.weights:
            problems.append(
                f"weights: the built-in source '{name}' loads the weights its package ships and reads no weights "
                "file; drop weights, or name the architecture with the file: "
                f"{{name: 'timm:ARCH' (or 'hf:FOLDER'), weights: '{spec.weights}'}}"
            )
        return problems
    try:
        path = Path(name).expanduser()
        _is_model_path(path)
    except (OSError, RuntimeError):  # not a usable path: check_source_spec reports it
        return problems
    if _is_model_path(path) and spec.weights:
        problems.append(
            f"weights: '{name}' is a transferkit model and carries its own weights; a weights file is not read "
            f"with it: drop weights, or name the architecture with the file: "
            f"{{name: 'timm:ARCH', weights: '{spec.weights}'}}"
        )
    if _is_model_path(path) and not spec.pretrained:
        problems.append(
            f"pretrained: '{name}' is a transferkit model and always loads its trained weights; pretrained: false "
            "is not read with it: to start from random weights, name its architecture: "
            "{name: 'timm:ARCH' (or 'hf:NAME'), pretrained: false}"
        )
    return problems


# Built-in sources register themselves on import.
from transferkit.sources import efficientnet_lite, minilm, resemblyzer  # noqa: E402,F401

source_prefixes()  # every built-in backbone family registered: PREFIXES is complete
