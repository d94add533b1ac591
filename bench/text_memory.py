"""Memory of reading a large text file: transferkit's memory-mapped reader vs loading the table with pandas.

Writes a Parquet file of N rows (default 1,000,000 reviews of ~120 characters, 2 labels), then in a fresh process
per method reads it and takes a few texts: ``transferkit`` (``read_text_file``: ``datasets`` memory-maps the Arrow
table; only the labels and row numbers are held in memory), once on a fresh ``datasets`` cache (the first read
converts the file into the cache) and once more (every later read), and ``pandas`` (``pd.read_parquet``: the whole
table in memory, as a plain loop would do). Reports, above a fresh Python with the same imports, the anonymous
memory held after the read (``RssAnon``: what cannot be given back; memory-mapped file pages are page cache the
kernel reclaims), and the process's peak resident memory (``ru_maxrss``, mapped pages included) next to its peak
after the imports alone.

Run: ``python bench/text_memory.py [--rows 1000000]`` (about a minute); results: bench/results/text_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result

CHILD = r"""
import json, re, resource, sys
mode, path = sys.argv[1], sys.argv[2]
import numpy as np, pandas as pd, datasets, pyarrow  # the same imports for every mode
from transferkit.data.text import read_text_file
def anon():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1))
base, base_anon = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, anon()
if mode.startswith("transferkit"):
    data = read_text_file(path, text_column="text", label_column="label")
    texts, n = [data.items[i] for i in range(0, len(data), len(data) // 32)], len(data)
elif mode == "pandas":
    frame = pd.read_parquet(path)
    texts, n = frame["text"].iloc[:: len(frame) // 32].tolist(), len(frame)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mode": mode, "rows": n, "sampled": len(texts), "held_mb": (anon() - base_anon) / 1024,
                  "process_peak_mb": peak / 1024, "imports_peak_mb": base / 1024}))
"""


def write_file(path: Path, rows: int) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    words = np.array("the a film movie great dull plot acting warm cold clever silly best worst fun slow".split())
    texts = [" ".join(rng.choice(words, 20)) for _ in range(rows)]
    pd.DataFrame({"text": texts, "label": rng.choice(["fresh", "rotten"], rows)}).to_parquet(path, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "texts.parquet"
        write_file(path, args.rows)
        size_mb = path.stat().st_size / 2**20
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf-cache"), "HF_HUB_OFFLINE": "1"}
        rows = []
        for mode in ("transferkit (first read)", "transferkit (cached)", "pandas"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(path)], env=env, check=True, capture_output=True, text=True
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    ratio = rows[2]["held_mb"] / max(rows[1]["held_mb"], 1e-9)
    result = {
        "machine": machine(),
        "rows": args.rows,
        "file_mb": size_mb,
        "results": rows,
        "pandas_over_transferkit_held": ratio,
    }
    path = write_result("text_memory", result)
    print(
        f"{args.rows:,} rows ({size_mb:.0f} MB Parquet), memory held after reading: "
        + ", ".join(
            f"{r['mode']} +{r['held_mb']:.0f} MB (process peak {r['process_peak_mb']:.0f} MB, imports "
            f"{r['imports_peak_mb']:.0f} MB)"
            for r in rows
        )
        + f"; pandas holds {ratio:.0f}x more than a cached transferkit read. Wrote {path}"
    )


if __name__ == "__main__":
    main()
