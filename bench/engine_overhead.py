"""Overhead of the transferkit training loop (``transferkit.engine.loop.fit``) over a minimal PyTorch loop.

Both sides train the same model (EfficientNet-Lite0 ImageNet weights, new 10-class head, ``full`` strategy: all
weights trained, AdamW with the strategy's two learning rates and the same weight-decay groups) on the same data
(MNIST-5k images resized to ``--image-size``, transformed once and held in memory as a ``TensorDataset``, so data
loading is the same cheap path for both), batch size 32, ``make_accelerator("no")`` on CPU.

Each round trains a fresh copy of the same initial model for ``--steps`` optimizer steps with each loop; the order
inside a round alternates (plain, fit / fit, plain) and the reported number is the median over rounds of the
ratio transferkit / plain (steps per second; 1.0 = no overhead). Four timings per side:

- median step: the median time between consecutive optimizer steps (``fit``'s ``on_step`` and the plain loop
  record a timestamp after every step). The per-step cost of the loop itself, robust to bursts of another job.
- steady: from the end of the first step to the end of the last, per step (the mean of the same intervals).
- call: the whole call: optimizer construction, ``accelerator.prepare``, all steps and, for ``fit``, its end-of-epoch
  bookkeeping and its validation pass (on a deliberately tiny val set, ``--val-size`` examples).
- call-val: ``fit``'s call time minus its validation pass, timed separately right after (same model, same set).

``fit`` runs without ``paths`` (no metrics log, no checkpoint), as the Python API allows. A third side,
``fit+paths`` (skip it with ``--no-paths``), trains with ``JobPaths`` in a temporary folder, as ``transferkit run``
does: a metrics.jsonl line every ``log_every`` steps and a checkpoint at the end of the epoch.

Threads: ``--threads 1`` by default. On a 2-core machine shared with another CPU-heavy job, two intra-op threads
make single steps 10-30x slower at random (one OpenMP thread waits on its preempted sibling); one thread gives
stable timings. Per-step Python overhead is a constant, so at 2 threads (faster steps) the ratio would be
slightly lower than at 1; ``--threads 2`` measures that when the machine is quiet.

Layout: ``fit`` trains convolutional models with channels-last weights (``engine.loop.conv_layout``), so the plain
loop converts its model the same way and the ratio stays the loop's own overhead; ``--plain-default-layout``
keeps the plain loop in the default layout (the ratio then includes the layout's speed-up, bench/channels_last.py).

Run: ``python bench/engine_overhead.py`` (writes bench/results/engine_overhead.json).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFERKIT_PROGRESS", "0")

import torch
import torch.nn.functional as F
from common import machine, median, table, write_result
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transferkit.engine.loop import JobPaths, evaluate_model, fit, make_accelerator
from transferkit.pipeline import PreparedData, prepare_data
from transferkit.recipe import DataConfig, TrainConfig
from transferkit.sources import load_source
from transferkit.strategies import get_strategy
from transferkit.strategies.base import TrainPlan, apply_plan
from transferkit.transfer import build_target


def materialise(data: PreparedData, split: str, n: int) -> TensorDataset:
    """The first ``n`` examples of ``split``, transformed once, as in-memory tensors."""
    ds = data.dataset(split)
    xs, ys = zip(*(ds[i] for i in range(n)))
    return TensorDataset(torch.stack(xs), torch.stack(ys))


def param_groups(model: nn.Module, plan: TrainPlan, weight_decay: float) -> list[dict[str, Any]]:
    """The optimizer groups ``fit`` builds: per plan group, decayed matrices and non-decayed biases/norms."""
    params = dict(model.named_parameters())
    groups = []
    for g in plan.groups:
        groups += [
            {"params": [params[n] for n in g.params if params[n].ndim > 1], "lr": g.lr, "weight_decay": weight_decay},
            {"params": [params[n] for n in g.params if params[n].ndim <= 1], "lr": g.lr, "weight_decay": 0.0},
        ]
    return [g for g in groups if g["params"]]


def plain_loop(
    model: nn.Module,
    train_set: TensorDataset,
    plan: TrainPlan,
    cfg: TrainConfig,
    seed: int,
    stamps: list[float],
    channels_last: bool = True,
) -> float:
    """The minimal hand-written loop; returns the mean training loss (computed after the last timestamp)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(param_groups(model, plan, cfg.weight_decay))
    losses = []
    model.train()
    if channels_last:  # what fit does for a convolutional model (engine.loop.conv_layout): the same kernels
        model.to(memory_format=torch.channels_last)
    for x, y in DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
        stamps.append(time.perf_counter())
    return float(torch.stack(losses).mean())


def fit_loop(
    model: nn.Module,
    train_set: TensorDataset,
    val_set: TensorDataset,
    plan: TrainPlan,
    cfg: TrainConfig,
    seed: int,
    accelerator: Any,
    stamps: list[float],
    paths: JobPaths | None = None,
) -> float:
    """One epoch of ``transferkit.engine.loop.fit``; returns its mean training loss."""
    torch.manual_seed(seed)
    result = fit(
        model,
        train_set,
        val_set,
        cfg,
        plan,
        num_classes=10,
        seed=seed,
        accelerator=accelerator,
        paths=paths,
        on_step=lambda _: stamps.append(time.perf_counter()),
    )
    return float(result.history[-1]["train_loss"])


def timed(fn: Callable[[list[float]], float]) -> dict[str, float]:
    """Run one side; seconds for the whole call and per step in steady state (first step excluded)."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    loss = fn(stamps)
    call_s = time.perf_counter() - t0
    steps = len(stamps)
    step_s = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "steps": steps,
        "call_s": call_s,
        "steady_s_per_step": (stamps[-1] - stamps[0]) / (steps - 1),
        "median_step_s": median(step_s),
        "step_s": step_s,
        "first_step_s": stamps[0] - t0,
        "after_last_step_s": t0 + call_s - stamps[-1],
        "loss": loss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per side per round")
    ap.add_argument("--warmup-steps", type=int, default=5, help="untimed steps of each side before measuring")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--val-size", type=int, default=8, help="examples in fit's end-of-epoch validation pass")
    ap.add_argument("--lr", type=float, default=3e-3, help="head lr (the full strategy gives the backbone 0.1x)")
    ap.add_argument("--no-paths", action="store_true", help="skip the side that trains fit with log + checkpoint")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable under a concurrent job; 0 = torch's default)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after measuring, run fit (with paths) once under cProfile and print where it spends time",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--plain-default-layout",
        action="store_true",
        help="the plain loop keeps the default (NCHW) weight layout; fit still uses channels-last",
    )
    ap.add_argument("--tag", default="", help="suffix of the result file: bench/results/engine_overhead[-TAG].json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    n_train = args.steps * args.batch_size
    source = load_source("efficientnet_lite0")
    data = prepare_data(
        DataConfig(
            dataset="mnist5k",
            per_class=math.ceil(n_train / 10),
            val_per_class=math.ceil(args.val_size / 10),
            test_size=10,
            image_size=args.image_size,
        ),
        source.preprocess,
        args.seed,
    )
    train_set = materialise(data, "train", n_train)
    val_set = materialise(data, "val", args.val_size)
    warm_set = TensorDataset(*train_set[: args.warmup_steps * args.batch_size])

    initial = build_target(source, data.classes, seed=args.seed)
    strategy, options = get_strategy("full")
    plan = strategy.plan(initial, options, TrainConfig(lr=args.lr))
    apply_plan(initial, plan)
    cfg = TrainConfig(strategy="full", epochs=1, batch_size=args.batch_size, lr=args.lr, mixed_precision="no")
    accelerator = make_accelerator("no")
    tmp = Path(tempfile.mkdtemp(prefix="tk-bench-"))

    def side(name: str, ds: TensorDataset) -> Callable[[list[float]], float]:
        model = copy.deepcopy(initial)  # every side, every round starts from the same weights (copied untimed)
        if name == "plain":
            return lambda st: plain_loop(model, ds, plan, cfg, args.seed, st, not args.plain_default_layout)
        paths = None
        if name == "fit+paths":
            run = Path(tempfile.mkdtemp(dir=tmp))
            paths = JobPaths(run / "last.pt", run / "metrics.jsonl", "bench")
        return lambda st: fit_loop(model, ds, val_set, plan, cfg, args.seed, accelerator, st, paths)

    names = ["plain", "fit"] + ([] if args.no_paths else ["fit+paths"])
    for name in names:  # warm-up: allocator, thread pools, first-call costs of both paths
        timed(side(name, warm_set))

    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        rec: dict[str, Any] = {"order": order}
        for name in order:
            rec[name] = timed(side(name, train_set))
        model = copy.deepcopy(initial)
        t = time.perf_counter()
        evaluate_model(model, val_set, args.batch_size * 2, 10)  # what fit's end-of-epoch validation costs
        rec["val_pass_s"] = time.perf_counter() - t
        for name in names[1:]:
            rec[name]["call_minus_val_s"] = rec[name]["call_s"] - rec["val_pass_s"]
            rec[name]["ratio_steady"] = rec["plain"]["steady_s_per_step"] / rec[name]["steady_s_per_step"]
            rec[name]["ratio_median_step"] = rec["plain"]["median_step_s"] / rec[name]["median_step_s"]
            rec[name]["ratio_call"] = rec["plain"]["call_s"] / rec[name]["call_s"]
            rec[name]["ratio_call_minus_val"] = rec["plain"]["call_s"] / rec[name]["call_minus_val_s"]
        rounds.append(rec)
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {rec[n]['steps'] / rec[n]['call_s']:.2f} steps/s" for n in names),
            flush=True,
        )

    summary: dict[str, Any] = {}
    rows = []
    for name in names:
        steady = median([1.0 / rec[name]["steady_s_per_step"] for rec in rounds])
        call = median([rec[name]["steps"] / rec[name]["call_s"] for rec in rounds])
        s = {
            "steady_steps_per_s": steady,
            "call_steps_per_s": call,
            "first_step_s": median([rec[name]["first_step_s"] for rec in rounds]),
            "after_last_step_s": median([rec[name]["after_last_step_s"] for rec in rounds]),
            "final_loss": median([rec[name]["loss"] for rec in rounds]),
        }
        if name != "plain":
            for k in ("ratio_median_step", "ratio_steady", "ratio_call", "ratio_call_minus_val"):
                s[k] = median([rec[name][k] for rec in rounds])
        summary[name] = s
        rows.append(
            [
                name,
                steady,
                call,
                s["first_step_s"],
                s["after_last_step_s"],
                s.get("ratio_median_step", 1.0),
                s.get("ratio_steady", 1.0),
                s.get("ratio_call", 1.0),
                s.get("ratio_call_minus_val", 1.0),
            ]
        )
    headers = [
        "loop",
        "steady steps/s",
        "call steps/s",
        "1st step s",
        "after last step s",
        "ratio median step",
        "ratio steady",
        "ratio call",
        "ratio call-val",
    ]
    val_pass = median([rec["val_pass_s"] for rec in rounds])
    print()
    print(table(headers, rows))
    print(
        f"\nmedians over {args.rounds} interleaved rounds of {args.steps} steps (batch {args.batch_size}, "
        f"{args.image_size}px); ratio = transferkit / plain steps/s (goal >= 0.95); "
        f"fit's validation pass on {args.val_size} examples: {val_pass:.3f} s"
    )
    path = write_result(
        "engine_overhead" + (f"-{args.tag}" if args.tag else ""),
        {
            "benchmark": "engine_overhead",
            "args": vars(args),
            "machine": info,
            "val_pass_s": val_pass,
            "goal": {
                "ratio": 0.95,
                "met_steady": summary["fit"]["ratio_steady"] >= 0.95,
                "met_call_minus_val": summary["fit"]["ratio_call_minus_val"] >= 0.95,
            },
            "summary": summary,
            "rounds": rounds,
        },
    )
    print(f"wrote {path}")
    if args.profile:
        profile_fit(side("fit+paths", train_set))


def profile_fit(run: Callable[[list[float]], float]) -> None:
    """cProfile one ``fit`` call; print the loop's own costs (not the model's forward/backward)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(run, [])
    stats = pstats.Stats(prof).sort_stats("cumulative")
    print("\nfit under cProfile (cumulative s; forward/backward are the model's compute, the rest is loop cost):")
    stats.print_stats(
        r"loop\.py|objective|accelerate/(accelerator|optimizer)|lr_scheduler|gc\.collect|"
        r"serialization\.py:\d+\(save\)|io\.py|dataloader\.py:\d+\(__next__\)|tqdm",
        30,
    )


if __name__ == "__main__":
    main()
