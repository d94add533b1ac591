"""Model fusion: several fine-tuned models into one (soups, task arithmetic, TIES, DARE) or an output ensemble.

``merge.methods`` holds the methods (declared parameters plus one pure tensor function); ``merge.api`` merges saved
model folders tensor by tensor (models of different label sets into a multi-task model, one head per task),
recalibrates BatchNorm statistics and builds greedy soups and ensembles; ``merge.adapters`` merges LoRA models at the
adapter level through peft, into a LoRA model. The ``merge`` stage (``stages/merge.py``) runs them on a run's models
and other runs, evaluates and saves the result.
"""

from transferkit.merge.adapters import check_adapters, combination_for, merge_adapters
from transferkit.merge.api import (
    Ensemble,
    check_compatible,
    differing_norms,
    greedy_soup,
    merge_state,
    merged_model,
    method_of,
    multi_task_model,
    recalibrate_batch_norms,
    same_labels,
)
from transferkit.merge.methods import METHODS, MergeConfig, merge_tensor

__all__ = [
    "METHODS",
    "Ensemble",
    "MergeConfig",
    "check_adapters",
    "check_compatible",
    "combination_for",
    "differing_norms",
    "greedy_soup",
    "merge_adapters",
    "merge_state",
    "merge_tensor",
    "merged_model",
    "method_of",
    "multi_task_model",
    "recalibrate_batch_norms",
    "same_labels",
]
