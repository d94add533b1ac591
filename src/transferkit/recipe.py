"""Reading and validating a recipe: one YAML file that describes a whole run, checked in one pass.

``load_recipe`` reads YAML, applies ``key.path=value`` overrides and validates everything at once: the schema
(``transferkit.config``) and every stage's own checks (names in the registries: sources, strategies, datasets,
scores, baselines). Every problem is reported with its key path, the bad value and the valid choices, not only the
first one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from transferkit.config import (
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
from transferkit.errors import RecipeError
from transferkit.specs import spec_name


def _input_problems(raw: dict[str, Any]) -> list[str]:
    """The run's inputs: a source (or candidates to rank), a source name that resolves, a dataset that exists."""
    from transferkit.data import check_classes_spec, check_dataset_spec, check_unlabelled_spec
    from transferkit.sources import check_source_spec, source_option_problems

    problems = []
    own_task = raw.get("recsys") is not None or raw.get("tts") is not None  # tasks that name their own inputs
    if raw.get("source") is None and raw.get("rank") is None and not own_task:
        problems.append("source: required key is missing (or give rank: {candidates: [...]} to choose the source).")
    source = raw.get("source")
    source_name = spec_name(source) if isinstance(source, (str, dict)) else None
    if source_name:
        problems += [f"source.name: {p}" for p in check_source_spec(SourceSpec(name=source_name))]
        try:
            spec = SourceSpec(**source) if isinstance(source, dict) else SourceSpec(name=source_name)
        except ValidationError:
            spec = None  # the schema reports it
        problems += [f"source.{p}" for p in source_option_problems(spec)] if spec else []
    data = raw.get("data")
    dataset = data.get("dataset") if isinstance(data, dict) else None
    if isinstance(dataset, str):
        problems += [f"data.dataset: {p}" for p in check_dataset_spec(dataset)]
    classes = data.get("classes") if isinstance(data, dict) else None
    if isinstance(dataset, str) and isinstance(classes, list) and not check_dataset_spec(dataset):
        label_column = data.get("label_column", "label") if isinstance(data, dict) else "label"
        problems += [f"data.classes: {p}" for p in check_classes_spec(dataset, classes, str(label_column))]
    if source_name:
        problems += _freeze_problems(raw, SourceSpec(name=source_name))
    unlabelled = data.get("unlabelled") if isinstance(data, dict) else None
    if isinstance(unlabelled, str):
        per_class = data.get("per_class") if isinstance(data, dict) else None
        problems += [f"data.unlabelled: {p}" for p in check_unlabelled_spec(unlabelled, per_class)]
    tts = raw.get("tts")
    if isinstance(tts, dict) and isinstance(tts.get("data"), str):
        problems += [f"tts.data: {p}" for p in _tts_data_problems(tts["data"])]
    return problems


def _freeze_problems(raw: dict[str, Any], source: SourceSpec) -> list[str]:
    """``freeze: {groups: K}`` beyond the source's backbone layer groups (it would freeze the whole network, head
    and all), found from the architecture alone for ``timm:`` sources (``backbone_group_count``)."""
    from transferkit.sources import backbone_group_count

    entries: list[tuple[str, Any]] = [("train.strategy", (raw.get("train") or {}).get("strategy"))]
    compare = raw.get("compare")
    if isinstance(compare, list):
        entries += [(f"compare.{i}.strategy", c.get("strategy")) for i, c in enumerate(compare) if isinstance(c, dict)]
    wanted = [
        (key, strategy["groups"])
        for key, strategy in entries
        if isinstance(strategy, dict) and strategy.get("name") == "freeze" and type(strategy.get("groups")) is int
    ]
    count = backbone_group_count(source) if wanted else None
    if count is None:
        return []
    return [
        f"{key}: freeze groups={groups} is more than '{source.name}' has: {count} backbone layer groups and a head; "
        f"give groups from 1 to {count} ({count} freezes the whole backbone, as linear_probe does)"
        for key, groups in wanted
        if groups > count
    ]


def _tts_data_problems(spec: str) -> list[str]:
    """A tts: data folder that cannot be read, found without reading the audio."""
    try:
        root = Path(spec).expanduser()
        if not root.is_dir():
            return [f"'{spec}' is not a folder; give the folder holding metadata.csv (file|text per line) and the WAVs"]
        if not (root / "metadata.csv").is_file():
            return [f"'{spec}' has no metadata.csv: write one line 'file|text' per recording (LJSpeech style)"]
    except OSError as e:
        return [f"'{spec}' cannot be read as a folder ({e})"]
    return []


def validate_recipe(raw: dict[str, Any]) -> tuple[Recipe | None, list[str]]:
    """Validate a recipe dict; returns (recipe or None, every problem found).

    The checks that need the registries run on the raw recipe, so that they are reported together with the
    structural problems, whatever else is wrong.
    """
    from transferkit.stages import check_stages

    semantic = _input_problems(raw) + check_stages(raw)
    try:
        recipe = Recipe.model_validate(raw)  # not Recipe(**raw): YAML keys may be numbers (0: x), reported as keys
    except ValidationError as e:
        return None, [format_error(err) for err in e.errors()] + semantic
    return recipe, semantic


def load_recipe(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raises RecipeError listing every problem."""
    raw = source if isinstance(source, dict) else read_yaml(source)
    raw = apply_overrides(raw, overrides or [])
    recipe, problems = validate_recipe(raw)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise RecipeError(f"the recipe has {len(problems)} problem(s):\n{listing}", problems)
    assert recipe is not None
    return recipe


__all__ = [
    "AugmentConfig",
    "CompareEntry",
    "DataConfig",
    "PretrainConfig",
    "RankConfig",
    "Recipe",
    "SourceSpec",
    "TrainConfig",
    "apply_overrides",
    "dump_recipe",
    "load_recipe",
    "parse_override",
    "read_yaml",
    "validate_recipe",
]
