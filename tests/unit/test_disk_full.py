"""A full disk (an injected ENOSPC on write): a DiskFullError that says so, nothing half-written, the previous
checkpoint intact, and ``--resume`` continuing once space is back; a finished run stays ``done``."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from test_stages import TINY

import transferkit.io as tkio
from transferkit.cli import main
from transferkit.errors import DiskFullError
from transferkit.io import atomic_write, read_json, safe_torch_load, write_json
from transferkit.recipe import load_recipe
from transferkit.runner import run_recipe

RECIPE = {**TINY, "train": {**TINY["train"], "epochs": 3, "checkpoint_every": 1}}


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_that_runs_out_of_space_says_so_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "metrics.json", {"kept": True})
    with pytest.raises(DiskFullError, match=r"no space left on the device writing '.*metrics.json' \(\d+ MB free\)"):
        atomic_write(path, _no_space)
    assert read_json(path) == {"kept": True} and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    with pytest.raises(PermissionError):  # other errors are left as they are
        atomic_write(path, lambda p: (_ for _ in ()).throw(PermissionError("read-only")))


def test_training_on_a_full_disk_stops_with_the_last_checkpoint_intact_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = run_recipe(load_recipe(RECIPE), out=tmp_path / "reference")
    out = tmp_path / "full"
    saves = {"n": 0}
    real_save = torch.save

    def save_until_full(obj: object, f: object, *a: object, **k: object) -> None:
        saves["n"] += 1
        if saves["n"] > 3:  # three checkpoints fit, then the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file") from (
                OSError(errno.ENOSPC, "No space left on device")
            )
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(tkio.torch, "save", save_until_full)
    with pytest.raises(DiskFullError, match="free some space, or give --out a folder on another disk"):
        run_recipe(load_recipe(RECIPE), out=out)
    ckpt = out / "checkpoints" / "full" / "last.pt"
    assert json.loads(safe_torch_load(ckpt)["state"])["step"] == 3  # the last checkpoint that fit, whole
    info = read_json(out / "run.json")
    assert info["status"] == "failed" and "no space left" in info["error"]
    monkeypatch.setattr(tkio.torch, "save", real_save)  # space is back
    run_recipe(load_recipe(RECIPE), out=out, resume=True)
    a, b = read_json(reference / "metrics.json"), read_json(out / "metrics.json")
    assert b["models"]["full"]["resumed_from_step"] == 3
    for key in ("weights_sha256", "test", "val"):
        assert a["models"]["full"][key] == b["models"]["full"][key], key


def test_resuming_a_finished_run_on_a_full_disk_leaves_it_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_recipe(load_recipe(TINY), out=tmp_path / "run")
    before = (out / "metrics.json").read_text()
    monkeypatch.setattr(tkio.Path, "write_text", _no_space)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_bytes(json.dumps(TINY).encode())  # JSON is YAML
    assert main(["run", str(recipe), "--out", str(out), "--resume"]) == 1
    assert "no space left on the device writing" in capsys.readouterr().err
    monkeypatch.undo()
    assert read_json(out / "run.json")["status"] == "done" and (out / "metrics.json").read_text() == before
