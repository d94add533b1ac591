"""Safe reading and atomic writing of weights, JSON and folders.

Every checkpoint transferkit reads goes through ``safe_torch_load`` (``weights_only=True``, always), and every
file it writes goes through ``atomic_write`` (a temporary file renamed into place), so a crash or a full disk
never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from transferkit.errors import DataNotFoundError, SourceError, UnsafeCheckpointError


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
            raise SourceError(f"'{path}' is not a readable PyTorch checkpoint: {str(e).splitlines()[0][:200]}") from e
        raise UnsafeCheckpointError(
            f"refused to load '{path}': it is a pickle that would import or call code, not only tensors "
            f"(it names {', '.join(sorted(set(code))[:5])}). transferkit never runs code from a checkpoint. If you "
            "trust the file, convert it once in a trusted environment to safetensors (safetensors.torch.save_file) "
            "and load that."
        ) from e
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError, TypeError) as e:
        raise SourceError(f"'{path}' is not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from e


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
            raise SourceError(f"'{path}' is not a valid safetensors file: {e}") from e
    obj = safe_torch_load(path)
    for key in ("state_dict", "model_state", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError(f"'{path}' does not hold a mapping of tensor names to tensors (a state_dict)")
    return dict(obj)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``; on any error nothing is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n"))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(clean, str(p), metadata=metadata))


def torch_save(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: torch.save(obj, p))


def replace_dir(final: Path, fill: Callable[[Path], object]) -> Path:
    """Build a folder under a temporary name with ``fill`` and swap it in whole."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        fill(tmp)
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")
