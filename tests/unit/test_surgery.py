"""Surgery: every function-preserving operation gives the source's outputs before any training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transferkit.transfer.surgery import (
    SurgeryError,
    adapt_input_channels,
    channel_importance,
    head_from_labels,
    identity_init_block,
    narrower,
    prefix_tokens,
    resize_pos_embed,
    select_layers,
    slice_or_tile,
    take_blocks,
    wider,
)


def _conv(in_ch: int, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(in_ch, 8, 3, padding=1)


# ---------------------------------------------------------------------------------------------------------------- head


def test_head_from_labels_copies_rows_of_shared_labels_only():
    torch.manual_seed(0)
    sw, sb = torch.randn(4, 6), torch.randn(4)
    tw, tb = torch.randn(3, 6), torch.randn(3)
    w, b, pairs = head_from_labels(sw, sb, ["cat", "daisy", "sea_lion", "dog"], tw, tb, ["Sea Lion", "zebra", "daisy"])
    assert pairs == [(0, 2), (2, 1)]
    assert torch.equal(w[0], sw[2]) and torch.equal(b[0], sb[2])
    assert torch.equal(w[2], sw[1]) and torch.equal(b[2], sb[1])
    assert torch.equal(w[1], tw[1]) and torch.equal(b[1], tb[1])  # zebra: fresh row kept


def test_head_from_labels_refuses_other_feature_width():
    with pytest.raises(SurgeryError, match=r"source \(2, 5\) vs target \(2, 6\)"):
        head_from_labels(torch.zeros(2, 5), None, ["a", "b"], torch.zeros(2, 6), None, ["a", "b"])


# ------------------------------------------------------------------------------------------------------ input channels


def test_three_to_one_channel_sum_is_exact_on_a_grey_image():
    conv3 = _conv(3)
    w, how = adapt_input_channels(conv3.weight.detach(), 1)
    assert how == "summed over 3 input channels" and w.shape == (8, 1, 3, 3)
    conv1 = nn.Conv2d(1, 8, 3, padding=1)
    with torch.no_grad():
        conv1.weight.copy_(w)
        conv1.bias.copy_(conv3.bias)
    grey = torch.rand(2, 1, 16, 16)
    assert torch.allclose(conv1(grey), conv3(grey.repeat(1, 3, 1, 1)), atol=1e-5)


@pytest.mark.parametrize("src_ch, tgt_ch", [(1, 3), (3, 6), (3, 12)])
def test_repeat_and_scale_preserves_grey_activation(src_ch: int, tgt_ch: int):
    conv_s = _conv(src_ch)
    w, how = adapt_input_channels(conv_s.weight.detach(), tgt_ch)
    assert w.shape == (8, tgt_ch, 3, 3)
    assert how == f"input channels {src_ch}->{tgt_ch}: repeated, scaled by {src_ch}/{tgt_ch}"
    conv_t = nn.Conv2d(tgt_ch, 8, 3, padding=1)
    with torch.no_grad():
        conv_t.weight.copy_(w)
        conv_t.bias.copy_(conv_s.bias)
    grey = torch.rand(2, 1, 16, 16)
    assert torch.allclose(conv_t(grey.repeat(1, tgt_ch, 1, 1)), conv_s(grey.repeat(1, src_ch, 1, 1)), atol=1e-5)


# ------------------------------------------------------------------------------------------------------ ViT image size


def test_resize_pos_embed_matches_timm_and_keeps_class_token():
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 4 * 4, 12)
    out = resize_pos_embed(pos, (6, 6))
    assert out.shape == (1, 1 + 36, 12)
    assert torch.equal(out[:, 0], pos[:, 0])  # the class token has no place in the grid: kept as is
    ref = resample_abs_pos_embed(pos, new_size=[6, 6], num_prefix_tokens=1)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(resize_pos_embed(pos, (4, 4)), pos)
    shrunk = resize_pos_embed(pos, (3, 3))
    assert torch.allclose(shrunk, resample_abs_pos_embed(pos, new_size=[3, 3], num_prefix_tokens=1), atol=1e-6)


def test_resize_pos_embed_of_a_constant_grid_stays_constant():
    pos = torch.cat([torch.full((1, 1, 4), 7.0), torch.full((1, 9, 4), 0.5)], dim=1)
    out = resize_pos_embed(pos, (5, 5))
    assert torch.allclose(out[:, 1:], torch.full((1, 25, 4), 0.5), atol=1e-6)
    assert out[0, 0, 0].item() == 7.0


def test_prefix_tokens_and_non_grid_error():
    assert prefix_tokens(197) == 1 and prefix_tokens(196) == 0 and prefix_tokens(198) == 2
    with pytest.raises(SurgeryError, match="not a square grid"):
        resize_pos_embed(torch.zeros(1, 7, 4), (2, 2), num_prefix_tokens=1)


# --------------------------------------------------------------------------------------------------------------- depth


class _Residual(nn.Module):
    """x + bn(conv(relu(conv(x)))): the last layer of the branch is a BatchNorm, as in ResNet."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv2(torch.relu(self.conv1(x))))


def _randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)


def test_deeper_with_identity_blocks_is_function_preserving():
    torch.manual_seed(0)
    source = nn.Sequential(_Residual(4), _Residual(4)).eval()
    _randomise_bn(source)
    target = nn.Sequential(_Residual(4), _Residual(4), _Residual(4), _Residual(4)).eval()
    _randomise_bn(target)
    # blocks 0 and 1 from the source (net2net-deeper: matching blocks), blocks 2 and 3 extra, as identity
    target[0].load_state_dict(source[0].state_dict())
    target[1].load_state_dict(source[1].state_dict())
    assert identity_init_block(target[2]) == ["bn"]
    assert identity_init_block(target[3]) == ["bn"]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(target(x), source(x), atol=1e-6)
        assert not torch.allclose(target[2].conv1(x), x)  # the inner layers keep their weights: it can still learn


def test_identity_init_of_a_vit_block_zeroes_both_branches():
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(dim=16, num_heads=2).eval()
    assert identity_init_block(block) == ["attn.proj", "mlp.fc2"]
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(block(x), x)


def test_identity_init_refuses_a_projection_block():
    import timm

    resnet = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(SurgeryError, match="cannot be initialised as the identity"):
        identity_init_block(resnet.layer2[0])


def test_select_layers_every_other_as_distilbert_and_others():
    assert select_layers(6, 3) == [0, 2, 4]
    assert select_layers(12, 6) == [0, 2, 4, 6, 8, 10]
    assert select_layers(6, 3, "uniform") == [0, 2, 5]
    assert select_layers(6, 2, "last") == [4, 5]
    with pytest.raises(SurgeryError, match="every other of 6 source blocks gives 3, not 4"):
        select_layers(6, 4)
    with pytest.raises(SurgeryError, match="4 target blocks > 3 source"):
        select_layers(3, 4)


def test_shallower_takes_every_other_block_and_preserves_the_function_when_skipped_blocks_are_identity():
    torch.manual_seed(0)
    source = nn.Sequential(*[_Residual(4) for _ in range(6)]).eval()
    _randomise_bn(source)
    for i in (1, 3, 5):  # the blocks a DistilBERT-style student drops: identity here, so nothing is lost
        identity_init_block(source[i])
    student = nn.Sequential(*[_Residual(4) for _ in range(3)]).eval()
    src_state = {f"blocks.{k}": v for k, v in source.state_dict().items()}
    mapping = take_blocks(src_state, "blocks", select_layers(6, 3))
    assert mapping["blocks.1.conv1.weight"] == "blocks.2.conv1.weight"
    assert mapping["blocks.2.bn.running_var"] == "blocks.4.bn.running_var"
    student.load_state_dict({t.removeprefix("blocks."): src_state[s] for t, s in mapping.items()})
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(student(x), source(x), atol=1e-6)
    with pytest.raises(SurgeryError, match=r"no block\(s\) \[9\]"):
        take_blocks(src_state, "blocks", [0, 9])


# --------------------------------------------------------------------------------------------------------------- width


def test_wider_mlp_is_function_preserving():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(5, 4), nn.Linear(4, 3)
    x = torch.randn(7, 5)
    before = fc2(torch.relu(fc1(x)))
    new1, new2, _, mapping = wider(fc1, fc2, 9, generator=torch.Generator().manual_seed(1))
    assert new1.weight.shape == (9, 5) and new2.weight.shape == (3, 9)
    assert mapping[:4] == [0, 1, 2, 3] and all(0 <= g < 4 for g in mapping[4:])
    assert torch.allclose(new2(torch.relu(new1(x))), before, atol=1e-6)


def test_wider_conv_bn_is_function_preserving():
    torch.manual_seed(0)
    c1, bn, c2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1)
    _randomise_bn(bn)
    bn.eval()
    x = torch.randn(2, 3, 8, 8)
    before = c2(torch.relu(bn(c1(x))))
    n1, n2, nbn, _ = wider(c1, c2, 10, norm=bn, generator=torch.Generator().manual_seed(0))
    nbn.eval()
    assert n1.out_channels == 10 and nbn.num_features == 10 and n2.in_channels == 10
    assert torch.allclose(n2(torch.relu(nbn(n1(x)))), before, atol=1e-5)


def test_narrower_keeps_the_largest_channels_and_is_exact_when_dropped_ones_are_dead():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(5, 6), nn.Linear(6, 3)
    with torch.no_grad():
        fc1.weight[[1, 4]] = 0.0  # two dead channels
        fc1.bias[[1, 4]] = 0.0
    x = torch.randn(7, 5)
    before = fc2(torch.relu(fc1(x)))
    n1, n2, _, kept = narrower(fc1, fc2, 4)
    assert kept == [0, 2, 3, 5]
    norms = channel_importance(fc1)
    assert set(kept) == set(torch.topk(norms, 4).indices.tolist())
    assert torch.allclose(n2(torch.relu(n1(x))), before, atol=1e-6)
    with pytest.raises(SurgeryError, match="0 < new_width <= 6"):
        narrower(fc1, fc2, 7)


def test_width_surgery_refuses_mismatched_pairs():
    with pytest.raises(SurgeryError, match="layer gives 4 channels but the next layer takes 5"):
        wider(nn.Linear(3, 4), nn.Linear(5, 2), 8)


def test_slice_or_tile_describes_what_it_did():
    t = torch.arange(6.0).reshape(2, 3)
    out, how = slice_or_tile(t, (2, 2))
    assert how == "sliced (2, 3)->(2, 2)" and torch.equal(out, t[:, :2])
    out, how = slice_or_tile(t, (4, 3))
    assert how == "tiled (2, 3)->(4, 3)" and torch.equal(out[2:], t)


# ------------------------------------------------------------------------------------- width of a whole model


def _bn_stats(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so copying them wrongly would show in the outputs."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    return model.eval()


def _convnet(w1: int, w2: int, hidden: int) -> nn.Sequential:
    """Conv-BN-ReLU x 2, pooled to 2 x 2, flattened into a 2-layer MLP head: a chain with a flatten in it."""
    return nn.Sequential(
        nn.Conv2d(3, w1, 3, padding=1),
        nn.BatchNorm2d(w1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(w1, w2, 3, padding=1),
        nn.BatchNorm2d(w2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(w2 * 4, hidden),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(hidden, 10),
    )


def test_net2net_wider_torchvision_mlp_computes_the_source_function():
    """torchvision.ops.MLP, whose width is its hidden_channels argument: 32-24 -> 64-40 hidden units, with
    BatchNorm1d, gives the source's outputs to float tolerance before any training."""
    from torchvision.ops import MLP

    from transferkit.transfer.api import format_report, transfer

    torch.manual_seed(0)
    source = _bn_stats(MLP(16, [32, 24, 5], norm_layer=nn.BatchNorm1d))
    target, report = transfer(
        source, lambda: MLP(16, [64, 40, 5], norm_layer=nn.BatchNorm1d), widen="net2net", strict=True
    )
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert (target.eval()(x) - source(x)).abs().max() < 1e-5
    s = report["summary"]
    assert s["coverage"] == 1.0 and s["params_transferred"] == 4_101 and s["ambiguities"] == 0
    assert s["transforms"] == {"net2net-wider": 13, "copied": 1}
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["0.weight"]["transform"] == "net2net-wider outputs 32->64 (copied channels)"
    assert rows["1.running_var"]["transform"] == "net2net-wider outputs 32->64 (copied channels)"
    assert rows["8.weight"]["transform"] == (
        "net2net-wider inputs 24->40 (divided among the copies of the previous layer's channels)"
    )
    assert rows["8.bias"]["transform"] == "copied"
    # the first 32 channels are the source's, in order; each extra one copies one of them
    w = target.state_dict()["0.weight"]
    assert torch.equal(w[:32], source.state_dict()["0.weight"])
    assert all(any(torch.equal(w[j], w[i]) for i in range(32)) for j in range(32, 64))
    assert (
        "4.weight (40, 64) <- 4.weight (24, 32): net2net-wider outputs 24->40 (copied channels), inputs 32->64 "
        "(divided among the copies of the previous layer's channels)"
    ) in format_report(report)


def test_net2net_wider_conv_chain_through_a_flatten_and_narrower_by_weight_norm():
    from transferkit.transfer.api import transfer

    torch.manual_seed(0)
    source = _bn_stats(_convnet(8, 16, 32))
    x = torch.randn(2, 3, 16, 16)
    wide, report = transfer(source, lambda: _convnet(12, 24, 48), widen="net2net", seed=3)
    with torch.no_grad():
        assert (wide.eval()(x) - source(x)).abs().max() < 1e-5
    assert report["summary"]["coverage"] == 1.0
    # the Linear after the flatten takes each conv channel's 4 positions along with the channel
    assert {r["name"]: r["shape"] for r in report["tensors"]}["9.weight"] == [48, 96]

    narrow, report = transfer(source, lambda: _convnet(4, 16, 20), widen="net2net")
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["0.weight"]["transform"] == (
        "net2net-narrower outputs 8->4 (kept the largest by weight norm; not function-preserving)"
    )
    # the channels kept are the 4 of largest |weight| x |BatchNorm scale|, and the next conv reads exactly those
    sd = source.state_dict()
    importance = sd["0.weight"].flatten(1).norm(dim=1) * sd["1.weight"].abs()
    kept = sorted(torch.topk(importance, 4).indices.tolist())
    assert torch.equal(narrow.state_dict()["0.weight"], sd["0.weight"][kept])
    assert torch.equal(narrow.state_dict()["1.running_mean"], sd["1.running_mean"][kept])
    assert torch.equal(narrow.state_dict()["4.weight"], sd["4.weight"][:, kept])
    assert rows["4.weight"]["transform"] == "net2net-narrower inputs 8->4 (the previous layer's kept channels)"
    assert rows["4.bias"]["transform"] == "copied"


def test_net2net_narrower_is_exact_when_the_dropped_channels_are_dead():
    from transferkit.transfer.api import transfer

    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        source[0].weight[[1, 4]] = 0.0
        source[0].bias[[1, 4]] = 0.0
    target, _ = transfer(source, lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), widen="net2net")
    x = torch.randn(7, 5)
    with torch.no_grad():
        assert torch.allclose(target(x), source(x), atol=1e-6)


def test_net2net_width_refuses_what_it_cannot_preserve():
    import timm
    from torchvision.ops import MLP

    from transferkit.transfer.api import transfer
    from transferkit.transfer.match import TransferError

    resnet = timm.create_model("test_resnet")
    with pytest.raises(
        TransferError,
        match=r"widen='net2net' refused for ResNet: 'maxpool' feeds 2 operations "
        r"\(layer1_0_conv1, add\): a residual addition",
    ):
        transfer(resnet, lambda: timm.create_model("test_resnet"), widen="net2net")
    with pytest.raises(TransferError, match=r"cannot carry copied channels through '1' \(LayerNorm\)"):
        transfer(
            MLP(4, [8, 2], norm_layer=nn.LayerNorm), lambda: MLP(4, [16, 2], norm_layer=nn.LayerNorm), widen="net2net"
        )
    with pytest.raises(TransferError, match="the last layer '2' gives 4 outputs in the target and 3 in the source"):
        transfer(
            nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)),
            lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4)),
            widen="net2net",
        )

    class ConvThenLinear(nn.Module):  # a Linear over the last spatial axis: positions, not channels
        def __init__(self, width: int):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, width, 1), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x))

    with pytest.raises(TransferError, match=r"'fc' \(Linear\) reads a convolution's output without a flatten"):
        transfer(ConvThenLinear(4), lambda: ConvThenLinear(8), widen="net2net")
    with pytest.raises(TransferError, match="widen must be 'net2net' or None, not 'wider'"):
        transfer(nn.Linear(2, 2), nn.Linear(2, 2), widen="wider")
