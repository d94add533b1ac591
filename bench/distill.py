"""Distillation and the unlabelled pool on MNIST-5k: 20 labelled images per class, the rest of the pool unlabelled.

Two runs per seed of the demo recipe (``src/transferkit/recipes/demo.yaml``: 20 labelled and 20 validation images
per class, 1,000 test images, ``freeze`` of 6 layer groups, 15 epochs, 96 px, small rotations and shifts), with
``data.unlabelled: rest`` (the ~3,600 images outside the splits; their labels are never used for training) and
``distill:`` entries taught by the run's labels-only model:

- run ``lite0`` (source EfficientNet-Lite0; its labels-only model is the demo's): ``kd``, the same architecture
  (ImageNet Lite0, new head) learning from the teacher's soft outputs on the labelled images and the pool (T 4,
  alpha 0.9; with augmentation on, the teacher runs on each batch); ``noisy``, self-training (Noisy Student): the
  teacher labels the pool images it is at least 0.8 confident about, a fresh student trains on them with
  augmentation, two rounds (the round-1 student teaches round 2); with ``--fixmatch``, ``fixmatch``: consistency
  training without a teacher (a confident prediction, at least 0.95, on a weakly augmented pool image labels a
  RandAugment + Cutout view of it).
- run ``lite2`` (source EfficientNet-Lite2, a larger teacher): ``lite0-kd``, an ImageNet Lite0 student (kd on the
  pool), to compare with run ``lite0``'s labels-only Lite0 (the same split: same seed and data); with
  ``--lite2-noisy``, ``lite0-noisy``, a Lite0 student self-trained on the Lite2 teacher's pseudo-labels (two
  rounds, as ``noisy``); ``small-kd``, a
  small student from random weights (``--small``, default timm ``lcnet_050``) with kd on the pool, and
  ``small-labels``, the same student on the labelled images alone (alpha 0: cross-entropy only, no pool).

Every choice is made on validation data: each model's best epoch; which of ``kd``, ``noisy`` and ``fixmatch`` is
"the method" is the one with the highest mean validation accuracy over the seeds; for the pool row, the Lite0
student of the highest mean validation accuracy among every one that learned from the labels and the pool
(``pool:lite0_student_chosen_on_val``). The test split is only reported.

Text (``--runs minilm``): the text demo recipe (all-MiniLM-L6-v2, Rotten Tomatoes, 100 labelled and 50 validation
reviews per class, 2,000 test reviews) with 5,000 of the corpus's other ~10,500 reviews unlabelled: ``kd`` (the
6-layer target), ``layers3-kd`` (a 3-layer copy of the teacher, layers 0, 2, 4, built by the transfer machinery)
and ``noisy`` (two rounds of pseudo-labels at 0.8). ``--runs minilm-c``: the same with the labels-only teacher
trained by the SetFit-style ``contrastive`` strategy, and its students ``kd`` and ``noisy-r1`` (one round).

Run: ``python bench/distill.py --seeds 0 1 2`` (see docs/benchmarks.md for the wall time); ``--runs lite0`` for one
run, ``--runs minilm --tag text`` for text; results: ``bench/results/distill[-TAG].json``. ``--combine A.json
B.json`` joins the runs of several commands (same seeds) into one table without training.
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
from transferkit.io import read_json, write_json
from transferkit.recipe import load_recipe
from transferkit.runner import run_recipe


def entries(epochs: int, small: str, small_epochs: int, small_lr: float) -> dict[str, dict[str, dict[str, Any]]]:
    """The distill entries of each run (by run name)."""
    kd = {"name": "kd", "temperature": 4.0, "alpha": 0.9}
    scratch = {"name": f"timm:{small}", "pretrained": False}
    small_train = {"strategy": "full", "epochs": small_epochs, "lr": small_lr}
    return {
        "lite0": {
            "kd": {"loss": kd, "train": {"epochs": epochs}, "label": "kd"},
            "noisy": {
                "loss": {"name": "pseudo_label", "threshold": 0.8},
                "rounds": 2,
                "train": {"epochs": epochs},
                "label": "noisy",
            },
            "fixmatch": {
                "loss": {"name": "fixmatch", "threshold": 0.95},
                "train": {"epochs": epochs},
                "label": "fixmatch",
            },
        },
        "lite2": {
            "lite0-kd": {
                "student": {"name": "efficientnet_lite0"},
                "loss": kd,
                "train": {"epochs": epochs},
                "label": "lite0-kd",
            },
            "lite0-noisy": {
                "student": {"name": "efficientnet_lite0"},
                "loss": {"name": "pseudo_label", "threshold": 0.8},
                "rounds": 2,
                "train": {"epochs": epochs},
                "label": "lite0-noisy",
            },
            "small-kd": {"student": scratch, "loss": kd, "train": small_train, "label": "small-kd"},
            "small-labels": {
                "student": scratch,
                "loss": {"name": "kd", "alpha": 0.0},
                "unlabelled": False,
                "train": small_train,
                "label": "small-labels",
            },
        },
        "minilm": {
            "kd": {"loss": kd, "train": {"epochs": epochs}, "label": "kd"},
            "layers3-kd": {
                "student_transfer": {"kwargs": {"num_hidden_layers": 3}, "source_blocks": "every_other"},
                "loss": kd,
                "train": {"epochs": epochs},
                "label": "layers3-kd",
            },
            "noisy": {
                "loss": {"name": "pseudo_label", "threshold": 0.8},
                "rounds": 2,
                "train": {"epochs": epochs},
                "label": "noisy",
            },
        },
        # the teacher trained by the SetFit-style contrastive strategy (the labels-only model the pool starts from);
        # its students train as the minilm run's do (the demo's freeze), one round of pseudo-labels (time)
        "minilm-c": {
            "kd": {"loss": kd, "train": {"epochs": epochs, "strategy": TEXT_STRATEGY}, "label": "kd"},
            "noisy-r1": {
                "loss": {"name": "pseudo_label", "threshold": 0.8},
                "rounds": 1,
                "train": {"epochs": epochs, "strategy": TEXT_STRATEGY},
                "label": "noisy-r1",
            },
        },
    }


SOURCES = {
    "lite0": "efficientnet_lite0",
    "lite2": "efficientnet_lite2",
    "minilm": "all-minilm-l6-v2",
    "minilm-c": "all-minilm-l6-v2",
}
TASK = {"lite0": "image", "lite2": "image", "minilm": "text", "minilm-c": "text"}
TEXT_STRATEGY = {"name": "freeze", "groups": 2, "backbone_lr_scale": 0.01}  # the text demo's
TEACHER_STRATEGY = {"minilm-c": "contrastive"}  # the runs whose labels-only model trains otherwise than the demo's


def recipe(seed: int, run: str, chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    raw = yaml.safe_load(demo_recipe_path(TASK[run]).read_text())
    raw["name"] = f"distill-{run}-seed{seed}"
    raw["seed"] = seed
    raw["source"] = SOURCES[run]
    raw.pop("compare", None)
    raw.pop("baselines", None)
    raw["data"]["unlabelled"] = "rest"
    if TASK[run] == "text":  # 5,000 of the ~10,500 unused reviews: the pool, within the time budget
        raw["data"]["unlabelled_max"] = 5000
    if run in TEACHER_STRATEGY:
        raw["train"]["strategy"] = TEACHER_STRATEGY[run]
    raw["distill"] = list(chosen.values())
    return raw


def _row(model: dict[str, Any]) -> dict[str, Any]:
    out = {"val": model["val"]["accuracy"], "test": model["test"]["accuracy"]}
    out["train_s"] = model["timing"]["train_s"]
    if "distill" in model:
        out["rounds"] = model["distill"]["rounds"]
        out["cost"] = model["cost"]
    return out


def one_seed(seed: int, out: Path, runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    row: dict[str, Any] = {"seed": seed}
    for run, chosen in runs.items():
        t = time.perf_counter()
        folder = out / f"{run}-seed{seed}"
        # a run already there (finished or interrupted) keeps what it holds and gains what it lacks (--from)
        how: dict[str, Any] = {"from_run": folder} if (folder / "run.json").is_file() else {"out": folder}
        done = run_recipe(load_recipe(recipe(seed, run, chosen)), **how)
        metrics = read_json(done / "metrics.json")
        row[run] = {
            "pool": metrics["data"].get("unlabelled"),
            "wall_s": time.perf_counter() - t,
            "models": {n: _row(m) for n, m in metrics["models"].items()},
        }
    print(json.dumps(row, indent=1), flush=True)
    return row


def combine(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of several results files joined per seed (each file gives its runs; a run in several files is taken
    from the last of them, e.g. a later command that added entries to it)."""
    seeds = [[r["seed"] for r in res["rows"]] for res in results]
    if any(s != seeds[0] for s in seeds):
        raise SystemExit(f"--combine: the files hold other seeds: {seeds}")
    rows: list[dict[str, Any]] = [{"seed": s} for s in seeds[0]]
    for res in results:
        for row, theirs in zip(rows, res["rows"], strict=True):
            row.update(theirs)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation of each model's test and validation accuracy over the seeds."""

    def stats(values: list[float]) -> dict[str, Any]:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": statistics.mean(values), "sd": sd, "values": values}

    out: dict[str, Any] = {}
    for run in [k for k in rows[0] if k != "seed"]:
        for name in rows[0][run]["models"]:
            picked = [r[run]["models"][name] for r in rows]
            out[f"{run}:{name}"] = {k: stats([p[k] for p in picked]) for k in ("test", "val")}
    for run in ("lite0", "minilm", "minilm-c"):
        methods = [n for n in out if n in (f"{run}:kd", f"{run}:fixmatch") or n.startswith(f"{run}:noisy")]
        if methods:
            out[f"{run}:method_chosen_on_val"] = max(methods, key=lambda n: out[n]["val"]["mean"])
    # the pool row: every Lite0 student that learned from the labels and the pool, whichever teacher (the run's
    # Lite0, or the Lite2 trained on the same labels), chosen on validation
    pool = [  # (and the longer self-training configurations, noisy-rRe E)
        n
        for n in out
        if n in ("lite0:kd", "lite0:fixmatch", "lite2:lite0-kd") or n.startswith(("lite0:noisy", "lite2:lite0-noisy"))
    ]
    if pool:  # max keeps the first of equals: a tie goes to the configuration listed first (the cheaper one)
        out["pool:lite0_student_chosen_on_val"] = max(pool, key=lambda n: out[n]["val"]["mean"])
    return out


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The results as a Markdown table: per model, test and validation accuracy (mean ± sd over the seeds, and each
    seed's), parameters, MACs, CPU latency at batch 1 (median over seeds) and training time."""
    lines = [
        "| run: model | test accuracy | val accuracy | per seed (test) | params | MACs | latency ms "
        "| teacher / student latency | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, st in summary.items():
        if ":" not in key or not isinstance(st, dict):
            continue
        run, name = key.split(":", 1)
        models = [r[run]["models"][name] for r in rows]
        cost = [m["cost"]["student"] for m in models if "cost" in m]
        if not cost:  # a teacher: its cost as the students' runs measured it, beside them
            cost = [
                m["cost"][f"teacher {name}"]
                for r in rows
                for m in r[run]["models"].values()
                if f"teacher {name}" in m.get("cost", {})
            ]
        params = f"{cost[0]['params'] / 1e6:.2f} M" if cost else ""
        macs = f"{cost[0]['macs'] / 1e6:.1f} M" if cost else ""
        latency = f"{statistics.median(c['latency_ms'] for c in cost):.1f}" if cost else ""
        train_s = statistics.median(m["train_s"] for m in models)
        ratios = [  # measured together, interleaved: the ratio is what machine noise leaves alone
            m["cost"][t]["latency_ms"] / m["cost"]["student"]["latency_ms"]
            for m in models
            for t in m.get("cost", {})
            if t.startswith("teacher ")
        ]
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else ""
        test, val = st["test"], st["val"]
        lines.append(
            f"| {run}: {name} | {test['mean']:.3f} ± {test['sd']:.3f} | {val['mean']:.3f} ± {val['sd']:.3f} | "
            f"{', '.join(f'{v:.3f}' for v in test['values'])} | {params} | {macs} | {latency} | {ratio} | "
            f"{train_s:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--runs", nargs="+", default=["lite0", "lite2"], choices=list(SOURCES))
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the Lite0 students (over labelled + pool)")
    ap.add_argument("--small", default="lcnet_050", help="the small student's timm architecture (random weights)")
    ap.add_argument("--small-epochs", type=int, default=6)
    ap.add_argument("--small-lr", type=float, default=0.01)
    ap.add_argument("--small-long", type=int, help="also small-kd with this many epochs (small-kd-eN)")
    ap.add_argument(
        "--fixmatch", action="store_true", help="also fixmatch in the lite0 run (two views per pool image: slow)"
    )
    ap.add_argument(
        "--lite2-noisy",
        action="store_true",
        help="also lite0-noisy in the lite2 run: a Lite0 student self-trained on the Lite2 teacher's pseudo-labels",
    )
    ap.add_argument(
        "--noisy-long",
        type=int,
        nargs=2,
        metavar=("ROUNDS", "EPOCHS"),
        help="also noisy-rRe E (lite0 run; lite0-noisy-rRe E in the lite2 run with --lite2-noisy): self-training with "
        "more rounds and epochs, a further configuration compared on validation",
    )
    ap.add_argument(
        "--combine",
        nargs="+",
        metavar="RESULTS",
        help="train nothing: join the runs of these results files (the same seeds) into one table, e.g. the lite0 "
        "run of one command and the lite2 run of another",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", help="where the runs go (default: a temporary folder); an existing run resumes")
    ap.add_argument("--tag", default="", help="results file suffix")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    every = entries(args.epochs, args.small, args.small_epochs, args.small_lr)
    if not args.fixmatch:
        every["lite0"].pop("fixmatch")
    if not args.lite2_noisy:
        every["lite2"].pop("lite0-noisy")
    if args.small_long:  # the small student trained longer: a second configuration, compared on validation
        long = every["lite2"]["small-kd"]
        every["lite2"][f"small-kd-e{args.small_long}"] = {
            **long,
            "train": {**long["train"], "epochs": args.small_long},
            "label": f"small-kd-e{args.small_long}",
        }
    if args.noisy_long:  # self-training for longer: more rounds, more epochs per round
        rounds, epochs = args.noisy_long
        for run, name in (("lite0", "noisy"), ("lite2", "lite0-noisy"), ("minilm", "noisy")):
            if name in every[run]:
                longer = f"{name}-r{rounds}e{epochs}"
                base = every[run][name]
                every[run][longer] = {**base, "rounds": rounds, "train": {"epochs": epochs}, "label": longer}
    runs = {r: every[r] for r in args.runs}
    if args.combine:
        rows = combine([read_json(Path(f)) for f in args.combine])
    else:
        out = Path(args.out or tempfile.mkdtemp(prefix="bench-distill-"))
        rows = [one_seed(s, out, runs) for s in args.seeds]
    result = {"rows": rows, "summary": summary(rows), "command": " ".join(sys.argv), "args": vars(args)}
    print(json.dumps(result["summary"], indent=1))
    print(markdown(rows, result["summary"]))
    path = Path(__file__).resolve().parent / "results" / f"distill{('-' + args.tag) if args.tag else ''}.json"
    write_json(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
