"""Merging LoRA models at the adapter level, through peft's ``add_weighted_adapter``: the result is a LoRA model.

Members trained with ``lora`` (``merge: false``) differ only in their adapters and heads: their base weights are
the source's, frozen. Instead of folding each member's adapters into plain weights and merging those
(``plain_members``, the default ``lora: fold``), ``merge_adapters`` loads every member's adapters into one peft
``LoraModel`` and lets peft combine them into one new adapter, saved as the merged model's only adapter. The merged
model is still a LoRA model: it reloads from its folder (``load_model`` rebuilds the adapters from ``model.json``)
and can be folded later like any LoRA run.

How our methods map onto peft's combination types (``COMBINATIONS``), with ``d_i = s_i B_i A_i`` member ``i``'s
delta on a layer (``s_i = alpha / r``):

- ``uniform_soup``, ``task_arithmetic`` -> ``cat`` (default): the factors are stacked, ``B = [B_1 .. B_n]``,
  ``A = [w_1 s_1 A_1; ..; w_n s_n A_n]``, so ``B A = sum_i w_i d_i`` **exactly**, the fold-then-merge result; the
  adapter's rank is the members' ranks summed. ``svd`` (the same sum, then a truncated SVD) is exact when
  ``lora_rank`` is at least the sum's rank; ``linear`` (weighted sums of the A's and of the B's) is approximate: the
  product has cross terms ``B_i A_j``.
- ``ties`` -> ``ties_svd`` (default): TIES on the full deltas ``d_i`` (per tensor, as ``merge_tensor`` does; the
  sign election ``total`` or ``frequency``), then a truncated SVD to ``lora_rank``: **approximate** (a trimmed sum
  is of full rank in general), exact only at full rank. ``ties`` trims the factors A and B separately:
  approximate. ``scope: global`` has no peft counterpart and is refused.
- ``dare`` -> ``dare_linear_svd`` (``combine: sum``) or ``dare_ties_svd`` (``combine: ties``): DARE on the full
  deltas, then a truncated SVD: approximate, and peft draws its own random mask (seeded with the method's ``seed``),
  so it is not the fold path's draw. ``dare_linear`` / ``dare_ties`` work on the factors: approximate.

The report (``how["adapter_error"]``) measures it: the largest relative Frobenius error, over the adapted layers,
of the merged adapter's delta against our own method applied to the members' deltas (``merge_tensor``); none for
DARE, whose draws differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from transferkit.errors import DataError
from transferkit.io import load_state_dict, read_json
from transferkit.merge.methods import DareConfig, MergeConfig, Method, TiesConfig, merge_tensor

# per kind of method: the peft combination types that compute it, the default (the exact or closest one) first
COMBINATIONS = {
    "sum": ("cat", "svd", "linear"),
    "ties": ("ties_svd", "ties"),
    "dare_sum": ("dare_linear_svd", "dare_linear"),
    "dare_ties": ("dare_ties_svd", "dare_ties"),
}
EXACT = {"cat"}  # exact on the deltas whatever the rank; svd is exact at full rank only
_ADAPTER_KEY = ".lora_"


def _kind(options: object) -> str:
    if isinstance(options, TiesConfig):
        return "ties"
    if isinstance(options, DareConfig):
        return "dare_sum" if options.combine == "sum" else "dare_ties"
    return "sum"


def combination_for(name: str, method: Method, options: object, combination: str | None) -> str:
    """The peft ``combination_type`` that merges the adapters by method ``name`` (``combination``, or the default
    for the method); a weight merge only, and a combination that computes the method.

    Raises:
        DataError: a greedy soup or an ensemble (they compare models' outputs, not adapters), TIES with ``scope:
            global`` (peft trims per tensor), or a combination of another method.
    """
    if method.kind != "weights":
        raise DataError(
            f"lora: adapters merges the adapters' weights; {name} compares the models' outputs: use lora: fold "
            "(the adapters folded into plain weights first)"
        )
    if isinstance(options, TiesConfig) and options.scope == "global":
        raise DataError(
            "lora: adapters with ties scope: global: peft's ties trims each tensor on its own; use scope: tensor, "
            "or lora: fold"
        )
    allowed = COMBINATIONS[_kind(options)]
    if combination is None:
        return allowed[0]
    if combination not in allowed:
        raise DataError(
            f"lora_combination {combination!r} does not compute {name}; for {name} choose one of "
            f"{', '.join(allowed)} (default {allowed[0]})"
        )
    return combination


def check_adapters(folders: Sequence[Path]) -> list[dict[str, Any]]:
    """The members' ``model.json``, each a LoRA model of the same rank and target modules, of one label set.

    The base weights (every tensor outside the adapters and the head) must be equal too: ``merge_adapters``
    checks them as it reads them.

    Raises:
        DataError: naming the member that is not a LoRA model, or the setting that differs, and the fix.
    """
    metas = [read_json(f / "model.json") if (f / "model.json").is_file() else {} for f in folders]
    for folder, meta in zip(folders, metas):
        adapter = meta.get("adapter") or {}
        if adapter.get("type") != "lora":
            why = "a multi-task model" if "tasks" in meta else "a model without adapters"
            raise DataError(
                f"lora: adapters merges LoRA adapters, but '{folder}' is {why} (no LoRA adapters in its model.json): "
                "use lora: fold, or merge LoRA runs only (strategy lora, merge: false)"
            )
    first, first_folder = metas[0]["adapter"], folders[0]
    for folder, meta in zip(folders[1:], metas[1:]):
        if meta["arch"] != metas[0]["arch"]:
            raise DataError(
                f"'{folder}' is a {meta['arch'].get('name')}, '{first_folder}' a {metas[0]['arch'].get('name')}: "
                "merged models must share the architecture"
            )
        for key, what in (("r", "rank"), ("target_modules", "target modules")):
            if meta["adapter"].get(key) != first.get(key):
                raise DataError(
                    f"'{folder}' has LoRA {what} {meta['adapter'].get(key)!r}, '{first_folder}' {first.get(key)!r}: "
                    f"lora: adapters needs one {what} for every member; use lora: fold"
                )
        if meta.get("labels") != metas[0].get("labels"):
            raise DataError(
                f"'{folder}' predicts {meta.get('labels')}, '{first_folder}' {metas[0].get('labels')}: models of "
                "different label sets merge into a multi-task model, which carries no adapters; use lora: fold"
            )
    return metas


def _lora_config(spec: Mapping[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"], target_modules=spec["target_modules"]
    )


def _forget_adapters(backbone: torch.nn.Module) -> None:
    """Drop the adapter configs peft keeps on a module it injected (``peft_config``), so that the next ``LoraModel``
    on it starts with only the adapters it is given."""
    if "peft_config" in vars(backbone):
        del backbone.peft_config


def _plain_state(folders: Sequence[Path]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Every tensor outside the adapters: the heads averaged (``head.*``), the rest the first member's, checked to be
    equal in every member (one base). One tensor of each member in memory at a time."""
    import contextlib

    from safetensors import safe_open

    from transferkit.merge.api import NEW_PREFIX

    mean = MergeConfig(lam=1.0 / len(folders))
    merged: dict[str, torch.Tensor] = {}
    how: dict[str, list[str]] = {"base (shared)": [], "averaged": []}
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(f / "model.safetensors"), framework="pt")) for f in folders]
        for name in (n for n in files[0].keys() if _ADAPTER_KEY not in n):
            tensors = [f.get_tensor(name) for f in files]
            if name.startswith(NEW_PREFIX):
                merged[name] = merge_tensor(torch.zeros_like(tensors[0]), tensors, mean)
                how["averaged"].append(name)
                continue
            for folder, t in zip(folders[1:], tensors[1:]):
                if not torch.equal(t, tensors[0]):
                    raise DataError(
                        f"tensor '{name}' differs between '{folders[0]}' and '{folder}': lora: adapters needs members "
                        "that share their base weights (LoRA runs of one source, base frozen); use lora: fold"
                    )
            merged[name] = tensors[0]
            how["base (shared)"].append(name)
    return merged, how


def merge_adapters(
    folders: Sequence[Path],
    cfg: MergeConfig,
    combination: str,
    rank: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The LoRA model that merges the members' adapters by peft's ``combination`` (see the module docstring), and
    how it was made.

    Args:
        folders: LoRA model folders that pass ``check_adapters``.
        cfg: the method as a generalised merge: its ``lambda`` are peft's weights, its ``density``, ``sign`` and
            ``seed`` peft's density, majority sign method and random seed.
        combination: peft's ``combination_type`` (``combination_for``).
        rank: the rank of an SVD combination's adapter (default: the members' ranks summed, what ``cat`` keeps).

    Returns:
        The merged model (eval mode; its adapter described in ``model.adapter``, so ``save_model`` records it) and
        ``how``: the tensors by how they were merged, the combination, the new adapter and ``adapter_error``.
    """
    from peft.tuners.lora import LoraLayer, LoraModel

    from transferkit.models.adapters import inject_lora
    from transferkit.models.base import SourceModel, load_model

    metas = check_adapters(folders)
    specs = [{k: v for k, v in m["adapter"].items() if k != "type"} for m in metas]
    names = [f"member{i}" for i in range(len(folders))]
    state, how = _plain_state(folders)
    work = load_model(folders[0])
    assert isinstance(work, SourceModel)  # check_adapters: single-task LoRA models
    _forget_adapters(work.backbone)  # the adapter load_model injected stays out of the merge (and is unloaded below)
    tuner = LoraModel(work.backbone, _lora_config(specs[0]), names[0])
    for name, spec in zip(names[1:], specs[1:]):
        tuner.peft_config[name] = _lora_config(spec)
        tuner.inject_adapter(tuner.model, name)
    for name, folder in zip(names, folders):
        adapters = {
            k.replace(".default.", f".{name}."): v
            for k, v in load_state_dict(folder / "model.safetensors").items()
            if _ADAPTER_KEY in k
        }
        missing, unexpected = work.load_state_dict(adapters, strict=False)
        missing = [k for k in missing if f".{name}." in k]  # this member's slots that its file left empty
        if unexpected or missing:
            raise DataError(
                f"'{folder}/model.safetensors' does not hold the adapters its model.json describes (unexpected "
                f"{unexpected[:3]}, missing {missing[:3]}): save the model again"
            )
    weights = [float(w) for w in cfg.weights(len(folders))]
    svd_rank = rank or sum(int(s["r"]) for s in specs)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # peft draws DARE's masks from torch's global generator
        tuner.add_weighted_adapter(
            names,
            weights,
            "merged",
            combination_type=cast(Any, combination),  # one of COMBINATIONS (combination_for)
            svd_rank=svd_rank if combination.endswith("svd") else None,
            density=cfg.density,
            majority_sign_method=cfg.sign,
        )
    layers = {n: m for n, m in work.backbone.named_modules() if isinstance(m, LoraLayer)}
    error = None if cfg.trim == "random" else _adapter_error(layers, names, cfg)
    adapter_state = {}
    for layer_name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            tensor = getattr(layer, part)["merged"].weight.detach().clone()
            adapter_state[f"backbone.{layer_name}.{part}.default.weight"] = tensor
    new_rank = int(next(iter(adapter_state.values())).shape[0])  # lora_A's rows: peft's rank of the new adapter
    work.backbone = tuner.unload()  # the base layers back, every adapter gone
    _forget_adapters(work.backbone)
    spec = {**specs[0], "r": new_rank, "alpha": float(new_rank)}  # scaling 1: peft folds the scales into A and B
    inject_lora(work, spec)
    work.load_state_dict({**state, **adapter_state})
    described: dict[str, Any] = {
        **how,
        "adapters": sorted(adapter_state),
        "combination": combination,
        "exact": combination in EXACT,
        "adapter": {"type": "lora", **spec},
        "adapter_error": error,
    }
    return work.eval(), described


def _adapter_error(layers: Mapping[str, Any], names: Sequence[str], cfg: MergeConfig) -> float:
    """The largest relative Frobenius error, over the layers, of the merged adapter's delta against ``merge_tensor``
    applied to the members' deltas (what the fold path computes on that layer)."""
    worst = 0.0
    with torch.no_grad():
        for layer in layers.values():
            deltas = [layer.get_delta_weight(n).float() for n in names]
            exact = merge_tensor(torch.zeros_like(deltas[0]), deltas, cfg)
            got = layer.get_delta_weight("merged").float()
            worst = max(worst, float((got - exact).norm() / exact.norm().clamp(min=1e-12)))
    return worst
