"""Tests of the HTML run report (``transferkit.evaluation.report.write_report``)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from transferkit.evaluation.report import write_report

PNG_RE = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def _history(epochs: int, start_loss: float, final_acc: float) -> list[dict[str, Any]]:
    return [
        {
            "epoch": e,
            "train_loss": start_loss / e,
            "val_loss": start_loss / e + 0.1,
            "val_accuracy": final_acc * e / epochs,
            "val_macro_f1": final_acc * e / epochs - 0.01,
            "lr": 0.001,
            "time_s": 0.5,
        }
        for e in range(1, epochs + 1)
    ]


def _metrics(with_history: bool = True) -> dict[str, Any]:
    classes = ["cat", "dog", "<b>bird</b>"]
    return {
        "run": "demo",
        "source": "efficientnet_lite0",
        "selected": "full",
        "selected_by": "val_accuracy",
        "transferkit_version": "0.1.0",
        "data": {
            "dataset": "pets3",
            "classes": classes,
            "num_classes": len(classes),
            "splits": {"train": 60, "val": 30, "test": 30},
            "per_class": 20,
            "image_size": 96,
            "skipped": [{"path": "dog/broken.jpg", "reason": "cannot identify image file"}],
        },
        "models": {
            "linear_probe": {
                "strategy": "linear_probe",
                "from_scratch": False,
                "test": {"accuracy": 0.91, "macro_f1": 0.9, "loss": 0.3, "n": 30},
                "val": {"accuracy": 0.9, "macro_f1": 0.9, "loss": 0.33, "n": 30},
                "best_epoch": 4,
                "epochs_run": 5,
                "history": _history(5, 2.0, 0.9) if with_history else None,
                "timing": {"train_s": 3.2, "features_s": 10.1, "test_s": 0.4},
                "trainable_params": 3843,
                "total_params": 3400000,
            },
            "full": {
                "strategy": "full_finetune",
                "from_scratch": False,
                "test": {
                    "accuracy": 0.9567,
                    "macro_f1": 0.95,
                    "loss": 0.2,
                    "n": 30,
                    "confusion": [[10, 0, 0], [1, 9, 0], [0, 0, 10]],
                },
                "val": {"accuracy": 0.966, "macro_f1": 0.96, "loss": 0.15, "n": 30},
                "best_epoch": 6,
                "epochs_run": 8,
                "history": _history(8, 1.5, 0.97),
                "timing": {"train_s": 12.5},
                "trainable_params": 3400000,
                "total_params": 3400000,
            },
        },
        "timings": {"total_s": 120.0},
    }


def _transfer() -> dict[str, Any]:
    return {
        "source": "efficientnet_lite0",
        "target": "tf_efficientnet_lite0 + linear head (3 classes)",
        "summary": {
            "tensors": 298,
            "transferred": 245,
            "fresh": 53,
            "params_transferred": 3371984,
            "params_fresh": 12810,
            "coverage": 0.996,
        },
        "tensors": [
            {
                "name": "backbone.conv_stem.weight",
                "shape": [32, 3, 3, 3],
                "status": "transferred",
                "from": "efficientnet_lite0:_conv_stem.weight",
                "transform": "copied",
            },
            {"name": "head.weight", "shape": [3, 1280], "status": "fresh", "reason": "new head for 3 target classes"},
        ],
    }


def _write_run(run_dir: Path, metrics: dict[str, Any], transfer: dict[str, Any] | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if transfer is not None:
        (run_dir / "transfer_report.json").write_text(json.dumps(transfer))
    return run_dir


def _selected_row(page: str) -> str:
    rows = re.findall(r'<tr class="selected">.*?</tr>', page, flags=re.DOTALL)
    assert len(rows) == 1, rows
    return rows[0]


def _meta_cell(page: str, header: str) -> str:
    """The value cell of the summary-table row headed ``header`` (exactly one such row)."""
    cells = re.findall(rf"<tr><th>{re.escape(header)}</th><td>(.*?)</td></tr>", page)
    assert len(cells) == 1, (header, cells)
    return cells[0]


def test_report_contents(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run", _metrics())
    out = write_report(run_dir)

    assert out == run_dir / "report.html"
    assert out.is_file()
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    # no temporary file left behind by the atomic write
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json", "report.html"]

    # every model with its test accuracy, three decimals
    for name in ("linear_probe", "full"):
        assert name in page
    assert "0.910" in page
    assert "0.957" in page
    assert "3,843" in page  # trainable params with a thousands separator

    # header: source, dataset, class count, splits, skipped image and its reason, selection
    assert "efficientnet_lite0" in page
    assert "pets3" in page
    assert "dog/broken.jpg" in page and "cannot identify image file" in page
    assert "val_accuracy" in page

    # the selected model's row is marked, and only that row
    row = _selected_row(page)
    assert "<code>full</code>" in row and 'class="badge">selected<' in row
    assert "linear_probe" not in row

    # learning curves and confusion matrix as embedded PNGs
    pngs = PNG_RE.findall(page)
    assert len(pngs) >= 2
    img = Image.open(io.BytesIO(base64.b64decode(pngs[0])))
    assert img.format == "PNG"
    assert img.width > 200
    assert Image.open(io.BytesIO(base64.b64decode(pngs[1]))).width > 200

    # no external assets
    assert 'src="http' not in page and "<link" not in page and "<script" not in page

    # no transfer_report.json -> no transfer section
    assert "Weight transfer" not in page


def test_html_special_characters_are_escaped(tmp_path: Path) -> None:
    metrics = _metrics()
    metrics["models"]["<b>evil</b> & co"] = metrics["models"].pop("linear_probe")
    metrics["run"] = 'run "<script>alert(1)</script>"'
    out = write_report(_write_run(tmp_path / "run", metrics))
    page = out.read_text()

    assert "<b>evil</b>" not in page
    assert "&lt;b&gt;evil&lt;/b&gt; &amp; co" in page
    assert "<b>bird</b>" not in page  # class name
    assert "&lt;b&gt;bird&lt;/b&gt;" in page
    assert "<script>" not in page
    assert "&lt;script&gt;" in page


def test_missing_optional_parts(tmp_path: Path) -> None:
    metrics = _metrics(with_history=False)
    del metrics["models"]["linear_probe"]["history"]
    del metrics["models"]["full"]["test"]["confusion"]
    del metrics["models"]["full"]["timing"]
    del metrics["data"]["skipped"]
    del metrics["timings"]
    out = write_report(_write_run(tmp_path / "run", metrics))
    page = out.read_text()

    assert "linear_probe" in page and "full" in page
    assert "0.910" in page
    assert "No confusion matrix recorded" in page
    assert "No history for" in page  # linear_probe has no history; full still has its curves
    assert len(PNG_RE.findall(page)) == 1


def test_minimal_metrics(tmp_path: Path) -> None:
    """Only the bare minimum: a model with no history, no confusion matrix, no data block."""
    metrics = {"run": "tiny", "models": {"m": {"test": {"accuracy": 0.5}}}}
    page = write_report(_write_run(tmp_path / "run", metrics)).read_text()
    assert "0.500" in page
    assert "No model has a per-epoch history" in page
    assert "data:image/png;base64," not in page


def test_transfer_summary(tmp_path: Path) -> None:
    out = write_report(_write_run(tmp_path / "run", _metrics(), _transfer()))
    page = out.read_text()

    assert "Weight transfer" in page
    # each count in its own cell of the summary table (the page's base64 images hold any short digit string)
    assert _meta_cell(page, "Tensors") == "298"
    assert _meta_cell(page, "Transferred tensors") == "245"
    assert _meta_cell(page, "Fresh tensors") == "53"
    assert _meta_cell(page, "Transferred parameters") == "3,371,984"
    assert _meta_cell(page, "Fresh parameters") == "12,810"
    assert _meta_cell(page, "Coverage (share of parameters transferred)") == "99.6%"
    assert "<details>" in page and "All 2 tensors" in page
    assert "backbone.conv_stem.weight" in page
    assert "efficientnet_lite0:_conv_stem.weight" in page
    assert "new head for 3 target classes" in page
    assert "32&times;3&times;3&times;3" in page


def test_rewrite_replaces_existing_report(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run", _metrics())
    (run_dir / "report.html").write_text("stale")
    page = write_report(str(run_dir)).read_text()
    assert "stale" not in page and "linear_probe" in page


def test_missing_metrics_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        write_report(tmp_path)


def test_invalid_metrics_raises(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_tables_added_by_stages_are_rendered_escaped(tmp_path: Path) -> None:
    """A stage's results reach the report as a table (title, note, columns, rows) with no change to the report."""
    metrics = _metrics()
    metrics["tables"] = [
        {
            "title": "Evaluation on <shifted>",
            "note": "30 examples",
            "columns": ["model", "accuracy", "n"],
            "rows": [["full", 0.8125, 30], ["<b>x</b>", 0.5, 2]],
        },
        {"title": "a malformed table", "columns": "not a list", "rows": []},
    ]
    page = write_report(_write_run(tmp_path / "run", metrics)).read_text()
    assert "<h2>Evaluation on &lt;shifted&gt;</h2>" in page and "30 examples" in page
    assert "<tr><th>model</th><th>accuracy</th><th>n</th></tr>" in page
    assert '<tr><td>full</td><td class="num">0.812</td><td class="num">30</td></tr>' in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert "a malformed table" not in page
