"""Errors that name the problem and the fix.

Every transferkit error is also the matching builtin (``ValueError``, ``FileNotFoundError``...), so code
that catches builtins keeps working, and every message says what was wrong and what to do instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TransferKitError(Exception):
    """Base of every error transferkit raises on purpose."""


class RecipeError(TransferKitError, ValueError):
    """A recipe (YAML or overrides) is invalid. ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


class UnknownNameError(TransferKitError, KeyError):
    """A name (source, strategy, dataset...) is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SourceError(TransferKitError, ValueError):
    """A source model cannot be loaded."""


class UnsafeCheckpointError(SourceError):
    """A checkpoint holds pickled code; it is refused instead of executed."""


class DataError(TransferKitError, ValueError):
    """Training or prediction data is unusable."""


class DataNotFoundError(TransferKitError, FileNotFoundError):
    """A data file or folder does not exist."""


class DiskFullError(TransferKitError, OSError):
    """A write ran out of space (or quota); what was on disk before is intact."""


class RunDirError(TransferKitError, FileExistsError):
    """The output directory already holds a different run."""


class TrainingError(TransferKitError, RuntimeError):
    """Training diverged (NaN/inf loss) or cannot continue."""


class CompressError(TransferKitError, ValueError):
    """A model cannot be pruned, quantized or exported as asked (the reason and what can be done are named)."""


class ExportError(CompressError):
    """An exported model disagrees with the PyTorch model beyond the tolerance, or the export failed."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or ''.

    Of equally close choices the first given wins (difflib alone would pick the greatest string: 'efficientnet_lite'
    would suggest 'efficientnet_lite2' over 'efficientnet_lite0')."""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(name), names, n=len(names) or 1, cutoff=0.6)
    if not close:
        return ""
    best = max(close, key=lambda c: (difflib.SequenceMatcher(None, c, str(name)).ratio(), -names.index(c)))
    return f" Did you mean '{best}'?"


def unusable_path(spec: str, error: BaseException, instead: str) -> str:
    """A recipe problem for a name that the file system cannot even look up (too long, ``~user`` of no such user)."""
    shown = spec if len(spec) <= 80 else f"{spec[:60]}...({len(spec)} characters)"
    return f"'{shown}' cannot be looked up as a path ({error}); give {instead}"
