"""Compression and export: a trained model pruned (+ recovery), int8 for PyTorch, ONNX fp32 and ONNX int8.

Per seed, one run of the demo recipe (``--task image``: EfficientNet-Lite0 on MNIST-5k, 20 labelled and 20
validation images per class, 1,000 test images, 96 px; ``--task text``: all-MiniLM-L6-v2 on Rotten Tomatoes, 100
labelled and 50 validation reviews per class, 2,000 test reviews), without its comparisons, with three more stages
on its trained model:

- ``prune:`` to half the trained model's MACs (``macs:`` = 0.5 x its count on one input; magnitude importance,
  channel counts at multiples of 8; MiniLM: whole attention heads and FFN channels), then recovery by distillation
  from the trained model (kd, T 4, alpha 0.9) on the labelled split and the unlabelled pool (``data.unlabelled:
  rest``: the ~3,600 MNIST images outside the splits, 2,000 of the other reviews), the run's train settings with
  every layer trained (strategy ``full``, the backbone at the rate the run's strategy gives it);
- ``quantize:`` int8 for PyTorch (torchao; ``auto``: static for the conv net, dynamic for MiniLM);
- ``export:`` ONNX (checked against PyTorch on the validation split at export time) and its ONNX Runtime int8 copy
  (static QDQ per-channel, calibrated on training images; dynamic for MiniLM).

Accuracy is each model's on the run's test split (ONNX models run by ONNX Runtime). Latency: after the runs, the
five models are loaded in this process and timed interleaved (round robin) at batch 1 and batch 32 on validation
inputs, ``--threads`` torch and ONNX Runtime threads alike; medians. Parity: the export's own check (validation
split) and the fp32 ONNX against PyTorch eager on the whole test split.

Run: ``python bench/compress.py --task image --seeds 0 1 2`` and ``--task text``; results:
``bench/results/compress-TASK.json``; ``--out DIR`` keeps the run directories (a run there is continued).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result

from transferkit.compress.runtime import OnnxModule
from transferkit.demo import demo_recipe_path
from transferkit.engine.loop import make_loader
from transferkit.evaluation.cost import count_macs, count_params, latency_ms
from transferkit.io import read_json
from transferkit.models.base import load_model
from transferkit.recipe import load_recipe
from transferkit.runner import run_recipe

POOL = {"image": None, "text": 2000}  # unlabelled_max: the images outside the splits (~3,600), 2,000 reviews


def base_recipe(task: str, seed: int) -> dict[str, Any]:
    raw = yaml.safe_load(demo_recipe_path(task).read_text())
    raw["name"] = f"compress-{task}-seed{seed}"
    raw["seed"] = seed
    raw.pop("compare", None)
    raw.pop("baselines", None)
    raw["data"]["unlabelled"] = "rest"  # the recovery's pool; the splits are the demo's
    if POOL[task]:
        raw["data"]["unlabelled_max"] = POOL[task]
    return raw


def recovery(raw: dict[str, Any]) -> dict[str, Any]:
    """The recovery's settings: the run's own, every layer trained (``full``) with the backbone at the rate the
    run's strategy gives it (text: 0.01 x the head's; images: full's default 0.1)."""
    strategy = raw["train"]["strategy"]
    scale = strategy.get("backbone_lr_scale") if isinstance(strategy, dict) else None
    return {"strategy": {"name": "full", **({"backbone_lr_scale": scale} if scale else {})}}


def run_data(folder: Path, model: Any) -> Any:
    """A run's data as it split it (its recipe's ``data:`` and seed), with ``model``'s preprocessing."""
    from transferkit.config import DataConfig, read_yaml
    from transferkit.data import prepare_data

    raw = read_yaml(folder / "recipe.yaml")
    return prepare_data(DataConfig.model_validate(raw["data"]), model, int(raw.get("seed", 0)))


def _val_batch(data: Any, size: int) -> Any:
    """``size`` validation inputs of the run, batched as its model takes them."""
    subset = torch.utils.data.Subset(data.dataset("val"), list(range(size)))
    return next(iter(make_loader(subset, size)))[0]


def one_seed(task: str, seed: int, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    folder = out / f"{task}-seed{seed}"
    raw = base_recipe(task, seed)
    how: dict[str, Any] = {"from_run": folder} if (folder / "run.json").is_file() else {"out": folder}
    trained = run_recipe(load_recipe(raw), **how)
    main = raw["train"]["strategy"]["name"] if isinstance(raw["train"]["strategy"], dict) else raw["train"]["strategy"]
    model = load_model(trained / "models" / main)
    example = _val_batch(run_data(trained, model), 1)
    macs = count_macs(model, example)
    kd = {"name": "kd", "temperature": 4.0, "alpha": 0.9}  # bench/distill.py's settings
    raw["prune"] = {"model": main, "macs": 0.5 * macs, "recovery": recovery(raw), "distill": kd}
    raw["quantize"] = {"model": main, "method": "auto"}
    raw["export"] = {"model": main, "quantize": "int8"}
    done = run_recipe(load_recipe(raw), from_run=trained)
    metrics = read_json(done / "metrics.json")
    names = {
        "trained": ("models", main),
        "pruned": ("models", f"{main}-pruned"),
        "int8 pytorch": ("models", f"{main}-int8"),
        "onnx fp32": ("exports", f"{main}-onnx"),
        "onnx int8": ("exports", f"{main}-onnx-int8"),
    }
    row: dict[str, Any] = {"seed": seed, "rows": {}}
    for key, (where, name) in names.items():
        entry = metrics["models"][name] if where == "models" else metrics["exports"][name]
        row["rows"][key] = {"name": name, "test": entry["test"]["accuracy"], "val": entry["val"]["accuracy"]}
    pruned = metrics["models"][f"{main}-pruned"]["pruned"]
    row["pruned"] = {k: pruned[k] for k in ("macs_before", "macs_after", "params_before", "params_after")}
    row["pruned"]["before_recovery"] = pruned.get("before_recovery")
    row["export_check"] = {k: metrics["exports"][v[1]]["check"] for k, v in names.items() if v[0] == "exports"}
    row["wall_s"] = time.perf_counter() - t0
    row["folder"] = str(done)
    return row


def measure(task: str, row: dict[str, Any], threads: int, repeats: int) -> dict[str, Any]:
    """Parameters, MACs, file size and interleaved latency (batch 1, 32) of one seed's five models."""
    done = Path(row["folder"])
    torch.set_num_threads(threads)
    models: dict[str, Any] = {}
    for key, r in row["rows"].items():
        where = "exports" if key.startswith("onnx") else "models"
        f = done / where / r["name"]
        models[key] = OnnxModule(f, threads=threads) if where == "exports" else load_model(f)
        r["file_bytes"] = sum(p.stat().st_size for p in f.rglob("*") if p.suffix in (".onnx", ".safetensors"))
    data = run_data(done, models["trained"])
    one, many = _val_batch(data, 1), _val_batch(data, 32)
    for key in ("trained", "pruned"):
        row["rows"][key]["params"] = count_params(models[key])
        row["rows"][key]["macs"] = count_macs(models[key], one)
    for batch, example in (("1", one), ("32", many)):
        lat = latency_ms(models, dict.fromkeys(models, example), repeats=repeats if batch == "1" else repeats // 3)
        for key in models:
            row["rows"][key][f"latency_b{batch}_ms"] = lat[key]["median_ms"]
    trained = models["trained"]
    onnx = models["onnx fp32"]
    # parity of the fp32 ONNX against eager on the whole test split (the export's own check ran on validation)
    diffs, agree, n = [], 0, 0
    with torch.inference_mode():
        for x, _ in make_loader(data.dataset("test"), 64):
            a, b = trained.eval()(x), onnx(x)
            diffs.append(float((a - b).abs().max() / a.abs().max()))
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            n += len(a)
    row["test_parity"] = {"max_rel_diff": max(diffs), "top1_agreement": agree / n, "examples": n}
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, Any]:
        return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}

    out: dict[str, Any] = {}
    for key in rows[0]["rows"]:
        out[key] = {m: stats([r["rows"][key][m] for r in rows]) for m in ("test", "val")}
        for m in ("latency_b1_ms", "latency_b32_ms", "file_bytes"):
            out[key][m] = statistics.median(r["rows"][key][m] for r in rows)
    ratio = {  # each seed's ratio measured interleaved in one process, then the median over seeds
        "pruned_macs_reduction": [r["pruned"]["macs_before"] / r["pruned"]["macs_after"] for r in rows],
        "pruned_points_lost": [100 * (r["rows"]["trained"]["test"] - r["rows"]["pruned"]["test"]) for r in rows],
        "onnx_int8_speedup_b32": [
            r["rows"]["onnx fp32"]["latency_b32_ms"] / r["rows"]["onnx int8"]["latency_b32_ms"] for r in rows
        ],
        "onnx_int8_points_lost": [
            100 * (r["rows"]["onnx fp32"]["test"] - r["rows"]["onnx int8"]["test"]) for r in rows
        ],
        "onnx_fp32_speedup_b1": [
            r["rows"]["trained"]["latency_b1_ms"] / r["rows"]["onnx fp32"]["latency_b1_ms"] for r in rows
        ],
        "int8_pytorch_speedup_b32": [
            r["rows"]["trained"]["latency_b32_ms"] / r["rows"]["int8 pytorch"]["latency_b32_ms"] for r in rows
        ],
        "pruned_speedup_b32": [
            r["rows"]["trained"]["latency_b32_ms"] / r["rows"]["pruned"]["latency_b32_ms"] for r in rows
        ],
    }
    out["ratios"] = {k: {"values": v, "mean": statistics.mean(v)} for k, v in ratio.items()}
    out["parity"] = {
        "max_rel_diff": max(r["test_parity"]["max_rel_diff"] for r in rows),
        "top1_agreement": min(r["test_parity"]["top1_agreement"] for r in rows),
    }
    return out


def markdown(rows: list[dict[str, Any]], s: dict[str, Any]) -> str:
    lines = [
        "| model | test accuracy | val accuracy | params | MACs | file MB | latency b1 ms | latency b32 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = rows[0]["rows"]
    for key, st in s.items():
        if key in ("ratios", "parity"):
            continue
        params = first[key].get("params")
        macs = first[key].get("macs")
        lines.append(
            f"| {key} | {st['test']['mean']:.3f} ± {st['test']['sd']:.3f} | {st['val']['mean']:.3f} | "
            f"{f'{params / 1e6:.2f} M' if params else ''} | {f'{macs / 1e6:.1f} M' if macs else ''} | "
            f"{st['file_bytes'] / 1e6:.2f} | {st['latency_b1_ms']:.2f} | {st['latency_b32_ms']:.1f} |"
        )
    lines.append("")
    for k, v in s["ratios"].items():
        lines.append(f"- {k}: {v['mean']:.2f} (per seed {', '.join(f'{x:.2f}' for x in v['values'])})")
    p = s["parity"]
    lines.append(
        f"- ONNX fp32 vs eager on the test split: max rel diff {p['max_rel_diff']:.2e}, top-1 {p['top1_agreement']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["image", "text"], default="image")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--out", help="where the run directories go (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-compress-"))
    rows = []
    for seed in args.seeds:
        row = measure(args.task, one_seed(args.task, seed, out), args.threads, args.repeats)
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
    s = summary(rows)
    result = {"task": args.task, "machine": machine(), "args": vars(args), "rows": rows, "summary": s}
    print(markdown(rows, s))
    print(f"written: {write_result(f'compress-{args.task}', result)}")


if __name__ == "__main__":
    main()
