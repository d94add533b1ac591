"""Forward transfer between recommenders: user and item vectors matched by id, towers matched by feature name.

A source model trained on a rich domain knows its users (their id embeddings) and how item features map to the
embedding space (the item tower). A target model over another item set, with few interactions per user, takes:

- the id embedding and bias of every user (item) whose id both models know;
- the feature projections of both towers, column by column, for the feature names both know (genres...), so a
  target item never seen in the source is placed by its features from the first step;
- hidden tower layers and the global bias, when their shapes agree.

Ids the source does not know keep their initial vectors, or start at zero when the tower has features
(``new_ids="zero"``, the default): a new item then starts exactly at its features' projection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from transferkit.errors import DataError
from transferkit.recsys.models import Tower, TwoTower


@dataclass
class RecsysTransferReport:
    """What moved from the source model into the target model.

    Attributes:
        users: ``matched`` (ids in both), ``target`` / ``source`` (vocabulary sizes), ``coverage`` (matched / target),
            ``unmatched_examples`` (a few target ids the source does not know).
        items: the same for items.
        features: per tower (``user``, ``item``): ``matched`` and ``new`` feature names.
        tensors: target tensors that received source values (in full or some rows/columns).
        skipped: tensors left as they were, with the reason.
    """

    users: dict[str, Any] = field(default_factory=dict)
    items: dict[str, Any] = field(default_factory=dict)
    features: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    tensors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        u, i = self.users, self.items
        lines = [
            f"users: {u['matched']}/{u['target']} target users found in the source ({u['coverage']:.1%})",
            f"items: {i['matched']}/{i['target']} target items found in the source ({i['coverage']:.1%})",
        ]
        for side, f in self.features.items():
            lines.append(f"{side} features: {len(f['matched'])} matched, {len(f['new'])} new")
        lines.append(f"tensors moved: {', '.join(self.tensors) or 'none'}")
        return "\n".join(lines)


def _copy_rows(
    src: torch.Tensor, dst: torch.Tensor, src_ids: list[str], dst_ids: list[str], new_rows_zero: bool
) -> tuple[int, list[str]]:
    index = {i: k for k, i in enumerate(src_ids)}
    pairs = [(k, index[i]) for k, i in enumerate(dst_ids) if i in index]
    unmatched = [k for k, i in enumerate(dst_ids) if i not in index]
    with torch.no_grad():
        if pairs:
            d, s = map(list, zip(*pairs))
            dst[d] = src[s]
        if new_rows_zero and unmatched:
            dst[unmatched] = 0.0
    return len(pairs), [dst_ids[k] for k in unmatched[:5]]


def _move_tower(
    side: str,
    src: Tower,
    dst: Tower,
    src_ids: list[str],
    dst_ids: list[str],
    ids: bool,
    tower: bool,
    new_ids: str,
    report: RecsysTransferReport,
) -> dict[str, Any]:
    has_features = dst.features is not None
    stats: dict[str, Any] = {"matched": 0, "target": len(dst_ids), "source": len(src_ids), "unmatched_examples": []}
    if ids:
        zero = new_ids == "zero" and has_features and tower
        for name in ("embedding", "bias"):
            stats["matched"], stats["unmatched_examples"] = _copy_rows(
                getattr(src, name).weight, getattr(dst, name).weight, src_ids, dst_ids, zero and name == "embedding"
            )
            report.tensors.append(f"{side}_tower.{name}.weight")
    stats["coverage"] = stats["matched"] / max(len(dst_ids), 1)
    if not tower:
        return stats
    if has_features:
        src_cols: dict[str, int] = {n: k for k, n in enumerate(src.feature_names)} if src.features is not None else {}
        pairs = [(k, src_cols[n]) for k, n in enumerate(dst.feature_names) if n in src_cols]
        report.features[side] = {
            "matched": [dst.feature_names[k] for k, _ in pairs],
            "new": [n for n in dst.feature_names if n not in src_cols],
        }
        if pairs:
            d, s = map(list, zip(*pairs))
            with torch.no_grad():
                for name in ("feature_proj", "feature_bias"):
                    getattr(dst, name).weight[:, d] = getattr(src, name).weight[:, s]
                    report.tensors.append(f"{side}_tower.{name}.weight")
        else:
            report.skipped.append(f"{side}_tower.feature_proj.weight: no feature name in common with the source")
    if dst.mlp is not None:
        src_mlp = src.mlp.state_dict() if src.mlp is not None else {}
        dst_mlp = dst.mlp.state_dict()
        if src_mlp.keys() == dst_mlp.keys() and all(src_mlp[k].shape == v.shape for k, v in dst_mlp.items()):
            dst.mlp.load_state_dict(src_mlp)
            report.tensors += [f"{side}_tower.mlp.{k}" for k in dst_mlp]
        else:
            report.skipped.append(f"{side}_tower.mlp: the source tower's hidden layers differ in shape")
    return stats


def transfer_embeddings(
    source: TwoTower,
    target: TwoTower,
    users: bool = True,
    items: bool = True,
    towers: bool = True,
    new_ids: str = "zero",
) -> RecsysTransferReport:
    """Copy what ``source`` knows into ``target`` in place: users and items by id, towers by feature name.

    Args:
        source: the trained source model.
        target: the target model (its own user and item vocabularies, the same ``dim``).
        users: move the id embeddings and biases of shared users.
        items: move the id embeddings and biases of shared items.
        towers: move the feature projections (by feature name), hidden layers and the global bias.
        new_ids: ``"zero"``: ids the source does not know start at zero where the tower has features (a new
            item starts at its features' projection); ``"keep"``: they keep their initial vectors.

    Returns:
        A report of what moved: matched users and items, coverage, feature names, tensors.

    Raises:
        DataError: the models' embedding sizes differ, or ``new_ids`` is not a choice.
    """
    if source.dim != target.dim:
        raise DataError(
            f"the source model has {source.dim}-d embeddings and the target {target.dim}-d; build the "
            f"target with dim={source.dim} to take the source's vectors"
        )
    if new_ids not in ("zero", "keep"):
        raise DataError(f"new_ids={new_ids!r} is not a choice; use 'zero' or 'keep'")
    report = RecsysTransferReport()
    report.users = _move_tower(
        "user", source.user_tower, target.user_tower, source.user_ids, target.user_ids, users, towers, new_ids, report
    )
    report.items = _move_tower(
        "item", source.item_tower, target.item_tower, source.item_ids, target.item_ids, items, towers, new_ids, report
    )
    if towers:
        with torch.no_grad():
            target.global_bias.copy_(source.global_bias)
        report.tensors.append("global_bias")
    return report
