"""Interactions and feature tables for recommendation: reading, checking, leave-last-out splitting.

An ``Interactions`` holds one row per (user, item) event in a pandas frame with the fixed column names ``user``,
``item`` and, when the data has them, ``rating`` and ``timestamp``. Ids are strings everywhere (``196`` in a CSV and
``"196"`` in a Parquet file are the same user), which is what lets a target model find a source model's users and
items by id. Optional user and item feature tables (genres, age...) travel with the interactions.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from transferkit.data.modality import repeated_columns
from transferkit.errors import DataError, DataNotFoundError

COLUMNS = ("user", "item", "rating", "timestamp")


def _show(ids: Sequence[object], n: int = 5) -> str:
    """The first ``n`` ids, and how many more there are."""
    ids = list(ids)
    shown = ", ".join(repr(str(i)) for i in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


@dataclass(frozen=True)
class FeatureTable:
    """A numeric feature matrix for a set of ids (users or items); one row per id, named columns.

    Attributes:
        ids: the ids, as strings, in row order.
        values: float32 matrix, ``len(ids)`` x ``len(names)``.
        names: one name per column (``class=Drama``, ``age``...); transfer matches feature columns by these names.
    """

    ids: list[str]
    values: np.ndarray
    names: list[str]

    def __post_init__(self) -> None:
        if self.values.shape != (len(self.ids), len(self.names)):
            raise DataError(
                f"feature matrix has shape {self.values.shape}; expected ({len(self.ids)}, "
                f"{len(self.names)}) for {len(self.ids)} ids and {len(self.names)} feature names"
            )

    def rows_for(self, ids: Sequence[str], what: str = "item") -> np.ndarray:
        """The feature rows of ``ids`` in that order; ids without a row get zeros (no feature known)."""
        index = {i: r for r, i in enumerate(self.ids)}
        out = np.zeros((len(ids), len(self.names)), dtype=np.float32)
        rows = [(k, index[i]) for k, i in enumerate(ids) if i in index]
        if rows:
            k, r = map(list, zip(*rows))
            out[k] = self.values[r]
        return out


def read_table(source: str | Path | pd.DataFrame, sep: str | None = None) -> pd.DataFrame:
    """A CSV/TSV/Parquet file (or a frame, returned as is) as a pandas frame.

    RecBole's atomic files (``.inter``, ``.item``, ``.user``: tab-separated, headers such as ``user_id:token``) are
    read too; the ``:type`` suffix is dropped from the column names.
    """
    if isinstance(source, pd.DataFrame):
        return source
    path = Path(source)
    if not path.is_file():
        raise DataNotFoundError(f"data file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix in (".inter", ".item", ".user"):
        options: dict[str, Any] = {"sep": "\t", "quoting": csv.QUOTE_NONE, "dtype": str, "keep_default_na": False}
        frame = _read_csv(path, options, lambda c: c.split(":", 1)[0])
        frame.columns = [c.split(":", 1)[0] for c in frame.columns]
        return frame
    if suffix in (".csv", ".tsv", ".txt", ".gz", ".bz2", ".zip"):
        return _read_csv(path, {"sep": sep or ("\t" if ".tsv" in path.suffixes else ",")})
    raise DataError(f"'{path}': unknown file type '{suffix}'; use .csv, .tsv or .parquet (or pass a pandas DataFrame)")


def _read_csv(path: Path, options: dict[str, Any], column: Callable[[str], str] = str) -> pd.DataFrame:
    """``pd.read_csv`` (UTF-8, a byte-order mark allowed) refusing what pandas would read silently wrong: a header
    naming a column twice (pandas renames the second 'item.1' and reads the first); and bytes that are not UTF-8
    named by file instead of a bare ``UnicodeDecodeError``. ``column`` maps a header name to the name it is read by
    (RecBole's ``item_id:token`` is ``item_id``)."""
    try:
        first = pd.read_csv(path, header=None, nrows=1, **{**options, "dtype": str, "keep_default_na": False})
        header = [column(str(c).strip()) for c in first.iloc[0].tolist()] if len(first) else []
        repeated = repeated_columns(header)
        if repeated:
            raise DataError(
                f"'{path}' has {repeated} in its header {header}; only one of them would be read. Give every "
                "column its own name (user_col= / item_col= / rating_col= / timestamp_col= name the ones to read)"
            )
        return pd.read_csv(path, **options)
    except UnicodeDecodeError as e:
        raise DataError(
            f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 (with pandas: "
            "to_csv(..., encoding='utf-8')), or read it yourself with its encoding and pass the DataFrame"
        ) from e


def _require_columns(frame: pd.DataFrame, wanted: dict[str, str | None], name: str, hint: str) -> None:
    missing = [f"{role}={col!r}" for role, col in wanted.items() if col is not None and col not in frame.columns]
    if missing:
        raise DataError(f"{name} has no column {', '.join(missing)}; its columns are {list(frame.columns)}. {hint}")


@dataclass(frozen=True)
class Interactions:
    """User-item events, with optional user and item features.

    Attributes:
        frame: columns ``user`` and ``item`` (strings), and ``rating`` (float) / ``timestamp`` (int64, seconds)
            when the data has them; the row order is the file's.
        item_features: optional features per item id (genres...), used by the item tower.
        user_features: optional features per user id, used by the user tower.
    """

    frame: pd.DataFrame
    item_features: FeatureTable | None = None
    user_features: FeatureTable | None = None

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def users(self) -> list[str]:
        """The distinct user ids, sorted."""
        return sorted(self.frame["user"].unique())

    @property
    def items(self) -> list[str]:
        """The distinct item ids, sorted."""
        return sorted(self.frame["item"].unique())

    @property
    def has_ratings(self) -> bool:
        return "rating" in self.frame.columns

    @property
    def has_timestamps(self) -> bool:
        return "timestamp" in self.frame.columns

    def subset(self, mask: np.ndarray | pd.Series) -> Interactions:
        """The rows where ``mask`` is true, with the same feature tables."""
        return replace(self, frame=self.frame[np.asarray(mask)].reset_index(drop=True))

    def describe(self) -> dict[str, int]:
        return {"interactions": len(self), "users": self.frame["user"].nunique(), "items": self.frame["item"].nunique()}


def read_interactions(
    source: str | Path | pd.DataFrame,
    user_col: str = "user",
    item_col: str = "item",
    rating_col: str | None = "rating",
    timestamp_col: str | None = "timestamp",
    item_features: FeatureTable | None = None,
    user_features: FeatureTable | None = None,
    sep: str | None = None,
) -> Interactions:
    """Interactions from a CSV/TSV/Parquet file or a pandas frame, with configurable column names.

    Args:
        source: a file path or a ``pandas.DataFrame``.
        user_col: column of user ids.
        item_col: column of item ids.
        rating_col: column of explicit ratings; ``None`` for implicit feedback (every row is a positive event).
        timestamp_col: column of event times (numbers, or dates pandas can parse); ``None`` when there is none
            (``leave_last_out(by="row")`` then uses the file order).
        item_features: optional item feature table (``read_features``).
        user_features: optional user feature table.
        sep: CSV separator (default ``,``; tab for ``.tsv``).

    Raises:
        DataError: a named column is missing (the message lists the file's columns), an id is empty, or a rating
            or timestamp cannot be read as a number/date.
    """
    name = f"'{source}'" if not isinstance(source, pd.DataFrame) else "the interactions frame"
    raw = read_table(source, sep)
    _require_columns(
        raw,
        {"user_col": user_col, "item_col": item_col, "rating_col": rating_col, "timestamp_col": timestamp_col},
        name,
        "Pass the right names as user_col= / item_col=; rating_col=None for implicit feedback, "
        "timestamp_col=None when there are no times.",
    )
    frame = pd.DataFrame({"user": _ids(raw[user_col], name, user_col), "item": _ids(raw[item_col], name, item_col)})
    if rating_col is not None:
        ratings = pd.to_numeric(raw[rating_col], errors="coerce")
        bad = np.flatnonzero(ratings.isna().to_numpy())
        if len(bad):
            raise DataError(
                f"{name}: column '{rating_col}' has {len(bad)} value(s) that are not numbers (first at "
                f"data row {bad[0] + 1}: {raw[rating_col].iloc[bad[0]]!r}); fix them, or pass "
                "rating_col=None to read the rows as implicit feedback"
            )
        frame["rating"] = ratings.to_numpy(dtype=np.float32)
    if timestamp_col is not None:
        frame["timestamp"] = _timestamps(raw[timestamp_col], name, timestamp_col)
    return Interactions(frame, item_features, user_features)


def _ids(column: pd.Series, name: str, col: str) -> np.ndarray:
    values = column.astype(str).str.strip()
    # integer-valued floats (pandas reads an int column with gaps as float) must not become "196.0"
    if pd.api.types.is_float_dtype(column.dtype):
        values = column.map(lambda v: str(int(v)) if pd.notna(v) and float(v).is_integer() else str(v))
    empty = np.flatnonzero((column.isna() | (values == "")).to_numpy())
    if len(empty):
        raise DataError(
            f"{name}: column '{col}' has {len(empty)} empty id(s) (first at data row {empty[0] + 1}); "
            "drop or fill those rows"
        )
    return values.to_numpy(dtype=object)


def _timestamps(column: pd.Series, name: str, col: str) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(column.dtype):
        ts = pd.to_numeric(column, errors="coerce")
    else:
        ts = pd.to_numeric(column, errors="coerce")
        if ts.isna().any():  # not numbers: dates such as "2024-01-31 12:00"
            dates = pd.to_datetime(column, errors="coerce", utc=True, format="mixed")
            ts = pd.Series((dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1), index=column.index)
            ts[dates.isna()] = np.nan
    bad = np.flatnonzero(ts.isna().to_numpy())
    if len(bad):
        raise DataError(
            f"{name}: column '{col}' has {len(bad)} value(s) that are neither numbers nor dates (first "
            f"at data row {bad[0] + 1}: {column.iloc[bad[0]]!r})"
        )
    return ts.to_numpy().astype(np.int64)


def read_features(
    source: str | Path | pd.DataFrame,
    id_col: str,
    columns: Sequence[str] | None = None,
    multi_value_sep: str = "|",
    numeric: Sequence[str] = (),
    sep: str | None = None,
) -> FeatureTable:
    """A feature table (one row per user or item) as a numeric matrix.

    Numeric columns (those listed in ``numeric``, or with a numeric dtype) are standardised to mean 0, sd 1, with
    missing values at 0. Every other column is categorical and may hold several values separated by
    ``multi_value_sep`` (MovieLens genres ``Action|Comedy``); it becomes one 0/1 column per value, named
    ``column=value``.

    Args:
        source: a file path or a ``pandas.DataFrame``.
        id_col: column of user or item ids.
        columns: feature columns to use (default: every column except ``id_col``).
        multi_value_sep: separator between the values of a multi-valued categorical column.
        numeric: columns to read as numbers even when stored as text (unreadable values count as missing).
        sep: CSV separator.

    Raises:
        DataError: ``id_col`` or a listed column is missing (the message lists the columns), or an id repeats.
    """
    name = f"'{source}'" if not isinstance(source, pd.DataFrame) else "the feature frame"
    raw = read_table(source, sep)
    columns = [c for c in raw.columns if c != id_col] if columns is None else list(columns)
    _require_columns(
        raw,
        {
            "id_col": id_col,
            **{f"columns[{k}]": c for k, c in enumerate(columns)},
            **{f"numeric[{k}]": c for k, c in enumerate(numeric)},
        },
        name,
        "Pass the id column as id_col= and the feature columns as columns=.",
    )
    ids = _ids(raw[id_col], name, id_col)
    dup = pd.Series(ids).duplicated()
    if dup.any():
        raise DataError(
            f"{name}: ids repeat in column '{id_col}' ({_show(pd.Series(ids)[dup].unique())}); "
            "a feature table needs one row per id"
        )
    blocks, names = [], []
    for col in columns:
        values = raw[col]
        if col in numeric or pd.api.types.is_numeric_dtype(values.dtype):
            x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
            known = ~np.isnan(x)
            mean, sd = (x[known].mean(), x[known].std()) if known.any() else (0.0, 0.0)
            blocks.append(np.where(known, (x - mean) / (sd or 1.0), 0.0)[:, None])
            names.append(col)
        else:
            tokens = [
                [t.strip() for t in str(v).split(multi_value_sep) if t.strip()] if pd.notna(v) else [] for v in values
            ]
            vocab = sorted({t for ts in tokens for t in ts})
            index = {t: k for k, t in enumerate(vocab)}
            block = np.zeros((len(values), len(vocab)))
            for r, ts in enumerate(tokens):
                block[r, [index[t] for t in ts]] = 1.0
            blocks.append(block)
            names += [f"{col}={t}" for t in vocab]
    values = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(ids), 0))
    return FeatureTable(list(ids), values.astype(np.float32), names)


def filter_interactions(data: Interactions, min_per_user: int = 1, min_per_item: int = 1) -> Interactions:
    """Drop users with fewer than ``min_per_user`` events and items with fewer than ``min_per_item`` (one pass each)."""
    frame = data.frame
    frame = frame[frame.groupby("item")["item"].transform("size") >= min_per_item]
    frame = frame[frame.groupby("user")["user"].transform("size") >= min_per_user]
    return replace(data, frame=frame.reset_index(drop=True))


def _time_order(data: Interactions, by: str) -> pd.DataFrame:
    """The frame sorted by user, then time (ties and ``by="row"``: file order); a ``_pos`` column counts from the
    user's last event (0 = last)."""
    if by not in ("timestamp", "row"):
        raise DataError(f"by={by!r} is not a choice; use 'timestamp' or 'row' (the file order)")
    if by == "timestamp" and not data.has_timestamps:
        raise DataError(
            "leave-last-out by timestamp needs a timestamp column; read the data with "
            "timestamp_col=..., or pass by='row' to take the file order as the time order"
        )
    frame = data.frame.assign(_row=np.arange(len(data.frame)))
    keys = ["user", "timestamp", "_row"] if by == "timestamp" else ["user", "_row"]
    frame = frame.sort_values(keys, kind="stable")
    return frame.assign(_pos=frame.groupby("user").cumcount(ascending=False))


@dataclass(frozen=True)
class Split:
    """Train / validation / test interactions of a leave-last-out split (``val`` may be empty)."""

    train: Interactions
    val: Interactions
    test: Interactions

    def describe(self) -> dict[str, dict[str, int]]:
        return {"train": self.train.describe(), "val": self.val.describe(), "test": self.test.describe()}


def leave_last_out(data: Interactions, n_test: int = 1, n_val: int = 0, by: str = "timestamp") -> Split:
    """Hold out each user's last ``n_test`` events as test and the ``n_val`` before them as validation.

    Time order is the timestamp; events at the same time keep their file order (so the split is deterministic).

    Raises:
        DataError: a user has no event left for training (the message names them and says how to drop them).
    """
    if n_test < 1 or n_val < 0:
        raise DataError(f"n_test={n_test}, n_val={n_val}: need n_test >= 1 and n_val >= 0")
    frame = _time_order(data, by)
    counts = frame.groupby("user").size()
    short = counts.index[counts <= n_test + n_val]
    if len(short):
        raise DataError(
            f"{len(short)} user(s) would have no training interactions after holding out their last "
            f"{n_test + n_val}: {_show(short)}. Drop them first with "
            f"filter_interactions(data, min_per_user={n_test + n_val + 1}), or hold out fewer."
        )
    pos = frame["_pos"].to_numpy()
    parts = [
        frame[m].drop(columns=["_row", "_pos"]).reset_index(drop=True)
        for m in (pos >= n_test + n_val, (pos >= n_test) & (pos < n_test + n_val), pos < n_test)
    ]
    return Split(*(replace(data, frame=p) for p in parts))


def keep_last_per_user(data: Interactions, k: int, by: str = "timestamp") -> Interactions:
    """Each user's ``k`` most recent events (all of them for users with fewer): a sparse version of ``data``."""
    frame = _time_order(data, by)
    frame = frame[frame["_pos"] < k].drop(columns=["_row", "_pos"]).reset_index(drop=True)
    return replace(data, frame=frame)


def check_heldout(
    train: Interactions, heldout: Interactions, user_ids: Sequence[str], item_ids: Sequence[str], what: str = "test"
) -> None:
    """Raise when a held-out split cannot be scored: unknown users or items, or users without training events.

    Args:
        train: the interactions the model was trained on (the items users have seen).
        heldout: the validation or test interactions.
        user_ids: the users the model knows.
        item_ids: the items the model can rank (the full item set).
        what: the split's name, for the message.
    """
    known_users, known_items = set(user_ids), set(item_ids)
    users = pd.unique(heldout.frame["user"])
    unknown = [u for u in users if u not in known_users]
    if unknown:
        raise DataError(
            f"unknown user ids in the {what} split: {_show(unknown)} ({len(unknown)} of {len(users)} "
            f"users); the model knows {len(known_users)} users. Split with leave_last_out so every "
            f"{what} user also has training interactions."
        )
    items = pd.unique(heldout.frame["item"])
    unknown = [i for i in items if i not in known_items]
    if unknown:
        raise DataError(
            f"unknown item ids in the {what} split: {_show(unknown)} ({len(unknown)} of {len(items)} "
            f"items); the model ranks {len(known_items)} items. Build the model with an item catalogue "
            "that holds them (items=... or an item feature table), or drop those rows."
        )
    trained = set(pd.unique(train.frame["user"]))
    cold = [u for u in users if u not in trained]
    if cold:
        raise DataError(
            f"{len(cold)} user(s) in the {what} split have no training interactions: {_show(cold)}. "
            "Their ranking would be a guess; drop them, or split with leave_last_out."
        )
