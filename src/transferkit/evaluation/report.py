"""A self-contained HTML report of a finished run.

``write_report(run_dir)`` reads ``run_dir/metrics.json`` (and ``run_dir/transfer_report.json`` when present) and
writes ``run_dir/report.html``: one file with inline CSS and figures embedded as base64 PNG data URIs, so it can be
mailed, archived or opened offline without any other file.

The page holds a header (run, source, data, selected model), a metrics table with one row per trained model, the
learning curves, the confusion matrix of the selected model and, when the run transferred weights, a summary of
which tensors were transferred and which were freshly initialised.

Every piece of text taken from the JSON files is escaped with ``html.escape``; the page is written as pure ASCII
(non-ASCII characters become character references), so it reads the same whatever the locale's encoding.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from transferkit.errors import DataError, DataNotFoundError

__all__ = ["write_report"]

REPORT_NAME = "report.html"
METRICS_NAME = "metrics.json"
TRANSFER_NAME = "transfer_report.json"
MISSING = "&mdash;"  # shown where a value is absent (already HTML, never escaped)
_MAX_ANNOTATED_CLASSES = 30  # above this many classes the confusion matrix cells carry no numbers

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.selected { background: #eaf6ea; font-weight: 600; }
.badge { display: inline-block; background: #2e7d32; color: #fff; border-radius: 3px; padding: 0 0.4em;
         font-size: 0.8em; font-weight: 600; margin-left: 0.4em; }
.meta th { width: 14em; }
.note { color: #666; font-style: italic; }
.warning { background: #fff4e5; border-left: 4px solid #e69500; padding: 0.5em 0.8em; }
.transferred { color: #2e7d32; } .fresh { color: #b26a00; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
details summary { cursor: pointer; margin: 0.4em 0; }
code { font-size: 0.9em; }
footer { margin-top: 2em; color: #888; font-size: 0.85em; }
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` from the run's ``metrics.json`` (and ``transfer_report.json`` if present).

    Args:
        run_dir: Folder of a finished run. It must hold ``metrics.json``; ``transfer_report.json`` is optional.

    Returns:
        The path of the written ``report.html``.

    Raises:
        DataNotFoundError: ``run_dir/metrics.json`` does not exist (a ``FileNotFoundError``).
        DataError: ``metrics.json`` (or ``transfer_report.json``) is not valid JSON or not a JSON object (a
            ``ValueError``).
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_NAME
    if not metrics_path.is_file():
        raise DataNotFoundError(
            f"cannot write a report: '{metrics_path}' does not exist. Point write_report at the folder of a "
            "finished run (the one holding metrics.json)."
        )
    metrics = _read_json_object(metrics_path)
    transfer_path = run_dir / TRANSFER_NAME
    transfer = _read_json_object(transfer_path) if transfer_path.is_file() else None

    page = _render_page(metrics, transfer)
    # Pure ASCII: non-ASCII characters become character references, so the default locale encoding is irrelevant.
    page = page.encode("ascii", "xmlcharrefreplace").decode("ascii")
    return _write_text_atomic(run_dir / REPORT_NAME, page)


# --------------------------------------------------------------------------------------------------- reading/writing


def _read_json_object(path: Path) -> dict[str, Any]:
    """Read ``path`` as JSON and check it is an object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"'{path}' is not valid JSON ({e}); re-run the evaluation to rewrite it.") from e
    if not isinstance(obj, dict):
        raise DataError(f"'{path}' must hold a JSON object, not {type(obj).__name__}.")
    return obj


def _write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    write_text: Callable[[str | Path, str], Path] | None
    try:
        from transferkit.io import write_text
    except ImportError:
        write_text = None
    if write_text is not None:
        return Path(write_text(path, text))

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------------------- formatting


def _esc(value: Any) -> str:
    """HTML-escape ``str(value)`` (quotes included)."""
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` when it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt_float(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals (``0.910``), or a dash when missing."""
    v = _num(value)
    return MISSING if v is None else f"{v:.{digits}f}"


def _fmt_int(value: Any) -> str:
    """An integer with thousands separators (``12,810``), or a dash when missing."""
    v = _num(value)
    return MISSING if v is None else f"{round(v):,}"


def _fmt_seconds(value: Any) -> str:
    """Seconds with one decimal (``3.2``), or a dash when missing."""
    return _fmt_float(value, 1)


def _get(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...`` or ``None`` as soon as a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _mpl_text(text: Any) -> str:
    """Text safe for a matplotlib label: ``$`` would otherwise start mathtext."""
    return str(text).replace("$", r"\$")


# ------------------------------------------------------------------------------------------------------------ page


def _render_page(metrics: Mapping[str, Any], transfer: Mapping[str, Any] | None) -> str:
    """The whole HTML document."""
    models = metrics.get("models")
    models = models if isinstance(models, Mapping) else {}
    selected = metrics.get("selected")
    run = metrics.get("run") or "run"

    sections = [
        _header_section(metrics, models),
        _warnings_section(metrics.get("warnings")),
        _metrics_section(models, selected),
        _baselines_section(metrics.get("baselines")),
        _tables_section(metrics.get("tables")),
        _curves_section(models),
        _confusion_section(metrics, models, selected),
    ]
    if transfer is not None:
        sections.append(_transfer_section(transfer))

    version = metrics.get("transferkit_version")
    footer = f"<footer>Generated by transferkit{' ' + _esc(version) if version else ''}.</footer>"
    body = "\n".join(s for s in sections if s)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>transferkit report: {_esc(run)}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>Run <code>{_esc(run)}</code></h1>\n"
        f"{body}\n{footer}\n</body>\n</html>\n"
    )


def _header_section(metrics: Mapping[str, Any], models: Mapping[str, Any]) -> str:
    """Run, source, data summary and the selected model."""
    data = metrics.get("data")
    data = data if isinstance(data, Mapping) else {}
    classes = data.get("classes")
    classes = classes if isinstance(classes, list) else []
    num_classes = data.get("num_classes", len(classes) if classes else None)

    rows: list[tuple[str, str]] = [
        ("Run", _esc(metrics["run"]) if metrics.get("run") else MISSING),
        ("Source", _esc(metrics["source"]) if metrics.get("source") else MISSING),
        ("Dataset", _esc(data["dataset"]) if data.get("dataset") else MISSING),
    ]
    classes_cell = _fmt_int(num_classes)
    if classes:
        shown = ", ".join(_esc(c) for c in classes[:50])
        more = f", &hellip; ({len(classes) - 50} more)" if len(classes) > 50 else ""
        classes_cell += f' <span class="note">({shown}{more})</span>'
    rows.append(("Classes", classes_cell))
    pretrain = metrics.get("pretrain")
    if isinstance(pretrain, Mapping):
        pre_classes = cast("list[Any]", pretrain.get("classes")) if isinstance(pretrain.get("classes"), list) else []
        rows.append(
            (
                "Source pretrained in this run",
                f"{_esc(pretrain.get('source', ''))} on {_esc(pretrain.get('dataset', ''))} "
                f"({len(pre_classes)} classes: {_esc(', '.join(map(str, pre_classes[:20])))}), test accuracy "
                f"{_fmt_float(_get(pretrain, 'test', 'accuracy'))}",
            )
        )

    splits = data.get("splits")
    if isinstance(splits, Mapping) and splits:
        rows.append(("Split sizes", ", ".join(f"{_esc(k)}: {_fmt_int(v)}" for k, v in splits.items())))
    if data.get("per_class") is not None:
        rows.append(("Labelled examples per class", _fmt_int(data.get("per_class"))))
    if data.get("image_size") is not None:
        rows.append(("Image size", _esc(data.get("image_size"))))
    if data.get("max_length") is not None:
        rows.append(("Tokens per text (max)", _esc(data.get("max_length"))))
    audio = data.get("audio")
    if isinstance(audio, Mapping):
        rows.append(
            (
                "Audio",
                f"{_esc(audio.get('sampling_rate'))} Hz; {_fmt_int(audio.get('resampled'))} file(s) "
                f"resampled (from {_esc(audio.get('resampled_from') or {})})",
            )
        )

    skipped = data.get("skipped")
    skipped = skipped if isinstance(skipped, list) else []
    rows.append(("Skipped (unreadable or empty)", _fmt_int(len(skipped))))

    selected = metrics.get("selected")
    if selected:
        sel = f"<code>{_esc(selected)}</code>"
        if selected not in models:
            sel += ' <span class="note">(not among the trained models)</span>'
        if metrics.get("selected_by"):
            sel += f" by <code>{_esc(metrics['selected_by'])}</code>"
    else:
        sel = MISSING
    rows.append(("Selected model", sel))
    total_s = _get(metrics, "timings", "total_s")
    if _num(total_s) is not None:
        rows.append(("Total time (s)", _fmt_seconds(total_s)))

    table = '<table class="meta">\n' + "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "\n</table>"
    parts = ["<h2>Summary</h2>", table]
    if skipped:
        items = []
        for entry in skipped:
            if isinstance(entry, Mapping):
                path, reason = _esc(entry.get("path", entry.get("item", ""))), _esc(entry.get("reason", ""))
                items.append(f"<tr><td><code>{path}</code></td><td>{reason}</td></tr>")
            else:
                items.append(f"<tr><td><code>{_esc(entry)}</code></td><td></td></tr>")
        parts.append(
            f"<details><summary>{len(skipped)} skipped item{'s' if len(skipped) != 1 else ''}</summary>\n"
            "<table>\n<tr><th>Item</th><th>Reason</th></tr>\n" + "\n".join(items) + "\n</table>\n</details>"
        )
    return "\n".join(parts)


_METRIC_COLUMNS = (
    "Model",
    "Strategy",
    "Test accuracy",
    "Test macro-F1",
    "Test loss",
    "Val accuracy",
    "Best epoch",
    "Epochs run",
    "Trainable params",
    "Train time (s)",
)


def _metrics_section(models: Mapping[str, Any], selected: Any) -> str:
    """One row per trained model; the selected model's row is marked."""
    if not models:
        return '<h2>Models</h2>\n<p class="note">No trained models in metrics.json.</p>'
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in _METRIC_COLUMNS) + "</tr>"
    rows = []
    for name, m in models.items():
        m = m if isinstance(m, Mapping) else {}
        is_sel = selected is not None and name == selected
        name_cell = f"<code>{_esc(name)}</code>" + ('<span class="badge">selected</span>' if is_sel else "")
        strategy = m.get("strategy")
        if m.get("from_scratch"):
            strategy = f"{strategy or ''} (from scratch)".strip()
        cells = [
            f"<td>{name_cell}</td>",
            f"<td>{_esc(strategy) if strategy else MISSING}</td>",
            f'<td class="num">{_fmt_float(_get(m, "test", "accuracy"))}</td>',
            f'<td class="num">{_fmt_float(_get(m, "test", "macro_f1"))}</td>',
            f'<td class="num">{_fmt_float(_get(m, "test", "loss"))}</td>',
            f'<td class="num">{_fmt_float(_get(m, "val", "accuracy"))}</td>',
            f'<td class="num">{_fmt_int(m.get("best_epoch"))}</td>',
            f'<td class="num">{_fmt_int(m.get("epochs_run"))}</td>',
            f'<td class="num">{_fmt_int(m.get("trainable_params"))}</td>',
            f'<td class="num">{_fmt_seconds(_get(m, "timing", "train_s"))}</td>',
        ]
        row_attr = ' class="selected"' if is_sel else ""
        rows.append(f"<tr{row_attr}>" + "".join(cells) + "</tr>")
    return "<h2>Models</h2>\n<table>\n" + head + "\n" + "\n".join(rows) + "\n</table>"


def _warnings_section(warnings: Any) -> str:
    """What the run warns about (``metrics.json`` ``warnings``, e.g. a baseline that beats the selected model)."""
    messages = [w.get("message") for w in warnings if isinstance(w, Mapping)] if isinstance(warnings, list) else []
    return "\n".join(f'<p class="warning"><strong>Warning:</strong> {_esc(m)}</p>' for m in messages if m)


def _baselines_section(baselines: Any) -> str:
    """Baselines computed on the same splits without the source (e.g. TF-IDF for text)."""
    if not isinstance(baselines, Mapping) or not baselines:
        return ""
    head = "<tr><th>Baseline</th><th>Method</th><th>Test accuracy</th><th>Test macro-F1</th><th>Val accuracy</th></tr>"
    rows = [
        f"<tr><td><code>{_esc(name)}</code></td><td>{_esc(b.get('method', ''))}</td>"
        f'<td class="num">{_fmt_float(_get(b, "test", "accuracy"))}</td>'
        f'<td class="num">{_fmt_float(_get(b, "test", "macro_f1"))}</td>'
        f'<td class="num">{_fmt_float(_get(b, "val", "accuracy"))}</td></tr>'
        for name, b in baselines.items()
        if isinstance(b, Mapping)
    ]
    return (
        '<h2>Baselines</h2>\n<p class="note">Same splits, no source model.</p>\n<table>\n'
        + head
        + "\n"
        + "\n".join(rows)
        + "\n</table>"
    )


def _tables_section(tables: Any) -> str:
    """Tables that stages add to a run (``metrics.json`` ``tables``: title, note, columns, rows), rendered as they
    come: a new stage shows its results here without a change to the report."""
    if not isinstance(tables, list):
        return ""
    out = []
    for t in tables:
        if not isinstance(t, Mapping) or not isinstance(t.get("columns"), list) or not isinstance(t.get("rows"), list):
            continue
        head = "<tr>" + "".join(f"<th>{_esc(c)}</th>" for c in t["columns"]) + "</tr>"

        def cell(v: Any) -> str:
            if isinstance(v, float):
                return f'<td class="num">{_fmt_float(v)}</td>'
            if isinstance(v, int) and not isinstance(v, bool):
                return f'<td class="num">{_fmt_int(v)}</td>'
            return f"<td>{_esc(v)}</td>"

        rows = ["<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in t["rows"] if isinstance(row, list)]
        note = f'<p class="note">{_esc(t["note"])}</p>\n' if t.get("note") else ""
        out.append(f"<h2>{_esc(t.get('title', ''))}</h2>\n{note}<table>\n{head}\n" + "\n".join(rows) + "\n</table>")
    return "\n".join(out)


def _curves_section(models: Mapping[str, Any]) -> str:
    """Train loss and validation accuracy per epoch, one line per model with a history."""
    series: dict[str, tuple[list[tuple[float, float]], list[tuple[float, float]]]] = {}
    for name, m in models.items():
        history = m.get("history") if isinstance(m, Mapping) else None
        if not isinstance(history, list):
            continue
        loss, acc = [], []
        for i, h in enumerate(history, start=1):
            if not isinstance(h, Mapping):
                continue
            epoch = _num(h.get("epoch"))
            epoch = float(i) if epoch is None else epoch
            if _num(h.get("train_loss")) is not None:
                loss.append((epoch, float(h["train_loss"])))
            if _num(h.get("val_accuracy")) is not None:
                acc.append((epoch, float(h["val_accuracy"])))
        if loss or acc:
            series[str(name)] = (loss, acc)
    if not series:
        return '<h2>Learning curves</h2>\n<p class="note">No model has a per-epoch history.</p>'
    without = [str(n) for n in models if str(n) not in series]
    note = ""
    if without:
        note = f'<p class="note">No history for: {", ".join(f"<code>{_esc(n)}</code>" for n in without)}.</p>'
    png = _learning_curves_png(series)
    return (
        "<h2>Learning curves</h2>\n"
        f'<img alt="Training loss and validation accuracy per epoch" src="data:image/png;base64,{png}">\n{note}'
    )


def _confusion_section(metrics: Mapping[str, Any], models: Mapping[str, Any], selected: Any) -> str:
    """The confusion matrix of the selected model (rows = true class, columns = predicted class)."""
    title = "<h2>Confusion matrix</h2>"
    if selected is None or selected not in models:
        return f'{title}\n<p class="note">No selected model, so no confusion matrix.</p>'
    matrix = _get(models[selected], "test", "confusion")
    rows = _as_square_matrix(matrix)
    if rows is None:
        return f'{title}\n<p class="note">No confusion matrix recorded for <code>{_esc(selected)}</code>.</p>'
    classes = _get(metrics, "data", "classes")
    labels = [str(c) for c in classes] if isinstance(classes, list) and len(classes) == len(rows) else None
    if labels is None:
        labels = [str(i) for i in range(len(rows))]
    png = _confusion_png(rows, labels, str(selected))
    return (
        f"{title}\n<p>Model <code>{_esc(selected)}</code> on the test split; rows are the true class, columns "
        "the predicted class.</p>\n"
        f'<img alt="Confusion matrix of {_esc(selected)}" src="data:image/png;base64,{png}">'
    )


def _as_square_matrix(matrix: Any) -> list[list[float]] | None:
    """``matrix`` as a square list of lists of numbers, or ``None`` when it is not one."""
    if not isinstance(matrix, Sequence) or isinstance(matrix, str) or not matrix:
        return None
    n = len(matrix)
    rows: list[list[float]] = []
    for row in matrix:
        if not isinstance(row, Sequence) or isinstance(row, str) or len(row) != n:
            return None
        values = [_num(v) for v in row]
        if any(v is None for v in values):
            return None
        rows.append([float(v) for v in values])  # type: ignore[arg-type]
    return rows


def _transfer_section(transfer: Mapping[str, Any]) -> str:
    """Counts of transferred vs fresh tensors and parameters, and a collapsible table of every tensor."""
    summary = transfer.get("summary")
    summary = summary if isinstance(summary, Mapping) else {}
    tensors = transfer.get("tensors")
    tensors = [t for t in tensors if isinstance(t, Mapping)] if isinstance(tensors, list) else []

    n_tensors = summary.get("tensors", len(tensors) if tensors else None)
    n_transferred = summary.get("transferred")
    n_fresh = summary.get("fresh")
    if n_transferred is None and tensors:
        n_transferred = sum(t.get("status") == "transferred" for t in tensors)
    if n_fresh is None and tensors:
        n_fresh = sum(t.get("status") == "fresh" for t in tensors)
    coverage = _num(summary.get("coverage"))

    rows = [
        ("Source", _esc(transfer["source"]) if transfer.get("source") else MISSING),
        ("Target", _esc(transfer["target"]) if transfer.get("target") else MISSING),
        ("Tensors", _fmt_int(n_tensors)),
        ("Transferred tensors", _fmt_int(n_transferred)),
        ("Fresh tensors", _fmt_int(n_fresh)),
        ("Transferred parameters", _fmt_int(summary.get("params_transferred"))),
        ("Fresh parameters", _fmt_int(summary.get("params_fresh"))),
        ("Coverage (share of parameters transferred)", MISSING if coverage is None else f"{coverage:.1%}"),
    ]
    table = '<table class="meta">\n' + "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "\n</table>"
    parts = ["<h2>Weight transfer</h2>", table]
    if tensors:
        body = []
        for t in tensors:
            status = str(t.get("status", ""))
            css = status if status in ("transferred", "fresh") else ""
            shape = t.get("shape")
            shape_txt = "&times;".join(_esc(s) for s in shape) if isinstance(shape, list) else _esc(shape or "")
            origin = t.get("from") if status == "transferred" else None
            origin_cell = f"<code>{_esc(origin)}</code>" if origin else _esc(t.get("reason") or t.get("from") or "")
            body.append(
                f"<tr><td><code>{_esc(t.get('name', ''))}</code></td><td>{shape_txt}</td>"
                f'<td class="{css}">{_esc(status)}</td><td>{origin_cell}</td>'
                f"<td>{_esc(t.get('transform', ''))}</td></tr>"
            )
        parts.append(
            f"<details><summary>All {len(tensors)} tensors</summary>\n<table>\n"
            "<tr><th>Tensor</th><th>Shape</th><th>Status</th><th>From / reason</th><th>Transform</th></tr>\n"
            + "\n".join(body)
            + "\n</table>\n</details>"
        )
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------- figures


def _figure_png(fig: Any) -> str:
    """Render ``fig`` to PNG and return the base64 text."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """A standalone ``Figure`` (drawn by Agg on save) and its axes: no pyplot, so no global backend change and
    nothing left open in a notebook that calls this."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(*args, **kwargs)


def _learning_curves_png(series: Mapping[str, tuple[list[tuple[float, float]], list[tuple[float, float]]]]) -> str:
    """Two panels: train loss per epoch and validation accuracy per epoch, one line per model."""
    fig, (ax_loss, ax_acc) = _subplots(1, 2, figsize=(11, 4))
    for name, (loss, acc) in series.items():
        label = _mpl_text(name)
        if loss:
            ax_loss.plot([e for e, _ in loss], [v for _, v in loss], marker="o", markersize=3, label=label)
        if acc:
            ax_acc.plot([e for e, _ in acc], [v for _, v in acc], marker="o", markersize=3, label=label)
    ax_loss.set_title("Training loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_acc.set_title("Validation accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    return _figure_png(fig)


def _confusion_png(rows: list[list[float]], labels: list[str], model: str) -> str:
    """Heatmap of the confusion matrix with class labels on both axes and the count in each cell."""
    n = len(rows)
    side = min(max(4.5, 0.55 * n + 2.5), 24.0)
    fig, ax = _subplots(figsize=(side + 1.0, side))
    image = ax.imshow(rows, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = list(range(n))
    tick_labels = [_mpl_text(lbl) for lbl in labels]
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    long_labels = max((len(lbl) for lbl in labels), default=0) > 3
    ax.set_xticklabels(tick_labels, rotation=45 if long_labels else 0, ha="right" if long_labels else "center")
    ax.set_yticklabels(tick_labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix: {_mpl_text(model)}")
    if n <= _MAX_ANNOTATED_CLASSES:
        peak = max((v for row in rows for v in row), default=0.0)
        fontsize = 10 if n <= 12 else 8 if n <= 20 else 6
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                text = f"{int(v)}" if float(v).is_integer() else f"{v:.2f}"
                color = "white" if peak > 0 and v > peak / 2 else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)
    fig.tight_layout()
    return _figure_png(fig)
