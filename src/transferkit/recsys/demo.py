"""The MovieLens cross-domain scenario: old films (source) -> new releases with 5 ratings per user (target).

``run_cross_domain(seed, cfg)`` runs one seed top to bottom:

1. split MovieLens 100K (``movielens.cross_domain_split``: source = films released up to 1996, target = films of
   1997-1998, each target user keeps 5 training ratings; the split is fixed, only the seed of training changes);
2. train a two-tower model (user id embedding; item id embedding + genres) on the source, early-stopped on each
   user's last source rating;
3. on the target, the same architecture: (a) **transfer**: the source's user vectors (by user id) and its genre
   projection move into a fresh target model (new films start at their genres' projection), the user vectors stay
   frozen and the target training learns the new films; (b) **target only**: the model from random weights, with
   its own size, learning rate and penalty; (c) a baseline: **popularity** in the target training ratings, or the
   **mean rating**; and, for reading, the transfer model before any target training (zero-shot);
4. test on every user's last target rating: ranked against all 288 new films (the ones in the user's training and
   validation ratings excluded) for HR@10, NDCG@10, recall@20 (``loss="bpr"``); or RMSE (``loss="mse"``).

The settings (``CrossDomainConfig()`` for ranking, ``RATINGS_CONFIG`` for ratings) were chosen on validation
ratings only (``bench/recsys.py --tune``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.io import write_json, write_text
from transferkit.recsys.metrics import evaluate_ranking, rmse
from transferkit.recsys.models import Popularity, build_two_tower
from transferkit.recsys.movielens import CrossDomain, cross_domain_split, read_movielens_100k
from transferkit.recsys.train import train_recommender
from transferkit.recsys.transfer import transfer_embeddings

METRICS = ("hr@10", "ndcg@10", "recall@20")
RATING_METRICS = ("rmse",)


@dataclass(frozen=True)
class CrossDomainConfig:
    """Settings of the scenario; the defaults were picked on validation, seed 0 (``bench/recsys.py --tune``).

    The source model and the transfer target share ``dim`` (the vectors move as they are); the target-only model
    has its own size, learning rate and penalty, searched on its own, so the comparison is not tilted by settings
    that suit only the transfer.
    """

    k: int = 5  # target training ratings per user
    loss: str = "bpr"
    num_negatives: int = 4
    batch_size: int = 1024
    dim: int = 32  # source and transfer target
    source_lr: float = 0.01
    source_l2: float = 0.0
    source_epochs: int = 20
    transfer_lr: float = 0.03
    transfer_l2: float = 0.0
    freeze_users: bool = True  # transfer: keep the source's user vectors, learn the new films around them
    target_only_dim: int = 16
    target_only_lr: float = 0.3
    target_only_l2: float = 1e-2
    target_epochs: int = 30
    patience: int = 5  # epochs without a better validation value (NDCG@10, or RMSE) before stopping


def train_source(split: CrossDomain, cfg: CrossDomainConfig, seed: int, desc: str | None = None) -> tuple[Any, Any]:
    """The source two-tower model over every source film, early-stopped on the source validation ratings."""
    model = build_two_tower(split.source.train, dim=cfg.dim, items=split.source_items, seed=seed)
    result = train_recommender(
        model,
        split.source.train,
        loss=cfg.loss,
        epochs=cfg.source_epochs,
        lr=cfg.source_lr,
        batch_size=cfg.batch_size,
        num_negatives=cfg.num_negatives,
        l2=cfg.source_l2,
        seed=seed,
        val=split.source.test,
        patience=cfg.patience,
        desc=desc,
    )
    return model, result


def train_target(
    split: CrossDomain, cfg: CrossDomainConfig, seed: int, source: Any | None = None, desc: str | None = None
) -> dict[str, Any]:
    """Train one target model (with ``source``: transfer first) and return its validation and test metrics."""
    target = split.target
    dim, lr, l2 = (
        (cfg.dim, cfg.transfer_lr, cfg.transfer_l2)
        if source is not None
        else (cfg.target_only_dim, cfg.target_only_lr, cfg.target_only_l2)
    )
    model = build_two_tower(target.train, dim=dim, items=split.target_items, seed=seed)
    out: dict[str, Any] = {}
    if source is not None:
        out["transfer_report"] = transfer_embeddings(source, model).to_dict()
        out["zero_shot"] = _val_test(model, split, cfg.loss)
    # the users the source knows keep its vectors; the few it does not know learn theirs from the target ratings
    frozen = sorted(set(source.user_ids) & set(model.user_ids)) if source is not None and cfg.freeze_users else None
    result = train_recommender(
        model,
        target.train,
        loss=cfg.loss,
        epochs=cfg.target_epochs,
        lr=lr,
        batch_size=cfg.batch_size,
        num_negatives=cfg.num_negatives,
        l2=l2,
        seed=seed,
        val=target.val,
        patience=cfg.patience,
        frozen_users=frozen,
        desc=desc,
    )
    out.update(_val_test(model, split, cfg.loss), best_epoch=result.best_epoch, train_s=round(result.train_s, 2))
    return out


def metric_names(loss: str) -> tuple[str, ...]:
    return RATING_METRICS if loss == "mse" else METRICS


def _val_test(model: Any, split: CrossDomain, loss: str) -> dict[str, dict[str, float]]:
    """Validation and test metrics; at test time the validation rating counts as seen (excluded from ranking)."""
    t = split.target
    if loss == "mse":
        return {"val": {"rmse": round(rmse(model, t.val), 4)}, "test": {"rmse": round(rmse(model, t.test), 4)}}

    def rank(heldout, seen):
        return {k: round(float(v), 4) for k, v in evaluate_ranking(model, heldout, seen).items() if k in METRICS}

    return {"val": rank(t.val, [t.train]), "test": rank(t.test, [t.train, t.val])}


def _mean_rating(split: CrossDomain) -> dict[str, dict[str, float]]:
    """RMSE of predicting the mean target training rating for everyone (the baseline of the rating task)."""
    mean = float(split.target.train.frame["rating"].mean())
    err = lambda d: round(float(np.sqrt(((d.frame["rating"] - mean) ** 2).mean())), 4)  # noqa: E731
    return {"val": {"rmse": err(split.target.val)}, "test": {"rmse": err(split.target.test)}}


def run_cross_domain(
    seed: int = 0, cfg: CrossDomainConfig | None = None, split: CrossDomain | None = None, progress: bool = False
) -> dict[str, Any]:
    """One seed of the scenario: source training, then transfer / target-only / a baseline on the target.

    The baseline is popularity for the ranking task (``loss`` bpr, bce, softmax) and the mean training rating for
    the rating task (``loss="mse"``, judged by RMSE).
    """
    cfg = cfg or CrossDomainConfig()
    split = split or cross_domain_split(read_movielens_100k(), k=cfg.k)
    start = time.perf_counter()
    label = f"({cfg.loss}, seed {seed})"
    source, src_result = train_source(split, cfg, seed, desc=f"source {label}" if progress else None)
    source_s = time.perf_counter() - start
    transfer = train_target(split, cfg, seed, source, desc=f"transfer {label}" if progress else None)
    target_only = train_target(split, cfg, seed, desc=f"target only {label}" if progress else None)
    if cfg.loss == "mse":
        baseline = ("mean_rating", _mean_rating(split))
    else:
        baseline = ("popularity", _val_test(Popularity(split.target.train, split.target_items), split, cfg.loss))
    arms = {
        "transfer": {k: transfer[k] for k in ("val", "test", "best_epoch", "train_s")},
        "target_only": target_only,
        baseline[0]: baseline[1],
        "transfer_zero_shot": transfer["zero_shot"],
    }
    names = metric_names(cfg.loss)
    return {
        "seed": seed,
        "arms": arms,
        "transfer_report": transfer["transfer_report"],
        "source": {
            "val": {k: round(float(src_result.best_val[k]), 4) for k in names},
            "best_epoch": src_result.best_epoch,
            "train_s": round(source_s, 2),
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and sample sd over seeds of every arm's test metrics."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm, first in runs[0]["arms"].items():
        out[arm] = {}
        for metric in first["test"]:
            values = [r["arms"][arm]["test"][metric] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            out[arm][metric] = {"mean": round(statistics.fmean(values), 4), "sd": round(sd, 4)}
    return out


ARM_NAMES = {
    "transfer": "(a) transfer",
    "target_only": "(b) target only",
    "popularity": "(c) popularity",
    "mean_rating": "(c) mean rating",
    "transfer_zero_shot": "transfer, no target training",
}


def summary_table(summary: dict[str, dict[str, dict[str, float]]], n_seeds: int) -> str:
    """A Markdown table of the test metrics, mean ± sd over the seeds."""
    metrics = list(next(iter(summary.values())))
    lines = [
        f"| model ({n_seeds} seed{'s' if n_seeds > 1 else ''}) | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for arm, values in summary.items():
        cells = [f"{values[m]['mean']:.3f} ± {values[m]['sd']:.3f}" for m in metrics]
        lines.append(f"| {ARM_NAMES.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# the rating task (MSE, RMSE): the same split and model, settings picked on validation RMSE (bench/recsys.py --tune)
RATINGS_CONFIG = CrossDomainConfig(
    loss="mse",
    source_lr=0.01,
    source_l2=1.0,
    source_epochs=30,
    transfer_lr=0.01,
    transfer_l2=100.0,
    freeze_users=False,
    target_only_dim=32,
    target_only_lr=0.01,
    target_only_l2=100.0,
)


def run_task(split: CrossDomain, cfg: CrossDomainConfig, seeds: tuple[int, ...], progress: bool) -> dict[str, Any]:
    """Every seed of one task (ranking or ratings) on ``split``, with the mean ± sd of the test metrics."""
    start = time.perf_counter()
    runs = [run_cross_domain(seed, cfg, split, progress) for seed in seeds]
    return {
        "config": asdict(cfg),
        "runs": runs,
        "test_summary": summarise(runs),
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_recsys_demo(
    out_dir: str | Path = "demo_runs/recsys",
    seeds: tuple[int, ...] = (0, 1, 2),
    cfg: CrossDomainConfig | None = None,
    ratings: bool = True,
    ratings_cfg: CrossDomainConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the MovieLens cross-domain scenario for ``seeds``; write ``metrics.json`` and ``summary.md``.

    Args:
        out_dir: folder for the results (created; the two files in it are replaced atomically).
        seeds: training seeds (the split itself is fixed).
        cfg: settings of the ranking task (default: the validated ``CrossDomainConfig()``).
        ratings: also run the rating task (MSE; RMSE against the mean rating).
        ratings_cfg: its settings (default ``RATINGS_CONFIG``).
        progress: show progress bars (also off when TRANSFERKIT_PROGRESS=0).

    Returns:
        The content of ``metrics.json``: the split, and per task the settings, every seed's metrics and the
        mean ± sd of the test metrics.
    """
    cfg = cfg or CrossDomainConfig()
    start = time.perf_counter()
    split = cross_domain_split(read_movielens_100k(), k=cfg.k)
    metrics: dict[str, Any] = {
        "scenario": "MovieLens 100K: films released up to 1996 (source) -> films of 1997-1998 (target)",
        "split": split.describe(),
        "seeds": list(seeds),
        "ranking": run_task(split, cfg, seeds, progress),
    }
    if ratings:
        metrics["ratings"] = run_task(split, ratings_cfg or RATINGS_CONFIG, seeds, progress)
    metrics["total_s"] = round(time.perf_counter() - start, 1)
    out_dir = Path(out_dir)
    write_json(out_dir / "metrics.json", metrics)
    tables = {
        task: summary_table(metrics[task]["test_summary"], len(seeds))
        for task in ("ranking", "ratings")
        if task in metrics
    }
    report = metrics["ranking"]["runs"][0]["transfer_report"]
    n_items = len(split.target_items)
    text = (
        f"# {metrics['scenario']}\n\n"
        f"Target: {metrics['split']['target']['test']['users']} users who rated at least {cfg.k + 2} of the "
        f"{n_items} new films; each keeps {cfg.k} training ratings, the one after them is the validation and "
        f"the last one the test.\n\n"
        f"## Ranking (BPR): the test film against all {n_items} new films, seen ones excluded\n\n"
        f"{tables['ranking']}\n\n"
    )
    if "ratings" in tables:
        text += f"## Rating prediction (MSE): RMSE on the test ratings\n\n{tables['ratings']}\n\n"
    text += (
        f"Transfer: {report['users']['matched']}/{report['users']['target']} target users found in the source "
        f"(by id); {len(report['features'].get('item', {}).get('matched', []))} genre features matched; "
        f"{report['items']['matched']} films in common (new films start at their genres' projection).\n\n"
        f"Total time: {metrics['total_s']} s.\n"
    )
    write_text(out_dir / "summary.md", text)
    print(f"\n{text}\nwrote {out_dir / 'metrics.json'} and {out_dir / 'summary.md'}")
    return metrics
