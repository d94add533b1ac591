"""Issue 16: LoRA runs merged at the adapter level (``lora: adapters``, peft's ``add_weighted_adapter``): the result
is a LoRA model; task arithmetic by ``cat`` equals today's fold-then-merge; what cannot merge is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_source
from peft.tuners.lora import LoraLayer
from test_stages import TINY

from transferkit.errors import DataError
from transferkit.io import load_state_dict, read_json, save_tensors
from transferkit.merge import merge_state, merged_model, method_of
from transferkit.merge.adapters import check_adapters, combination_for, merge_adapters
from transferkit.merge.api import plain_members
from transferkit.models.adapters import inject_lora, merge_lora
from transferkit.models.base import SourceModel, load_model, save_model
from transferkit.recipe import load_recipe, validate_recipe
from transferkit.runner import run_recipe
from transferkit.transfer import build_target

TARGETS = r".*\.(conv_pw|conv_pwl)$"


def _lora_member(folder: Path, seed: int, r: int = 2, alpha: float = 4.0) -> Path:
    """A LoRA run's saved model: the source's base weights, adapters and head moved off their start (B starts at 0,
    so an untouched adapter would merge trivially)."""
    model = build_target(tiny_source(), ["a", "b"], seed=0)
    inject_lora(model, {"r": r, "alpha": alpha, "dropout": 0.0, "target_modules": TARGETS})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or name.startswith("head."):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return save_model(model, folder)


def _cfg(spec: Any, n: int = 2) -> Any:
    _, method, options = method_of(spec)
    return method.merge_config(options, n)


def _base() -> dict[str, torch.Tensor]:
    """The members' start, as the merge stage takes it: the target before training, without its head."""
    target = build_target(tiny_source(), ["a", "b"], seed=0)
    return {k: v for k, v in target.state_dict().items() if not k.startswith("head.")}


def _fold_then_merge(folders: list[Path], spec: Any, scratch: Path) -> Any:
    plain = plain_members(folders, scratch)
    state, _ = merge_state(plain, _cfg(spec, len(plain)), _base())
    return merged_model(plain[0], state)


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", [{"name": "task_arithmetic", "lam": 0.7}, "uniform_soup"])
def test_cat_merge_of_adapters_equals_fold_then_merge(tmp_path: Path, spec: Any) -> None:
    folders = [_lora_member(tmp_path / f"m{i}", seed=i) for i in range(2)]
    model, how = merge_adapters(folders, _cfg(spec), "cat")
    folded = _fold_then_merge(folders, spec, tmp_path / "scratch")
    with torch.no_grad():
        ours, theirs = model(X), folded(X)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert not torch.allclose(ours, load_model(folders[0])(X), atol=1e-3)  # the merge moved away from member 0
    # still a LoRA model: the adapters are there, their rank the members' summed, their scale 1
    layers = [m for m in model.backbone.modules() if isinstance(m, LoraLayer)]
    assert layers and all(list(m.lora_A) == ["default"] for m in layers)
    assert all(m.lora_A["default"].weight.shape[0] == 4 and m.scaling["default"] == 1.0 for m in layers)
    assert model.adapter == {"type": "lora", "r": 4, "alpha": 4.0, "dropout": 0.0, "target_modules": TARGETS}
    assert how["combination"] == "cat" and how["exact"] is True and how["adapter_error"] < 1e-6
    assert len(how["adapters"]) == 2 * len(layers) and "head.weight" in how["averaged"]


def test_the_merged_lora_model_reloads_and_folds_later(tmp_path: Path) -> None:
    folders = [_lora_member(tmp_path / f"m{i}", seed=i) for i in range(2)]
    model, _ = merge_adapters(folders, _cfg("task_arithmetic"), "cat")
    folder = save_model(model, tmp_path / "merged")
    assert read_json(folder / "model.json")["adapter"]["r"] == 4
    again = load_model(folder)
    assert isinstance(again, SourceModel)
    with torch.no_grad():
        before = model(X)
        assert torch.equal(again(X), before)
        merge_lora(again)  # a later fold (lora: fold of this model, merge: true) keeps the outputs
        assert again.adapter is None and not any(isinstance(m, LoraLayer) for m in again.modules())
        assert torch.allclose(again(X), before, atol=1e-5)
    # three members, one of them the merged model itself: adapters of rank 2, 2 and 4 stack to rank 8
    third = _lora_member(tmp_path / "m2", seed=2, r=4, alpha=8.0)
    with pytest.raises(DataError, match=r"has LoRA rank 4, '.*m0' 2: lora: adapters needs one rank"):
        check_adapters([*folders, third])


def test_ties_by_svd_reports_its_error_against_fold_then_ties(tmp_path: Path) -> None:
    """TIES on the full deltas, then a truncated SVD: approximate, and the report says by how much, measured
    against the fold path's TIES on each adapted layer."""
    folders = [_lora_member(tmp_path / f"m{i}", seed=i) for i in range(2)]
    spec = {"name": "ties", "density": 0.3}
    model, how = merge_adapters(folders, _cfg(spec), "ties_svd")
    assert how["combination"] == "ties_svd" and how["exact"] is False
    folded = _fold_then_merge(folders, spec, tmp_path / "scratch").state_dict()
    base, worst = _base(), 0.0
    merge_lora(model)
    mine = model.state_dict()
    for name in (n.removesuffix(".lora_A.default.weight") for n in how["adapters"] if ".lora_A." in n):
        exact = folded[f"{name}.weight"] - base[f"{name}.weight"]
        got = mine[f"{name}.weight"] - base[f"{name}.weight"]
        worst = max(worst, float((got - exact).norm() / exact.norm()))
    assert 1e-3 < how["adapter_error"] < 1.0
    assert how["adapter_error"] == pytest.approx(worst, rel=1e-3, abs=1e-5)
    _, dare = merge_adapters(folders, _cfg({"name": "dare", "p": 0.5}), "dare_linear_svd")
    assert dare["adapter_error"] is None  # peft's own random draw: no fold-path counterpart to measure against


def test_methods_map_onto_peft_combinations_or_are_refused() -> None:
    def combination(spec: Any, given: str | None = None) -> str:
        name, method, options = method_of(spec)
        return combination_for(name, method, options, given)

    assert combination("task_arithmetic") == "cat" and combination("uniform_soup", "svd") == "svd"
    assert combination("ties") == "ties_svd" and combination("ties", "ties") == "ties"
    assert combination({"name": "dare", "combine": "ties"}) == "dare_ties_svd"
    assert combination("dare", "dare_linear") == "dare_linear"
    with pytest.raises(DataError, match=r"'dare_ties' does not compute ties; .*ties_svd, ties \(default ties_svd\)"):
        combination("ties", "dare_ties")
    with pytest.raises(DataError, match="ensemble compares the models' outputs: use lora: fold"):
        combination("ensemble")
    with pytest.raises(DataError, match="peft's ties trims each tensor on its own; use scope: tensor"):
        combination({"name": "ties", "scope": "global"})


def test_members_that_are_not_lora_models_of_one_base_are_refused(tmp_path: Path) -> None:
    lora = _lora_member(tmp_path / "lora", seed=0)
    plain = save_model(build_target(tiny_source(), ["a", "b"], seed=0), tmp_path / "plain")
    with pytest.raises(DataError, match=r"'.*plain' is a model without adapters .*: use lora: fold"):
        check_adapters([lora, plain])
    other = build_target(tiny_source(seed=1), ["a", "b"], seed=0)  # another base
    inject_lora(other, {"r": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": TARGETS})
    with pytest.raises(DataError, match=r"tensor 'backbone\.\S+' differs between '.*lora' and '.*other'"):
        merge_adapters([lora, save_model(other, tmp_path / "other")], _cfg("task_arithmetic"), "cat")
    cut = _lora_member(tmp_path / "cut", seed=1)  # a file that lost one adapter tensor
    state = load_state_dict(cut / "model.safetensors")
    lost = next(k for k in state if ".lora_B." in k)
    save_tensors(cut / "model.safetensors", {k: v for k, v in state.items() if k != lost})
    with pytest.raises(
        DataError, match=rf"cut/model.safetensors' does not hold .*missing \['{lost.replace('default', 'member1')}'\]"
    ):
        merge_adapters([lora, cut], _cfg("task_arithmetic"), "cat")
    three = build_target(tiny_source(), ["a", "b", "c"], seed=0)
    inject_lora(three, {"r": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": TARGETS})
    with pytest.raises(DataError, match="different label sets merge into a multi-task model, which carries no adapt"):
        check_adapters([lora, save_model(three, tmp_path / "three")])


# ----------------------------------------------------------------------------------------------------------------
# In a recipe


LORA = {"name": "lora", "r": 4, "merge": False}
RECIPE = {
    **TINY,
    "train": {**TINY["train"], "strategy": LORA, "lr": 0.05},
    "compare": [{"strategy": LORA, "label": "lora-b", "overrides": {"lr": 0.1, "seed": 1}}],
    "merge": [
        {"method": "task_arithmetic", "lora": "adapters", "label": "adapters"},
        {"method": "task_arithmetic", "label": "folded"},
        {"method": "task_arithmetic", "lora": "adapters", "label": "refit", "refit_heads": True},
    ],
}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_recipe(load_recipe(RECIPE), out=tmp_path_factory.mktemp("lora-merge") / "run")


def test_a_recipe_merges_lora_runs_at_the_adapter_level(lora_run: Path) -> None:
    metrics = read_json(lora_run / "metrics.json")
    merged = metrics["models"]["adapters"]["merge"]
    members = [str(lora_run / "models" / n) for n in ("lora", "lora-b")]
    assert merged["lora"] == "adapters" and merged["adapters_merged"] == members and merged["adapters_folded"] == []
    assert merged["adapter_merge"]["combination"] == "cat" and merged["adapter_merge"]["exact"] is True
    assert merged["adapter_merge"]["adapter"]["r"] == 8 and merged["refit_heads"] is None
    folded = metrics["models"]["folded"]["merge"]
    assert folded["lora"] == "fold" and folded["adapters_folded"] == members and folded["adapters_merged"] == []
    # the adapter-level merge is a LoRA model, with the outputs of the fold-then-merge one
    adapters, plain = load_model(lora_run / "models" / "adapters"), load_model(lora_run / "models" / "folded")
    assert read_json(lora_run / "models" / "adapters" / "model.json")["adapter"]["type"] == "lora"
    assert any(isinstance(m, LoraLayer) for m in adapters.modules())
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(adapters(X), plain(X), atol=1e-5)
    assert metrics["models"]["adapters"]["test"]["accuracy"] == metrics["models"]["folded"]["test"]["accuracy"]
    note = next(t["note"] for t in metrics["tables"] if t["title"] == "Merge adapters")
    assert "LoRA adapters merged by peft (cat, exact), the result a LoRA model" in note


def test_a_head_refit_changes_only_the_head(lora_run: Path) -> None:
    metrics = read_json(lora_run / "metrics.json")
    (refit,) = metrics["models"]["refit"]["merge"]["refit_heads"]
    assert refit["task"] is None and refit["train_accuracy_after"] >= refit["train_accuracy_before"]
    a = load_model(lora_run / "models" / "adapters").state_dict()
    b = load_model(lora_run / "models" / "refit").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("head."))
    assert not torch.equal(a["head.weight"], b["head.weight"])
    note = next(t["note"] for t in metrics["tables"] if t["title"] == "Merge refit")
    assert note.endswith("; heads refitted by a linear probe on the merged features")


def _problems(merge: dict[str, Any], **recipe: Any) -> list[str]:
    _, problems = validate_recipe({**RECIPE, **recipe, "merge": [merge]})
    return problems


def test_validate_refuses_adapter_merges_it_cannot_make(tmp_path: Path) -> None:
    assert _problems({"method": "ties", "lora": "adapters"}) == []
    plain = {"compare": [{"strategy": "full", "label": "plain"}]}
    assert _problems({"method": "ties", "lora": "adapters"}, **plain) == [
        "merge.0.lora: adapters merges LoRA adapters, but model 'plain' keeps none (not trained with lora, merge: "
        "false): use lora: fold (its weights merged as they are, LoRA members folded first), or leave it out of the "
        "merge"
    ]
    assert _problems({"method": "ties", "lora": "adapters", "models": ["lora", "lora-b"]}, **plain) == []
    ranks = {"compare": [{"strategy": {**LORA, "r": 8}, "label": "wide"}]}
    (problem,) = _problems({"method": "task_arithmetic", "lora": "adapters"}, **ranks)
    assert problem == (
        "merge.0.lora: model 'wide' has LoRA rank 8, model 'lora' 4: adapters merges adapters of one rank; use lora: "
        "fold"
    )
    (problem,) = _problems({"method": "ensemble", "lora": "adapters", "refit_heads": True})[:1]
    assert problem.startswith("merge.0.refit_heads: refit_heads refits a merged model's heads; an ensemble keeps")
    assert (
        "merge.0.lora: lora: adapters merges the adapters' weights; ensemble compares the models' outputs"
        in (_problems({"method": "ensemble", "lora": "adapters"})[0])
    )
    # another run: its saved model.json is read, and its source compared with this run's
    other = tmp_path / "other"
    save_model(build_target(tiny_source(), ["0", "1"], seed=0), other / "model")
    (other / "metrics.json").write_text('{"source": "timm:test_resnet"}')
    problems = _problems({"method": "task_arithmetic", "lora": "adapters", "runs": [str(other)]})
    source = "started from 'timm:test_resnet', this run from 'timm:test_efficientnet': merge runs of one source"
    assert any(f"run '{other}' {source}" in p for p in problems)
    assert any(f"but run '{other}' keeps none" in p for p in problems)
    # the LoRA options alone, without lora: adapters, say what they need
    assert any("lora_rank apply to lora: adapters" in p for p in _problems({"method": "ties", "lora_rank": 4}))
