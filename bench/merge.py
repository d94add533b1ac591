"""Model soups on MNIST-5k: five fine-tunes of EfficientNet-Lite0, then the best single one, the uniform soup, the
greedy soup and the ensemble of five, each with its test accuracy and inference cost.

The five fine-tunes are the demo recipe (``src/transferkit/recipes/demo.yaml``: 20 labelled images per class,
``freeze`` of the first 6 layer groups, 15 epochs, 96 px) at five (learning rate, training seed) pairs; they share
the split, the source and the new head's initialisation (the recipe's seed), as the soups of Wortsman et al. share
their start. The merges are the recipe's ``merge:`` stage: every choice (which single model is best, which models
join the greedy soup) is made on the validation split; the test split is only reported.

Inference cost: one pass over the 1,000 test images (batch 32, 1 thread), of one model and of the ensemble,
interleaved ``--repeats`` times in this process; the ratio is ensemble / single. Merge memory: a TIES merge of the
first two and of all five, each in a fresh process: the rise of its anonymous memory against one model's size.

Run: ``python bench/merge.py`` (about 6 minutes per seed on 2 CPU cores); ``--seeds 0 1 2`` for three splits;
``--sweep seed`` varies only the training seed (at the demo's learning rate).
Results: ``bench/results/merge.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFERKIT_PROGRESS", "0")

import torch
import yaml

from transferkit.demo import demo_recipe_path
from transferkit.engine.loop import evaluate_model
from transferkit.io import read_json, write_json
from transferkit.merge import Ensemble
from transferkit.models.base import load_model
from transferkit.pipeline import prepare_data
from transferkit.recipe import load_recipe
from transferkit.runner import run_recipe

# (learning rate, training seed offset) of the five fine-tunes; the first is the demo's own setting
SWEEPS = {
    "lr_seed": [(0.003, 0), (0.001, 1), (0.01, 2), (0.002, 3), (0.005, 4)],  # learning rates and seeds
    "seed": [(0.003, k) for k in range(5)],  # the demo's learning rate, five training seeds
}


def soup_recipe(seed: int, sweep: str = "lr_seed") -> dict[str, Any]:
    raw = yaml.safe_load(demo_recipe_path("image").read_text())
    raw["name"] = f"soups-{sweep}-seed{seed}"
    raw["seed"] = seed
    (lr0, _), rest = SWEEPS[sweep][0], SWEEPS[sweep][1:]
    raw["train"] = {**raw["train"], "lr": lr0, "seed": seed}
    raw["compare"] = [
        {
            "strategy": raw["train"]["strategy"],
            "label": f"ft-lr{lr}-s{seed + k}",
            "overrides": {"lr": lr, "seed": seed + k},
        }
        for lr, k in rest
    ]
    raw["merge"] = [{"method": "uniform_soup"}, {"method": "greedy_soup"}, {"method": "ensemble"}]
    return raw


def inference_cost(run: Path, members: list[str], repeats: int) -> dict[str, float]:
    """Seconds per pass over the test split: one model, and the ensemble of ``members`` (interleaved)."""
    recipe = load_recipe(run / "recipe.yaml")
    single = load_model(run / "models" / members[0])
    ensemble = Ensemble([load_model(run / "models" / m) for m in members]).eval()
    assert recipe.data is not None
    data = prepare_data(recipe.data, single, recipe.seed)
    test = data.dataset("test")
    times: dict[str, list[float]] = {"single": [], "ensemble": []}
    for _ in range(repeats):
        for name, model in (("single", single), ("ensemble", ensemble)):
            t = time.perf_counter()
            evaluate_model(model, test, 32, len(data.classes))
            times[name].append(time.perf_counter() - t)
    single_s, ensemble_s = statistics.median(times["single"]), statistics.median(times["ensemble"])
    return {"single_s": single_s, "ensemble_s": ensemble_s, "ratio": ensemble_s / single_s}


MEMORY_PROBE = """
import json, sys, threading, time
from pathlib import Path
from transferkit.merge import merge_state, method_of
from transferkit.models.base import load_model

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

folders = [Path(f) for f in sys.argv[1:]]
base = {k: v for k, v in load_model(folders[0]).state_dict().items() if not k.startswith("head.")}
_, method, options = method_of({"name": "ties", "density": 0.2})
merge_state(folders[:2], method.merge_config(options, 2), base)  # warm-up: the allocator, thread pools
peak, done = [0.0], [False]

def watch():
    while not done[0]:
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.0005)

before = anon_mb()
watcher = threading.Thread(target=watch)
watcher.start()
state, _ = merge_state(folders, method.merge_config(options, len(folders)), base)
done[0] = True
watcher.join()
size = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
print(json.dumps({"peak_growth_mb": peak[0] - before, "model_mb": size}))
"""


def merge_memory(run: Path, members: list[str]) -> dict[str, Any]:
    """Peak anonymous memory of a TIES merge (density 0.2, per tensor) of the first 2 and of all ``members``, each
    in a fresh process after a warm-up merge: how far its resident anonymous memory (sampled every 0.5 ms) rose
    above where it started, against the size of one model (the running result is one model)."""
    import subprocess

    rows = {}
    for n in (2, len(members)):
        folders = [str(run / "models" / m) for m in members[:n]]
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *folders], capture_output=True, text=True, check=True)
        rows[str(n)] = json.loads(out.stdout.strip().splitlines()[-1])
    return rows


def one_seed(seed: int, out: Path, repeats: int, sweep: str = "lr_seed") -> dict[str, Any]:
    t = time.perf_counter()
    run = run_recipe(load_recipe(soup_recipe(seed, sweep)), out=out / f"{sweep}-seed{seed}", overwrite=True)
    wall = time.perf_counter() - t
    metrics = read_json(run / "metrics.json")
    models, ensembles = metrics["models"], metrics["ensembles"]
    singles = [n for n, m in models.items() if not m["strategy"].startswith("merge:")]
    best = max(singles, key=lambda n: models[n]["val"]["accuracy"])  # chosen on validation
    greedy = models["merge-greedy_soup"]
    row = {
        "seed": seed,
        "singles": {n: {"val": models[n]["val"]["accuracy"], "test": models[n]["test"]["accuracy"]} for n in singles},
        "best_single": {"name": best, "val": models[best]["val"]["accuracy"], "test": models[best]["test"]["accuracy"]},
        "uniform_soup": {k: models["merge-uniform_soup"][k]["accuracy"] for k in ("val", "test")},
        "greedy_soup": {
            **{k: greedy[k]["accuracy"] for k in ("val", "test")},
            "kept": len(greedy["merge"]["kept"]),
        },
        "ensemble": {k: ensembles["merge-ensemble"][k]["accuracy"] for k in ("val", "test")},
        "inference": inference_cost(run, singles, repeats),
        "merge_memory": merge_memory(run, singles),
        "wall_s": wall,
    }
    print(json.dumps(row, indent=1))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved test passes for the inference cost")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="where the runs go (default: a temporary folder)")
    ap.add_argument("--sweep", choices=list(SWEEPS), default="lr_seed", help="what the five fine-tunes vary")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-merge-"))
    rows = [one_seed(s, out, args.repeats, args.sweep) for s in args.seeds]
    print(f"\n{'seed':<5} {'best single':>12} {'uniform':>8} {'greedy (kept)':>14} {'ensemble':>9} {'cost x':>7}")
    for r in rows:
        print(
            f"{r['seed']:<5} {r['best_single']['test']:>12.4f} {r['uniform_soup']['test']:>8.4f} "
            f"{r['greedy_soup']['test']:>9.4f} ({r['greedy_soup']['kept']}) {r['ensemble']['test']:>9.4f} "
            f"{r['inference']['ratio']:>7.2f}"
        )
    tag = "" if args.sweep == "lr_seed" else f"-{args.sweep}"
    results = Path(__file__).resolve().parent / "results" / f"merge{tag}.json"
    write_json(results, {"rows": rows, "command": " ".join(sys.argv)})
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
