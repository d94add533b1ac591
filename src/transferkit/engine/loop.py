"""The training loop: explicit, on Accelerate, resumable to the same result.

Read it top to bottom in ``fit``. Determinism under resume comes from three things: the order of examples in
an epoch depends only on (seed, epoch); a checkpoint stores the model, optimizer, schedule, RNG state and the
position in the epoch; and resuming skips already-seen batches by index, without loading them (loading would
draw augmentation randomness and change what follows).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from transferkit.config import TrainConfig
from transferkit.data.gpu_images import TensorImageDataset, choose_eval_input, choose_input
from transferkit.engine.fold import folded_for_pass
from transferkit.engine.objective import ClassificationObjective
from transferkit.engine.plan import TrainPlan, set_train_mode
from transferkit.engine.schedule import lr_factor
from transferkit.errors import RunDirError, TrainingError
from transferkit.evaluation.metrics import classification_metrics
from transferkit.io import safe_torch_load, torch_save, write_text


def make_accelerator(mixed_precision: str = "auto"):
    """An ``accelerate.Accelerator``: the GPU when there is one, bf16/fp16 autocast when it supports it."""
    from accelerate import Accelerator

    if mixed_precision == "auto":
        if torch.cuda.is_available():
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mixed_precision = "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


_CHANNELS_LAST: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules inside conv_layout() now


@contextlib.contextmanager
def conv_layout(model: nn.Module) -> Iterator[nn.Module]:
    """Run a model that has 2-D convolutions with its 4-D weights in channels-last layout; restore them after.

    Convolutions with channels-last weights take the usual NCHW inputs and compute in channels-last, which
    oneDNN (CPU) and cuDNN run faster for depthwise and pointwise convolutions; the outputs agree to float
    rounding (``bench/channels_last.py`` measures both; the figures are in docs/benchmarks.md). Afterwards the
    weights are contiguous again, so saved files, exports and later code see ordinary tensors.
    Nested use is a no-op (the validation inside ``fit`` runs under ``fit``'s layout); models without ``Conv2d``
    are left alone.
    """
    if model in _CHANNELS_LAST or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        yield model
        return
    model.to(memory_format=torch.channels_last)
    _CHANNELS_LAST.add(model)
    try:
        yield model
    finally:
        _CHANNELS_LAST.discard(model)
        model.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def inference_pass(model: nn.Module, num_examples: int, batch_size: int) -> Iterator[Any]:
    """How the engine runs a model in eval mode over ``num_examples`` inputs: channels-last weights
    (``conv_layout``) and, for more than one batch, batch norms folded into the convolutions
    (``engine.fold.folded_for_pass``). Yields the callable to run each batch with; the model is put back after."""
    with conv_layout(model), folded_for_pass(model, num_examples, batch_size) as run:
        yield run


@dataclass
class JobPaths:
    """Where one training job keeps its checkpoint and log lines."""

    checkpoint: Path  # checkpoints/<job>/last.pt
    metrics_log: Path  # metrics.jsonl (shared by the run; lines carry the job name)
    job: str


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    train_s: float = 0.0
    resumed_from_step: int | None = None
    speed: dict[str, Any] = field(default_factory=dict)


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This process's example order in ``epoch``: a permutation fixed by (seed, epoch), padded and sharded."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = math.ceil(n / world)
    order = np.concatenate([order, order[: per_rank * world - n]])  # every rank takes the same number
    return order[rank::world]


def _batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def to_device(x: Any, device: torch.device | str) -> Any:
    """A batch's inputs or targets on ``device``: a tensor, or a dict of tensors (a tokenized text batch; a
    distillation batch's label and teacher outputs)."""
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def make_loader(
    dataset: Dataset, batch_size: int | None = None, batch_sampler: Any = None, num_workers: int = 0, seed: int = 0
) -> DataLoader:
    """The one way transferkit batches a dataset: in order (or by ``batch_sampler``), with the dataset's own
    ``collate`` when it has one (text pads each batch to its longest example).

    The loader has its own generator: creating the iterator must not draw from the global RNG, or a resumed epoch
    would shift every later random number (exact resume holds with num_workers=0; workers reseed their own streams).
    """
    inner = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    order = None
    if batch_sampler is None and hasattr(inner, "lengths"):  # in-order inference: batch similar lengths together
        lengths = np.asarray(inner.lengths())
        if isinstance(dataset, torch.utils.data.Subset):
            lengths = lengths[np.asarray(dataset.indices)]
        order = np.argsort(lengths, kind="stable")
        batch_sampler = [b.tolist() for b in _batches(order, batch_size or 1)]
    kwargs: dict[str, Any] = (
        {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size, "shuffle": False}
    )
    loader = DataLoader(
        dataset,
        num_workers=num_workers,
        collate_fn=getattr(inner, "collate", None),
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    loader.order = order  # the example order of the batches, when it is not the dataset's (see in_order)
    return loader


@torch.no_grad()
def in_order(
    dataset: Dataset, batch_size: int, fn: Any, num_workers: int = 0, desc: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(inputs)`` over every batch and the labels, both in dataset order.

    Datasets with ``lengths()`` (text) are batched by length, which cuts the padding (docs/benchmarks.md); the
    outputs are put back in dataset order.
    """
    loader = make_loader(dataset, batch_size, num_workers=num_workers)
    outs, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=desc is None or not show_progress()):
        outs.append(fn(x).float().cpu())
        labels.append(y)
    out, lab = torch.cat(outs), torch.cat(labels)
    order: np.ndarray | None = cast(Any, loader).order  # set by make_loader: not a DataLoader attribute
    if order is not None:
        inverse = torch.as_tensor(np.argsort(order))
        out, lab = out[inverse], lab[inverse]
    return out, lab


def _loader(dataset: Dataset, batch_indices: list[np.ndarray], num_workers: int, seed: int = 0) -> Iterable[Any]:
    if isinstance(dataset, TensorImageDataset):  # the tensor input path loads whole batches on the device itself
        return dataset.batches([b.tolist() for b in batch_indices])
    return make_loader(dataset, batch_sampler=[b.tolist() for b in batch_indices], num_workers=num_workers, seed=seed)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for a whole dataset, in order, with the model in eval mode (batch norms folded)."""
    was_training = model.training
    model.eval()
    with inference_pass(model, len(cast(Sized, dataset)), batch_size) as run:
        logits, labels = in_order(dataset, batch_size, lambda x: run(to_device(x, device)), num_workers, desc)
    model.train(was_training)
    return logits, labels


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    num_classes: int,
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, loss and confusion matrix of ``model`` on ``dataset``."""
    logits, labels = predict_logits(model, dataset, batch_size, device, desc=desc)
    return classification_metrics(logits, labels, num_classes)


def show_progress() -> bool:
    """Progress bars on, unless TRANSFERKIT_PROGRESS=0 (tests, benchmarks, logs)."""
    return os.environ.get("TRANSFERKIT_PROGRESS", "1") != "0"


def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over processes.

    DDP keeps gradients, hence weights, in sync, but each process updates its running statistics on its own
    shard; without this the processes would end an epoch with different models (as timm's ``distribute_bn``).
    """
    import torch.distributed as dist

    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(dist.get_world_size())


def _build_optimizer(model: nn.Module, plan: TrainPlan, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    params = dict(model.named_parameters())
    groups = []
    for g in plan.groups:
        wd = cfg.weight_decay if g.weight_decay is None else g.weight_decay
        decay = [params[n] for n in g.params if params[n].ndim > 1]
        no_decay = [params[n] for n in g.params if params[n].ndim <= 1]  # biases and norms are not decayed
        groups += [
            {"params": decay, "lr": g.lr, "initial_lr": g.lr, "weight_decay": wd, "name": g.name},
            {"params": no_decay, "lr": g.lr, "initial_lr": g.lr, "weight_decay": 0.0, "name": g.name},
        ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, fused=True) if fused else torch.optim.AdamW(groups)


CHECKPOINT_PARAMS = 300_000_000  # gradient_checkpointing: auto turns it on for backbones larger than this, on a GPU


def _checkpointable(model: nn.Module) -> nn.Module | None:
    """The outermost module that can recompute its activations: a timm model (``set_grad_checkpointing``) or a
    transformers one (``gradient_checkpointing_enable``)."""
    for m in model.modules():
        if hasattr(m, "set_grad_checkpointing") or hasattr(m, "gradient_checkpointing_enable"):
            return m
    return None


def set_gradient_checkpointing(model: nn.Module, setting: bool | str, device: torch.device | str) -> str:
    """Turn activation recomputation on by ``train.gradient_checkpointing``; returns what was done.

    Why: it trades about a third more compute for keeping the activations of one block at a time, which pays only
    where memory binds, so ``auto`` turns it on for large backbones on a GPU and never on a CPU (memory rarely binds
    there and the recompute is pure cost). Off, the model is not touched at all.

    Returns:
        ``on``, ``off``, or ``unsupported: REASON`` when it was asked for and the model cannot do it.
    """
    inner = _checkpointable(model)
    if setting == "auto":
        big = sum(p.numel() for p in model.parameters()) > CHECKPOINT_PARAMS
        setting = big and torch.device(device).type == "cuda" and inner is not None
    if not setting:
        return "off"
    if inner is None:
        raise TrainingError(
            f"train.gradient_checkpointing: true needs a timm or transformers backbone; {type(model).__name__} has "
            "none. Set it to auto or false"
        )
    try:
        _checkpointing(inner, True)
    except (AssertionError, NotImplementedError, ValueError) as e:  # timm asserts for models without it
        return f"unsupported: {type(inner).__name__}: {e or 'no gradient checkpointing'}"
    return "on"


def _checkpointing(inner: nn.Module, on: bool) -> None:
    m = cast(Any, inner)
    if hasattr(m, "set_grad_checkpointing"):
        m.set_grad_checkpointing(on)
    elif on:  # non-reentrant: correct with frozen layers and inputs that need no gradient
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        m.gradient_checkpointing_disable()


class _StepTimer:
    """Wall time of the first optimizer steps (the device synchronised), for the compile time: the first step of a
    compiled model includes the compilation, later steps do not."""

    def __init__(self, device: torch.device, steps: int = 4):
        self.device, self.steps = device, steps
        self.times: list[float] = []
        self._t = 0.0

    def start(self) -> None:
        if len(self.times) < self.steps:
            self._sync()
            self._t = time.perf_counter()

    def stop(self) -> None:
        if len(self.times) < self.steps:
            self._sync()
            self.times.append(time.perf_counter() - self._t)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compile_s(self) -> float | None:
        """First step minus the median of the next ones; None before two steps."""
        if len(self.times) < 2:
            return None
        return max(0.0, self.times[0] - float(np.median(self.times[1:])))


def _log(paths: JobPaths | None, main: bool, record: dict[str, Any]) -> None:
    if paths is None or not main:
        return
    paths.metrics_log.parent.mkdir(parents=True, exist_ok=True)
    with paths.metrics_log.open("a") as f:
        f.write(json.dumps({"job": paths.job, **record}) + "\n")


def _drop_log_lines_after(paths: JobPaths, step: int) -> None:
    """On resume, forget log lines this job wrote after its checkpoint (they will be written again)."""
    if not paths.metrics_log.exists():
        return
    lines = paths.metrics_log.read_text().splitlines()
    kept = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # a last line cut short (the process died, or the disk filled, mid-append)
                continue
            raise RunDirError(
                f"{paths.metrics_log}: line {i + 1} is not JSON; the log is damaged beyond its last line. Delete "
                "that line (or the file: the checkpoints hold what a resume needs) and run --resume again"
            ) from None
        if rec.get("job") == paths.job and rec.get("step", 0) > step:
            continue
        kept.append(line)
    if len(kept) < len(lines):
        write_text(paths.metrics_log, "".join(x + "\n" for x in kept))


def random_state(accelerator: Any) -> dict[str, Any]:
    """Every random stream a resumed run must continue: torch's CPU generator, each CUDA device's (dropout and
    augmentation on a GPU), Python's and NumPy's global ones (libraries that draw from them), and the mixed-precision
    loss scaler's state (its scale and growth tracker change the updates)."""
    scaler = getattr(accelerator, "scaler", None)
    return {
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": json.dumps(random.getstate()),
        "numpy_rng": json.dumps(np.random.get_state(legacy=False), default=_plain),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else int(value)


def restore_random_state(checkpoint: dict[str, Any], accelerator: Any) -> None:
    """Put back what ``random_state`` saved (a checkpoint of an older version holds the CPU generator only)."""
    torch.set_rng_state(checkpoint["rng"])
    cuda = checkpoint.get("cuda_rng") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise TrainingError(
                f"the checkpoint holds the random state of {len(cuda)} GPU(s), this machine has "
                f"{torch.cuda.device_count()}: resume on the same number of GPUs for the same result"
            )
        torch.cuda.set_rng_state_all(cuda)
    if checkpoint.get("python_rng"):
        state = json.loads(checkpoint["python_rng"])
        random.setstate((state[0], tuple(state[1]), state[2]))
    if checkpoint.get("numpy_rng"):
        np.random.set_state(json.loads(checkpoint["numpy_rng"]))
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    cfg: TrainConfig,
    plan: TrainPlan,
    *,
    num_classes: int,
    seed: int,
    accelerator: Any,
    paths: JobPaths | None = None,
    resume: bool = False,
    objective: nn.Module | None = None,
    num_workers: int = 0,
    on_step: Callable[[int], None] | None = None,
    input_path: str = "auto",
    compile_backend: str = "inductor",
) -> FitResult:
    """Train ``model`` by ``plan`` and ``cfg``; keep the weights of the best validation epoch.

    Args:
        model: the module to train (the whole target, or only its head when features are cached).
        train_set: yields (input, label).
        val_set: used each epoch for the monitored metric and early stopping (never the test set).
        cfg: epochs, batch size, optimizer, schedule...
        plan: parameter groups and frozen modules (``requires_grad`` must already be set by ``apply_plan``).
        num_classes: for the metrics.
        seed: fixes data order, dropout and augmentation; the caller seeds model initialisation.
        accelerator: from ``make_accelerator``; DDP when launched by torchrun.
        paths: checkpoint and log locations; None trains without checkpoints.
        resume: continue from ``paths.checkpoint`` when it exists.
        objective: returns {"loss", "logits"}; cross-entropy by default.
        num_workers: DataLoader worker processes.
        on_step: called with the global step after each optimizer step (tests use it to interrupt).
        input_path: ``data.input`` (auto, pil, gpu): how training images are decoded and augmented
            (``data.gpu_images.choose_input``).
        compile_backend: the ``torch.compile`` backend when ``cfg.compile`` (tests use ``eager`` on a CPU).
    """
    with conv_layout(model):  # channels-last weights while training: see conv_layout
        objective = objective or ClassificationObjective(cfg.label_smoothing)
        main = accelerator.is_main_process
        rank, world = accelerator.process_index, accelerator.num_processes
        per_rank_batch = max(1, cfg.batch_size // world)
        micro_batches = len(_batches(epoch_order(len(cast(Sized, train_set)), seed, 0, rank, world), per_rank_batch))
        steps_per_epoch = math.ceil(micro_batches / cfg.grad_accum)
        total_steps = steps_per_epoch * cfg.epochs
        warmup = round(cfg.warmup_epochs * steps_per_epoch)

        fused = accelerator.device.type == "cuda" and cfg.optimizer == "adamw"  # one kernel for all the params
        optimizer = _build_optimizer(model, plan, cfg, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule)
        )
        higher_better = cfg.monitor != "val_loss"
        state: dict[str, Any] = {
            "epoch": 0,
            "batch": 0,
            "step": 0,
            "history": [],
            "best_value": None,
            "best_epoch": 0,
            "best_val": {},
            "bad_epochs": 0,
        }
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        resumed_from = None
        torch.manual_seed(seed)  # dropout and augmentation draw from here on: they depend on the seed alone
        if resume and paths is not None and paths.checkpoint.exists():
            ckpt = safe_torch_load(paths.checkpoint)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            restore_random_state(ckpt, accelerator)
            if ckpt.get("objective") and hasattr(objective, "load_extra_state"):
                cast(Any, objective).load_extra_state(ckpt["objective"])  # e.g. DELTA's channel weights, measured once
            best_state = ckpt["best_state"] or {k: v.detach().clone() for k, v in ckpt["model"].items()}
            state = json.loads(ckpt["state"])
            resumed_from = state["step"]
            if main:
                _drop_log_lines_after(paths, state["step"])
        elif resume and paths is not None and main:
            # interrupted before its first checkpoint: it starts again from step 0 and writes every line again
            _drop_log_lines_after(paths, 0)
        accelerator.wait_for_everyone()

        wrapped, optimizer = accelerator.prepare(model, optimizer)
        device = accelerator.device
        cache_dir = paths.metrics_log.parent / "cache" / "images" if paths is not None else None
        # the tensor path's batches follow the model's layout (conv_layout made it channels-last if it convolves)
        train_set, input_record = choose_input(train_set, input_path, device, cache_dir, model in _CHANNELS_LAST)
        # the validation set follows the training set onto the tensor path (no record change when it stays on PIL)
        val_set, val_record = choose_eval_input(val_set, input_record, device, cache_dir, model in _CHANNELS_LAST)
        input_record.update(val_record)
        checkpointing = set_gradient_checkpointing(model, cfg.gradient_checkpointing, device)
        runner: nn.Module = wrapped
        if cfg.compile:  # the step runs the compiled module; saving, validation and unwrap see the plain one
            runner = cast(nn.Module, torch.compile(wrapped, backend=compile_backend))
        timer = _StepTimer(device)

        def save_checkpoint() -> None:
            if paths is None or not main:
                return
            # at the end of an epoch that improved, the best weights are the current ones: not stored twice
            best_is_current = state["batch"] == 0 and state["best_epoch"] == state["epoch"]
            torch_save(
                paths.checkpoint,
                {
                    "model": accelerator.unwrap_model(wrapped).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    **random_state(accelerator),
                    "best_state": {} if best_is_current else best_state,
                    "state": json.dumps(state),
                    "objective": cast(Any, objective).extra_state() if hasattr(objective, "extra_state") else {},
                },
            )

        t0 = time.perf_counter()
        bar = tqdm(
            total=total_steps,
            initial=state["step"],
            desc=paths.job if paths else "train",
            leave=False,
            disable=not (main and show_progress()),
        )
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            set_train_mode(accelerator.unwrap_model(wrapped), plan)
            batches = _batches(epoch_order(len(cast(Sized, train_set)), seed, epoch, rank, world), per_rank_batch)
            start = state["batch"]
            running, seen = torch.zeros((), device=device), 0
            group: list[tuple[torch.Tensor, torch.Tensor]] = []
            for i, (x, y) in enumerate(_loader(train_set, batches[start:], num_workers, seed + epoch), start=start):
                group.append((x, y))
                if len(group) < cfg.grad_accum and i + 1 < len(batches):
                    continue
                # one optimizer step over the micro-batches in `group` (the last group of an epoch may be shorter)
                timer.start()
                for j, (gx, gy) in enumerate(group):
                    sync = j + 1 == len(group)
                    ctx = accelerator.no_sync(wrapped) if not sync and world > 1 else contextlib.nullcontext()
                    with ctx, accelerator.autocast():
                        out = objective(runner, to_device(gx, device), to_device(gy, device))
                        loss = out["loss"] / len(group)
                    accelerator.backward(loss)
                    running += loss.detach()
                group = []
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                timer.stop()
                state["step"] += 1
                state["batch"] = i + 1
                seen += 1
                bar.update(1)
                checkpoint_now = bool(cfg.checkpoint_every) and state["step"] % cfg.checkpoint_every == 0
                # a checkpoint step is also a log step, so no partial loss sum is ever lost to an interruption
                if state["step"] % cfg.log_every == 0 or state["batch"] == len(batches) or checkpoint_now:
                    mean_loss = (running / seen).item()
                    if not math.isfinite(mean_loss):
                        raise TrainingError(
                            f"the training loss became {mean_loss} in epoch {epoch + 1} before step {state['step']}. "
                            f"Lower the learning rate (train.lr={cfg.lr:g} now), set train.max_grad_norm (e.g. 1.0), "
                            "or check the inputs for NaN values."
                        )
                    _log(
                        paths,
                        main,
                        {
                            "epoch": epoch + 1,
                            "step": state["step"],
                            "loss": mean_loss,
                            "lr": optimizer.param_groups[-1]["lr"],
                        },
                    )
                    state.setdefault("epoch_loss", []).append([mean_loss, seen])
                    running, seen = torch.zeros((), device=device), 0
                if on_step is not None:
                    on_step(state["step"])
                if checkpoint_now and state["batch"] < len(batches):
                    save_checkpoint()

            # end of epoch: agree on BatchNorm statistics, validate, keep the best weights, maybe stop early, checkpoint
            if world > 1:
                average_buffers(accelerator.unwrap_model(wrapped))
            val = evaluate_model(accelerator.unwrap_model(wrapped), val_set, per_rank_batch, num_classes, device)
            if not math.isfinite(val["loss"]):  # the logged training loss can stay finite while the model diverged
                raise TrainingError(
                    f"the validation loss became {val['loss']} after epoch {epoch + 1} (step {state['step']}): the "
                    f"model diverged. Lower the learning rate (train.lr={cfg.lr:g} now), set train.max_grad_norm "
                    "(e.g. 1.0), or check the inputs for NaN values."
                )
            parts = state.pop("epoch_loss", [])
            train_loss = sum(loss * n for loss, n in parts) / max(1, sum(n for _, n in parts))
            record = {
                "epoch": epoch + 1,
                "step": state["step"],
                "train_loss": train_loss,
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "val_macro_f1": val["macro_f1"],
                "lr": optimizer.param_groups[-1]["lr"],
                "time_s": time.perf_counter() - t0,
            }
            state["history"].append(record)
            _log(paths, main, {"event": "epoch", **record})
            value = val[cfg.monitor.removeprefix("val_")]
            improved = state["best_value"] is None or (
                value > state["best_value"] if higher_better else value < state["best_value"]
            )
            if improved:
                state.update(
                    best_value=value,
                    best_epoch=epoch + 1,
                    bad_epochs=0,
                    best_val={k: v for k, v in val.items() if k != "confusion"},
                )
                current = accelerator.unwrap_model(wrapped).state_dict()
                best_state = {k: v.detach().cpu().clone() for k, v in current.items()}
            else:
                state["bad_epochs"] += 1
            state["epoch"], state["batch"] = epoch + 1, 0
            stop = cfg.early_stopping_patience is not None and state["bad_epochs"] >= cfg.early_stopping_patience
            if stop:
                state["epoch"] = cfg.epochs
            save_checkpoint()
            bar.set_postfix(val=f"{value:.3f}")
        bar.close()
        if checkpointing == "on":  # inference and later stages run without it
            _checkpointing(cast(nn.Module, _checkpointable(model)), False)
        accelerator.wait_for_everyone()
        if accelerator.device.type != "cpu":
            accelerator.free_memory()  # give accelerator memory back; on a CPU it would only run a costly gc.collect()
        return FitResult(
            best_state,
            state["best_epoch"],
            state["best_val"],
            state["history"],
            state["step"],
            time.perf_counter() - t0,
            resumed_from,
            {
                "input": input_record,
                "mixed_precision": str(accelerator.mixed_precision),
                "channels_last": model in _CHANNELS_LAST,
                "fused_optimizer": fused,
                "compiled": cfg.compile,
                **({"compile_backend": compile_backend, "compile_s": timer.compile_s()} if cfg.compile else {}),
                "gradient_checkpointing": checkpointing,
                "first_steps_s": [round(t, 4) for t in timer.times],
            },
        )
