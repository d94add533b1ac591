"""Inference with batch norms folded into the convolutions before them.

In eval mode a batch norm is a fixed per-channel affine map, so after a convolution it can be merged into the
convolution's weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_weights``) and dropped. What is saved is a
full pass over every activation for every batch norm: a large share of the time of networks with many cheap
depthwise convolutions (EfficientNets), a small one where convolutions dominate (ResNets), which then pay only
the per-pass cost of folding. ``bench/fold_bn.py`` measures it; the figures are in ``docs/benchmarks.md``.

``with folded_batch_norms(model) as run:`` gives a callable that is called like the model, batch by batch, for
one pass over a dataset (the weights must not change during the pass: ``predict_logits`` and ``compute_features``
fold once per pass). Before the first batch it runs the model on the batch's first two examples, with hooks that
find each batch norm whose input is exactly the output tensor of the convolution called just before it (so
nothing else ran between them), each called once. It folds those pairs in place - new weight and bias parameters
for the convolutions, the norms taken out of their parents - runs the model again on the same two examples, and
keeps the fold only if the outputs agree to ``FOLD_RTOL`` of their largest magnitude. A fold that would be wrong
(the convolution's output also used elsewhere, say) shows up there, and is undone at once. On leaving the block
the model's own parameter and module objects are put back. Folding in place instead of in a copy matters: a copy
of the model costs about as much as a forward pass of a batch (docs/benchmarks.md).

Folded: convolutions (1-, 2- and 3-D, not transposed) followed by ``nn.BatchNorm1d/2d/3d`` with running
statistics, or by timm's ``BatchNormAct2d`` (its dropout and activation stay). Models without such a pair
(transformers, MLPs) run unchanged and are not copied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_weights

FOLD_RTOL = 1e-3  # folded outputs must agree with the model's to this fraction of their largest magnitude
_CHECK_EXAMPLES = 2  # examples of the first batch the fold is checked on


def _without_norm(bn: nn.Module) -> nn.Module | None:
    """What replaces a batch norm once it is folded: nothing, or what runs after the norm inside the module.

    None for batch-norm classes whose forward does more than we know (they are left unfolded).
    """
    if type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return nn.Identity()
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if type(bn) is BatchNormAct2d:  # F.batch_norm, then self.drop, then self.act
        return nn.Sequential(bn.drop, bn.act)
    return None


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, _ConvNd)
        and not conv.transposed
        and isinstance(bn, _BatchNorm)
        and not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
        and conv.out_channels == bn.num_features
        and _without_norm(bn) is not None
    )


def has_foldable_layers(model: nn.Module) -> bool:
    """Whether ``model`` has both a convolution and a batch norm that could be folded (cheap: no forward pass)."""
    mods = list(model.modules())
    return any(isinstance(m, _ConvNd) and not m.transposed for m in mods) and any(
        isinstance(m, _BatchNorm) and _without_norm(m) is not None for m in mods
    )


def conv_bn_pairs(model: nn.Module, inputs: Any) -> tuple[list[tuple[str, str]], Any]:
    """Run ``model(inputs)`` and find (convolution, batch norm) names where the norm took the convolution's output.

    A pair counts only when the norm's input is the very tensor the convolution called just before it returned,
    both modules are called once in the forward pass, and ``_foldable`` holds. Returns the pairs and the model's
    output (the reference the folded model is checked against).
    """
    names = {m: n for n, m in model.named_modules()}
    calls: dict[nn.Module, int] = {}
    last: list[Any] = [None, None]  # the convolution called last, and its output
    found: list[tuple[nn.Module, nn.Module]] = []

    def after_conv(mod: nn.Module, _inp: Any, out: Any) -> None:
        calls[mod] = calls.get(mod, 0) + 1
        last[0], last[1] = mod, out

    def before_norm(mod: nn.Module, inp: tuple[Any, ...]) -> None:
        calls[mod] = calls.get(mod, 0) + 1
        if inp and last[1] is not None and inp[0] is last[1]:
            found.append((last[0], mod))
        last[0], last[1] = None, None

    hooks = []
    try:  # registered inside: hooks already added are removed if a later one cannot be (a scripted module)
        for m in names:
            if isinstance(m, _ConvNd):
                hooks.append(m.register_forward_hook(after_conv))
            elif isinstance(m, _BatchNorm):
                hooks.append(m.register_forward_pre_hook(before_norm))
        out = model(inputs)
    finally:
        for h in hooks:
            h.remove()
    pairs = [(names[c], names[b]) for c, b in found if calls[c] == 1 and calls[b] == 1 and _foldable(c, b)]
    return pairs, out


class _Folded:
    """What ``folded_batch_norms`` yields: calls the model, folding it on the first call; ``restore`` undoes it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pairs: list[tuple[str, str]] | None = None if has_foldable_layers(model) else []
        self._undo: list[tuple[nn.Module, str, Any]] = []  # (module, attribute, original value), in order

    def __call__(self, inputs: Any) -> Any:
        if self.pairs is None:  # the first batch: fold, checked on its first examples
            self.pairs = []
            head = _first(inputs, _CHECK_EXAMPLES)
            try:
                pairs, reference = conv_bn_pairs(self.model, head)
            except Exception:  # the batch itself will raise the model's error, without the hooks in the way
                pairs = []
            if pairs:
                self._fold(pairs)
                if agrees(self.model(head), reference):
                    self.pairs = pairs
                else:
                    self.restore()
        return self.model(inputs)

    def _set(self, module: nn.Module, attr: str, value: Any) -> None:
        self._undo.append((module, attr, getattr(module, attr)))
        setattr(module, attr, value)

    def _fold(self, pairs: list[tuple[str, str]]) -> None:
        mods = dict(self.model.named_modules())
        with torch.no_grad():
            for conv_name, bn_name in pairs:
                conv, bn = mods[conv_name], mods[bn_name]
                weight, bias = fuse_conv_bn_weights(
                    conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
                )
                # empty_like keeps the weights' memory layout (channels-last inside conv_layout)
                self._set(conv, "weight", nn.Parameter(torch.empty_like(conv.weight).copy_(weight), False))
                self._set(conv, "bias", nn.Parameter(bias.detach(), False))
                parent, _, attr = bn_name.rpartition(".")
                self._set(mods[parent], attr, _without_norm(bn))

    def restore(self) -> None:
        """Put back every original weight, bias and batch norm (the very objects: optimizers keep theirs)."""
        for module, attr, value in reversed(self._undo):
            setattr(module, attr, value)
        self._undo.clear()


@contextlib.contextmanager
def folded_batch_norms(model: nn.Module) -> Iterator[Callable[[Any], Any]]:
    """Within the block, a callable that runs ``model`` with its batch norms folded (see the module docstring).

    ``model`` must be in eval mode and its weights must not change inside the block. The fold happens on the
    first call, in place; on leaving the block (also on an exception) the model's own parameters and modules are
    put back, the very objects (an optimizer holding them is not disturbed). The callable's ``pairs`` lists the
    (convolution, batch norm) names folded, [] when none.
    """
    run = _Folded(model)
    try:
        yield run
    finally:
        run.restore()


def folded_for_pass(model: nn.Module, num_examples: int, batch_size: int) -> Any:
    """``folded_batch_norms(model)`` for a pass of more than one batch; for one batch, the model as it is.

    Folding costs about one small forward pass and the fused weights, which one batch does not earn back (``fit``
    validates on a few examples in ``bench/engine_overhead.py``). Either way the block yields a callable that runs
    the model.
    """
    return folded_batch_norms(model) if num_examples > batch_size else contextlib.nullcontext(model)


def _first(x: Any, n: int) -> Any:
    if isinstance(x, dict):
        return {k: v[:n] for k, v in x.items()}
    return x[:n]


def agrees(folded: Any, reference: Any, rtol: float = FOLD_RTOL) -> bool:
    """Whether two outputs (tensors) have the same shape and differ by at most ``rtol`` of the reference's
    largest magnitude."""
    if not (isinstance(folded, torch.Tensor) and isinstance(reference, torch.Tensor)):
        return False
    if folded.shape != reference.shape or not torch.isfinite(reference).all():
        return False
    folded, reference = folded.detach().float(), reference.detach().float()
    scale = float(reference.abs().max())
    return float((folded - reference).abs().max()) <= rtol * max(scale, 1e-12)
