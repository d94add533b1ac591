"""The strategy comparison table: EfficientNet-Lite0 (ImageNet) -> MNIST-5k at K labelled images per class.

Each (strategy, K, seed) is one ``transferkit run`` in its own process, so that its peak memory (the process's
maximum resident set, from ``os.wait4``) belongs to it alone. Everything else is the demo recipe
(``src/transferkit/recipes/demo.yaml``: 96 px, 15 epochs, batch 32, AdamW, lr 0.003, cosine, small rotations and
shifts): by default the hyper-parameter search budget is **one configuration per strategy** (each strategy's
documented defaults at the demo's learning rate), the same for every strategy (``--search`` widens it, below); the
best epoch is chosen on validation data.

Run: ``python bench/strategies.py --shots 20 --seeds 0`` (about a minute per run on 2 CPU cores);
the full table is ``--shots 5 20 100 --seeds 0 1 2``. Results: ``bench/results/strategies.json``.
``--recipe src/transferkit/recipes/demo_text.yaml --tag text`` runs the same table on the text demo (MiniLM ->
Rotten Tomatoes); ``--set train.epochs=5`` sets recipe keys for every run.

``--search lr=0.003 lr=0.001 lr=0.01`` (the image table in docs/benchmarks.md; ``lr=0.003 lr=0.0003`` for text)
gives every strategy the same search budget: each configuration (a comma-separated
list of ``train.`` keys) is run for every (strategy, K, seed), and the table reports, per seed, the test accuracy of
the configuration with the best *validation* accuracy (ties: the first listed). ``--jobs 2`` runs two processes
at once (each with ``--threads`` threads). Every finished run is appended to ``bench/results/strategies[-TAG].jsonl``
at once, and a re-run with the same tag skips the runs that file already holds: an interrupted table resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "transferkit" / "recipes" / "demo.yaml"
ALL = [
    "linear_probe",
    "full",
    "freeze",
    "gradual_unfreeze",
    "llrd",
    "lp_ft",
    "l2sp",
    "delta",
    "bss",
    "bitfit",
    "lora",
    "scratch",
]
# options that make a strategy meaningful here (documented in the table)
OPTIONS: dict[str, dict[str, Any]] = {"freeze": {"groups": 6}, "gradual_unfreeze": {"every": 2}}


def run_one(
    strategy: str,
    shots: int,
    seed: int,
    workdir: Path,
    threads: int,
    recipe_path: Path = DEMO,
    overrides: list[str] | None = None,
    config: str = "",
) -> dict[str, Any]:
    """One ``transferkit run`` of ``strategy`` at ``shots`` per class; ``config`` holds ``key=value`` train settings."""
    recipe = yaml.safe_load(recipe_path.read_text())
    label = config.replace("=", "").replace(",", "_").replace(".", "p")
    recipe.update(
        name=f"{strategy}-{shots}-{seed}" + (f"-{label}" if label else ""), seed=seed, compare=[], baselines=[]
    )
    recipe["data"]["per_class"] = shots
    recipe["train"]["strategy"] = {"name": strategy, **OPTIONS.get(strategy, {})}
    path = workdir / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = workdir / recipe["name"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFERKIT_PROGRESS": "0", "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    settings = [f"train.{kv}" for kv in config.split(",") if kv]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "transferkit",
            "run",
            str(path),
            *(overrides or []),
            *settings,
            "--out",
            str(out),
            "--overwrite",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read() if proc.stderr else ""
    key = {"strategy": strategy, "shots": shots, "seed": seed, "config": config}
    if status != 0:
        return {**key, "error": stderr[-2000:]}
    m = json.loads((out / "metrics.json").read_text())["models"][strategy]
    return {
        **key,
        "test_accuracy": m["test"]["accuracy"],
        "val_accuracy": m["val"]["accuracy"],
        "train_s": sum(m["timing"].values()),
        "process_s": wall,
        # CPU seconds the run consumed: unlike wall time, barely changed by other jobs on the machine
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "trainable_params": m["trainable_params"],
        "total_params": m["total_params"],
        "best_epoch": m["best_epoch"],
    }


def select(rows: list[dict[str, Any]], configs: list[str]) -> list[dict[str, Any]]:
    """Per (strategy, K, seed): the run whose configuration has the best validation accuracy (ties: listed first).

    Only complete searches count: a (strategy, K, seed) missing one of ``configs`` is left out. The chosen row
    gains ``cost_s``, the training seconds of the whole search, which is what the choice cost.
    """
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r and r.get("config", "") in configs:
            groups.setdefault((r["strategy"], r["shots"], r["seed"]), {})[r.get("config", "")] = r
    chosen = []
    for runs in groups.values():
        if len(runs) == len(configs):
            best = max(configs, key=lambda c: (runs[c]["val_accuracy"], -configs.index(c)))
            chosen.append({**runs[best], "cost_s": sum(r["train_s"] for r in runs.values())})
    return chosen


def table(rows: list[dict[str, Any]], configs: list[str]) -> str:
    lines = [
        "| strategy | K/class | seeds | test accuracy (mean ± sd) | val accuracy | chosen config per seed | "
        "train s (search) | peak RSS MB | trainable params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    chosen = select(rows, configs)
    keys = sorted(
        {(r["strategy"], r["shots"]) for r in chosen}, key=lambda k: (k[1], ALL.index(k[0]) if k[0] in ALL else 99)
    )
    for strategy, shots in keys:
        rs = sorted((r for r in chosen if r["strategy"] == strategy and r["shots"] == shots), key=lambda r: r["seed"])
        acc = [r["test_accuracy"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        picked = " ".join(r["config"] or "-" for r in rs)
        lines.append(
            f"| {strategy} | {shots} | {len(rs)} | {statistics.mean(acc):.4f} ± {sd:.4f} | "
            f"{statistics.mean(r['val_accuracy'] for r in rs):.3f} | {picked} | "
            f"{statistics.mean(r['train_s'] for r in rs):.1f} "
            f"({statistics.mean(r['cost_s'] for r in rs):.1f}) | "
            f"{max(r['peak_rss_mb'] for r in rs):.0f} | {rs[0]['trainable_params']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--strategies", nargs="+", default=ALL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the result file (strategies-TAG.json)")
    parser.add_argument("--recipe", type=Path, default=DEMO, help="the recipe every run starts from")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="recipe overrides for every run, e.g. train.epochs=5",
    )
    parser.add_argument(
        "--search",
        nargs="+",
        default=[""],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="train settings tried for every strategy, chosen on validation accuracy, e.g. lr=0.003 lr=0.001 lr=0.01",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each with --threads threads)")
    args = parser.parse_args()
    name = f"strategies-{args.tag}" if args.tag else "strategies"
    log = RESULTS / f"{name}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    done = {(r["strategy"], r["shots"], r["seed"], r.get("config", "")) for r in rows if "error" not in r}
    todo = [
        (strategy, shots, seed, config)
        for shots in args.shots
        for seed in args.seeds
        for strategy in args.strategies
        for config in args.search
        if (strategy, shots, seed, config) not in done
    ]
    print(f"{len(todo)} runs to do, {len(done)} already in {log}", flush=True)
    lock = threading.Lock()

    def one(job: tuple[str, int, int, str]) -> None:
        strategy, shots, seed, config = job
        row = run_one(strategy, shots, seed, Path(tmp), args.threads, args.recipe, args.overrides, config)
        with lock:
            rows.append(row)
            with log.open("a") as f:  # one line per finished run: an interrupted table resumes from here
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))
    result = {
        "machine": machine(),
        "args": {**vars(args), "recipe": str(args.recipe)},
        "options": OPTIONS,
        "search": args.search,
        "rows": rows,
    }
    path = write_result(name, result)
    print(table(rows, args.search))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
