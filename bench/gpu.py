"""GPU training speed (issue 20): transferkit's ``fit`` against a plain hand-written loop, in the same process.

For timm ResNet-50 and ViT-B/16 (random weights) and transformers BERT-base (from a config), nothing downloaded:

- synthetic batches (one batch kept on the device), eager and ``torch.compile``d: the plain loop (bf16 autocast,
  channels-last for the conv net, fused AdamW, cross-entropy) and ``fit`` on the same model and batch;
- from 2,048 generated 500x375 JPEGs (the image models, eager): the plain loop decoding with nvjpeg and augmenting
  with torchvision v2 tensor ops, ``fit`` on the PIL path (``data.input: pil``, 8 DataLoader workers) and on the
  tensor path (``data.input: gpu``, decoded every batch, and from the uint8 cache);
- the model FLOPs of one training step (``torch.utils.flop_counter.FlopCounterMode``) over the card's peak dense
  bf16 FLOP/s: MFU;
- the tensor augmentation alone (128 decoded 500x375 images to 224): batched ``roi_align`` against per image;
- a resume check: ``fit`` interrupted and resumed on the GPU gives identical weights to an uninterrupted run.

Reported: images (sequences) per second of each, the ratio fit / plain, MFU. Written to bench/results/gpu.json, a
Markdown table on stdout. At most ~8 minutes on an H100/H200 (``--budget-s`` skips what would not fit).

Run: ``python bench/gpu.py`` on a GPU machine; ``python bench/gpu.py --cpu-smoke`` runs tiny models, 16 JPEGs and
2 steps on the CPU in under a minute (the code paths, not the speed).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from common import code_version, machine, table, write_result
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from transferkit.config import AugmentConfig, TrainConfig
from transferkit.data.gpu_images import TensorAugment
from transferkit.data.images import ImageDataset, build_transform
from transferkit.engine.loop import JobPaths, fit, make_accelerator
from transferkit.engine.plan import ParamGroup, TrainPlan

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}  # dense, per card
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _Text(nn.Module):
    """BERT for sequence classification taking the tokenized dict ``fit`` passes, returning logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**x).logits


class _Repeat(Dataset):
    """``n`` examples cycling over one batch kept on the device: synthetic batches through ``fit``'s loader."""

    def __init__(self, x: Any, y: torch.Tensor, n: int):
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        k = i % len(self.y)
        if isinstance(self.x, dict):
            return {key: v[k] for key, v in self.x.items()}, self.y[k]
        return self.x[k], self.y[k]


def build_models(smoke: bool) -> dict[str, tuple[Callable[[], nn.Module], str, int]]:
    """name: (make, kind, size): kind image (size px) or text (size tokens); random weights, no download."""
    from transformers import BertConfig, BertForSequenceClassification

    if smoke:
        bert = BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=10
        )
        return {
            "resnet (test_resnet)": (lambda: timm.create_model("test_resnet", num_classes=10), "image", 64),
            "vit (test_vit)": (lambda: timm.create_model("test_vit", num_classes=10, img_size=64), "image", 64),
            "bert (2x32)": (lambda: _Text(BertForSequenceClassification(bert)), "text", 16),
        }
    return {
        "resnet50": (lambda: timm.create_model("resnet50", pretrained=False, num_classes=1000), "image", 224),
        "vit_base_patch16_224": (
            lambda: timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000),
            "image",
            224,
        ),
        "bert-base": (
            lambda: _Text(BertForSequenceClassification(BertConfig(num_labels=2, attn_implementation="sdpa"))),
            "text",
            128,
        ),
    }


def synthetic_batch(kind: str, size: int, batch: int, device: torch.device, classes: int) -> tuple[Any, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (batch,), generator=g)
    if kind == "image":
        x: Any = torch.randn(batch, 3, size, size, generator=g).to(device)
    else:
        ids = torch.randint(1000, 30000, (batch, size), generator=g)
        x = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    return x, y.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def plain_loop(
    model: nn.Module,
    batches: Callable[[int], tuple[Any, torch.Tensor]],
    steps: int,
    warmup: int,
    device: torch.device,
    compile_backend: str | None,
) -> dict[str, Any]:
    """The hand-written loop: what a careful user writes without transferkit. Returns examples/s and compile time."""
    model.to(device).train()
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    times = []
    n = 0
    for step in range(warmup + steps):
        x, y = batches(step)
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        _sync(device)
        t = time.perf_counter()
        with _autocast(device):
            loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
        n = len(y)
    steady = float(np.median(times[warmup:]))
    return {"per_s": n / steady, "compile_s": max(0.0, times[0] - steady) if compile_backend else None}


def fit_speed(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    batch: int,
    warmup: int,
    accelerator: Any,
    *,
    compile_backend: str | None,
    input_path: str = "auto",
    num_workers: int = 0,
    paths: JobPaths | None = None,
) -> dict[str, Any]:
    """``fit`` for one epoch; examples/s between the end of step ``warmup`` and the last step (validation excluded)."""
    cfg = TrainConfig(
        epochs=1, batch_size=batch, lr=1e-4, schedule="constant", log_every=10**9, compile=compile_backend is not None
    )
    plan = TrainPlan([ParamGroup("all", [n for n, _ in model.named_parameters()], cfg.lr)])
    device = accelerator.device
    stamps: dict[int, float] = {}
    total = math.ceil(len(train_set) / batch)

    def on_step(step: int) -> None:
        if step in (warmup, total):
            _sync(device)
            stamps[step] = time.perf_counter()

    result = fit(
        model,
        train_set,
        val_set,
        cfg,
        plan,
        num_classes=1000,
        seed=0,
        accelerator=accelerator,
        paths=paths,
        on_step=on_step,
        input_path=input_path,
        num_workers=num_workers,
        compile_backend=compile_backend or "inductor",
    )
    per_s = (total - warmup) * batch / (stamps[total] - stamps[warmup])
    return {"per_s": per_s, "speed": result.speed}


def step_flops(model: nn.Module, x: Any, y: torch.Tensor, device: torch.device) -> float:
    """FLOPs of one training step (forward and backward) of ``model`` on the batch, counted by torch."""
    model.to(device).train()
    counter = FlopCounterMode(display=False)
    with counter:
        with _autocast(device):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def make_jpegs(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """``n`` JPEGs of ``size`` (w, h): smooth random colour fields (they compress like photos, unlike noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (h // 25 + 2, w // 25 + 2, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        p = folder / f"{i:05d}.jpg"
        image.save(p, quality=90)
        paths.append(p)
    return paths


def plain_jpeg_batches(paths: list[Path], batch: int, size: int, device: torch.device) -> Callable[[int], Any]:
    """The hand-written GPU input: file bytes read once, nvjpeg batched decode, v2 crop/flip/normalise per batch."""
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    crop = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    y = torch.zeros(batch, dtype=torch.long, device=device)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = step * batch % len(encoded)
        chunk = (encoded + encoded)[start : start + batch]
        images = decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device)
        x = torch.stack([crop(im) for im in images]).float().div_(255).sub_(mean).div_(std)
        return x, y

    return batches


def augment_speed(device: torch.device, n: int, hw: tuple[int, int], size: int, reps: int = 5) -> dict[str, Any]:
    """The tensor path's crop + resize + flip + normalise of ``n`` decoded ``hw`` images to ``size``, batched
    (``resize_boxes``: one ``roi_align``) against per image (``resized_crop``), with the same draws: the median
    milliseconds of each, the ratio, and their mean distance in uint8 levels (the filters differ)."""
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, *hw), dtype=np.uint8)).to(device) for _ in range(n)]
    timed: dict[str, float] = {}
    out: dict[str, torch.Tensor] = {}
    for batched in (False, True):
        aug = TensorAugment(size, MEAN, STD, scale=(0.08, 1.0), hflip=0.5, batched=batched)
        times = []
        for _ in range(reps + 1):  # the first call warms the kernels up
            _sync(device)
            t = time.perf_counter()
            out[str(batched)] = aug(images, torch.Generator().manual_seed(0))
            _sync(device)
            times.append(time.perf_counter() - t)
        timed["batched_ms" if batched else "per_image_ms"] = 1000 * float(np.median(times[1:]))
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    levels = ((out["True"] - out["False"]).abs() * std * 255).mean().item()
    return {
        "images": n,
        "from": list(hw),
        "size": size,
        **timed,
        "per_image_over_batched": timed["per_image_ms"] / timed["batched_ms"],
        "mean_abs_levels": levels,
    }


def resume_check(paths_: list[Path], device: torch.device, accelerator: Any, folder: Path, size: int) -> dict:
    """``fit`` interrupted after step 3 and resumed equals the uninterrupted run, on the tensor input path."""

    class Stop(Exception):
        pass

    pre = {"input_size": [3, size, size], "mean": list(MEAN), "std": list(STD)}
    aug = AugmentConfig(random_resized_crop=(0.3, 1.0), hflip=True)
    labels = np.arange(len(paths_)) % 4
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def run(sub: str, stop: int | None, resume: bool) -> Any:
        torch.manual_seed(0)
        model = timm.create_model("resnet18" if device.type == "cuda" else "test_resnet", num_classes=4)
        cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, log_every=1, checkpoint_every=2)
        plan = TrainPlan([ParamGroup("all", [n for n, _ in model.named_parameters()], cfg.lr)])

        def on_step(step: int) -> None:
            if step == stop:
                raise Stop

        return fit(
            model,
            ImageDataset(paths_, labels, build_transform(pre, aug)),
            ImageDataset(paths_[:4], labels[:4], build_transform(pre)),
            cfg,
            plan,
            num_classes=4,
            seed=0,
            accelerator=accelerator,
            paths=JobPaths(folder / sub / "last.pt", folder / sub / "metrics.jsonl", "m"),
            resume=resume,
            on_step=on_step,
            input_path="gpu",
        )

    reference = run("a", None, False)
    try:
        run("b", 3, False)
    except Stop:
        pass
    resumed = run("b", None, True)
    diff = max((reference.best_state[k].float() - v.float()).abs().max().item() for k, v in resumed.best_state.items())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    return {"identical": diff == 0.0, "max_abs_diff": diff, "resumed_from_step": resumed.resumed_from_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", "--dry-run", action="store_true", help="tiny models, 16 JPEGs, 2 steps, CPU")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip measurements started after this many seconds")
    args = ap.parse_args()
    t_start = time.perf_counter()
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    steps, warmup = (2, 1) if smoke else (args.steps, args.warmup)
    batches = {"image": 8, "text": 8} if smoke else {"image": 128, "text": 64}
    backend = "eager" if smoke else "inductor"  # inductor on 2 CPU threads takes minutes; eager tests the path
    accelerator = make_accelerator("auto")
    card, peak = peak_flops(device)
    rows: list[list[Any]] = []
    results: dict[str, Any] = {"device": card, "peak_bf16_flops": peak, "smoke": smoke, "models": {}}

    def over_budget(what: str) -> bool:
        late = time.perf_counter() - t_start > args.budget_s
        if late:
            print(f"skipped (over --budget-s {args.budget_s:g}): {what}", flush=True)
        return late

    for name, (make, kind, size) in build_models(smoke).items():
        batch = batches[kind]
        classes = 10 if smoke else (2 if kind == "text" else 1000)
        x, y = synthetic_batch(kind, size, batch, device, classes)
        entry: dict[str, Any] = {"batch": batch, "size": size, "unit": "img/s" if kind == "image" else "seq/s"}
        torch.manual_seed(0)
        flops = step_flops(make(), x, y, device)
        entry["flops_per_step"] = flops
        for compiled in (False, True):
            if compiled and args.no_compile:
                continue
            mode = "compiled" if compiled else "eager"
            if over_budget(f"{name} synthetic {mode}"):
                continue
            torch.manual_seed(0)
            plain = plain_loop(make(), lambda s, x=x, y=y: (x, y), steps, warmup, device, backend if compiled else None)
            torch.manual_seed(0)
            data = _Repeat(x, y, (warmup + steps) * batch)
            ours = fit_speed(
                make().to(device),
                data,
                _Repeat(x, y, batch),
                batch,
                warmup,
                accelerator,
                compile_backend=backend if compiled else None,
            )
            mfu = flops * ours["per_s"] / batch / peak if peak else None
            entry[f"synthetic_{mode}"] = {
                "plain": plain,
                "fit": ours,
                "ratio": ours["per_s"] / plain["per_s"],
                "mfu": mfu,
            }
            rows.append(
                [
                    name,
                    f"synthetic, {mode}",
                    plain["per_s"],
                    ours["per_s"],
                    ours["per_s"] / plain["per_s"],
                    f"{mfu:.1%}" if mfu else "-",
                    ours["speed"].get("compile_s"),
                ]
            )
            print(rows[-1], flush=True)
        results["models"][name] = entry

    if not over_budget("augmentation"):
        results["augment"] = augment_speed(
            device, 16 if smoke else 128, (60, 80) if smoke else (375, 500), 32 if smoke else 224
        )
        print("augment:", results["augment"], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n_jpegs = 16 if smoke else 2048
        paths = make_jpegs(folder / "jpegs", n_jpegs, (80, 60) if smoke else (500, 375))
        labels = np.arange(n_jpegs) % 10
        for name, (make, kind, size) in build_models(smoke).items():
            if kind != "image" or over_budget(f"{name} from JPEG"):
                continue
            batch = batches["image"]
            jpeg_steps = min(steps, n_jpegs // batch - warmup) if not smoke else steps
            pre = {"input_size": [3, size, size], "mean": list(MEAN), "std": list(STD)}
            aug = AugmentConfig(random_resized_crop=(0.08, 1.0), hflip=True)
            n = (warmup + jpeg_steps) * batch
            train = ImageDataset(paths[:n], labels[:n], build_transform(pre, aug))
            val = ImageDataset(paths[:batch], labels[:batch], build_transform(pre))
            torch.manual_seed(0)
            plain = plain_loop(make(), plain_jpeg_batches(paths, batch, size, device), jpeg_steps, warmup, device, None)
            entry = {"plain_nvjpeg": plain}
            workers = 0 if smoke else 8
            for label, how in {
                f"fit, PIL, {workers} workers": {"input_path": "pil", "num_workers": workers},
                "fit, tensor path": {"input_path": "gpu"},
                "fit, tensor path + uint8 cache": {
                    "input_path": "gpu",
                    "paths": JobPaths(folder / "run/ckpt/last.pt", folder / "run/metrics.jsonl", "m"),
                },
            }.items():
                torch.manual_seed(0)
                ours = fit_speed(make().to(device), train, val, batch, warmup, accelerator, compile_backend=None, **how)
                entry[label] = {**ours, "ratio": ours["per_s"] / plain["per_s"]}
                rows.append(
                    [name, f"JPEG, {label}", plain["per_s"], ours["per_s"], ours["per_s"] / plain["per_s"], "-", None]
                )
                print(rows[-1], flush=True)
            results["models"][name]["jpeg"] = entry
        if not over_budget("resume check"):
            results["resume"] = resume_check(paths[:16], device, accelerator, folder / "resume", 64)
            print("resume:", results["resume"], flush=True)

    results["machine"], results["code"] = machine(), code_version()
    results["wall_s"] = time.perf_counter() - t_start
    name = "gpu-smoke" if smoke else "gpu"
    path = write_result(name, results)
    print(table(["model", "input, mode", "plain /s", "fit /s", "fit / plain", "MFU (fit)", "compile_s (fit)"], rows))
    print(f"resume identical: {results.get('resume', {}).get('identical')}; wrote {path}; {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
