"""The teacher: one trained model or several (mean of probabilities), frozen, in eval mode, under no_grad.

It runs on the student's batches (online, when the student's inputs are augmented or a hint pairs inner layers),
through a bridge from the student's preprocessing to its own (images: size, mean and std, channels), or once over
the training examples with its own preprocessing (``cached_outputs``), like the linear-probe cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from transferkit.engine.fold import folded_batch_norms
from transferkit.engine.loop import conv_layout, in_order, inference_pass, to_device
from transferkit.errors import RecipeError
from transferkit.io import safe_torch_load, torch_save
from transferkit.models.base import SourceModel


def _image_keys(preprocess: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(tuple(v) if isinstance(v, list) else v for v in (preprocess.get(k) for k in _IMAGE_KEYS))


_IMAGE_KEYS = ("input_size", "mean", "std", "channels")


def _first(x: Any, n: int) -> Any:
    return {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]


def same_inputs(student: dict[str, Any], teacher: dict[str, Any]) -> bool:
    """Whether a batch prepared for the student is a batch the teacher takes as it is."""
    if student.get("modality", "image") != teacher.get("modality", "image"):
        return False
    return {k: v for k, v in student.items() if k != "augment"} == {k: v for k, v in teacher.items() if k != "augment"}


def bridge_images(x: torch.Tensor, student: dict[str, Any], teacher: dict[str, Any]) -> torch.Tensor:
    """An image batch normalised for the student, as the teacher's preprocessing would have made it: the
    normalisation undone, resized (bilinear) to the teacher's input size, grey <-> RGB, normalised again."""
    if _image_keys(student) == _image_keys(teacher):
        return x

    def stats(pre: dict[str, Any], key: str, channels: int) -> torch.Tensor:
        value = torch.as_tensor(pre.get(key, [0.0 if key == "mean" else 1.0] * channels), dtype=x.dtype)
        return value.to(x.device).view(1, -1, 1, 1)

    raw = x * stats(student, "std", x.shape[1]) + stats(student, "mean", x.shape[1])
    channels = int(teacher.get("channels", 3))
    if raw.shape[1] != channels:
        raw = raw.mean(1, keepdim=True) if channels == 1 else raw.expand(-1, channels, -1, -1)
    size = teacher.get("input_size")
    if size is not None:
        hw = tuple(size[-2:]) if isinstance(size, (list, tuple)) else (int(size), int(size))
        if tuple(raw.shape[-2:]) != hw:
            raw = F.interpolate(raw, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return (raw - stats(teacher, "mean", channels)) / stats(teacher, "std", channels)


class Teacher(nn.Module):
    """Frozen model(s) giving the student its targets.

    Args:
        models: the teacher, or several (their probabilities are averaged; the logits given are the log of the
            mean probabilities, which a softmax turns back into it).
        student_preprocess: the preprocessing of the student's batches (for the online bridge).
    """

    def __init__(self, models: SourceModel | Sequence[SourceModel], student_preprocess: dict[str, Any] | None = None):
        super().__init__()
        self.members = nn.ModuleList([models] if isinstance(models, SourceModel) else list(models))
        if not len(self.members):
            raise RecipeError("distillation needs a teacher: give at least one model")
        self.student_preprocess = dict(student_preprocess or {})
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Teacher:
        """A teacher stays in eval mode (dropout off, BatchNorm statistics fixed), whatever its caller asks."""
        return super().train(False)

    @property
    def models(self) -> list[SourceModel]:
        """The teacher's models (``members`` as a typed list)."""
        return cast("list[SourceModel]", list(self.members))

    @property
    def labels(self) -> list[str] | None:
        return self.models[0].labels

    @property
    def num_features(self) -> int:
        return int(self.models[0].num_features)

    def _member_input(self, member: SourceModel, x: Any) -> Any:
        if not self.student_preprocess or same_inputs(self.student_preprocess, member.preprocess):
            return x
        if isinstance(x, torch.Tensor) and x.ndim == 4:  # an image batch (N, C, H, W)
            return bridge_images(x, self.student_preprocess, member.preprocess)
        raise RecipeError(
            f"the teacher takes other {member.modality} inputs than the student (another tokenizer or feature "
            "extractor), so it cannot run on the student's batches; turn augmentation off and pair the pooled "
            "features only (loss hint without pairs/groups), so its outputs are computed once on its own inputs"
        )

    @torch.no_grad()
    def forward(self, x: Any, with_features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, pooled features or None) on a student batch."""
        if len(self.members) == 1:
            member = self.models[0]
            logits, features = member(self._member_input(member, x), return_features=True)
            return logits.float(), (features.float() if with_features else None)
        if with_features:
            raise RecipeError("feature hints need one teacher; several teachers give averaged probabilities only")
        probs = torch.stack([F.softmax(m(self._member_input(m, x)).float(), 1) for m in self.models]).mean(0)
        return probs.clamp_min(1e-12).log(), None

    @contextlib.contextmanager
    def fast(self, example: Any) -> Iterator[Teacher]:
        """Within the block the teacher runs as the engine's inference does: weights in channels-last layout and
        batch norms folded into the convolutions (in place, checked on ``example``, a student batch), several
        times faster on a CPU than as trained; put back on leaving. Hooks on its modules still see their outputs."""
        with contextlib.ExitStack() as stack:
            for member in self.models:
                stack.enter_context(conv_layout(member))
                stack.enter_context(folded_batch_norms(member))(self._member_input(member, _first(example, 2)))
            yield self

    def fingerprint(self) -> str:
        """The teachers' weight fingerprints (a cache of their outputs is reused only for the same teachers)."""
        from transferkit.pipeline import fingerprint

        return ",".join(fingerprint(member) for member in self.models)


@torch.no_grad()
def cached_outputs(
    teacher: Teacher,
    datasets: Sequence[Dataset],
    *,
    with_features: bool = False,
    batch_size: int = 64,
    device: Any = "cpu",
    cache_file: Path | None = None,
) -> dict[str, torch.Tensor]:
    """The teacher's outputs on fixed (non-augmented) examples, computed once: ``{"logits"[, "features"]}``.

    Args:
        teacher: the frozen teacher(s).
        datasets: one dataset per teacher member, each with that member's own preprocessing, of the same examples
            in the same order.
        with_features: also the pooled features (one teacher only).
        batch_size: inference batch.
        device: where the teacher runs.
        cache_file: read back when it exists (written for the same teacher weights and examples), else written.
    """
    key = f"{teacher.fingerprint()}:{[len(d) for d in datasets]}:{with_features}"  # type: ignore[arg-type]
    if cache_file is not None and cache_file.is_file():
        cached = safe_torch_load(cache_file)
        if cached.get("key") == key:
            return {k: v for k, v in cached.items() if k != "key"}
    outputs: dict[str, torch.Tensor] = {}
    if len(teacher.members) == 1:
        member = teacher.models[0].to(device)
        with inference_pass(member, len(datasets[0]), batch_size) as run:  # type: ignore[arg-type]
            width = member.num_features

            def both(x: Any) -> torch.Tensor:
                features = member.backbone(to_device(x, device))
                return torch.cat([member.head(features).float(), features.float()], 1)

            def logits_only(x: Any) -> torch.Tensor:
                return run(to_device(x, device))

            if with_features:
                joined = in_order(datasets[0], batch_size, both, desc="teacher outputs")[0]
                outputs = {"logits": joined[:, :-width], "features": joined[:, -width:]}
            else:
                outputs = {"logits": in_order(datasets[0], batch_size, logits_only, desc="teacher outputs")[0]}
    else:
        if with_features:
            raise RecipeError("feature hints need one teacher; several teachers give averaged probabilities only")
        probs = []
        for member, dataset in zip(teacher.models, datasets):
            member.to(device)
            with inference_pass(member, len(dataset), batch_size) as run:  # type: ignore[arg-type]
                logits = in_order(dataset, batch_size, lambda x: run(to_device(x, device)), desc="teacher outputs")[0]
            probs.append(F.softmax(logits, 1))
        outputs = {"logits": torch.stack(probs).mean(0).clamp_min(1e-12).log()}
    if cache_file is not None:
        torch_save(cache_file, {"key": key, **outputs})
    return outputs
