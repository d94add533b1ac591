"""Cross-domain recommendation on MovieLens 100K: transfer vs target-only vs popularity, 3 seeds.

The scenario is ``transferkit.recsys.demo`` (read its docstring and ``transferkit.recsys.movielens`` for the exact
split): source = ratings of films released up to 1996, target = ratings of films of 1997-1998 (288 new films),
shared users; each target user keeps 5 training ratings; every user's last target rating is the test, the one
before it the validation. Ranking is over all 288 new films, the user's training and validation films excluded.

Modes:

- default: the shipped settings (``CrossDomainConfig()``), ``--seeds`` (0 1 2), at ``--ks`` training ratings per
  target user (default 5); writes ``bench/results/recsys.json`` and prints mean ± sd tables.
- ``--tune``: the search that chose the shipped settings, on seed 0, judged on validation only: the source model
  over dim x lr x l2 on the source validation ratings, then each target arm over its own grid on the target
  validation ratings; writes ``bench/results/recsys-tune.json``.

Run: ``python bench/recsys.py`` (about a minute per k on the 2-core machine), ``python bench/recsys.py --tune``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import time
from typing import Any

os.environ.setdefault("TRANSFERKIT_PROGRESS", "0")

from common import machine, table, write_result

from transferkit.recsys.demo import (
    RATINGS_CONFIG,
    CrossDomainConfig,
    run_cross_domain,
    summarise,
    summary_table,
    train_source,
    train_target,
)
from transferkit.recsys.movielens import cross_domain_split, read_movielens_100k


def evaluate(seeds: list[int], ks: list[int], cfg: CrossDomainConfig) -> dict[str, Any]:
    data = read_movielens_100k()
    out: dict[str, Any] = {}
    for k in ks:
        cfg_k = dataclasses.replace(cfg, k=k)
        split = cross_domain_split(data, k=k)
        start = time.perf_counter()
        runs = [run_cross_domain(seed, cfg_k, split) for seed in seeds]
        summary = summarise(runs)
        out[f"k={k}"] = {
            "split": split.describe(),
            "config": dataclasses.asdict(cfg_k),
            "runs": runs,
            "test_summary": summary,
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(
            f"\n{cfg.loss}: k = {k} target training ratings per user "
            f"({split.describe()['target']['test']['users']} users, {len(split.target_items)} films), "
            f"{len(seeds)} seeds, {out[f'k={k}']['seconds']} s"
        )
        print(summary_table(summary, len(seeds)))
        main_metric = "rmse" if cfg.loss == "mse" else "ndcg@10"
        arms = list(runs[0]["arms"])
        rows = [
            [
                r["seed"],
                *(r["arms"][a]["test"][main_metric] for a in arms),
                r["arms"]["transfer"]["best_epoch"],
                r["arms"]["target_only"]["best_epoch"],
                r["source"]["best_epoch"],
            ]
            for r in runs
        ]
        print(
            table(
                ["seed", *(f"{main_metric} {a}" for a in arms), "epoch transfer", "epoch target", "epoch source"], rows
            )
        )
    return out


def tune(seed: int, task: str) -> dict[str, Any]:
    """Grid search on validation: the source settings on the source validation ratings, then each target arm's."""
    split = cross_domain_split(read_movielens_100k(), k=CrossDomainConfig().k)
    if task == "ranking":
        base, grid = CrossDomainConfig(), GRIDS["ranking"]
        select, better = "ndcg@10", max
    else:
        base, grid = dataclasses.replace(RATINGS_CONFIG), GRIDS["ratings"]
        select, better = "rmse", min
    sources: dict[int, tuple[float, Any, CrossDomainConfig]] = {}
    source_rows = []
    for dim, lr, l2 in itertools.product(grid["dim"], grid["source_lr"], grid["source_l2"]):
        cfg = dataclasses.replace(base, dim=dim, source_lr=lr, source_l2=l2)
        model, result = train_source(split, cfg, seed)
        value = result.best_val[select]
        source_rows.append([dim, lr, f"{l2:g}", value, result.best_epoch, round(result.train_s, 1)])
        if dim not in sources or better(value, sources[dim][0]) != sources[dim][0]:
            sources[dim] = (value, model, cfg)
    print(table(["dim", "source lr", "l2", f"val {select}", "best epoch", "s"], source_rows))
    target_rows = []
    for dim, lr, l2, freeze in itertools.product(grid["dim"], grid["transfer_lr"], grid["transfer_l2"], (True, False)):
        cfg = dataclasses.replace(sources[dim][2], transfer_lr=lr, transfer_l2=l2, freeze_users=freeze)
        out = train_target(split, cfg, seed, sources[dim][1])
        target_rows.append(["transfer", freeze, dim, lr, f"{l2:g}", out["val"][select], out["best_epoch"]])
    for dim, lr, l2 in itertools.product(grid["target_only_dim"], grid["target_only_lr"], grid["target_only_l2"]):
        cfg = dataclasses.replace(base, target_only_dim=dim, target_only_lr=lr, target_only_l2=l2)
        out = train_target(split, cfg, seed)
        target_rows.append(["target_only", False, dim, lr, f"{l2:g}", out["val"][select], out["best_epoch"]])
    target_rows.sort(key=lambda r: (r[0], -r[5] if select != "rmse" else r[5]))
    print(table(["arm", "freeze users", "dim", "target lr", "l2", f"val {select}", "best epoch"], target_rows))
    return {
        "seed": seed,
        "task": task,
        "grid": grid,
        "source": {"headers": ["dim", "lr", "l2", f"val_{select}", "best_epoch", "s"], "rows": source_rows},
        "target": {
            "headers": ["arm", "freeze_users", "dim", "lr", "l2", f"val_{select}", "best_epoch"],
            "rows": target_rows,
        },
    }


GRIDS = {  # widened until the best value of every arm lay inside the grid (or the curve was flat at its edge)
    "ranking": {
        "dim": [16, 32, 64],
        "source_lr": [0.003, 0.01, 0.03],
        "source_l2": [0.0, 1e-4, 1e-3],
        "transfer_lr": [0.01, 0.03, 0.1],
        "transfer_l2": [0.0, 1e-3, 1e-2],
        "target_only_dim": [8, 16, 32],
        "target_only_lr": [0.1, 0.3, 1.0],
        "target_only_l2": [1e-3, 1e-2, 1e-1],
    },
    "ratings": {
        "dim": [32],
        "source_lr": [0.003, 0.01, 0.03],
        "source_l2": [0.01, 0.1, 1.0],
        "transfer_lr": [0.003, 0.01, 0.03],
        "transfer_l2": [1.0, 10.0, 100.0],
        "target_only_dim": [8, 32],
        "target_only_lr": [0.003, 0.01, 0.03],
        "target_only_l2": [10.0, 100.0, 1000.0],
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[5], help="target training ratings per user")
    parser.add_argument(
        "--task",
        choices=["ranking", "ratings", "both"],
        default="both",
        help="ranking: BPR, HR/NDCG/recall; ratings: MSE, RMSE",
    )
    parser.add_argument("--tune", action="store_true", help="the validation search behind the shipped settings")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args()
    start = time.perf_counter()
    tasks = ["ranking", "ratings"] if args.task == "both" else [args.task]
    if args.tune:
        result: dict[str, Any] = {"mode": "tune", **{t: tune(args.seeds[0], t) for t in tasks}}
        name = "recsys-tune"
    else:
        configs = {"ranking": CrossDomainConfig(), "ratings": RATINGS_CONFIG}
        result = {
            "mode": "evaluate",
            "seeds": args.seeds,
            **{t: evaluate(args.seeds, args.ks, configs[t]) for t in tasks},
        }
        name = "recsys"
    result.update(machine=machine(), total_s=round(time.perf_counter() - start, 1))
    path = write_result(name + (f"-{args.tag}" if args.tag else ""), result)
    print(f"\nwrote {path} ({result['total_s']} s)")


if __name__ == "__main__":
    main()
