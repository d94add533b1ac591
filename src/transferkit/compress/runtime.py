"""An exported ONNX model as a PyTorch module: how the engine's evaluation and latency measurement run it.

``OnnxModule(folder)(batch)`` feeds a batch as the PyTorch model takes it (an image tensor, a dict of tensors) to
an ONNX Runtime session and returns the logits as a tensor, so ``evaluate_model`` and ``latency_ms`` compare an
export with its PyTorch model on the same batches. Prediction from an exported folder does not go through here
(``transferkit.exported`` runs without torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class OnnxModule(nn.Module):
    """An ONNX Runtime session over ``folder/model.onnx`` that takes and gives what the PyTorch model does.

    Args:
        folder: an exported folder (``model.onnx``).
        threads: ONNX Runtime's intra-op threads (default: torch's, so the two are timed on equal terms).
    """

    def __init__(self, folder: str | Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(Path(folder) / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]

    def feed(self, batch: Any) -> dict[str, np.ndarray]:
        """The session's inputs from a batch (a tensor: the one input; a dict: the inputs of those names)."""
        if isinstance(batch, dict):
            return {k: batch[k].detach().cpu().numpy() for k in self.inputs}
        return {self.inputs[0]: batch.detach().cpu().numpy()}

    def forward(self, batch: Any) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, self.feed(batch))[0])
