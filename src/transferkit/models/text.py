"""Text backbone family ``hf_text``: a Hugging Face transformers encoder, its tokenizer and a pooling.

The backbone takes a tokenized batch (a dict with ``input_ids``, ``attention_mask`` and, for BERT-like models,
``token_type_ids``) and returns one pooled vector per text: ``mean`` over the real tokens (what sentence-transformers
models such as all-MiniLM-L6-v2 are trained for) or the ``cls`` token. The pooling comes from the source's
sentence-transformers ``1_Pooling/config.json`` when it has one, else ``mean``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.errors import SourceError
from transferkit.models.base import Backbone, load_hf_model, register_family

POOLINGS = ("mean", "cls")
DEFAULT_MAX_LENGTH = 128


class TextEncoder(nn.Module):
    """A transformers encoder returning pooled text features ``(batch, hidden_size)``."""

    def __init__(self, model: nn.Module, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise SourceError(f"unknown text pooling '{pooling}'; valid: {', '.join(POOLINGS)}")
        self.model = model
        self.pooling = pooling

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError("a text backbone takes a tokenized batch: a dict with input_ids and attention_mask")
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(batch["input_ids"])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": mask}
        if "token_type_ids" in batch:
            inputs["token_type_ids"] = batch["token_type_ids"]
        hidden = self.model(**inputs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def sentence_transformers_pooling(folder: str | Path) -> str | None:
    """``mean`` or ``cls`` from a sentence-transformers folder's ``1_Pooling/config.json`` (None without one)."""
    path = Path(folder) / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    return "mean" if cfg.get("pooling_mode_mean_tokens", True) else None


def _hf_text_backbone(name: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]) -> Backbone:
    from transformers import AutoTokenizer

    config_dict = kwargs.get("config")
    # other keyword arguments change the architecture's config (e.g. num_hidden_layers: 3, a shallower copy that
    # the transfer machinery fills from a deeper source)
    changes = {k: v for k, v in kwargs.items() if k not in ("config", "pooling", "processor_dir")}
    try:
        if changes:
            from transformers import AutoConfig

            config_dict = {**(config_dict or AutoConfig.from_pretrained(name).to_dict()), **changes}
            pretrained = False  # the weights of another depth or width do not load as they are
        model = load_hf_model(name, pretrained, config_dict)
        tokenizer = AutoTokenizer.from_pretrained(kwargs.get("processor_dir") or name)
    except OSError as e:
        raise SourceError(
            f"cannot load Hugging Face text model '{name}': {e}. Give a local folder with config.json "
            "and tokenizer files, or a hub name on a machine with a network."
        ) from e
    if weights:
        from transferkit.io import load_state_dict
        from transferkit.models.base import load_weights

        load_weights(model, load_state_dict(weights), weights)
    if getattr(model, "pooler", None) is not None:  # unused by mean/cls pooling of the hidden states
        model.pooler = None  # type: ignore[assignment]  # torch types Module.__setattr__ without the None it accepts
    pooling = kwargs.get("pooling") or (sentence_transformers_pooling(name) if Path(name).is_dir() else None) or "mean"
    cfg: Any = model.config  # a transformers config: its fields depend on the model type
    limit = min(
        int(getattr(tokenizer, "model_max_length", 512) or 512), int(getattr(cfg, "max_position_embeddings", 512))
    )
    preprocess = {
        "modality": "text",
        "max_length": min(DEFAULT_MAX_LENGTH, limit),
        "max_length_limit": limit,
        "pooling": pooling,
    }
    layers = getattr(cfg, "num_hidden_layers", 0)
    groups = [("embeddings", r"^model\.embeddings\.")] + [(f"layer{i}", rf"\.layers?\.{i}\.") for i in range(layers)]
    config = cfg.to_dict()
    return Backbone(
        TextEncoder(model, pooling),
        cfg.hidden_size,
        None,
        preprocess,
        groups,
        {"config": config, "pooling": pooling},
        processor=tokenizer,
    )


register_family("hf_text", _hf_text_backbone, prefix=False)
