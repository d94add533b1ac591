"""Recommendation: readers and their errors, leave-last-out, ranking metrics against hand-computed values, training on
planted structure, transfer by id, and the MovieLens 100K reader and split (read from the installed recbole)."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from transferkit.errors import DataError, DataNotFoundError
from transferkit.recsys import (
    FeatureTable,
    Popularity,
    build_two_tower,
    cross_domain_split,
    evaluate_ranking,
    filter_interactions,
    leave_last_out,
    matrix_factorization,
    ranking_metrics,
    read_features,
    read_interactions,
    read_movielens_100k,
    rmse,
    train_recommender,
    transfer_embeddings,
)
from transferkit.recsys.data import keep_last_per_user
from transferkit.recsys.metrics import heldout_ranks

os.environ["TRANSFERKIT_PROGRESS"] = "0"


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _mask(shape: tuple[int, int], cells: list[tuple[int, int]]) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    for r, c in cells:
        m[r, c] = True
    return m


# ---------------------------------------------------------------- metrics, against values computed by hand


def test_single_heldout_item_rank_hr_ndcg_recall():
    scores = _t([[0.9, 0.1, 0.5, 0.7, 0.3]])
    relevant = _mask((1, 5), [(0, 2)])  # two items (0.9, 0.7) score higher: rank 2 (0-based), position 3
    assert heldout_ranks(scores, relevant, torch.zeros_like(relevant))[0, 2] == 2
    m = ranking_metrics(scores, relevant, ks=[("hr", 2), ("hr", 3), ("ndcg", 3), ("recall", 3)])
    assert m == {"hr@2": 0.0, "hr@3": 1.0, "ndcg@3": pytest.approx(1 / math.log2(4)), "recall@3": 1.0}


def test_seen_items_are_excluded_but_never_the_heldout_one():
    scores = _t([[0.9, 0.1, 0.5, 0.7, 0.3]])
    relevant = _mask((1, 5), [(0, 2)])
    exclude = _mask((1, 5), [(0, 0), (0, 2)])  # item 0 was seen; the held-out item 2 cannot be excluded
    m = ranking_metrics(scores, relevant, exclude, ks=[("hr", 1), ("ndcg", 10)])
    assert m == {"hr@1": 0.0, "ndcg@10": pytest.approx(1 / math.log2(3))}  # rank 1: only item 3 (0.7) is above


def test_ties_count_against_the_heldout_item():
    scores = torch.zeros(1, 4)  # a model that cannot tell the items apart gets no credit
    relevant = _mask((1, 4), [(0, 0)])
    assert heldout_ranks(scores, relevant, torch.zeros_like(relevant))[0, 0] == 3
    assert ranking_metrics(scores, relevant, ks=[("hr", 3)]) == {"hr@3": 0.0}


def test_several_heldout_items_and_mean_over_users_with_some():
    scores = _t([[0.9, 0.8, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    # user 0: items 1 and 3 held out, ranks 1 and 2; user 1: item 0, rank 3; user 2: nothing held out (not counted)
    relevant = _mask((3, 4), [(0, 1), (0, 3), (1, 0)])
    m = ranking_metrics(scores, relevant, ks=[("hr", 2), ("recall", 2), ("ndcg", 3), ("recall", 4)])
    ndcg_user0 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["hr@2"] == pytest.approx(0.5)  # user 0 hits, user 1 does not
    assert m["recall@2"] == pytest.approx(0.25)  # (1/2 + 0) / 2
    assert m["ndcg@3"] == pytest.approx(ndcg_user0 / 2)
    assert m["recall@4"] == pytest.approx(1.0)


def test_unknown_metric_is_named():
    with pytest.raises(DataError, match=r"unknown ranking metric map@10; choose from hr, ndcg, recall"):
        ranking_metrics(torch.zeros(1, 2), _mask((1, 2), [(0, 0)]), ks=[("map", 10)])


class FixedScores:
    """A scorer with given scores, to check ``evaluate_ranking``'s bookkeeping (ids, seen items, users)."""

    def __init__(self, users: list[str], items: list[str], scores: list[list[float]]):
        self.user_ids, self.item_ids, self.table = users, items, _t(scores)

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        return self.table[users]


def _frame(rows: list[tuple], columns: tuple[str, ...] = ("user", "item", "timestamp")) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns))


def test_evaluate_ranking_excludes_train_and_val_items_by_id():
    model = FixedScores(["u1", "u2"], ["a", "b", "c", "d"], [[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    train = read_interactions(_frame([("u1", "a", 1), ("u2", "d", 1)]), rating_col=None)
    val = read_interactions(_frame([("u1", "b", 2), ("u2", "c", 2)]), rating_col=None)
    test = read_interactions(_frame([("u1", "c", 3), ("u2", "a", 3)]), rating_col=None)
    m = evaluate_ranking(model, test, [train, val], ks=[("hr", 1), ("ndcg", 10)])
    # u1: a (train) and b (val) excluded, c is first; u2: d, c excluded, a below b: rank 1
    assert m == {"hr@1": 0.5, "ndcg@10": pytest.approx((1 + 1 / math.log2(3)) / 2), "users": 2, "items": 4}
    m = evaluate_ranking(model, test, [train], ks=[("hr", 1)])  # val items not excluded: u1's c is now 2nd
    assert m["hr@1"] == 0.0


# ---------------------------------------------------------------- reading, and the errors of bad input


def test_read_csv_with_custom_columns_and_dates(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("uid,iid,stars,when\n7,10,4.5,2024-01-02\n7,11,3,2024-01-01\n8,10,5,2024-01-03 12:00:00\n")
    data = read_interactions(path, user_col="uid", item_col="iid", rating_col="stars", timestamp_col="when")
    assert list(data.frame.columns) == ["user", "item", "rating", "timestamp"]
    assert data.frame["user"].tolist() == ["7", "7", "8"] and data.frame["item"].tolist() == ["10", "11", "10"]
    assert data.frame["rating"].tolist() == [4.5, 3.0, 5.0]
    assert data.frame["timestamp"].tolist() == [1704153600, 1704067200, 1704283200]
    assert data.describe() == {"interactions": 3, "users": 2, "items": 2}


def test_read_parquet_implicit_ids_are_strings(tmp_path):
    path = tmp_path / "clicks.parquet"
    pd.DataFrame({"customer": [1, 2, 2], "product": [100, 100, 200], "t": [5, 6, 7]}).to_parquet(path)
    data = read_interactions(path, user_col="customer", item_col="product", rating_col=None, timestamp_col="t")
    assert not data.has_ratings and data.items == ["100", "200"] and data.users == ["1", "2"]
    assert data.frame["timestamp"].tolist() == [5, 6, 7]


def test_missing_column_lists_the_columns_present(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("userId,movieId,rating\n1,2,3\n")
    with pytest.raises(DataError) as e:
        read_interactions(path, user_col="user", item_col="movieId")
    msg = str(e.value)
    assert "no column user_col='user', timestamp_col='timestamp'" in msg
    assert "its columns are ['userId', 'movieId', 'rating']" in msg and "timestamp_col=None" in msg


def test_missing_file_and_unreadable_values(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_interactions(tmp_path / "nope.csv")
    frame = pd.DataFrame({"user": ["a", "b"], "item": ["x", "y"], "rating": [4, "five"]})
    with pytest.raises(DataError, match=r"column 'rating' has 1 value\(s\) that are not numbers .*'five'"):
        read_interactions(frame, timestamp_col=None)
    frame = pd.DataFrame({"user": ["a", None], "item": ["x", "y"]})
    with pytest.raises(DataError, match=r"column 'user' has 1 empty id\(s\) \(first at data row 2\)"):
        read_interactions(frame, rating_col=None, timestamp_col=None)


def test_feature_table_multi_valued_and_numeric(tmp_path):
    frame = pd.DataFrame({"movie": [1, 2, 3], "genres": ["Action|Comedy", "Drama", None], "year": [1990, 2000, None]})
    table = read_features(frame, "movie")
    assert table.ids == ["1", "2", "3"]
    assert table.names == ["genres=Action", "genres=Comedy", "genres=Drama", "year"]
    np.testing.assert_allclose(table.values, [[1, 1, 0, -1], [0, 0, 1, 1], [0, 0, 0, 0]])  # year standardised
    np.testing.assert_allclose(table.rows_for(["3", "zz", "2"]), [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]])
    with pytest.raises(DataError, match=r"no column columns\[0\]='genre'; its columns are \['movie', 'genres'"):
        read_features(frame, "movie", columns=["genre"])
    with pytest.raises(DataError, match="ids repeat in column 'movie'"):
        read_features(pd.DataFrame({"movie": [1, 1], "g": ["a", "b"]}), "movie")


def test_leave_last_out_by_time_with_ties_in_file_order():
    frame = _frame(
        [("u", "a", 3), ("u", "b", 1), ("u", "c", 2), ("u", "d", 3), ("v", "a", 1), ("v", "b", 2), ("v", "c", 0)]
    )
    split = leave_last_out(read_interactions(frame, rating_col=None), n_test=1, n_val=1)
    # u in time order: b(1) c(2) a(3) d(3) (a before d: file order at equal times)
    assert split.test.frame.values.tolist() == [["u", "d", 3], ["v", "b", 2]]
    assert split.val.frame.values.tolist() == [["u", "a", 3], ["v", "a", 1]]
    assert split.train.frame.values.tolist() == [["u", "b", 1], ["u", "c", 2], ["v", "c", 0]]
    assert keep_last_per_user(split.train, 1).frame["item"].tolist() == ["c", "c"]


def test_user_without_training_interactions_is_named():
    data = read_interactions(_frame([("u", "a", 1), ("u", "b", 2), ("lonely", "a", 1)]), rating_col=None)
    with pytest.raises(DataError) as e:
        leave_last_out(data)
    assert "1 user(s) would have no training interactions after holding out their last 1: 'lonely'" in str(e.value)
    assert "filter_interactions(data, min_per_user=2)" in str(e.value)
    assert leave_last_out(filter_interactions(data, min_per_user=2)).test.users == ["u"]
    with pytest.raises(DataError, match="needs a timestamp column.*by='row'"):
        leave_last_out(read_interactions(_frame([("u", "a", 1)]), rating_col=None, timestamp_col=None))


def test_unknown_ids_and_cold_users_in_the_test_split():
    train = read_interactions(_frame([("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1)]), rating_col=None)
    model = matrix_factorization(train, dim=4)
    test = read_interactions(_frame([("u1", "z", 3), ("u1", "y", 3), ("u2", "b", 3)]), rating_col=None)
    with pytest.raises(
        DataError,
        match=r"unknown item ids in the test split: 'z', 'y' \(2 of 3 items\); the model "
        r"ranks 2 items",
    ):
        evaluate_ranking(model, test, train)
    test = read_interactions(_frame([("u9", "a", 3)]), rating_col=None)
    with pytest.raises(DataError, match=r"unknown user ids in the test split: 'u9' \(1 of 1 users\)"):
        evaluate_ranking(model, test, train)
    only_u1 = train.subset(train.frame["user"] == "u1")  # u2 is in the model but not in this training split
    test = read_interactions(_frame([("u2", "b", 3)]), rating_col=None)
    with pytest.raises(DataError, match=r"1 user\(s\) in the test split have no training interactions: 'u2'"):
        evaluate_ranking(model, test, only_u1)


def test_bad_training_arguments_are_named():
    train = read_interactions(_frame([("u", "a", 1)]), rating_col=None)
    model = matrix_factorization(train, dim=4)
    with pytest.raises(
        DataError,
        match=r"unknown loss 'bprr'; choose from \['bpr', 'bce', 'softmax', 'mse'\]\. "
        r"Did you mean 'bpr'\?",
    ):
        train_recommender(model, train, loss="bprr")
    with pytest.raises(DataError, match="loss='mse' needs ratings"):
        train_recommender(model, train, loss="mse")
    with pytest.raises(DataError, match=r"freeze='users' is not a part of the model; choose from \['user_embeddings'"):
        train_recommender(model, train, freeze=["users"], epochs=1)


# ---------------------------------------------------------------- training on planted structure


def planted(
    n_users: int = 90, n_items: int = 60, groups: int = 3, per_user: int = 10, seed: int = 0, item_prefix: str = "i"
) -> pd.DataFrame:
    """Users and items in ``groups`` groups; each user rates ``per_user`` random items of its own group
    (rating 5) and two of other groups (rating 1), at increasing times."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        g = u % groups
        own = [i for i in range(n_items) if i % groups == g]
        other = [i for i in range(n_items) if i % groups != g]
        picks = [(i, 5.0) for i in rng.choice(own, per_user, replace=False)]
        picks += [(i, 1.0) for i in rng.choice(other, 2, replace=False)]
        rng.shuffle(picks)
        rows += [(f"u{u}", f"{item_prefix}{i}", r, t) for t, (i, r) in enumerate(picks)]
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])


def test_bpr_learns_planted_groups_beyond_popularity():
    data = read_interactions(planted(), rating_col=None)
    likes = data.subset(
        data.frame["item"].map(lambda i: int(i[1:]) % 3) == data.frame["user"].map(lambda u: int(u[1:]) % 3)
    )  # implicit positives: each user's own-group items
    split = leave_last_out(likes, n_test=1, n_val=1)
    model = matrix_factorization(split.train, dim=8, items=likes.items, seed=0)
    result = train_recommender(model, split.train, loss="bpr", epochs=40, lr=0.05, batch_size=128, seed=0)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    mf = evaluate_ranking(model, split.test, [split.train, split.val])
    pop = evaluate_ranking(Popularity(split.train, likes.items), split.test, [split.train, split.val])
    assert mf["items"] == 60 and mf["users"] == 90
    # 11 unseen items are of the user's group: a model that learnt the groups, and nothing else, has HR@10 = 10/11
    assert mf["hr@10"] == pytest.approx(0.8444, abs=1e-4) and pop["hr@10"] == pytest.approx(0.1111, abs=1e-4)
    assert mf["ndcg@10"] > pop["ndcg@10"] + 0.3


@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_other_implicit_losses_learn(loss):
    data = read_interactions(planted(per_user=8), rating_col=None)
    split = leave_last_out(data, n_test=1)
    model = build_two_tower(split.train, dim=8, seed=1)
    result = train_recommender(model, split.train, loss=loss, epochs=15, lr=0.05, batch_size=128, seed=1)
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]


def test_mse_on_ratings_beats_the_mean_and_training_is_deterministic():
    data = read_interactions(planted())
    split = leave_last_out(data, n_test=1)
    runs = []
    for _ in range(2):
        model = matrix_factorization(split.train, dim=8, items=data.items, seed=3)
        result = train_recommender(
            model, split.train, loss="mse", epochs=30, lr=0.05, batch_size=128, seed=3, val=split.test, l2=1e-3
        )
        runs.append((model, result))
    (m1, r1), (m2, r2) = runs
    assert r1.history == r2.history
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    mean = float(split.train.frame["rating"].mean())
    baseline = float(np.sqrt(((split.test.frame["rating"] - mean) ** 2).mean()))
    assert r1.best_val["rmse"] == pytest.approx(rmse(m1, split.test), abs=1e-6)
    assert rmse(m1, split.test) < 0.6 * baseline
    assert r1.history[0]["epoch"] == 0 and r1.best_epoch > 0


# ---------------------------------------------------------------- transfer


def test_transfer_embeddings_maps_by_id_and_reports_coverage():
    src_items = FeatureTable(["x", "y"], np.array([[1, 0, 1], [0, 1, 0]], np.float32), ["g=A", "g=B", "g=C"])
    tgt_items = FeatureTable(["y", "new"], np.array([[1, 0], [0, 1]], np.float32), ["g=B", "g=D"])
    source = build_two_tower(
        read_interactions(
            _frame([("a", "x", 1), ("b", "y", 1), ("c", "x", 1)]), rating_col=None, item_features=src_items
        ),
        dim=4,
        seed=0,
    )
    target = build_two_tower(
        read_interactions(
            _frame([("c", "y", 1), ("zed", "new", 1), ("a", "y", 1)]), rating_col=None, item_features=tgt_items
        ),
        dim=4,
        seed=1,
    )
    zed_before = target.user_tower.embedding.weight[2].clone()
    report = transfer_embeddings(source, target)
    assert target.user_ids == ["a", "c", "zed"] and target.item_ids == ["new", "y"]
    su, tu = source.user_tower.embedding.weight, target.user_tower.embedding.weight
    assert torch.equal(tu[0], su[0]) and torch.equal(tu[1], su[2])  # a -> a, c -> c, by id, not by row
    assert torch.equal(tu[2], zed_before)  # a new user, and no user features: it keeps its initial vector
    assert report.users == {
        "matched": 2,
        "target": 3,
        "source": 3,
        "unmatched_examples": ["zed"],
        "coverage": pytest.approx(2 / 3),
    }
    assert report.items["matched"] == 1 and report.items["unmatched_examples"] == ["new"]
    ti, si = target.item_tower, source.item_tower
    assert torch.equal(ti.embedding.weight[1], si.embedding.weight[1])  # y
    assert torch.equal(ti.embedding.weight[0], torch.zeros(4))  # the new item starts at its features' projection
    assert torch.equal(ti.feature_proj.weight[:, 0], si.feature_proj.weight[:, 1])  # g=B by name
    assert report.features["item"] == {"matched": ["g=B"], "new": ["g=D"]}
    assert "item_tower.feature_proj.weight" in report.tensors and "global_bias" in report.tensors
    assert "users: 2/3 target users found in the source (66.7%)" in report.summary()


def test_frozen_user_rows_stay_while_the_others_train():
    data = read_interactions(planted(n_users=12, n_items=12, per_user=3), rating_col=None)
    model = matrix_factorization(data, dim=4, seed=0)
    before = model.user_tower.embedding.weight.detach().clone()
    items_before = model.item_tower.embedding.weight.detach().clone()
    train_recommender(model, data, epochs=3, lr=0.05, l2=0.01, frozen_users=["u3", "u7"], seed=0)
    after = model.user_tower.embedding.weight.detach()
    rows = model.users.encode(["u3", "u7"])
    others = [r for r in range(12) if r not in rows]
    assert torch.equal(after[rows], before[rows])  # Adam and the l2 penalty included
    assert not torch.isclose(after[others], before[others]).all(1).any()  # every other user moved
    assert not torch.equal(model.item_tower.embedding.weight.detach(), items_before)
    model.user_tower.embedding.weight.sum().backward()  # the gradient hooks are gone after training
    assert model.user_tower.embedding.weight.grad[rows].abs().sum() > 0


def test_transfer_refuses_other_embedding_sizes():
    data = read_interactions(_frame([("a", "x", 1)]), rating_col=None)
    with pytest.raises(
        DataError, match="source model has 8-d embeddings and the target 4-d; build the target with dim=8"
    ):
        transfer_embeddings(matrix_factorization(data, dim=8), matrix_factorization(data, dim=4))


@pytest.mark.parametrize(("kind", "expected"), [("two_tower", (1.0, 0.8556)), ("mf", (0.8333, 0.1222))])
def test_transfer_beats_target_only_on_sparse_planted_domain(kind, expected):
    """Source: 6 ratings per user of items i*; target: new items j* of the same 6 hidden groups (a 'genre' feature
    with the group), 3 ratings per user: 1 to train, 1 validation, 1 test. Only the users are shared."""
    groups = 6

    def genre(prefix):
        return FeatureTable(
            [f"{prefix}{i}" for i in range(60)],
            np.eye(groups, dtype=np.float32)[np.arange(60) % groups],
            [f"genre={g}" for g in range(groups)],
        )

    build = build_two_tower if kind == "two_tower" else matrix_factorization
    src = planted(per_user=6, groups=groups, seed=0)
    source_data = read_interactions(src[src["rating"] == 5.0], rating_col=None, item_features=genre("i"))
    source = build(source_data, dim=8, seed=0)
    train_recommender(source, source_data, loss="bpr", epochs=30, lr=0.05, batch_size=128, seed=0)

    tgt = planted(per_user=3, groups=groups, seed=1, item_prefix="j")
    target = read_interactions(tgt[tgt["rating"] == 5.0], rating_col=None, item_features=genre("j"))
    split = leave_last_out(target, n_test=1, n_val=1)
    assert split.train.describe() == {"interactions": 90, "users": 90, "items": 51}
    items = [f"j{i}" for i in range(60)]
    hr = {}
    for arm in ("transfer", "target_only"):
        model = build(split.train, dim=8, items=items, seed=0)
        if arm == "transfer":
            report = transfer_embeddings(source, model)
            assert report.users["coverage"] == 1.0 and report.items["matched"] == 0
        train_recommender(
            model,
            split.train,
            loss="bpr",
            epochs=20,
            lr=0.05,
            batch_size=64,
            seed=0,
            freeze=("user_embeddings",) if arm == "transfer" else (),
        )
        hr[arm] = evaluate_ranking(model, split.test, [split.train, split.val])["hr@10"]
    pop = evaluate_ranking(Popularity(split.train, items), split.test, [split.train, split.val])["hr@10"]
    # 8 unseen items share the user's group: ranking the group first gives HR@10 = 1. With one training rating per
    # user, MF alone has no co-occurrence to learn from (near popularity); the genre feature lets the target-only
    # two-tower find most groups, and the source's user vectors give the rest
    assert (hr["transfer"], hr["target_only"]) == pytest.approx(expected, abs=1e-4)
    assert pop == pytest.approx(0.0444, abs=1e-4)


# ---------------------------------------------------------------- MovieLens 100K from the installed recbole


@pytest.fixture(scope="module")
def movielens():
    return read_movielens_100k()


def test_movielens_100k_reader(movielens):
    assert movielens.describe() == {"interactions": 100_000, "users": 943, "items": 1682}
    assert movielens.frame.iloc[0].tolist() == ["196", "242", 3.0, 881250949]  # the file's first row
    assert len(movielens.item_features.names) == 19 and "class=Film-Noir" in movielens.item_features.names
    toy_story = movielens.item_features.rows_for(["1"])[0]
    names = [n for n, v in zip(movielens.item_features.names, toy_story) if v]
    assert names == ["class=Animation", "class=Children's", "class=Comedy"]


def test_movielens_cross_domain_split(movielens):
    split = cross_domain_split(movielens, k=5)
    d = split.describe()
    assert d["source_items"] == 1392 and d["target_items"] == 288
    assert d["target"]["train"] == {"interactions": 3405, "users": 681, "items": 247}
    assert d["target"]["test"]["users"] == d["target"]["val"]["users"] == 681
    assert d["source"]["train"]["interactions"] + d["source"]["val"]["interactions"] == 83_733
    assert not set(split.source_items) & set(split.target_items)


def test_movielens_user_features_feed_the_user_tower(movielens):
    data = read_movielens_100k(user_features=True)
    names = data.user_features.names
    assert len(data.user_features.ids) == 943 and names[0] == "age" and "gender=F" in names
    assert len(names) == 1 + 2 + 21  # age, 2 genders, 21 occupations
    model = build_two_tower(data, dim=4)
    assert model.user_tower.features.shape == (943, 24) and model.item_tower.features.shape == (1682, 19)


def test_recsys_demo_writes_metrics_and_summary(tmp_path):
    import dataclasses

    from transferkit.io import read_json
    from transferkit.recsys import CrossDomainConfig, run_recsys_demo
    from transferkit.recsys.demo import RATINGS_CONFIG

    fast = {"source_epochs": 1, "target_epochs": 1}  # the flow and the files, not the numbers
    metrics = run_recsys_demo(
        tmp_path / "out",
        seeds=(0,),
        cfg=CrossDomainConfig(**fast),
        ratings_cfg=dataclasses.replace(RATINGS_CONFIG, **fast),
        progress=False,
    )
    assert read_json(tmp_path / "out" / "metrics.json") == metrics
    ranking, ratings = metrics["ranking"], metrics["ratings"]
    assert set(ranking["runs"][0]["arms"]) == {"transfer", "target_only", "popularity", "transfer_zero_shot"}
    assert set(ratings["runs"][0]["arms"]) == {"transfer", "target_only", "mean_rating", "transfer_zero_shot"}
    assert ranking["runs"][0]["transfer_report"]["users"]["coverage"] == pytest.approx(663 / 681)
    assert ranking["test_summary"]["popularity"]["hr@10"] == {"mean": 0.1601, "sd": 0.0}
    assert ratings["test_summary"]["mean_rating"]["rmse"] == {"mean": 1.1883, "sd": 0.0}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| (c) popularity | 0.160 ± 0.000 | 0.077 ± 0.000 | 0.283 ± 0.000 |" in summary
    assert "| (c) mean rating | 1.188 ± 0.000 |" in summary and "663/681 target users found in the source" in summary
