"""Merging saved models: checks, a streaming weight merge, BatchNorm recalibration, soups and ensembles.

``merge_state(folders, cfg, base)`` merges model folders (``models/NAME/`` or a run's ``model/``) that share an
architecture and a starting point: tensor by tensor, reading one tensor of each model at a time from its
safetensors file, so that beyond the running result no more than one model's tensors are in memory. The new head
has no shared start (every run initialises its own), so models of one label set get the mean of their heads; models
of different label sets (different tasks) keep each its own head beside the merged backbone, a multi-task model
(``multi_task_model``). Integer buffers (BatchNorm step counters) are the first model's. BatchNorm statistics that
differ between the models are recomputed on training data afterwards (``recalibrate_batch_norms``), since their mean
is not the statistics of the merged network; statistics every model kept (frozen at the source's) are exact as they
are.
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
from transferkit.models.base import MultiTaskModel, linear_head
from transferkit.specs import parse_spec

NEW_PREFIX = "head."  # tensors every run initialises itself: averaged, no task vector


def method_of(spec: Any) -> tuple[str, Method, Any]:
    """Name, registered method and validated options of a method spec (``"ties"``, ``{name: ties, density: 0.2}``)."""
    return parse_spec(spec, METHODS, lambda m: m.config)


def check_compatible(folders: Sequence[Path], one_label_set: str | None = None) -> list[dict[str, Any]]:
    """The models' ``model.json``; models of other architectures or tensors are a clear error.

    Models of different label sets merge into a multi-task model, so only their backbones must match (tensor by
    tensor); their heads may differ.

    Args:
        one_label_set: the method, when it needs every model to predict the same labels (greedy soup, ensembles):
            different label sets are then an error.
    """
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
        if "tasks" in meta or "tasks" in first:
            raise DataError(
                f"'{folder if 'tasks' in meta else first_folder}' is a multi-task model: merge the models it was "
                "merged from instead"
            )
        if one_label_set and meta.get("labels") != first.get("labels"):
            raise DataError(
                f"'{folder}' predicts {meta.get('labels')}, '{first_folder}' {first.get('labels')}: {one_label_set} "
                "needs the same labels in the same order (it compares or averages the models' predictions); a weight "
                "merge (uniform_soup, task_arithmetic, ties, dare) of different label sets gives a multi-task model"
            )
        if meta.get("adapter") or first.get("adapter"):
            raise DataError(
                f"'{folder if meta.get('adapter') else first_folder}' carries LoRA adapters: fold them into its "
                "weights first (plain_members; the merge stage and transferkit merge do it)"
            )
    merged_heads = same_labels(metas)  # else each model keeps its head: only the backbones must match
    shapes = []
    for f in folders:
        with safe_open(str(f / "model.safetensors"), framework="pt") as sf:
            names = [k for k in sf.keys() if merged_heads or not k.startswith(NEW_PREFIX)]
            shapes.append({k: tuple(sf.get_slice(k).get_shape()) for k in names})
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


def plain_members(folders: Sequence[Path], scratch: Path) -> list[Path]:
    """The members as plain-weight model folders: a model that carries LoRA adapters (trained with ``lora``,
    ``merge: false``) is loaded, its adapters folded into the base weights by peft (``merge_lora``: W + scale * B A,
    the model's outputs unchanged) and saved under ``scratch``; the others are returned as they are. One model is
    in memory at a time, so the streaming merge's memory bound holds."""
    from transferkit.models.adapters import merge_lora
    from transferkit.models.base import SourceModel, load_model, save_model

    out = []
    for i, folder in enumerate(folders):
        meta = read_json(folder / "model.json") if (folder / "model.json").is_file() else {}
        if not meta.get("adapter"):
            out.append(folder)
            continue
        model = load_model(folder)
        assert isinstance(model, SourceModel)  # adapters are injected in single-task models only
        merge_lora(model)
        extra = {k: meta[k] for k in ("strategy", "run") if k in meta}
        out.append(save_model(model, scratch / f"member-{i}", extra={**extra, "folded_from": str(folder)}))
        del model
    return out


def same_labels(metas: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the models (their ``model.json``) predict the same labels in the same order: their heads merge."""
    return all(m.get("labels") == metas[0].get("labels") for m in metas[1:])


def _is_statistic(name: str) -> bool:
    return name.endswith(("running_mean", "running_var"))


def merge_state(
    folders: Sequence[Path], cfg: MergeConfig, base: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The merged tensors of ``folders`` and how each was merged (``how -> tensor names``).

    Models of one label set get the mean of their heads; models of different label sets keep each its own head,
    model ``i``'s ``head.*`` as ``heads.i.*`` (``how["task heads"]``): the tensors of ``multi_task_model``.

    Args:
        folders: model folders of one architecture (``check_compatible``).
        cfg: the generalised merge.
        base: the shared starting weights by name (the source's backbone); a tensor without one is averaged.
    """
    from safetensors import safe_open

    merged_heads = same_labels([read_json(f / "model.json") for f in folders])
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(f / "model.safetensors"), framework="pt")) for f in folders]
        return _merge_open(files, cfg, base, merged_heads)


def _merge_open(
    files: Sequence[Any], cfg: MergeConfig, base: Mapping[str, torch.Tensor] | None, merged_heads: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    names = [n for n in files[0].keys() if merged_heads or not n.startswith(NEW_PREFIX)]
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
    if not merged_heads:  # one head per task, as its model trained it
        how["task heads"] = []
        for i, f in enumerate(files):
            for name in (n for n in f.keys() if n.startswith(NEW_PREFIX)):
                merged[f"heads.{i}.{name.removeprefix(NEW_PREFIX)}"] = f.get_tensor(name)
                how["task heads"].append(f"heads.{i}.{name.removeprefix(NEW_PREFIX)}")
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


def multi_task_model(
    folders: Sequence[Path], tasks: Sequence[str], state: Mapping[str, torch.Tensor]
) -> MultiTaskModel:
    """The merge of models of different label sets (``merge_state``'s ``state``): the first model's backbone and
    preprocessing, and model ``i``'s head and labels as task ``tasks[i]``."""
    from transferkit.models.base import load_model

    first, metas = load_model(folders[0]), [read_json(f / "model.json") for f in folders]
    heads = [linear_head(first.num_features, m["head"]["num_classes"], m["head"].get("dropout", 0.0)) for m in metas]
    labels = [m["labels"] for m in metas]
    model = MultiTaskModel(
        first.backbone, heads, tasks, labels, first.arch, first.preprocess, first.num_features, first.groups
    )
    model.processor = first.processor
    model.load_state_dict(dict(state))
    return model.eval()


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def differing_norms(how: Mapping[str, Sequence[str]]) -> set[str]:
    """The BatchNorm modules whose running statistics differ between the merged models (from ``merge_state``)."""
    return {name.rsplit(".", 1)[0] for name in how.get("statistics that differ", [])}


@torch.no_grad()
def recalibrate_batch_norms(
    model: nn.Module,
    dataset: Dataset | Sequence[Dataset],
    batch_size: int = 32,
    device: Any = "cpu",
    only: set[str] | None = None,
) -> int:
    """Recompute BatchNorm running statistics on ``dataset`` (cumulative averages over one pass, the network
    otherwise in eval mode); returns the number of examples seen (0: nothing to recompute).

    Args:
        dataset: one dataset, or several (each task's training split, for a multi-task merge), passed in turn.
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
        parts: list[Any] = list(dataset) if isinstance(dataset, (list, tuple)) else [dataset]
        for part in parts:
            collate = getattr(part, "collate", None)
            for x, _ in DataLoader(part, batch_size=batch_size, shuffle=False, collate_fn=collate):
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
    check_compatible(folders, one_label_set="greedy_soup")
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
