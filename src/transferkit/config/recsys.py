"""The ``recsys:`` section of a recipe: a recommendation task run by the same ``transferkit run`` as every task.

Example (the interactions of a target domain, with the embeddings of an earlier run transferred into it)::

    name: films-target
    recsys:
      interactions: ratings.csv          # CSV/TSV/Parquet, or the built-in name movielens-100k
      user_column: userId
      item_column: movieId
      rating_column: rating              # leave out for implicit feedback
      timestamp_column: timestamp        # leave out to take the file order as the time order
      item_features: {path: movies.csv, id_column: movieId, columns: [genres], title_column: title}
      model: two_tower                   # or mf
      dim: 32
      loss: bpr
      epochs: 20
      seeds: [0, 1, 2]
      source_run: runs/films-source      # a previous recsys run (or its model/ folder)
      baselines: [target_only, popularity]
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BUILTIN_INTERACTIONS = ("movielens-100k",)
Arm = Literal["target_only", "popularity"]
ARMS: tuple[Arm, ...] = ("target_only", "popularity")
METRIC_NAMES = ("hr", "ndcg", "recall")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FeatureFile(_Strict):
    """A user or item feature table: one row per id; categorical columns may hold several values."""

    path: str
    id_column: str
    columns: list[str] | None = Field(
        default=None, description="feature columns (default: every other column, except title_column)"
    )
    multi_value_sep: str = "|"
    numeric: list[str] = Field(default_factory=list, description="columns read as numbers")
    title_column: str | None = Field(default=None, description="items: a name shown by predict (not a feature)")


class MovieLensSplit(_Strict):
    """The built-in MovieLens 100K cross-domain split (recsys/movielens.py): old films -> new releases."""

    domain: Literal["source", "target", "all"] = "target"
    k: int = Field(default=5, ge=1, description="target training ratings kept per user")
    split_year: int = 1997


class TransferOptions(_Strict):
    """How ``source_run``'s model moves into the target (``transfer_embeddings``) and how the target then trains."""

    users: bool = True
    items: bool = True
    towers: bool = True
    new_ids: Literal["zero", "keep"] = "zero"
    freeze_users: bool = Field(default=True, description="users the source knows keep its vectors")
    lr: float | None = Field(default=None, gt=0, description="default: recsys.lr")
    l2: float | None = Field(default=None, ge=0, description="default: recsys.l2")


class TargetOnlyOptions(_Strict):
    """Settings of the target-only arm when they should differ from the transfer's (searched on their own)."""

    dim: int | None = Field(default=None, ge=1, description="default: recsys.dim")
    lr: float | None = Field(default=None, gt=0, description="default: recsys.lr")
    l2: float | None = Field(default=None, ge=0, description="default: recsys.l2")


class RecsysConfig(_Strict):
    """A recommendation task: interactions, a two-tower / MF model, ranking metrics, optional transfer."""

    interactions: str = Field(description="a CSV/TSV/Parquet file, or the built-in name movielens-100k")
    user_column: str = "user"
    item_column: str = "item"
    rating_column: str | None = None
    timestamp_column: str | None = None
    item_features: FeatureFile | None = None
    user_features: FeatureFile | None = None
    movielens: MovieLensSplit = Field(default_factory=MovieLensSplit, description="built-in movielens-100k only")
    min_per_item: int = Field(default=1, ge=1)
    model: Literal["two_tower", "mf"] = "two_tower"
    dim: int = Field(default=32, ge=1)
    hidden: list[int] = Field(default_factory=list)
    loss: Literal["bpr", "bce", "softmax", "mse"] = "bpr"
    epochs: int = Field(default=20, ge=1)
    lr: float = Field(default=0.01, gt=0)
    l2: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=1024, ge=1)
    num_negatives: int = Field(default=4, ge=1)
    patience: int | None = Field(default=5, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    metrics: list[str] = Field(default_factory=lambda: ["hr@10", "ndcg@10", "recall@20"], min_length=1)
    source_run: str | None = Field(default=None, description="a previous recsys run directory or model folder")
    transfer: TransferOptions = Field(default_factory=TransferOptions)
    target_only: TargetOnlyOptions = Field(default_factory=TargetOnlyOptions)
    baselines: list[Arm] = Field(default_factory=lambda: list(ARMS))

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, v: list[str]) -> list[str]:
        for m in v:
            name, _, k = m.partition("@")
            if name not in METRIC_NAMES or not k.isdigit() or int(k) < 1:
                raise ValueError(f"metric {m!r} is not NAME@K with NAME one of {', '.join(METRIC_NAMES)} and K >= 1")
        return v

    @model_validator(mode="after")
    def _columns_or_builtin(self) -> RecsysConfig:
        if self.interactions in BUILTIN_INTERACTIONS and (self.item_features or self.user_features):
            raise ValueError(
                "movielens-100k brings its own item features (genres, titles); leave out item_features/user_features"
            )
        return self

    @property
    def ks(self) -> tuple[tuple[str, int], ...]:
        return tuple((m.split("@")[0], int(m.split("@")[1])) for m in self.metrics)

    @property
    def builtin(self) -> bool:
        return self.interactions in BUILTIN_INTERACTIONS
