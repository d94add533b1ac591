"""``transfer``: move every weight a source has into a target of another structure, and say what moved.

The flow, top to bottom: read the source tensors; build the target; match (names, rules, structure: see
``match.py``); adapt each matched pair whose shapes differ (``surgery.py``); copy; optionally initialise the
target's extra blocks as identities; write the report. Nothing is half-applied: every pair is adapted and checked
before the first tensor is copied into the target.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.errors import RunDirError
from transferkit.models.vision import SourceModel, build_backbone, save_model
from transferkit.transfer.match import METHODS, TransferError, match_state_dicts, natural_key, normalize
from transferkit.transfer.surgery import (
    SurgeryError,
    adapt_input_channels,
    can_be_identity,
    head_from_labels,
    identity_init_block,
    prefix_tokens,
    resize_pos_embed,
    slice_or_tile,
)

POS_EMBED_NAMES = ("pos_embed", "position_embeddings")
BOOKKEEPING = "BatchNorm step counter: bookkeeping, not learned; starts at 0"


# ----------------------------------------------------------------------------------------------------------------
# Reading the source, building the target


class _Source:
    """The source as the matcher sees it: tensors, optional layer groups and labels, a name for the report."""

    def __init__(self, state: dict[str, torch.Tensor], name: str, groups: dict[str, str] | None = None,
                 labels: list[str] | None = None, head: Sequence[str] = (), order: str = "as stored"):
        self.state, self.name, self.groups, self.labels, self.head = state, name, groups, labels, list(head)
        self.order = order


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


def _head_names(model: nn.Module) -> list[str]:
    if isinstance(model, SourceModel):
        return [f"head.{n}" for n in model.head.state_dict()]
    if hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
        for mname, mod in model.named_modules():
            if mod is classifier and mname:
                return [f"{mname}.{n}" for n in mod.state_dict()]
    return []


def read_source(source: Any) -> _Source:
    """A source given as a spec (``load_source``), a weights file, a model, or a state_dict."""
    from transferkit.io import load_state_dict
    from transferkit.recipe import SourceSpec
    from transferkit.sources import load_source

    if isinstance(source, Mapping) and source and all(isinstance(v, torch.Tensor) for v in source.values()):
        return _Source(dict(source), "state_dict")
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_file() and not (path.parent / "model.json").is_file():
            # a bare weights file is a complete source for a transfer: the target brings the architecture
            state = load_state_dict(path)
            if path.suffix == ".safetensors":
                # safetensors files do not keep the writer's order (the header is sorted): the natural order of
                # the names (blocks.2 before blocks.10) is the best guess the structure pass can have
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
        return _Source(source.state_dict(), str(label or f"{source.arch['family']}:{source.arch['name']}"),
                       _state_groups(source), source.labels, _head_names(source))
    if isinstance(source, nn.Module):
        return _Source(source.state_dict(), type(source).__name__, None, None, _head_names(source))
    raise TransferError(f"cannot use a {type(source).__name__} as a transfer source: give a source name, a weights "
                        "file, a model folder, an nn.Module or a state_dict")


def build_target_model(target: Any, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The target: a module as given (changed in place), or built with random weights from a spec.

    Args:
        target: an ``nn.Module``, or a spec as ``load_source`` takes (``timm:NAME``...), built without weights.
        kwargs: architecture keyword arguments for a spec (e.g. ``{"in_chans": 1}`` for a grey-image timm model).
    """
    if isinstance(target, nn.Module):
        return target
    from transferkit.sources import PREFIXES, _from_backbone, load_source

    name = str(target)
    prefix, _, rest = name.partition(":")
    if prefix in PREFIXES and rest:
        arch = {"family": prefix, "name": rest, "kwargs": dict(kwargs or {})}
        model = _from_backbone(build_backbone(arch, pretrained=False), arch, None)
        chans = int(arch["kwargs"].get("in_chans", 0))
        if chans and chans != len(model.preprocess.get("mean", [])):
            # timm's data config still says 3 channels; the data pipeline reads input_size[0] (grey images for 1)
            # and normalises per channel, so the statistics follow the summed/repeated first convolution
            pre = model.preprocess
            pre["input_size"] = [chans, *pre["input_size"][1:]]
            for key in ("mean", "std"):
                vals = list(pre[key])
                pre[key] = [sum(vals) / len(vals)] if chans == 1 else [vals[i % len(vals)] for i in range(chans)]
    else:
        if kwargs:
            raise TransferError(f"architecture arguments {dict(kwargs)} apply to family:NAME targets, not '{name}'")
        model = load_source({"name": name, "pretrained": False})
    model.origin = {}
    return model


# ----------------------------------------------------------------------------------------------------------------
# Adapting a matched pair


class _Adapter:
    """Knows which target tensors surgery can adapt (first convolution, position embeddings, head by labels)."""

    def __init__(self, target: nn.Module, state: dict[str, torch.Tensor], source: _Source,
                 labels: list[str] | None, resize: bool):
        self.state, self.source, self.labels, self.resize = state, source, labels, resize
        self.first_conv = next((n for n, t in state.items() if t.dim() == 4 and n.endswith("weight")), None)
        self.head = set(_head_names(target))
        shared = {str(x).lower() for x in (labels or [])} & {str(x).lower() for x in (source.labels or [])}
        self.head_by_labels = bool(shared)

    def is_pos_embed(self, name: str) -> bool:
        return name.rsplit(".", 1)[-1] in POS_EMBED_NAMES or normalize(name).endswith("position_embeddings.weight")

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
        return self.resize

    def adapt(self, sname: str, src: torch.Tensor, tname: str) -> tuple[torch.Tensor, str, int] | None:
        """(new target tensor, transform, number of elements that carry source values) or None if impossible."""
        dst = self.state[tname]
        ss, ts = tuple(src.shape), tuple(dst.shape)
        if ss == ts:
            return src.clone(), "copied", dst.numel()
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
            return out, f"interpolated (bicubic) {ss[1] - p}->{ts[1] - p} grid tokens, {p} prefix token(s) kept", \
                out.numel()
        if len(ts) == 2 and ss == ts[::-1]:
            return src.t().clone(), "transposed", dst.numel()
        if tname in self.head and self.head_by_labels and ss[1:] == ts[1:]:
            rows_src, rows_dst = src.reshape(ss[0], -1), dst.reshape(ts[0], -1)
            w, _, pairs = head_from_labels(rows_src, None, self.source.labels or [], rows_dst, None, self.labels or [])
            shared = [self.labels[t] for t, _ in pairs]  # type: ignore[index]
            return w.reshape(ts), f"rows for {len(pairs)} shared label(s) from the source head ({', '.join(shared)})" \
                , len(pairs) * rows_dst.shape[1]
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


def transfer(source: Any, target: Any, *, rules: Sequence[Mapping[str, str]] | None = None, strict: bool = False,
             methods: Sequence[str] = METHODS, labels: Sequence[str] | None = None, extra_blocks: str = "fresh",
             resize: bool = False, target_kwargs: Mapping[str, Any] | None = None, seed: int = 0
             ) -> tuple[nn.Module, dict[str, Any]]:
    """Move every source weight that fits into the target; return the target and the transfer report.

    Args:
        source: a source spec (``efficientnet_lite0``, ``timm:resnet18``, a model folder), a weights file
            (``.safetensors``/``.pt``: only tensors are needed), a ``SourceModel``/``nn.Module`` or a state_dict.
        target: a spec built with random weights (``timm:resnet34``) or an ``nn.Module`` (changed in place).
        rules: regex renames, ``[{"from": r"^features\\.(\\d+)", "to": r"blocks.\\1"}]``.
        strict: an ambiguous structural pairing is an error instead of a reported choice.
        methods: matching passes to run (``names``, ``rules``, ``structure``).
        labels: target class names; a ``SourceModel`` target gets a new head for them, whose rows start from the
            source head's for labels both share.
        extra_blocks: ``fresh`` (random) or ``identity``: target blocks that received nothing are initialised to
            compute the identity (net2net-deeper), so a deeper target computes what the source computes.
        resize: pair same-role tensors of other shapes by slicing/tiling (an initialisation, not exact).
        target_kwargs: architecture arguments for a spec target (``{"in_chans": 1}``).
        seed: seeds the target's random initialisation.

    Returns:
        (target, report): the report has ``summary`` (coverage = share of target parameters holding source values)
        and a row per target tensor (``from``, ``transform``, ``match`` or, when fresh, ``reason``).

    Raises:
        TransferError: nothing in common, an ambiguity under ``strict``, or a named pair that cannot be adapted.
        RecipeError: a bad or useless rename rule.
    """
    if extra_blocks not in ("fresh", "identity"):
        raise TransferError(f"extra_blocks must be 'fresh' or 'identity', not {extra_blocks!r}")
    src = read_source(source)  # first: a corrupt source file fails before anything is built or written
    torch.manual_seed(seed)
    model = build_target_model(target, target_kwargs)
    if labels is not None:
        if not isinstance(model, SourceModel):
            raise TransferError("labels need a SourceModel target (a spec such as timm:NAME), to give it a new head")
        model.reset_head(len(labels), list(labels))
    state = model.state_dict()
    adapter = _Adapter(model, state, src, list(labels) if labels is not None else None, resize)
    tgt_groups = _state_groups(model) if isinstance(model, SourceModel) and src.groups else None
    result = match_state_dicts(src.state, state, rules=rules, methods=methods, source_groups=src.groups,
                               target_groups=tgt_groups, adaptable=adapter.adaptable, strict=strict)

    # adapt every pair before touching the target: an impossible pair leaves the target as it was
    moved: dict[str, tuple[torch.Tensor, str, int]] = {}
    head_fresh: dict[str, str] = {}
    for tname, (sname, _method) in result.pairs.items():
        src_t = src.state[sname]
        done = adapter.adapt(sname, src_t, tname)
        if done is None and tname in adapter.head:
            head_fresh[tname] = sname
            continue
        if done is None:
            raise TransferError(
                f"target '{tname}' {tuple(state[tname].shape)} cannot be initialised from source '{sname}' "
                f"{tuple(src_t.shape)}: no surgery turns one shape into the other. Exclude it with methods, rename "
                "with rules, or pass resize=True to slice/tile it."
            )
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
            names = [f"{bname}.{n}" for n in block.state_dict()]
            if any(n in moved for n in names):
                continue
            if not can_be_identity(block):
                continue
            zeroed = identity_init_block(block)
            for n in names:
                identity[n] = f"extra block '{bname}', initialised as the identity (net2net-deeper: zeroed " \
                              f"{', '.join(zeroed)})"

    report = _report(model, state, src, result, moved, head_fresh, identity, labels, strict, rules)
    if hasattr(model, "origin"):
        model.origin = {t: f"{src.name}:{result.pairs[t][0]}" for t in moved}
    model.report = report
    return model, report


def _report(model: nn.Module, state: dict[str, torch.Tensor], src: _Source, result: Any,
            moved: dict[str, tuple[torch.Tensor, str, int]], head_fresh: dict[str, str], identity: dict[str, str],
            labels: Sequence[str] | None, strict: bool, rules: Sequence[Mapping[str, str]] | None) -> dict[str, Any]:
    params = {n for n, _ in model.named_parameters()}
    head = set(_head_names(model))
    rows = []
    for name, tensor in state.items():
        row: dict[str, Any] = {"name": name, "shape": list(tensor.shape), "numel": tensor.numel()}
        if name in moved:
            sname, method = result.pairs[name]
            _, transform, carried = moved[name]
            row.update({"status": "transferred", "from": sname, "transform": transform, "match": method})
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
                n = len(labels) if labels is not None else tensor.shape[0]
                was = f" '{head_fresh[name]}' {tuple(src.state[head_fresh[name]].shape)}" if name in head_fresh else ""
                why = "shares no class name with the target" if src.labels else "has no class names to share rows by"
                row["reason"] = f"new head for {n} classes; the source head{was} {why}"
            else:
                row["reason"] = "no matching source tensor"
        rows.append(row)
    p_all = sum(r["numel"] for r in rows if r["name"] in params)
    p_moved = sum(r.get("numel_transferred", r["numel"]) for r in rows
                  if r["status"] == "transferred" and r["name"] in params)
    n_moved = sum(r["status"] == "transferred" for r in rows)
    arch = getattr(model, "arch", None)
    return {
        "source": src.name,
        "target": f"{arch['family']}:{arch['name']}" if arch else type(model).__name__,
        "methods": list(result.methods),
        "rules": list(rules or []),
        "strict": strict,
        "source_order": src.order,
        "summary": {"tensors": len(rows), "transferred": n_moved, "fresh": len(rows) - n_moved,
                    "params_transferred": p_moved, "params_fresh": p_all - p_moved,
                    "coverage": p_moved / p_all if p_all else 0.0, "matched_by": result.counts(),
                    "transforms": dict(Counter(r["transform"].split(" ")[0] for r in rows if "transform" in r)),
                    "ambiguities": len(result.ambiguities), "source_tensors_unused": len(result.unused_source)},
        "ambiguities": result.ambiguities,
        "unused_source": result.unused_source,
        "tensors": rows,
    }


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
    if report["ambiguities"]:
        lines.append(f"ambiguous pairings ({len(report['ambiguities'])}; chosen as shown, strict would refuse):")
        lines += [f"  {a['level']} {a['target']}: chose {a['chosen']} among {a['candidates']}"
                  for a in report["ambiguities"][:max_rows]]
    else:
        lines.append("ambiguous pairings: none")
    changed = [r for r in report["tensors"] if r["status"] == "transferred" and r["transform"] != "copied"]
    if changed:
        lines.append("adapted tensors:")
        lines += [f"  {r['name']} {tuple(r['shape'])} <- {r['from']} {tuple(r.get('source_shape', r['shape']))}: "
                  f"{r['transform']}" for r in changed[:max_rows]]
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


def save_transfer(model: nn.Module, report: Mapping[str, Any], out: str | Path, overwrite: bool = False) -> Path:
    """Write the target (``model.safetensors`` + ``model.json``), ``transfer_report.json`` and ``.txt`` to ``out``."""
    from transferkit.io import write_json, write_text

    out = Path(out)
    if not isinstance(model, SourceModel):
        raise TransferError("only a SourceModel target (built from a spec) can be saved as a transferkit model")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"'{out}' is not empty; choose another --out or pass --overwrite")
    save_model(model, out, extra={"transfer": {"source": report["source"], **report["summary"]}})
    write_json(out / "transfer_report.json", report)
    write_text(out / "transfer_report.txt", format_report(report))
    return out
