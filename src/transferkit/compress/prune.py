"""Structured pruning of a SourceModel with torch-pruning's DepGraph: whole channels, FFN units and attention heads
removed, so the model is smaller and faster without sparse kernels.

DepGraph (Fang et al., CVPR 2023) finds the layers whose channels must go together (a convolution's outputs, the
BatchNorm after it, the next layer's inputs, everything tied by a residual sum) and removes the least important
channels of each such group. Importance is the L2 norm of the group's weights (``magnitude``) or first-order Taylor
``|w * dL/dw|`` on a few labelled batches (``taylor``). Every group is pruned at the same ratio (local pruning), so
each layer keeps the same fraction of its channels.

Transformer text encoders (BERT-like, MiniLM) lose whole attention heads (the same number in every layer) and FFN
units at the ratio; the hidden size, which embeddings, LayerNorms and residuals share, never changes.

The head's linear layers are never pruned at their outputs (the classes stay); their inputs follow the backbone.
After pruning, ``model.num_features`` is the head's new input width, and ``record["shapes"]`` is what
``load_model`` needs to rebuild the pruned model from ``model.json`` alone (``transferkit.models.pruned``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.errors import CompressError, SourceError
from transferkit.evaluation.cost import count_macs, count_params
from transferkit.models.base import MultiTaskModel, SourceModel
from transferkit.models.pruned import apply_shapes, is_hf_attention, model_sizes, shape_record, unpruned_sizes

IMPORTANCES = ("magnitude", "taylor")
# target_macs: the ratio grows by TARGET_STEP per step (re-ranking channels after each) up to TARGET_MAX_RATIO
TARGET_STEP = 0.02
TARGET_MAX_RATIO = 0.9

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PruneResult:
    """The pruned model (the one given, changed in place) and what ``model.json`` records of the pruning.

    ``record``: ratio, target_macs, importance, round_to, keep (the patterns), kept (the module names they
    matched), iterative_steps, steps (pruning steps taken), macs_before/after (``count_macs`` on the example),
    params_before/after, attention_heads (before/after per layer, text encoders only) and shapes (see
    ``transferkit.models.pruned.shape_record``).
    """

    model: SourceModel
    record: dict[str, Any] = field(default_factory=dict)


def prune(
    model: SourceModel,
    example: Any,
    *,
    ratio: float | None = None,
    target_macs: float | None = None,
    importance: str = "magnitude",
    round_to: int | None = None,
    keep: Sequence[str] = (),
    taylor_batches: Iterable[tuple[Any, torch.Tensor]] | None = None,
    loss_fn: LossFn | None = None,
    iterative_steps: int = 1,
) -> PruneResult:
    """Prune ``model`` in place, to a channel ``ratio`` or down to ``target_macs``; the model reloads from its folder.

    Args:
        model: a single-task SourceModel without adapters (image backbone + linear head, or a text encoder).
        example: one input batch, as ``model(example)`` takes it (a tensor, or a dict of tensors for text); the
            graph is traced and MACs are counted on it.
        ratio: fraction of the channels (and attention heads) of every prunable group to remove, in (0, 1).
        target_macs: prune in steps of 0.02 of ratio, re-ranking after each, until ``count_macs(model, example)``
            is at most this; give ``ratio`` or ``target_macs``, not both.
        importance: ``magnitude`` (L2 norm) or ``taylor`` (needs ``taylor_batches``).
        round_to: keep channel counts multiples of this (8 suits most CPU and GPU kernels); a layer too narrow to
            keep a multiple of it at the ratio is left whole (torch-pruning's rule).
        keep: regexes on qualified module names (``backbone.conv_stem``); matching modules keep their output
            channels (the head's linear layers always do).
        taylor_batches: ``(inputs, targets)`` batches whose loss gradients Taylor importance uses (recomputed
            before every step).
        loss_fn: ``loss_fn(logits, targets)`` for Taylor importance; cross-entropy by default.
        iterative_steps: with ``ratio``, reach it in this many equal steps, re-ranking after each.

    Returns:
        The model and the record to save as ``model.json``'s ``pruned`` (``save_model(..., extra={"pruned": ...})``).

    Raises:
        CompressError: the model cannot be pruned (adapters, several heads, recurrent layers, a forward that breaks
            after pruning) or the arguments are invalid; the model is left as it was.
    """
    _check_model(model)
    _check_arguments(ratio, target_macs, importance, round_to, taylor_batches, iterative_steps)
    device = next(model.parameters()).device
    example = _to_device(example, device)
    kept = _kept_modules(model, keep)
    batches = [_to_device(b, device) for b in taylor_batches] if taylor_batches is not None else None
    if batches is not None and not batches:
        raise CompressError("taylor_batches is empty: give at least one (inputs, targets) batch")
    macs_before, params_before = count_macs(model, example), count_params(model)
    if target_macs is not None and target_macs >= macs_before:
        raise CompressError(
            f"target_macs={target_macs:,} is not below the model's current {macs_before:,} MACs on this example: "
            "nothing to prune; give a smaller target (or a ratio)"
        )
    try:  # the architecture must rebuild (load_model does the same), before anything changes
        reference = unpruned_sizes(model)
    except (SourceError, OSError) as e:
        raise CompressError(
            f"the model's architecture cannot be rebuilt from model.arch, so a pruned copy would not reload: {e}"
        ) from e
    before = model_sizes(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()  # tracing in train mode would update BatchNorm statistics and draw dropout masks
    try:
        steps, heads = _run(
            model, example, ratio, target_macs, importance, round_to, kept, batches, loss_fn, iterative_steps
        )
    except BaseException:
        apply_shapes(model, before)  # put every size back, then the weights: the model is as it was given
        model.load_state_dict(state)
        raise
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
        model.zero_grad(set_to_none=True)
    linear = next(m for m in model.head.modules() if isinstance(m, nn.Linear))
    model.num_features = linear.in_features
    record: dict[str, Any] = {
        "ratio": ratio,
        "target_macs": target_macs,
        "importance": importance,
        "round_to": round_to,
        "keep": list(keep),
        "kept": sorted(kept),
        "iterative_steps": iterative_steps,
        "steps": steps,
        "macs_before": macs_before,
        "macs_after": count_macs(model, example),
        "params_before": params_before,
        "params_after": count_params(model),
    }
    if heads:
        record["attention_heads"] = heads
    record["shapes"] = shape_record(model, reference)
    return PruneResult(model, record)


# ---------------------------------------------------------------------------------------------------------------
# What is refused


def _check_model(model: Any) -> None:
    if isinstance(model, MultiTaskModel):
        raise CompressError(
            f"a MultiTaskModel (tasks: {', '.join(model.tasks)}) cannot be pruned: its heads share one backbone, "
            "which pruning would shrink under all of them at once; prune each single-task model before merging"
        )
    if not isinstance(model, SourceModel):
        raise CompressError(f"prune takes a transferkit SourceModel, not {type(model).__name__}")
    if model.adapter:
        raise CompressError(
            f"the model carries {model.adapter.get('type', 'adapter')} adapters: pruning would cut the base layers "
            "under them; merge the adapters first (transferkit.models.adapters.merge_lora(model))"
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.RNNBase):
            raise CompressError(
                f"'{name}' is a recurrent layer ({type(module).__name__}): torch-pruning cannot trace or prune it "
                "(it fails inside its dependency graph on seq:gru), and transferkit's shape record does not rebuild "
                "recurrent layers; distill into a smaller encoder instead (transferkit.distill)"
            )
        if isinstance(module, nn.MultiheadAttention):
            raise CompressError(
                f"'{name}' is an nn.MultiheadAttention, whose head sizes transferkit does not record: it prunes "
                "BERT-like attention (query/key/value layers) only"
            )
    if not any(isinstance(m, nn.Linear) for m in model.head.modules()):
        raise CompressError("the model head has no nn.Linear: prune needs a linear head (model.reset_head)")


def _check_arguments(
    ratio: float | None,
    target_macs: float | None,
    importance: str,
    round_to: int | None,
    taylor_batches: Any,
    iterative_steps: int,
) -> None:
    if (ratio is None) == (target_macs is None):
        given = "both" if ratio is not None else "neither"
        raise CompressError(
            f"give exactly one of ratio (e.g. 0.5) or target_macs (an absolute MAC count); {given} given"
        )
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
        raise CompressError(f"ratio must be in (0, 1), the fraction of channels removed; got {ratio!r}")
    if target_macs is not None and (
        isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) or target_macs <= 0
    ):
        raise CompressError(f"target_macs must be a positive number of MACs (e.g. 150_000_000); got {target_macs!r}")
    if importance not in IMPORTANCES:
        raise CompressError(f"unknown importance '{importance}'; valid: {', '.join(IMPORTANCES)}")
    if importance == "taylor" and taylor_batches is None:
        raise CompressError(
            "importance='taylor' ranks channels by loss gradients: give taylor_batches, (inputs, "
            "targets) batches of labelled data"
        )
    if importance != "taylor" and taylor_batches is not None:
        raise CompressError(
            f"taylor_batches is read by importance='taylor' only, not '{importance}': drop it or "
            "use importance='taylor'"
        )
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise CompressError(f"round_to must be a positive whole number of channels (e.g. 8) or None; got {round_to!r}")
    if isinstance(iterative_steps, bool) or not isinstance(iterative_steps, int) or iterative_steps < 1:
        raise CompressError(f"iterative_steps must be a whole number >= 1; got {iterative_steps!r}")
    if target_macs is not None and iterative_steps != 1:
        raise CompressError(
            f"iterative_steps={iterative_steps} applies to ratio; target_macs always prunes in steps of "
            f"{TARGET_STEP} of ratio until the target is met"
        )


def _kept_modules(model: SourceModel, keep: Sequence[str]) -> set[str]:
    """The qualified module names matching any ``keep`` regex; a pattern matching nothing is an error."""
    if isinstance(keep, str):
        raise CompressError(f"keep takes a list of regexes, not one string: keep=[{keep!r}]")
    names = [n for n, _ in model.named_modules() if n]
    kept: set[str] = set()
    for pattern in keep:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise CompressError(f"keep pattern '{pattern}' is not a valid regex: {e}") from None
        matched = {n for n in names if rx.search(n)}
        if not matched:
            raise CompressError(
                f"keep pattern '{pattern}' matches no module of the model; module names nearby: "
                f"{', '.join(_nearby(pattern, names))}"
            )
        kept |= matched
    return kept


def _nearby(pattern: str, names: list[str], n: int = 6) -> list[str]:
    """Module names that look most like ``pattern``: those sharing its longest literal prefix, else difflib's."""
    import difflib

    literal = re.sub(r"\\(.)", r"\1", pattern.lstrip("^"))  # backbone\.blocks -> backbone.blocks
    literal = re.split(r"[$*+?()\[\]{}|]", literal)[0]
    for cut in range(len(literal), 0, -1):
        close = [m for m in names if m.startswith(literal[:cut])]
        if close:
            return close[:n]
    return difflib.get_close_matches(pattern.strip("^$"), names, n=n, cutoff=0.0)


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Pruning


def _run(
    model: SourceModel,
    example: Any,
    ratio: float | None,
    target_macs: float | None,
    importance: str,
    round_to: int | None,
    kept: set[str],
    batches: list[tuple[Any, torch.Tensor]] | None,
    loss_fn: LossFn | None,
    iterative_steps: int,
) -> tuple[int, dict[str, int]]:
    """Build the pruner and step it; returns the steps taken and the heads per layer before/after (text)."""
    import torch_pruning as tp

    named = dict(model.named_modules())
    attention: list[Any] = [m for m in model.modules() if is_hf_attention(m)]  # BERT-like: attributes set at run
    ignored: list[nn.Module] = [model.head, *(named[n] for n in sorted(kept))]
    if attention:  # the hidden size (embeddings, LayerNorms, residual stream) stays: block its group
        ignored += [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm))]
    if ratio is not None:
        final, steps = ratio, iterative_steps
    else:
        final, steps = TARGET_MAX_RATIO, round(TARGET_MAX_RATIO / TARGET_STEP)
    num_heads = {lin: m.num_attention_heads for m in attention for lin in (m.query, m.key, m.value)}
    scorer = tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=2)
    if batches is not None:  # Taylor importance reads .grad of every weight in a group, frozen or not
        for p in model.parameters():
            p.requires_grad_(True)
    try:
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=scorer,
            pruning_ratio=final,
            iterative_steps=steps,
            ignored_layers=ignored,
            round_to=round_to,
            num_heads=num_heads,
            prune_num_heads=bool(attention),
            prune_head_dims=False,
            head_pruning_ratio=final if attention else 0.0,
            forward_fn=lambda m, x: m(x),
            # fresh dicts: torch-pruning's defaults are shared mutable dicts it writes into (one model's layers
            # would stay referenced by, and grouped in, the next pruner)
            in_channel_groups={},
            out_channel_groups={},
        )
    except Exception as e:  # torch-pruning's tracing fails on layers it does not know, with its own internals' errors
        raise CompressError(
            f"torch-pruning cannot trace this model into a dependency graph: {type(e).__name__}: {e}"
        ) from e
    heads_before = attention[0].num_attention_heads if attention else 0
    for m in attention:  # whole heads, the same number in every layer, in step with the channel ratio
        schedule = _head_schedule(m.num_attention_heads, final, steps)
        for lin in (m.query, m.key, m.value):
            pruner.head_pruning_ratio_dict[lin] = schedule
    taken = 0
    for _ in range(steps):
        if batches is not None:
            _accumulate_gradients(model, batches, loss_fn or F.cross_entropy)
        pruner.step()
        taken += 1
        for m in attention:
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features
        _check_pruned(model, example)
        if target_macs is not None and count_macs(model, example) <= target_macs:
            break
    else:
        if target_macs is not None:
            raise CompressError(
                f"target_macs={target_macs:,} cannot be reached: removing {TARGET_MAX_RATIO:.0%} of every prunable "
                f"group's channels leaves {count_macs(model, example):,} MACs (the layers kept, the head and the "
                "unprunable parts cost the rest); give a larger target, or fewer keep patterns"
            )
    heads = {"before": heads_before, "after": attention[0].num_attention_heads} if attention else {}
    return taken, heads


def _head_schedule(heads: int, final: float, steps: int) -> list[float]:
    """Per-step head ratios for torch-pruning, which removes ``ceil(r * current heads)`` at a step: chosen so that
    after step k, ``round(k/steps * final * heads)`` heads are gone in all (at least one kept)."""
    removed = [min(heads - 1, math.floor(final * k / steps * heads + 0.5)) for k in range(steps + 1)]
    out = [0.0]
    for k in range(1, steps + 1):
        new, current = removed[k] - removed[k - 1], heads - removed[k - 1]
        out.append((new - 0.5) / current if new > 0 else 0.0)  # ceil((new - 0.5) / current * current) == new
    return out


def _accumulate_gradients(model: nn.Module, batches: list[tuple[Any, torch.Tensor]], loss_fn: LossFn) -> None:
    """The loss gradients of the current (partly pruned) model over the batches, in ``.grad``."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for inputs, targets in batches:
            loss_fn(model(inputs), targets).backward()


def _check_pruned(model: nn.Module, example: Any) -> None:
    """A step must leave a forward that runs (torch-pruning cannot see sizes a forward hard-codes); else refused."""
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:
        raise CompressError(
            f"the pruned model's forward fails ({type(e).__name__}: {e}): torch-pruning cut a layer whose sizes "
            "this architecture's forward fixes (an attention layer it does not know?); keep that part (keep=[...])"
        ) from e
