"""Modality adapters: the SourceModel contract (``models.base``) and the backbone families of each modality."""

from transferkit.models.base import (
    Backbone,
    MultiTaskModel,
    SourceModel,
    build_backbone,
    load_model,
    register_family,
    save_model,
)

__all__ = ["Backbone", "MultiTaskModel", "SourceModel", "build_backbone", "load_model", "register_family", "save_model"]
