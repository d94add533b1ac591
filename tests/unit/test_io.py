"""Tests of safe loading, atomic writing, model folders and the run directory."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import transferkit.io as tkio
from transferkit.errors import DataNotFoundError, RunDirError, SourceError, UnsafeCheckpointError
from transferkit.io import atomic_write, load_state_dict, replace_dir, safe_torch_load, save_tensors, write_json
from transferkit.models.vision import MODEL_FORMAT, load_model, save_model
from transferkit.recipe import load_recipe
from transferkit.runner import _recipe_hash, prepare_run_dir

# ---------------------------------------------------------------------------------------------------------------
# safe_torch_load / load_state_dict


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch " + str(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"weight": torch.zeros(2), "evil": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_torch_load(path)
    assert isinstance(info.value, SourceError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert f"refused to load '{path}'" in message
    assert "safetensors" in message
    assert "never runs code from a checkpoint" in message
    assert not marker.exists()
    # the same refusal through load_state_dict, the door every weights file goes through
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(path)
    assert not marker.exists()


def test_plain_state_dict_loads(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    torch.save(state, tmp_path / "s.pt")
    loaded = load_state_dict(tmp_path / "s.pt")
    assert set(loaded) == {"w", "b"}
    assert torch.equal(loaded["w"], state["w"])
    assert loaded["b"].dtype == torch.int64


@pytest.mark.parametrize("key", ["state_dict", "model_state", "model", "module"])
def test_wrapped_state_dict_is_unwrapped(tmp_path: Path, key: str) -> None:
    torch.save({key: {"w": torch.ones(3)}, "epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "c.pt")
    loaded = load_state_dict(tmp_path / "c.pt")
    assert list(loaded) == ["w"]
    assert torch.equal(loaded["w"], torch.ones(3))


def test_safetensors_file_loads(tmp_path: Path) -> None:
    save_tensors(tmp_path / "w.safetensors", {"a": torch.full((2,), 3.0)})
    assert torch.equal(load_state_dict(tmp_path / "w.safetensors")["a"], torch.full((2,), 3.0))


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1), "steps": 3}, tmp_path / "m.pt")
    with pytest.raises(SourceError, match="does not hold a mapping of tensor names to tensors"):
        load_state_dict(tmp_path / "m.pt")


@pytest.mark.parametrize(
    "content",
    [np.random.default_rng(0).bytes(256), b"PK\x03\x04" + bytes(60), b""],
    ids=["random", "broken-zip", "empty"],
)
def test_garbage_file_is_a_source_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "g.pt"
    path.write_bytes(content)
    with pytest.raises(SourceError, match=str(path)):
        safe_torch_load(path)


@pytest.mark.parametrize("text", ["this is not a checkpoint\n", "hello world this is not a checkpoint"])
def test_text_file_is_a_source_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "notes.pt"
    path.write_text(text)
    with pytest.raises(SourceError, match=str(path)):
        safe_torch_load(path)


def test_random_bytes_are_not_called_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "g.pt"
    path.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(SourceError) as info:
        safe_torch_load(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_missing_checkpoint(tmp_path: Path) -> None:
    for fn in (safe_torch_load, load_state_dict):
        with pytest.raises(DataNotFoundError) as info:
            fn(tmp_path / "missing.pt")
        assert isinstance(info.value, FileNotFoundError)
        assert f"'{tmp_path / 'missing.pt'}' does not exist" in str(info.value)


def test_corrupt_safetensors_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(SourceError, match="is not a valid safetensors file"):
        load_state_dict(path)


# ---------------------------------------------------------------------------------------------------------------
# atomic_write / replace_dir


def _half_then_fail(p: Path) -> None:
    with p.open("wb") as f:
        f.write(b"x" * 1000)
    raise OSError("No space left on device")


def test_atomic_write_writes_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    assert atomic_write(target, lambda p: p.write_text("new")) == target
    assert target.read_text() == "new"
    assert os.listdir(target.parent) == ["out.json"]
    write_json(target, {"a": np.arange(3), "p": Path("x")})
    assert json.loads(target.read_text()) == {"a": [0, 1, 2], "p": "x"}
    assert os.listdir(target.parent) == ["out.json"]


def test_atomic_write_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    with pytest.raises(OSError, match="No space left on device"):
        atomic_write(target, _half_then_fail)
    assert os.listdir(tmp_path) == []


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"old complete file")
    with pytest.raises(OSError, match="No space left on device"):
        atomic_write(target, _half_then_fail)
    assert target.read_bytes() == b"old complete file"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_atomic_write_cleans_up_on_keyboard_interrupt(tmp_path: Path) -> None:
    def interrupted(p: Path) -> None:
        p.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f", interrupted)
    assert os.listdir(tmp_path) == []


def test_save_tensors_roundtrip_with_metadata(tmp_path: Path) -> None:
    t = torch.arange(4.0).reshape(2, 2).t()  # non-contiguous: saved contiguous
    save_tensors(tmp_path / "t.safetensors", {"t": t}, metadata={"k": "v"})
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["t"], t)
    assert os.listdir(tmp_path) == ["t.safetensors"]


def test_replace_dir_swaps_whole_folder(tmp_path: Path) -> None:
    final = tmp_path / "m"
    final.mkdir()
    (final / "old.txt").write_text("old")
    replace_dir(final, lambda d: (d / "new.txt").write_text("new"))
    assert os.listdir(final) == ["new.txt"]
    assert os.listdir(tmp_path) == ["m"]


def test_replace_dir_failure_keeps_the_old_folder(tmp_path: Path) -> None:
    final = tmp_path / "m"
    final.mkdir()
    (final / "old.txt").write_text("old")

    def fill(d: Path) -> None:
        (d / "new.txt").write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        replace_dir(final, fill)
    assert os.listdir(final) == ["old.txt"]
    assert (final / "old.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["m"]


@pytest.fixture
def umask() -> Any:
    """Set the process umask for one test (``umask(0o022)``), restored afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_and_folders_get_the_umask_modes(
    tmp_path: Path, umask: Any, tiny_model: Callable[..., Any], mask: int, file_mode: int, dir_mode: int
) -> None:
    umask(mask)
    target = write_json(tmp_path / "metrics.json", {"a": 1})
    assert oct(os.stat(target).st_mode & 0o777) == oct(file_mode)
    target.chmod(0o600)  # replacing a file gives the new one the umask's mode, as open() + rename would
    write_json(target, {"a": 2})
    assert oct(os.stat(target).st_mode & 0o777) == oct(file_mode)
    final = replace_dir(tmp_path / "m", lambda d: write_json(d / "x.json", {}))
    assert oct(os.stat(final).st_mode & 0o777) == oct(dir_mode)
    assert oct(os.stat(final / "x.json").st_mode & 0o777) == oct(file_mode)
    folder = save_model(tiny_model(), tmp_path / "model")
    assert oct(os.stat(folder).st_mode & 0o777) == oct(dir_mode)
    assert {oct(os.stat(p).st_mode & 0o777) for p in folder.iterdir()} == {oct(file_mode)}


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd's file through /proc")
def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", _fd_path(fd)))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    assert len(events) == 3
    assert events[0][0] == "fsync" and Path(events[0][1]).name.startswith(".out.json.")  # the temporary file
    assert events[1] == ("replace", events[0][1], str(target))
    assert events[2] == ("fsync", str(tmp_path))


def _has_exchange() -> bool:
    import ctypes
    import sys

    libc = ctypes.CDLL(None)
    return (sys.platform.startswith("linux") and hasattr(libc, "renameat2")) or (
        sys.platform == "darwin" and hasattr(libc, "renamex_np")
    )


_HAS_EXCHANGE = _has_exchange()


def _spy_replace_dir(final: Path, monkeypatch: pytest.MonkeyPatch, contents: set[str]) -> list[str]:
    """After every rename and exchange, ``final`` must be a folder holding one of ``contents`` in ``x.txt``."""
    calls: list[str] = []

    def check(what: str) -> None:
        calls.append(what)
        assert final.is_dir(), f"'{final}' missing after {what}"
        assert (final / "x.txt").read_text() in contents

    real_replace, real_rename = os.replace, os.rename

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        check("os.replace")

    def rename(src: Any, dst: Any) -> None:
        real_rename(src, dst)
        check("os.rename")

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    real_exchange = getattr(tkio, "_EXCHANGE", None)
    if real_exchange is not None:

        def exchange(a: Path, b: Path) -> None:
            real_exchange(a, b)
            check("exchange")

        monkeypatch.setattr(tkio, "_EXCHANGE", exchange)
    return calls


@pytest.mark.skipif(not _HAS_EXCHANGE, reason="no renameat2/renamex_np on this system")
def test_replace_dir_never_leaves_the_path_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "m"
    final.mkdir()
    (final / "x.txt").write_text("old")
    calls = _spy_replace_dir(final, monkeypatch, {"old", "new"})
    seen_during_fill: list[str] = []

    def fill(d: Path) -> None:
        (d / "x.txt").write_text("half")
        seen_during_fill.append((final / "x.txt").read_text())  # the old folder is still there, whole
        (d / "x.txt").write_text("new")

    replace_dir(final, fill)
    assert seen_during_fill == ["old"]
    assert calls == ["exchange"]  # one atomic swap, no rename leaving the path empty
    assert (final / "x.txt").read_text() == "new"
    assert os.listdir(tmp_path) == ["m"]


def test_replace_dir_without_an_exchange_call_still_swaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tkio, "_EXCHANGE", None, raising=False)
    final = tmp_path / "m"
    final.mkdir()
    (final / "x.txt").write_text("old")
    replace_dir(final, lambda d: (d / "x.txt").write_text("new"))
    assert (final / "x.txt").read_text() == "new"
    assert os.listdir(tmp_path) == ["m"]
    # a new folder: a single rename
    replace_dir(tmp_path / "n", lambda d: (d / "x.txt").write_text("first"))
    assert (tmp_path / "n" / "x.txt").read_text() == "first"
    assert sorted(os.listdir(tmp_path)) == ["m", "n"]


@pytest.mark.skipif(not _HAS_EXCHANGE, reason="no renameat2/renamex_np on this system")
def test_replace_dir_failed_swap_keeps_the_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def refuse(a: Path, b: Path) -> None:
        raise OSError(errno.EACCES, "Permission denied", str(a))

    monkeypatch.setattr(tkio, "_EXCHANGE", refuse, raising=False)
    final = tmp_path / "m"
    final.mkdir()
    (final / "x.txt").write_text("old")
    with pytest.raises(PermissionError, match="Permission denied"):
        replace_dir(final, lambda d: (d / "x.txt").write_text("new"))
    assert (final / "x.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["m"]


# ---------------------------------------------------------------------------------------------------------------
# save_model / load_model


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_load_roundtrip(tmp_path: Path, tiny_model: Callable[..., Any]) -> None:
    model = tiny_model()
    with torch.no_grad():  # a head that is not the fresh near-zero init, so outputs differ per class
        model.head.weight.normal_()
    folder = save_model(model, tmp_path / "m", extra={"strategy": "full"})
    assert sorted(os.listdir(folder)) == ["model.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["m"]
    meta = json.loads((folder / "model.json").read_text())
    assert meta["format"] == MODEL_FORMAT
    assert meta["labels"] == ["a", "b", "c"]
    assert meta["head"] == {"type": "linear", "in_features": model.num_features, "num_classes": 3, "dropout": 0.0}
    assert meta["strategy"] == "full"

    loaded = load_model(folder)
    assert not loaded.training
    assert loaded.labels == ["a", "b", "c"]
    assert loaded.preprocess == model.preprocess
    assert loaded.arch == model.arch
    assert loaded.groups == model.groups
    x = torch.randn(2, *model.preprocess["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert got.shape == (2, 3)
    assert torch.equal(expected, got)
    # load_model also accepts the weights file inside the folder
    assert load_model(folder / "model.safetensors").labels == ["a", "b", "c"]


def test_save_model_with_dropout_head(tmp_path: Path, tiny_model: Callable[..., Any]) -> None:
    model = tiny_model()
    model.reset_head(2, ["x", "y"], dropout=0.3)
    model.eval()
    loaded = load_model(save_model(model, tmp_path / "m"))
    assert isinstance(loaded.head, torch.nn.Sequential)
    assert loaded.head[0].p == 0.3
    x = torch.randn(1, *model.preprocess["input_size"])
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def _failing_save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
    Path(filename).write_bytes(b"\x00" * 128)  # half a file ...
    raise OSError("No space left on device")  # ... then the disk is full


def test_failed_save_leaves_no_half_written_folder(
    tmp_path: Path, tiny_model: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tkio, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="No space left on device"):
        save_model(tiny_model(), tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_previous_model(
    tmp_path: Path, tiny_model: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = tiny_model(labels=("p", "q"), seed=1)
    folder = save_model(previous, tmp_path / "m")
    before = _snapshot(folder)
    monkeypatch.setattr(tkio, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="No space left on device"):
        save_model(tiny_model(), folder)
    assert _snapshot(folder) == before
    assert os.listdir(tmp_path) == ["m"]
    monkeypatch.undo()
    assert load_model(folder).labels == ["p", "q"]


def test_load_model_errors(tmp_path: Path, tiny_model: Callable[..., Any]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="is not a transferkit model folder: it has no model.json"):
        load_model(tmp_path / "empty")
    folder = save_model(tiny_model(), tmp_path / "m")
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(SourceError) as info:
        load_model(folder)
    assert "'other/9'" in str(info.value) and MODEL_FORMAT in str(info.value)


def test_load_model_with_mismatched_weights(tmp_path: Path, tiny_model: Callable[..., Any]) -> None:
    folder = save_model(tiny_model(), tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    state.pop("head.weight")
    save_tensors(folder / "model.safetensors", state)
    with pytest.raises(SourceError, match="does not match its model.json") as info:
        load_model(folder)
    assert "head.weight" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# The run directory


@pytest.fixture
def recipe(base_recipe: dict[str, Any]) -> Any:
    return load_recipe(base_recipe)


def test_new_or_empty_run_dir_is_fine(tmp_path: Path, recipe: Any) -> None:
    prepare_run_dir(tmp_path / "new", recipe, resume=False, overwrite=False)
    (tmp_path / "empty").mkdir()
    prepare_run_dir(tmp_path / "empty", recipe, resume=False, overwrite=False)
    assert not (tmp_path / "new").exists()


def test_non_empty_dir_that_is_not_a_run(tmp_path: Path, recipe: Any) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError) as info:
        prepare_run_dir(tmp_path, recipe, resume=False, overwrite=False)
    assert isinstance(info.value, FileExistsError)
    message = str(info.value)
    assert "already holds files" in message
    assert "--resume" in message and "--overwrite" in message and "another --out" in message
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_a_dir_that_is_not_a_run(tmp_path: Path, recipe: Any) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError) as info:
        prepare_run_dir(tmp_path, recipe, resume=True, overwrite=False)
    assert "not a transferkit run directory (no run.json): nothing to resume" in str(info.value)
    assert "--overwrite" in str(info.value)


def test_existing_run_without_resume(tmp_path: Path, recipe: Any) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"recipe_hash": _recipe_hash(recipe)}))
    with pytest.raises(RunDirError, match="already holds a run. Pass --resume to continue it, --overwrite"):
        prepare_run_dir(tmp_path, recipe, resume=False, overwrite=False)


def test_resume_a_run_of_a_different_recipe(tmp_path: Path, recipe: Any) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"recipe_hash": "0123456789abcdef"}))
    with pytest.raises(RunDirError) as info:
        prepare_run_dir(tmp_path, recipe, resume=True, overwrite=False)
    assert "holds a run of a different recipe" in str(info.value)
    assert "--overwrite" in str(info.value)


def test_resume_the_same_recipe(tmp_path: Path, recipe: Any, base_recipe: dict[str, Any]) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"recipe_hash": _recipe_hash(recipe)}))
    (tmp_path / "checkpoints").mkdir()
    prepare_run_dir(tmp_path, load_recipe(base_recipe), resume=True, overwrite=False)
    assert (tmp_path / "checkpoints").is_dir()  # nothing removed
    changed = load_recipe(base_recipe, ["train.epochs=11"])
    with pytest.raises(RunDirError, match="different recipe"):
        prepare_run_dir(tmp_path, changed, resume=True, overwrite=False)


def test_overwrite_empties_the_dir(tmp_path: Path, recipe: Any) -> None:
    out = tmp_path / "run"
    (out / "models" / "full").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"recipe_hash": "other"}))
    prepare_run_dir(out, recipe, resume=False, overwrite=True)
    assert not out.exists() or list(out.iterdir()) == []
    assert os.listdir(tmp_path) in ([], ["run"])
