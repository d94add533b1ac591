"""Recommendation models: matrix factorisation, a two-tower model and the popularity baseline.

Every model scores a user against items; ``scores(users)`` gives a (users x items) matrix over the model's whole
item set, which is what ranking metrics need. A model carries its vocabularies (``user_ids``, ``item_ids``: the
external ids as strings), so a target model can take a source model's user and item vectors by id.

Matrix factorisation is the two-tower model without features and without hidden layers: the score is
``<p_u, q_i> + b_u + b_i + mu`` in both, so one implementation serves both (``matrix_factorization`` builds it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from transferkit.errors import DataError
from transferkit.recsys.data import FeatureTable, Interactions, _show


class Vocab:
    """External ids (strings) <-> row indices of an embedding table."""

    def __init__(self, ids: Sequence[str], what: str):
        self.ids = [str(i) for i in ids]
        self.what = what
        self.index = {i: k for k, i in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            raise DataError(f"{what} ids repeat in the vocabulary; each id must appear once")

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, ids: Sequence[str] | np.ndarray | pd.Series) -> np.ndarray:
        """Row indices of ``ids``; an unknown id is an error that names it."""
        codes = pd.Series(np.asarray(ids, dtype=object)).map(self.index)
        if codes.isna().any():
            unknown = pd.unique(pd.Series(np.asarray(ids, dtype=object))[codes.isna()])
            raise DataError(
                f"unknown {self.what} ids: {_show(unknown)} ({len(unknown)} distinct); the model knows "
                f"{len(self)} {self.what}s"
            )
        return np.array(codes.to_numpy(), dtype=np.int64)  # a writable copy (torch.from_numpy shares it)


class KnownIds:
    """``user_ids`` / ``item_ids`` of a model that holds ``users`` and ``items`` vocabularies."""

    users: Vocab
    items: Vocab

    @property
    def user_ids(self) -> list[str]:
        return self.users.ids

    @property
    def item_ids(self) -> list[str]:
        return self.items.ids


class Tower(nn.Module):
    """One side of the two-tower model: ``id embedding + W x features``, then optional hidden layers.

    The id embedding is what collaborative filtering learns per user/item; the feature projection ``W`` is shared
    by all ids, so an id with few or no interactions (a new item) is still represented by its features.

    Args:
        n_ids: rows of the id embedding.
        dim: output dimension.
        features: optional (n_ids x n_features) matrix, stored as a buffer (it is data, not a parameter).
        feature_names: one name per feature column (used to match columns in transfer).
        hidden: sizes of hidden layers applied after the sum (residual MLP); empty for a linear tower.
    """

    def __init__(
        self,
        n_ids: int,
        dim: int,
        features: np.ndarray | None = None,
        feature_names: Sequence[str] = (),
        hidden: Sequence[int] = (),
    ):
        super().__init__()
        self.embedding = nn.Embedding(n_ids, dim)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.bias = nn.Embedding(n_ids, 1)
        nn.init.zeros_(self.bias.weight)
        self.feature_names = list(feature_names)
        if features is not None and features.shape[1] > 0:
            self.register_buffer("features", torch.as_tensor(features, dtype=torch.float32))
            self.feature_proj: nn.Linear | None = nn.Linear(features.shape[1], dim, bias=False)
            nn.init.normal_(self.feature_proj.weight, std=0.1)
            self.feature_bias: nn.Linear | None = nn.Linear(features.shape[1], 1, bias=False)
            nn.init.zeros_(self.feature_bias.weight)
        else:
            self.features = None
            self.feature_proj = self.feature_bias = None
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        if hidden:
            last = nn.Linear(width, dim)
            layers.append(last)
            nn.init.zeros_(last.weight)  # the MLP starts as the identity (residual) and learns a correction
            nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers) if layers else None

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors (len(idx) x dim) and biases (len(idx)) of the ids at ``idx``."""
        vec, bias = self.embedding(idx), self.bias(idx).squeeze(-1)
        if self.features is not None:
            f = self.features[idx]
            vec = vec + self.feature_proj(f)
            bias = bias + self.feature_bias(f).squeeze(-1)
        if self.mlp is not None:
            vec = vec + self.mlp(vec)
        return vec, bias


class TwoTower(KnownIds, nn.Module):
    """Score ``<user_tower(u), item_tower(i)> + b_u + b_i + mu`` (``mu``: the mean rating, 0 for implicit data).

    Args:
        user_ids: the user vocabulary (external ids).
        item_ids: the item vocabulary: the full item set the model ranks.
        dim: embedding dimension.
        user_features: optional user feature table (rows matched to ``user_ids`` by id; missing ids get zeros).
        item_features: optional item feature table (genres...).
        hidden: hidden layer sizes of both towers (empty: linear towers).
        kind: ``"mf"`` or ``"two_tower"``, for reports.
    """

    def __init__(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        dim: int = 32,
        user_features: FeatureTable | None = None,
        item_features: FeatureTable | None = None,
        hidden: Sequence[int] = (),
        kind: str = "two_tower",
    ):
        super().__init__()
        self.users, self.items = Vocab(user_ids, "user"), Vocab(item_ids, "item")
        self.kind, self.dim = kind, dim
        self.user_tower = Tower(
            len(self.users),
            dim,
            user_features.rows_for(self.users.ids) if user_features else None,
            user_features.names if user_features else (),
            hidden,
        )
        self.item_tower = Tower(
            len(self.items),
            dim,
            item_features.rows_for(self.items.ids) if item_features else None,
            item_features.names if item_features else (),
            hidden,
        )
        self.global_bias = nn.Parameter(torch.zeros(()))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of the (user, item) pairs; ``items`` may have an extra trailing dimension (negatives)."""
        u, bu = self.user_tower(users)
        v, bi = self.item_tower(items)
        if items.dim() > users.dim():
            return (u.unsqueeze(-2) * v).sum(-1) + bu.unsqueeze(-1) + bi + self.global_bias
        return (u * v).sum(-1) + bu + bi + self.global_bias

    @torch.no_grad()
    def scores(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of ``users`` against every item: (len(users) x n_items)."""
        u, bu = self.user_tower(users)
        v, bi = self.item_tower(torch.arange(len(self.items)))
        return u @ v.T + bu[:, None] + bi[None, :] + self.global_bias


def _with_seed(seed: int, build):
    # the model's initial weights depend only on the seed, and building it leaves the global RNG untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_two_tower(
    data: Interactions,
    dim: int = 32,
    items: Sequence[str] | None = None,
    hidden: Sequence[int] = (),
    use_item_features: bool = True,
    use_user_features: bool = True,
    seed: int = 0,
) -> TwoTower:
    """A two-tower model for the users and items of ``data`` (its feature tables feed the towers).

    Args:
        data: the training interactions: their users form the user vocabulary.
        dim: embedding dimension.
        items: the full item set to rank (default: the items of ``data``). Pass a catalogue to rank items that
            have no training interaction: with item features, such an item is still represented by them.
        hidden: hidden layer sizes of the towers.
        use_item_features: feed ``data.item_features`` to the item tower.
        use_user_features: feed ``data.user_features`` to the user tower.
        seed: seed of the initial weights.
    """
    item_features = data.item_features if use_item_features else None
    items = data.items if items is None else items
    return _with_seed(
        seed,
        lambda: TwoTower(
            data.users,
            items,
            dim,
            data.user_features if use_user_features else None,
            item_features,
            hidden,
            kind="two_tower",
        ),
    )


def matrix_factorization(
    data: Interactions, dim: int = 32, items: Sequence[str] | None = None, seed: int = 0
) -> TwoTower:
    """Matrix factorisation (id embeddings and biases only) for the users and items of ``data``."""
    items = data.items if items is None else items
    return _with_seed(seed, lambda: TwoTower(data.users, items, dim, kind="mf"))


class Popularity(KnownIds):
    """The popularity baseline: every user gets the items with the most training interactions.

    Args:
        train: interactions to count.
        item_ids: the full item set (default: the items of ``train``); items never seen score 0.
    """

    kind = "popularity"

    def __init__(self, train: Interactions, item_ids: Sequence[str] | None = None):
        self.users = Vocab(train.users, "user")
        self.items = Vocab(train.items if item_ids is None else item_ids, "item")
        counts = train.frame["item"].value_counts()
        self.counts = torch.tensor([float(counts.get(i, 0)) for i in self.items.ids])

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        return self.counts.expand(len(users), -1)

    def eval(self) -> Popularity:  # the same call as on a torch model
        return self
