"""Recommendation: interactions, two-tower / matrix-factorisation models, ranking metrics and transfer by id.

The main flow, as plain functions::

    data = read_interactions("ratings.csv", user_col="userId", item_col="movieId")
    split = leave_last_out(data, n_test=1, n_val=1)
    model = build_two_tower(split.train, dim=32)
    train_recommender(model, split.train, loss="bpr", val=split.val)
    evaluate_ranking(model, split.test, [split.train, split.val])   # HR@10, NDCG@10, recall@20

and, for a second domain, ``transfer_embeddings(source_model, target_model)`` before training the target.
``run_recsys_demo(out_dir)`` runs the MovieLens 100K cross-domain scenario.
"""

import importlib
from typing import Any

# imported on first use (PEP 562): the modules below import torch and the engine; the package itself stays cheap
_EXPORTS = {
    "load_recsys_run": "transferkit.recsys.run",
    "prepare_recsys": "transferkit.recsys.run",
    "train_arm": "transferkit.recsys.run",
    "RecsysConfig": "transferkit.config.recsys",
    "CrossDomainConfig": "transferkit.recsys.demo",
    "FeatureTable": "transferkit.recsys.data",
    "Interactions": "transferkit.recsys.data",
    "Popularity": "transferkit.recsys.models",
    "RecsysTransferReport": "transferkit.recsys.transfer",
    "Split": "transferkit.recsys.data",
    "TwoTower": "transferkit.recsys.models",
    "build_two_tower": "transferkit.recsys.models",
    "cross_domain_split": "transferkit.recsys.movielens",
    "evaluate_ranking": "transferkit.recsys.metrics",
    "filter_interactions": "transferkit.recsys.data",
    "keep_last_per_user": "transferkit.recsys.data",
    "leave_last_out": "transferkit.recsys.data",
    "matrix_factorization": "transferkit.recsys.models",
    "movielens_100k_dir": "transferkit.recsys.movielens",
    "ranking_metrics": "transferkit.recsys.metrics",
    "read_features": "transferkit.recsys.data",
    "read_interactions": "transferkit.recsys.data",
    "read_movielens_100k": "transferkit.recsys.movielens",
    "rmse": "transferkit.recsys.metrics",
    "run_cross_domain": "transferkit.recsys.demo",
    "run_recsys_demo": "transferkit.recsys.demo",
    "train_recommender": "transferkit.recsys.train",
    "transfer_embeddings": "transferkit.recsys.transfer",
}


__all__ = [
    "CrossDomainConfig",
    "FeatureTable",
    "Interactions",
    "Popularity",
    "RecsysConfig",
    "RecsysTransferReport",
    "Split",
    "TwoTower",
    "build_two_tower",
    "cross_domain_split",
    "evaluate_ranking",
    "filter_interactions",
    "keep_last_per_user",
    "leave_last_out",
    "load_recsys_run",
    "matrix_factorization",
    "movielens_100k_dir",
    "prepare_recsys",
    "ranking_metrics",
    "read_features",
    "read_interactions",
    "read_movielens_100k",
    "rmse",
    "run_cross_domain",
    "run_recsys_demo",
    "train_arm",
    "train_recommender",
    "transfer_embeddings",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'transferkit.recsys' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
