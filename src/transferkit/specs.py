"""The one parser of ``{name, **options}`` specs: strategies, regularizers, compare entries, stages.

A spec is a bare name (``"full"``) or a mapping with a ``name`` key and the options (``{name: freeze, groups: 4}``).
``split_spec`` takes it apart, ``build_options`` checks the options against a config class (a dataclass or a
pydantic model) with the same "did you mean" errors everywhere, and ``parse_spec`` does both against a registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from transferkit.errors import RecipeError, did_you_mean
from transferkit.registry import Registry

T = TypeVar("T")
Spec = str | Mapping[str, Any]


def split_spec(spec: Any, kind: str) -> tuple[str, dict[str, Any]]:
    """``"full"`` -> ``("full", {})``; ``{name: freeze, groups: 4}`` -> ``("freeze", {"groups": 4})``.

    Args:
        spec: the name or the mapping.
        kind: what the spec names ("strategy", "regularizer"...), used in messages.
    """
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        name = spec.get("name", "")
        if not isinstance(name, str) or not name:
            raise RecipeError(f"a {kind} given as a mapping needs a name: {{name: NAME, option: value}}, got {spec!r}")
        return name, {str(k): v for k, v in spec.items() if k != "name"}
    raise RecipeError(f"a {kind} is a name or {{name: NAME, option: value}}, not {type(spec).__name__} ({spec!r})")


def spec_name(spec: Any) -> str:
    """The name of a spec; '' for a mapping without one (validation reports that case)."""
    if isinstance(spec, Mapping):
        return str(spec.get("name", ""))
    return str(spec)


def option_names(config: type) -> list[str]:
    """The options a config class accepts: dataclass fields or pydantic model fields."""
    if dataclasses.is_dataclass(config):
        return [f.name for f in dataclasses.fields(config)]
    return list(getattr(config, "model_fields", {}))


def build_options(kind: str, name: str, config: Callable[..., T], options: Mapping[str, Any]) -> T:
    """``config(**options)``, with unknown options and bad values reported as a RecipeError naming the spec."""
    valid = option_names(config)  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        hint = did_you_mean(unknown[0], valid) if len(unknown) == 1 else ""
        raise RecipeError(
            f"{kind} '{name}' has no option(s) {unknown}; valid options: {', '.join(sorted(valid)) or 'none'}.{hint}"
        )
    try:
        return config(**options)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{kind} '{name}': {e}") from e


def parse_spec(spec: Any, registry: Registry[T], config_of: Callable[[T], Callable[..., Any]]) -> tuple[str, T, Any]:
    """Name, registered object and validated config of a spec.

    Args:
        spec: the name or ``{name: ..., option: value}``.
        registry: where the name is looked up (an unknown name lists the valid choices).
        config_of: the config class of a registered object.
    """
    name, options = split_spec(spec, registry.kind)
    obj = registry.get(name)
    return name, obj, build_options(registry.kind, name, config_of(obj), options)
