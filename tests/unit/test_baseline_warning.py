"""select: a baseline that beats the selected model on validation is said plainly (log, metrics.json, report)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import tiny_text_folder, write_reviews

import transferkit as tk
from transferkit.recipe import load_recipe
from transferkit.stages.select import baseline_warnings


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tiny_text_folder(tmp_path_factory.mktemp("tiny_bert")))


def _text_recipe(tmp_path: Path, tiny_text: Path) -> dict[str, Any]:
    """A random 2-layer BERT trained one epoch at a negligible rate (chance level) against TF-IDF on reviews whose
    words decide the label: the baseline wins on validation."""
    data = write_reviews(tmp_path / "reviews.jsonl", "jsonl", text_column="review")
    return {
        "name": "text-baseline",
        "source": f"hf:{tiny_text}",
        "data": {
            "dataset": str(data),
            "text_column": "review",
            "per_class": 8,
            "val_per_class": 4,
            "test_size": 16,
            "max_length": 16,
        },
        "train": {"strategy": "linear_probe", "epochs": 1, "batch_size": 8, "lr": 1e-6},
        "baselines": ["tfidf"],
    }


def test_a_baseline_that_beats_the_selected_model_is_said_plainly(
    tiny_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tk.run_recipe(load_recipe(_text_recipe(tmp_path, tiny_text)), out=tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    model_val = metrics["models"]["linear_probe"]["val"]["accuracy"]
    tfidf_val = metrics["baselines"]["tfidf"]["val"]["accuracy"]
    assert tfidf_val > model_val  # the premise of the test
    assert metrics["selected"] == "linear_probe"  # still the selected model: a baseline is no model folder
    assert metrics["warnings"] == [
        {
            "warning": "baseline_beats_selected",
            "baseline": "tfidf",
            "selected": "linear_probe",
            "monitor": "val_accuracy",
            "baseline_value": tfidf_val,
            "selected_value": model_val,
            "message": metrics["warnings"][0]["message"],
        }
    ]
    message = metrics["warnings"][0]["message"]
    assert message.startswith(
        f"the baseline 'tfidf' beats the selected model 'linear_probe' on validation (val_accuracy {tfidf_val:.4f} "
        f"vs {model_val:.4f}). The run still saves 'linear_probe' as its model/, because a baseline is not a model "
        "folder"
    )
    assert "more labelled examples (data.per_class)" in message and "another source (rank: candidates)" in message
    assert f"WARNING: {message}" in capsys.readouterr().out.splitlines()
    html = (run / "report.html").read_text()
    assert '<p class="warning"><strong>Warning:</strong> the baseline &#x27;tfidf&#x27; beats' in html


def _ctx(monitor: str, model_val: dict[str, float], baselines: dict[str, Any]) -> Any:
    recipe = SimpleNamespace(train=SimpleNamespace(monitor=monitor))
    return SimpleNamespace(recipe=recipe, results={"full": {"val": model_val}}, sections={"baselines": baselines})


def test_no_warning_when_the_selected_model_is_as_good_or_there_is_no_baseline() -> None:
    val = {"accuracy": 0.75, "macro_f1": 0.7, "loss": 0.5}
    assert baseline_warnings(_ctx("val_accuracy", val, {"tfidf": {"val": {"accuracy": 0.75}}}), "full") == []
    assert baseline_warnings(_ctx("val_accuracy", val, {"tfidf": {"val": {"accuracy": 0.5}}}), "full") == []
    assert baseline_warnings(_ctx("val_accuracy", val, {}), "full") == []
    ctx = SimpleNamespace(recipe=_ctx("val_accuracy", val, {}).recipe, results={"full": {"val": val}}, sections={})
    assert baseline_warnings(ctx, "full") == []


def test_the_run_monitor_decides_and_loss_is_lower_is_better() -> None:
    val = {"accuracy": 0.75, "macro_f1": 0.6, "loss": 0.5}
    baseline = {"tfidf": {"val": {"accuracy": 0.7, "macro_f1": 0.65, "loss": 0.4}}}
    assert baseline_warnings(_ctx("val_accuracy", val, baseline), "full") == []
    (by_f1,) = baseline_warnings(_ctx("val_macro_f1", val, baseline), "full")
    assert (by_f1["monitor"], by_f1["baseline_value"], by_f1["selected_value"]) == ("val_macro_f1", 0.65, 0.6)
    (by_loss,) = baseline_warnings(_ctx("val_loss", val, baseline), "full")
    assert (by_loss["baseline_value"], by_loss["selected_value"]) == (0.4, 0.5)
    worse_loss = {"tfidf": {"val": {"loss": 0.9}}}
    assert baseline_warnings(_ctx("val_loss", val, worse_loss), "full") == []
