"""The distillation objective and the hint projections it trains.

``DistillObjective`` is an objective like any other (``{"loss", "logits", **parts}``): the engine's loop does not
change. The targets of a batch are a dict: ``label`` (-1 for pool examples) and, when the teacher's outputs were
computed once, ``teacher`` (logits) and ``teacher_features``; without them the teacher runs on the batch (online).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.distill.losses import (
    UNLABELLED,
    DKDConfig,
    FixMatchConfig,
    HintConfig,
    KDConfig,
    dkd_terms,
    hint_loss,
    kd_loss,
    labelled_cross_entropy,
)
from transferkit.distill.teacher import Teacher
from transferkit.engine.objective import (
    ClassificationObjective,
    add_penalties,
    load_penalty_states,
    penalty_states,
    prepare_penalties,
)
from transferkit.strategies.regularizers import default_delta_layers, unwrap


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class Projection(nn.Module):
    """Student features -> the teacher's shape: a 1x1 convolution for maps (then resized to the teacher's
    spatial size), a linear map for vectors and token sequences (sequences of other lengths are averaged)."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]):
        super().__init__()
        self.teacher_shape = tuple(teacher_shape)
        if len(student_shape) == 4:
            self.map: nn.Module = nn.Conv2d(student_shape[1], teacher_shape[1], 1)
        else:
            self.map = nn.Linear(student_shape[-1], teacher_shape[-1])

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected student features and the teacher's, of one shape."""
        p = self.map(s.to(next(self.map.parameters()).dtype))
        if p.ndim == 4 and p.shape[-2:] != t.shape[-2:]:
            p = F.interpolate(p, size=t.shape[-2:], mode="bilinear", align_corners=False)
        if p.ndim == 3 and p.shape[1] != t.shape[1]:
            p, t = p.mean(1), t.mean(1)
        return p, t


def hint_layers(student: nn.Module, teacher: nn.Module, cfg: HintConfig) -> list[tuple[str, str]]:
    """The (student, teacher) backbone module pairs of a hint: named, or the last ``groups`` stages of each."""
    if cfg.pairs is not None:
        pairs = [(str(s), str(t)) for s, t in cfg.pairs]
    elif cfg.groups is not None:
        s_layers, t_layers = default_delta_layers(student), default_delta_layers(teacher)
        k = min(cfg.groups, len(s_layers), len(t_layers))
        pairs = list(zip(s_layers[-k:], t_layers[-k:]))
    else:
        return []
    for which, model, name in [
        (w, m, n) for s, t in pairs for w, m, n in (("student", student, s), ("teacher", teacher, t))
    ]:
        try:
            model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(
                f"hint pair names '{name}', which is not a module of the {which}'s backbone; "
                f"its stages are {default_delta_layers(model)[:8]}"
            ) from e
    return pairs


class Hints(nn.Module):
    """The hint projections (trained with the student: attached to it as ``aux`` while it trains) and the hooks
    that catch the paired layers' outputs."""

    def __init__(self, pairs: list[tuple[str, str]], projections: list[Projection]):
        super().__init__()
        self.pairs = pairs
        self.projections = nn.ModuleList(projections)
        self._maps: dict[str, torch.Tensor] = {}
        self._hooked: int | None = None  # id() of the hooked student (a module attribute would make it a submodule)

    @classmethod
    def build(cls, student: Any, teacher: Teacher, cfg: HintConfig, example: Any) -> Hints:
        """Projections sized by one forward pass of both models on ``example`` (a student batch)."""
        if cfg.pooled:
            return cls([], [Projection([1, student.num_features], [1, teacher.num_features])])
        member = teacher.models[0]
        pairs = hint_layers(student.backbone, member.backbone, cfg)
        s_maps = _catch(student.backbone, [s for s, _ in pairs], lambda: student(example))
        t_maps = _catch(member.backbone, [t for _, t in pairs], lambda: teacher(example))
        return cls(pairs, [Projection(s_maps[s].shape, t_maps[t].shape) for s, t in pairs])

    def prepare(self, model: nn.Module) -> None:
        target = cast(Any, unwrap(model))
        if self.pairs and self._hooked != id(target):
            for s, _ in self.pairs:
                module = target.backbone.get_submodule(s)
                module.register_forward_hook(lambda m, i, o, n=s: self._maps.__setitem__(n, _first(o)))
            self._hooked = id(target)

    def loss(
        self,
        features: torch.Tensor | None,
        teacher_features: torch.Tensor | None,
        teacher_maps: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Mean of the hint terms over the pairs (the pooled pair: the student's features and the teacher's)."""
        if not self.pairs:
            assert features is not None and teacher_features is not None
            p, t = self.projections[0](features, teacher_features)
            return hint_loss(p, t)
        terms = [proj(self._maps[s], teacher_maps[t]) for proj, (s, t) in zip(self.projections, self.pairs)]
        return torch.stack([hint_loss(p, t) for p, t in terms]).mean()


def _catch(module: nn.Module, names: list[str], run: Any) -> dict[str, torch.Tensor]:
    """The outputs of ``module``'s submodules ``names`` during ``run()``."""
    store: dict[str, torch.Tensor] = {}
    handles = [
        module.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, _first(o)))
        for n in names
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return store


class DistillObjective(nn.Module):
    """Cross-entropy on the labelled examples plus the distillation terms of ``cfg`` (plus the strategy's penalties).

    Args:
        cfg: ``KDConfig``, ``DKDConfig`` or ``HintConfig``.
        base: the strategy's classification objective (its label smoothing and penalties are kept).
        teacher: runs on batches whose targets hold no cached teacher outputs (a reference, not a submodule).
        hints: the hint projections (``HintConfig``), attached to the student as ``aux``.
    """

    teacher: Teacher | None

    def __init__(
        self,
        cfg: KDConfig | DKDConfig | HintConfig,
        base: ClassificationObjective,
        teacher: Teacher | None = None,
        hints: Hints | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.label_smoothing = base.label_smoothing
        self.penalties = base.penalties
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained, wrapped or saved
        object.__setattr__(self, "hints", hints)

    def extra_state(self) -> dict[str, Any]:
        return penalty_states(self.penalties)

    def load_extra_state(self, state: dict[str, Any]) -> None:
        load_penalty_states(self.penalties, state)

    def forward(self, model: nn.Module, inputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        labels = targets["label"] if isinstance(targets, dict) else targets
        cached_logits = targets.get("teacher") if isinstance(targets, dict) else None
        cached_features = targets.get("teacher_features") if isinstance(targets, dict) else None
        hints: Hints | None = self.__dict__.get("hints")
        prepare_penalties(self.penalties, model)
        if hints is not None:
            hints.prepare(model)
        want_features = any(p.needs_features for p in self.penalties) or (hints is not None and not hints.pairs)
        if want_features:
            logits, features = model(inputs, return_features=True)
        else:
            logits, features = model(inputs), None
        teacher_features, teacher_maps = cached_features, {}
        if cached_logits is None:  # online: the teacher runs on this batch (catching its paired layers' outputs)
            if self.teacher is None:
                raise ValueError("the batch holds no teacher outputs and the objective has no teacher to run")
            teacher, ran = self.teacher, []
            names = [t for _, t in hints.pairs] if hints is not None else []
            pooled = hints is not None and not hints.pairs
            teacher_maps = _catch(
                teacher.models[0].backbone, names, lambda: ran.append(teacher(inputs, with_features=pooled))
            )
            teacher_logits, teacher_features = ran[0]
        else:
            teacher_logits = cached_logits.float()
        ce = labelled_cross_entropy(logits, labels, self.label_smoothing)
        out: dict[str, torch.Tensor] = {"logits": logits, "ce": ce}
        cfg = self.cfg
        if isinstance(cfg, DKDConfig):
            target = torch.where(labels != UNLABELLED, labels, teacher_logits.argmax(1))  # pool: the teacher's class
            tckd, nckd = dkd_terms(logits, teacher_logits, target, cfg.temperature)
            out.update(tckd=tckd, nckd=nckd)
            loss = cfg.ce_weight * ce + cfg.alpha * tckd + cfg.beta * nckd
        else:
            kd = kd_loss(logits, teacher_logits, cfg.temperature)
            out["kd"] = kd
            loss = cfg.alpha * kd + (1 - cfg.alpha) * ce
            if isinstance(cfg, HintConfig):
                assert hints is not None
                out["hint"] = hints.loss(features, teacher_features, teacher_maps)
                loss = loss + cfg.weight * out["hint"]
        out["loss"] = loss + add_penalties(self.penalties, model, features, inputs, labels, out)
        return out


class FixMatchObjective(nn.Module):
    """Cross-entropy on the labelled examples plus FixMatch's consistency term on the pool examples.

    The batch's inputs are weak views (``data.augment``); its targets hold ``strong``, a strong view of each example
    (used for pool examples only). One forward pass runs the weak views and the pool's strong views together (so a
    distributed model sees one call); the weak-view predictions, without gradient, that reach ``threshold`` are the
    labels of the strong views; the term is averaged over all pool examples of the batch, as in the paper.
    """

    def __init__(self, cfg: FixMatchConfig, base: ClassificationObjective):
        super().__init__()
        if any(p.needs_features for p in base.penalties):
            raise ValueError("fixmatch does not combine with penalties on features (bss)")
        self.cfg = cfg
        self.label_smoothing = base.label_smoothing
        self.penalties = base.penalties

    def forward(self, model: nn.Module, inputs: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, Any]:
        labels, strong = targets["label"], targets["strong"]
        pool = labels == UNLABELLED
        prepare_penalties(self.penalties, model)
        n = inputs.shape[0]
        logits_all = model(torch.cat([inputs, strong[pool]]))
        logits, strong_logits = logits_all[:n], logits_all[n:]
        ce = labelled_cross_entropy(logits, labels, self.label_smoothing)
        with torch.no_grad():
            confidence, pseudo = F.softmax(logits[pool].detach().float(), 1).max(1)
            mask = confidence >= self.cfg.threshold
        per_example = F.cross_entropy(strong_logits.float(), pseudo, reduction="none") * mask
        consistency = per_example.sum() / pool.sum().clamp(min=1)
        loss = ce + self.cfg.weight * consistency
        out: dict[str, Any] = {"logits": logits, "ce": ce, "consistency": consistency}
        out["loss"] = loss + add_penalties(self.penalties, model, None, inputs, labels, out)
        return out
