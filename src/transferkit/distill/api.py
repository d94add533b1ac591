"""``distill``: a student learns from a teacher on the labelled examples and the unlabelled pool, round by round.

Read it top to bottom: each round takes a teacher (the given one, then the previous round's student), builds the
student's training set (labelled examples + the pool; for ``pseudo_label`` the pool examples the teacher is
confident about, with its classes as labels), computes the teacher's outputs once when the inputs are not
augmented, and trains the student by its strategy through ``pipeline.train`` with the distillation objective.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, default_collate

from transferkit.config import TrainConfig
from transferkit.data.prepare import PreparedData, adjusted_preprocess
from transferkit.distill.losses import (
    UNLABELLED,
    FixMatchConfig,
    HintConfig,
    PseudoLabelConfig,
    confident,
    loss_config,
)
from transferkit.distill.objective import DistillObjective, FixMatchObjective, Hints
from transferkit.distill.teacher import Teacher, cached_outputs
from transferkit.engine.loop import JobPaths, make_accelerator, make_loader, to_device
from transferkit.errors import RecipeError
from transferkit.io import load_state_dict, read_json, save_tensors, write_json
from transferkit.models.base import SourceModel
from transferkit.pipeline import train


class DistillSet(Dataset):
    """Examples of datasets of one modality, in order, with their labels and per-example teacher outputs.

    Yields ``(input, label)``, or ``(input, {"label": ..., **extras})`` when there are extras (the teacher's
    cached logits and features) or second views (``strong``: another view of the same example, e.g. FixMatch's
    strong augmentation); ``collate`` batches the inputs with the first dataset's own collate.
    """

    def __init__(
        self,
        parts: Sequence[Dataset],
        labels: torch.Tensor,
        extras: dict[str, torch.Tensor] | None = None,
        views: Sequence[Dataset | None] | None = None,
    ):
        self.parts = list(parts)
        self.views = list(views) if views is not None else None  # per part: a second view of each example, or None
        self.ends = np.cumsum([len(cast(Any, p)) for p in self.parts])
        self.labels = labels.long()
        self.extras = extras or {}
        if len(self.labels) != (self.ends[-1] if len(self.ends) else 0):
            raise ValueError(f"{len(self.labels)} labels for {self.ends[-1]} examples")
        inner = self.parts[0]
        inner = inner.dataset if isinstance(inner, Subset) else inner
        self._collate = getattr(inner, "collate", None)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        part = int(np.searchsorted(self.ends, i, side="right"))
        start = int(self.ends[part - 1]) if part else 0
        x, _ = self.parts[part][i - start]
        if not self.extras and self.views is None:
            return x, self.labels[i]
        target = {"label": self.labels[i], **{k: v[i] for k, v in self.extras.items()}}
        if self.views is not None:  # the part's second view (FixMatch's strong view), else the input again
            view = self.views[part]
            target["strong"] = view[i - start][0] if view is not None else x
        return x, target

    def collate(self, batch: list[tuple[Any, Any]]) -> tuple[Any, Any]:
        inputs, targets = [b[0] for b in batch], [b[1] for b in batch]
        if self._collate is not None:
            x = self._collate([(v, torch.zeros((), dtype=torch.long)) for v in inputs])[0]
        else:
            x = default_collate(inputs)
        return x, default_collate(targets)


def for_model(data: PreparedData, model: Any) -> PreparedData:
    """The same examples and splits with ``model``'s own preprocessing (and tokenizer)."""
    processor = getattr(model, "processor", None) or data.processor
    mine = dataclasses.replace(data, preprocess=adjusted_preprocess(model.preprocess, data.cfg), processor=processor)
    mine._pool = data._pool  # the pool, once read, is the same examples
    return mine


def check_teacher_labels(teachers: Sequence[SourceModel], classes: list[str]) -> None:
    """Every teacher predicts the data's classes, in the data's order (their logits are the student's targets)."""
    for i, t in enumerate(teachers):
        if list(t.labels or []) != list(classes):
            raise RecipeError(
                f"teacher {i} predicts {t.labels or 'classes without names'}, the data has {classes}: a teacher's "
                "outputs must be the data's classes in the same order (train it on this dataset, or select "
                "data.classes to match it)"
            )


def _pool_size(data: PreparedData) -> int:
    pool = data.unlabelled()
    return 0 if pool is None else len(pool.items)


def _teacher_sets(teacher: Teacher, data: PreparedData, pool: bool) -> list[Dataset]:
    """For each teacher member, the training split (+ the pool) with the member's own preprocessing, unaugmented."""
    out: list[Dataset] = []
    for member in teacher.models:
        mine = for_model(data, member)
        parts = [mine.dataset("train")] + ([mine.pool_dataset()] if pool else [])
        out.append(DistillSet(parts, torch.zeros(sum(len(cast(Any, p)) for p in parts), dtype=torch.long)))
    return out


def _pool_accuracy(data: PreparedData, predicted: torch.Tensor, mask: torch.Tensor | None = None) -> float | None:
    pool = data.unlabelled()
    if pool is None or pool.labels is None:
        return None
    truth = torch.as_tensor(np.asarray(pool.labels))
    keep = mask if mask is not None else torch.ones_like(truth, dtype=torch.bool)
    return float((predicted[keep] == truth[keep]).float().mean()) if int(keep.sum()) else None


def _first_batch(dataset: DistillSet, device: Any) -> Any:
    """The inputs of a batch of a dataset's first two examples (one, when it has one), on ``device``."""
    return to_device(next(iter(make_loader(dataset, batch_sampler=[[0, min(1, len(dataset) - 1)]])))[0], device)


def _confident_pool(model: SourceModel, data: PreparedData, threshold: float, device: Any) -> dict[str, Any]:
    """How many pool examples the model predicts with at least ``threshold`` confidence (clean inputs), and how
    many of those predictions are right where the pool has true labels."""
    from transferkit.engine.loop import predict_logits

    logits, _ = predict_logits(model, data.pool_dataset(), 64, device)
    classes, keep = confident(F.softmax(logits, 1), threshold)
    return {
        "kept": int(keep.sum()),
        "kept_per_class": torch.bincount(classes[keep], minlength=len(data.classes)).tolist(),
        "pseudo_label_accuracy": _pool_accuracy(data, classes, keep),
    }


def training_set(
    teacher: Teacher | None,
    data: PreparedData,
    loss: Any,
    *,
    use_pool: bool,
    online: bool,
    device: Any,
    cache_file: Path | None = None,
) -> tuple[DistillSet, dict[str, Any]]:
    """The student's training set for one round, and what the run records about the pool.

    ``data`` has the student's preprocessing. Without ``online`` the teacher's outputs are computed once here
    (on unaugmented inputs, with each teacher's own preprocessing) and travel with each example.
    """
    cfg = loss
    pool = data.unlabelled() if use_pool else None
    labelled = torch.as_tensor(data.examples.labels[data.splits.train])
    parts: list[Dataset] = [data.dataset("train", train=True)]
    info: dict[str, Any] = {"labelled": len(labelled), "pool": 0 if pool is None else len(pool.items)}
    if isinstance(cfg, PseudoLabelConfig):
        if pool is None:
            raise RecipeError(
                "loss pseudo_label labels the unlabelled pool, but the run has none: set data.unlabelled "
                "(rest, or a folder/file of unlabelled examples) and leave the entry's unlabelled: true"
            )
        assert teacher is not None
        pool_sets = [for_model(data, m).pool_dataset() for m in teacher.models]
        outputs = cached_outputs(teacher, pool_sets, device=device, cache_file=cache_file)
        classes, keep = confident(F.softmax(outputs["logits"], 1), cfg.threshold)
        kept = torch.nonzero(keep).flatten()
        parts.append(Subset(data.pool_dataset(train=True), kept.tolist()))
        info.update(
            threshold=cfg.threshold,
            kept=len(kept),
            kept_per_class=torch.bincount(classes[kept], minlength=len(data.classes)).tolist(),
            pseudo_label_accuracy=_pool_accuracy(data, classes, keep),
            teacher_pool_accuracy=_pool_accuracy(data, classes),
        )
        return DistillSet(parts, torch.cat([labelled, classes[kept]])), info
    if isinstance(cfg, FixMatchConfig):
        if pool is None:
            raise RecipeError(
                "loss fixmatch trains on the unlabelled pool, but the run has none: set data.unlabelled (rest, or "
                "a folder of unlabelled images) and leave the entry's unlabelled: true"
            )
        repeats = cfg.labelled_repeats(len(labelled), len(pool.items))  # FixMatch's mu pool examples per label
        parts = parts * repeats + [data.pool_dataset(train=True)]  # the weak view: the run's own augmentation
        strong = data.strong_pool_dataset(cfg.ops, cfg.magnitude)
        unlabelled = torch.full((len(pool.items),), UNLABELLED, dtype=torch.long)
        labels_all = torch.cat([labelled.repeat(repeats), unlabelled])
        info.update(threshold=cfg.threshold, labelled_repeats=repeats)
        return DistillSet(parts, labels_all, views=[*[None] * repeats, strong]), info
    labels = [labelled]
    if pool is not None:
        parts.append(data.pool_dataset(train=True))
        labels.append(torch.full((len(pool.items),), UNLABELLED, dtype=torch.long))
    extras: dict[str, torch.Tensor] = {}
    if not online:
        assert teacher is not None
        with_features = isinstance(cfg, HintConfig)
        outputs = cached_outputs(
            teacher,
            _teacher_sets(teacher, data, pool is not None),
            with_features=with_features,
            device=device,
            cache_file=cache_file,
        )
        extras = {"teacher": outputs["logits"]}
        if with_features:
            extras["teacher_features"] = outputs["features"]
        if pool is not None:
            info["teacher_pool_accuracy"] = _pool_accuracy(data, outputs["logits"][len(labelled) :].argmax(1))
    return DistillSet(parts, torch.cat(labels), extras), info


def distill(
    student: SourceModel,
    teachers: SourceModel | Sequence[SourceModel],
    data: PreparedData,
    cfg: TrainConfig,
    loss: str | dict[str, Any] = "kd",
    *,
    rounds: int = 1,
    unlabelled: bool = True,
    seed: int = 0,
    accelerator: Any = None,
    paths: JobPaths | None = None,
    resume: bool = False,
    cache_dir: Path | None = None,
    on_round: Callable[[int, SourceModel], dict[str, Any]] | None = None,
    on_step: Any = None,
) -> dict[str, Any]:
    """Train ``student`` in place from ``teachers``; returns the training summary with a ``distill`` section.

    Args:
        student: the student (any architecture with a head for the data's classes: ``build_target``,
            ``transfer_step`` of the teacher for a shallower copy...).
        teachers: the teacher, or several (mean of their probabilities); frozen, in eval mode, under no_grad.
        data: the prepared data (any model's preprocessing: each model gets its own).
        cfg: how the student trains (its strategy, epochs, learning rate...), as for ``train``.
        loss: ``kd``, ``dkd``, ``hint``, ``pseudo_label``, or ``{name: kd, temperature: 4, alpha: 0.9}``.
        rounds: with more than one, the student of a round is the teacher of the next; each round trains a fresh
            student from the same start (Noisy Student's iteration).
        unlabelled: use the data's unlabelled pool (``data.unlabelled``) when it has one.
        seed: fixes the data order, dropout and augmentation (round ``r`` uses ``seed + 100 r``).
        accelerator: from ``make_accelerator``; made here when None.
        paths: checkpoint and log locations: each round checkpoints (and resumes) on its own.
        resume: continue from the checkpoints: finished rounds are read back, the interrupted one resumes.
        cache_dir: where the teacher's outputs are kept between an interruption and a resume.
        on_round: called with (round, student) after each round; what it returns joins the round's record (the
            stage adds the test accuracy there).
        on_step: called with the step number after each optimizer step (tests use it to interrupt).
    """
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    device = accelerator.device
    name, loss_cfg = loss_config(loss)
    members = [teachers] if isinstance(teachers, SourceModel) else list(teachers)
    teacherless = isinstance(loss_cfg, FixMatchConfig)  # the model teaches itself
    if teacherless:
        members = []
        if rounds != 1:
            raise RecipeError("loss fixmatch trains the model on its own predictions: give rounds: 1")
    check_teacher_labels(members, data.classes)
    if rounds < 1:
        raise RecipeError(f"distill rounds must be >= 1, got {rounds}")
    s_data = for_model(data, student)
    inner_layers = isinstance(loss_cfg, HintConfig) and not loss_cfg.pooled
    online = bool(s_data.cfg.augment.enabled) or inner_layers
    start = {k: v.detach().clone() for k, v in student.state_dict().items()}
    records: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    previous: SourceModel | None = None
    for r in range(rounds):
        teacher = None if teacherless else Teacher(members if previous is None else [previous], s_data.preprocess)
        if teacher is not None:
            teacher.to(device)
        round_paths = paths
        if paths is not None and rounds > 1:
            round_paths = JobPaths(
                paths.checkpoint.with_name(f"round{r}.pt"), paths.metrics_log, f"{paths.job}/round{r}"
            )
        done = round_paths.checkpoint.with_suffix(".round.json") if round_paths is not None else None
        if resume and done is not None and done.is_file():
            student.load_state_dict(load_state_dict(done.with_suffix(".safetensors")))
            record = read_json(done)
            summary = record.pop("summary")
        else:
            if r:
                student.load_state_dict(start)  # a fresh student each round, taught by the last one
            cache = cache_dir / f"teacher-round{r}.pt" if cache_dir is not None else None
            train_set, record = training_set(
                teacher, s_data, loss_cfg, use_pool=unlabelled, online=online, device=device, cache_file=cache
            )
            # a student batch of two examples: sizes the hint projections, checks the teacher's folding
            example = _first_batch(train_set, device) if online or isinstance(loss_cfg, HintConfig) else None
            objective: Any = None
            if isinstance(loss_cfg, FixMatchConfig):

                def objective(base: Any) -> FixMatchObjective:
                    return FixMatchObjective(cast(FixMatchConfig, loss_cfg), base)

            elif not isinstance(loss_cfg, PseudoLabelConfig):
                assert teacher is not None
                hints = None
                if isinstance(loss_cfg, HintConfig):
                    student.to(device)
                    hints = Hints.build(student.eval(), teacher, loss_cfg, example).to(device)
                    student.aux = hints  # trained with the student (see pipeline.train)

                def objective(base: Any, hints: Hints | None = hints, teacher: Teacher = teacher) -> DistillObjective:
                    return DistillObjective(cast(Any, loss_cfg), base, teacher, hints)

            fast: Any = contextlib.nullcontext()
            if teacher is not None and online:  # the teacher runs on every batch: at inference speed
                fast = teacher.fast(example)
            with fast:
                summary = train(
                    student,
                    s_data,
                    cfg,
                    seed=(cfg.seed if cfg.seed is not None else seed) + 100 * r,
                    accelerator=accelerator,
                    paths=round_paths,
                    resume=resume,
                    on_step=on_step,
                    train_set=train_set,
                    objective=objective,
                )
            if isinstance(loss_cfg, FixMatchConfig):  # what the model now labels confidently in the pool
                record.update(_confident_pool(student, s_data, loss_cfg.threshold, device))
            record = {"round": r + 1, "val_accuracy": summary["val"].get("accuracy"), **record}
            if on_round is not None:
                record.update(on_round(r, student))
            if done is not None and accelerator.is_main_process:
                save_tensors(done.with_suffix(".safetensors"), student.state_dict())
                write_json(done, {**record, "summary": summary})
            accelerator.wait_for_everyone()
        records.append(record)
        previous = copy.deepcopy(student).eval()
    summary = dict(summary)
    summary["distill"] = {
        "loss": name,
        "options": dataclasses.asdict(cast(Any, loss_cfg)),
        "teachers": len(members),
        "teacher_outputs": "none" if teacherless else "online" if online else "cached",
        "pool": _pool_size(s_data) if unlabelled else 0,
        "rounds": records,
    }
    return summary
