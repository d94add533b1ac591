"""Merging saved models: checks, a streaming weight merge, BatchNorm recalibration, soups and ensembles.

``merge_models(folders, method, base)`` merges model folders (``models/NAME/`` or a run's ``model/``) that share an
architecture and a starting point: tensor by tensor, reading one tensor of each model at a time from its
safetensors file, so that beyond the running result no more than one model's tensors are in memory. The new head
has no shared start (every run initialises its own), so heads are averaged; integer buffers (BatchNorm step
counters) are the first model's. BatchNorm statistics that differ between the models are recomputed on training
data afterwards (``recalibrate_batch_norms``), since their mean is not the statistics of the merged network;
statistics every model kept (frozen at the source's) are exact as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferkit.errors import DataError, SourceError
from transferkit.io import read_json
from transferkit.merge.methods import METHODS, MergeConfig, Method, merge_tensor
from transferkit.specs import parse_spec

NEW_PREFIX = "head."  # tensors every run initialises itself: averaged, no task vector


def method_of(spec: Any) -> tuple[str, Method, Any]:
    """Name, registered method and validated options of a method spec (``"ties"``, ``{name: ties, density: 0.2}``)."""
    return parse_spec(spec, METHODS, lambda m: m.config)


def check_compatible(folders: Sequence[Path]) -> list[dict[str, Any]]:
    """The models' ``model.json``; models of other architectures, labels or tensors are a clear error."""
    from safetensors import safe_open

    if len(folders) < 2:
        raise DataError(f"a merge needs at least two models, got {len(folders)}")
    metas = []
    for f in folders:
        if not (f / "model.json").is_file():
            raise SourceError(f"'{f}' holds no model (model.json is missing): give run directories or model folders")
        metas.append(read_json(f / "model.json"))
    first, first_folder = metas[0], folders[0]
    for meta, folder in zip(metas[1:], folders[1:]):
        if meta["arch"] != first["arch"]:
            raise DataError(
                f"'{folder}' is a {meta['arch'].get('name')} ({meta['arch']}), '{first_folder}' a "
                f"{first['arch'].get('name')} ({first['arch']}): merged models must share the architecture"
            )
        if meta.get("labels") != first.get("labels"):
            raise DataError(
                f"'{folder}' predicts {meta.get('labels')}, '{first_folder}' {first.get('labels')}: a merge with one "
                "head needs the same labels in the same order (models of different tasks are not merged yet)"
            )
        if meta.get("adapter") or first.get("adapter"):
            raise DataError(
                f"'{folder if meta.get('adapter') else first_folder}' carries LoRA adapters: merge models trained "
                "with lora merge: true (plain weights)"
            )
    shapes = []
    for f in folders:
        with safe_open(str(f / "model.safetensors"), framework="pt") as sf:
            shapes.append({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})
    for shape, folder in zip(shapes[1:], folders[1:]):
        for name in sorted(set(shapes[0]) | set(shape)):
            if name not in shape or name not in shapes[0]:
                where = folder if name not in shape else first_folder
                raise DataError(f"tensor '{name}' is missing from '{where}': the models do not share a structure")
            if shape[name] != shapes[0][name]:
                raise DataError(
                    f"tensor '{name}' is {list(shape[name])} in '{folder}' but {list(shapes[0][name])} in "
                    f"'{first_folder}': the models do not share a structure"
                )
    return metas


def _is_statistic(name: str) -> bool:
    return name.endswith(("running_mean", "running_var"))


def merge_state(
    folders: Sequence[Path], cfg: MergeConfig, base: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The merged tensors of ``folders`` and how each was merged (``how -> tensor names``).

    Args:
        folders: model folders of one architecture (``check_compatible``).
        cfg: the generalised merge.
        base: the shared starting weights by name (the source's backbone); a tensor without one is averaged.
    """
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(f / "model.safetensors"), framework="pt")) for f in folders]
        return _merge_open(files, cfg, base)


def _merge_open(
    files: Sequence[Any], cfg: MergeConfig, base: Mapping[str, torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    names = list(files[0].keys())
    task_vector = {
        n for n in names if base is not None and n in base and not n.startswith(NEW_PREFIX) and not _is_statistic(n)
    }
    thresholds = _global_thresholds(files, sorted(task_vector), cfg, base) if cfg.scope == "global" else None
    mean = MergeConfig(lam=1.0 / len(files))
    generator = torch.Generator().manual_seed(cfg.seed)
    merged: dict[str, torch.Tensor] = {}
    how: dict[str, list[str]] = {"task vectors": [], "averaged": [], "first model": [], "statistics that differ": []}
    for name in names:
        tensors = [f.get_tensor(name) for f in files]
        if _is_statistic(name) and any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            how["statistics that differ"].append(name)  # trained in some member: recompute after the merge
        if not tensors[0].is_floating_point():
            merged[name], key = tensors[0], "first model"
        elif name in task_vector:
            assert base is not None
            merged[name] = merge_tensor(base[name], tensors, cfg, generator, thresholds)
            key = "task vectors"
        else:
            merged[name], key = merge_tensor(torch.zeros_like(tensors[0]), tensors, mean), "averaged"
        how[key].append(name)
    return merged, how


def _global_thresholds(
    files: Sequence[Any], names: Sequence[str], cfg: MergeConfig, base: Mapping[str, torch.Tensor] | None
) -> list[float]:
    """Per model, the magnitude of its ``density``-quantile task-vector entry over the whole model (TIES, global)."""
    assert base is not None
    out = []
    for f in files:  # one model's task vector in memory at a time
        mags = torch.cat([(f.get_tensor(n).float() - base[n].float()).abs().reshape(-1) for n in names])
        k = max(1, int(cfg.density * mags.numel()))
        out.append(float(torch.topk(mags, k).values[-1]))
    return out


def merged_model(folder: Path, state: Mapping[str, torch.Tensor]) -> Any:
    """The model of ``folder`` (its architecture, head and preprocessing) with the merged weights."""
    from transferkit.models.base import load_model

    model = load_model(folder)
    model.load_state_dict(dict(state))
    return model.eval()


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def differing_norms(how: Mapping[str, Sequence[str]]) -> set[str]:
    """The BatchNorm modules whose running statistics differ between the merged models (from ``merge_state``)."""
    return {name.rsplit(".", 1)[0] for name in how.get("statistics that differ", [])}


@torch.no_grad()
def recalibrate_batch_norms(
    model: nn.Module, dataset: Dataset, batch_size: int = 32, device: Any = "cpu", only: set[str] | None = None
) -> int:
    """Recompute BatchNorm running statistics on ``dataset`` (cumulative averages over one pass, the network
    otherwise in eval mode); returns the number of examples seen (0: nothing to recompute).

    Args:
        only: the names of the norms to recompute (default: all). Statistics that every merged model shares (kept
            frozen at the source's while fine-tuning) are exact as they are, and the weights were trained for them:
            recomputing those would change the function the models learned.
    """
    norms = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and (only is None or name in only)
    ]
    if not norms:
        return 0
    from transferkit.engine.loop import to_device

    momenta = [m.momentum for m in norms]
    model.eval().to(device)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the whole pass
        m.train()
    seen = 0
    try:
        collate = getattr(dataset, "collate", None)
        for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
            model(to_device(x, device))
            seen += len(_)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return seen


class Ensemble(nn.Module):
    """Models voting on the same inputs: the log of their mean probabilities (``mean``), or of the fraction of
    votes each class got (``majority``, ties broken by the mean probability), so that it evaluates as a classifier."""

    def __init__(self, members: Sequence[nn.Module], vote: str = "mean"):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.vote = vote

    def forward(self, x: Any) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x).float(), dim=-1) for m in self.members])
        mean = probs.mean(dim=0)
        if self.vote == "mean":
            return torch.log(mean.clamp(min=1e-12))
        votes = nn.functional.one_hot(probs.argmax(dim=-1), probs.shape[-1]).float().mean(dim=0)
        return torch.log((votes + 1e-6 * mean).clamp(min=1e-12))


def greedy_soup(
    folders: Sequence[Path],
    val_accuracy: Callable[[Any], float],
    prepare: Callable[[Any, Mapping[str, Sequence[str]]], None] = lambda model, how: None,
) -> tuple[Any, list[int], list[dict[str, Any]]]:
    """Greedy soup: the models sorted by their own validation accuracy; each joins the soup only if the soup's
    validation accuracy improves. Returns the soup, the positions of the models in it and the steps taken.

    Args:
        folders: the candidate models.
        val_accuracy: validation accuracy of a model.
        prepare: applied to each soup, with how it was merged, before it is scored (BatchNorm recalibration).
    """
    singles = [(val_accuracy(_load(f)), i) for i, f in enumerate(folders)]  # each model as it was trained
    order = [i for _, i in sorted(singles, key=lambda t: -t[0])]
    kept, best = [order[0]], max(singles)[0]
    steps = [{"model": str(folders[order[0]]), "soup_val_accuracy": best, "joined": True}]
    soup = _load(folders[order[0]])
    for i in order[1:]:
        members = [folders[j] for j in [*kept, i]]
        state, how = merge_state(members, MergeConfig(lam=1.0 / len(members)))
        trial = merged_model(members[0], state)
        prepare(trial, how)
        acc = val_accuracy(trial)
        joined = acc > best
        steps.append({"model": str(folders[i]), "soup_val_accuracy": acc, "joined": joined})
        if joined:
            kept, best, soup = [*kept, i], acc, trial
    return soup, sorted(kept), steps


def _load(folder: Path) -> Any:
    from transferkit.models.base import load_model

    return load_model(folder).eval()
