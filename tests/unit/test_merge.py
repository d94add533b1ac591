"""Merge methods: the identities they must keep, peft's merge_utils as an oracle, and merging saved models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_source
from peft.utils import merge_utils

from transferkit.errors import DataError, RecipeError
from transferkit.merge import METHODS, Ensemble, MergeConfig, check_compatible, merge_state, merge_tensor, method_of
from transferkit.merge.methods import DareConfig, Method, TiesConfig
from transferkit.models.base import save_model
from transferkit.transfer import build_target


def _tensors(n: int = 3, shape: tuple[int, ...] = (6, 5), seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def _cfg(name: str, n: int, **options: object) -> MergeConfig:
    _, method, cfg = method_of({"name": name, **options})
    return method.merge_config(cfg, n)


# ----------------------------------------------------------------------------------------------------------------
# Identities


def test_dare_that_drops_nothing_is_task_arithmetic() -> None:
    base, models = _tensors()
    dare = merge_tensor(base, models, _cfg("dare", 3, p=0.0, lam=0.7))
    arithmetic = merge_tensor(base, models, _cfg("task_arithmetic", 3, lam=0.7))
    assert torch.equal(dare, arithmetic)
    assert torch.allclose(arithmetic, base + 0.7 * sum(m - base for m in models), atol=1e-6)


def test_ties_of_one_model_at_density_one_is_that_model() -> None:
    base, (model,) = _tensors(1)
    assert torch.allclose(merge_tensor(base, [model], _cfg("ties", 1, density=1.0)), model, atol=1e-6)


def test_a_soup_of_identical_models_is_the_model_and_lambda_zero_is_the_base() -> None:
    base, (model,) = _tensors(1)
    assert torch.allclose(merge_tensor(base, [model] * 4, _cfg("uniform_soup", 4)), model, atol=1e-6)
    _, models = _tensors(3)
    assert torch.equal(merge_tensor(base, models, _cfg("task_arithmetic", 3, lam=0.0)), base)


def test_ties_by_hand() -> None:
    """Two task vectors of four entries: trim to the largest half, elect the sign by mass, average those agreeing."""
    base = torch.zeros(4)
    a, b = torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([-0.9, -4.0, 0.2, 1.0])
    # trimmed: a -> [3, 0, 0, 2], b -> [0, -4, 0, 1]; signs of the sums [3, -4, 0, 3] -> [+, -, +, +]
    # agreeing entries: [3], [-4], none, [2, 1] -> means [3, -4, 0, 1.5]; lambda 0.5
    merged = merge_tensor(base, [a, b], _cfg("ties", 2, density=0.5, lam=0.5))
    assert merged.tolist() == [1.5, -2.0, 0.0, 0.75]


# ----------------------------------------------------------------------------------------------------------------
# peft's merge_utils as the oracle (per tensor)


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_per_tensor_ties_equals_peft(density: float) -> None:
    base, models = _tensors(4, (8, 16), seed=1)
    ours = merge_tensor(base, models, _cfg("ties", 4, density=density, lam=0.6))
    weights = torch.full((4,), 0.6)
    theirs = base + merge_utils.ties([m - base for m in models], weights, density=density)
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize(("combine", "oracle"), [("sum", merge_utils.dare_linear), ("ties", merge_utils.dare_ties)])
def test_dare_equals_peft_with_the_same_random_stream(combine: str, oracle) -> None:
    base, models = _tensors(3, (10, 12), seed=2)
    ours = merge_tensor(base, models, _cfg("dare", 3, p=0.7, lam=0.8, combine=combine, seed=5))
    torch.manual_seed(5)
    theirs = base + oracle([m - base for m in models], torch.full((3,), 0.8), density=0.3)
    assert torch.allclose(ours, theirs, atol=1e-6)
    again = merge_tensor(base, models, _cfg("dare", 3, p=0.7, lam=0.8, combine=combine, seed=5))
    assert torch.equal(ours, again)  # seeded: the same merge every time


def test_unknown_methods_and_options_are_named() -> None:
    with pytest.raises(Exception, match="unknown merge method 'tie'. Did you mean 'ties'?"):
        method_of("tie")
    with pytest.raises(RecipeError, match=r"merge method 'task_arithmetic' has no option\(s\) \['density'\]"):
        method_of({"name": "task_arithmetic", "density": 0.2})
    with pytest.raises(RecipeError, match=r"p \(the drop rate\) must be in \[0, 1\)"):
        method_of({"name": "dare", "p": 1.0})
    assert set(METHODS) == {"uniform_soup", "greedy_soup", "task_arithmetic", "ties", "dare", "ensemble"}
    assert isinstance(METHODS.get("ties"), Method) and METHODS.get("ties").config is TiesConfig
    assert DareConfig().p == 0.9


# ----------------------------------------------------------------------------------------------------------------
# Saved models


def _saved(tmp_path: Path, name: str, seed: int, labels: tuple[str, ...] = ("a", "b")) -> tuple[Path, object]:
    torch.manual_seed(seed)
    model = build_target(tiny_source(), list(labels), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return save_model(model, tmp_path / name), model


def test_merge_state_merges_task_vectors_averages_the_head_and_keeps_integer_buffers(tmp_path: Path) -> None:
    source = tiny_source()
    base = {k: v for k, v in source.state_dict().items() if k.startswith("backbone.")}
    (fa, a), (fb, b) = _saved(tmp_path, "a", 1), _saved(tmp_path, "b", 2)
    check_compatible([fa, fb])
    state, how = merge_state([fa, fb], _cfg("task_arithmetic", 2, lam=0.5), base)
    sa, sb = a.state_dict(), b.state_dict()
    w = "backbone.conv_stem.weight"
    assert w in how["task vectors"]
    assert torch.allclose(state[w], base[w] + 0.5 * ((sa[w] - base[w]) + (sb[w] - base[w])), atol=1e-6)
    assert "head.weight" in how["averaged"]
    assert torch.allclose(state["head.weight"], (sa["head.weight"] + sb["head.weight"]) / 2, atol=1e-6)
    counters = [n for n in state if n.endswith("num_batches_tracked")]
    assert counters and set(counters) <= set(how["first model"])
    assert all(n in how["averaged"] for n in state if n.endswith("running_mean"))
    assert how["statistics that differ"] == []  # the statistics were not trained: kept, not recomputed


def test_only_batch_norms_whose_statistics_differ_are_recomputed(tmp_path: Path) -> None:
    from helpers import small_mnist

    from transferkit.merge import differing_norms, merged_model, recalibrate_batch_norms

    fa, a = _saved(tmp_path, "a", 1)
    norm = "backbone.bn1"
    with torch.no_grad():
        a.get_submodule(norm).running_mean.add_(0.5)  # model b: model a with this norm's statistics trained
    fb = save_model(a, tmp_path / "b")
    state, how = merge_state([fa, fb], _cfg("uniform_soup", 2))
    assert how["statistics that differ"] == [f"{norm}.running_mean"] and differing_norms(how) == {norm}
    model = merged_model(fa, state)
    kept = {n: b.clone() for n, b in model.named_buffers() if n.endswith("running_mean")}
    data = small_mnist()
    assert recalibrate_batch_norms(model, data.dataset("train"), only=differing_norms(how)) == 40
    after = dict(model.named_buffers())
    assert not torch.equal(after[f"{norm}.running_mean"], kept[f"{norm}.running_mean"])
    assert all(torch.equal(after[n], v) for n, v in kept.items() if n != f"{norm}.running_mean")
    assert recalibrate_batch_norms(model, data.dataset("train"), only=set()) == 0


def test_models_that_cannot_merge_are_refused_naming_the_difference(tmp_path: Path) -> None:
    fa, _ = _saved(tmp_path, "a", 1)
    fc, _ = _saved(tmp_path, "c", 3, labels=("a", "b", "c"))
    with pytest.raises(
        DataError, match=r"predicts \['a', 'b', 'c'\].*ensemble needs the same labels in the same order"
    ):
        check_compatible([fa, fc], one_label_set="ensemble")
    assert len(check_compatible([fa, fc])) == 2  # a weight merge of two label sets: a multi-task model
    with pytest.raises(DataError, match="a merge needs at least two models, got 1"):
        check_compatible([fa])


def test_an_ensemble_averages_probabilities_or_counts_votes() -> None:
    class Fixed(torch.nn.Module):
        def __init__(self, logits: list[float]):
            super().__init__()
            self.logits = torch.tensor([logits])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits.expand(len(x), -1)

    members = [Fixed([2.0, 0.0, 0.0]), Fixed([0.0, 1.0, 0.0]), Fixed([0.0, 1.5, 0.0])]
    x = torch.zeros(2, 1)
    mean = torch.exp(Ensemble(members, "mean")(x))[0]
    expected = torch.stack([torch.softmax(m(x)[0], 0) for m in members]).mean(0)
    assert torch.allclose(mean, expected, atol=1e-6)
    assert Ensemble(members, "majority")(x).argmax(dim=1).tolist() == [1, 1]  # two votes for class 1


def test_ls_lists_the_merge_methods(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from transferkit.cli import main

    assert main(["ls", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["merge"]) == set(METHODS)
