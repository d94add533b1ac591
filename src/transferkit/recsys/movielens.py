"""MovieLens 100K, read from the installed ``recbole`` package, and the cross-domain split of the demo.

The data are GroupLens' MovieLens 100K as RecBole ships them (``recbole/dataset_example/ml-100k/``: ``.inter`` with
``user_id:token item_id:token rating:float timestamp:float``, ``.item`` with ``release_year`` and the genres in
``class``, ``.user`` with age, gender, occupation). They are read in place, never copied, and recbole is never
imported (installed with ``--no-deps``, it would not import anyway): its folder is found with ``find_spec``.

The cross-domain split (``cross_domain_split``): new releases as a sparse target domain.

- source domain: every rating of a film released in 1996 or before;
- target domain: every rating of a film released in 1997 or 1998 (new items: no target film is in the source);
  films without a readable release year are dropped;
- the users are shared; a target user needs ``k + 2`` target ratings and keeps, in time order, the last one as
  test, the one before as validation and the ``k`` before that as training (sparse: ``k`` = 5 by default);
- the source drops users with fewer than 2 source ratings and keeps each user's last source rating apart as
  validation (early stopping of the source model).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from transferkit.errors import DataError, DataNotFoundError
from transferkit.recsys.data import (
    Interactions,
    Split,
    filter_interactions,
    keep_last_per_user,
    leave_last_out,
    read_features,
    read_interactions,
    read_table,
)


def movielens_100k_dir() -> Path:
    """The folder of MovieLens 100K inside the installed ``recbole`` package (found without importing it)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            "MovieLens 100K is read from the 'recbole' package, which is not installed: "
            "pip install --no-deps recbole==1.2.1"
        )
    folder = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise DataNotFoundError(
            f"'{folder / 'ml-100k.inter'}' does not exist; reinstall recbole==1.2.1 "
            "(pip install --no-deps --force-reinstall recbole==1.2.1)"
        )
    return folder


def read_movielens_100k(item_features: bool = True, user_features: bool = False) -> Interactions:
    """The 100,000 ratings (943 users, 1,682 films) with ratings and timestamps; ids are strings.

    Args:
        item_features: attach the genres (19 ``class=...`` columns, several per film) as item features.
        user_features: attach age (standardised), gender and occupation as user features.
    """
    folder = movielens_100k_dir()
    items = read_features(folder / "ml-100k.item", "item_id", ["class"], multi_value_sep=" ") if item_features else None
    users = (
        read_features(folder / "ml-100k.user", "user_id", ["age", "gender", "occupation"], numeric=["age"])
        if user_features
        else None
    )
    return read_interactions(
        folder / "ml-100k.inter",
        user_col="user_id",
        item_col="item_id",
        rating_col="rating",
        timestamp_col="timestamp",
        item_features=items,
        user_features=users,
    )


def release_years() -> pd.Series:
    """Release year per film id (NaN where the file's year is not a number: 2 films)."""
    table = read_table(movielens_100k_dir() / "ml-100k.item")
    return pd.Series(pd.to_numeric(table["release_year"], errors="coerce").to_numpy(), index=table["item_id"])


@dataclass(frozen=True)
class CrossDomain:
    """The source interactions (train / validation) and the sparse target split (train / validation / test)."""

    source: Split  # source.test is the source's validation event per user; source.val is empty
    target: Split
    source_items: list[str]  # every source film (the source model's item set)
    target_items: list[str]  # every target film: the full item set the target models rank
    k: int

    def describe(self) -> dict[str, object]:
        return {
            "k": self.k,
            "source": {"train": self.source.train.describe(), "val": self.source.test.describe()},
            "target": self.target.describe(),
            "source_items": len(self.source_items),
            "target_items": len(self.target_items),
        }


def cross_domain_split(data: Interactions | None = None, k: int = 5, split_year: int = 1997) -> CrossDomain:
    """Source = ratings of films released before ``split_year``; target = the newer films, ``k`` per user to train.

    See the module docstring for the exact protocol. Everything is deterministic (time order, ties in file order).

    Args:
        data: MovieLens 100K with item features (default: ``read_movielens_100k()``).
        k: target training ratings kept per user (the most recent before the validation and test ones).
        split_year: the first release year of the target domain.
    """
    if k < 1:
        raise DataError(f"k={k}: a target user needs at least one training rating")
    data = read_movielens_100k() if data is None else data
    years = data.frame["item"].map(release_years())
    known = years.notna().to_numpy()
    source = filter_interactions(data.subset(known & (years < split_year).to_numpy()), min_per_user=2)
    target_all = data.subset(known & (years >= split_year).to_numpy())
    target_items = sorted(target_all.frame["item"].unique())  # every new film, also those only dropped users rated
    target = filter_interactions(target_all, min_per_user=k + 2)
    split = leave_last_out(target, n_test=1, n_val=1)
    sparse_train = keep_last_per_user(split.train, k)
    src = leave_last_out(source, n_test=1, n_val=0)
    overlap = set(source.frame["item"]) & set(target_items)
    if overlap:  # by construction; a guard against a changed year rule
        raise DataError(f"{len(overlap)} items are in both domains")
    return CrossDomain(
        src, Split(sparse_train, split.val, split.test), sorted(source.frame["item"].unique()), target_items, k
    )
