"""The MovieLens cross-domain scenario: old films (source) -> new releases with 5 ratings per user (target).

``run_cross_domain(seed)`` runs one seed top to bottom:

1. split MovieLens 100K (``movielens.cross_domain_split``: source = films released up to 1996, target = films of
   1997-1998, each target user keeps 5 training ratings; the split is fixed, only the seed of training changes);
2. train a two-tower model (user id embedding; item id embedding + genres) on the source, BPR, early-stopped on
   each user's last source rating;
3. on the target, with the same architecture: (a) **transfer**: the source's user vectors (by user id) and its
   genre projection move into a fresh target model (new films start at their genres' projection) and the target
   training adjusts the items; (b) **target only**: the same model from random weights; (c) **popularity** of
   the target training ratings; and the transfer model before any target training (zero-shot, for reading);
4. rank every user's last target rating against all 288 new films (the ones seen in training and the validation
   rating excluded): HR@10, NDCG@10, recall@20.

The settings (``CrossDomainConfig``) were chosen on the target validation ratings (``bench/recsys.py --tune``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transferkit.io import write_json, write_text
from transferkit.recsys.metrics import evaluate_ranking
from transferkit.recsys.models import Popularity, build_two_tower
from transferkit.recsys.movielens import CrossDomain, cross_domain_split, read_movielens_100k
from transferkit.recsys.train import train_recommender
from transferkit.recsys.transfer import transfer_embeddings

METRICS = ("hr@10", "ndcg@10", "recall@20")
ARMS = ("transfer", "target_only", "popularity", "transfer_zero_shot")


@dataclass(frozen=True)
class CrossDomainConfig:
    """Settings of the scenario (the defaults were picked on target validation, seed 0)."""

    k: int = 5  # target training ratings per user
    dim: int = 32
    loss: str = "bpr"
    num_negatives: int = 4
    batch_size: int = 1024
    l2: float = 1e-4
    source_lr: float = 0.01
    source_epochs: int = 20
    target_lr: float = 0.01
    target_epochs: int = 30
    patience: int = 5  # epochs without a better validation NDCG@10 before stopping
    freeze_users: bool = True  # transfer: keep the source's user vectors, learn the new items around them


def train_source(split: CrossDomain, cfg: CrossDomainConfig, seed: int, desc: str | None = None) -> tuple[Any, Any]:
    """The source two-tower model over every source film, early-stopped on the source validation ratings."""
    model = build_two_tower(split.source.train, dim=cfg.dim, items=split.source_items, seed=seed)
    result = train_recommender(model, split.source.train, loss=cfg.loss, epochs=cfg.source_epochs, lr=cfg.source_lr,
                               batch_size=cfg.batch_size, num_negatives=cfg.num_negatives, l2=cfg.l2, seed=seed,
                               val=split.source.test, patience=cfg.patience, desc=desc)
    return model, result


def train_target(split: CrossDomain, cfg: CrossDomainConfig, seed: int, source: Any | None = None,
                 desc: str | None = None) -> dict[str, Any]:
    """Train one target model (with ``source``: transfer first) and return its validation and test metrics."""
    target = split.target
    model = build_two_tower(target.train, dim=cfg.dim, items=split.target_items, seed=seed)
    out: dict[str, Any] = {}
    if source is not None:
        out["transfer_report"] = transfer_embeddings(source, model).to_dict()
        out["zero_shot"] = {"val": _metrics(model, target.val, [target.train]),
                            "test": _metrics(model, target.test, [target.train, target.val])}
    freeze = ("user_embeddings",) if source is not None and cfg.freeze_users else ()
    result = train_recommender(model, target.train, loss=cfg.loss, epochs=cfg.target_epochs, lr=cfg.target_lr,
                               batch_size=cfg.batch_size, num_negatives=cfg.num_negatives, l2=cfg.l2, seed=seed,
                               val=target.val, patience=cfg.patience, freeze=freeze, desc=desc)
    out.update(val=_metrics(model, target.val, [target.train]),
               test=_metrics(model, target.test, [target.train, target.val]),
               best_epoch=result.best_epoch, train_s=round(result.train_s, 2))
    return out


def _metrics(model: Any, heldout: Any, seen: list[Any]) -> dict[str, float]:
    m = evaluate_ranking(model, heldout, seen)
    return {k: round(float(m[k]), 4) for k in METRICS}


def run_cross_domain(seed: int = 0, cfg: CrossDomainConfig | None = None, split: CrossDomain | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """One seed of the scenario: source training, then transfer / target-only / popularity on the target."""
    cfg = cfg or CrossDomainConfig()
    split = split or cross_domain_split(read_movielens_100k(), k=cfg.k)
    start = time.perf_counter()
    source, src_result = train_source(split, cfg, seed, desc=f"source (seed {seed})" if progress else None)
    source_s = time.perf_counter() - start
    popularity = Popularity(split.target.train, split.target_items)
    transfer = train_target(split, cfg, seed, source, desc=f"transfer (seed {seed})" if progress else None)
    target_only = train_target(split, cfg, seed, desc=f"target only (seed {seed})" if progress else None)
    t = split.target
    arms = {
        "transfer": {k: transfer[k] for k in ("val", "test", "best_epoch", "train_s")},
        "target_only": target_only,
        "popularity": {"val": _metrics(popularity, t.val, [t.train]),
                       "test": _metrics(popularity, t.test, [t.train, t.val])},
        "transfer_zero_shot": transfer["zero_shot"],
    }
    return {"seed": seed, "arms": arms, "transfer_report": transfer["transfer_report"],
            "source": {"val": {k: round(float(src_result.best_val[k]), 4) for k in METRICS},
                       "best_epoch": src_result.best_epoch, "train_s": round(source_s, 2)},
            "seconds": round(time.perf_counter() - start, 2)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and sample sd over seeds of every arm's test metrics."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm in ARMS:
        out[arm] = {}
        for metric in METRICS:
            values = [r["arms"][arm]["test"][metric] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            out[arm][metric] = {"mean": round(statistics.fmean(values), 4), "sd": round(sd, 4)}
    return out


def summary_table(summary: dict[str, dict[str, dict[str, float]]], n_seeds: int) -> str:
    """A Markdown table of the test metrics, mean ± sd over the seeds."""
    names = {"transfer": "(a) transfer", "target_only": "(b) target only", "popularity": "(c) popularity",
             "transfer_zero_shot": "transfer, no target training"}
    lines = [f"| model ({n_seeds} seed{'s' if n_seeds > 1 else ''}) | " + " | ".join(METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for arm in ARMS:
        cells = [f"{summary[arm][m]['mean']:.3f} ± {summary[arm][m]['sd']:.3f}" for m in METRICS]
        lines.append(f"| {names[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_recsys_demo(out_dir: str | Path = "demo_runs/recsys", seeds: tuple[int, ...] = (0, 1, 2),
                    cfg: CrossDomainConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the MovieLens cross-domain scenario for ``seeds``; write ``metrics.json`` and ``summary.md``.

    Args:
        out_dir: folder for the results (created; files in it are replaced atomically).
        seeds: training seeds (the split itself is fixed).
        cfg: scenario settings (default: the validated ``CrossDomainConfig()``).
        progress: show progress bars (also off when TRANSFERKIT_PROGRESS=0).

    Returns:
        The content of ``metrics.json``: the split, the settings, every seed's metrics, the mean ± sd table.
    """
    cfg = cfg or CrossDomainConfig()
    start = time.perf_counter()
    split = cross_domain_split(read_movielens_100k(), k=cfg.k)
    runs = [run_cross_domain(seed, cfg, split, progress) for seed in seeds]
    summary = summarise(runs)
    metrics = {"scenario": "MovieLens 100K: films up to 1996 (source) -> films of 1997-1998 (target)",
               "split": split.describe(), "config": asdict(cfg), "seeds": list(seeds), "runs": runs,
               "test_summary": summary, "total_s": round(time.perf_counter() - start, 1)}
    out_dir = Path(out_dir)
    write_json(out_dir / "metrics.json", metrics)
    table = summary_table(summary, len(seeds))
    report = runs[0]["transfer_report"]
    text = (f"# {metrics['scenario']}\n\n"
            f"Target: {metrics['split']['target']['test']['users']} users, {len(split.target_items)} new films, "
            f"{cfg.k} training ratings per user; test = each user's last target rating, ranked against all "
            f"{len(split.target_items)} new films (seen ones excluded).\n\n{table}\n\n"
            f"Transfer: {report['users']['matched']}/{report['users']['target']} target users found in the source; "
            f"genre features matched: {len(report['features'].get('item', {}).get('matched', []))}; "
            f"items in common: {report['items']['matched']} (new films start at their genres' projection).\n\n"
            f"Total time: {metrics['total_s']} s.\n")
    write_text(out_dir / "summary.md", text)
    print(f"\n{table}\n\nwrote {out_dir / 'metrics.json'} and {out_dir / 'summary.md'} ({metrics['total_s']} s)")
    return metrics
