"""The strategy comparison table: EfficientNet-Lite0 (ImageNet) -> MNIST-5k at K labelled images per class.

Each (strategy, K, seed) is one ``transferkit run`` in its own process, so that its peak memory (the process's
maximum resident set, from ``os.wait4``) belongs to it alone. Everything else is the demo recipe
(``src/transferkit/recipes/demo.yaml``: 96 px, 15 epochs, batch 32, AdamW, lr 0.003, cosine, small rotations and
shifts): the hyper-parameter search budget is **one configuration per strategy** (each strategy's documented
defaults at the demo's learning rate), the same for every strategy; the best epoch is chosen on validation data.

Run: ``python bench/strategies.py --shots 20 --seeds 0`` (about a minute per run on 2 CPU cores);
the full table is ``--shots 5 20 100 --seeds 0 1 2``. Results: ``bench/results/strategies.json``.
``--recipe src/transferkit/recipes/demo_text.yaml --tag text`` runs the same table on the text demo (MiniLM ->
Rotten Tomatoes); ``--set train.lr=1e-3`` sets recipe keys for every run (e.g. a second configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "transferkit" / "recipes" / "demo.yaml"
ALL = ["linear_probe", "full", "freeze", "gradual_unfreeze", "llrd", "lp_ft", "l2sp", "delta", "bss", "bitfit",
       "lora", "scratch"]
# options that make a strategy meaningful here (documented in the table)
OPTIONS: dict[str, dict[str, Any]] = {"freeze": {"groups": 6}, "gradual_unfreeze": {"every": 2}}


def run_one(strategy: str, shots: int, seed: int, workdir: Path, threads: int, recipe_path: Path = DEMO,
            overrides: list[str] | None = None) -> dict[str, Any]:
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe.update(name=f"{strategy}-{shots}-{seed}", seed=seed, compare=[], baselines=[])
    recipe["data"]["per_class"] = shots
    recipe["train"]["strategy"] = {"name": strategy, **OPTIONS.get(strategy, {})}
    path = workdir / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = workdir / recipe["name"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFERKIT_PROGRESS": "0", "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "transferkit", "run", str(path), *(overrides or []), "--out",
                             str(out), "--overwrite"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read() if proc.stderr else ""
    if status != 0:
        return {"strategy": strategy, "shots": shots, "seed": seed, "error": stderr[-2000:]}
    m = json.loads((out / "metrics.json").read_text())["models"][strategy]
    return {"strategy": strategy, "shots": shots, "seed": seed, "test_accuracy": m["test"]["accuracy"],
            "val_accuracy": m["val"]["accuracy"], "train_s": sum(m["timing"].values()), "process_s": wall,
            # CPU seconds the run consumed: unlike wall time, barely changed by other jobs on the machine
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "trainable_params": m["trainable_params"],
            "total_params": m["total_params"], "best_epoch": m["best_epoch"]}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| strategy | K/class | seeds | test accuracy (mean ± sd) | train s | peak RSS MB | trainable params |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["strategy"], r["shots"]) for r in rows if "error" not in r},
                  key=lambda k: (k[1], ALL.index(k[0]) if k[0] in ALL else 99))
    for strategy, shots in keys:
        rs = [r for r in rows if r["strategy"] == strategy and r["shots"] == shots and "error" not in r]
        acc = [r["test_accuracy"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(f"| {strategy} | {shots} | {len(rs)} | {statistics.mean(acc):.4f} ± {sd:.4f} | "
                     f"{statistics.mean(r['train_s'] for r in rs):.1f} | {max(r['peak_rss_mb'] for r in rs):.0f} | "
                     f"{rs[0]['trainable_params']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--strategies", nargs="+", default=ALL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the result file (strategies-TAG.json)")
    parser.add_argument("--recipe", type=Path, default=DEMO, help="the recipe every run starts from")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="recipe overrides for every run, e.g. train.lr=0.001")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shots in args.shots:
            for seed in args.seeds:
                for strategy in args.strategies:
                    row = run_one(strategy, shots, seed, Path(tmp), args.threads, args.recipe, args.overrides)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = {"machine": machine(), "args": {**vars(args), "recipe": str(args.recipe)}, "options": OPTIONS,
              "rows": rows}
    path = write_result(f"strategies-{args.tag}" if args.tag else "strategies", result)
    print(table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
