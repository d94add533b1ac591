"""The training loop on Accelerate, with exact checkpoint/resume."""

from transferkit.engine.loop import FitResult, JobPaths, fit, make_accelerator
from transferkit.engine.objective import ClassificationObjective

__all__ = ["ClassificationObjective", "FitResult", "JobPaths", "fit", "make_accelerator"]
