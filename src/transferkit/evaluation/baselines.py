"""Baselines computed in the same run, on the same splits, without the source model.

``tfidf`` (text): TF-IDF over word 1-2-grams + logistic regression, its regularisation chosen on the validation
split. It answers the first question about a text transfer: does the pretrained encoder beat a bag of words?
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from transferkit.evaluation.metrics import classification_metrics
from transferkit.registry import Registry

BASELINES: Registry[Callable[[Any], dict[str, Any]]] = Registry("baseline")
TFIDF_C = (0.1, 1.0, 10.0, 100.0)


def _texts(data: Any, split: str) -> list[str]:
    return [str(t) for t in data.items(split)]


def reads(*modalities: str) -> Callable[[Callable[[Any], dict[str, Any]]], Callable[[Any], dict[str, Any]]]:
    """Declare the modalities a baseline reads; data of another modality is refused with an error naming both."""

    def declare(baseline: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
        name = baseline.__name__.removesuffix("_baseline")

        @functools.wraps(baseline)
        def checked(data: Any) -> dict[str, Any]:
            if data.modality not in modalities:
                raise ValueError(
                    f"the {name} baseline needs {' or '.join(modalities)} data; this run's data is {data.modality}"
                )
            return baseline(data)

        return checked

    return declare


@BASELINES.register("tfidf", help="text: TF-IDF word 1-2-grams + logistic regression (C chosen on validation)")
@reads("text")
def tfidf_baseline(data: Any) -> dict[str, Any]:
    """Fit on the training split, pick ``C`` by validation accuracy, report validation and test metrics."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    labels = {s: data.examples.labels[getattr(data.splits, s)] for s in ("train", "val", "test")}
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x_train = vectorizer.fit_transform(_texts(data, "train"))
    x_val, x_test = vectorizer.transform(_texts(data, "val")), vectorizer.transform(_texts(data, "test"))
    num_classes = len(data.classes)

    def scores(clf: Any, x: Any, y: np.ndarray) -> dict[str, Any]:
        proba = np.zeros((x.shape[0], num_classes))
        proba[:, clf.classes_] = clf.predict_proba(x)
        logits = torch.log(torch.as_tensor(proba).clamp(min=1e-12))
        return classification_metrics(logits, torch.as_tensor(y), num_classes)

    best: tuple[float, float, Any] | None = None
    for c in TFIDF_C:
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, labels["train"])
        acc = scores(clf, x_val, labels["val"])["accuracy"] if len(labels["val"]) else 0.0
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    assert best is not None
    _, c, clf = best
    return {
        "method": "TF-IDF (word 1-2-grams, sublinear tf) + logistic regression",
        "C": c,
        "features": int(x_train.shape[1]),
        "val": scores(clf, x_val, labels["val"]),
        "test": scores(clf, x_test, labels["test"]),
        "train_s": time.perf_counter() - t0,
    }


def run_baselines(names: list[str], data: Any) -> dict[str, dict[str, Any]]:
    """Each named baseline's result on ``data``'s splits."""
    return {name: BASELINES.get(name)(data) for name in names}
