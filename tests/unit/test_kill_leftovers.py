"""What a killed process can leave behind, read by the next command: a log line cut short, and a half-built model
folder under its temporary name (``.NAME.RANDOM``) before a resume removes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from transferkit.engine.loop import JobPaths, _drop_log_lines_after
from transferkit.errors import RunDirError
from transferkit.io import is_temporary, write_json
from transferkit.predict import _multi_task_models
from transferkit.tts.voice import VOICE_JSON, resolve_voice


def _paths(tmp_path: Path, text: str) -> JobPaths:
    log = tmp_path / "metrics.jsonl"
    log.write_text(text)
    return JobPaths(checkpoint=tmp_path / "checkpoints" / "a" / "last.pt", metrics_log=log, job="a")


def test_a_log_line_cut_short_is_dropped_on_resume(tmp_path: Path) -> None:
    lines = [json.dumps({"job": "a", "step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    lines.append(json.dumps({"job": "b", "step": 1, "loss": 0.5}))
    paths = _paths(tmp_path, "\n".join(lines) + '\n{"job": "a", "step": 4, "lo')  # killed mid-append
    _drop_log_lines_after(paths, 2)
    assert paths.metrics_log.read_text() == "".join(x + "\n" for x in (lines[0], lines[1], lines[3]))


def test_a_damaged_line_inside_the_log_is_named(tmp_path: Path) -> None:
    paths = _paths(tmp_path, '{"job": "a", "step": 1}\nnot json\n{"job": "a", "step": 2}\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl: line 2 is not JSON; .* run --resume again"):
        _drop_log_lines_after(paths, 1)


def test_half_built_folders_are_not_listed_as_models_or_voices(tmp_path: Path) -> None:
    run = tmp_path / "run"
    half = run / "models" / ".merge-ties.0a1b2c3d"  # replace_dir's temporary name
    assert is_temporary(run / "models" / ".merge-ties.0a1b2c3d") is False  # not there yet: not a folder
    write_json(half / "model.json", {"tasks": [{"name": "low"}, {"name": "high"}]})
    write_json(half / VOICE_JSON, {})
    assert is_temporary(half)
    assert _multi_task_models(run) == []
    whole = run / "models" / "merge-ties"
    write_json(whole / "model.json", {"tasks": [{"name": "low"}, {"name": "high"}]})
    assert _multi_task_models(run) == [(whole, ["low", "high"])]
    write_json(run / "models" / "adapted" / VOICE_JSON, {})
    assert resolve_voice(run) == run / "models" / "adapted"  # the half-built voice is not a second candidate
