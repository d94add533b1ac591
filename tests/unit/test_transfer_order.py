"""Forward transfer from a source whose tensor names carry no information (ONNX initializers ``onnx::Conv_193``,
keys ``w0001``...): matched by order and shape, each pair reported as such, ambiguity flagged and refused under
strict."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from transferkit.cli import main
from transferkit.io import save_tensors
from transferkit.transfer.api import transfer
from transferkit.transfer.match import TransferError, match_state_dicts, uninformative


def _source() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet")
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_uninformative_names_are_told_apart_from_roles() -> None:
    for name in ("onnx::Conv_193", "onnx::MatMul_12", "w0001", "p12", "193", "blocks.0.w3"):
        assert uninformative(name), name
    for name in ("conv.weight", "bn1.running_var", "blocks.0.0.conv_dw.weight", "cls_token", "pos_embed"):
        assert not uninformative(name), name


def test_numbered_keys_in_the_targets_order_transfer_exactly_by_order_and_shape() -> None:
    state = _source()
    numbered = {f"w{i:04d}": v for i, v in enumerate(state.values(), 1)}
    target = timm.create_model("test_efficientnet")
    model, report = transfer(numbered, target, methods=["names", "structure"])
    assert report["summary"]["coverage"] == 1.0 and report["summary"]["ambiguities"] == 0
    assert report["summary"]["matched_by"] == {"names": 0, "structure": 0, "order": len(state)}
    rows = {r["name"]: r for r in report["tensors"] if r["status"] == "transferred"}
    assert rows["conv_stem.weight"]["from"] == "w0001" and rows["conv_stem.weight"]["role"] == "conv2d kernel"
    assert rows["bn1.running_var"]["role"].startswith("vector")
    assert rows["classifier.weight"]["role"] == "matrix (linear or embedding weight)"
    for name, tensor in model.state_dict().items():  # every tensor landed where it came from
        if name in state:
            assert torch.equal(tensor, state[name]), name


def test_onnx_initializer_names_through_the_cli(tmp_path) -> None:
    state = _source()
    path = tmp_path / "exported.safetensors"
    save_tensors(path, {f"onnx::Conv_{100 + i}": v for i, v in enumerate(state.values())})
    out = tmp_path / "moved"
    assert main(["transfer", str(path), "timm:test_efficientnet", "--out", str(out)]) == 0
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["summary"]["coverage"] == 1.0
    assert report["summary"]["matched_by"]["order"] == len(state)
    assert "order" in (out / "transfer_report.txt").read_text()


def test_a_gap_in_the_order_is_an_ambiguity_and_strict_refuses_it() -> None:
    # two BatchNorms of the same width; the source lost the first one's scale: which target scale stays fresh?
    target = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm1d(8), nn.BatchNorm1d(8))
    shapes = [tuple(t.shape) for k, t in target.state_dict().items() if not k.endswith("num_batches_tracked")]
    source = {f"w{i}": s for i, s in enumerate(shapes[:2] + shapes[3:])}
    result = match_state_dicts(source, target.state_dict(), methods=["structure"])
    assert result.ambiguities and all(m == "order" for _, m in result.pairs.values())
    with pytest.raises(TransferError, match="ambiguous pairing"):
        match_state_dicts(source, target.state_dict(), methods=["structure"], strict=True)


def test_an_uninformative_name_never_pairs_with_another_shape() -> None:
    result = match_state_dicts({"w1": (8, 3, 3, 3), "w2": (5,)}, {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,)})
    assert result.pairs == {"conv.weight": ("w1", "order")} and result.unused_source == ["w2"]
