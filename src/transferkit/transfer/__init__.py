"""Forward transfer: build the target from the source and report, tensor by tensor, what moved."""

from __future__ import annotations

import copy
from typing import Any

import torch

from transferkit.models.base import SourceModel, build_backbone


def build_target(
    source: SourceModel, labels: list[str], pretrained: bool = True, seed: int = 0, head_dropout: float = 0.0
) -> SourceModel:
    """The source backbone with a new linear head for ``labels``.

    Args:
        source: from ``load_source``.
        labels: target class names, in output order.
        pretrained: False builds the same architecture from random weights (the ``scratch`` baseline).
        seed: seeds the new head (and, from scratch, the backbone), so every strategy starts from the same head.
        head_dropout: dropout before the new head.

    Returns:
        The target; ``target.report`` is its transfer report (see ``transfer_report``).
    """
    torch.manual_seed(seed)
    if pretrained:
        target = copy.deepcopy(source)
        target.origin = dict(source.origin)
    else:
        bb = build_backbone(source.arch, pretrained=False)
        target = SourceModel(
            bb.module,
            torch.nn.Identity(),
            source.arch,
            dict(source.preprocess),
            None,
            source.num_features,
            source.groups,
        )
        target.processor = source.processor
        target.origin = {}
    source_head = source.head_spec() if any(isinstance(m, torch.nn.Linear) for m in source.head.modules()) else None
    target.reset_head(len(labels), list(labels), head_dropout)
    target.report = transfer_report(
        target, source_name=_source_name(source), source_head=source_head, pretrained=pretrained
    )
    return target


def _source_name(source: SourceModel) -> str:
    first = next(iter(source.origin.values()), "")
    return first.rsplit(":", 1)[0] if first else f"{source.arch['family']}:{source.arch['name']}"


def transfer_report(
    target: SourceModel, source_name: str, source_head: dict[str, Any] | None, pretrained: bool
) -> dict[str, Any]:
    """Every target tensor: transferred (from which source tensor, how) or fresh (and why)."""
    rows = []
    for name, tensor in target.state_dict().items():
        row: dict[str, Any] = {"name": name, "shape": list(tensor.shape), "numel": tensor.numel()}
        if name in target.origin and not name.startswith("head."):
            row.update(status="transferred", transform="copied", **{"from": target.origin[name]})
        else:
            row["status"] = "fresh"
            if name.startswith("head."):
                was = f" (the source head had {source_head['num_classes']} classes)" if source_head else ""
                row["reason"] = f"new head for {len(target.labels or [])} target classes{was}"
            elif name.endswith("num_batches_tracked"):
                row["reason"] = "BatchNorm step counter: bookkeeping, not learned; starts at 0"
            elif not pretrained:
                row["reason"] = "random initialisation (scratch baseline: no transfer)"
            else:
                row["reason"] = "no matching source tensor"
        rows.append(row)
    params = {n for n, _ in target.named_parameters()}
    moved = [r for r in rows if r["status"] == "transferred"]
    p_moved = sum(r["numel"] for r in moved if r["name"] in params)
    p_all = sum(r["numel"] for r in rows if r["name"] in params)
    head = target.head_spec()
    return {
        "source": source_name,
        "target": f"{target.arch['family']}:{target.arch['name']} + linear head ({head['num_classes']} classes)",
        "summary": {
            "tensors": len(rows),
            "transferred": len(moved),
            "fresh": len(rows) - len(moved),
            "params_transferred": p_moved,
            "params_fresh": p_all - p_moved,
            "coverage": p_moved / p_all if p_all else 0.0,
        },
        "tensors": rows,
    }
