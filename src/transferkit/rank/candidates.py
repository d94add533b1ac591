"""Rank candidate sources for a target dataset: one forward pass each, then transferability scores.

``rank_candidates`` reads and splits the target data once, then for each candidate: loads it (``load_source``),
runs its backbone once, in eval mode, over at most ``max_examples`` labelled training examples (with the
candidate's own preprocessing, as ``prepare_data`` would give it), and computes every score that applies:
LogME, H-score and its shrinkage form from the features; LEEP and NCE from the source classifier's
probabilities ``softmax(head(features))`` when the source has a classifier head. The features are those
``pipeline.feature_cache`` computes for the ``train`` split (same preprocessing, eval mode, ``compute_features``),
so with ``max_examples`` unset a later linear probe of the winner can reuse them (``return_features=True``).

Candidates that preprocess alike (the same preprocessing settings, or the same tokenizer object) share the
preprocessed examples: they are read and transformed once per ranking (``_SharedInputs``).

A candidate that fails (it does not load, its forward pass raises, or its features hold NaN) is ranked last,
marked ``failed`` with the reason; the others are still ranked. Problems of the data itself (one class only,
fewer examples than classes) raise ``DataError`` before any candidate is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from transferkit.errors import DataError
from transferkit.rank.scores import check_features, check_labels, hscore, hscore_shrinkage, leep, logme, nce
from transferkit.registry import Registry

# ----------------------------------------------------------------------------------------------------------------
# Scores and what each needs


@dataclass(frozen=True)
class Score:
    """A transferability score and its input: backbone features, source probabilities or source predictions."""

    fn: Callable[..., float]
    needs: Literal["features", "source_probs", "source_preds"]


SCORES: Registry[Score] = Registry("score")
SCORE_NAMES = ("logme", "leep", "nce", "hscore", "hscore_shrinkage")  # computed, and shown, in this order
SCORES.register("logme", help="LogME (You et al. 2021): max log evidence of a linear model on the features")(
    Score(logme, "features")
)
SCORES.register("leep", help="LEEP (Nguyen et al. 2020): needs a source classifier head")(Score(leep, "source_probs"))
SCORES.register("nce", help="NCE (Tran et al. 2019): needs a source classifier head")(Score(nce, "source_preds"))
SCORES.register("hscore", help="H-score (Bao et al. 2019); degenerate (C - 1) when examples <= feature dims")(
    Score(hscore, "features")
)
SCORES.register("hscore_shrinkage", help="H-score with Ledoit-Wolf shrinkage (Ibrahim et al. 2022)")(
    Score(hscore_shrinkage, "features")
)


# ----------------------------------------------------------------------------------------------------------------
# Candidates


@dataclass
class Candidate:
    """A source to rank: a display name and how to load it.

    Args:
        name: shown in the ranking.
        load: returns the ``SourceModel`` (backbone, head, preprocess), e.g. ``lambda: load_source(spec)``.
        spec: a JSON-able description kept in the result (the source spec, or what was built).
    """

    name: str
    load: Callable[[], Any]
    spec: Any = None


def as_candidate(candidate: Any) -> Candidate:
    """A ``Candidate`` from a source spec (``str``, ``{name, pretrained, weights}``, ``SourceSpec``) or itself."""
    if isinstance(candidate, Candidate):
        return candidate
    from transferkit.sources import _as_spec, load_source

    spec = _as_spec(candidate)
    name = spec.name + ("" if spec.pretrained else " (random init)") + (f" ({spec.weights})" if spec.weights else "")
    return Candidate(name, lambda: load_source(spec), spec.model_dump())


# ----------------------------------------------------------------------------------------------------------------
# Ranking


def select_examples(labels: np.ndarray, max_examples: int | None, seed: int) -> np.ndarray:
    """Positions of at most ``max_examples`` examples, stratified: classes take turns (seeded order within each).

    All positions, in order, when ``max_examples`` is None or covers them all (then the features equal the
    ``train`` entry of ``feature_cache``). Returned sorted.
    """
    labels = np.asarray(labels)
    if max_examples is None or max_examples >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    turn = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        turn[rng.permutation(idx)] = np.arange(len(idx))  # the k-th pick of class c is taken in round k
    order = np.lexsort((labels, turn))
    return np.sort(order[:max_examples])


def _prepare(data: Any, seed: int) -> Any:
    """A ``PreparedData`` from a dataset spec, a ``DataConfig`` or itself (the split depends on cfg and seed)."""
    from transferkit.config import DataConfig
    from transferkit.data import PreparedData, dataset_modality, prepare_data

    if isinstance(data, PreparedData):
        return data
    cfg = DataConfig(dataset=data) if isinstance(data, str) else data
    # each candidate's own preprocessing replaces this placeholder in _for_source; only the modality is read here
    modality = dataset_modality(cfg.dataset, cfg.text_column)
    placeholder = {"modality": modality, "max_length": 128, "input_size": [3, 224, 224]}
    return prepare_data(cfg, placeholder, seed)


def _for_source(data: Any, model: Any) -> Any:
    """The same examples and split with a candidate's preprocessing and tokenizer (and the data config's changes,
    the image size or token length, as ``prepare_data`` makes them)."""
    from transferkit.data.prepare import adjusted_preprocess

    modality = model.preprocess.get("modality", "image")
    if modality != data.modality:
        raise DataError(f"the target data is {data.modality} but this source takes {modality} inputs")
    pp = adjusted_preprocess(model.preprocess, data.cfg)
    return dataclasses.replace(data, preprocess=pp, processor=model.processor)


class _Inputs(torch.utils.data.Dataset):
    """The chosen examples of a dataset, preprocessed once, for every candidate with the same preprocessing.

    Keeps the dataset's ``collate`` (text pads each batch) and ``lengths`` (text is batched by length).
    """

    def __init__(self, dataset: Any, positions: np.ndarray) -> None:
        self.items = [dataset[int(i)] for i in positions]
        if hasattr(dataset, "collate"):
            self.collate = dataset.collate
        if hasattr(dataset, "lengths"):
            lengths = np.asarray(dataset.lengths())[positions]
            self.lengths = lambda: lengths

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class _SharedInputs:
    """Preprocessed inputs by preprocessing: candidates that preprocess alike (most ImageNet models: 224 px, the
    same mean and std; or the same tokenizer object) read and transform the examples once per ranking, not once
    each (docs/benchmarks.md: a tenth of a small candidate's time). Entries larger than ``max_bytes`` are not kept
    (the next candidate preprocesses again)."""

    def __init__(self, max_bytes: int = 1 << 29) -> None:
        self.entries: dict[str, tuple[_Inputs, Any]] = {}
        self.max_bytes = max_bytes

    def get(self, data: Any, positions: np.ndarray) -> _Inputs:
        import json

        # the processor object itself is part of the key (and kept alive, so that its id is not reused)
        key = json.dumps([data.modality, data.preprocess, id(data.processor)], sort_keys=True, default=str)
        if key in self.entries:
            return self.entries[key][0]
        inputs = _Inputs(data.dataset("train"), positions)
        if _nbytes(inputs.items) <= self.max_bytes:
            self.entries[key] = (inputs, data.processor)
        return inputs


def _nbytes(items: list[Any]) -> int:
    """Bytes of the tensors and arrays in a list of (inputs, label) items (nested dicts, lists, tuples)."""

    def size(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            return x.element_size() * x.nelement()
        if isinstance(x, np.ndarray):
            return x.nbytes
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        if isinstance(x, list | tuple):
            return sum(size(v) for v in x)
        return 8

    return sum(size(item) for item in items)


def _has_classifier(model: Any) -> bool:
    head = getattr(model, "head", None)
    return isinstance(head, nn.Module) and any(isinstance(m, nn.Linear) for m in head.modules())


def rank_candidates(
    data: Any,
    candidates: Sequence[Any],
    max_examples: int | None = None,
    score: str = "logme",
    seed: int = 0,
    *,
    batch_size: int = 32,
    device: Any = "cpu",
    return_features: bool = False,
) -> list[dict[str, Any]]:
    """Score each candidate source on the target's labelled training examples; best first.

    Args:
        data: the target: a dataset spec (``mnist5k``, an image folder, a CSV manifest), a ``DataConfig`` (its
            split, ``per_class`` and ``image_size`` apply) or a ``PreparedData``.
        candidates: source specs (as ``load_source`` takes them) or ``Candidate`` objects.
        max_examples: use at most this many training examples (stratified over classes); all when None.
        score: the score to sort by (``SCORES``: logme, leep, nce, hscore, hscore_shrinkage).
        seed: fixes the split (as in a recipe), the choice of examples, and random initialisations.
        batch_size: forward-pass batch (see ``compute_features`` for the default).
        device: where the forward passes run.
        return_features: keep each candidate's features under ``row["features"] = {"train": tensor}`` (the
            ``feature_cache`` format) and the chosen positions in the train split under ``row["example_positions"]``.

    Returns:
        One dict per candidate, sorted by ``score`` (descending); candidates without that score (LEEP/NCE of a
        source without a classifier head) come next, failed ones last. Each holds ``rank``, ``candidate``,
        ``spec``, ``status`` ("ok" or "failed"), ``error`` (the reason, naming the candidate), ``scores``
        (name -> float), ``skipped`` (score -> why not computed), ``times`` (seconds: ``load_s``, ``features_s``,
        ``head_s``, one ``NAME_s`` per score, ``total_s``), ``num_examples``, ``num_features``, ``source_classes``.

    Raises:
        DataError: the data has one class only, or ``max_examples`` is below the number of classes.
        UnknownNameError: ``score`` is not a known score.
    """
    from transferkit.engine.features import compute_features

    SCORES.get(score)  # an unknown score name fails before any work, listing the choices
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be >= 1, got {max_examples}")
    prepared = _prepare(data, seed)
    num_classes = len(prepared.classes)
    train_labels = prepared.examples.labels[prepared.splits.train]
    if max_examples is not None and max_examples < num_classes:
        raise DataError(
            f"max_examples={max_examples} is fewer than the {num_classes} classes of "
            f"'{prepared.cfg.dataset}': ranking needs at least one example per class (use at least "
            f"{num_classes}, better several per class)"
        )
    positions = select_examples(train_labels, max_examples, seed)
    labels = train_labels[positions]
    check_labels(labels, num_classes=num_classes)  # one class only / a class without examples: before any loading

    shared = _SharedInputs()
    with _blas_threads(torch.get_num_threads()):
        rows = [
            _score_candidate(
                as_candidate(c),
                prepared,
                positions,
                labels,
                num_classes,
                seed,
                batch_size,
                device,
                return_features,
                compute_features,
                shared,
            )
            for c in candidates
        ]
    return sort_rows(rows, score)


def _blas_threads(n: int) -> Any:
    """Hold NumPy's BLAS to torch's thread count while scoring.

    The scores' SVDs are small (N x D, N a few hundred): on a shared machine two BLAS threads can be a hundred
    times slower than one (threads spin waiting for a preempted sibling; docs/benchmarks.md), the same effect
    bench/ notes for torch. One knob, ``torch.set_num_threads``, sets both.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with scikit-learn; without it BLAS keeps its own setting
        return contextlib.nullcontext()
    return threadpool_limits(limits=max(1, n), user_api="blas")


def _score_candidate(
    cand: Candidate,
    prepared: Any,
    positions: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    seed: int,
    batch_size: int,
    device: Any,
    return_features: bool,
    compute_features: Callable[..., torch.Tensor],
    shared: _SharedInputs,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "candidate": cand.name,
        "spec": cand.spec,
        "status": "ok",
        "error": None,
        "scores": {},
        "skipped": {},
        "times": {},
        "num_examples": len(positions),
        "num_features": None,
        "source_classes": None,
    }
    t_start = time.perf_counter()
    try:
        t = time.perf_counter()
        torch.manual_seed(seed)  # a source without pretrained weights is initialised reproducibly
        model = cand.load()
        row["times"]["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        dataset = shared.get(_for_source(prepared, model), positions)
        feats = compute_features(
            model.backbone, dataset, batch_size=batch_size, device=device, desc=f"features {cand.name}"
        )
        row["times"]["features_s"] = time.perf_counter() - t
        row["num_features"] = int(feats.shape[1])
        inputs: dict[str, Any] = {"features": check_features(feats.numpy())}  # NaN features: the candidate fails
        no_probs = "the source has no classifier head"
        if _has_classifier(model):
            t = time.perf_counter()
            try:
                with torch.no_grad():
                    logits = model.head.eval().to(device)(feats.to(device))
                probs = torch.softmax(logits.double(), dim=1).cpu().numpy()
                inputs["source_probs"], inputs["source_preds"] = probs, probs.argmax(axis=1)
                row["source_classes"] = int(probs.shape[1])
            except RuntimeError as e:  # e.g. a head for other features than the backbone gives: skip LEEP/NCE
                no_probs = f"the source head cannot be applied to the features: {e}"
            row["times"]["head_s"] = time.perf_counter() - t
        if return_features:
            row["features"] = {"train": feats}
            row["example_positions"] = positions
    except Exception as e:  # any failure of one candidate must not stop the ranking of the others
        return _failed(row, cand, e, t_start)
    for name in SCORE_NAMES:
        needs = SCORES.get(name).needs
        if needs not in inputs:
            row["skipped"][name] = no_probs
            continue
        t = time.perf_counter()
        try:
            row["scores"][name] = SCORES.get(name).fn(inputs[needs], labels, num_classes=num_classes)
        except DataError as e:  # NaN features and the like: the candidate's output, not the data, is at fault
            return _failed(row, cand, e, t_start)
        except Exception as e:  # a score that breaks on these features fails this candidate, not the ranking
            return _failed(row, cand, e, t_start, f"score '{name}' failed on its features: ")
        row["times"][f"{name}_s"] = time.perf_counter() - t
    row["times"]["total_s"] = time.perf_counter() - t_start
    return row


def _failed(row: dict[str, Any], cand: Candidate, e: Exception, t_start: float, what: str = "") -> dict[str, Any]:
    row.update(status="failed", error=f"candidate '{cand.name}': {what}{type(e).__name__}: {e}", scores={})
    row.pop("features", None)
    row.pop("example_positions", None)
    row["times"]["total_s"] = time.perf_counter() - t_start
    return row


def sort_rows(rows: list[dict[str, Any]], score: str) -> list[dict[str, Any]]:
    """Best ``score`` first; then rows without that score; failed rows last. Sets ``rank`` (1-based)."""

    def key(r: dict[str, Any]) -> tuple[int, float]:
        if r["status"] != "ok":
            return (2, 0.0)
        if score not in r["scores"]:
            return (1, 0.0)
        return (0, -r["scores"][score])

    out = sorted(rows, key=key)  # stable: ties keep the order the candidates were given in
    for i, r in enumerate(out):
        r["rank"] = i + 1
    return out
