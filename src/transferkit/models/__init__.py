"""Modality adapters: the SourceModel contract and its heads."""

from transferkit.models.vision import Backbone, VisionModel, build_backbone, load_model, save_model

__all__ = ["Backbone", "VisionModel", "build_backbone", "load_model", "save_model"]
