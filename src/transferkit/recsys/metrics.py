"""Ranking metrics over the full item set (HR@k, NDCG@k, recall@k) and RMSE for ratings.

Ranking protocol: each user's held-out items are ranked against every item of the model, except the items the
user has already interacted with in training (they are excluded, never recommended again); a held-out item is
never excluded. Ties are broken against the held-out item: an item scored the same as a held-out item counts as
ranked above it, so a model that scores everything alike gets 0 (ties among held-out items go by item index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from transferkit.engine.loop import show_progress
from transferkit.errors import DataError
from transferkit.recsys.data import Interactions, check_heldout

if TYPE_CHECKING:
    from transferkit.recsys.models import TwoTower

DEFAULT_KS = (("hr", 10), ("ndcg", 10), ("recall", 20))


class Scorer(Protocol):
    """What ranking needs of a model: its vocabularies and scores of users against every item."""

    @property
    def user_ids(self) -> list[str]: ...

    @property
    def item_ids(self) -> list[str]: ...

    def scores(self, users: torch.Tensor) -> torch.Tensor: ...


def heldout_ranks(scores: torch.Tensor, relevant: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """0-based rank of every relevant item among the items not excluded; -1 where an item is not relevant.

    Args:
        scores: (users x items) scores.
        relevant: (users x items) bool, the held-out items.
        exclude: (users x items) bool, items not to rank (seen in training); ignored where ``relevant``.
    """
    exclude = exclude & ~relevant
    ranks = torch.full(scores.shape, -1, dtype=torch.long)
    rows, cols = relevant.nonzero(as_tuple=True)
    if len(rows) == 0:
        return ranks
    s = scores[rows]  # one row per relevant (user, item) pair
    target = s.gather(1, cols[:, None])
    live = ~exclude[rows]
    other_rel = relevant[rows]
    index = torch.arange(scores.shape[1])[None, :]
    ahead = live & (
        (s > target)
        | ((s == target) & ~other_rel)  # ties with other items: against the held-out item
        | ((s == target) & other_rel & (index < cols[:, None]))
    )  # ties among held-out items: by index
    ahead[torch.arange(len(rows)), cols] = False
    ranks[rows, cols] = ahead.sum(1)
    return ranks


def ranking_metrics(
    scores: torch.Tensor,
    relevant: torch.Tensor,
    exclude: torch.Tensor | None = None,
    ks: Sequence[tuple[str, int]] = DEFAULT_KS,
) -> dict[str, float]:
    """Mean HR@k, NDCG@k and recall@k over the users that have at least one relevant item.

    HR@k: 1 if any relevant item is in the top k. Recall@k: the share of the user's relevant items in the top k.
    NDCG@k: sum of ``1/log2(rank+2)`` over relevant items in the top k, divided by its best possible value
    (``min(#relevant, k)`` items at the top).

    Args:
        scores: (users x items) scores.
        relevant: (users x items) bool, the held-out items.
        exclude: (users x items) bool, items not to rank (seen in training).
        ks: (metric, k) pairs, metric one of ``hr``, ``ndcg``, ``recall``.
    """
    sums, n_users = _metric_sums(scores, relevant, exclude, ks)
    return {name: (v / n_users if n_users else float("nan")) for name, v in sums.items()}


def _metric_sums(
    scores: torch.Tensor, relevant: torch.Tensor, exclude: torch.Tensor | None, ks: Sequence[tuple[str, int]]
) -> tuple[dict[str, float], int]:
    for metric, k in ks:
        if metric not in ("hr", "ndcg", "recall") or k < 1:
            raise DataError(f"unknown ranking metric {metric}@{k}; choose from hr, ndcg, recall with k >= 1")
    exclude = torch.zeros_like(relevant) if exclude is None else exclude
    ranks = heldout_ranks(scores, relevant, exclude)
    n_rel = relevant.sum(1)
    users = n_rel > 0
    out = {}
    for metric, k in ks:
        top = (ranks >= 0) & (ranks < k)
        if metric == "hr":
            per_user = top.any(1).float()
        elif metric == "recall":
            per_user = top.sum(1) / n_rel.clamp(min=1)
        else:
            gains = torch.where(top, 1.0 / torch.log2(ranks.clamp(min=0).float() + 2), torch.zeros(()))
            ideal = torch.tensor([sum(1 / math.log2(r + 2) for r in range(min(int(n), k))) for n in n_rel])
            per_user = gains.sum(1) / ideal.clamp(min=1e-12)
        out[f"{metric}@{k}"] = float(per_user[users].sum())
    return out, int(users.sum())


def _user_items(data: Interactions, users: dict[str, int], items: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    frame = data.frame
    keep = frame["user"].isin(users.keys()) & frame["item"].isin(items.keys())
    return (
        frame.loc[keep, "user"].map(users).to_numpy(np.int64),
        frame.loc[keep, "item"].map(items).to_numpy(np.int64),
    )


@torch.no_grad()
def evaluate_ranking(
    model: Scorer,
    heldout: Interactions,
    seen: Interactions | Sequence[Interactions],
    ks: Sequence[tuple[str, int]] = DEFAULT_KS,
    batch_size: int = 1024,
    what: str = "test",
    desc: str | None = None,
) -> dict[str, Any]:
    """HR@10, NDCG@10 and recall@20 (by default) of ``model`` on the held-out interactions, over its full item set.

    Args:
        model: a ``TwoTower``, ``Popularity`` or anything with ``user_ids``, ``item_ids`` and ``scores(users)``.
        heldout: the validation or test interactions (leave-last-out: one per user).
        seen: the interactions the users already had (the training split; at test time also the validation
            split): excluded from the ranking. The first one must be the training split: every held-out user needs
            training interactions there.
        ks: (metric, k) pairs.
        batch_size: users scored at a time.
        what: the split's name, for error messages.
        desc: progress bar label (no bar when ``None``).

    Returns:
        The metrics, plus ``users`` (how many users were ranked) and ``items`` (the size of the ranked item set).

    Raises:
        DataError: unknown user or item ids in ``heldout``, or a held-out user with no training interactions.
    """
    seen = [seen] if isinstance(seen, Interactions) else list(seen)
    check_heldout(seen[0], heldout, model.user_ids, model.item_ids, what)
    if hasattr(model, "eval"):
        model.eval()
    users = {u: k for k, u in enumerate(model.user_ids)}
    items = {i: k for k, i in enumerate(model.item_ids)}
    hu, hi = _user_items(heldout, users, items)
    ranked = np.unique(hu)
    row = np.full(len(users), -1)
    row[ranked] = np.arange(len(ranked))
    pairs = [(row[hu], hi), *((row[su], si) for su, si in (_user_items(s, users, items) for s in seen))]
    sums = {f"{m}@{k}": 0.0 for m, k in ks}
    starts = range(0, len(ranked), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=desc is None or not show_progress()):
        batch = ranked[start : start + batch_size]
        lo, hi = start, start + len(batch)
        scores = model.scores(torch.as_tensor(batch)).float()
        relevant = torch.zeros(scores.shape, dtype=torch.bool)
        exclude = torch.zeros(scores.shape, dtype=torch.bool)
        for k, (r, si) in enumerate(pairs):
            target = relevant if k == 0 else exclude
            m = (r >= lo) & (r < hi)
            target[torch.as_tensor(r[m] - lo), torch.as_tensor(si[m])] = True
        part, _ = _metric_sums(scores, relevant, exclude, ks)
        for name, v in part.items():
            sums[name] += v
    return {**{name: v / max(len(ranked), 1) for name, v in sums.items()}, "users": len(ranked), "items": len(items)}


@torch.no_grad()
def rmse(model: TwoTower, data: Interactions) -> float:
    """Root mean squared error of the predicted ratings on ``data`` (which must have a rating column)."""
    if not data.has_ratings:
        raise DataError("RMSE needs ratings; read the interactions with rating_col=... (this data is implicit)")
    model.eval()
    users = torch.as_tensor(model.users.encode(data.frame["user"]))
    items = torch.as_tensor(model.items.encode(data.frame["item"]))
    pred = model(users, items)
    return float(torch.sqrt(torch.mean((pred - torch.tensor(data.frame["rating"].to_numpy(np.float32))) ** 2)))
