"""Helpers shared by the benchmarks: machine description, medians, result files and tables.

Every benchmark here reports ratios against a baseline measured in the same process, interleaved with it, so
that a second CPU-heavy job on the machine slows both sides alike and the ratio stays meaningful.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "gpu": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg": list(load) if load else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **code_version(),
    }


def code_version() -> dict[str, Any]:
    """The commit measured, and whether ``src/`` had uncommitted changes when the benchmark started."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "git_commit": git("rev-parse", "--short", "HEAD") or None,
        "src_uncommitted_changes": bool(git("status", "--porcelain", "--", "src")),
    }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/NAME.json`` (git-ignored) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (also readable in a terminal)."""

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def per_model_args(doc: str, images: int, repeats: int) -> Any:
    """Options of the per-model speed benchmarks (``--images --batch --repeats --threads``); sets torch's threads."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=images, help="images per pass (half at 224 px)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=repeats, help="interleaved pairs per model (median)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def measure_models(models: dict[str, tuple[Any, int]], measure: Any, args: Any, describe: Any) -> dict[str, Any]:
    """``measure(make, size, images, batch, repeats)`` for each ``name: (make, size)``, half the images at 224 px
    and more; prints ``name: describe(result)`` as each finishes."""
    results = {}
    for name, (make, size) in models.items():
        images = args.images if size < 200 else args.images // 2
        results[name] = r = measure(make, size, images, args.batch, args.repeats)
        print(f"{name}: {describe(r)}", flush=True)
    return results
