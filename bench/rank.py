"""Ranking candidate sources vs fine-tuning them all: do the scores order them as fine-tuning does, at what cost?

Target: the demo recipe's data (``src/transferkit/recipes/demo.yaml``): MNIST-5k, 20 labelled images per class,
20 validation images per class, 1000 test images, 96 px. The split is the recipe's (seed 0) for every run, so
ranking and fine-tuning see the same examples; the fine-tuning seeds (0, 1, 2) change the new head's
initialisation, the data order and the augmentation.

Candidates that can be had offline:

- ``efficientnet_lite0``: EfficientNet-Lite0, ImageNet weights (1280-d features, 1000-class head);
- ``lite0[:blocks.4]`` and ``lite0[:blocks.2]``: the same network truncated after block 4 (112-d, stride 16) and
  after block 2 (40-d, stride 8), global-average-pooled, no classifier head (so no LEEP/NCE);
- ``efficientnet_lite0 (random init)``: the architecture with random weights (seeded; its random 1000-class head
  gives LEEP/NCE values too);
- ``digits0-4``: EfficientNet-Lite0 (ImageNet) fine-tuned by ``run_recipe`` (strategy ``full``) on MNIST digits
  0-4 only, drawn from the MNIST-5k images that the target split does not use (no overlap with the target's
  train, validation or test images); its 5-class head gives LEEP/NCE. A strongly related source, built here;
- ``lite0[:blocks.3]``, ``lite0[:blocks.5]``, ``lite0[:blocks.6]``: the other cuts (80-d, 192-d, 320-d);
- ``mnist1d (scratch)``: EfficientNet-Lite0 trained from random weights on MNIST-1D signals (the ``mnist1d``
  package's procedural data, ``pip install mnist1d``) drawn as 28 px strokes: pretrained on procedural data only,
  a 10-class head (LEEP/NCE). ``--first-five`` leaves these four out (the candidate set of the first tables); the
  result then has the correlations over all candidates and over the first five.

For each candidate: every score from ``rank_candidates`` (all 200 training examples, one forward pass), and the
test accuracy after fine-tuning with the recipe's default strategy (``full``, the recipe's optimizer settings,
``--epochs`` epochs) for each seed. Then, per score, Pearson and weighted Kendall's tau (``correlation``)
between the scores and the mean fine-tuned accuracies (goal: tau >= 0.6), and the cost ratio: the wall time of
fine-tuning every candidate once (training incl. per-epoch validation + test evaluation, the median over seeds)
over that of ranking them all (one ``rank_candidates`` call, data read included; the median of ``--rank-repeats``
calls) (goal >= 50x). Building the digits0-4 source is a one-off cost outside both sides, reported apart.

``--target text``: the text demo's data (``src/transferkit/recipes/demo_text.yaml``: Rotten Tomatoes fresh vs rotten,
100 labelled reviews per class, 50 per class validation, 2,000 test, 64 tokens), fine-tuned with that recipe's
strategy (``freeze``: embeddings and layer 0 frozen, the rest at lr x 0.01, 8 epochs). Candidates:

- ``all-minilm-l6-v2``: the sentence encoder (384-d, mean pooling; no classifier head);
- ``minilm[:2 layers]``: its embeddings and first 2 of 6 layers (the rest dropped), mean-pooled;
- ``minilm (random init)``: the same architecture with random weights (seeded);
- ``minilm+plot-vs-review``: MiniLM fine-tuned (``run_recipe``, strategy ``full``) to tell the corpus's plot
  summaries from review snippets (a related task on the same kind of text, a 2-class head: LEEP/NCE);
- ``minilm+sentiment``: MiniLM fine-tuned on fresh vs rotten reviews that are not in the target's split (the
  target's own task from other examples: the best source one could have, a 2-class head);
- ``minilm[:1 layers]``, ``minilm[:4 layers]``, ``minilm[:5 layers]``: the other cuts;
- ``minilm scratch+plot-vs-review``: the architecture trained from random weights on the plot-vs-review texts
  (a weakly pretrained encoder, a 2-class head). ``--first-five`` leaves these four out, as for images.

``--fewer-examples 100 50`` (the default) also ranks on that many training examples (``max_examples``, stratified),
timed the same way, and reports each one's correlations with the same fine-tuned accuracies and its cost ratio.

Run: ``python bench/rank.py`` (writes bench/results/rank.json); ``python bench/rank.py --target text --tag text``.
One torch (and BLAS) thread by default: stable
while another job shares the machine (see docs/benchmarks.md). ``--quick`` checks the code path in a few minutes
(1 seed, 1 epoch, a small source run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFERKIT_PROGRESS", "0")

import numpy as np
import torch
from common import machine, median, table, write_result
from PIL import Image, ImageDraw
from threadpoolctl import threadpool_limits
from torch import nn

from transferkit.data import read_dataset
from transferkit.data.text import rotten_tomatoes
from transferkit.demo import demo_recipe_path
from transferkit.models.vision import SourceModel
from transferkit.pipeline import PreparedData, evaluate, prepare_data, train
from transferkit.rank import Candidate, correlation, rank_candidates
from transferkit.rank.candidates import SCORE_NAMES
from transferkit.recipe import Recipe, TrainConfig, load_recipe
from transferkit.runner import run_recipe
from transferkit.sources import load_source
from transferkit.transfer import build_target

# ----------------------------------------------------------------------------------------------------------------
# Candidates


class TruncatedEfficientNet(nn.Module):
    """A timm EfficientNet cut after ``blocks[after]``, global-average-pooled: the earlier layers' features.

    Parameter names stay those of the whole network (``conv_stem``, ``bn1``, ``blocks.i...``), so the source's
    ``origin`` carries over.
    """

    def __init__(self, net: nn.Module, after: int):
        super().__init__()
        self.conv_stem, self.bn1 = net.conv_stem, net.bn1
        self.blocks = nn.Sequential(*list(net.blocks)[: after + 1])
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.bn1(self.conv_stem(x)))).flatten(1)


def truncated_lite0(after: int) -> SourceModel:
    """EfficientNet-Lite0 (ImageNet) truncated after ``blocks[after]``, without a classifier head."""
    source = load_source("efficientnet_lite0")
    backbone = TruncatedEfficientNet(source.backbone, after)
    width = backbone.blocks[-1][-1].conv_pwl.out_channels
    model = SourceModel(
        backbone,
        nn.Identity(),
        {**source.arch, "truncated_after_block": after},
        dict(source.preprocess),
        None,
        width,
        groups=source.groups,
    )  # the kept blocks' groups
    names = {f"backbone.{n}" for n in backbone.state_dict()}
    model.origin = {k: v for k, v in source.origin.items() if k in names}
    return model


def digits_source_folder(root: Path, exclude: np.ndarray, per_class: int, seed: int) -> Path:
    """MNIST-5k digits 0-4 not in ``exclude``, ``per_class`` of each, written as an image folder (PNG)."""
    images = read_dataset("mnist5k")
    rng = np.random.default_rng(seed)
    keep = np.setdiff1d(np.arange(len(images)), exclude)
    for digit in range(5):
        idx = rng.permutation(keep[images.labels[keep] == digit])[:per_class]
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
        for i in idx:
            Image.fromarray(images.items[i]).save(root / str(digit) / f"{i}.png")
    return root


def build_digits_source(work: Path, target: PreparedData, quick: bool) -> tuple[Path, dict[str, Any]]:
    """Fine-tune EfficientNet-Lite0 (ImageNet) on digits 0-4 with ``run_recipe`` (strategy full); the model folder."""
    used = np.concatenate([target.splits.train, target.splits.val, target.splits.test])
    per_class, val, test, epochs = (30, 5, 5, 1) if quick else (100, 10, 10, 8)
    folder = digits_source_folder(work / "digits0-4", used, per_class, seed=0)
    recipe = Recipe(
        name="digits0-4",
        seed=0,
        source="efficientnet_lite0",
        data={
            "dataset": str(folder),
            "per_class": per_class - val - test,
            "val_per_class": val,
            "test_size": 5 * test,
            "image_size": 96,
            "augment": {"rotation": 10, "translate": 0.1},
        },
        train={"strategy": "full", "epochs": epochs, "batch_size": 32, "lr": 0.003},
    )
    return train_source(recipe, work, 5 * (per_class - val - test), 5 * test)


def train_source(recipe: Recipe, work: Path, train_examples: int, test_examples: int) -> tuple[Path, dict[str, Any]]:
    """Run ``recipe`` (a source built here) under ``work``: its model folder, and what building it took."""
    t = time.perf_counter()
    run = run_recipe(recipe, out=work / f"{recipe.name}-run")
    seconds = time.perf_counter() - t
    metrics = json.loads((run / "metrics.json").read_text())
    model = metrics["models"][metrics["selected"]]
    info = {
        "train_examples": train_examples,
        "epochs": recipe.train.epochs,
        "seconds": seconds,
        "source_test_accuracy": model["test"]["accuracy"],
        "source_test_size": test_examples,
    }
    return run / "model", info


def render_signal(signal: np.ndarray, size: int = 28) -> Image.Image:
    """An MNIST-1D signal drawn as a white stroke on black, ``size`` px square (drawn 4x larger, then downsampled)."""
    big = 4 * size
    image = Image.new("L", (big, big), 0)
    xs = np.linspace(3, size - 4, len(signal)) * 4
    ys = np.clip((size / 2 - 2.3 * np.asarray(signal)) * 4, 8, (size - 3) * 4)
    ImageDraw.Draw(image).line(list(zip(xs.tolist(), ys.tolist())), fill=255, width=8, joint="curve")
    return image.resize((size, size), Image.Resampling.LANCZOS)


def mnist1d_folder(root: Path, per_class: int) -> Path:
    """MNIST-1D (Greydanus 2020; generated offline by the ``mnist1d`` package, its default arguments) drawn as
    28 px stroke images, ``per_class`` of each of its 10 classes, as an image folder."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())  # procedural and seeded: no download
    x, y = np.concatenate([data["x"], data["x_test"]]), np.concatenate([data["y"], data["y_test"]])
    for c in range(10):
        (root / f"m1d-{c}").mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(y == c)[:per_class]:
            render_signal(x[i]).save(root / f"m1d-{c}" / f"{i}.png")
    return root


def build_mnist1d_source(work: Path, quick: bool) -> tuple[Path, dict[str, Any]]:
    """EfficientNet-Lite0 trained from random weights (strategy ``scratch``) on drawn MNIST-1D signals: a source
    pretrained by transferkit on procedural data only, at 64 px to keep the one-off cost small."""
    per_class, val, test, epochs = (30, 5, 5, 1) if quick else (400, 20, 30, 12)
    folder = mnist1d_folder(work / "mnist1d", per_class)
    recipe = Recipe(
        name="mnist1d",
        seed=0,
        source="efficientnet_lite0",
        data={
            "dataset": str(folder),
            "per_class": per_class - val - test,
            "val_per_class": val,
            "test_size": 10 * test,
            "image_size": 64,
        },
        train={"strategy": "scratch", "epochs": epochs, "batch_size": 64, "lr": 0.003},
    )
    return train_source(recipe, work, 10 * (per_class - val - test), 10 * test)


FIRST_FIVE = (
    "efficientnet_lite0",
    "lite0[:blocks.4]",
    "lite0[:blocks.2]",
    "efficientnet_lite0 (random init)",
    "digits0-4",  # the candidates of the first tables in docs/benchmarks.md, image and text
    "all-minilm-l6-v2",
    "minilm[:2 layers]",
    "minilm (random init)",
    "minilm+plot-vs-review",
    "minilm+sentiment",
)


def candidates(models: dict[str, Path], more: bool = True) -> list[Candidate]:
    """The image candidates: the first five, and with ``more`` three other cuts and the MNIST-1D source."""
    random_spec = {"name": "efficientnet_lite0", "pretrained": False}
    out = [
        Candidate("efficientnet_lite0", lambda: load_source("efficientnet_lite0"), "efficientnet_lite0"),
        Candidate("lite0[:blocks.4]", lambda: truncated_lite0(4), "efficientnet_lite0 truncated after blocks.4"),
        Candidate("lite0[:blocks.2]", lambda: truncated_lite0(2), "efficientnet_lite0 truncated after blocks.2"),
        Candidate("efficientnet_lite0 (random init)", lambda: load_source(random_spec), random_spec),
        Candidate(
            "digits0-4", lambda: load_source(str(models["digits0-4"])), "efficientnet_lite0 fine-tuned on digits 0-4"
        ),
    ]
    if more:
        out += [
            Candidate(
                f"lite0[:blocks.{b}]", lambda b=b: truncated_lite0(b), f"efficientnet_lite0 truncated after blocks.{b}"
            )
            for b in (3, 5, 6)
        ]
        out.append(
            Candidate(
                "mnist1d (scratch)",
                lambda: load_source(str(models["mnist1d (scratch)"])),
                "efficientnet_lite0 trained from random weights on drawn MNIST-1D signals",
            )
        )
    return out


def truncated_minilm(layers: int) -> SourceModel:
    """all-minilm-l6-v2 keeping its embeddings and first ``layers`` transformer layers, mean-pooled."""
    source = load_source("all-minilm-l6-v2")
    bert = source.backbone.model
    bert.encoder.layer = bert.encoder.layer[:layers]
    bert.config.num_hidden_layers = layers
    source.arch = {**source.arch, "truncated_layers": layers}
    names = set(source.state_dict())
    source.origin = {k: v for k, v in source.origin.items() if k in names}
    return source


def text_source(
    work: Path, name: str, texts: list[str], labels: list[str], quick: bool, scratch: bool = False
) -> tuple[Path, dict]:
    """Fine-tune all-minilm-l6-v2 on ``texts`` (a CSV written under ``work``) with ``run_recipe``; the model folder.

    ``scratch``: train the same architecture from random weights instead (strategy ``scratch``, lr 5e-4).
    """
    import pandas as pd

    csv = work / f"{name}.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(csv, index=False)
    per_class, val, test, epochs = (40, 10, 10, 1) if quick else (400, 50, 100, 3)
    strategy = "scratch" if scratch else {"name": "full", "backbone_lr_scale": 0.05}
    recipe = Recipe(
        name=name,
        seed=0,
        source="all-minilm-l6-v2",
        data={
            "dataset": str(csv),
            "per_class": per_class,
            "val_per_class": val,
            "test_size": 2 * test,
            "max_length": 64,
        },
        train={"strategy": strategy, "epochs": epochs, "batch_size": 16, "lr": 0.0005 if scratch else 0.001},
    )
    return train_source(recipe, work, 2 * per_class, 2 * test)


def build_text_sources(
    work: Path, target: PreparedData, quick: bool, more: bool = True
) -> tuple[dict[str, Path], dict[str, Any]]:
    """The MiniLM sources built here, on Rotten Tomatoes texts outside the target's split: two fine-tuned, and with
    ``more`` the architecture trained from random weights on the plot-vs-review texts."""
    used = {str(t) for split in ("train", "val", "test") for t in as_list(target.items(split))}
    corpus = rotten_tomatoes(include_plot=True)
    rng = np.random.default_rng(0)
    texts = [str(t) for t in as_list(corpus.items)]
    names = np.asarray(corpus.classes)[corpus.labels]
    free = rng.permutation([i for i, t in enumerate(texts) if t not in used])
    plot = [i for i in free if names[i] == "plot"]
    reviews = [i for i in free if names[i] != "plot"]
    # plot vs review, then fresh vs rotten from the remaining reviews: the two sources share no review
    pvr = plot[:600] + reviews[:600]
    rest = reviews[600:]
    models, info = {}, {}
    models["minilm+plot-vs-review"], info["minilm+plot-vs-review"] = text_source(
        work,
        "plot-vs-review",
        [texts[i] for i in pvr],
        ["plot" if names[i] == "plot" else "review" for i in pvr],
        quick,
    )
    models["minilm+sentiment"], info["minilm+sentiment"] = text_source(
        work, "sentiment", [texts[i] for i in rest], [str(names[i]) for i in rest], quick
    )
    if more:
        models["minilm scratch+plot-vs-review"], info["minilm scratch+plot-vs-review"] = text_source(
            work,
            "scratch-plot-vs-review",
            [texts[i] for i in pvr],
            ["plot" if names[i] == "plot" else "review" for i in pvr],
            quick,
            scratch=True,
        )
    return models, info


def as_list(items: Any) -> list[Any]:
    """A list from a sequence that may be a lazy text column (indexable, with a length)."""
    return [items[i] for i in range(len(items))]


def text_candidates(models: dict[str, Path], more: bool = True) -> list[Candidate]:
    """The text candidates: the first five, and with ``more`` three other cuts and the source trained from scratch
    (``models`` holds the built sources)."""
    random_spec = {"name": "all-minilm-l6-v2", "pretrained": False}
    out = [
        Candidate("all-minilm-l6-v2", lambda: load_source("all-minilm-l6-v2"), "all-minilm-l6-v2"),
        Candidate("minilm[:2 layers]", lambda: truncated_minilm(2), "all-minilm-l6-v2, first 2 of 6 layers"),
        Candidate("minilm (random init)", lambda: load_source(random_spec), random_spec),
        *[
            Candidate(name, lambda p=path: load_source(str(p)), f"all-minilm-l6-v2 built here: {name}")
            for name, path in models.items()
        ],
    ]
    if more:
        out += [
            Candidate(
                f"minilm[:{k} layers]", lambda k=k: truncated_minilm(k), f"all-minilm-l6-v2, first {k} of 6 layers"
            )
            for k in (1, 4, 5)
        ]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning one candidate


def finetune(cand: Candidate, base: PreparedData, cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """``build_target`` + ``train`` (the recipe's strategy) + test evaluation; the source loaded as when ranked."""
    torch.manual_seed(0)  # the random-init candidate gets the weights it was ranked with (rank_candidates seeds 0)
    source = cand.load()
    pp = dict(source.preprocess)
    if base.modality == "text":
        pp["max_length"] = base.preprocess["max_length"]
    else:
        pp["input_size"] = [pp["input_size"][0], base.cfg.image_size, base.cfg.image_size]
    # the same split, the candidate's preprocessing (and tokenizer)
    data = dataclasses.replace(base, preprocess=pp, processor=source.processor)
    target = build_target(source, data.classes, seed=seed)
    target.preprocess = data.preprocess
    t0 = time.perf_counter()
    result = train(target, data, cfg, seed=seed)
    t1 = time.perf_counter()
    test = evaluate(target, data.dataset("test"), len(data.classes))
    t2 = time.perf_counter()
    return {
        "seed": seed,
        "test_accuracy": test["accuracy"],
        "val_accuracy": result["val"].get("accuracy"),
        "best_epoch": result["best_epoch"],
        "train_s": t1 - t0,
        "test_s": t2 - t1,
        "total_s": t2 - t0,
    }


def timed_ranking(
    recipe: Recipe, cands: list[Candidate], repeats: int, max_examples: int | None = None
) -> tuple[list[dict[str, Any]], list[float]]:
    """``rank_candidates`` on the recipe's data, ``repeats`` times: the last call's rows and every call's wall time."""
    rows, walls = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        rows = rank_candidates(recipe.data, cands, max_examples=max_examples, seed=recipe.seed)
        walls.append(time.perf_counter() - t)
    return rows, walls


def correlations(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per score, Pearson and weighted Kendall's tau against the mean fine-tuned accuracy, over the rows having it."""
    corr = {}
    for score in SCORE_NAMES:
        have = [row for row in rows if score in row["scores"]]
        if len(have) >= 2:
            corr[score] = {
                **correlation([row["scores"][score] for row in have], [row["test_accuracy_mean"] for row in have]),
                "n": len(have),
            }
    return corr


def correlation_table(corr: dict[str, dict[str, Any]]) -> str:
    """``correlations``' result as a table: score, n, Pearson, weighted Kendall's tau."""
    return table(
        ["score", "n", "pearson", "weighted Kendall tau"],
        [[s, v["n"], v["pearson"], v["weighted_kendall_tau"]] for s, v in corr.items()],
    )


def robustness(rows: list[dict[str, Any]], score: str = "logme") -> dict[str, Any]:
    """How much weighted tau of ``score`` depends on the seeds and on single candidates: tau against each seed's
    accuracies alone, and with each candidate left out in turn (over the mean accuracies)."""
    rows = [row for row in rows if score in row["scores"]]
    scores = [row["scores"][score] for row in rows]
    seeds = len(rows[0]["test_accuracy"])
    per_seed = [
        correlation(scores, [row["test_accuracy"][k] for row in rows])["weighted_kendall_tau"] for k in range(seeds)
    ]
    left_out = {
        row["candidate"]: correlation(
            [x["scores"][score] for x in rows if x is not row], [x["test_accuracy_mean"] for x in rows if x is not row]
        )["weighted_kendall_tau"]
        for row in rows
    }
    return {"score": score, "tau_per_seed": per_seed, "tau_leaving_one_out": left_out}


def report_robustness(path: Path) -> None:
    """Print (and add to the result file) ``robustness`` of LogME for a finished run's result."""
    result = json.loads(path.read_text())
    result["robustness"] = rob = robustness(result["candidates"])
    print(
        f"{path.name}: LogME weighted tau per seed {', '.join(f'{t:.3f}' for t in rob['tau_per_seed'])}; "
        f"leaving one candidate out {min(rob['tau_leaving_one_out'].values()):.3f} to "
        f"{max(rob['tau_leaving_one_out'].values()):.3f}"
    )
    for name, tau in rob["tau_leaving_one_out"].items():
        print(f"  without {name:<34} {tau:.3f}")
    path.write_text(json.dumps(result, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--target",
        choices=["image", "text"],
        default="image",
        help="image: MNIST-5k (demo.yaml); text: Rotten Tomatoes (demo_text.yaml)",
    )
    ap.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the demo recipe's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds")
    ap.add_argument("--strategy", help="train with this strategy instead of the recipe's (diagnostic: linear_probe)")
    ap.add_argument("--rank-repeats", type=int, default=3, help="rank_candidates calls timed (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (0: leave torch's default)")
    ap.add_argument("--quick", action="store_true", help="code-path check: 1 seed, 1 epoch, a small source run")
    ap.add_argument(
        "--fewer-examples",
        type=int,
        nargs="*",
        default=[100, 50],
        help="also rank (and time) on this many training examples, stratified (max_examples)",
    )
    ap.add_argument(
        "--first-five",
        action="store_true",
        help="only the five candidates of the first tables (no other cuts, no source trained from scratch)",
    )
    ap.add_argument("--tag", default="", help="suffix of the result file: bench/results/rank[-TAG].json")
    ap.add_argument(
        "--robustness",
        type=Path,
        metavar="RESULT_JSON",
        help="only analyse a finished run: LogME's tau per seed and leaving each candidate out",
    )
    args = ap.parse_args()
    if args.robustness:
        report_robustness(args.robustness)
        return
    if args.quick:
        args.epochs, args.seeds, args.rank_repeats = 1, [0], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        result = run(args)
    path = write_result("rank" + (f"-{args.tag}" if args.tag else ""), result)
    print(f"\nresult: {path}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    info = machine()
    recipe = load_recipe(demo_recipe_path(args.target))
    cfg = recipe.train.model_copy(
        update={
            **({"epochs": args.epochs} if args.epochs else {}),
            **({"strategy": args.strategy} if args.strategy else {}),
        }
    )
    source = load_source(recipe.source)
    base = prepare_data(recipe.data, source, recipe.seed)
    size = f"{recipe.data.max_length} tokens" if args.target == "text" else f"{recipe.data.image_size} px"
    print(
        f"target {recipe.data.dataset}: {base.splits.sizes()}, {size}; fine-tuning "
        f"'{cfg.strategy_name}' {cfg.epochs} epochs, lr {cfg.lr}, batch {cfg.batch_size}, seeds {args.seeds}; "
        f"{torch.get_num_threads()} thread(s)",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="tk-rank-bench-") as tmp:
        if args.target == "text":
            models, built = build_text_sources(Path(tmp), base, args.quick, more=not args.first_five)
            cands = text_candidates(models, more=not args.first_five)
        else:
            models, built = {}, {}
            models["digits0-4"], built["digits0-4"] = build_digits_source(Path(tmp), base, args.quick)
            if not args.first_five:
                models["mnist1d (scratch)"], built["mnist1d (scratch)"] = build_mnist1d_source(Path(tmp), args.quick)
            cands = candidates(models, more=not args.first_five)
        for name, b in built.items():
            print(
                f"{name} source: {b['train_examples']} examples, {b['epochs']} epochs, "
                f"{b['seconds']:.1f} s, its own test accuracy {b['source_test_accuracy']:.3f}",
                flush=True,
            )

        # ranking: the whole call (data read, every candidate's load, forward pass and scores), repeated
        ranked, rank_walls = timed_ranking(recipe, cands, args.rank_repeats)
        for r in ranked:
            assert r["status"] == "ok", r["error"]
        print(
            f"ranking all {len(cands)} candidates: {median(rank_walls):.2f} s (median of {len(rank_walls)})", flush=True
        )
        # the same ranking on fewer examples (stratified, rank_candidates' max_examples): cheaper, how much worse?
        fewer: dict[int, dict[str, Any]] = {}
        for n in args.fewer_examples:
            rows_n, walls = timed_ranking(recipe, cands, args.rank_repeats, max_examples=n)
            fewer[n] = {
                "rank_all_s": median(walls),
                "rank_walls_s": walls,
                "scores": {r["candidate"]: r["scores"] for r in rows_n},
            }
            print(f"ranking all {len(cands)} candidates on {n} examples: {median(walls):.2f} s", flush=True)

        # fine-tuning: seeds in the outer loop, so that a slow spell of the machine hits every candidate alike
        runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cands}
        for seed in args.seeds:
            for c in cands:
                res = finetune(c, base, cfg, seed)
                runs[c.name].append(res)
                print(
                    f"  seed {seed} {c.name:<34} test acc {res['test_accuracy']:.4f}  {res['total_s']:.1f} s",
                    flush=True,
                )

    by_name = {r["candidate"]: r for r in ranked}
    rows_out = []
    for c in cands:
        accs = [x["test_accuracy"] for x in runs[c.name]]
        r = by_name[c.name]
        rows_out.append(
            {
                "candidate": c.name,
                "spec": c.spec,
                "num_features": r["num_features"],
                "scores": r["scores"],
                "score_times": r["times"],
                "rank_by_logme": r["rank"],
                "test_accuracy": accs,
                "test_accuracy_mean": float(np.mean(accs)),
                "test_accuracy_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                "finetune_s_median": median([x["total_s"] for x in runs[c.name]]),
                "runs": runs[c.name],
            }
        )

    corr = correlations(rows_out)
    five = [row for row in rows_out if row["candidate"] in FIRST_FIVE]
    corr_five = correlations(five) if len(five) < len(rows_out) else None
    finetune_all = sum(row["finetune_s_median"] for row in rows_out)
    rank_all = median(rank_walls)
    for f in fewer.values():
        f["correlation"] = correlations([{**row, "scores": f["scores"][row["candidate"]]} for row in rows_out])
        f["cost_ratio"] = finetune_all / f["rank_all_s"]
    per_candidate_rank = {row["candidate"]: by_name[row["candidate"]]["times"]["total_s"] for row in rows_out}
    result = {
        "machine": info,
        "args": vars(args),
        "target": {"data": recipe.data.model_dump(), "splits": base.splits.sizes()},
        "train": cfg.model_dump(),
        "built_sources": built,
        "candidates": rows_out,
        "correlation": corr,
        "correlation_first_five": corr_five,
        "fewer_examples": fewer,
        "robustness": robustness(rows_out),
        "rank_all_s": rank_all,
        "rank_walls_s": rank_walls,
        "rank_per_candidate_s": per_candidate_rank,
        "finetune_all_s": finetune_all,
        "cost_ratio": finetune_all / rank_all,
        "cost_ratio_without_data_read": finetune_all / sum(per_candidate_rank.values()),
        "bench_total_s": time.perf_counter() - t_start,
    }

    headers = ["candidate", "D", *SCORE_NAMES, "rank s", "test acc (mean ± sd)", "fine-tune s"]
    rows = [
        [
            row["candidate"],
            row["num_features"],
            *[row["scores"].get(s, "-") for s in SCORE_NAMES],
            per_candidate_rank[row["candidate"]],
            f"{row['test_accuracy_mean']:.4f} ± {row['test_accuracy_sd']:.4f}",
            row["finetune_s_median"],
        ]
        for row in sorted(rows_out, key=lambda x: -x["test_accuracy_mean"])
    ]
    print()
    print(table(headers, rows))
    print()
    print(correlation_table(corr))
    if corr_five:
        print("\nthe first five candidates only:")
        print(correlation_table(corr_five))
    for n, f in fewer.items():
        print(f"\nranking on {n} examples: {f['rank_all_s']:.2f} s, cost ratio {f['cost_ratio']:.1f}x")
        print(correlation_table(f["correlation"]))
    print(
        f"\ncost: ranking all {rank_all:.2f} s vs fine-tuning all (once each) {finetune_all:.1f} s -> "
        f"{result['cost_ratio']:.1f}x ({result['cost_ratio_without_data_read']:.1f}x without the data read); "
        f"bench total {result['bench_total_s'] / 60:.1f} min"
    )
    return result


if __name__ == "__main__":
    main()
