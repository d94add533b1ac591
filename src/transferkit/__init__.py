"""transferkit: transfer learning on PyTorch, from a pretrained source to a new task.

Every stage is a plain function::

    import transferkit as tk
    source = tk.load_source("efficientnet_lite0")
    data = tk.prepare_data(tk.DataConfig(dataset="mnist5k", per_class=20, image_size=96), source.preprocess, seed=0)
    model = tk.build_target(source, data.classes)
    tk.train(model, data, tk.TrainConfig(strategy="full", epochs=5))
    print(tk.evaluate(model, data.dataset("test"))["accuracy"])
    tk.save_model(model, "my-model"); tk.load_run("my-model").predict(["digit.png"])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module; imported on first use so that `import transferkit` (and the CLI's --help) stays fast
_API = {
    "load_source": "transferkit.sources",
    "build_target": "transferkit.transfer",
    "prepare_data": "transferkit.pipeline",
    "train": "transferkit.pipeline",
    "evaluate": "transferkit.pipeline",
    "run_recipe": "transferkit.runner",
    "load_run": "transferkit.predict",
    "rank_candidates": "transferkit.rank",
    "transfer": "transferkit.transfer.api",
    "save_model": "transferkit.models.vision",
    "load_model": "transferkit.models.vision",
    "load_recipe": "transferkit.recipe",
    "Recipe": "transferkit.config",
    "DataConfig": "transferkit.config",
    "TrainConfig": "transferkit.config",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'transferkit' has no attribute '{name}'")
