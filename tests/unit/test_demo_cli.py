"""`transferkit demo`: a fresh run by default (`--overwrite` says so), `--resume` continues one."""

from __future__ import annotations

from pathlib import Path

import pytest

from transferkit.cli import main
from transferkit.demo import run_demo
from transferkit.errors import RunDirError
from transferkit.io import read_json

TINY = [
    "data.per_class=2",
    "data.val_per_class=1",
    "data.test_size=10",
    "data.image_size=32",
    "train.epochs=1",
    "train.batch_size=10",
    "compare=[]",
]


def test_demo_resume_reads_back_a_finished_demo_and_the_default_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRANSFERKIT_PROGRESS", "0")
    first = run_demo("image", out=tmp_path, overrides=TINY)
    result = first / "checkpoints" / "freeze" / "result.json"  # the finished job's record
    stamp = result.stat().st_mtime_ns
    weights = read_json(first / "metrics.json")["models"]["freeze"]["weights_sha256"]

    again = run_demo("image", out=tmp_path, overrides=TINY, resume=True)
    assert again == first and result.stat().st_mtime_ns == stamp  # read back, not trained again
    assert read_json(again / "metrics.json")["models"]["freeze"]["weights_sha256"] == weights

    run_demo("image", out=tmp_path, overrides=TINY)  # the default: replaced, trained again (same seed)
    assert result.stat().st_mtime_ns != stamp
    assert read_json(first / "metrics.json")["models"]["freeze"]["weights_sha256"] == weights


def test_demo_resume_and_overwrite_are_exclusive_and_recsys_has_nothing_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--resume", "--overwrite", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(RunDirError, match="the recsys demo has no checkpoints to resume from"):
        run_demo("recsys", out=tmp_path, resume=True)
    assert main(["demo", "recsys", "--resume", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "without --resume" in err and "Traceback" not in err
    assert not (tmp_path / "recsys").exists()
