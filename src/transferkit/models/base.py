"""The SourceModel contract every modality shares: a backbone that maps inputs to pooled features, and a head.

The same class is the loaded source (with its original classifier as ``head``) and the target (after
``reset_head``). It follows timm's model contract: ``features`` (forward_features + pooling), ``head``,
``reset_head``, ``layer_groups`` (input -> output) and a ``preprocess`` description saved with the model.
What differs between images, text and audio is only the backbone family (``register_family``), its
``preprocess`` (``modality`` says which) and its ``processor`` (a tokenizer or feature extractor, saved beside
the weights).

A backbone is described by ``arch`` (a JSON-able dict: family, name, keyword arguments) from which
``build_backbone`` rebuilds it without weights, so a saved model reloads with no recipe or network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit import __version__
from transferkit.data.modality import get_modality
from transferkit.errors import SourceError, UnknownNameError, did_you_mean
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
    processor: Any = None  # tokenizer / feature extractor with save_pretrained (text, audio); None for images


class SourceModel(nn.Module):
    """Inputs -> ``backbone`` -> pooled features -> ``head`` -> logits.

    Inputs are what the modality's dataset yields: an image batch tensor, or a dict of tensors (a tokenized text
    batch, audio features).

    Args:
        backbone: the feature extractor (returns ``(batch, num_features)``).
        head: the classifier (``nn.Linear`` or the source's own head).
        arch: how to rebuild ``backbone`` (see ``build_backbone``).
        preprocess: input size, mean, std, interpolation, channels.
        labels: class names, in output order.
        num_features: width of the pooled features.
        groups: layer groups as (name, regex) over backbone parameter names, input to output.
    """

    # set after construction, by the sources and by the transfer: where each tensor came from
    # (name -> "source:name"), and a target's transfer report
    origin: dict[str, str]
    report: dict[str, Any]

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        arch: dict[str, Any],
        preprocess: dict[str, Any],
        labels: list[str] | None,
        num_features: int,
        groups: list[tuple[str, str]] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.arch = arch
        self.preprocess = preprocess
        self.labels = labels
        self.num_features = num_features
        self.groups = groups or []
        self.adapter: dict[str, Any] | None = None  # e.g. LoRA adapters injected in the backbone
        self.processor: Any = None  # tokenizer / feature extractor (text, audio)

    @property
    def modality(self) -> str:
        """``image``, ``text`` or ``audio`` (from ``preprocess``)."""
        return str(self.preprocess.get("modality", "image"))

    def features(self, x: Any) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: Any, return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits; with ``return_features`` also the pooled features (through ``forward``, so DDP sees the call)."""
        features = self.features(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits

    def reset_head(self, num_outputs: int, labels: list[str] | None = None, dropout: float = 0.0) -> nn.Module:
        """Replace the head with a fresh linear classifier for ``num_outputs`` classes."""
        self.head = linear_head(self.num_features, num_outputs, dropout)
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
        return head_spec(self.head)


def linear_head(num_features: int, num_outputs: int, dropout: float = 0.0) -> nn.Module:
    """A fresh linear classifier (behind a dropout layer when ``dropout``), initialised to give small logits."""
    linear = nn.Linear(num_features, num_outputs)
    nn.init.trunc_normal_(linear.weight, std=0.01)  # small logits at start: the new head learns fast
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.Dropout(dropout), linear) if dropout else linear


def head_spec(head: nn.Module) -> dict[str, Any]:
    """What ``model.json`` records of a head (``linear_head`` rebuilds it from this)."""
    linear = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise SourceError("the model head has no nn.Linear; transferkit saves linear heads only")
    dropout = [m.p for m in head.modules() if isinstance(m, nn.Dropout)]
    return {
        "type": "linear",
        "in_features": linear[-1].in_features,
        "num_classes": linear[-1].out_features,
        "dropout": dropout[0] if dropout else 0.0,
    }


class MultiTaskModel(nn.Module):
    """One backbone, one head per task: inputs -> ``backbone`` -> pooled features -> ``heads[i]`` -> task i's logits.

    What merging models fine-tuned on different label sets gives (``transferkit.merge``). A task is always named:
    ``forward(x, task)``, or ``task(name)``, a SourceModel sharing this backbone and that task's head, which
    ``evaluate``, ``Predictor`` and the engine take like any model.

    Args:
        backbone: the shared feature extractor (returns ``(batch, num_features)``).
        heads: one linear classifier per task.
        tasks: the tasks' names (unique), in the order of ``heads``.
        labels: each task's class names, in output order.
        arch, preprocess, num_features, groups: as for ``SourceModel`` (one backbone, one input format).
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: Sequence[nn.Module],
        tasks: Sequence[str],
        labels: Sequence[list[str] | None],
        arch: dict[str, Any],
        preprocess: dict[str, Any],
        num_features: int,
        groups: list[tuple[str, str]] | None = None,
    ):
        super().__init__()
        if not len(heads) == len(tasks) == len(labels) or not heads:
            raise ValueError(f"{len(tasks)} tasks, {len(heads)} heads and {len(labels)} label lists: give one each")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)}")
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)  # by position: a task's name may hold characters a module name cannot
        self.tasks = list(tasks)
        self.task_labels = list(labels)
        self.arch = arch
        self.preprocess = preprocess
        self.num_features = num_features
        self.groups = groups or []
        self.adapter: dict[str, Any] | None = None  # never set: adapters are merged into the weights first
        self.processor: Any = None

    @property
    def modality(self) -> str:
        return str(self.preprocess.get("modality", "image"))

    def index(self, task: str) -> int:
        """The position of ``task``; an unknown name is an error listing the tasks there are."""
        if task not in self.tasks:
            raise UnknownNameError(
                f"unknown task '{task}'.{did_you_mean(task, self.tasks)} This multi-task model has the tasks: "
                f"{', '.join(self.tasks)}"
            )
        return self.tasks.index(task)

    def forward(self, x: Any, task: str) -> torch.Tensor:
        """The logits of ``task``."""
        return self.heads[self.index(task)](self.backbone(x))

    def task(self, name: str) -> SourceModel:
        """Task ``name`` as a SourceModel: this backbone and that task's head (the same modules, not copies)."""
        i = self.index(name)
        view = SourceModel(
            self.backbone,
            self.heads[i],
            self.arch,
            self.preprocess,
            self.task_labels[i],
            self.num_features,
            self.groups,
        )
        view.processor = self.processor
        view.training = self.training
        return view

    def task_specs(self) -> list[dict[str, Any]]:
        """What ``model.json`` records of the tasks, in order: name, labels, head."""
        return [
            {"name": t, "labels": labels, "head": head_spec(head)}
            for t, labels, head in zip(self.tasks, self.task_labels, self.heads)
        ]


Builder = Callable[[str, bool, "str | None", dict[str, Any]], Backbone]
FAMILIES: dict[str, Builder] = {}
PREFIXES: list[str] = []  # families a source names directly as PREFIX:NAME (hf_text is reached through hf:)


def register_family(name: str, builder: Builder, prefix: bool = True) -> None:
    """Make ``arch.family == name`` buildable: ``builder(name, pretrained, weights, kwargs) -> Backbone``; with
    ``prefix``, sources can name it as ``name:ARCH``."""
    FAMILIES[name] = builder
    if prefix and name not in PREFIXES:
        PREFIXES.append(name)


def source_prefixes() -> list[str]:
    """The ``PREFIX:NAME`` forms a source may take (timm, torchvision, hf, ...)."""
    _load_families()
    return list(PREFIXES)


def build_backbone(arch: dict[str, Any], pretrained: bool = False, weights: str | None = None) -> Backbone:
    """Build the backbone ``arch`` describes (with its source weights when ``pretrained``)."""
    _load_families()
    family = arch.get("family")
    if family not in FAMILIES:
        raise SourceError(f"unknown backbone family '{family}'; valid: {', '.join(FAMILIES)}")
    return FAMILIES[family](arch["name"], pretrained, weights, dict(arch.get("kwargs", {})))


def load_hf_model(name: str, pretrained: bool, config_dict: dict[str, Any] | None) -> nn.Module:
    """A transformers ``AutoModel``: rebuilt from a saved model's stored config (no weights), with its pretrained
    weights, or randomly initialised from its config. transformers' ``OSError`` (no such folder or hub name)
    propagates: each family words its own message."""
    from transformers import AutoConfig, AutoModel

    if config_dict is not None:
        return AutoModel.from_config(AutoConfig.for_model(**config_dict))
    if pretrained:
        return AutoModel.from_pretrained(name)
    return AutoModel.from_config(AutoConfig.from_pretrained(name))


def _load_families() -> None:
    """The built-in families register themselves when their module is imported."""
    from transferkit.models import audio, text, vision  # noqa: F401


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading a model folder: model.safetensors + model.json.


def save_model(model: SourceModel | MultiTaskModel, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/model.json`` (swapped in whole: never half-written).

    A single-task model's ``model.json`` holds its ``head`` and ``labels``; a multi-task model's holds ``tasks``
    (name, labels and head of each, in order) instead.
    """
    heads = (
        {"tasks": model.task_specs()}
        if isinstance(model, MultiTaskModel)
        else {"head": model.head_spec(), "labels": model.labels}
    )
    meta = {
        "format": MODEL_FORMAT,
        "task": get_modality(model.modality).task,
        "transferkit_version": __version__,
        "arch": model.arch,
        "num_features": model.num_features,
        **heads,
        "preprocess": model.preprocess,
        "groups": model.groups,
        "adapter": model.adapter,
        **(extra or {}),
    }
    state = model.state_dict()

    def fill(tmp: Path) -> None:
        save_tensors(tmp / "model.safetensors", state, metadata={"format": MODEL_FORMAT})
        if model.processor is not None:
            model.processor.save_pretrained(str(tmp / "processor"))
        write_json(tmp / "model.json", meta)

    return replace_dir(Path(folder), fill)


_MODEL_KEYS: dict[str, type | tuple[type, ...]] = {"arch": dict, "num_features": int, "preprocess": dict}
_ONE_TASK_KEYS: dict[str, type | tuple[type, ...]] = {"head": dict, "labels": (list, type(None))}
_TASK_KEYS: dict[str, type | tuple[type, ...]] = {"name": str, "head": dict, "labels": (list, type(None))}


def _read_model_json(path: Path) -> dict[str, Any]:
    """``model.json``, checked: a file cut short or edited by hand is named, with what is wrong in it."""
    fix = "copy the model folder again, or save the model again"
    try:
        meta = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise SourceError(f"'{path}' is corrupt or truncated: it is not valid JSON ({e}); {fix}") from None
    if not isinstance(meta, dict):
        raise SourceError(f"'{path}' is corrupt: it holds a {type(meta).__name__}, not a mapping of keys; {fix}")
    if meta.get("format") != MODEL_FORMAT:
        raise SourceError(f"'{path}' has format {meta.get('format')!r}; this transferkit reads {MODEL_FORMAT}")
    keys = {**_MODEL_KEYS, **({"tasks": list} if "tasks" in meta else _ONE_TASK_KEYS)}
    missing = [k for k in keys if k not in meta]
    wrong = [k for k, t in keys.items() if k in meta and not isinstance(meta[k], t)]
    if not missing and not wrong:
        wrong = _wrong_heads(meta)
        if "name" not in meta["arch"]:
            wrong = ["arch.name"]
    if missing or wrong:
        what = (f"misses {', '.join(missing)}" if missing else "") + (" and " if missing and wrong else "")
        what += f"has no valid {', '.join(wrong)}" if wrong else ""
        raise SourceError(f"'{path}' is incomplete or corrupt: it {what}; {fix}")
    return meta


def _wrong_heads(meta: dict[str, Any]) -> list[str]:
    """The first invalid head entry of a ``model.json`` whose keys have the right types ([] when all are valid)."""
    if "head" in meta:
        return [] if isinstance(meta["head"].get("num_classes"), int) else ["head.num_classes"]
    tasks = meta["tasks"]
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or not all(isinstance(t.get(k), c) for k, c in _TASK_KEYS.items()):
            return [f"tasks.{i} (name, labels, head)"]
        if not isinstance(t["head"].get("num_classes"), int):
            return [f"tasks.{i}.head.num_classes"]
    names = [t["name"] for t in tasks]
    return [] if names and len(set(names)) == len(names) else ["tasks (one or more, each named once)"]


def check_tensor_kinds(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse a weights file whose tensors are integers where the model holds floats (or the reverse).

    A safetensors header that lies about a dtype of the same width (``I32`` for ``F32``) passes safetensors' own
    checks, and ``load_state_dict`` would copy the integers into the float parameters without a word: the model
    would load with garbage weights. Widths that differ are caught by safetensors (the offsets no longer add up).
    """
    own = module.state_dict()
    for name, tensor in state.items():
        target = own.get(name)
        if target is not None and target.is_floating_point() != tensor.is_floating_point():
            raise SourceError(
                f"'{path}': tensor '{name}' is stored as {tensor.dtype} but the model's is {target.dtype}; the "
                "file's header does not describe its data (a broken or hand-edited file, or weights of another "
                "model). Save, copy or download the weights again."
            )


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, strict: bool = True) -> Any:
    """``module.load_state_dict(state)`` whose failures name the file, the tensor and the fix, not torch's traceback.

    A header whose shapes were swapped keeps the file's length and every offset valid (safetensors reads it), but
    ``load_state_dict`` refuses the shapes with a ``RuntimeError`` listing every mismatch; the first one is named.

    Returns:
        torch's ``(missing_keys, unexpected_keys)``.
    """
    check_tensor_kinds(module, state, path)
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise weights_mismatch(path, e) from e


def weights_mismatch(path: str | Path, error: BaseException) -> SourceError:
    """The SourceError for a ``load_state_dict`` that refused ``path``'s tensors: its first reason, and the fix."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))), "")
    more = f" ({len(lines) - 2} more line(s) of the same kind)" if first and len(lines) > 2 else ""
    reason = (first or (lines[0] if lines else type(error).__name__)).rstrip(".")
    return SourceError(
        f"'{path}' does not fit the model: {reason}{more}. The file's "
        "header gives other shapes or names than the architecture has: give the weights saved from this "
        "architecture (or the architecture they were saved from), or save, copy or download the file again if it "
        "was edited or damaged."
    )


def load_model(folder: str | Path) -> SourceModel | MultiTaskModel:
    """Rebuild a saved model from its folder alone (no recipe, no network): a ``SourceModel``, or a
    ``MultiTaskModel`` where ``model.json`` records ``tasks``."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise SourceError(f"'{folder}' is not a transferkit model folder: it has no model.json")
    meta = _read_model_json(meta_path)
    arch = meta["arch"]
    if (folder / "processor").is_dir():  # the tokenizer / feature extractor saved beside the weights
        arch = {**arch, "kwargs": {**arch.get("kwargs", {}), "processor_dir": str(folder / "processor")}}
    backbone = build_backbone(arch, pretrained=False)
    groups = [tuple(g) for g in meta.get("groups", [])]
    model: SourceModel | MultiTaskModel
    if "tasks" in meta:
        heads = [
            linear_head(meta["num_features"], t["head"]["num_classes"], t["head"].get("dropout", 0.0))
            for t in meta["tasks"]
        ]
        tasks, labels = [t["name"] for t in meta["tasks"]], [t["labels"] for t in meta["tasks"]]
        model = MultiTaskModel(
            backbone.module, heads, tasks, labels, meta["arch"], meta["preprocess"], meta["num_features"], groups
        )
    else:
        model = SourceModel(
            backbone.module,
            nn.Identity(),
            meta["arch"],
            meta["preprocess"],
            meta["labels"],
            meta["num_features"],
            groups,
        )
        model.reset_head(meta["head"]["num_classes"], meta["labels"], meta["head"].get("dropout", 0.0))
    model.processor = backbone.processor
    if meta.get("adapter") and isinstance(model, SourceModel):
        from transferkit.models.adapters import inject_lora

        inject_lora(model, {k: v for k, v in meta["adapter"].items() if k != "type"})
    if meta.get("pruned"):  # the pruned channel counts (and heads) recorded at pruning, before the weights go in
        from transferkit.models.pruned import apply_shapes

        apply_shapes(model, meta["pruned"]["shapes"])
        model.num_features = int(meta["num_features"])
    if meta.get("quantized"):  # int8 weights are not plain tensors: their own reader rebuilds them
        from transferkit.models.quantized import load_quantized

        return load_quantized(model, folder, meta["quantized"])
    state = load_state_dict(folder / "model.safetensors")
    missing, unexpected = load_weights(model, state, folder / "model.safetensors", strict=False)
    if missing or unexpected:
        raise SourceError(
            f"'{folder}/model.safetensors' does not match its model.json: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.eval()
    return model
