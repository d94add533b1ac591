"""Surgery: change a network's head, input channels, image size, depth or width while keeping what it knows.

Each function is a small pure operation on tensors or modules. The function-preserving ones (``input channels``
on a grey image, ``deeper`` with identity blocks, ``wider``) are tested to give the source's outputs to float
tolerance before any training; the others (``narrower``, ``shallower``, a head from labels) keep as much as can be
kept and say so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.errors import TransferKitError


class SurgeryError(TransferKitError, ValueError):
    """A surgery cannot be applied to the given shapes or modules."""


# ----------------------------------------------------------------------------------------------------------------
# Head


def _label_key(label: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(label)).strip().lower()


def head_from_labels(
    source_weight: torch.Tensor,
    source_bias: torch.Tensor | None,
    source_labels: Sequence[str],
    target_weight: torch.Tensor,
    target_bias: torch.Tensor | None,
    target_labels: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, int]]]:
    """A new head whose rows for classes the source also knows (same label name) start from the source's rows.

    Labels are compared case-insensitively with spaces, ``_`` and ``-`` equated, so ImageNet's ``daisy`` is the
    target's ``Daisy``. Rows of the other classes keep the target's fresh initialisation.

    Args:
        source_weight: source classifier weight, ``(num_source_classes, features)``.
        source_bias: its bias, or None.
        source_labels: source class names, in output order.
        target_weight: the new (fresh) head weight, ``(num_target_classes, features)``.
        target_bias: its bias, or None.
        target_labels: target class names, in output order.

    Returns:
        (weight, bias, pairs) where pairs lists (target row, source row) copied.
    """
    if source_weight.shape[1:] != target_weight.shape[1:]:
        raise SurgeryError(
            f"head rows differ in width: source {tuple(source_weight.shape)} vs target "
            f"{tuple(target_weight.shape)}; the features feeding the heads must have the same size"
        )
    if len(source_labels) != source_weight.shape[0] or len(target_labels) != target_weight.shape[0]:
        raise SurgeryError(
            f"labels do not match head rows: source {len(source_labels)} labels for "
            f"{source_weight.shape[0]} rows, target {len(target_labels)} for {target_weight.shape[0]}"
        )
    index: dict[str, int] = {}
    for i, label in enumerate(source_labels):
        index.setdefault(_label_key(label), i)  # ImageNet repeats a few names ('crane'): the first one wins
    weight, bias = target_weight.clone(), None if target_bias is None else target_bias.clone()
    pairs = []
    for t, label in enumerate(target_labels):
        s = index.get(_label_key(label))
        if s is None:
            continue
        weight[t] = source_weight[s]
        if bias is not None and source_bias is not None:
            bias[t] = source_bias[s]
        pairs.append((t, s))
    return weight, bias, pairs


# ----------------------------------------------------------------------------------------------------------------
# Input channels


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> tuple[torch.Tensor, str]:
    """The first convolution's weight for ``in_chans`` input channels.

    ``3 -> 1`` sums over the colour channels: a grey image ``g`` fed to the 1-channel model gives exactly what the
    3-channel model gives on ``g`` repeated to RGB. ``C -> N`` repeats the kernels cyclically and scales by
    ``C / N`` so the response to a constant-across-channels image is unchanged (exactly when N is a multiple of C).

    Args:
        weight: ``(out, C, *kernel)``.
        in_chans: the target's number of input channels.

    Returns:
        (new weight, transform description for the report).
    """
    c = weight.shape[1]
    if in_chans == c:
        return weight.clone(), "copied"
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True), f"summed over {c} input channels"
    reps = math.ceil(in_chans / c)
    tiled = weight.repeat(1, reps, *([1] * (weight.dim() - 2)))[:, :in_chans]
    return tiled * (c / in_chans), f"input channels {c}->{in_chans}: repeated, scaled by {c}/{in_chans}"


# ----------------------------------------------------------------------------------------------------------------
# Image size (ViT position embeddings)


def prefix_tokens(num_tokens: int, max_prefix: int = 8) -> int:
    """How many leading tokens (class, distillation, registers) precede a square grid of ``num_tokens``."""
    for p in range(max_prefix + 1):
        side = math.isqrt(num_tokens - p) if num_tokens > p else 0
        if side and side * side == num_tokens - p:
            return p
    raise SurgeryError(f"{num_tokens} position embeddings are not a square grid plus up to {max_prefix} tokens")


def resize_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int | None = None
) -> torch.Tensor:
    """Resize ViT position embeddings ``(1, prefix + H*W, D)`` to a new grid: bicubic on the 2-D grid.

    The class token (and any other prefix token) is kept as it is: it has no position in the image.

    Args:
        pos_embed: the source embeddings.
        new_grid: (height, width) in patches of the target.
        num_prefix_tokens: leading non-grid tokens; inferred (largest square grid) when None.
    """
    n = pos_embed.shape[1]
    p = prefix_tokens(n) if num_prefix_tokens is None else num_prefix_tokens
    side = math.isqrt(n - p)
    if side * side != n - p:
        raise SurgeryError(f"position embeddings of {n} tokens minus {p} prefix tokens are not a square grid")
    prefix, grid = pos_embed[:, :p], pos_embed[:, p:]
    if (side, side) == tuple(new_grid):
        return pos_embed.clone()
    d = grid.shape[-1]
    grid = grid.reshape(1, side, side, d).permute(0, 3, 1, 2).float()
    # align_corners=False with antialiasing: timm's resample_abs_pos_embed convention, so a model resized here
    # equals one resized by timm (antialiasing matters when the grid shrinks: no aliasing of fine position detail)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Depth


def select_layers(num_source: int, num_target: int, how: str = "every_other") -> list[int]:
    """Which source blocks a shallower target takes, one index per target block.

    Args:
        num_source: blocks in the source.
        num_target: blocks in the target (at most ``num_source``).
        how: ``every_other`` (0, 2, 4...: DistilBERT's student initialisation), ``uniform`` (evenly spread,
            first and last kept), ``first`` or ``last``.
    """
    if num_target > num_source:
        raise SurgeryError(
            f"a shallower target takes a subset: {num_target} target blocks > {num_source} source "
            "blocks (use a deeper transfer: matching blocks + identity blocks)"
        )
    if how == "every_other":
        idx = list(range(0, num_source, 2))[:num_target]
        if len(idx) < num_target:
            raise SurgeryError(
                f"every other of {num_source} source blocks gives {len(idx)}, not {num_target}; use how='uniform'"
            )
        return idx
    if how == "uniform":
        if num_target == 1:
            return [0]
        return [round(i * (num_source - 1) / (num_target - 1)) for i in range(num_target)]
    if how == "first":
        return list(range(num_target))
    if how == "last":
        return list(range(num_source - num_target, num_source))
    raise SurgeryError(f"unknown layer selection '{how}'; valid: every_other, uniform, first, last")


def take_blocks(state: dict[str, torch.Tensor], prefix: str, indices: Sequence[int]) -> dict[str, str]:
    """Rename source block ``prefix.{indices[k]}.`` to target block ``prefix.{k}.``: {target name: source name}.

    Args:
        state: the source state_dict.
        prefix: the container of the blocks, e.g. ``encoder.layer`` or ``blocks``.
        indices: from ``select_layers``.
    """
    rx = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    by_block: dict[int, list[tuple[str, str]]] = {}
    for name in state:
        m = rx.match(name)
        if m:
            by_block.setdefault(int(m.group(1)), []).append((name, m.group(2)))
    missing = [i for i in indices if i not in by_block]
    if missing:
        raise SurgeryError(f"source has no block(s) {missing} under '{prefix}' (it has {sorted(by_block)})")
    return {f"{prefix}.{k}.{rest}": name for k, i in enumerate(indices) for name, rest in by_block[i]}


def can_be_identity(block: nn.Module) -> bool:
    """False for blocks whose input and output differ in shape (a projection shortcut, or no shortcut at all)."""
    if getattr(block, "downsample", None) is not None:
        return False
    return getattr(block, "has_skip", True) is not False


def identity_init_block(block: nn.Module) -> list[str]:
    """Make a residual block compute the identity (net2net-deeper): zero the last layer of each residual branch.

    ``x + f(x)`` with the last scale of ``f`` at zero is ``x``; the layers before it keep their (random or copied)
    weights so the block can still learn. The last layer is found as: timm ViT blocks: ``attn.proj`` and
    ``mlp.fc2`` (two branches); otherwise the last normalisation layer (BatchNorm/LayerNorm/GroupNorm scale and
    shift), else the last Linear/Conv, in module order, outside any ``downsample``/``shortcut`` path.

    Returns:
        the names (inside ``block``) of the modules zeroed.

    Raises:
        SurgeryError: the block has no identity shortcut, so no choice of weights makes it the identity.
    """
    if not can_be_identity(block):
        raise SurgeryError(
            f"{type(block).__name__} changes the shape of its input (projection shortcut or no skip): "
            "it cannot be initialised as the identity"
        )
    mods = dict(block.named_modules())
    if "attn.proj" in mods and "mlp.fc2" in mods:
        last = ["attn.proj", "mlp.fc2"]
    else:
        inner = [(n, m) for n, m in block.named_modules() if n and not re.search(r"(^|\.)(downsample|shortcut)", n)]
        norms = [n for n, m in inner if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))]
        layers = [n for n, m in inner if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if not norms and not layers:
            raise SurgeryError(f"{type(block).__name__} has no layer to zero")
        last = [norms[-1] if norms else layers[-1]]
    with torch.no_grad():
        for n in last:
            for p in (getattr(mods[n], "weight", None), getattr(mods[n], "bias", None)):
                if p is not None:
                    p.zero_()
    return last


# ----------------------------------------------------------------------------------------------------------------
# Width


def _channel_pair(layer: nn.Module, next_layer: nn.Module) -> tuple[nn.Linear | nn.Conv2d, nn.Linear | nn.Conv2d]:
    """Check that ``layer`` feeds ``next_layer`` as a Linear/Conv2d pair; the same two modules, typed as such."""
    ok = (nn.Linear, nn.Conv2d)
    if not isinstance(layer, ok) or not isinstance(next_layer, ok):
        raise SurgeryError(
            f"width surgery works on Linear/Conv2d pairs, not {type(layer).__name__} -> {type(next_layer).__name__}"
        )
    if getattr(layer, "groups", 1) != 1 or getattr(next_layer, "groups", 1) != 1:
        raise SurgeryError("width surgery on grouped/depthwise convolutions is not supported")
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    nin = next_layer.in_features if isinstance(next_layer, nn.Linear) else next_layer.in_channels
    if out != nin:
        raise SurgeryError(f"layer gives {out} channels but the next layer takes {nin}")
    return layer, next_layer


def _rebuild(layer: nn.Linear | nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    new: nn.Linear | nn.Conv2d
    if isinstance(layer, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        # torch declares the sizes of every _ConvNd as tuple[int, ...]; a Conv2d holds pairs
        new = nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            cast("tuple[int, int]", layer.kernel_size),
            cast("tuple[int, int]", layer.stride),
            cast("str | tuple[int, int]", layer.padding),
            cast("tuple[int, int]", layer.dilation),
            bias=bias is not None,
            padding_mode=layer.padding_mode,
        )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            cast(torch.Tensor, new.bias).copy_(bias)  # built with a bias just above
    return new


def _select_norm(norm: nn.Module, idx: torch.Tensor) -> nn.Module:
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise SurgeryError(f"width surgery handles BatchNorm between the layers, not {type(norm).__name__}")
    new = type(norm)(
        len(idx), eps=norm.eps, momentum=norm.momentum, affine=norm.affine, track_running_stats=norm.track_running_stats
    )
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(norm, name, None)
            if src is not None:
                getattr(new, name).copy_(src[idx])
        if norm.num_batches_tracked is not None:
            # the same track_running_stats as norm, so new has the buffer too
            cast(torch.Tensor, new.num_batches_tracked).copy_(norm.num_batches_tracked)
    return new


def wider(
    layer: nn.Module,
    next_layer: nn.Module,
    new_width: int,
    norm: nn.Module | None = None,
    generator: torch.Generator | None = None,
    noise: float = 0.0,
) -> tuple[nn.Module, nn.Module, nn.Module | None, list[int]]:
    """Net2net-wider: widen ``layer``'s output to ``new_width`` channels without changing the function.

    New channel j copies an existing channel g(j) (chosen at random); the next layer's input weights for every
    copy of a channel are divided by the number of copies, so the sum it computes is unchanged (Chen et al.,
    2016). Element-wise activations and a BatchNorm between the two layers commute with the copy.

    Args:
        layer: Linear or Conv2d whose outputs are widened.
        next_layer: the Linear or Conv2d consuming them.
        new_width: channels after widening (at least the current number).
        norm: an optional BatchNorm between the two (its channels are copied the same way).
        generator: for the choice of copied channels.
        noise: relative noise added to the copies' outgoing weights to break symmetry (0 keeps the function exact).

    Returns:
        (new layer, new next layer, new norm or None, mapping g as a list: new channel -> old channel).
    """
    layer, next_layer = _channel_pair(layer, next_layer)
    old = layer.weight.shape[0]
    if new_width < old:
        raise SurgeryError(f"wider needs new_width >= {old}, got {new_width}; use narrower")
    extra = torch.randint(0, old, (new_width - old,), generator=generator)
    g = torch.cat([torch.arange(old), extra])
    counts = torch.bincount(g, minlength=old).to(layer.weight.dtype)
    w1 = layer.weight.detach()[g]
    b1 = None if layer.bias is None else layer.bias.detach()[g]
    w2 = next_layer.weight.detach()[:, g] / counts[g].view(1, -1, *([1] * (next_layer.weight.dim() - 2)))
    if noise:
        w2 = w2 + noise * w2.std() * torch.randn(w2.shape, generator=generator)
    new_norm = _select_norm(norm, g) if norm is not None else None
    nb = None if next_layer.bias is None else next_layer.bias.detach()
    return _rebuild(layer, w1, b1), _rebuild(next_layer, w2, nb), new_norm, g.tolist()


def channel_importance(layer: nn.Module) -> torch.Tensor:
    """L2 norm of each output channel's weights: the cheap importance used to choose what a narrower net keeps."""
    return cast(torch.Tensor, layer.weight).detach().flatten(1).norm(dim=1)


def narrower(
    layer: nn.Module, next_layer: nn.Module, new_width: int, norm: nn.Module | None = None
) -> tuple[nn.Module, nn.Module, nn.Module | None, list[int]]:
    """Narrow ``layer``'s output to ``new_width`` channels, keeping the channels of largest weight norm.

    Not function-preserving in general (what the dropped channels contributed is lost); exactly preserving when
    the dropped channels are dead (zero weights). Kept channels stay in their original order.

    Returns:
        (new layer, new next layer, new norm or None, kept channel indices).
    """
    layer, next_layer = _channel_pair(layer, next_layer)
    old = layer.weight.shape[0]
    if not 0 < new_width <= old:
        raise SurgeryError(f"narrower needs 0 < new_width <= {old}, got {new_width}; use wider")
    importance = channel_importance(layer)
    if norm is not None and getattr(norm, "weight", None) is not None:
        # a channel whose BatchNorm scale is ~0 contributes ~nothing, whatever its conv weights
        importance = importance * cast(torch.Tensor, norm.weight).detach().abs()
    keep = torch.sort(torch.topk(importance, new_width, sorted=False).indices).values
    w1 = layer.weight.detach()[keep]
    b1 = None if layer.bias is None else layer.bias.detach()[keep]
    w2 = next_layer.weight.detach()[:, keep]
    nb = None if next_layer.bias is None else next_layer.bias.detach()
    new_norm = _select_norm(norm, keep) if norm is not None else None
    return _rebuild(layer, w1, b1), _rebuild(next_layer, w2, nb), new_norm, keep.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Width of a whole model: a chain of Linear/Conv(+BatchNorm) layers

WIDTH_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
WIDTH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# parameter-free modules that act on each channel alone (or pool over positions): a copied channel stays a copy
CHANNELWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Hardswish,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
    nn.Flatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
CHANNELWISE_FUNCTIONS = {
    "relu",
    "relu6",
    "gelu",
    "silu",
    "tanh",
    "sigmoid",
    "leaky_relu",
    "dropout",
    "flatten",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "hardswish",
}


def width_chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's Linear/Conv and BatchNorm layers in execution order, checked to form a plain chain.

    Widening a layer by copying channels preserves the function only if every channel flows, alone, into the
    next Linear/Conv: element-wise activations, dropout, pooling over positions, BatchNorm and flattening keep
    that; a residual addition, a concatenation, a LayerNorm (statistics over channels) or a grouped convolution do
    not. The model is traced with ``torch.fx`` and refused at the first operation that would break it.

    Raises:
        SurgeryError: the model cannot be traced, branches (a node used twice: a residual or a concatenation),
            or holds an operation net2net cannot carry a channel copy through; the message names it.
    """
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # fx raises many types on data-dependent control flow
        raise SurgeryError(
            f"net2net width needs a model torch.fx can trace ({type(model).__name__} cannot: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); widen it with resize=True "
            "instead (an initialisation, not function-preserving)"
        ) from e
    modules = dict(model.named_modules())
    chain: list[tuple[str, nn.Module]] = []
    flat = False  # a flatten since the last convolution: a Linear after a conv must read flattened channels
    for node in graph.nodes:
        if node.op == "output":
            continue
        if len(node.users) > 1:
            raise SurgeryError(
                f"'{node.name}' feeds {len(node.users)} operations "
                f"({', '.join(u.name for u in node.users)}): a residual addition or a branch, where "
                "copied channels would not add up to the source's function. net2net width supports "
                "plain chains of Linear/Conv(+BatchNorm) layers; use resize=True to widen this model "
                "(an initialisation, not function-preserving)"
            )
        if node.op == "placeholder":
            continue
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, WIDTH_LAYERS) and getattr(mod, "groups", 1) == 1:
                convs = [m for _, m in chain if isinstance(m, WIDTH_LAYERS)]
                if isinstance(mod, nn.Linear) and convs and not isinstance(convs[-1], nn.Linear) and not flat:
                    raise SurgeryError(
                        f"'{node.target}' (Linear) reads a convolution's output without a flatten "
                        "between them: it would mix positions, not channels, so net2net width "
                        "cannot follow the channels into it"
                    )
                chain.append((node.target, mod))
                flat = False
            elif isinstance(mod, WIDTH_NORMS):
                chain.append((node.target, mod))
            elif isinstance(mod, nn.Flatten):
                flat = True
            elif not isinstance(mod, CHANNELWISE):
                raise SurgeryError(
                    f"net2net width cannot carry copied channels through '{node.target}' "
                    f"({type(mod).__name__}): supported are Linear/Conv without groups, BatchNorm and "
                    "element-wise activations, dropout, pooling and flattening between them"
                )
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            if name not in CHANNELWISE_FUNCTIONS or sum(isinstance(a, torch.fx.Node) for a in node.args) != 1:
                raise SurgeryError(
                    f"net2net width cannot carry copied channels through '{node.name}' ({name}): "
                    "only element-wise, pooling and flattening operations may sit between layers"
                )
            flat = flat or name == "flatten"
        else:
            raise SurgeryError(
                f"net2net width does not support the {node.op} '{node.name}' (parameters used outside a module)"
            )
    if not any(isinstance(m, WIDTH_LAYERS) for _, m in chain):
        raise SurgeryError("net2net width found no Linear/Conv layer in the target")
    return chain


def net2net_chain(
    chain: Sequence[tuple[str, nn.Module]], source: dict[str, torch.Tensor], generator: torch.Generator | None = None
) -> dict[str, tuple[torch.Tensor, str]]:
    """Initialise a chain of layers of other widths from the source's: wider by copying channels (net2net-wider,
    function-preserving), narrower by keeping the channels of largest weight norm (not function-preserving).

    The same channel choice is applied to a layer's outputs, its bias, the BatchNorm after it and the next layer's
    inputs (divided by the number of copies when wider), so producer and consumer stay consistent. The last layer's
    outputs are the model's outputs: they must keep the source's width. A Linear after a flattened convolution
    takes each channel's block of ``in_features // channels`` inputs along with the channel.

    Args:
        chain: ``width_chain(target)``.
        source: for each chain parameter/buffer name (``0.weight``, ``1.running_mean``...), the source tensor.
        generator: chooses which channels a wider layer copies.

    Returns:
        target tensor name -> (tensor in the target's shape, transform for the report).

    Raises:
        SurgeryError: a layer has no source tensor, kernel sizes differ, or the outputs' width differs.
    """
    layers = [i for i, (_, m) in enumerate(chain) if isinstance(m, WIDTH_LAYERS)]
    out: dict[str, tuple[torch.Tensor, str]] = {}
    in_idx: torch.Tensor | None = None  # for the current layer's input channels: the source channel each copies
    in_div: torch.Tensor | None = None  # and how many copies of that source channel there are
    prev_ns = 1  # the previous layer's number of source channels
    for pos, i in enumerate(layers):
        name, mod = chain[i]
        if f"{name}.weight" not in source:
            raise SurgeryError(f"net2net width: layer '{name}' has no source weight; every chain layer needs one")
        ws = source[f"{name}.weight"].detach()
        bs = source.get(f"{name}.bias")
        wt = cast(torch.Tensor, mod.weight)  # a Linear/Conv layer (WIDTH_LAYERS)
        if ws.shape[2:] != wt.shape[2:]:
            raise SurgeryError(
                f"net2net width: '{name}' has kernel {tuple(wt.shape[2:])} in the target and "
                f"{tuple(ws.shape[2:])} in the source; only the number of channels may differ"
            )
        # inputs: follow the previous layer's channel choice (a flatten turns a channel into a block of features)
        w = ws
        if in_idx is not None and in_div is not None:
            block = ws.shape[1] // prev_ns if ws.shape[1] % prev_ns == 0 else 0  # flattened: C x positions inputs
            if block * len(in_idx) != wt.shape[1]:
                raise SurgeryError(
                    f"net2net width: '{name}' takes {wt.shape[1]} inputs in the target, which is not "
                    f"{len(in_idx)} channels x {block} positions of the layer before it"
                )
            feat = (in_idx.view(-1, 1) * block + torch.arange(block)).reshape(-1)
            div = in_div.repeat_interleave(block).to(ws.dtype)
            w = ws[:, feat] / div.view(1, -1, *([1] * (ws.dim() - 2)))
        elif ws.shape[1] != wt.shape[1]:
            raise SurgeryError(
                f"net2net width: the first layer '{name}' takes {wt.shape[1]} inputs in the target and "
                f"{ws.shape[1]} in the source; the model's input must keep its width"
            )
        # outputs
        n_s, n_t = ws.shape[0], wt.shape[0]
        nxt = chain[i + 1] if i + 1 < len(chain) and isinstance(chain[i + 1][1], WIDTH_NORMS) else None
        last = pos == len(layers) - 1
        if n_t == n_s:
            idx, how = torch.arange(n_s), "copied"
        elif last:
            raise SurgeryError(
                f"net2net width: the last layer '{name}' gives {n_t} outputs in the target and {n_s} "
                "in the source; the model's outputs must keep their width (a new head is another "
                "step)"
            )
        elif n_t > n_s:
            extra = torch.randint(0, n_s, (n_t - n_s,), generator=generator)
            idx, how = torch.cat([torch.arange(n_s), extra]), f"net2net-wider outputs {n_s}->{n_t} (copied channels)"
        else:
            importance = ws.flatten(1).norm(dim=1)
            if nxt is not None and f"{nxt[0]}.weight" in source:
                importance = importance * source[f"{nxt[0]}.weight"].detach().abs()  # BN scale ~0: channel ~unused
            idx = torch.sort(torch.topk(importance, n_t, sorted=False).indices).values
            how = f"net2net-narrower outputs {n_s}->{n_t} (kept the largest by weight norm; not function-preserving)"
        if w is not ws:  # the inputs follow the previous layer's choice
            grew = wt.shape[1] > ws.shape[1]
            ins = f"inputs {ws.shape[1]}->{wt.shape[1]} " + (
                "(divided among the copies of the previous layer's channels)"
                if grew
                else "(the previous layer's kept channels)"
            )
            if n_t == n_s:
                how = f"net2net-{'wider' if grew else 'narrower'} {ins}"
            else:
                how = f"{how}, {ins}"
        elif n_t == n_s:
            how = "copied"
        out[f"{name}.weight"] = (w[idx].contiguous(), how)
        per_channel = "copied" if n_t == n_s else how.split(", inputs")[0]  # a bias or BatchNorm: outputs only
        if bs is not None and getattr(mod, "bias", None) is not None:
            out[f"{name}.bias"] = (bs.detach()[idx].contiguous(), per_channel)
        if nxt is not None:
            for part in ("weight", "bias", "running_mean", "running_var"):
                key = f"{nxt[0]}.{part}"
                if key in source and getattr(nxt[1], part, None) is not None:
                    out[key] = (source[key].detach()[idx].contiguous(), per_channel)
        in_idx = idx
        in_div = torch.bincount(idx, minlength=n_s)[idx] if n_t > n_s else torch.ones(len(idx), dtype=torch.long)
        prev_ns = n_s
    return out


# ----------------------------------------------------------------------------------------------------------------
# Single tensors whose shapes differ (used by the transfer when a matched pair needs adapting)


def slice_or_tile(tensor: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, str]:
    """Fit ``tensor`` to ``shape`` (same number of dimensions): leading slice where smaller, cyclic tiling where
    larger. An initialisation, not function-preserving: used only when the caller asks for ``resize``."""
    if tensor.dim() != len(shape):
        raise SurgeryError(f"cannot fit {tuple(tensor.shape)} to {tuple(shape)}: different number of dimensions")
    out = tensor
    for d, n in enumerate(shape):
        idx = torch.arange(n) % tensor.shape[d]
        out = out.index_select(d, idx)
    smaller = any(n < s for n, s in zip(shape, tensor.shape))
    larger = any(n > s for n, s in zip(shape, tensor.shape))
    how = "sliced and tiled" if smaller and larger else "sliced" if smaller else "tiled"
    return out.clone(), f"{how} {tuple(tensor.shape)}->{tuple(shape)}"
