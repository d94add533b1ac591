"""``transfer``: move every weight a source has into a target of another structure, and say what moved.

The flow, top to bottom: read the source tensors; build the target; optionally keep a subset of the source's
blocks (a shallower target); match (names, rules, structure: see ``match.py``); adapt each matched pair whose
shapes differ (``surgery.py``); copy; optionally initialise the target's extra blocks as identities; write the
report. Nothing is half-applied: every pair is adapted and checked before the first tensor is copied into the
target. Same-shape pairs are not cloned: the copy into the target reads the source tensor itself, so a transfer
needs no memory beyond the two models and the (usually small) tensors that surgery reshapes.

``transfer`` works on any ``nn.Module`` (timm, transformers, hand-written), on transferkit specs
(``timm:resnet34``) and on a builder (a callable returning the target, called after seeding); ``transfer_step``
is the recipe's ``transfer:`` step on top of it (see ``config.TransferConfig``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast, overload

import torch
from pydantic import ValidationError
from torch import nn

from transferkit.config.transfer import TransferConfig
from transferkit.errors import RecipeError, RunDirError
from transferkit.models.vision import SourceModel, build_backbone, save_model
from transferkit.transfer.match import (
    METHODS,
    TransferError,
    match_state_dicts,
    natural_key,
    normalize,
    shape_role,
)
from transferkit.transfer.surgery import (
    SurgeryError,
    adapt_input_channels,
    can_be_identity,
    head_from_labels,
    identity_init_block,
    net2net_chain,
    prefix_tokens,
    resize_pos_embed,
    select_layers,
    slice_or_tile,
    width_chain,
)

POS_EMBED_NAMES = ("pos_embed", "position_embeddings")
BOOKKEEPING = "BatchNorm step counter: bookkeeping, not learned; starts at 0"


# ----------------------------------------------------------------------------------------------------------------
# Reading the source, building the target


class _Source:
    """The source as the matcher sees it: tensors, optional layer groups and labels, a name for the report.

    ``original`` maps a renamed tensor to its name in the source (after ``source_blocks`` renumbered the blocks);
    ``dropped`` lists the source tensors left out before matching (blocks a shallower target does not take).
    """

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        name: str,
        groups: dict[str, str] | None = None,
        labels: list[str] | None = None,
        head: Sequence[str] = (),
        order: str = "as stored",
    ):
        self.state, self.name, self.groups, self.labels, self.head = state, name, groups, labels, list(head)
        self.order = order
        self.original: dict[str, str] = {}
        self.dropped: list[str] = []

    @overload
    def orig(self, name: str) -> str: ...
    @overload
    def orig(self, name: None) -> None: ...
    def orig(self, name: str | None) -> str | None:
        """The tensor's name in the source as given."""
        return None if name is None else self.original.get(name, name)


def _state_groups(model: SourceModel) -> dict[str, str]:
    """Every state_dict entry (buffers included) -> its layer group, named by the members' common module path."""
    module_group: dict[str, str] = {}
    for gname, members in model.layer_groups():
        parts = [m.split(".")[:-1] for m in members]
        common = parts[0] if parts else []
        for p in parts[1:]:
            k = 0
            while k < min(len(common), len(p)) and common[k] == p[k]:
                k += 1
            common = common[:k]
        label = ".".join(p for p in common if p != "backbone") or gname
        for m in members:
            module_group[m.rsplit(".", 1)[0]] = label
    out, last = {}, "(stem)"
    for name in model.state_dict():
        last = module_group.get(name.rsplit(".", 1)[0], last)  # a buffer belongs where its module's weights are
        out[name] = last
    return out


HEAD_ATTRIBUTES = ("classifier", "score")  # transformers' *ForSequenceClassification heads


def _head_names(model: nn.Module) -> list[str]:
    """The state_dict names of the model's classifier: transferkit's ``head``, timm's ``get_classifier()``, or a
    transformers ``classifier``/``score`` module."""
    if isinstance(model, SourceModel):
        return [f"head.{n}" for n in model.head.state_dict()]
    if hasattr(model, "get_classifier"):
        classifier = cast("Callable[[], nn.Module]", model.get_classifier)()  # timm's
        for mname, mod in model.named_modules():
            if mod is classifier and mname:
                return [f"{mname}.{n}" for n in mod.state_dict()]
    for attr in HEAD_ATTRIBUTES:
        mod = getattr(model, attr, None)
        if isinstance(mod, nn.Module):
            return [f"{attr}.{n}" for n in mod.state_dict()]
    return []


def source_label(source: SourceModel) -> str:
    """The source's name for a report: where its weights came from (``efficientnet_lite0``), else its arch."""
    first = next(iter((getattr(source, "origin", None) or {}).values()), "")
    return first.rsplit(":", 1)[0] if first else f"{source.arch['family']}:{source.arch['name']}"


def _hf_order(folder: Path, state: Mapping[str, torch.Tensor]) -> tuple[list[str], str] | None:
    """The module order of the weights in a Hugging Face folder, read from the architecture its ``config.json``
    names, built on the meta device (no memory, no weights). None when the folder is not a transformers folder
    or its model holds fewer than half of these tensors (then the caller falls back to the names' natural order)."""
    if not (folder / "config.json").is_file() or (folder / "model.json").is_file():
        return None
    try:
        import transformers
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        archs = list(getattr(config, "architectures", None) or [])
        cls = getattr(transformers, archs[0], None) if archs else None
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception:  # any failure only costs the better order, never the transfer
        return None
    names = list(model.state_dict())
    prefix = f"{getattr(model, 'base_model_prefix', '')}."  # a head model's file saved from its base model
    stripped = [n[len(prefix) :] if n.startswith(prefix) else n for n in names]
    names = max(names, stripped, key=lambda ns: len(set(ns) & set(state)))
    known = set(names) & set(state)
    if len(known) < len(state) / 2:
        return None  # another model's file: its order says nothing about these tensors
    # tensors the model no longer holds (old transformers saved embeddings.position_ids) go last, in natural order
    ordered = [n for n in names if n in known] + sorted(set(state) - known, key=natural_key)
    return ordered, type(model).__name__


def read_source(source: Any) -> _Source:
    """A source given as a spec (``load_source``), a weights file, a model, or a state_dict."""
    from transferkit.config import SourceSpec
    from transferkit.io import load_state_dict
    from transferkit.sources import load_source

    if isinstance(source, Mapping) and source and all(isinstance(v, torch.Tensor) for v in source.values()):
        return _Source(dict(source), "state_dict")
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_file() and not (path.parent / "model.json").is_file():
            # a bare weights file is a complete source for a transfer: the target brings the architecture
            state = load_state_dict(path)
            if path.suffix == ".safetensors":
                # safetensors files do not keep the writer's order (the header is sorted). A Hugging Face folder
                # says which architecture wrote it: its module order is exact. Otherwise the natural order of the
                # names (blocks.2 before blocks.10) is the best guess the structure pass can have
                hf = _hf_order(path.parent, state)
                if hf is not None:
                    order, arch = hf
                    state = {k: state[k] for k in order}
                    return _Source(state, str(path), order=f"module order of {arch} (the folder's config.json)")
                state = {k: state[k] for k in sorted(state, key=natural_key)}
                return _Source(state, str(path), order="natural sort of names (a safetensors file keeps no order)")
            return _Source(state, str(path))
    if isinstance(source, (str, Path, Mapping, SourceSpec)):
        spec = str(source) if isinstance(source, Path) else source
        source = load_source(spec)
        label = spec if isinstance(spec, str) else spec.name if isinstance(spec, SourceSpec) else spec.get("name")
    else:
        label = None
    if isinstance(source, SourceModel):
        return _Source(
            source.state_dict(),
            str(label or source_label(source)),
            _state_groups(source),
            source.labels,
            _head_names(source),
        )
    if isinstance(source, nn.Module):
        return _Source(source.state_dict(), type(source).__name__, None, None, _head_names(source))
    raise TransferError(
        f"cannot use a {type(source).__name__} as a transfer source: give a source name, a weights "
        "file, a model folder, an nn.Module or a state_dict"
    )


def model_from_arch(arch: Mapping[str, Any]) -> SourceModel:
    """A ``SourceModel`` with random weights for ``arch`` (``{family, name, kwargs}``), its preprocess made to follow
    the architecture arguments that change the input (``in_chans``, ``img_size``).

    Raises:
        TransferError: the architecture does not take one of the keyword arguments.
    """
    from transferkit.sources import _from_backbone

    arch = {"family": arch["family"], "name": arch["name"], "kwargs": dict(arch.get("kwargs") or {})}
    try:
        model = _from_backbone(build_backbone(arch, pretrained=False), arch, None)
    except TypeError as e:  # timm passes unknown keyword arguments down to the model class
        raise TransferError(
            f"cannot build {arch['family']}:{arch['name']} with {arch['kwargs']}: {e}. Drop the "
            "architecture arguments this model does not take (img_size is for ViT-style models)"
        ) from e
    pre, kw = model.preprocess, arch["kwargs"]
    chans = int(kw.get("in_chans", 0))
    if chans and "mean" in pre and chans != len(pre["mean"]):
        # timm's data config still says 3 channels; the data pipeline reads input_size[0] (grey images for 1)
        # and normalises per channel, so the statistics follow the summed/repeated first convolution
        pre["input_size"] = [chans, *pre["input_size"][1:]]
        for key in ("mean", "std"):
            vals = list(pre[key])
            pre[key] = [sum(vals) / len(vals)] if chans == 1 else [vals[i % len(vals)] for i in range(chans)]
    if kw.get("img_size") and "input_size" in pre:
        size = kw["img_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        pre["input_size"] = [pre["input_size"][0], int(h), int(w)]  # timm's data config keeps the default size
    model.origin = {}
    return model


def build_target_model(target: Any, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The target: a module as given (changed in place), a builder's module, or one built from a spec.

    Args:
        target: an ``nn.Module``; a callable returning one (a builder, e.g. ``lambda: BertForSequenceClassification
            (config)``: called here, after the caller seeded torch); or a spec as ``load_source`` takes
            (``timm:NAME``...), built without weights.
        kwargs: architecture keyword arguments for a ``family:NAME`` spec (``{"in_chans": 1}`` for grey images,
            ``{"img_size": 96}`` for a ViT at another size).
    """
    if isinstance(target, nn.Module):
        return target
    if callable(target):
        if kwargs:
            raise TransferError(
                f"architecture arguments {dict(kwargs)} apply to family:NAME targets; a builder "
                "takes its own arguments (functools.partial)"
            )
        model = target()
        if not isinstance(model, nn.Module):
            raise TransferError(f"the target builder returned a {type(model).__name__}, not an nn.Module")
        return model
    from transferkit.sources import PREFIXES, load_source

    name = str(target)
    prefix, _, rest = name.partition(":")
    if prefix in PREFIXES and rest:
        return model_from_arch({"family": prefix, "name": rest, "kwargs": dict(kwargs or {})})
    if kwargs:
        raise TransferError(f"architecture arguments {dict(kwargs)} apply to family:NAME targets, not '{name}'")
    model = load_source({"name": name, "pretrained": False})
    model.origin = {}
    return model


# ----------------------------------------------------------------------------------------------------------------
# A shallower target: a chosen subset of the source's blocks


def block_stack(names: Sequence[str]) -> tuple[str, list[int]] | None:
    """The model's stack of repeated blocks: the name prefix before ``.N.`` with the most distinct ``N``.

    ``encoder.layer`` for BERT, ``blocks`` for a ViT, ``""`` for an ``nn.Sequential`` of blocks. None when no
    name has a numbered part.

    Raises:
        TransferError: two unrelated stacks have the same, largest number of blocks (which one is meant cannot
            be told from names alone).
    """
    stacks: dict[str, set[int]] = {}
    for n in names:
        for m in re.finditer(r"(?:^|\.)(\d+)(?=\.)", n):
            stacks.setdefault(n[: m.start()], set()).add(int(m.group(1)))
    if not stacks:
        return None
    ranked = sorted(stacks, key=lambda p: (-len(stacks[p]), len(p)))
    best = ranked[0]
    # a tie with a stack nested in the best one (EfficientNet's blocks.1 inside blocks) is no ambiguity: the outer
    # stack wins; two separate stacks (ResNet's layer1, layer2) are
    rivals = [p for p in ranked[1:] if len(stacks[p]) == len(stacks[best]) and not p.startswith(f"{best}.")]
    if rivals:
        raise TransferError(
            f"the blocks to choose from are ambiguous: '{best}' and '{rivals[0]}' both hold "
            f"{len(stacks[best])} numbered blocks. source_blocks works on a model with one stack of "
            "repeated blocks (BERT's encoder.layer, a ViT's blocks); rename with rules instead."
        )
    return best, sorted(stacks[best])


def _take_source_blocks(src: _Source, target_names: Sequence[str], how: str | Sequence[int]) -> dict[str, Any]:
    """Keep the source blocks a shallower target takes and renumber them 0..k-1 (in place); returns the record."""
    s_stack, t_stack = block_stack(list(src.state)), block_stack(list(target_names))
    if s_stack is None or t_stack is None:
        side = "source" if s_stack is None else "target"
        raise TransferError(f"source_blocks needs numbered blocks on both sides; the {side} has none")
    (s_prefix, s_idx), (t_prefix, t_idx) = s_stack, t_stack
    if isinstance(how, str):
        try:
            taken = [s_idx[i] for i in select_layers(len(s_idx), len(t_idx), how)]
        except SurgeryError as e:
            raise TransferError(f"source_blocks={how!r}: {e}") from e
    else:
        taken = [int(i) for i in how]
        bad = [i for i in taken if i not in s_idx]
        if bad or len(taken) != len(t_idx):
            raise TransferError(
                f"source_blocks {taken}: the source stack '{s_prefix}' has blocks {s_idx} and the "
                f"target stack '{t_prefix}' has {len(t_idx)}; give {len(t_idx)} of the source's "
                f"blocks" + (f" ({bad} do not exist)" if bad else "")
            )
    new_index = {i: k for k, i in enumerate(taken)}
    lead = f"{s_prefix}." if s_prefix else ""
    rx = re.compile(rf"^{re.escape(lead)}(\d+)\.(.+)$")
    before: dict[str, torch.Tensor] = {}
    after: dict[str, torch.Tensor] = {}
    kept: dict[int, list[tuple[str, torch.Tensor]]] = {k: [] for k in range(len(taken))}
    for name, tensor in src.state.items():
        m = rx.match(name)
        if m is None:
            (after if any(kept.values()) or src.dropped else before)[name] = tensor
        elif int(m.group(1)) in new_index:
            k = new_index[int(m.group(1))]
            kept[k].append((f"{lead}{k}.{m.group(2)}", tensor))
            src.original[f"{lead}{k}.{m.group(2)}"] = name
        else:
            src.dropped.append(name)
    # the taken blocks in their new order where the stack was (the structure pass reads the order)
    state = {**before, **{n: t for k in range(len(taken)) for n, t in kept[k]}, **after}
    if src.groups:
        src.groups = {n: src.groups.get(src.orig(n), "(ungrouped)") for n in state}
    src.state = state
    return {
        "source_stack": s_prefix,
        "target_stack": t_prefix,
        "source_blocks": len(s_idx),
        "target_blocks": len(t_idx),
        "taken": taken,
        "how": how if isinstance(how, str) else "explicit",
    }


# ----------------------------------------------------------------------------------------------------------------
# Adapting a matched pair


class _Adapter:
    """Knows which target tensors surgery can adapt (first convolution, position embeddings, head by labels)."""

    def __init__(
        self,
        target: nn.Module,
        state: dict[str, torch.Tensor],
        source: _Source,
        labels: list[str] | None,
        resize: bool,
        widen: bool = False,
    ):
        self.state, self.source, self.labels, self.resize, self.widen = state, source, labels, resize, widen
        self.first_conv = next((n for n, t in state.items() if t.dim() == 4 and n.endswith("weight")), None)
        self.head = set(_head_names(target))
        shared = {str(x).lower() for x in (labels or [])} & {str(x).lower() for x in (source.labels or [])}
        self.head_by_labels = bool(shared)
        self._pos: dict[str, bool] = {}  # the structure pass asks about the same names thousands of times

    def is_pos_embed(self, name: str) -> bool:
        if name not in self._pos:
            self._pos[name] = name.rsplit(".", 1)[-1] in POS_EMBED_NAMES or normalize(name).endswith(
                "position_embeddings.weight"
            )
        return self._pos[name]

    def adaptable(self, sname: str, ss: tuple[int, ...], tname: str, ts: tuple[int, ...]) -> bool:
        """Whether ``adapt`` can turn a source tensor of shape ``ss`` into the target's ``ts`` (same role)."""
        if len(ss) != len(ts):
            return False
        if tname == self.first_conv and ss[0] == ts[0] and ss[2:] == ts[2:]:
            return True
        if self.is_pos_embed(tname) and self.is_pos_embed(sname) and ss[0] == ts[0] and ss[-1] == ts[-1]:
            return True
        if len(ts) == 2 and ss == ts[::-1]:
            return True
        if tname in self.head and sname in self.source.head and self.head_by_labels and ss[1:] == ts[1:]:
            return True
        if self.widen and ss[2:] == ts[2:]:
            return True  # channels differ, kernels do not: net2net_chain decides, consistently across layers
        return self.resize

    def adapt(self, sname: str, src: torch.Tensor, tname: str) -> tuple[torch.Tensor, str, int] | None:
        """(new target tensor, transform, number of elements that carry source values) or None if impossible."""
        dst = self.state[tname]
        ss, ts = tuple(src.shape), tuple(dst.shape)
        if ss == ts:
            # no clone: the copy into the target reads the source tensor (a transfer holds no third copy)
            return src, "copied", dst.numel()
        if not self.adaptable(sname, ss, tname, ts):
            return None
        if tname == self.first_conv and ss[0] == ts[0] and ss[2:] == ts[2:]:
            w, how = adapt_input_channels(src, ts[1])
            return w, how, w.numel()
        if self.is_pos_embed(tname) and len(ts) == 3:
            p = prefix_tokens(ts[1])
            side = int((ts[1] - p) ** 0.5)
            out = resize_pos_embed(src, (side, side), prefix_tokens(ss[1]))
            if out.shape[1] != ts[1]:
                return None
            return (
                out,
                f"interpolated (bicubic) {ss[1] - p}->{ts[1] - p} grid tokens, {p} prefix token(s) kept",
                out.numel(),
            )
        if len(ts) == 2 and ss == ts[::-1]:
            return src.t(), "transposed", dst.numel()  # a view, read by the copy
        if tname in self.head and self.head_by_labels and ss[1:] == ts[1:]:
            rows_src, rows_dst = src.reshape(ss[0], -1), dst.reshape(ts[0], -1)
            w, _, pairs = head_from_labels(rows_src, None, self.source.labels or [], rows_dst, None, self.labels or [])
            shared = [self.labels[t] for t, _ in pairs]  # type: ignore[index]
            return (
                w.reshape(ts),
                f"rows for {len(pairs)} shared label(s) from the source head ({', '.join(shared)})",
                len(pairs) * rows_dst.shape[1],
            )
        out, how = slice_or_tile(src, ts)
        return out, how, dst.numel()


# ----------------------------------------------------------------------------------------------------------------
# The transfer


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Repeated blocks: modules held directly by a Sequential/ModuleList that are not containers themselves."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Sequential, nn.ModuleList)):
            for child_name, child in mod.named_children():
                if not isinstance(child, (nn.Sequential, nn.ModuleList)) and any(True for _ in child.parameters()):
                    out.append((f"{name}.{child_name}" if name else child_name, child))
    return out


def transfer(
    source: Any,
    target: Any | Callable[[], nn.Module],
    *,
    rules: Sequence[Mapping[str, str]] | None = None,
    strict: bool = False,
    methods: Sequence[str] = METHODS,
    labels: Sequence[str] | None = None,
    extra_blocks: str = "fresh",
    source_blocks: str | Sequence[int] | None = None,
    resize: bool = False,
    target_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    widen: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Move every source weight that fits into the target; return the target and the transfer report.

    Args:
        source: a source spec (``efficientnet_lite0``, ``timm:resnet18``, a model folder, a Hugging Face folder), a
            weights file (``.safetensors``/``.pt``: only tensors are needed), any ``nn.Module`` (a ``SourceModel``,
            a timm or transformers model) or a state_dict. A Hugging Face folder given as its ``model.safetensors``
            moves all its tensors (BERT's pooler included, which the folder loaded as a text source drops), read
            in the module order of the architecture its ``config.json`` names.
        target: a spec built with random weights (``timm:resnet34``), any ``nn.Module`` (changed in place), or a
            builder: a callable returning the module, called after seeding (so ``seed`` fixes its fresh weights).
        rules: regex renames, ``[{"from": r"^features\\.(\\d+)", "to": r"blocks.\\1"}]``.
        strict: an ambiguous structural pairing is an error instead of a reported choice.
        methods: matching passes to run (``names``, ``rules``, ``structure``).
        labels: target class names; a ``SourceModel`` target gets a new head for them, whose rows start from the
            source head's for labels both share.
        extra_blocks: ``fresh`` (random) or ``identity``: target blocks that received nothing are initialised to
            compute the identity (net2net-deeper), so a deeper target computes what the source computes.
        source_blocks: for a shallower target, which source blocks it takes, before matching: ``every_other``
            (0, 2, 4...: DistilBERT's student), ``uniform``, ``first``, ``last`` (see ``surgery.select_layers``) or
            explicit source block indices. The stacks are found by name (``block_stack``: ``encoder.layer``,
            ``blocks``); the chosen blocks are renumbered 0..k-1 and the others left out (listed as unused).
        resize: pair same-role tensors of other shapes by slicing/tiling (an initialisation, not exact).
        target_kwargs: architecture arguments for a spec target (``{"in_chans": 1}``).
        seed: seeds the target's random initialisation (and which channels a net2net-wider layer copies).
        widen: ``"net2net"``: a target whose layers are wider or narrower than the source's is initialised layer by
            layer (``surgery.width_chain``/``net2net_chain``): a wider layer copies source channels and divides the
            next layer's inputs among the copies, so the target computes the source's function exactly; a narrower
            one keeps the channels of largest weight norm (not exact). Supported: plain chains of Linear/Conv
            (+BatchNorm) layers with element-wise activations, pooling and flattening between them; a residual
            addition, a concatenation or a LayerNorm is refused with a TransferError naming it.

    Returns:
        (target, report): the report has ``summary`` (coverage = share of target parameters holding source values)
        and a row per target tensor (``from``, ``transform``, ``match`` or, when fresh, ``reason``).

    Raises:
        TransferError: nothing in common, an ambiguity under ``strict``, a named pair that cannot be adapted, or
            source blocks that cannot be chosen.
        RecipeError: a bad or useless rename rule.
    """
    if extra_blocks not in ("fresh", "identity"):
        raise TransferError(f"extra_blocks must be 'fresh' or 'identity', not {extra_blocks!r}")
    if widen not in (None, "net2net"):
        raise TransferError(f"widen must be 'net2net' or None, not {widen!r}")
    src = read_source(source)  # first: a corrupt source file fails before anything is built or written
    torch.manual_seed(seed)
    model = build_target_model(target, target_kwargs)
    if labels is not None:
        if not isinstance(model, SourceModel):
            raise TransferError("labels need a SourceModel target (a spec such as timm:NAME), to give it a new head")
        model.reset_head(len(labels), list(labels))
    state = model.state_dict()
    chain = None
    if widen == "net2net":
        try:
            chain = width_chain(model)  # before matching: an unsupported structure fails first and changes nothing
        except SurgeryError as e:
            raise TransferError(f"widen='net2net' refused for {type(model).__name__}: {e}") from e
    blocks = _take_source_blocks(src, list(state), source_blocks) if source_blocks is not None else None
    adapter = _Adapter(model, state, src, list(labels) if labels is not None else None, resize, chain is not None)
    tgt_groups = _state_groups(model) if isinstance(model, SourceModel) and src.groups else None
    result = match_state_dicts(
        src.state,
        state,
        rules=rules,
        methods=methods,
        source_groups=src.groups,
        target_groups=tgt_groups,
        adaptable=adapter.adaptable,
        strict=strict,
    )

    # adapt every pair before touching the target: an impossible pair leaves the target as it was
    moved: dict[str, tuple[torch.Tensor, str, int]] = {}
    if chain is not None:
        names = {f"{m}.{p}" for m, mod in chain for p, _ in mod.state_dict().items()}
        paired = {t: src.state[result.pairs[t][0]] for t in names if t in result.pairs}
        try:
            widened = net2net_chain(chain, paired, torch.Generator().manual_seed(seed))
        except SurgeryError as e:
            raise TransferError(f"widen='net2net': {e}") from e
        moved.update({t: (w, how, w.numel()) for t, (w, how) in widened.items()})
    head_fresh: dict[str, str] = {}
    target_storage = {t.untyped_storage().data_ptr() for t in state.values()}
    for tname, (sname, _method) in result.pairs.items():
        if tname in moved:
            continue
        src_t = src.state[sname]
        done = adapter.adapt(sname, src_t, tname)
        if done is None and tname in adapter.head:
            head_fresh[tname] = sname
            continue
        if done is None:
            raise TransferError(
                f"target '{tname}' {tuple(state[tname].shape)} cannot be initialised from source '{src.orig(sname)}' "
                f"{tuple(src_t.shape)}: no surgery turns one shape into the other. Exclude it with methods, rename "
                "with rules, or pass resize=True to slice/tile it."
            )
        if done[0].untyped_storage().data_ptr() in target_storage:
            # the source shares memory with the target (a model into itself, tensors permuted): copy first
            done = (done[0].clone(), *done[1:])
        moved[tname] = done
    try:
        with torch.no_grad():
            for tname, (tensor, _, _) in moved.items():
                state[tname].copy_(tensor.to(state[tname].dtype))
    except RuntimeError as e:  # e.g. a broadcast the checks above did not foresee
        raise SurgeryError(f"copying into the target failed: {e}") from e

    identity: dict[str, str] = {}
    if extra_blocks == "identity":
        for bname, block in _blocks(model):
            block_names = [f"{bname}.{n}" for n in block.state_dict()]
            if any(n in moved for n in block_names):
                continue
            if not can_be_identity(block):
                continue
            zeroed = identity_init_block(block)
            for n in block_names:
                identity[n] = (
                    f"extra block '{bname}', initialised as the identity (net2net-deeper: zeroed {', '.join(zeroed)})"
                )

    applied = {t: (how, carried) for t, (_, how, carried) in moved.items()}
    del moved  # the adapted tensors: their values now live in the target
    report = _report(model, state, src, result, applied, head_fresh, identity, labels, strict, rules, blocks)
    # torch types Module.__setattr__ as taking a Tensor or a Module; it stores any other value as a plain attribute
    if hasattr(model, "origin"):
        model.origin = {t: f"{src.name}:{src.orig(result.pairs[t][0])}" for t in applied}  # type: ignore[assignment]
    model.report = report  # type: ignore[assignment]
    return model, report


def transfer_step(
    source: SourceModel,
    cfg: TransferConfig | Mapping[str, Any],
    labels: Sequence[str] | None,
    seed: int = 0,
    pretrained: bool = True,
) -> SourceModel:
    """The recipe's ``transfer:`` step: the target ``cfg`` describes, initialised from ``source``, ready to train.

    The target is ``cfg.target`` (default: the source's own architecture) built with ``cfg``'s architecture
    arguments (``in_chans``, ``img_size``, ``kwargs``), given a new head for ``labels``, and filled by
    ``transfer`` with ``cfg``'s matching options. Its ``preprocess`` follows the target (1 channel for
    ``in_chans: 1``), so a pipeline should prepare its data from the target (see ``docs`` of ``run_recipe``).

    Args:
        source: the loaded source (``load_source``).
        cfg: the recipe's ``transfer`` section (a ``TransferConfig`` or its dict).
        labels: target class names, in output order; None keeps the target's own classifier (only the input
            format is wanted, e.g. to prepare data before the classes are known).
        seed: seeds the target's fresh weights (new head, extra blocks), as ``build_target`` does.
        pretrained: False builds the same target from random weights, with no transfer (the ``scratch`` baseline).

    Returns:
        The target; ``target.report`` is the transfer report (``transfer_report.json``).
    """
    if not isinstance(cfg, TransferConfig):
        try:
            cfg = TransferConfig.model_validate(dict(cfg))
        except ValidationError as e:
            problems = [f"transfer.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
            raise RecipeError("invalid transfer step:\n  " + "\n  ".join(problems), problems) from e
    if cfg.target is None:  # the source's architecture, changed by the arguments: rebuilt from its arch record
        arch = {**source.arch, "kwargs": {**source.arch.get("kwargs", {}), **cfg.arch_kwargs()}}
        target: Any = lambda: model_from_arch(arch)  # noqa: E731  (a builder: transfer seeds, then calls it)
        kwargs = None
    else:
        target, kwargs = cfg.target, cfg.arch_kwargs() or None
    if not pretrained:
        from transferkit.transfer import transfer_report

        torch.manual_seed(seed)
        # the arch builder or a spec (cfg.target is a str): always a SourceModel
        scratch = cast(SourceModel, build_target_model(target, kwargs))
        if labels is not None:
            scratch.reset_head(len(labels), list(labels))
        scratch.report = transfer_report(scratch, source_name=source_label(source), source_head=None, pretrained=False)
        model: nn.Module = scratch
    else:
        model, _ = transfer(
            source,
            target,
            rules=cfg.rules or None,
            strict=cfg.strict,
            methods=cfg.methods,
            labels=labels,
            extra_blocks=cfg.extra_blocks,
            source_blocks=cfg.source_blocks,
            resize=cfg.resize,
            target_kwargs=kwargs,
            seed=seed,
            widen=cfg.widen,
        )
    if not isinstance(model, SourceModel):
        raise TransferError(
            f"transfer.target '{cfg.target}' did not give a transferkit model; use timm:NAME, "
            "torchvision:NAME, hf:NAME or a model folder"
        )
    if getattr(model, "processor", None) is None:
        model.processor = getattr(source, "processor", None)  # a tokenizer follows the weights
    return model


def _head_reason(
    name: str, tensor: torch.Tensor, src: _Source, head_fresh: dict[str, str], labels: Sequence[str] | None
) -> str:
    """Why a classifier tensor of the target stays fresh."""
    was = f" '{src.orig(head_fresh[name])}' {tuple(src.state[head_fresh[name]].shape)}" if name in head_fresh else ""
    if labels is not None:  # a new head was asked for
        why = "shares no class name with the target" if src.labels else "has no class names to share rows by"
        return f"new head for {len(labels)} classes; the source head{was} {why}"
    if not src.head:
        return f"the target's classifier ({tensor.shape[0]} outputs); the source has no classifier"
    if was:
        return f"the target's classifier ({tensor.shape[0]} outputs); the source classifier{was} does not fit it"
    parts = ", ".join(f"'{src.orig(n)}' {tuple(src.state[n].shape)}" for n in src.head if n in src.state)
    return f"the target's classifier ({tensor.shape[0]} outputs); no source classifier tensor fits it ({parts})"


def _report(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    src: _Source,
    result: Any,
    applied: dict[str, tuple[str, int]],
    head_fresh: dict[str, str],
    identity: dict[str, str],
    labels: Sequence[str] | None,
    strict: bool,
    rules: Sequence[Mapping[str, str]] | None,
    blocks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    params = {n for n, _ in model.named_parameters()}
    head = set(_head_names(model))
    rows = []
    for name, tensor in state.items():
        row: dict[str, Any] = {"name": name, "shape": list(tensor.shape), "numel": tensor.numel()}
        if name in applied:
            sname, method = result.pairs[name]
            transform, carried = applied[name]
            row.update({"status": "transferred", "from": src.orig(sname), "transform": transform, "match": method})
            if method == "order":  # the names said nothing: what the shape and the place make of the tensor
                row["role"] = shape_role(tuple(tensor.shape))
            if carried != tensor.numel():
                row["numel_transferred"] = carried
            if list(src.state[sname].shape) != row["shape"]:
                row["source_shape"] = list(src.state[sname].shape)
        else:
            row["status"] = "fresh"
            if name.endswith("num_batches_tracked"):
                row["reason"] = BOOKKEEPING
            elif name in identity:
                row["reason"] = identity[name]
            elif name in head_fresh or name in head:
                row["reason"] = _head_reason(name, tensor, src, head_fresh, labels)
            else:
                row["reason"] = "no matching source tensor"
        rows.append(row)
    p_all = sum(r["numel"] for r in rows if r["name"] in params)
    p_moved = sum(
        r.get("numel_transferred", r["numel"]) for r in rows if r["status"] == "transferred" and r["name"] in params
    )
    n_moved = sum(r["status"] == "transferred" for r in rows)
    arch = getattr(model, "arch", None)
    ambiguities = [
        a
        if a["level"] == "group"
        else {**a, "chosen": src.orig(a["chosen"]), "candidates": [src.orig(c) for c in a["candidates"]]}
        for a in result.ambiguities
    ]
    unused = [src.orig(n) for n in result.unused_source] + src.dropped
    report = {
        "source": src.name,
        "target": f"{arch['family']}:{arch['name']}" if arch else type(model).__name__,
        "methods": list(result.methods),
        "rules": list(rules or []),
        "strict": strict,
        "source_order": src.order,
        "summary": {
            "tensors": len(rows),
            "transferred": n_moved,
            "fresh": len(rows) - n_moved,
            "params_transferred": p_moved,
            "params_fresh": p_all - p_moved,
            "coverage": p_moved / p_all if p_all else 0.0,
            "matched_by": result.counts(),
            "transforms": dict(Counter(r["transform"].split(" ")[0] for r in rows if "transform" in r)),
            "ambiguities": len(ambiguities),
            "source_tensors_unused": len(unused),
        },
        "ambiguities": ambiguities,
        "unused_source": unused,
        "tensors": rows,
    }
    if blocks is not None:
        report["source_blocks"] = blocks
    return report


def format_report(report: Mapping[str, Any], max_rows: int = 40) -> str:
    """A readable summary: coverage, how tensors were matched and transformed, what stayed fresh and why."""
    s = report["summary"]
    lines = [
        f"transfer: {report['source']} -> {report['target']}",
        f"coverage: {s['coverage']:.1%} of target parameters ({s['params_transferred']:,} of "
        f"{s['params_transferred'] + s['params_fresh']:,}); tensors: {s['transferred']} transferred, "
        f"{s['fresh']} fresh",
        "matched by: " + ", ".join(f"{k} {v}" for k, v in s["matched_by"].items()),
        "transforms: " + (", ".join(f"{k} {v}" for k, v in sorted(s["transforms"].items())) or "none"),
        f"source tensors not used: {s['source_tensors_unused']}",
    ]
    if report.get("source_blocks"):
        b = report["source_blocks"]
        lines.append(
            f"source blocks: {b['target_blocks']} of {b['source_blocks']} taken ({b['how']}): "
            f"'{b['source_stack']}' {', '.join(map(str, b['taken']))} -> '{b['target_stack']}' "
            f"{', '.join(map(str, range(len(b['taken']))))}"
        )
    if report["ambiguities"]:
        lines.append(f"ambiguous pairings ({len(report['ambiguities'])}; chosen as shown, strict would refuse):")
        lines += [
            f"  {a['level']} {a['target']}: chose {a['chosen']} among {a['candidates']}"
            for a in report["ambiguities"][:max_rows]
        ]
    else:
        lines.append("ambiguous pairings: none")
    changed = [r for r in report["tensors"] if r["status"] == "transferred" and r["transform"] != "copied"]
    if changed:
        lines.append("adapted tensors:")
        lines += [
            f"  {r['name']} {tuple(r['shape'])} <- {r['from']} {tuple(r.get('source_shape', r['shape']))}: "
            f"{r['transform']}"
            for r in changed[:max_rows]
        ]
    fresh = [r for r in report["tensors"] if r["status"] == "fresh" and r["reason"] != BOOKKEEPING]
    counters = sum(r["status"] == "fresh" and r["reason"] == BOOKKEEPING for r in report["tensors"])
    if fresh:
        # one line per reason: an extra block's ten tensors share one story
        by_reason: dict[str, list[dict[str, Any]]] = {}
        for r in fresh:
            by_reason.setdefault(r["reason"], []).append(r)
        lines.append("fresh tensors:")
        for reason, group in list(by_reason.items())[:max_rows]:
            names = ", ".join(r["name"] for r in group[:3]) + (f" (+{len(group) - 3} more)" if len(group) > 3 else "")
            lines.append(f"  {len(group)} tensor(s), {sum(r['numel'] for r in group):,} values: {reason}: {names}")
        if len(by_reason) > max_rows:
            lines.append(f"  ... and {len(by_reason) - max_rows} more reasons (transfer_report.json lists all)")
    if counters:
        lines.append(f"({counters} BatchNorm step counters start at 0: bookkeeping, not learned)")
    return "\n".join(lines) + "\n"


# what save_transfer writes (a transferkit model folder, or a transformers save_pretrained folder) and its report
_TRANSFER_FILES = {
    "model.json",
    "model.safetensors",
    "processor",
    "transfer_report.json",
    "transfer_report.txt",
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
}


def _foreign_files(folder: Path) -> list[str]:
    """The entries of ``folder`` that transferkit did not write: all of them when it holds neither a model.json nor
    a transfer_report.json, else those that are not among the names a transfer's output has."""
    names = sorted(p.name for p in folder.iterdir())
    if not {"model.json", "transfer_report.json"} & set(names):
        return names
    shard = re.compile(r"model-\d+-of-\d+\.safetensors")
    return [n for n in names if n not in _TRANSFER_FILES and not shard.fullmatch(n)]


def check_transfer_out(out: str | Path, overwrite: bool = False) -> None:
    """Raise RunDirError unless ``save_transfer`` may write ``out`` (checked before a transfer too, so a long
    one is not done for nothing): a new or empty folder, or with ``overwrite`` a folder transferkit wrote."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"'{out}' is a file, not a folder; choose a folder path for --out (a new or empty one)")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunDirError(f"'{out}' is not empty; choose another --out or pass --overwrite")
        foreign = _foreign_files(out)
        if foreign:
            raise RunDirError(
                f"'{out}' holds files transferkit did not write ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); --overwrite replaces only a folder written by transferkit "
                "(a model folder or a transfer's output: model.json, transfer_report.json...). Choose another --out, "
                "or move those files away yourself."
            )


def save_transfer(model: nn.Module, report: Mapping[str, Any], out: str | Path, overwrite: bool = False) -> Path:
    """Write the target, ``transfer_report.json`` and ``transfer_report.txt`` to ``out``, swapped in whole.

    A transferkit model (built from a spec) is saved as ``model.safetensors`` + ``model.json``; a transformers
    model (``hf:`` builder, ``BertForSequenceClassification``...) with its own ``save_pretrained`` (safetensors
    weights + ``config.json``), so ``from_pretrained(out)`` reloads it. Nothing is left half-written: the folder
    is built under a temporary name and replaces ``out`` only when complete (``transferkit.io.replace_dir``).

    Raises:
        RunDirError: ``out`` is a file, or holds files and ``overwrite`` is not set, or holds files that
            transferkit did not write (``overwrite`` replaces only a folder transferkit wrote).
        TransferError: the target is neither a transferkit nor a transformers model (no format to save it in).
    """
    from transferkit.io import replace_dir, write_json, write_text

    out = Path(out)
    hf = callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config")
    if not isinstance(model, SourceModel) and not hf:
        raise TransferError(
            f"cannot save a {type(model).__name__} target: save_transfer writes transferkit models "
            "(targets built from a spec such as timm:NAME) and transformers models "
            "(save_pretrained); save this one with torch.save(model.state_dict()) and keep the report"
        )
    check_transfer_out(out, overwrite)

    def fill(tmp: Path) -> None:
        if isinstance(model, SourceModel):
            save_model(model, tmp, extra={"transfer": {"source": report["source"], **report["summary"]}})
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)  # type: ignore[operator]
        write_json(tmp / "transfer_report.json", report)
        write_text(tmp / "transfer_report.txt", format_report(report))

    return replace_dir(out, fill)
