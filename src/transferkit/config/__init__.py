"""Configs and schemas: the recipe and every stage's section, as pydantic models.

This layer imports neither torch nor the runtime (an import-linter contract checks it), so a recipe can be read,
validated and written where torch is not installed, and every layer above can import it.
"""

from transferkit.config.recipe import (
    AugmentConfig,
    CompareEntry,
    DataConfig,
    PretrainConfig,
    RankConfig,
    Recipe,
    SourceSpec,
    TrainConfig,
    apply_overrides,
    dump_recipe,
    format_error,
    parse_override,
    read_yaml,
)
from transferkit.config.recsys import RecsysConfig
from transferkit.config.transfer import TransferConfig

__all__ = [
    "AugmentConfig",
    "CompareEntry",
    "DataConfig",
    "PretrainConfig",
    "RankConfig",
    "Recipe",
    "RecsysConfig",
    "SourceSpec",
    "TrainConfig",
    "TransferConfig",
    "apply_overrides",
    "dump_recipe",
    "format_error",
    "parse_override",
    "read_yaml",
]
