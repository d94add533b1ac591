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

from transferkit.recsys.data import (
    FeatureTable,
    Interactions,
    Split,
    filter_interactions,
    keep_last_per_user,
    leave_last_out,
    read_features,
    read_interactions,
)
from transferkit.recsys.demo import CrossDomainConfig, run_cross_domain, run_recsys_demo
from transferkit.recsys.metrics import evaluate_ranking, ranking_metrics, rmse
from transferkit.recsys.models import Popularity, TwoTower, build_two_tower, matrix_factorization
from transferkit.recsys.movielens import cross_domain_split, movielens_100k_dir, read_movielens_100k
from transferkit.recsys.train import train_recommender
from transferkit.recsys.transfer import RecsysTransferReport, transfer_embeddings

__all__ = [
    "CrossDomainConfig",
    "FeatureTable",
    "Interactions",
    "Popularity",
    "RecsysTransferReport",
    "Split",
    "TwoTower",
    "build_two_tower",
    "cross_domain_split",
    "evaluate_ranking",
    "filter_interactions",
    "keep_last_per_user",
    "leave_last_out",
    "matrix_factorization",
    "movielens_100k_dir",
    "ranking_metrics",
    "read_features",
    "read_interactions",
    "read_movielens_100k",
    "rmse",
    "run_cross_domain",
    "run_recsys_demo",
    "train_recommender",
    "transfer_embeddings",
]
