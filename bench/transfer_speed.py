"""Time and memory of ``transfer`` vs a plain ``load_state_dict`` of the same tensors (issue 3's benchmark).

The pair: timm ``vit_base_patch16_224`` (86.6M parameters, random weights) as the target, and as the source a
second ViT-B's state_dict under other names: every key prefixed ``model.`` and ``blocks.N`` renamed ``layers.N``
(what a training framework's checkpoint of the same network looks like). Three ways to load it, in one process,
interleaved over ``--rounds`` rounds (medians reported):

- ``load_state_dict``: the baseline, ``target.load_state_dict`` of the same tensors under the target's own names
  (no matching at all: the floor);
- ``transfer (rule)``: ``transfer(source, target, rules=[{from: '^layers\\.', to: 'blocks.'}])``: ``model.``
  stripped by the names pass, the blocks found by the rule;
- ``transfer (structure)``: ``transfer(source, target, methods=["names", "structure"])``: no rule, the blocks found
  by the structural alignment of the 150 unmatched tensors.

Every ``transfer`` builds the whole report (a row per tensor). Memory: before each operation the process's peak
resident set (``VmHWM``) is reset to its current size (``/proc/self/clear_refs``, value 5); the peak after the
operation minus the resident set before it is the memory the operation added at its worst moment. The goal is at
most one extra copy of the largest tensor beyond the two models.

Run: ``python bench/transfer_speed.py`` (writes bench/results/transfer_speed.json; ~1 GB of memory, under a minute).
"""

from __future__ import annotations

import argparse
import gc
import re
import time
from pathlib import Path
from typing import Any

import torch
from common import machine, median, table, write_result

from transferkit.transfer.api import transfer

RULES = [{"from": r"^layers\.", "to": "blocks."}]


def _status(key: str) -> int:
    """A /proc/self/status memory figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measured(fn: Any) -> tuple[float, int]:
    """(seconds, peak resident bytes added) of ``fn()``."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, _status("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm architecture (default ViT-B/16)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    target = timm.create_model(args.model, pretrained=False)
    original = {k: v.detach().clone() for k, v in timm.create_model(args.model, pretrained=False).state_dict().items()}
    # the same tensors (no copy) under a checkpoint's names
    renamed = {"model." + re.sub(r"^blocks\.", "layers.", k): v for k, v in original.items()}
    params = sum(v.numel() for v in original.values())
    largest_name = max(original, key=lambda k: original[k].numel())
    largest = original[largest_name].numel() * original[largest_name].element_size()
    model_bytes = sum(v.numel() * v.element_size() for v in original.values())
    print(
        f"{args.model}: {params / 1e6:.1f}M parameters, {model_bytes / 2**20:.0f} MiB per copy; largest tensor "
        f"'{largest_name}' {tuple(original[largest_name].shape)} = {largest / 2**20:.1f} MiB; "
        f"{torch.get_num_threads()} torch threads"
    )

    def baseline() -> None:
        target.load_state_dict(original)

    def by_rule() -> None:
        _, report = transfer(renamed, target, rules=RULES)
        assert report["summary"]["coverage"] == 1.0, report["summary"]

    def by_structure() -> None:
        _, report = transfer(renamed, target, methods=["names", "structure"])
        assert report["summary"]["coverage"] == 1.0 and report["summary"]["ambiguities"] == 0, report["summary"]

    sides = {"load_state_dict": baseline, "transfer (rule)": by_rule, "transfer (structure)": by_structure}
    for fn in sides.values():  # warm-up: first-call imports and allocator growth are not what is measured
        fn()
    records: dict[str, list[tuple[float, int]]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate, so drift hits every side alike
        for name in order:
            records[name].append(measured(sides[name]))
    with torch.no_grad():  # the last load was a transfer: the target must hold exactly the source's tensors
        assert all(torch.equal(target.state_dict()[k], v) for k, v in original.items())

    base_s = median([s for s, _ in records["load_state_dict"]])
    rows, summary = [], {}
    for name in names:
        secs = median([s for s, _ in records[name]])
        peak = max(m for _, m in records[name])
        summary[name] = {
            "median_s": secs,
            "times_s": [s for s, _ in records[name]],
            "ratio": secs / base_s,
            "peak_added_bytes": peak,
            "peak_added_mib": peak / 2**20,
            "peak_added_in_largest_tensors": peak / largest,
        }
        rows.append([name, secs * 1000, secs / base_s, peak / 2**20, peak / largest])
    print()
    print(table(["side", "median ms", "ratio vs load_state_dict", "peak added MiB", "in largest tensors"], rows))
    worst = max(summary[n]["ratio"] for n in names if n != "load_state_dict")
    worst_mem = max(summary[n]["peak_added_bytes"] for n in names if n != "load_state_dict")
    print(
        f"\ngoals: time ratio <= 2 ({'met' if worst <= 2 else 'NOT met'}: worst {worst:.2f}); peak added memory <= "
        f"the largest tensor {largest / 2**20:.1f} MiB ({'met' if worst_mem <= largest else 'NOT met'}: worst "
        f"{worst_mem / 2**20:.1f} MiB); medians over {args.rounds} interleaved rounds"
    )
    path = write_result(
        "transfer_speed" + (f"-{args.tag}" if args.tag else ""),
        {
            "benchmark": "transfer_speed",
            "model": args.model,
            "params": params,
            "model_bytes": model_bytes,
            "largest_tensor": {"name": largest_name, "shape": list(original[largest_name].shape), "bytes": largest},
            "rounds": args.rounds,
            "sides": summary,
            "worst_ratio": worst,
            "worst_peak_added_bytes": worst_mem,
            "goals_met": {"time_ratio_le_2": worst <= 2, "memory_le_largest_tensor": worst_mem <= largest},
            "machine": machine(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
