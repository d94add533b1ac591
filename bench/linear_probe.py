"""Linear probe on cached features vs the same probe trained through a frozen backbone.

Both sides train the same new 10-class head (``build_target`` with the same seed, so the same initial weights) on
top of EfficientNet-Lite0 (ImageNet weights), with the demo recipe's data (MNIST-5k, 20 labelled images per class,
20 validation images per class, 1000 test images, 96 px) and its optimizer settings (AdamW, lr 0.003, batch 32,
cosine schedule), for ``--epochs`` epochs (default 10), on the same example order (``fit`` fixes it by seed):

- cached: ``transferkit.pipeline.train`` with strategy ``linear_probe``. The backbone features of the train and val
  images are computed once (``compute_features``, what ``feature_cache`` runs per split) and only the head is
  trained on them; each epoch's validation runs the head on the cached val features.
- frozen: ``transferkit.engine.loop.fit`` on the images with the same plan (head parameters only, backbone held in
  eval mode, ``cached_features=False``): every step runs the full backbone forward, and each epoch's validation
  runs the whole model on the val images.

Validation is counted on both sides, identically: both validate every epoch, as ``fit`` always does. In backbone
passes that is (train + val) = 400 images once vs 10 x 400 = 4000, so 10x is the ceiling of the training speedup.
The test set is timed apart (features + head for the cached side, the whole model for the frozen side): it is the
same 1000 backbone passes on both sides and would dilute the training comparison (``total`` includes it).

Both sides start from unmemoised datasets, so each image is decoded and resized once per side. Sides alternate
(cached, frozen / frozen, cached) over ``--rounds`` rounds; medians are reported.

Diagnostics (``--no-diagnostics`` skips them): a third side, ``cached@64``, is the cached probe with features
computed at batch 64 instead of ``compute_features``' default 32 (on this CPU a 96 px batch of 64 is slower per
image than one of 32); and ``gc.collect()``, which ``fit`` runs once per call through ``accelerator.free_memory()``,
is timed on its own after each round.

Run: ``python bench/linear_probe.py`` (writes bench/results/linear_probe.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFERKIT_PROGRESS", "0")

import torch
from common import machine, median, table, write_result
from torch.utils.data import TensorDataset

import transferkit
from transferkit.engine.loop import evaluate_model, fit, make_accelerator
from transferkit.models.vision import SourceModel
from transferkit.pipeline import PreparedData, compute_features, evaluate, prepare_data, train
from transferkit.recipe import TrainConfig, load_recipe
from transferkit.sources import load_source
from transferkit.strategies import get_strategy
from transferkit.strategies.base import apply_plan
from transferkit.transfer import build_target

DEMO = Path(transferkit.__file__).parent / "recipes" / "demo.yaml"


def cached_side(
    source: SourceModel,
    data: PreparedData,
    cfg: TrainConfig,
    seed: int,
    accelerator: Any,
    feature_batch: int = 32,
    with_test: bool = True,
) -> dict:
    """transferkit's linear probe: features once, then the head on them.

    ``feature_batch`` 32 is ``compute_features``' default, what ``feature_cache`` (and so ``train``) uses.
    """
    target = build_target(source, data.classes, seed=seed)
    target.preprocess = data.preprocess
    t0 = time.perf_counter()
    feats = {
        s: compute_features(target.backbone, data.dataset(s), feature_batch, accelerator.device)
        for s in ("train", "val")
    }
    t1 = time.perf_counter()
    job = train(target, data, cfg, seed=seed, accelerator=accelerator, features=feats)
    t2 = time.perf_counter()
    out = {
        "features_s": t1 - t0,
        "head_fit_s": t2 - t1,
        "train_s": t2 - t0,
        "best_epoch": job["best_epoch"],
        "history": job["history"],
    }
    if with_test:
        test_feats = compute_features(target.backbone, data.dataset("test"), feature_batch, accelerator.device)
        t3 = time.perf_counter()
        test_set = TensorDataset(test_feats, torch.as_tensor(data.examples.labels[data.splits.test]))
        test = evaluate_model(target.head, test_set, 256, len(data.classes), accelerator.device)
        t4 = time.perf_counter()
        out.update(test_features_s=t3 - t2, test_eval_s=t4 - t3, total_s=t4 - t0, test_accuracy=test["accuracy"])
    return out


def frozen_side(source: SourceModel, data: PreparedData, cfg: TrainConfig, seed: int, accelerator: Any) -> dict:
    """The same probe through the frozen backbone: a full forward pass every step and every validation."""
    target = build_target(source, data.classes, seed=seed)
    target.preprocess = data.preprocess
    strategy, options = get_strategy("linear_probe")
    plan = dataclasses.replace(strategy.plan(target, options, cfg), cached_features=False)
    apply_plan(target, plan)  # head trainable, backbone frozen; fit holds plan.frozen_modules (backbone) in eval
    t0 = time.perf_counter()
    result = fit(
        target,
        data.dataset("train"),
        data.dataset("val"),
        cfg,
        plan,
        num_classes=len(data.classes),
        seed=seed,
        accelerator=accelerator,
    )
    t1 = time.perf_counter()
    target.load_state_dict(result.best_state)
    test = evaluate(target, data.dataset("test"), len(data.classes), device=accelerator.device)
    t2 = time.perf_counter()
    return {
        "train_s": t1 - t0,
        "test_eval_s": t2 - t1,
        "total_s": t2 - t0,
        "test_accuracy": test["accuracy"],
        "best_epoch": result.best_epoch,
        "history": result.history,
    }


@torch.no_grad()
def warm_up(source: SourceModel, data: PreparedData) -> None:
    """First-call costs (allocator, oneDNN kernels per batch shape) paid before either side is timed."""
    model = build_target(source, data.classes).eval()
    size = data.preprocess["input_size"][-1]
    for n in (64, 32, 40, 8):
        model(torch.zeros(n, 3, size, size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of both sides")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--recipe", type=Path, default=DEMO, help="recipe whose data, seed and optimizer are used")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable under a concurrent job; 0 = torch's default)",
    )
    ap.add_argument(
        "--no-diagnostics", action="store_true", help="skip the extra cached side with features computed at batch 64"
    )
    ap.add_argument("--tag", default="", help="suffix of the result file: bench/results/linear_probe[-TAG].json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()

    recipe = load_recipe(args.recipe)
    cfg = TrainConfig(
        **{**recipe.train.model_dump(), "strategy": "linear_probe", "epochs": args.epochs, "mixed_precision": "no"}
    )
    source = load_source(recipe.source)
    data = prepare_data(recipe.data, source.preprocess, recipe.seed)
    accelerator = make_accelerator("no")
    sizes = data.splits.sizes()
    print(
        f"data {recipe.data.dataset}: {sizes}, {data.preprocess['input_size'][-1]} px; {args.epochs} epochs, "
        f"batch {cfg.batch_size}, lr {cfg.lr}, {torch.get_num_threads()} thread(s)",
        flush=True,
    )
    warm_up(source, data)

    names = ["cached", "frozen"] + ([] if args.no_diagnostics else ["cached@64"])
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        rec: dict[str, Any] = {"order": order}
        for name in order:
            if name == "frozen":
                rec[name] = frozen_side(source, data, cfg, recipe.seed, accelerator)
            else:
                rec[name] = cached_side(
                    source,
                    data,
                    cfg,
                    recipe.seed,
                    accelerator,
                    feature_batch=32 if name == "cached" else 64,
                    with_test=name == "cached",
                )
        t = time.perf_counter()
        gc.collect()  # what fit's final accelerator.free_memory() runs, once per fit call, on either side
        rec["gc_collect_s"] = time.perf_counter() - t
        rec["speedup_train"] = rec["frozen"]["train_s"] / rec["cached"]["train_s"]
        rec["speedup_total"] = rec["frozen"]["total_s"] / rec["cached"]["total_s"]
        if "cached@64" in rec:
            rec["speedup_train_features_at_64"] = rec["frozen"]["train_s"] / rec["cached@64"]["train_s"]
        rec["speedup_train_without_gc"] = (rec["frozen"]["train_s"] - rec["gc_collect_s"]) / (
            rec["cached"]["train_s"] - rec["gc_collect_s"]
        )
        rounds.append(rec)
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {rec[n]['train_s']:.2f} s" for n in names)
            + f"; speedup {rec['speedup_train']:.2f}x",
            flush=True,
        )

    def med(side: str, key: str) -> float:
        return median([rec[side][key] for rec in rounds])

    passes = {"cached": sizes["train"] + sizes["val"], "frozen": args.epochs * (sizes["train"] + sizes["val"])}
    c, f = rounds[0]["cached"], rounds[0]["frozen"]
    hist_diff = {
        k: max(abs(a[k] - b[k]) for a, b in zip(c["history"], f["history"]))
        for k in ("train_loss", "val_loss", "val_accuracy")
    }
    summary: dict[str, Any] = {
        "cached": {
            k: med("cached", k)
            for k in (
                "features_s",
                "head_fit_s",
                "train_s",
                "test_features_s",
                "test_eval_s",
                "total_s",
                "test_accuracy",
            )
        },
        "frozen": {k: med("frozen", k) for k in ("train_s", "test_eval_s", "total_s", "test_accuracy")},
        "speedup_train": median([rec["speedup_train"] for rec in rounds]),
        "speedup_total": median([rec["speedup_total"] for rec in rounds]),
        "accuracy_diff_points": 100 * abs(med("cached", "test_accuracy") - med("frozen", "test_accuracy")),
        "max_history_diff_round1": hist_diff,
        "best_epoch": {"cached": c["best_epoch"], "frozen": f["best_epoch"]},
        "backbone_passes_train_val": passes,
        "theoretical_speedup_train": passes["frozen"] / passes["cached"],
        "diagnostics": {
            "gc_collect_s": median([rec["gc_collect_s"] for rec in rounds]),
            "speedup_train_without_gc": median([rec["speedup_train_without_gc"] for rec in rounds]),
        },
    }
    s = summary
    rows = [
        [
            "cached (linear_probe)",
            passes["cached"],
            s["cached"]["features_s"],
            s["cached"]["head_fit_s"],
            s["cached"]["train_s"],
            s["speedup_train"],
            s["cached"]["test_features_s"] + s["cached"]["test_eval_s"],
            s["cached"]["total_s"],
            100 * s["cached"]["test_accuracy"],
        ],
        [
            "frozen backbone (fit)",
            passes["frozen"],
            "-",
            "-",
            s["frozen"]["train_s"],
            1.0,
            s["frozen"]["test_eval_s"],
            s["frozen"]["total_s"],
            100 * s["frozen"]["test_accuracy"],
        ],
    ]
    if "cached@64" in names:
        d = {k: med("cached@64", k) for k in ("features_s", "head_fit_s", "train_s")}
        s["diagnostics"]["cached_features_at_batch_32"] = d
        s["diagnostics"]["speedup_train_features_at_64"] = median([r["speedup_train_features_at_64"] for r in rounds])
        rows.append(
            [
                "diagnostic: cached, features at batch 64",
                passes["cached"],
                d["features_s"],
                d["head_fit_s"],
                d["train_s"],
                s["diagnostics"]["speedup_train_features_at_64"],
                "-",
                "-",
                "-",
            ]
        )
    headers = [
        "side",
        "backbone passes (train+val)",
        "features s",
        "head fit s",
        "train s",
        "speedup (train)",
        "test s",
        "total s",
        "test acc %",
    ]
    print()
    print(table(headers, rows))
    print(
        f"\nmedians over {args.rounds} interleaved round(s). speedup (train): {s['speedup_train']:.2f}x "
        f"(goal >= 8x, ceiling {s['theoretical_speedup_train']:.0f}x); speedup incl. test: "
        f"{s['speedup_total']:.2f}x; test accuracy difference: {s['accuracy_diff_points']:.2f} points "
        f"(goal <= 0.5); max per-epoch history difference (round 1): "
        + ", ".join(f"{k} {v:.2g}" for k, v in hist_diff.items())
    )
    print(
        f"diagnostics: gc.collect() (run by fit's accelerator.free_memory()) {s['diagnostics']['gc_collect_s']:.3f} "
        f"s; speedup with it taken off both sides {s['diagnostics']['speedup_train_without_gc']:.2f}x"
    )
    path = write_result(
        "linear_probe" + (f"-{args.tag}" if args.tag else ""),
        {
            "benchmark": "linear_probe",
            "args": {**vars(args), "recipe": str(args.recipe)},
            "machine": info,
            "data": sizes,
            "train_config": cfg.model_dump(),
            "goal": {
                "speedup": 8.0,
                "met_speedup": s["speedup_train"] >= 8.0,
                "accuracy_points": 0.5,
                "met_accuracy": s["accuracy_diff_points"] <= 0.5,
            },
            "summary": summary,
            "rounds": rounds,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
