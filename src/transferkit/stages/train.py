"""``train:`` + ``compare:``: train the main model and every comparison on the same splits with the same budget.

Outputs, per model NAME: ``models/NAME/`` (the model), ``checkpoints/NAME/last.pt`` (written during training;
with ``train.checkpoints: until_done``, the default, deleted once the model's result is written: the optimizer state
is of no use to a finished model, and the saved model holds its weights), ``checkpoints/NAME/result.json`` (its
metrics, once trained), ``cache/features.pt`` (backbone features shared by the strategies that train on cached
features). Resume rule, per model: ``checkpoints/NAME/result.json`` on disk means trained (read back, never
retrained; it must have been trained with the same settings); a checkpoint without it resumes exactly where it
stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transferkit.config import CompareEntry, Recipe, TrainConfig
from transferkit.stages.base import (
    RunContext,
    Stage,
    append_entry,
    one_accelerator,
    result_file,
    settings_sha,
    train_override_problems,
    train_settings,
)


def _settings_sha(cfg: TrainConfig) -> str:
    """A fingerprint of a model's training settings (a trained model is reused only for the same settings).

    ``checkpoints`` is left out (what is kept on disk after training does not change the model), and the options
    added later at their defaults, which keeps the fingerprints of runs made before they existed (``train_settings``).
    """
    return settings_sha(train_settings(cfg))


_RESUME_FILES = ("*.pt", "*.done.json", "*.done.safetensors", "*.round.json", "*.round.safetensors")
# checkpoints, each finished stage's weights, each finished distillation round's


def drop_checkpoints(ctx: RunContext, name: str, cfg: TrainConfig) -> None:
    """With ``checkpoints: until_done``, delete what a trained model kept to resume (``last.pt`` with the optimizer
    state, one per stage of a staged strategy, each finished stage's weights); only once its ``result.json`` is on
    disk, so an interrupted model keeps what it resumes from. The model itself is in ``models/NAME/``."""
    if cfg.checkpoints != "until_done" or not ctx.main or not result_file(ctx, name).is_file():
        return
    drop_resume_files(result_file(ctx, name).parent)


def drop_resume_files(folder: Path) -> None:
    """Delete the resume files of a finished job in its checkpoint ``folder`` (``_RESUME_FILES``)."""
    for pattern in _RESUME_FILES:
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)


def _trained(ctx: RunContext, name: str, cfg: TrainConfig) -> dict[str, Any] | None:
    """The result of a model trained earlier with these settings, or None; other settings are an error."""
    from transferkit.errors import RunDirError
    from transferkit.io import read_json

    path = result_file(ctx, name)
    if not path.is_file():
        return None
    result = read_json(path)
    if result.get("settings_sha256", _settings_sha(cfg)) != _settings_sha(cfg):
        raise RunDirError(
            f"'{ctx.out}' already holds a model '{name}' trained with other settings; give the new one another "
            "name (a compare entry's label), or start a new run"
        )
    return result


def done(ctx: RunContext) -> bool:
    return all(result_file(ctx, name).is_file() for name, _ in ctx.recipe.trainings())


def load(ctx: RunContext) -> None:
    for name, cfg in ctx.recipe.trainings():
        result = _trained(ctx, name, cfg)
        assert result is not None
        ctx.results[name] = result
        ctx.log(f"[{name}] already trained: test accuracy {result['test']['accuracy']:.4f}")
        drop_checkpoints(ctx, name, cfg)


def run(ctx: RunContext) -> None:
    for name, cfg in ctx.recipe.trainings():
        result = _trained(ctx, name, cfg) if ctx.resume else None
        if result is not None:
            ctx.results[name] = result
            ctx.log(f"[{name}] already trained: test accuracy {result['test']['accuracy']:.4f}")
            drop_checkpoints(ctx, name, cfg)  # e.g. interrupted between its result and the deletion
            continue
        ctx.results[name] = train_one(ctx, name, cfg)
        drop_checkpoints(ctx, name, cfg)


def train_one(ctx: RunContext, name: str, cfg: TrainConfig) -> dict[str, Any]:
    """Build, train, evaluate and save one model of the run; returns its entry of ``metrics.json``."""
    import torch
    from torch.utils.data import Dataset, TensorDataset

    from transferkit.engine.features import feature_cache
    from transferkit.engine.loop import JobPaths, evaluate_model
    from transferkit.engine.plan import cached_from_start
    from transferkit.io import write_json
    from transferkit.models.base import save_model
    from transferkit.pipeline import evaluate, fingerprint, plan_stages, resolve_strategy, train
    from transferkit.strategies import get_strategy

    recipe, accelerator, data, source = ctx.recipe, ctx.accelerator, ctx.data(), ctx.source()
    strategy, _ = get_strategy(cfg.strategy)
    target = ctx.make_target(data.classes, pretrained=not strategy.from_scratch)
    target.preprocess = data.preprocess
    target.to(accelerator.device)
    resolved_cfg, resolved, resolved_options, _ = resolve_strategy(cfg, target, data)
    plans = plan_stages(resolved, resolved_options, target, resolved_cfg)
    plan_caches = cached_from_start(plans)  # features of the starting backbone serve it (shared in ctx.features)
    features_s = 0.0  # counted once, by the model that computed the cached features
    if plan_caches and ctx.features is None:
        t = time.perf_counter()
        cache = ctx.out / "cache" / "features.pt" if ctx.main else None
        ctx.features = feature_cache(target, data, accelerator.device, cache, known=ctx.known_features)
        features_s = time.perf_counter() - t
    # every rank reads the checkpoint on resume; only the main process writes (fit checks)
    job_dir = ctx.out / "checkpoints" / name
    paths = JobPaths(job_dir / "last.pt", ctx.out / "metrics.jsonl", name)
    # w0 for regularisers: the source's own tensors (no copy) when the target has the source's names; after a
    # transfer: section, train() copies the target's starting weights (and delta its starting network)
    same_names = recipe.transfer is None and not strategy.from_scratch
    job = train(
        target,
        data,
        cfg,
        seed=recipe.seed,  # train() takes cfg.seed instead when it is set
        accelerator=accelerator,
        paths=paths,
        resume=ctx.resume,
        features=ctx.features,
        reference=source.state_dict() if same_names else None,
        source=source if same_names else None,
    )
    if plan_caches:
        job["timing"]["features_s"] = features_s
    t = time.perf_counter()
    if plan_caches and plans[-1].cached_features:  # only the head changed: the test set's cached features serve
        assert ctx.features is not None
        labels = torch.as_tensor(data.examples.labels[data.splits.test])
        test_set: Dataset = TensorDataset(ctx.features["test"], labels)
        test = evaluate_model(target.head, test_set, 256, len(data.classes), accelerator.device)
    else:
        test = evaluate(target, data.dataset("test"), len(data.classes), device=accelerator.device)
    job["timing"]["test_s"] = time.perf_counter() - t
    job["test"] = test
    job["weights_sha256"] = fingerprint(target)
    job["settings_sha256"] = _settings_sha(cfg)
    if accelerator.num_processes > 1:  # every process must end with the same weights: record the evidence
        from accelerate.utils import gather_object

        job["rank_weights_sha256"] = gather_object([job["weights_sha256"]])
    if ctx.main:
        save_model(target.cpu(), ctx.out / "models" / name, extra={"strategy": job["strategy"], "run": recipe.name})
        write_json(job_dir / "result.json", job)
    ctx.wait()
    ctx.log(
        f"[{name}] test accuracy {test['accuracy']:.4f} | macro-F1 {test['macro_f1']:.4f} | "
        f"val accuracy {job['val'].get('accuracy', float('nan')):.4f} | train {job['timing']['train_s']:.1f}s"
    )
    return job


def check(raw: dict[str, Any]) -> list[str]:
    """Strategy, regularizer and compare entries against the registries; compare overrides against TrainConfig."""
    from transferkit.errors import RecipeError, UnknownNameError
    from transferkit.strategies import check_strategy
    from transferkit.strategies.regularizers import regularizer_config

    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    assert isinstance(train, dict)
    problems = []
    strategy = train.get("strategy", "full")
    if isinstance(strategy, (str, dict)):
        problems += [f"train.strategy: {p}" for p in check_strategy(strategy)]
    regularizer = train.get("regularizer")
    if isinstance(regularizer, (str, dict)):
        try:
            regularizer_config(regularizer)
        except (UnknownNameError, RecipeError) as e:
            problems.append(f"train.regularizer: {e}")
    compare = raw.get("compare")
    for i, c in enumerate(compare if isinstance(compare, list) else []):
        c = {"strategy": c} if isinstance(c, str) else c
        if not isinstance(c, dict):
            continue
        if isinstance(c.get("strategy"), (str, dict)):
            problems += [f"compare.{i}.strategy: {p}" for p in check_strategy(c["strategy"])]
        overrides = c.get("overrides")
        if isinstance(overrides, dict) and "mixed_precision" in overrides:
            problems += one_accelerator(f"compare.{i}.overrides.mixed_precision", overrides["mixed_precision"], raw)
        if isinstance(overrides, dict):
            problems += train_override_problems(f"compare.{i}.overrides", train, overrides)
    return problems


def extend(raw: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``transferkit train RUN_DIR strategy=NAME [label=...] [overrides.lr=...]``: one more compare entry."""
    usage = "train on a finished run takes a compare entry (strategy=NAME label=... overrides.KEY=value)"
    return append_entry(raw, "compare", CompareEntry, options, usage)


def _applies(recipe: Recipe) -> bool:
    return recipe.data is not None


STAGE = Stage(
    "train",
    run,
    _applies,
    done,
    load,
    keys=("train", "compare"),
    needs=("source", "target"),
    gives=("models",),
    check=check,
    extend=extend,
    example="strategy=bitfit label=bitfit-2 overrides.lr=0.01",
    help="train the main model and every compare entry on the same splits",
)
