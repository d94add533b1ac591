"""An exported ONNX model as a PyTorch module: how the engine's evaluation and latency measurement run it.

``OnnxModule(folder)(batch)`` feeds a batch as the PyTorch model takes it (an image tensor, a dict of tensors) to
an ONNX Runtime session and returns the logits as a tensor, so ``evaluate_model`` and ``latency_ms`` compare an
export with its PyTorch model on the same batches. Prediction from an exported folder does not go through here
(``transferkit.exported`` runs without torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.compress.export import ort_feed, ort_session


class OnnxModule(nn.Module):
    """An ONNX Runtime session over ``folder/model.onnx`` that takes and gives what the PyTorch model does.

    Args:
        folder: an exported folder (``model.onnx``).
        threads: ONNX Runtime's intra-op threads (default: torch's, so the two are timed on equal terms).
        spinning: ONNX Runtime's threads spin between runs (its default); off by default here, since a module is
            run beside PyTorch models (evaluation, interleaved timing), whose CPU time the spinning would take.
    """

    def __init__(self, folder: str | Path, threads: int | None = None, spinning: bool = False):
        super().__init__()
        self.session = ort_session(Path(folder) / "model.onnx", threads or torch.get_num_threads(), spinning)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def forward(self, batch: Any) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, ort_feed(batch, self.inputs))[0])
