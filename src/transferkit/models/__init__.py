"""Modality adapters: the SourceModel contract and its heads."""

from transferkit.models.vision import Backbone, SourceModel, build_backbone, load_model, save_model

__all__ = ["Backbone", "SourceModel", "build_backbone", "load_model", "save_model"]
