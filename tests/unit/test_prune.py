"""Structured pruning (``transferkit.compress.prune``) and the shape record that reloads a pruned model
(``transferkit.models.pruned``): torch-pruning's own ResNet-18 figures, EfficientNet-Lite0 and MiniLM pruned, saved
and reloaded from their folders alone, and every refusal with its message."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import tiny_text_folder
from torch import nn

from transferkit.compress.prune import prune
from transferkit.errors import CompressError, SourceError
from transferkit.evaluation.cost import count_macs, count_params
from transferkit.models.base import MultiTaskModel, SourceModel, load_model, save_model
from transferkit.models.pruned import apply_shapes, model_sizes, shape_record
from transferkit.sources import load_source
from transferkit.transfer import build_target

LABELS = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def lite0() -> SourceModel:
    """EfficientNet-Lite0 with its real ImageNet weights (copied by each test that changes it)."""
    return load_source("efficientnet_lite0")


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory):
    return tiny_text_folder(tmp_path_factory.mktemp("tiny_bert"))


def _target(source: SourceModel) -> SourceModel:
    return build_target(source, LABELS).eval()


def _image(size: int = 64, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _text_model(folder) -> tuple[SourceModel, dict[str, torch.Tensor]]:
    model = load_source(f"hf:{folder}")
    model.reset_head(3, ["neg", "neu", "pos"])
    batch = model.processor(["a wonderful, moving film", "dull"], padding=True, return_tensors="pt")
    return model.eval(), dict(batch)


def _kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which rows (output channels) of ``original`` survive in ``pruned`` (a layer whose inputs were not pruned)."""
    return [next(i for i in range(len(original)) if torch.equal(original[i], row)) for row in pruned]


def _reload_matches(model: SourceModel, record: dict, example, tmp_path) -> SourceModel:
    """Save with the record, reload from the folder alone: same logits, parameters and MACs."""
    save_model(model, tmp_path / "pruned", extra={"pruned": record})
    saved = json.loads((tmp_path / "pruned" / "model.json").read_text())
    assert saved["pruned"]["shapes"] == record["shapes"]
    assert saved["num_features"] == model.num_features
    reloaded = load_model(tmp_path / "pruned")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(example), model(example), atol=1e-6, rtol=0)
    assert count_params(reloaded) == count_params(model) == record["params_after"]
    assert count_macs(reloaded, example) == count_macs(model, example) == record["macs_after"]
    return reloaded


# ---------------------------------------------------------------------------------------------------- ResNet-18


def test_resnet18_reproduces_torch_prunings_reference_figures() -> None:
    """torch-pruning's README: ResNet-18 at ratio 0.5, round_to 8, fc kept -> 1.822 G -> 0.487 G MACs, 11.69 M ->
    3.056 M parameters (its own counter). transferkit's count_macs (FLOPs / 2 of convolutions and matrix products,
    no elementwise work) gives 1.814 G -> 0.483 G on the same models. prune() on a SourceModel wrapping the same
    network (same seed: same weights) gives the same network."""
    import torch_pruning as tp
    import torchvision

    x = _image(224)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    assert tp.utils.count_ops_and_params(reference, x) == (1822177768, 11689512)
    assert count_macs(reference, x) == 1814073344
    pruner = tp.pruner.BasePruner(
        reference,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        round_to=8,
        ignored_layers=[reference.fc],
        in_channel_groups={},
        out_channel_groups={},
    )
    pruner.step()
    assert tp.utils.count_ops_and_params(reference, x) == (487202536, 3055880)
    assert count_macs(reference, x) == 483149824

    torch.manual_seed(0)
    model = load_source({"name": "torchvision:resnet18", "pretrained": False})  # backbone + fc as the head
    result = prune(model, x, ratio=0.5, round_to=8)
    assert result.model is model
    record = result.record
    assert (record["macs_before"], record["macs_after"]) == (1814073344, 483149824)
    assert (record["params_before"], record["params_after"]) == (11689512, 3055880)
    assert model.head.out_features == 1000 and model.head.in_features == model.num_features == 256
    ours = [m.out_channels for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    theirs = [m.out_channels for m in reference.modules() if isinstance(m, nn.Conv2d)]
    assert ours == theirs and ours[:2] == [32, 32] and ours[-1] == 256
    torch.testing.assert_close(model.head.weight, reference.fc.weight, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------- images


def test_lite0_at_half_ratio_is_4x_cheaper_keeps_its_head_and_reloads(lite0, tmp_path) -> None:
    model = _target(lite0)
    x = _image(64)
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    record = prune(model, x, ratio=0.5, round_to=8).record
    assert (record["macs_before"], record["macs_after"]) == (31345792, 8383040)
    assert (record["params_before"], record["params_after"]) == (3377413, 899365)
    assert record["macs_after"] * 2 <= record["macs_before"]
    assert record["ratio"] == 0.5 and record["round_to"] == 8 and record["importance"] == "magnitude"
    assert model.head.out_features == len(LABELS)
    assert model.head.in_features == model.num_features == 640  # conv_head: 1280 -> 640
    after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(c % 8 == 0 for c in after.values())
    assert after["backbone.conv_stem"] == 16 and before["backbone.conv_stem"] == 32
    assert all(after[n] <= before[n] / 2 for n in before)
    json.dumps(record)  # JSON-able as it is
    # only what differs from a freshly built Lite0 is recorded, plus the head
    assert record["shapes"]["modules"]["head"] == {"in_features": 640, "out_features": 5}
    assert record["shapes"]["tensors"]["backbone.conv_stem.weight"] == [16, 3, 3, 3]
    assert "backbone.bn1.num_batches_tracked" not in record["shapes"]["tensors"]
    reloaded = _reload_matches(model, record, x, tmp_path)
    assert reloaded.backbone.conv_stem.out_channels == 16


def test_target_macs_prunes_in_small_steps_until_reached(lite0) -> None:
    model = _target(lite0)
    x = _image(32)
    target = 3e6  # a float, as recipes give it
    record = prune(model, x, target_macs=target, round_to=8).record
    assert record["macs_before"] == 7841248
    assert record["macs_after"] <= target
    assert (record["steps"], record["macs_after"]) == (18, 2986744)
    previous = _target(lite0)  # the sizes of step 17 (ratio 0.34): still above the target
    assert count_macs(prune(previous, x, ratio=0.34, round_to=8).model, x) > target
    assert record["target_macs"] == target and record["ratio"] is None


def test_taylor_importance_keeps_other_channels_than_magnitude(lite0) -> None:
    x = _image(32)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)) for _ in range(2)]
    original = _target(lite0).backbone.conv_stem.weight.detach().clone()
    by_magnitude, by_taylor = _target(lite0), _target(lite0)
    prune(by_magnitude, x, ratio=0.5)
    record = prune(by_taylor, x, ratio=0.5, importance="taylor", taylor_batches=batches).record
    assert record["importance"] == "taylor"
    magnitude_rows = _kept_rows(original, by_magnitude.backbone.conv_stem.weight)
    taylor_rows = _kept_rows(original, by_taylor.backbone.conv_stem.weight)
    assert len(magnitude_rows) == len(taylor_rows) == 16
    assert set(magnitude_rows) != set(taylor_rows)
    # magnitude ranks by the L2 norm of the whole group (conv_stem, its BatchNorm, the depthwise conv after):
    # the stem's row of largest norm survives
    norms = original.flatten(1).norm(dim=1)
    assert int(norms.argmax()) in magnitude_rows
    assert not any(p.grad is not None for p in by_taylor.parameters())  # no gradients left behind
    # loss_fn replaces cross-entropy: called once per batch before the (single) step
    calls = []

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(len(targets))
        return torch.nn.functional.cross_entropy(logits, targets)

    prune(_target(lite0), x, ratio=0.5, importance="taylor", taylor_batches=batches, loss_fn=loss)
    assert calls == [4, 4]


def test_keep_leaves_the_matching_layers_channels_unchanged(lite0) -> None:
    model = _target(lite0)
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    record = prune(model, _image(32), ratio=0.5, keep=[r"^backbone\.blocks\.1\."]).record
    after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    block1 = [n for n in before if n.startswith("backbone.blocks.1.")]
    assert len(block1) == 6  # two inverted residuals: conv_pw, conv_dw, conv_pwl each
    assert {n: after[n] for n in block1} == {n: before[n] for n in block1}
    assert after["backbone.blocks.2.0.conv_pw"] == before["backbone.blocks.2.0.conv_pw"] // 2
    assert "backbone.blocks.1.0.conv_pw" in record["kept"] and record["keep"] == [r"^backbone\.blocks\.1\."]


def test_iterative_steps_reach_the_same_sizes_as_one_step(lite0) -> None:
    one, three = _target(lite0), _target(lite0)
    x = _image(32)
    prune(one, x, ratio=0.5)
    record = prune(three, x, ratio=0.5, iterative_steps=3).record
    assert record["steps"] == 3
    assert model_sizes(one)["tensors"] == model_sizes(three)["tensors"]


# ---------------------------------------------------------------------------------------------------- text


def test_text_encoder_loses_half_its_heads_and_ffn_units_but_not_its_hidden_size(tiny_text, tmp_path) -> None:
    model, batch = _text_model(tiny_text)
    record = prune(model, batch, ratio=0.5).record
    assert record["attention_heads"] == {"before": 2, "after": 1}
    assert (record["macs_before"], record["macs_after"]) == (229568, 114880)
    bert = model.backbone.model
    for layer in bert.encoder.layer:
        attention = layer.attention.self
        assert (attention.num_attention_heads, attention.attention_head_size, attention.all_head_size) == (1, 16, 16)
        assert attention.query.out_features == attention.key.out_features == attention.value.out_features == 16
        assert layer.attention.output.dense.in_features == 16
        assert layer.intermediate.dense.out_features == 32  # FFN 64 -> 32
        assert layer.output.dense.in_features == 32
        assert layer.attention.output.dense.out_features == layer.output.dense.out_features == 32  # hidden kept
        assert layer.output.LayerNorm.normalized_shape == (32,)
    assert bert.embeddings.word_embeddings.embedding_dim == 32 and model.num_features == 32
    assert bert.config.num_attention_heads == 2  # the config is not what reloads it: the shape record is
    reloaded = _reload_matches(model, record, batch, tmp_path)
    saved = json.loads((tmp_path / "pruned" / "model.json").read_text())
    assert saved["arch"]["kwargs"]["config"]["num_attention_heads"] == 2
    assert saved["arch"]["kwargs"]["config"]["intermediate_size"] == 64
    assert reloaded.backbone.model.encoder.layer[1].attention.self.num_attention_heads == 1


def test_minilm_keeps_6_of_12_heads_per_layer_and_reloads(tmp_path) -> None:
    model = load_source("all-minilm-l6-v2")
    model.reset_head(2, ["neg", "pos"])
    batch = dict(model.processor(["a wonderful, moving film", "dull"], padding=True, return_tensors="pt"))
    record = prune(model.eval(), batch, ratio=0.5).record
    assert record["attention_heads"] == {"before": 12, "after": 6}
    assert (record["macs_before"], record["macs_after"]) == (148637184, 74319360)
    assert (record["params_before"], record["params_after"]) == (22566146, 17249666)
    layers = model.backbone.model.encoder.layer
    assert [layer.attention.self.num_attention_heads for layer in layers] == [6] * 6
    assert [layer.intermediate.dense.out_features for layer in layers] == [768] * 6
    _reload_matches(model, record, batch, tmp_path)


def test_text_target_macs_removes_heads_in_step_with_ffn_units(tiny_text) -> None:
    model, batch = _text_model(tiny_text)
    record = prune(model, batch, target_macs=120_000).record
    assert record["macs_after"] <= 120_000
    heads = {layer.attention.self.num_attention_heads for layer in model.backbone.model.encoder.layer}
    assert heads == {1}  # the same number in every layer
    assert model(batch).shape == (2, 3)


# ---------------------------------------------------------------------------------------------------- refusals


def test_ratio_and_target_macs_are_checked(tiny_model) -> None:
    model, x = tiny_model(), _image(32)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(
            CompressError, match=re.escape(f"ratio must be in (0, 1), the fraction of channels removed; got {bad}")
        ):
            prune(model, x, ratio=bad)
    with pytest.raises(CompressError, match="give exactly one of ratio .* both given"):
        prune(model, x, ratio=0.5, target_macs=1000)
    with pytest.raises(CompressError, match="give exactly one of ratio .* neither given"):
        prune(model, x)
    macs = count_macs(model, x)
    with pytest.raises(CompressError, match=f"target_macs={macs + 1:,} is not below the model's current {macs:,} MACs"):
        prune(model, x, target_macs=macs + 1)
    with pytest.raises(CompressError, match="unknown importance 'l1'; valid: magnitude, taylor"):
        prune(model, x, ratio=0.5, importance="l1")
    with pytest.raises(CompressError, match="give taylor_batches"):
        prune(model, x, ratio=0.5, importance="taylor")
    with pytest.raises(CompressError, match="taylor_batches is read by importance='taylor' only"):
        prune(model, x, ratio=0.5, taylor_batches=[(x, torch.tensor([0]))])
    with pytest.raises(CompressError, match="iterative_steps=3 applies to ratio"):
        prune(model, x, target_macs=macs // 2, iterative_steps=3)
    with pytest.raises(CompressError, match="round_to must be a positive whole number"):
        prune(model, x, ratio=0.5, round_to=0)


def test_an_unreachable_target_is_refused_and_the_model_left_as_it_was(tiny_model) -> None:
    model, x = tiny_model(), _image(32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sizes, logits = model_sizes(model), model(x)
    with pytest.raises(CompressError, match=r"target_macs=1,000 cannot be reached: removing 90% .* leaves [\d,]+ MACs"):
        prune(model, x, target_macs=1000)
    assert model_sizes(model) == sizes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), logits, atol=0, rtol=0)


def test_a_keep_pattern_matching_nothing_names_modules_nearby(tiny_model) -> None:
    model = tiny_model()
    with pytest.raises(
        CompressError,
        match=r"keep pattern '\^backbone\\\.blockz' matches no module .* nearby: "
        r"backbone\.blocks, backbone\.blocks\.0, backbone\.blocks\.0\.0, backbone\.blocks\.0\.0\.conv, "
        r"backbone\.blocks\.0\.0\.bn1, ",
    ):
        prune(model, _image(32), ratio=0.5, keep=[r"^backbone\.blockz"])
    with pytest.raises(CompressError, match="is not a valid regex"):
        prune(model, _image(32), ratio=0.5, keep=["blocks.("])
    with pytest.raises(CompressError, match=r"keep takes a list of regexes, not one string: keep=\['conv'\]"):
        prune(model, _image(32), ratio=0.5, keep="conv")


def test_models_that_cannot_be_pruned_are_refused_with_the_reason(tiny_model, tiny_text) -> None:
    from transferkit.models.adapters import inject_lora

    text, batch = _text_model(tiny_text)
    inject_lora(text, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["query", "value"]})
    with pytest.raises(CompressError, match=r"carries lora adapters: .* merge the adapters first"):
        prune(text, batch, ratio=0.5)

    image = tiny_model()
    merged = MultiTaskModel(
        image.backbone, [nn.Linear(image.num_features, 2), nn.Linear(image.num_features, 3)], ["x", "y"],
        [None, None], image.arch, image.preprocess, image.num_features,
    )  # fmt: skip
    with pytest.raises(CompressError, match=r"a MultiTaskModel \(tasks: x, y\) cannot be pruned"):
        prune(merged, _image(32), ratio=0.5)

    gru = load_source({"name": "seq:gru", "pretrained": False})
    gru.reset_head(2)
    frames = {"frames": torch.randn(1, 20, 13), "attention_mask": torch.ones(1, 20, dtype=torch.long)}
    with pytest.raises(CompressError, match=r"'backbone\.layers\.0' is a recurrent layer \(GRU\): torch-pruning"):
        prune(gru, frames, ratio=0.5)

    with pytest.raises(CompressError, match="prune takes a transferkit SourceModel, not Linear"):
        prune(nn.Linear(4, 2), torch.randn(1, 4), ratio=0.5)  # type: ignore[arg-type]


class _FixedOffset(nn.Module):
    """A backbone whose forward hard-codes a width torch-pruning cannot see (a buffer of 8 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.register_buffer("offset", torch.zeros(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv(x) + self.offset).mean((2, 3))


def test_a_pruned_forward_that_breaks_is_refused_and_the_model_put_back() -> None:
    from transferkit.models.base import Backbone, build_backbone, register_family

    register_family("prune_test", lambda name, pretrained, weights, kwargs: Backbone(_FixedOffset(), 8, None), False)
    arch = {"family": "prune_test", "name": "offset", "kwargs": {}}
    model = SourceModel(build_backbone(arch).module, nn.Linear(8, 2), arch, {}, None, 8).eval()
    x = _image(16)
    sizes, logits = model_sizes(model), model(x)
    with pytest.raises(CompressError, match=r"the pruned model's forward fails \(RuntimeError: The size of tensor a "):
        prune(model, x, ratio=0.5)
    assert model_sizes(model) == sizes and model.backbone.conv.out_channels == 8
    torch.testing.assert_close(model(x), logits, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------- shape record


def test_a_record_naming_a_module_the_model_lacks_is_refused(tiny_model, tmp_path) -> None:
    model, x = tiny_model(), _image(32)
    record = prune(model, x, ratio=0.5).record
    with pytest.raises(
        SourceError,
        match="names module 'backbone.conv_stemm', which this model lacks "
        r"\(closest: backbone\.conv_stem",
    ):
        apply_shapes(tiny_model(), {"modules": {"backbone.conv_stemm": {"out_channels": 4}}, "tensors": {}})
    with pytest.raises(SourceError, match="names module 'backbone.nope'"):
        apply_shapes(tiny_model(), {"modules": {}, "tensors": {"backbone.nope.weight": [1]}})
    with pytest.raises(SourceError, match="has no parameter or buffer 'gamma'"):
        apply_shapes(tiny_model(), {"modules": {}, "tensors": {"backbone.conv_stem.gamma": [1]}})
    # through load_model: a record edited by hand, or made for another model
    save_model(model, tmp_path / "m", extra={"pruned": record})
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["pruned"]["shapes"]["modules"]["backbone.blocks.9.conv"] = {"out_channels": 8}
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SourceError, match="names module 'backbone.blocks.9.conv', which this model lacks"):
        load_model(tmp_path / "m")


def test_shape_record_of_an_unpruned_model_holds_only_its_head(tiny_model) -> None:
    record = shape_record(tiny_model())
    assert set(record["modules"]) == {"head"} and set(record["tensors"]) == {"head.weight", "head.bias"}
