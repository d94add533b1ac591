"""The pipeline a recipe describes, as plain functions: read it top to bottom in ``run_recipe``.

``load_source`` -> ``prepare_data`` -> for each strategy: ``build_target`` -> ``train`` -> ``evaluate``
-> select by validation -> save the model, ``metrics.json``, ``transfer_report.json``, ``report.html``.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from transferkit import __version__
from transferkit.data import Labelled, Splits, read_dataset, split_dataset
from transferkit.data.modality import make_dataset
from transferkit.engine.loop import (
    JobPaths,
    evaluate_model,
    fit,
    in_order,
    inference_pass,
    make_accelerator,
    to_device,
)
from transferkit.engine.objective import ClassificationObjective
from transferkit.errors import RecipeError, RunDirError, SourceError
from transferkit.io import (
    load_state_dict,
    read_json,
    replace_dir,
    safe_torch_load,
    save_tensors,
    torch_save,
    write_json,
    write_text,
)
from transferkit.models.vision import SourceModel, save_model
from transferkit.recipe import DataConfig, Recipe, SourceSpec, TrainConfig, dump_recipe, load_recipe
from transferkit.sources import load_source
from transferkit.strategies import get_strategy
from transferkit.strategies.auto import resolve_auto
from transferkit.strategies.base import ParamGroup, TrainPlan, apply_plan
from transferkit.strategies.catalogue import describe_plans
from transferkit.strategies.regularizers import build_penalties, regularizer_config
from transferkit.transfer import build_target

# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class PreparedData:
    """The dataset, its split, and the target's preprocessing (and tokenizer, for text)."""

    examples: Labelled
    splits: Splits
    preprocess: dict[str, Any]
    cfg: DataConfig
    processor: Any = None

    @property
    def classes(self) -> list[str]:
        return self.examples.classes

    @property
    def modality(self) -> str:
        return str(self.preprocess.get("modality", "image"))

    def items(self, split: str) -> Any:
        """The raw items of a split (paths, arrays, texts...), in split order; a lazy text column stays lazy."""
        idx = getattr(self.splits, split)
        source = self.examples.items
        return source.subset(idx) if hasattr(source, "subset") else [source[int(i)] for i in idx]

    def dataset(self, split: str, train: bool = False) -> Dataset:
        augment = self.cfg.augment if train and self.cfg.augment.enabled else None
        return make_dataset(
            self.modality,
            self.items(split),
            self.examples.labels[getattr(self.splits, split)],
            self.preprocess,
            self.processor,
            augment,
        )

    def summary(self) -> dict[str, Any]:
        size: dict[str, Any] = {}
        if self.modality == "image":
            size = {"image_size": self.preprocess["input_size"][-1]}
        elif self.modality == "text":
            size = {"max_length": self.preprocess["max_length"]}
        elif self.modality == "audio" and "sampling_rate" in self.preprocess:
            from transferkit.data.audio import resampling_note

            size = {"audio": resampling_note(self.examples.items, int(self.preprocess["sampling_rate"]))}
        return {
            "dataset": self.cfg.dataset,
            "modality": self.modality,
            "classes": self.classes,
            "num_classes": len(self.classes),
            "splits": self.splits.sizes(),
            "per_class": self.cfg.per_class,
            **size,
            "skipped": self.examples.skipped,
            "skipped_count": len(self.examples.skipped),
        }


def prepare_data(cfg: DataConfig, source: SourceModel | dict[str, Any], seed: int) -> PreparedData:
    """Read the dataset, split it (seeded, stratified) and take the preprocessing from the source.

    ``source`` is the source model (its ``preprocess`` and, for text, its tokenizer), or a bare ``preprocess`` dict
    for images.
    """
    processor = getattr(source, "processor", None)
    source_preprocess = source.preprocess if isinstance(source, SourceModel) else source
    modality = str(source_preprocess.get("modality", "image"))
    examples = read_dataset(
        cfg.dataset, strict=cfg.strict, modality=modality, text_column=cfg.text_column, label_column=cfg.label_column
    )
    if cfg.classes:
        examples = examples.select_classes(cfg.classes)
    splits = split_dataset(
        examples.labels, examples.classes, seed, cfg.test_size, cfg.per_class, cfg.val_per_class, cfg.val_fraction
    )
    preprocess = dict(source_preprocess)
    if cfg.image_size and modality == "image":
        preprocess["input_size"] = [preprocess["input_size"][0], cfg.image_size, cfg.image_size]
    if cfg.max_length and modality == "text":
        limit = int(preprocess.get("max_length_limit", cfg.max_length))
        if cfg.max_length > limit:
            raise RecipeError(f"data.max_length={cfg.max_length} is more than the source accepts ({limit} tokens)")
        preprocess["max_length"] = cfg.max_length
    return PreparedData(examples, splits, preprocess, cfg, processor)


@torch.no_grad()
def compute_features(
    backbone: nn.Module, dataset: Dataset, batch_size: int = 32, device: Any = "cpu", desc: str = "features"
) -> torch.Tensor:
    """Backbone features of every example, in order, in eval mode (what a frozen backbone sees).

    The default batch of 32 is faster per image on CPU than 64 (measured in bench/linear_probe.py: activations
    over 32 MB are returned to the kernel after each operation and faulted back in).
    """
    backbone.eval().to(device)
    with inference_pass(backbone, len(dataset), batch_size) as run:
        return in_order(dataset, batch_size, lambda x: run(to_device(x, device)), desc=desc)[0]


# ----------------------------------------------------------------------------------------------------------------
# Training one model


def train(
    model: SourceModel,
    data: PreparedData,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    accelerator: Any = None,
    paths: JobPaths | None = None,
    resume: bool = False,
    features: dict[str, torch.Tensor] | None = None,
    reference: dict[str, torch.Tensor] | None = None,
    source: SourceModel | None = None,
    on_step: Any = None,
) -> dict[str, Any]:
    """Train ``model`` in place by ``cfg.strategy``, stage by stage; returns the summary (history, timings...).

    Args:
        model: the target (from ``build_target``).
        data: from ``prepare_data``.
        cfg: the training configuration.
        seed: fixes data order, dropout and augmentation (stage ``i`` uses ``seed + i``).
        accelerator: from ``make_accelerator``; made here when None.
        paths: checkpoint and log locations; each stage checkpoints next to ``paths.checkpoint``.
        resume: continue from the checkpoints: finished stages are skipped, the interrupted one resumes.
        features: cached backbone features by split (computed here when a stage needs them and none are given).
        reference: the starting weights ``w0`` for regularisers, by parameter name; pass the source's own tensors
            to avoid a copy (default: a copy of the model's weights at the start).
        source: the source model, used frozen by ``delta`` (default: a copy of the model at the start).
        on_step: called with the step number after each optimizer step (tests use it to interrupt).

    Stages that cache features (``linear_probe``, the probe of ``lp_ft``) train only the head, on features
    computed once: the same computation as training through a frozen backbone in eval mode.
    """
    if cfg.threads:
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            return train(
                model,
                data,
                cfg.model_copy(update={"threads": None}),
                seed=seed,
                accelerator=accelerator,
                paths=paths,
                resume=resume,
                features=features,
                reference=reference,
                source=source,
                on_step=on_step,
            )
        finally:
            torch.set_num_threads(threads)
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    cfg, strategy, options, auto_reason = resolve_strategy(cfg, model, data)
    if auto_reason and accelerator.is_main_process:
        print(auto_reason)
    plans = plan_stages(strategy, options, model, cfg)
    extra = [(regularizer_config(cfg.regularizer)[0], _options(cfg.regularizer))] if cfg.regularizer else []
    specs = [name for p in plans for name, _ in p.regularizers] + [name for name, _ in extra]
    if reference is None and specs:
        reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    if source is None and "delta" in specs:
        source = copy.deepcopy(model)
    timing: dict[str, float] = {"train_s": 0.0}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    epochs_before, trainable = 0, 0
    for i, plan in enumerate(plans):
        stage_cfg = cfg.model_copy(update={"epochs": plan.epochs or cfg.epochs})
        stage_paths = _stage_paths(paths, i, plan, len(plans))
        done = stage_paths.checkpoint.with_suffix(".done.json") if stage_paths else None
        if resume and done is not None and done.exists():  # a finished stage: take its weights, go on
            model.load_state_dict(load_state_dict(done.with_suffix(".safetensors")))
            summary = read_json(done)
        else:
            apply_plan(model, plan)
            if plan.cached_features:
                t = time.perf_counter()
                features = features or feature_cache(model, data, accelerator.device, splits=("train", "val"))
                timing["features_s"] = timing.get("features_s", 0.0) + time.perf_counter() - t
                head_refs = {k.removeprefix("head."): v for k, v in (reference or {}).items() if k.startswith("head.")}
                # the backbone is frozen here: penalties on feature maps (delta) have nothing to act on
                specs_here = [r for r in plan.regularizers + extra if r[0] != "delta"]
                objective = ClassificationObjective(cfg.label_smoothing, build_penalties(specs_here, head_refs))
                result = fit(
                    model.head,
                    _features_dataset(features, data, "train"),
                    _features_dataset(features, data, "val"),
                    stage_cfg,
                    _head_only(plan),
                    num_classes=len(data.classes),
                    seed=seed + i,
                    accelerator=accelerator,
                    paths=stage_paths,
                    resume=resume,
                    objective=objective,
                    on_step=on_step,
                )
                model.head.load_state_dict(result.best_state)
            else:
                result = fit(
                    model,
                    data.dataset("train", train=True),
                    data.dataset("val"),
                    stage_cfg,
                    plan,
                    num_classes=len(data.classes),
                    seed=seed + i,
                    accelerator=accelerator,
                    paths=stage_paths,
                    resume=resume,
                    objective=ClassificationObjective(
                        cfg.label_smoothing,
                        build_penalties(
                            plan.regularizers + extra, reference or {}, source.backbone if source else None
                        ),
                    ),
                    num_workers=data.cfg.num_workers,
                    on_step=on_step,
                )
                model.load_state_dict(result.best_state)
            summary = {
                "stage": plan.name,
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "steps": result.steps,
                "history": result.history,
                "val": result.best_val,
                "train_s": result.train_s,
                "resumed_from_step": result.resumed_from_step,
                "trainable_params": sum(model.get_parameter(n).numel() for n in plan.trainable()),
            }
            if done is not None and accelerator.is_main_process:
                save_tensors(done.with_suffix(".safetensors"), model.state_dict())
                write_json(done, summary)
            accelerator.wait_for_everyone()
        timing["train_s"] += summary["train_s"]
        trainable = max(trainable, summary["trainable_params"])
        history += [{**h, "epoch": h["epoch"] + epochs_before, "stage": summary["stage"]} for h in summary["history"]]
        epochs_before += summary["epochs_run"]
    finish = getattr(strategy, "finish", None)
    if finish is not None:  # e.g. LoRA's merge into plain weights
        finish(model, options)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {
        "strategy": cfg.strategy_name,
        "from_scratch": strategy.from_scratch,
        "best_epoch": summary["best_epoch"] + epochs_before - summary["epochs_run"],
        "epochs_run": epochs_before,
        "history": history,
        "val": summary["val"],
        "timing": timing,
        "resumed_from_step": summary["resumed_from_step"],
        "stages": describe_plans(plans),
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "cached_features": plans[-1].cached_features,
        **({"auto": auto_reason} if auto_reason else {}),
    }


def resolve_strategy(
    cfg: TrainConfig, model: SourceModel, data: PreparedData
) -> tuple[TrainConfig, Any, Any, str | None]:
    """The strategy and its options; ``auto`` is replaced by the strategy its rule picks for this data and model."""
    strategy, options = get_strategy(cfg.strategy)
    if cfg.strategy_name != "auto":
        return cfg, strategy, options, None
    per_class = int(np.bincount(data.examples.labels[data.splits.train]).min())
    chosen, reason = resolve_auto(options, model, per_class)
    cfg = cfg.model_copy(update={"strategy": chosen})
    strategy, options = get_strategy(chosen)
    return cfg, strategy, options, reason


def plan_stages(strategy: Any, options: Any, model: SourceModel, cfg: TrainConfig) -> list[TrainPlan]:
    """The strategy's plan as a list of stages; a plan that cannot fit this model is a recipe error."""
    try:
        plan = strategy.plan(model, options, cfg)
    except ValueError as e:
        raise RecipeError(f"train.strategy {cfg.strategy_name!r}: {e}") from e
    return plan if isinstance(plan, list) else [plan]


def _options(spec: str | dict[str, Any]) -> dict[str, Any]:
    return {} if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "name"}


def _stage_paths(paths: JobPaths | None, index: int, plan: TrainPlan, stages: int) -> JobPaths | None:
    """One checkpoint per stage (``stage1-ft.pt``); a single-stage strategy keeps ``last.pt``."""
    if paths is None or stages == 1:
        return paths
    return JobPaths(
        paths.checkpoint.with_name(f"stage{index}-{plan.name}.pt"), paths.metrics_log, f"{paths.job}/{plan.name}"
    )


def _head_only(plan: TrainPlan) -> TrainPlan:
    """The plan re-rooted at the head module: parameter names without the ``head.`` prefix."""
    groups = [
        ParamGroup(g.name, [p.removeprefix("head.") for p in g.params], g.lr, g.weight_decay) for g in plan.groups
    ]
    return TrainPlan(groups)


def _features_dataset(features: dict[str, torch.Tensor], data: PreparedData, split: str) -> TensorDataset:
    return TensorDataset(features[split], torch.as_tensor(data.examples.labels[getattr(data.splits, split)]))


def feature_cache(
    model: SourceModel,
    data: PreparedData,
    device: Any = "cpu",
    cache_file: Path | None = None,
    splits: tuple[str, ...] = ("train", "val", "test"),
    known: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Backbone features of the splits, computed once (and read back from ``cache_file`` when it exists).

    ``known`` holds splits already computed by the same backbone (the ``rank:`` step's forward pass over the
    training split), which are not computed again.
    """
    if cache_file is not None and cache_file.exists():
        return safe_torch_load(cache_file)
    feats = dict(known or {})
    feats.update(
        {
            s: compute_features(model.backbone, data.dataset(s), device=device, desc=f"features {s}")
            for s in splits
            if s not in feats
        }
    )
    if cache_file is not None:
        torch_save(cache_file, feats)
    return feats


def evaluate(
    model: SourceModel, dataset: Dataset, num_classes: int | None = None, batch_size: int = 32, device: Any = "cpu"
) -> dict[str, Any]:
    """Accuracy, macro-F1, loss and confusion matrix of a model on a dataset."""
    model.to(device)
    return evaluate_model(model, dataset, batch_size, num_classes or len(model.labels or []), device, desc="test")


def _fingerprint(model: nn.Module) -> str:
    """SHA-256 of every tensor of a model, in name order (equal weights <=> equal fingerprints)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# The run directory


def _recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()[:16]


def prepare_run_dir(out: Path, recipe: Recipe, resume: bool, overwrite: bool, main: bool = True) -> None:
    """Refuse to write over a different run; ``--resume`` continues the same run, ``--overwrite`` replaces it."""
    run_file = out / "run.json"
    if out.exists() and any(out.iterdir()):
        if overwrite:
            if not run_file.exists():
                raise RunDirError(
                    f"'{out}' is not a transferkit run directory (no run.json); --overwrite deletes only "
                    "runs. Choose another --out or empty it yourself."
                )
            if main:
                shutil.rmtree(out)
        elif resume and run_file.exists():
            if read_json(run_file).get("recipe_hash") != _recipe_hash(recipe):
                raise RunDirError(
                    f"'{out}' holds a run of a different recipe; --resume continues only the same "
                    "recipe. Use another --out, or --overwrite to replace it."
                )
        elif resume:
            raise RunDirError(
                f"'{out}' is not a transferkit run directory (no run.json): nothing to resume. "
                "Use another --out, or --overwrite to replace its contents."
            )
        else:
            what = "a run" if run_file.exists() else "files"
            raise RunDirError(
                f"'{out}' already holds {what}. Pass --resume to continue it, --overwrite to replace "
                "it, or choose another --out."
            )


def make_target(source: SourceModel, recipe: Recipe, labels: list[str] | None, pretrained: bool = True) -> SourceModel:
    """The target of a run: the source with a new head (``build_target``), or, with a ``transfer:`` step, the
    architecture it names filled from the source (``transfer_step``). ``labels=None``: only its input format."""
    if recipe.transfer is None:
        return build_target(source, labels or [], pretrained=pretrained, seed=recipe.seed)
    from transferkit.transfer.api import transfer_step

    target = transfer_step(source, recipe.transfer, labels, seed=recipe.seed, pretrained=pretrained)
    if getattr(target, "processor", None) is None:
        target.processor = source.processor
    return target


def pretrain_step(
    recipe: Recipe, out: Path, resume: bool, accelerator: Any, log: Any
) -> tuple[SourceSpec, dict[str, Any]]:
    """Train the recipe's source on its own task (``pretrain:``) and save it as ``pretrain/model``; the run's
    ``train``/``compare`` then start from that folder. Returns its spec and a summary (data, test metrics).

    ``pretrain/`` holds ``model/``, ``metrics.json`` and the checkpoints; ``--resume`` reuses a finished pretraining
    and continues an interrupted one exactly.
    """
    assert recipe.pretrain is not None and recipe.source is not None
    folder = out / "pretrain"
    done = folder / "metrics.json"
    spec = SourceSpec(name=str(folder / "model"))
    if resume and done.exists():
        summary = read_json(done)
        log(f"[pretrain] already trained: test accuracy {summary['test']['accuracy']:.4f}")
        return spec, _pretrain_summary(summary)
    torch.manual_seed(recipe.seed)  # a source without pretrained weights is initialised reproducibly
    source = load_source(recipe.source)
    data = prepare_data(recipe.pretrain.data, source, recipe.seed)
    log(f"[pretrain] {recipe.source.name} on {data.cfg.dataset}: {data.splits.sizes()} | {len(data.classes)} classes")
    model = build_target(source, data.classes, pretrained=True, seed=recipe.seed)
    model.preprocess = data.preprocess
    model.to(accelerator.device)
    job = train(
        model,
        data,
        recipe.pretrain.train,
        seed=recipe.seed,
        accelerator=accelerator,
        resume=resume,
        paths=JobPaths(folder / "checkpoints" / "last.pt", folder / "metrics.jsonl", "pretrain"),
    )
    job["test"] = evaluate(model, data.dataset("test"), len(data.classes), device=accelerator.device)
    summary = {"source": recipe.source.name, "data": data.summary(), **job}
    if accelerator.is_main_process:
        save_model(
            model.cpu(),
            folder / "model",
            extra={"strategy": job["strategy"], "run": recipe.name, "pretrained_on": data.cfg.dataset},
        )
        write_json(done, summary)
    accelerator.wait_for_everyone()
    log(
        f"[pretrain] test accuracy {job['test']['accuracy']:.4f} | val accuracy {job['val']['accuracy']:.4f} | "
        f"train {job['timing']['train_s']:.1f}s"
    )
    return spec, _pretrain_summary(summary)


def _pretrain_summary(summary: dict[str, Any]) -> dict[str, Any]:
    data = summary["data"]
    return {
        "source": summary["source"],
        "dataset": data["dataset"],
        "classes": data["classes"],
        "splits": data["splits"],
        "test": {k: summary["test"][k] for k in ("accuracy", "macro_f1", "n")},
        "val_accuracy": summary["val"].get("accuracy"),
        "epochs_run": summary["epochs_run"],
        "train_s": summary["timing"]["train_s"],
    }


def _baselines_step(recipe: Recipe, data: PreparedData, log: Any) -> dict[str, Any]:
    """The recipe's ``baselines`` on the run's splits (cheap; computed again on resume, same result)."""
    from transferkit.evaluation.baselines import run_baselines

    try:
        baselines = run_baselines(recipe.baselines, data)
    except ValueError as e:
        raise RecipeError(f"baselines: {e}") from e
    for name, b in baselines.items():
        log(f"[baseline {name}] test accuracy {b['test']['accuracy']:.4f} | macro-F1 {b['test']['macro_f1']:.4f}")
    return baselines


def rank_step(
    recipe: Recipe, out: Path, resume: bool, main: bool, log: Any
) -> tuple[SourceSpec, dict[str, torch.Tensor] | None]:
    """Rank the recipe's candidate sources (one forward pass each); the winner's spec and, when the ranking saw
    the whole training split, the winner's training features (a later linear probe reuses them).

    Writes ``rank.json``; on ``--resume`` the winner is read back from it instead of ranking again. Every process
    ranks (the result is deterministic); only the main one writes.
    """
    from transferkit.rank import rank_candidates

    assert recipe.rank is not None
    rank_file = out / "rank.json"
    if resume and rank_file.exists():
        rows = read_json(rank_file)["rows"]
    else:
        rows = rank_candidates(
            recipe.data,
            [c.model_dump() for c in recipe.rank.candidates],
            recipe.rank.max_examples,
            recipe.rank.score,
            seed=recipe.seed,
            return_features=True,
        )
        if main:
            kept = [{k: v for k, v in r.items() if k not in ("features", "example_positions")} for r in rows]
            write_json(rank_file, {"score": recipe.rank.score, "rows": kept})
    if rows[0]["status"] != "ok":
        reasons = "; ".join(str(r.get("error")) for r in rows)
        raise SourceError(f"no candidate source could be ranked: {reasons}")
    for r in rows:
        value = r["scores"].get(recipe.rank.score)
        log(
            f"rank {r['rank']}: {r['candidate']}  {recipe.rank.score}="
            f"{value if value is None else round(value, 4)}  {r['status']}"
        )
    spec = SourceSpec(**rows[0]["spec"]) if isinstance(rows[0]["spec"], dict) else SourceSpec(name=rows[0]["spec"])
    whole_split = recipe.rank.max_examples is None and rows[0].get("features") is not None
    return spec, (rows[0]["features"] if whole_split else None)


def run_recipe(
    recipe: Recipe | str | Path,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    overrides: list[str] | None = None,
) -> Path:
    """Run a whole recipe and write its run directory; returns the directory."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    out = Path(out or Path("runs") / recipe.name)
    t_start = time.perf_counter()
    accelerator = make_accelerator(recipe.train.mixed_precision)
    main = accelerator.is_main_process
    prepare_run_dir(out, recipe, resume, overwrite, main)
    accelerator.wait_for_everyone()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "recipe.yaml", dump_recipe(recipe))
        write_json(
            out / "run.json",
            {
                "recipe_hash": _recipe_hash(recipe),
                "transferkit_version": __version__,
                "status": "running",
                "world_size": accelerator.num_processes,
                "distributed_type": str(accelerator.distributed_type.value),
                "device": str(accelerator.device),
            },
        )
    accelerator.wait_for_everyone()
    log = print if main else (lambda *a, **k: None)
    if recipe.recsys is not None:  # a recommendation task: its own data, models and metrics (transferkit.recsys.run)
        from transferkit.recsys.run import run_recsys

        return run_recsys(recipe, out, resume, log) if main else out

    t = time.perf_counter()
    source_spec, known_features = (
        (recipe.source, None) if recipe.rank is None else rank_step(recipe, out, resume, main, log)
    )
    pretrain_summary = None
    if recipe.pretrain is not None:
        source_spec, pretrain_summary = pretrain_step(recipe, out, resume, accelerator, log)
    if source_spec is None:
        raise RecipeError("the recipe names no source: give source: NAME, or rank: {candidates: [...]}")
    torch.manual_seed(recipe.seed)  # a source without pretrained weights is initialised reproducibly
    source = load_source(source_spec)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    # with a transfer: step the data takes the target's input format (e.g. 1 channel), not the source's: the
    # target architecture alone tells it (pretrained=False: built, not filled)
    data = prepare_data(
        recipe.data,
        source if recipe.transfer is None else make_target(source, recipe, None, pretrained=False),
        recipe.seed,
    )
    data_s = time.perf_counter() - t
    log(
        f"source {source_spec.name} | data {data.cfg.dataset}: {data.splits.sizes()} | "
        f"{len(data.classes)} classes | skipped {len(data.examples.skipped)} unreadable"
    )

    results: dict[str, Any] = {}
    features: dict[str, torch.Tensor] | None = None
    features_s = 0.0  # counted once, by the job that computed the cached features
    report: dict[str, Any] | None = None
    for name, cfg in recipe.trainings():
        job_dir = out / "checkpoints" / name
        done_file = job_dir / "result.json"
        if resume and done_file.exists():
            results[name] = read_json(done_file)
            log(f"[{name}] already trained: test accuracy {results[name]['test']['accuracy']:.4f}")
            continue
        strategy, _ = get_strategy(cfg.strategy)
        target = make_target(source, recipe, data.classes, pretrained=not strategy.from_scratch)
        target.preprocess = data.preprocess
        if name == recipe.train.strategy_name:
            report = target.report
        target.to(accelerator.device)
        resolved_cfg, resolved, resolved_options, _ = resolve_strategy(cfg, target, data)
        plans = plan_stages(resolved, resolved_options, target, resolved_cfg)
        plan_caches = any(p.cached_features for p in plans)
        if plan_caches and features is None:
            t = time.perf_counter()
            features = feature_cache(
                target, data, accelerator.device, out / "cache" / "features.pt" if main else None, known=known_features
            )
            features_s = time.perf_counter() - t
        # every rank reads the checkpoint on resume; only the main process writes (fit checks)
        paths = JobPaths(job_dir / "last.pt", out / "metrics.jsonl", name)
        # w0 for regularisers: the source's own tensors (no copy) when the target has the source's names; after a
        # transfer: step, train() copies the target's starting weights (and delta its starting network)
        same_names = recipe.transfer is None and not strategy.from_scratch
        job = train(
            target,
            data,
            cfg,
            seed=recipe.seed,
            accelerator=accelerator,
            paths=paths,
            resume=resume,
            features=features,
            reference=source.state_dict() if same_names else None,
            source=source if same_names else None,
        )
        if plan_caches:
            job["timing"]["features_s"], features_s = features_s, 0.0
        t = time.perf_counter()
        if plans[-1].cached_features:  # only the head changed: the test set's cached features serve
            test_set: Dataset = TensorDataset(features["test"], torch.as_tensor(data.examples.labels[data.splits.test]))
            test = evaluate_model(target.head, test_set, 256, len(data.classes), accelerator.device)
        else:
            test = evaluate(target, data.dataset("test"), len(data.classes), device=accelerator.device)
        job["timing"]["test_s"] = time.perf_counter() - t
        job["test"] = test
        job["weights_sha256"] = _fingerprint(target)
        if accelerator.num_processes > 1:  # every process must end with the same weights: record the evidence
            from accelerate.utils import gather_object

            job["rank_weights_sha256"] = gather_object([job["weights_sha256"]])
        results[name] = job
        if main:
            save_model(target.cpu(), out / "models" / name, extra={"strategy": job["strategy"], "run": recipe.name})
            write_json(done_file, job)
        accelerator.wait_for_everyone()
        log(
            f"[{name}] test accuracy {test['accuracy']:.4f} | macro-F1 {test['macro_f1']:.4f} | "
            f"val accuracy {job['val'].get('accuracy', float('nan')):.4f} | train {job['timing']['train_s']:.1f}s"
        )

    baselines = _baselines_step(recipe, data, log)
    monitor = recipe.train.monitor.removeprefix("val_")
    pick = max if monitor != "loss" else min
    selected = pick(results, key=lambda n: results[n]["val"].get(monitor, float("-inf")))
    metrics = {
        "run": recipe.name,
        "source": source_spec.name,
        "selected": selected,
        "selected_by": recipe.train.monitor,
        "transferkit_version": __version__,
        "data": data.summary(),
        "models": results,
        **({"baselines": baselines} if baselines else {}),
        **({"pretrain": pretrain_summary} if pretrain_summary else {}),
        "timings": {"load_source_s": load_s, "data_s": data_s, "total_s": time.perf_counter() - t_start},
    }
    if main:
        if report is None:
            report = make_target(source, recipe, data.classes).report
        write_json(out / "transfer_report.json", report)
        replace_dir(out / "model", lambda tmp: shutil.copytree(out / "models" / selected, tmp, dirs_exist_ok=True))
        write_json(out / "metrics.json", metrics)
        from transferkit.evaluation.report import write_report

        write_report(out)
        write_json(out / "run.json", {**read_json(out / "run.json"), "status": "done"})
    accelerator.wait_for_everyone()
    return out
