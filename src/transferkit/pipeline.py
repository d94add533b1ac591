"""The pipeline's components as plain functions (the Python API): prepare the data, train a model by a strategy,
evaluate it.

``prepare_data`` -> ``build_target`` -> ``train`` -> ``evaluate``; ``transferkit.runner.run_recipe`` runs the same
components as the stages of a recipe.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
from collections.abc import Callable, Sized
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from transferkit.config import TrainConfig
from transferkit.data.prepare import PreparedData, prepare_data
from transferkit.engine.features import compute_features, feature_cache
from transferkit.engine.loop import JobPaths, evaluate_model, fit, make_accelerator
from transferkit.engine.objective import ClassificationObjective
from transferkit.engine.plan import ParamGroup, TrainPlan, apply_plan, trains_backbone
from transferkit.errors import RecipeError
from transferkit.io import load_state_dict, read_json, save_tensors, write_json
from transferkit.models.base import SourceModel
from transferkit.specs import split_spec
from transferkit.strategies import get_strategy
from transferkit.strategies.auto import resolve_auto
from transferkit.strategies.catalogue import describe_plans
from transferkit.strategies.regularizers import build_penalties

__all__ = [
    "PreparedData",
    "compute_features",
    "evaluate",
    "feature_cache",
    "fingerprint",
    "plan_stages",
    "prepare_data",
    "resolve_strategy",
    "train",
    "transferred_params",
]

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
    train_set: Dataset | None = None,
    objective: Callable[[ClassificationObjective], nn.Module] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place by ``cfg.strategy``, stage by stage; returns the summary (history, timings...).

    Args:
        model: the target (from ``build_target``).
        data: from ``prepare_data``.
        cfg: the training configuration.
        seed: fixes data order, dropout and augmentation (stage ``i`` uses ``seed + i``); ``cfg.seed``, when set,
            takes its place (as in a recipe).
        accelerator: from ``make_accelerator``; made here when None.
        paths: checkpoint and log locations; each stage checkpoints next to ``paths.checkpoint``.
        resume: continue from the checkpoints: finished stages are skipped, the interrupted one resumes.
        features: cached backbone features by split (computed here when a stage needs them and none are given).
        reference: the starting weights ``w0`` for regularisers, by parameter name; pass the source's own tensors
            to avoid a copy (default: a copy of the model's weights at the start). Only the weights that came from
            the source (``transferred_params``; for a model without that record, the backbone) take their ``w0``
            from it: every other weight, the new head first, is new (L2-SP gives it ``beta/2 ||w||^2``).
        source: the source model, used frozen by ``delta`` (default: a copy of the model at the start).
        on_step: called with the step number after each optimizer step (tests use it to interrupt).
        train_set: what the model trains on instead of the training split (distillation: the labelled examples and
            the unlabelled pool, with the teacher's outputs as targets).
        objective: makes the objective from the strategy's own (its label smoothing and penalties), e.g. a
            distillation objective. With ``train_set`` or ``objective``, every stage trains through the backbone
            (a strategy that trains on cached features is refused).

    A module the objective trains alongside the model (distillation's hint projections) is attached to it as
    ``model.aux``: its parameters train at ``cfg.lr`` in every stage, and it is removed from the model afterwards.

    Stages that cache features (``linear_probe``, the probe of ``lp_ft``) train only the head, on features
    computed once: the same computation as training through a frozen backbone in eval mode.

    A strategy that trains from random weights (``scratch``) refuses a model that holds transferred weights, as
    its transfer report or origin says (``build_target(source, labels)``): training it would fine-tune them.
    Build its target as a recipe does, ``build_target(source, labels, pretrained=False)``.
    """
    if cfg.seed is not None:
        seed = cfg.seed
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
                train_set=train_set,
                objective=objective,
            )
        finally:
            torch.set_num_threads(threads)
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    cfg, strategy, options, auto_reason = resolve_strategy(cfg, model, data)
    if auto_reason and accelerator.is_main_process:
        print(auto_reason)
    if strategy.from_scratch:
        _refuse_transferred(model, cfg.strategy_name)
    plans = plan_stages(strategy, options, model, cfg)
    custom = train_set is not None or objective is not None
    if custom and any(p.cached_features for p in plans):
        raise RecipeError(
            f"train.strategy {cfg.strategy_name!r} trains the head on cached features, but this training feeds the "
            "model other examples or another objective (distillation) through its backbone; choose a strategy "
            "that trains through the backbone (full, llrd, bitfit, lora, freeze...)"
        )
    aux = getattr(model, "aux", None)
    if isinstance(aux, nn.Module):
        names = [f"aux.{n}" for n, _ in aux.named_parameters()]
        plans = [dataclasses.replace(p, groups=[*p.groups, ParamGroup("aux", names, cfg.lr)]) for p in plans]
    make_objective = objective or (lambda base: base)
    extra = [split_spec(cfg.regularizer, "regularizer")] if cfg.regularizer else []
    specs = [name for p in plans for name, _ in p.regularizers] + [name for name, _ in extra]
    if specs:
        reference = _transferred_reference(model, reference)
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
                    train_set if train_set is not None else data.dataset("train", train=True),
                    data.dataset("val"),
                    stage_cfg,
                    plan,
                    num_classes=len(data.classes),
                    seed=seed + i,
                    accelerator=accelerator,
                    paths=stage_paths,
                    resume=resume,
                    objective=(plan.objective or make_objective)(
                        ClassificationObjective(
                            cfg.label_smoothing,
                            build_penalties(
                                plan.regularizers + extra,
                                reference or {},
                                source.backbone if source else None,
                                lambda n: _first_examples(data, n),
                            ),
                        )
                    ),
                    num_workers=data.cfg.num_workers,
                    on_step=on_step,
                    input_path=data.cfg.input,
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
                "speed": result.speed,
                "trainable_params": sum(model.get_parameter(n).numel() for n in plan.trainable()),
            }
            if done is not None and accelerator.is_main_process:
                save_tensors(done.with_suffix(".safetensors"), model.state_dict())
                write_json(done, summary)
            accelerator.wait_for_everyone()
        if trains_backbone(plan):  # features cached before (or given) are of the backbone before this stage
            features = None
        timing["train_s"] += summary["train_s"]
        trainable = max(trainable, summary["trainable_params"])
        history += [{**h, "epoch": h["epoch"] + epochs_before, "stage": summary["stage"]} for h in summary["history"]]
        epochs_before += summary["epochs_run"]
    if isinstance(aux, nn.Module):
        del model.aux
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
        "speed": summary.get("speed", {}),  # the last stage's: input path, precision, layout, optimizer, compile
        "stages": describe_plans(plans),
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "cached_features": plans[-1].cached_features,
        **({"auto": auto_reason} if auto_reason else {}),
    }


def transferred_params(model: nn.Module) -> dict[str, str] | None:
    """The model's parameters whose values came from a source, each with where from, by the record it carries.

    The transfer report (``build_target``, ``transfer``: the tensors it marks ``transferred``) when it has one;
    else its ``origin`` (``load_source``) less the head, which ``reset_head`` replaces without changing the
    origin (the rule ``transfer_report`` follows). None when the model carries neither record (built by hand,
    reloaded with ``load_model``): what its weights are is not known.
    """
    params = {n for n, _ in model.named_parameters()}
    report = getattr(model, "report", None)
    if isinstance(report, dict) and isinstance(report.get("tensors"), list):
        rows = [r for r in report["tensors"] if isinstance(r, dict) and r.get("status") == "transferred"]
        return {str(r["name"]): str(r.get("from", "")) for r in rows if r.get("name") in params}
    origin = getattr(model, "origin", None)
    if isinstance(origin, dict):
        return {n: str(o) for n, o in origin.items() if n in params and not n.startswith("head.")}
    return None


def _transferred_reference(model: SourceModel, reference: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``w0`` of the transferred weights only (from ``reference``, else a copy of the model's own): a new weight
    (the fresh head, or the source's unrelated head of the same shape) is never pulled towards a start point."""
    moved = transferred_params(model)
    keep = set(moved) if moved is not None else {f"backbone.{n}" for n, _ in model.backbone.named_parameters()}
    if reference is None:
        return {n: p.detach().clone() for n, p in model.named_parameters() if n in keep}
    return {n: t for n, t in reference.items() if n in keep}


def _refuse_transferred(model: nn.Module, strategy: str) -> None:
    """A from-scratch strategy on transferred weights would fine-tune them and report ``from_scratch``: refused."""
    moved = transferred_params(model)
    if not moved:
        return
    name, origin = next(iter(moved.items()))
    raise RecipeError(
        f"train.strategy {strategy!r} trains from random weights, but the model holds {len(moved)} parameter "
        f"tensors transferred from its source ({name} from {origin}, ...); training it would fine-tune them. "
        "Build the target from random weights, as a recipe does: build_target(source, labels, pretrained=False) "
        "(transfer_step(source, cfg, labels, pretrained=False) for a transfer: section), or choose a strategy "
        "that fine-tunes the transferred weights (full)."
    )


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


def _first_examples(data: PreparedData, n: int) -> tuple[Any, torch.Tensor]:
    """The first ``n`` training examples, unaugmented, as one batch ``(inputs, labels)`` (DELTA's attention)."""
    from torch.utils.data import Subset

    from transferkit.engine.loop import make_loader

    train = data.dataset("train")
    return next(iter(make_loader(Subset(train, list(range(min(n, len(cast(Sized, train)))))), n)))


def evaluate(
    model: SourceModel, dataset: Dataset, num_classes: int | None = None, batch_size: int = 32, device: Any = "cpu"
) -> dict[str, Any]:
    """Accuracy, macro-F1, loss and confusion matrix of a model on a dataset."""
    model.to(device)
    return evaluate_model(model, dataset, batch_size, num_classes or len(model.labels or []), device, desc="test")


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of every tensor of a model, in name order (equal weights <=> equal fingerprints)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
