"""The sizes of a pruned model, recorded so that the model reloads from its run directory alone.

Structured pruning shrinks layers in place: a convolution keeps half its output channels, an attention layer half
its heads. The saved ``state_dict`` then no longer fits the architecture that ``model.json``'s ``arch`` builds, and
``load_state_dict`` fails on every shrunk tensor (the most common complaint about pruned models). transformers 5 has
no ``prune_heads`` any more, so the config cannot say it either. ``shape_record`` writes down what differs from a
freshly built, unpruned copy: the size attributes a module's ``forward`` reads (channels, features, groups,
normalised shape, attention heads) and the shape of every changed parameter and buffer. ``apply_shapes`` puts them
back on the unpruned architecture (``load_model`` calls it before loading the weights).

A record is JSON: ``{"modules": {name: {attribute: value}}, "tensors": {name: shape}}``, names relative to the model
(``backbone.blocks.0.0.conv_dw``, ``head``).
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from transferkit.errors import SourceError
from transferkit.models.base import SourceModel, build_backbone

# The size attributes each layer type's forward (or its repr and later pruning) reads, by type. Subclasses count:
# timm's BatchNormAct2d is a BatchNorm2d.
SIZE_ATTRIBUTES: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.GroupNorm, ("num_groups", "num_channels")),
)
# Hugging Face BERT-like self-attention (BertSelfAttention, ViTSelfAttention...): forward reshapes by
# attention_head_size and scales by scaling; num_attention_heads and all_head_size describe the width.
ATTENTION_ATTRIBUTES = ("num_attention_heads", "attention_head_size", "all_head_size", "scaling")


def is_hf_attention(module: nn.Module) -> bool:
    """A BERT-like self-attention: ``query``/``key``/``value`` linear layers and integer head counts."""
    return all(isinstance(getattr(module, a, None), nn.Linear) for a in ("query", "key", "value")) and all(
        isinstance(getattr(module, a, None), int) for a in ATTENTION_ATTRIBUTES[:3]
    )


def _module_sizes(module: nn.Module) -> dict[str, Any]:
    """The size attributes of one module (empty for modules without any), JSON-able (tuples as lists)."""
    out: dict[str, Any] = {}
    for kind, attributes in SIZE_ATTRIBUTES:
        if isinstance(module, kind):
            for a in attributes:
                value = getattr(module, a)
                out[a] = list(value) if isinstance(value, tuple) else value
    if is_hf_attention(module):
        out.update({a: getattr(module, a) for a in ATTENTION_ATTRIBUTES if hasattr(module, a)})
    return out


def model_sizes(model: nn.Module, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every size ``model`` has: ``{"modules": {name: sizes}, "tensors": {name: shape}}`` (a full record, which
    ``apply_shapes`` also takes: pruning uses one to undo a prune that failed half-way)."""
    modules = {f"{prefix}{n}": s for n, m in model.named_modules() if (s := _module_sizes(m))}
    tensors = {f"{prefix}{n}": list(t.shape) for n, t in model.state_dict().items()}
    return {"modules": modules, "tensors": tensors}


def unpruned_sizes(model: SourceModel) -> dict[str, dict[str, Any]]:
    """The sizes of ``model``'s backbone as ``model.arch`` builds it (no weights): what ``load_model`` starts from."""
    fresh = build_backbone(model.arch, pretrained=False).module
    return model_sizes(fresh, prefix="backbone.")


def shape_record(model: SourceModel, reference: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """What ``apply_shapes`` needs to rebuild ``model``'s sizes on its unpruned architecture.

    Backbone modules and tensors are recorded where they differ from a freshly built copy (``reference``, from
    ``unpruned_sizes``; built here when not given); everything outside the backbone (the head, a handful of
    entries) is always recorded, since ``load_model`` builds the head from ``model.json`` rather than from ``arch``.

    Args:
        model: the (pruned) model.
        reference: ``unpruned_sizes(model)``, computed beforehand (pruning computes it before changing anything, so
            that an architecture that cannot be rebuilt is an error before the model is touched).
    """
    reference = unpruned_sizes(model) if reference is None else reference
    now = model_sizes(model)
    modules = {n: s for n, s in now["modules"].items() if reference["modules"].get(n) != s}
    tensors = {n: s for n, s in now["tensors"].items() if reference["tensors"].get(n) != s}
    return {"modules": modules, "tensors": tensors}


def apply_shapes(model: nn.Module, shapes: dict[str, Any]) -> None:
    """Give ``model`` (an unpruned architecture) the sizes in ``shapes``, so that the pruned weights load into it.

    Size attributes are set as recorded; each recorded parameter or buffer is replaced by an uninitialised tensor
    of its recorded shape (same dtype, device and ``requires_grad``): ``load_state_dict`` fills them next.

    Raises:
        SourceError: the record names a module, attribute or tensor this model lacks (it was made for another
            architecture).
    """
    named = dict(model.named_modules())
    module_sizes: dict[str, dict[str, Any]] = shapes.get("modules", {})
    tensor_shapes: dict[str, list[int]] = shapes.get("tensors", {})
    owners = {name.rpartition(".")[0] for name in tensor_shapes}
    for name in [*module_sizes, *sorted(owners)]:
        if name not in named:
            close = difflib.get_close_matches(name, list(named), n=3)
            raise SourceError(
                f"the pruned shape record names module '{name}', which this model lacks"
                + (f" (closest: {', '.join(close)})" if close else "")
                + "; the record was made for another architecture: save the pruned model again with its own record"
            )
    for name, sizes in module_sizes.items():
        module = named[name]
        for attribute, value in sizes.items():
            if not hasattr(module, attribute):
                raise SourceError(
                    f"the pruned shape record sets '{attribute}' on module '{name}' ({type(module).__name__}), "
                    "which has no such attribute; the record was made for another architecture"
                )
            setattr(module, attribute, tuple(value) if isinstance(value, list) else value)
    for name, shape in tensor_shapes.items():
        owner, _, attribute = name.rpartition(".")
        module = named[owner]
        param = module._parameters.get(attribute)
        buffer = module._buffers.get(attribute)
        if param is not None:
            fresh = torch.empty(shape, dtype=param.dtype, device=param.device)
            module._parameters[attribute] = nn.Parameter(fresh, requires_grad=param.requires_grad)
        elif buffer is not None:
            module._buffers[attribute] = torch.empty(shape, dtype=buffer.dtype, device=buffer.device)
        else:
            raise SourceError(
                f"the pruned shape record gives tensor '{name}', but module '{owner}' ({type(module).__name__}) has "
                f"no parameter or buffer '{attribute}'; the record was made for another architecture"
            )
