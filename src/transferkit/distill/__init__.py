"""Knowledge distillation and the unlabelled pool: objectives (``kd``, ``dkd``, ``hint``), self-training
(``pseudo_label``), teachers (one model or several) and ``distill``, the function the ``distill:`` stage runs."""

from transferkit.distill.api import DistillSet, distill, for_model
from transferkit.distill.losses import LOSSES, dkd_terms, kd_loss, labelled_cross_entropy, loss_config
from transferkit.distill.objective import DistillObjective, Hints
from transferkit.distill.teacher import Teacher, cached_outputs

__all__ = [
    "LOSSES",
    "DistillObjective",
    "DistillSet",
    "Hints",
    "Teacher",
    "cached_outputs",
    "distill",
    "dkd_terms",
    "for_model",
    "kd_loss",
    "labelled_cross_entropy",
    "loss_config",
]
