"""What a model costs to run: parameters, multiply-accumulates of one forward pass, CPU latency at batch 1.

Distillation (and compression) reports the teacher beside the student with these numbers. MACs are counted by
``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2): the matrix products and convolutions, not the
elementwise work (activations, normalisation), which is how published MAC figures are counted (timm's resnet18 at
224 px: 1.82 G). An example is a tensor or a dict of tensors (a tokenized text batch), passed as ``model(example)``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """All parameters of ``model``, trainable or frozen."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; each submodule's training flag is put back after, even on error."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def count_macs(model: nn.Module, example: Any) -> int:
    """Multiply-accumulates of one forward pass ``model(example)``, in eval mode under no_grad (FLOPs / 2)."""
    with _eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops()) // 2


def model_cost(model: nn.Module, example: Any) -> dict[str, int]:
    """``{"params", "macs"}`` of ``model`` on ``example``: what can be counted without timing anything."""
    return {"params": count_params(model), "macs": count_macs(model, example)}


def _on_cpu(name: str, model: nn.Module, example: Any) -> None:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += list(example.values()) if isinstance(example, dict) else [example]
    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tensors):
        raise ValueError(f"latency_ms measures CPU latency; model {name!r} or its example is not on the CPU")


def latency_ms(
    models: dict[str, nn.Module],
    examples: dict[str, Any],
    repeats: int = 30,
    warmup: int = 3,
    threads: int | None = None,
) -> dict[str, dict[str, Any]]:
    """CPU latency of each model on its own example (batch 1), ``{name: {"median_ms", "p90_ms", "repeats"}}``.

    The models run interleaved (round robin: A, B, A, B, ...) so that machine noise falls on all of them alike;
    ``warmup`` untimed rounds come first. Eval mode, ``torch.inference_mode()``; training flags are put back after.
    ``threads`` sets ``torch.set_num_threads`` for the measurement and restores the previous count after.
    """
    if set(models) != set(examples):
        raise ValueError(
            f"latency_ms needs one example per model; models {sorted(models)}, examples {sorted(examples)}"
        )
    if repeats < 1 or warmup < 0:
        raise ValueError(f"latency_ms needs repeats >= 1 and warmup >= 0, not repeats={repeats}, warmup={warmup}")
    for name, model in models.items():
        _on_cpu(name, model, examples[name])
    times: dict[str, list[float]] = {name: [] for name in models}
    previous_threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(_eval_mode(model))
        stack.enter_context(torch.inference_mode())
        if threads is not None:
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, previous_threads)
        for round_ in range(warmup + repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(examples[name])
                elapsed = time.perf_counter() - start
                if round_ >= warmup:
                    times[name].append(elapsed * 1000.0)
    return {
        name: {
            "median_ms": statistics.median(ms),
            "p90_ms": float(np.percentile(ms, 90)),
            "repeats": len(ms),
        }
        for name, ms in times.items()
    }
