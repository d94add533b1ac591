"""Safe reading and atomic writing of weights, JSON and folders.

Every checkpoint transferkit reads goes through ``safe_torch_load`` (``weights_only=True``, always), and every
file it writes goes through ``atomic_write`` (a temporary file renamed into place), so a crash or a full disk
never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from transferkit.errors import DataNotFoundError, DiskFullError, RunDirError, SourceError, UnsafeCheckpointError


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True``; a pickle that would run code is refused with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = [g for g in pickle_globals(path) if not g.startswith(_HARMLESS_GLOBALS)]
        if not code:  # corrupt bytes, not code
            raise _unreadable(path, e) from e
        raise UnsafeCheckpointError(
            f"refused to load '{path}': it is a pickle that would import or call code, not only tensors "
            f"(it names {', '.join(sorted(set(code))[:5])}). transferkit never runs code from a checkpoint. If you "
            "trust the file, convert it once in a trusted environment to safetensors (safetensors.torch.save_file) "
            "and load that."
        ) from e
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError, TypeError) as e:
        raise _unreadable(path, e) from e


def _unreadable(path: Path, e: BaseException) -> SourceError:
    """A checkpoint torch.load could not read: the reason, without torch's advice to load it with weights_only=False
    (that would run whatever code it holds)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    reason = " ".join(text.split())[:200]
    return SourceError(
        f"'{path}' is not a readable PyTorch checkpoint: it is corrupt or truncated, or not a checkpoint at all "
        f"({type(e).__name__}{': ' + reason if reason else ''}). Copy, download or save it again."
    )


_HARMLESS_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "numpy.")


def pickle_globals(path: Path) -> list[str]:
    """The ``module.name`` globals a pickle (plain, or inside a torch zip) would import, read without running it."""
    import pickletools
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".pkl")]
            data = b"".join(z.read(n) for n in names)
    else:
        data = path.read_bytes()
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # garbage after the part that could be read: what was found so far still counts
        pass
    return found


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pt/.pth/.bin`` file (a ``state_dict``/``model`` key is unwrapped).

    ``.onnx``, ``.h5``/``.hdf5`` and ``.keras`` files are read by ``transferkit.foreign`` (initializers and
    Keras weights, converted to PyTorch names and layouts).
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"weights file '{path}' does not exist")
    # other frameworks' files: their own readers (imported here: onnx and h5py are needed only for these files)
    if path.suffix in (".onnx", ".h5", ".hdf5", ".keras"):
        from transferkit.foreign import read_foreign_weights

        return read_foreign_weights(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise SourceError(
                f"'{path}' is not a valid safetensors file: it is corrupt or truncated, or another format named "
                f".safetensors ({e}). Copy, download or save it again."
            ) from e
    obj = safe_torch_load(path)
    for key in ("state_dict", "model_state", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError(f"'{path}' does not hold a mapping of tensor names to tensors (a state_dict)")
    return dict(obj)


def _create_temp(parent: Path, name: str, suffix: str, make: Callable[[Path], None]) -> Path:
    """A new ``.NAME.RANDOM{suffix}`` next to the target, made by ``make`` (which fails if the name exists)."""
    for _ in range(100):
        candidate = parent / f".{name}.{secrets.token_hex(4)}{suffix}"
        try:
            make(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not find a free temporary name for '{parent / name}' in 100 tries")


def _new_file(path: Path) -> None:
    # mode 0o666 through the umask: the mode a plain open(path, "w") gives (mkstemp would make it 0600)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))


def _new_dir(path: Path) -> None:
    path.mkdir(0o777)  # through the umask, as a plain mkdir (mkdtemp would make it 0700)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be opened (Windows)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``; on any error nothing is left.

    The temporary file is created with the mode the process umask gives a plain ``open`` (a shared run stays
    readable by the team), fsynced before the rename (so the rename never publishes a file whose bytes are still
    only in the page cache) and the folder is fsynced after it (so the rename itself survives a power loss).
    """
    path = Path(path)
    tmp = _temp_beside(path, ".tmp", _new_file)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 less the umask (read back: no umask() call)
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that makes its own file (safetensors: 0600)
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(e, path)
        _raise_if_not_writable(e, path)
        raise
    _fsync_dir(path.parent)
    return path


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def _errno_cause(error: BaseException, codes: set[int]) -> OSError | None:
    """The OSError with one of ``codes`` in ``error``'s cause chain (libraries wrap the errno their own way)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in codes:
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def make_dirs(folder: str | Path) -> Path:
    """``mkdir -p`` whose permission errors (a folder the user may not write to, a read-only file system) are a
    RunDirError naming the folder and the fix instead of a traceback."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _raise_if_not_writable(e, folder)
        raise
    return folder


def _temp_beside(path: Path, suffix: str, make: Callable[[Path], None]) -> Path:
    """A new temporary beside ``path`` (its folder made first), permission errors named as in ``make_dirs``."""
    make_dirs(path.parent)
    try:
        return _create_temp(path.parent, path.name, suffix, make)
    except OSError as e:
        _raise_if_not_writable(e, path)
        raise


def _raise_if_not_writable(error: BaseException, path: Path) -> None:
    """A write refused by permissions or a read-only file system, as a RunDirError naming the nearest existing
    folder (the one to fix) and the way out; other errors are left to the caller."""
    cause = _errno_cause(error, _NOT_WRITABLE)
    if cause is None:
        return
    folder = next((p for p in (path, *path.parents) if p.exists() and p.is_dir()), path.parent)
    why = "a read-only file system" if cause.errno == errno.EROFS else "permission denied"
    raise RunDirError(
        f"cannot write '{path}' ({why} in '{folder}'): nothing was written there. Give --out a folder you can "
        f"write to, or change the permissions of '{folder}'"
    ) from error


def _raise_if_disk_full(error: BaseException, path: Path) -> None:
    """A write that ran out of space (or quota), as a DiskFullError saying so, what is intact and how to go on;
    other errors are left to the caller. Libraries word it their own way (torch: "file write failed"), so the
    cause chain is searched for the errno too."""
    if _errno_cause(error, _NO_SPACE) is None:
        return
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:.0f} MB free"
    except OSError:
        free = "free space unknown"
    raise DiskFullError(
        f"no space left on the device writing '{path}' ({free}): nothing was half-written and the previous "
        "version of the file (the last checkpoint) is intact; free some space, or give --out a folder on another "
        "disk, then run again with --resume to continue"
    ) from error


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n"))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(clean, str(p), metadata=metadata))


def torch_save(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: torch.save(obj, p))


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (what ``fill`` wrote, e.g. by ``shutil.copytree``)."""
    for root, _, files in os.walk(folder):
        for f in files:
            if not os.path.islink(os.path.join(root, f)):
                _fsync_file(Path(root, f))
        _fsync_dir(Path(root))


_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS stdio.h, renamex_np


def _load_exchange() -> Callable[[Path, Path], None] | None:
    """The system's atomic swap of two paths (Linux ``renameat2(RENAME_EXCHANGE)``, macOS ``renamex_np``)."""
    import ctypes
    import ctypes.util
    import sys

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd = -100

        def call(a: Path, b: Path) -> int:
            return int(fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE))

    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]

        def call(a: Path, b: Path) -> int:
            return int(fn(os.fsencode(a), os.fsencode(b), _RENAME_SWAP))

    else:
        return None

    def exchange(a: Path, b: Path) -> None:
        if call(a, b) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(a), None, str(b))

    return exchange


_EXCHANGE = _load_exchange()


def _exchange(a: Path, b: Path) -> bool:
    """Swap the two paths atomically; False where the system or the file system has no such call."""
    import errno

    if _EXCHANGE is None:
        return False
    try:
        _EXCHANGE(a, b)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False  # e.g. a file system without RENAME_EXCHANGE
        raise
    return True


def replace_dir(final: Path, fill: Callable[[Path], object]) -> Path:
    """Build a folder under a temporary name with ``fill`` and swap it in whole.

    Readers see the old folder until the swap and the new one after it, never a missing path: the new folder is
    built next to the old one (same file system), fsynced file by file, then the two are exchanged in one atomic
    call (Linux ``renameat2(RENAME_EXCHANGE)``, macOS ``renamex_np(RENAME_SWAP)``) and the old one, now under the
    temporary name, is removed. A swap was chosen over a symlink flipped with ``os.replace`` because it keeps
    ``final`` a plain folder (copying or archiving a run needs no link handling, and existing runs need no
    migration). Where no exchange call exists (Windows, or a file system that refuses it) the old folder is
    renamed aside and the new one renamed in: a short moment without ``final``, but never a half-written folder.
    A failure before the swap leaves the old folder untouched. Folders get the mode a plain ``mkdir`` gives.
    """
    final = Path(final)
    tmp = _temp_beside(final, "", _new_dir)
    try:
        try:
            fill(tmp)
            _fsync_tree(tmp)
        except BaseException as e:
            _raise_if_disk_full(e, final)
            _raise_if_not_writable(e, final)
            raise
        if not final.exists() and not final.is_symlink():
            os.replace(tmp, final)
        elif final.is_dir() and not final.is_symlink() and _exchange(tmp, final):
            pass  # tmp now holds the old folder
        else:
            old = final.with_name(f".{final.name}.old")
            _remove(old)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # the old folder back in place
                raise
            tmp = old
        _fsync_dir(final.parent)
    finally:
        _remove(tmp)  # the new folder after a failure, or the old folder or file replaced
    return final


def _remove(path: Path) -> None:
    """Delete a folder, a file or a link, if there; errors ignored (a temporary name left behind is harmless)."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


_TEMPORARY = re.compile(r"^\..+\.(?P<random>[0-9a-f]{8}(?P<file>\.tmp)?|old)$")


def is_temporary(path: Path) -> bool:
    """Whether ``path`` has the name of one of the temporaries this module makes: ``atomic_write``'s
    ``.NAME.RANDOM.tmp`` file, ``replace_dir``'s ``.NAME.RANDOM`` folder, or the ``.NAME.old`` it moves aside."""
    match = _TEMPORARY.match(path.name)
    if match is None:
        return False
    if match["random"] == "old":
        return True
    return path.is_file() if match["file"] else path.is_dir() and not path.is_symlink()


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries a killed process left under ``folder`` (see ``is_temporary``); returns them.

    A process killed while it writes (SIGKILL, a power loss, the out-of-memory killer) cannot delete its temporary
    file or folder, which then stays beside the real one, hidden by its leading dot but taking disk space (a
    half-written checkpoint can be gigabytes), and a glob such as ``models/*/model.json`` would see a half-built
    folder under it. Call this only where no other process writes, e.g. before a run resumes.
    """
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            path = Path(root, name)
            if is_temporary(path):
                _remove(path)
                removed.append(path)
        dirs[:] = [d for d in dirs if Path(root, d) not in removed]  # nothing to walk in a removed folder
    return sorted(removed)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")
