"""Distillation losses: each a config dataclass (validated in ``__post_init__``) and pure tensor functions.

- ``kd``: Hinton et al. 2015, ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(labels)``.
- ``dkd``: decoupled KD, Zhao et al. 2022: the KL split into a target-class term (TCKD, the binary
  target-vs-rest distribution) and a non-target term (NCKD, the distribution among the other classes), weighted
  ``alpha`` and ``beta``, plus cross-entropy on the labels.
- ``hint``: FitNets-style hints (Romero et al. 2015): a learned projection of student features regresses the
  teacher's (mean squared error), on top of ``kd``.
- ``fixmatch``: consistency training (Sohn et al. 2020), images only: the model's confident prediction on a
  weakly augmented pool image labels a strongly augmented view of it; no teacher.
- ``pseudo_label``: self-training (Noisy Student, Xie et al. 2020): the teacher's confident predictions on the
  unlabelled pool become hard labels, the student trains on them with cross-entropy.

Examples without a label (the unlabelled pool) carry the label -1: cross-entropy averages over the labelled
examples of the batch only; the teacher terms use every example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transferkit.registry import Registry
from transferkit.specs import parse_spec

UNLABELLED = -1  # the label of a pool example


@dataclass
class KDConfig:
    """Logit distillation.

    Attributes:
        temperature: softens both distributions (T); the KL is scaled by T^2 so its gradients keep their size.
        alpha: weight of the distillation term; ``1 - alpha`` weighs cross-entropy on the labelled examples.
    """

    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass
class DKDConfig:
    """Decoupled knowledge distillation (defaults of the paper's CIFAR-100 setting).

    Attributes:
        temperature: T of both terms.
        alpha: weight of the target-class term (TCKD).
        beta: weight of the non-target-class term (NCKD).
        ce_weight: weight of cross-entropy on the labelled examples.
    """

    temperature: float = 4.0
    alpha: float = 1.0
    beta: float = 8.0
    ce_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if min(self.alpha, self.beta, self.ce_weight) < 0:
            raise ValueError(f"alpha, beta and ce_weight must be >= 0, got {self.alpha}, {self.beta}, {self.ce_weight}")


@dataclass
class HintConfig:
    """Feature hints plus logit distillation.

    Attributes:
        weight: weight of the hint term (mean squared error between projected student and teacher features).
        pairs: ``[[student_module, teacher_module], ...]``, backbone module names whose outputs are paired;
            ``groups`` pairs the last ``groups`` layer groups of the two models (stages of a timm model, layers of
            a transformer), aligned from the output end. With neither, the pooled features are paired.
        groups: see ``pairs``.
        temperature: of the logit term (as ``kd``).
        alpha: of the logit term (as ``kd``).
    """

    weight: float = 1.0
    pairs: list[list[str]] | None = None
    groups: int | None = None
    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        KDConfig(self.temperature, self.alpha)
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.pairs is not None and self.groups is not None:
            raise ValueError("give pairs (module names) or groups (a count), not both")
        if self.pairs is not None and (not self.pairs or any(len(p) != 2 for p in self.pairs)):
            raise ValueError(f"pairs is a list of [student_module, teacher_module], got {self.pairs!r}")
        if self.groups is not None and self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")

    @property
    def pooled(self) -> bool:
        """Whether the hint pairs the pooled features (the default), which a cache can hold."""
        return self.pairs is None and self.groups is None


@dataclass
class PseudoLabelConfig:
    """Self-training on the teacher's confident predictions.

    Attributes:
        threshold: a pool example is kept when the teacher's top probability is at least this.
    """

    threshold: float = 0.9

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")


@dataclass
class FixMatchConfig:
    """Consistency training (FixMatch, Sohn et al. 2020), images only: on a pool image the model's own confident
    prediction for a weakly augmented view (``data.augment``) is the label of a strongly augmented view. It needs no
    teacher: the model teaches itself.

    Attributes:
        threshold: the confidence a weak-view prediction needs to become a label (tau).
        weight: weight of the consistency term (lambda_u).
        ops: RandAugment operations per strong view.
        magnitude: RandAugment magnitude (0-30).
        ratio: pool examples per labelled example in an epoch (mu): the labelled examples are repeated so an
            epoch (one pass over the pool) holds about one per ``ratio`` pool examples, as FixMatch draws a labelled
            batch beside every ``ratio`` unlabelled ones. Without it a few labels in a large pool reach the model too
            rarely to learn from (200 among 3,600: under two per batch of 32, and no prediction ever confident).
    """

    threshold: float = 0.95
    weight: float = 1.0
    ops: int = 2
    magnitude: int = 10
    ratio: int = 7

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.weight < 0 or self.ops < 1 or not 0 <= self.magnitude <= 30:
            raise ValueError(
                f"weight must be >= 0, ops >= 1 and magnitude in [0, 30]; got {self.weight}, {self.ops}, "
                f"{self.magnitude}"
            )
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int) or self.ratio < 1:
            raise ValueError(f"ratio (pool examples per labelled example) must be an integer >= 1, got {self.ratio!r}")

    def labelled_repeats(self, labelled: int, pool: int) -> int:
        """How many times an epoch holds the labelled examples: about ``pool / ratio`` of them, at least once."""
        return max(1, round(pool / (self.ratio * max(labelled, 1))))


LOSSES: Registry[type] = Registry("distillation loss")
LOSSES.register("kd", help="logit distillation: KL of temperature-softened outputs (Hinton et al. 2015)")(KDConfig)
LOSSES.register("dkd", help="decoupled KD: target-class + non-target-class terms (Zhao et al. 2022)")(DKDConfig)
LOSSES.register("hint", help="FitNets hints: projected student features regress the teacher's, + kd")(HintConfig)
LOSSES.register("pseudo_label", help="self-training on the teacher's confident pool predictions (Noisy Student)")(
    PseudoLabelConfig
)
LOSSES.register("fixmatch", help="consistency: confident weak-view predictions label strong views (Sohn et al.)")(
    FixMatchConfig
)


def loss_config(spec: str | dict) -> tuple[str, object]:
    """Name and validated config from ``"kd"`` or ``{name: kd, temperature: 2}``."""
    name, _, cfg = parse_spec(spec, LOSSES, lambda config: config)
    return name, cfg


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the labelled examples (label != -1); 0 for a batch without any."""
    per_example = F.cross_entropy(logits, labels.clamp(min=0), label_smoothing=label_smoothing, reduction="none") * (
        labels != UNLABELLED
    )
    return per_example.sum() / (labels != UNLABELLED).sum().clamp(min=1)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    t = temperature
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=1)
    log_p_student = F.log_softmax(student.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t


def dkd_terms(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of decoupled KD, each ``T^2 * KL`` averaged over the batch.

    TCKD compares the binary distributions ``[p_target, 1 - p_target]``; NCKD the distributions among the
    non-target classes (softmax over the other logits), as in Zhao et al. 2022, eq. 4-7.
    """
    t = temperature
    gt = F.one_hot(target, student.shape[1]).bool()
    p_s = F.softmax(student.float() / t, dim=1)
    p_t = F.softmax(teacher.float() / t, dim=1)
    b_s = torch.stack([p_s[gt], 1 - p_s[gt]], dim=1).clamp_min(1e-12)
    b_t = torch.stack([p_t[gt], 1 - p_t[gt]], dim=1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * t * t
    masked = -1e9  # the target class leaves the non-target softmax
    log_q_s = F.log_softmax(student.float().masked_fill(gt, masked) / t, dim=1)
    log_q_t = F.log_softmax(teacher.float().masked_fill(gt, masked) / t, dim=1)
    q_t = log_q_t.exp()
    nckd = (q_t * (log_q_t - log_q_s)).masked_fill(gt, 0).sum(1).mean() * t * t
    return tckd, nckd


def hint_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between projected student features and the teacher's (any shape, equal)."""
    return F.mse_loss(student.float(), teacher.float())


def confident(probabilities: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's predicted classes and which of them reach ``threshold`` (a boolean mask)."""
    top, classes = probabilities.max(dim=1)
    return classes, top >= threshold
