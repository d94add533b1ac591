"""Adapters a model carries (LoRA through ``peft``): injected into the backbone, described in ``model.adapter``.

The description is saved in ``model.json``, so ``load_model`` rebuilds the same adapters before loading the
weights. The LoRA strategy (``strategies.lora``) decides where they go and trains them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transferkit.models.base import SourceModel


def inject_lora(model: SourceModel, spec: dict[str, Any]) -> None:
    """Add LoRA adapters to ``model.backbone`` in place (peft's LoraModel) and record them in ``model.adapter``."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    config = LoraConfig(
        r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"], target_modules=spec["target_modules"]
    )
    try:
        LoraModel(model.backbone, config, "default")  # modifies model.backbone in place
    except ValueError as e:
        raise ValueError(f"LoRA target_modules {spec['target_modules']!r} match no layer of the backbone: {e}") from e
    model.adapter = {"type": "lora", **spec}


def merge_lora(model: SourceModel) -> None:
    """Fold every adapter into its base layer and put the plain layer back: same outputs, no adapter left."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.backbone.get_submodule(parent_name) if parent_name else model.backbone
            setattr(parent, child, module.get_base_layer())
    model.adapter = None
