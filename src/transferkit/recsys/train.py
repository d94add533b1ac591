"""Training a recommender: BPR, BCE or sampled softmax with negative sampling for implicit feedback, MSE for ratings.

The loop is explicit and seeded: the order of the training rows in an epoch depends only on (seed, epoch) and the
negatives come from a generator seeded once, so the same call gives the same model. With a validation split the
model is ranked on it before training and after every epoch, and the best epoch's weights are kept (early stopping
with ``patience``): tuning happens on validation, never on test.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from transferkit.engine.loop import show_progress
from transferkit.errors import DataError, TrainingError, did_you_mean
from transferkit.recsys.data import Interactions
from transferkit.recsys.metrics import evaluate_ranking, rmse
from transferkit.recsys.models import Tower, TwoTower, Vocab

LOSSES = ("bpr", "bce", "softmax", "mse")
FREEZE = ("user_embeddings", "user_tower", "item_embeddings", "item_tower")


@dataclass
class TrainResult:
    """What training did: the per-epoch history and the epoch whose weights the model now holds."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val: dict[str, Any] | None = None
    train_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "best_val": self.best_val,
            "train_s": round(self.train_s, 3),
            "history": self.history,
        }


def _frozen_params(model: TwoTower, freeze: Sequence[str]) -> set[int]:
    parts: dict[str, list[torch.nn.Module]] = {
        "user_embeddings": [model.user_tower.embedding, model.user_tower.bias],
        "user_tower": [model.user_tower],
        "item_embeddings": [model.item_tower.embedding, model.item_tower.bias],
        "item_tower": [model.item_tower],
    }
    frozen = set()
    for name in freeze:
        if name not in parts:
            raise DataError(
                f"freeze={name!r} is not a part of the model; choose from {list(FREEZE)}.{did_you_mean(name, FREEZE)}"
            )
        frozen |= {id(p) for m in parts[name] for p in m.parameters()}
    return frozen


def recommendation_loss(
    model: TwoTower,
    users: torch.Tensor,
    items: torch.Tensor,
    negatives: torch.Tensor | None,
    loss: str,
    ratings: torch.Tensor | None = None,
    l2: float = 0.0,
) -> torch.Tensor:
    """The loss of one batch.

    Args:
        model: the model.
        users: (B) user indices.
        items: (B) positive item indices (rated items for ``mse``).
        negatives: (B x N) sampled item indices (``None`` for ``mse``).
        loss: ``bpr`` (``-log sigmoid(s_pos - s_neg)``), ``bce`` (positives 1, negatives 0, each term averaged),
            ``softmax`` (cross-entropy of the positive against the N negatives) or ``mse`` (against ``ratings``).
        ratings: (B) ratings, for ``mse``.
        l2: weight of the squared norm of the batch's user and item id embeddings (per example).
    """
    pos = model(users, items)
    if loss == "mse":
        value = F.mse_loss(pos, cast(torch.Tensor, ratings))  # callers pass ratings with the mse loss (see Args)
    else:
        neg = model(users, negatives)
        if loss == "bpr":
            value = -F.logsigmoid(pos[:, None] - neg).mean()
        elif loss == "bce":
            value = F.softplus(-pos).mean() + F.softplus(neg).mean()
        elif loss == "softmax":
            logits = torch.cat([pos[:, None], neg], dim=1)
            value = F.cross_entropy(logits, torch.zeros(len(users), dtype=torch.long))
        else:
            raise DataError(f"unknown loss {loss!r}; choose from {list(LOSSES)}.{did_you_mean(loss, LOSSES)}")
    if l2:
        reg = model.user_tower.embedding(users).pow(2).sum(-1) + model.item_tower.embedding(items).pow(2).sum(-1)
        if negatives is not None:
            reg = reg + model.item_tower.embedding(negatives).pow(2).sum(-1).mean(-1)
        value = value + l2 * reg.mean()
    return value


def train_recommender(
    model: TwoTower,
    train: Interactions,
    loss: str = "bpr",
    epochs: int = 20,
    lr: float = 0.01,
    batch_size: int = 1024,
    num_negatives: int = 4,
    l2: float = 0.0,
    seed: int = 0,
    val: Interactions | None = None,
    select: str | None = None,
    patience: int | None = None,
    freeze: Sequence[str] = (),
    frozen_users: Sequence[str] | None = None,
    frozen_items: Sequence[str] | None = None,
    desc: str | None = None,
    num_threads: int | None = 1,
) -> TrainResult:
    """Train ``model`` on ``train`` with Adam; with ``val``, keep the weights of the best validation epoch.

    Args:
        model: a ``TwoTower`` (or matrix factorisation) whose vocabularies cover ``train``.
        train: training interactions (``mse`` needs ratings).
        loss: ``bpr``, ``bce``, ``softmax`` (implicit feedback, negatives sampled uniformly from the model's
            items) or ``mse`` (ratings).
        epochs: passes over ``train``.
        lr: Adam learning rate.
        batch_size: interactions per step.
        num_negatives: negatives per positive (``bpr``, ``bce``, ``softmax``).
        l2: squared-norm penalty on the batch's id embeddings.
        seed: fixes the row order of each epoch and the negatives.
        val: optional validation interactions (one held-out event per user), ranked before training and after
            every epoch (``mse``: RMSE).
        select: validation metric that picks the epoch (default ``ndcg@10``, ``rmse`` for ``mse``; lower is better
            only for ``rmse``).
        patience: stop after this many epochs without a better validation value (``None``: run all epochs).
        freeze: parts left as they are: ``user_embeddings``, ``user_tower``, ``item_embeddings``, ``item_tower``
            (e.g. user vectors transferred from a source model).
        frozen_users: ids whose user embedding and bias rows stay as they are while the other rows train (e.g. the
            users a source model provided; users it did not know still learn).
        frozen_items: the same for items.
        desc: progress bar label (no bar when ``None``).
        num_threads: torch threads while training (``None``: leave torch's setting); one is fastest for these
            small lookups (see ``torch_threads``).

    Raises:
        DataError: an unknown loss or frozen part, ``mse`` without ratings, ids the model does not know.
        TrainingError: the loss became NaN or infinite.
    """
    if loss not in LOSSES:
        raise DataError(f"unknown loss {loss!r}; choose from {list(LOSSES)}.{did_you_mean(loss, LOSSES)}")
    if loss == "mse" and not train.has_ratings:
        raise DataError(
            "loss='mse' needs ratings; read the interactions with rating_col=..., or use an implicit "
            "loss (bpr, bce, softmax)"
        )
    if len(train) == 0:
        raise DataError("the training interactions are empty")
    hooks = [
        *_freeze_rows(model.user_tower, model.users, frozen_users),
        *_freeze_rows(model.item_tower, model.items, frozen_items),
    ]
    try:
        with torch_threads(num_threads):
            return _train(
                model, train, loss, epochs, lr, batch_size, num_negatives, l2, seed, val, select, patience, freeze, desc
            )
    finally:
        for hook in hooks:
            hook.remove()


def _freeze_rows(tower: Tower, vocab: Vocab, ids: Sequence[str] | None) -> list[Any]:
    """Gradient hooks that zero the rows of ``ids`` in the tower's id embedding and bias.

    A row whose gradient is always zero never moves under Adam (its moment estimates stay zero), penalty included.
    """
    if not ids:
        return []
    keep = torch.ones(len(vocab), 1)
    keep[torch.from_numpy(vocab.encode(list(ids)))] = 0.0
    return [p.register_hook(lambda g: g * keep) for p in (tower.embedding.weight, tower.bias.weight)]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (``None``: unchanged), then restore the previous number.

    Embedding lookups of a few thousand rows are too small to split: on a shared 2-core machine two threads made
    an epoch several times slower than one (docs/benchmarks.md).
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(
    model: TwoTower,
    train: Interactions,
    loss: str,
    epochs: int,
    lr: float,
    batch_size: int,
    num_negatives: int,
    l2: float,
    seed: int,
    val: Interactions | None,
    select: str | None,
    patience: int | None,
    freeze: Sequence[str],
    desc: str | None,
) -> TrainResult:
    select = select or ("rmse" if loss == "mse" else "ndcg@10")
    lower_better = select == "rmse"
    users = torch.from_numpy(model.users.encode(train.frame["user"]))
    items = torch.from_numpy(model.items.encode(train.frame["item"]))
    ratings = torch.tensor(train.frame["rating"].to_numpy(np.float32)) if loss == "mse" else None
    if loss == "mse" and float(model.global_bias.detach()) == 0.0:
        with torch.no_grad():  # start from the mean rating, so the embeddings learn deviations from it
            assert ratings is not None  # set for mse just above
            model.global_bias.fill_(float(ratings.mean()))
    frozen = _frozen_params(model, freeze)
    params = [p for p in model.parameters() if id(p) not in frozen]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n_items = len(model.items)

    def validate() -> dict[str, Any]:
        assert val is not None  # called only when there is validation data
        if loss == "mse":
            return {"rmse": rmse(model, val)}
        return evaluate_ranking(model, val, train, what="validation")

    result = TrainResult()
    start = time.perf_counter()
    best_state, best_value, since_best = None, None, 0
    if val is not None:
        result.best_val = validate()
        best_value, best_state = result.best_val[select], copy.deepcopy(model.state_dict())
        result.history.append({"epoch": 0, "val": result.best_val})
    bar = tqdm(range(1, epochs + 1), desc=desc, leave=False, disable=desc is None or not show_progress())
    for epoch in bar:
        model.train()
        order = torch.as_tensor(np.random.default_rng([seed, epoch]).permutation(len(users)))
        total = 0.0
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            negatives = (
                None if loss == "mse" else torch.randint(n_items, (len(idx), num_negatives), generator=generator)
            )
            value = recommendation_loss(
                model, users[idx], items[idx], negatives, loss, ratings[idx] if ratings is not None else None, l2
            )
            if not math.isfinite(value.item()):
                raise TrainingError(f"the {loss} loss became {value.item()} at epoch {epoch}; lower lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total += value.item() * len(idx)
        entry: dict[str, Any] = {"epoch": epoch, "loss": total / len(order)}
        if val is not None:
            entry["val"] = validate()
            value_now = entry["val"][select]
            better = value_now < best_value if lower_better else value_now > best_value
            if better:
                best_value, best_state, since_best = value_now, copy.deepcopy(model.state_dict()), 0
                result.best_epoch, result.best_val = epoch, entry["val"]
            else:
                since_best += 1
        result.history.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.4f}")
        if patience is not None and since_best >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = result.history[-1]["epoch"] if result.history else 0
    model.eval()
    result.train_s = time.perf_counter() - start
    return result
