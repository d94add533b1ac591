"""The stage contract and the run context every stage reads and writes.

A stage is one step of a run (rank, pretrain, transfer, train, baselines, select, recsys...). It declares:

- ``name``: its name, the recipe section(s) it reads (``keys``), and ``transferkit STAGE RUN_DIR``;
- ``applies(recipe)``: whether the recipe has the stage at all;
- ``run(ctx)``: does the work from the run context and writes its outputs in the run directory;
- ``done(ctx)`` and ``load(ctx)``: its resume rule: what "already done" means on disk, and how the results are read
  back from there (``--resume`` and stages added to a finished run skip what is done, never retrain it);
- ``needs`` / ``gives``: what it reads from earlier stages and what it provides (the order the stages run in:
  the order the recipe writes them, each after the stages whose outputs it reads);
- ``check(raw)``: problems of its recipe section that need the registries (reported with the structural ones);
- ``extend(raw, options)``: how ``transferkit STAGE RUN_DIR key=value...`` adds it to a finished run's recipe
  (None: the stage cannot be added after training, e.g. ``rank`` chooses the source before anything is trained),
  with an ``example`` of its options.

The stage modules import torch and the runtime inside their functions, so that reading the registry (``transferkit
validate``, ``transferkit ls``) stays cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from transferkit.config import Recipe, SourceSpec


def _no_problems(raw: dict[str, Any]) -> list[str]:
    return []


def _never(ctx: RunContext) -> bool:
    return False


@dataclass(frozen=True)
class Stage:
    """One step of a run (see the module docstring for each field)."""

    name: str
    run: Callable[[RunContext], None]
    applies: Callable[[Recipe], bool]
    done: Callable[[RunContext], bool] = _never
    load: Callable[[RunContext], None] | None = None
    keys: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    gives: tuple[str, ...] = ()
    check: Callable[[dict[str, Any]], list[str]] = _no_problems
    extend: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    help: str = ""
    example: str = ""  # options of ``transferkit NAME RUN_DIR ...``, for help and messages


@dataclass
class RunContext:
    """What a run knows while its stages run: the recipe, the run directory, the accelerator, and what earlier
    stages produced (the source to use, the prepared data, the trained models' results...).

    The source and the data are loaded on first use (``source``, ``data``), after the stages that choose the
    source (rank, pretrain) have run.
    """

    recipe: Recipe
    out: Path
    accelerator: Any
    resume: bool = False
    log: Callable[..., Any] = print
    source_spec: SourceSpec | None = None
    known_features: dict[str, Any] | None = None  # the winner's features from ``rank`` (a linear probe reuses them)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # trained models by name (metrics.json models)
    sections: dict[str, Any] = field(default_factory=dict)  # what stages add to metrics.json (baselines, pretrain...)
    tables: list[dict[str, Any]] = field(default_factory=list)  # tables stages add to report.html (title, columns...)
    timings: dict[str, float] = field(default_factory=dict)
    features: dict[str, Any] | None = None  # cached backbone features (train stage), computed once per run
    cache: dict[str, Any] = field(default_factory=dict)  # what several stages read, loaded once (recsys data)
    t_start: float = field(default_factory=time.perf_counter)
    _source: Any = None
    _data: Any = None

    @property
    def main(self) -> bool:
        """Whether this is the process that writes the run directory (one of many under torchrun)."""
        return bool(self.accelerator.is_main_process)

    def source(self) -> Any:
        """The source model (loaded once, after ``rank``/``pretrain`` chose it)."""
        if self._source is None:
            import torch

            from transferkit.errors import RecipeError
            from transferkit.sources import load_source

            if self.source_spec is None:
                raise RecipeError("the recipe names no source: give source: NAME, or rank: {candidates: [...]}")
            t = time.perf_counter()
            torch.manual_seed(self.recipe.seed)  # a source without pretrained weights is initialised reproducibly
            self._source = load_source(self.source_spec)
            self.timings["load_source_s"] = self.timings.get("load_source_s", 0.0) + time.perf_counter() - t
        return self._source

    def data(self) -> Any:
        """The run's data, split and with the target's preprocessing (read once)."""
        if self._data is None:
            from transferkit.data import prepare_data

            assert self.recipe.data is not None
            source = self.source()
            t = time.perf_counter()
            # with a transfer: section the data takes the target's input format (e.g. 1 channel), not the
            # source's: the target architecture alone tells it (pretrained=False: built, not filled)
            shape_of = source if self.recipe.transfer is None else self.make_target(None, pretrained=False)
            self._data = prepare_data(self.recipe.data, shape_of, self.recipe.seed)
            self.timings["data_s"] = time.perf_counter() - t
            d = self._data
            self.log(
                f"source {self.source_spec.name if self.source_spec else '?'} | data {d.cfg.dataset}: "
                f"{d.splits.sizes()} | {len(d.classes)} classes | skipped {len(d.examples.skipped)} unreadable"
            )
        return self._data

    def make_target(self, labels: list[str] | None, pretrained: bool = True) -> Any:
        """The target: the source with a new head (``build_target``), or, with a ``transfer:`` section, the
        architecture it names filled from the source (``transfer_step``). ``labels=None``: only its input format."""
        source = self.source()
        if self.recipe.transfer is None:
            from transferkit.transfer import build_target

            return build_target(source, labels or [], pretrained=pretrained, seed=self.recipe.seed)
        from transferkit.transfer.api import transfer_step

        target = transfer_step(source, self.recipe.transfer, labels, seed=self.recipe.seed, pretrained=pretrained)
        if getattr(target, "processor", None) is None:
            target.processor = source.processor
        return target

    def model(self, name: str) -> Any:
        """A model an earlier stage trained, reloaded from ``models/NAME/`` (later stages start from it)."""
        from transferkit.errors import RunDirError
        from transferkit.models.base import load_model

        folder = self.out / "models" / name
        if not (folder / "model.json").is_file():
            raise RunDirError(
                f"'{self.out}' holds no trained model '{name}' (models/{name}/ is missing); trained: "
                f"{', '.join(sorted(self.results)) or 'none'}"
            )
        return load_model(folder)

    def wait(self) -> None:
        """Every process reaches this point before any goes on (a no-op in one process)."""
        self.accelerator.wait_for_everyone()


def append_entry(
    raw: dict[str, Any], key: str, entry: type[BaseModel], options: dict[str, Any], usage: str
) -> dict[str, Any]:
    """The raw recipe with one more validated entry in its list section ``key`` (a compare entry, an evaluation):
    how ``Stage.extend`` adds a stage's work to a finished run. A bad option is a RecipeError naming ``usage``."""
    return {**raw, key: [*raw.get(key, []), validated_section(entry, options, usage)]}


def validated_section(entry: type[BaseModel], options: dict[str, Any], usage: str) -> dict[str, Any]:
    """``options`` validated as ``entry`` (its non-default values); a bad option is a RecipeError naming ``usage``."""
    from pydantic import ValidationError

    from transferkit.config import format_error
    from transferkit.errors import RecipeError

    try:
        value = entry(**options)
    except ValidationError as e:
        problems = "; ".join(format_error(err, entry) for err in e.errors())
        raise RecipeError(f"{usage}: {problems}") from e
    return value.model_dump(exclude_defaults=True)


def one_accelerator(key: str, value: Any, raw: dict[str, Any]) -> list[str]:
    """A ``mixed_precision`` written outside ``train:`` (``key``) that differs from the run's, as a problem.

    A run makes one accelerator, from ``train.mixed_precision``, before its stages run, and every model it trains
    (pretraining and compare entries included) runs on it: another value there would be silently ignored.
    """
    train = raw.get("train")
    main = train.get("mixed_precision", "auto") if isinstance(train, dict) else "auto"
    if value == main:
        return []
    return [
        f"{key}: {value!r} differs from train.mixed_precision ({main!r}); a run makes one accelerator, from "
        "train.mixed_precision, for every model it trains: set train.mixed_precision instead, or drop this key"
    ]


def result_file(ctx: RunContext, name: str) -> Path:
    """Where a model's result goes once it is done (``checkpoints/NAME/result.json``): the resume rule of every stage
    that gives models (train, merge, recsys)."""
    return ctx.out / "checkpoints" / name / "result.json"


def settings_sha(settings: dict[str, Any]) -> str:
    """A fingerprint of a model's settings: a model on disk is reused only when it was made with the same ones."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def settings_of(config: BaseModel, added: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings of ``config`` that a fingerprint covers: all fields but ``exclude``, and the ``added`` ones
    (options introduced after runs were made with the model) only where they differ from their defaults, so a run
    made before an option existed still resumes, and one that sets it does not pass for one that did not."""
    dump = config.model_dump(mode="json", exclude=set(exclude))
    fields = type(config).model_fields
    return {k: v for k, v in dump.items() if k not in added or v != fields[k].get_default(call_default_factory=True)}


# TrainConfig options added after models were trained with it, and ``checkpoints`` (what is kept on disk after
# training does not change the model)
TRAIN_ADDED = ("compile", "gradient_checkpointing")


def train_settings(cfg: BaseModel) -> dict[str, Any]:
    """The settings of a TrainConfig that a trained model's fingerprint covers (``settings_of``)."""
    return settings_of(cfg, added=TRAIN_ADDED, exclude=("checkpoints",))


def train_override_problems(key: str, train: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """Problems of ``overrides`` of the recipe's ``train:`` written at ``key`` (a compare entry's ``overrides``, a
    distill entry's ``train``), each with its key path: values TrainConfig refuses, unknown strategies."""
    from pydantic import ValidationError

    from transferkit.config import TrainConfig, format_error
    from transferkit.strategies import check_strategy

    problems = []
    if isinstance(overrides.get("strategy"), (str, dict)):
        problems += [f"{key}.strategy: {p}" for p in check_strategy(overrides["strategy"])]
    try:
        TrainConfig.model_validate({**train, **overrides, "strategy": "full"})  # (a key that is no string: a problem)
    except ValidationError as e:
        problems += [
            f"{key}." + format_error(err, TrainConfig)
            for err in e.errors()
            if err["loc"] and err["loc"][0] in overrides
        ]
    return problems
