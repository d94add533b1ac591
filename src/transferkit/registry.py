"""One small registry used by sources, strategies and datasets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from transferkit.errors import UnknownNameError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects, with errors that list the valid choices.

    Args:
        kind: what is registered ("strategy", "dataset"...), used in messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            self._help[name] = help or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'.{did_you_mean(name, self._items)} "
                f"Valid choices: {', '.join(sorted(self._items))}."
            )
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:  # unhashable (a recipe's list or mapping where a name belongs): not a registered name
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def describe(self) -> dict[str, str]:
        return {name: self._help[name] for name in sorted(self._items)}
