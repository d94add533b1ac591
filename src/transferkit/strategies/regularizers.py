"""Regularisers of fine-tuning, as penalties the objective adds to the loss.

Each is a config dataclass (validated in ``__post_init__``) and an ``nn.Module`` ``penalty(model, features)``.
They combine with any parameter selection: ``strategy: l2sp`` is ``full`` + L2-SP, and
``train.regularizer: {name: l2sp, alpha: 0.01}`` adds L2-SP to any other strategy (``lp_ft``, ``llrd``...).
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from transferkit.registry import Registry
from transferkit.specs import parse_spec


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside its wrappers: DDP's (``module``) and ``torch.compile``'s (``_orig_mod``), in any order, so
    what reads parameters by name sees the model's own names (``backbone.x``, not ``_orig_mod.backbone.x``)."""
    inner = model
    while True:
        wrapped = next((inner._modules[k] for k in ("_orig_mod", "module") if inner._modules.get(k) is not None), None)
        if wrapped is None:
            return inner
        inner = wrapped


@dataclass
class L2SPConfig:
    """L2-SP (Li et al. 2018): ``alpha/2 ||w - w0||^2`` on transferred weights + ``beta/2 ||w||^2`` on new ones.

    Attributes:
        alpha: strength of the pull towards the source weights ``w0``.
        beta: plain L2 on weights that have no source counterpart (the new head).
    """

    alpha: float = 0.01
    beta: float = 0.01

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"l2sp alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")


class L2SP(nn.Module):
    """The L2-SP penalty.

    Args:
        reference: the starting point ``w0`` by parameter name (of the trained module). These are references to
            the source's tensors, not copies; a parameter whose name is missing or whose shape differs is "new".
            ``train`` passes the transferred weights only, so the new head is always "new".
        alpha: see L2SPConfig.
        beta: see L2SPConfig.
    """

    needs_features = False

    def __init__(self, reference: dict[str, torch.Tensor], alpha: float, beta: float):
        super().__init__()
        self.reference = reference  # a plain dict: not buffers, so never moved, copied or saved with the model
        self.alpha = alpha
        self.beta = beta

    def forward(self, model: nn.Module, features: torch.Tensor | None = None, **batch: Any) -> torch.Tensor:
        transferred, new = [], []
        for name, w in unwrap(model).named_parameters():
            if not w.requires_grad:
                continue
            w0 = self.reference.get(name)
            if w0 is not None and w0.shape == w.shape:
                transferred.append((w - w0.to(w.device, w.dtype)).pow(2).sum())
            else:
                new.append(w.pow(2).sum())
        zero = next(unwrap(model).parameters()).new_zeros(())
        return self.alpha / 2 * sum(transferred, zero) + self.beta / 2 * sum(new, zero)


@dataclass
class BSSConfig:
    """Batch Spectral Shrinkage (Chen et al. 2019): ``weight * sum of the k smallest squared singular values``
    of the batch feature matrix, which suppresses the feature directions that transfer negatively.

    Attributes:
        k: how many of the smallest singular values are shrunk.
        weight: the penalty's weight (eta in the paper; 0.001 there).
    """

    k: int = 1
    weight: float = 0.001

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"bss k must be >= 1, got {self.k}")
        if self.weight < 0:
            raise ValueError(f"bss weight must be >= 0, got {self.weight}")


class BSS(nn.Module):
    """The BSS penalty on the pooled features of a batch."""

    needs_features = True

    def __init__(self, k: int, weight: float):
        super().__init__()
        self.k = k
        self.weight = weight

    def forward(self, model: nn.Module, features: torch.Tensor | None = None, **batch: Any) -> torch.Tensor:
        if features is None:
            raise ValueError("BSS needs the batch features")
        singular = torch.linalg.svdvals(features.float())  # descending
        k = min(self.k, singular.numel())
        return self.weight * singular[-k:].pow(2).sum()


@dataclass
class DeltaConfig:
    """DELTA (Li et al. 2019): keep the target's feature maps near the frozen source's on the same inputs,
    ``alpha/2 * sum_layers sum_channels w_c * mean ||FM_c(w, x) - FM_c(w0, x)||^2``, plus ``beta/2 ||w||^2`` on the
    new head. With ``attention``, the channel weights ``w_c`` are a softmax over how much the loss grows when the
    channel is removed from the source network, as the method describes: a linear probe is fitted on the frozen
    source's features of ``attention_examples`` training examples, then each channel of each layer is zeroed in
    turn and the probe's loss increase on those examples measured. The weights are computed once, before the first
    step, and kept in the checkpoint (a resumed run uses the same ones); without attention all ``w_c = 1``.

    Feature maps are ``(batch, channels, ...)`` for image networks. For a tokenized text batch the outputs of
    transformer layers are ``(batch, tokens, hidden)``: there the channels are the hidden units, averaged over the
    tokens (padding included: it is computed by both networks alike). A layer returning a tuple (transformers
    layers) is compared on its first element, the hidden states.

    Attributes:
        alpha: weight of the feature-map distance.
        beta: plain L2 on weights without a source counterpart.
        layers: backbone module names whose outputs are compared; default: the outputs of the layer groups'
            last modules (for timm models, each stage).
        attention: weight channels by their importance to the source network (costs one forward pass of the
            attention examples per channel, once); image networks only.
        attention_examples: the training examples (unaugmented, the first of the split) the probe is fitted on and
            the channels are scored on.
    """

    alpha: float = 0.01
    beta: float = 0.01
    layers: list[str] | None = None
    attention: bool = False
    attention_examples: int = 64

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"delta alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
        if self.attention_examples < 2:
            raise ValueError(f"delta attention_examples must be >= 2, got {self.attention_examples}")


class Delta(nn.Module):
    """The DELTA penalty.

    Args:
        source: the frozen source backbone (a reference: never trained, in eval mode, outside DDP, no gradients).
        layers: backbone module names to compare.
        reference: starting weights by name (for the ``beta`` term on new weights).
        alpha: see DeltaConfig.
        beta: see DeltaConfig.
        attention: see DeltaConfig.
        attention_batch: ``(inputs, labels)`` of training examples the channel weights are measured on (needed with
            ``attention``).
    """

    needs_features = False
    source: nn.Module  # set with object.__setattr__ in __init__: not a submodule

    def __init__(
        self,
        source: nn.Module,
        layers: list[str],
        reference: dict[str, torch.Tensor],
        alpha: float,
        beta: float,
        attention: bool = False,
        attention_batch: tuple[Any, torch.Tensor] | None = None,
    ):
        super().__init__()
        object.__setattr__(self, "source", source)  # not a submodule: not moved, saved or wrapped with the model
        source.eval().requires_grad_(False)
        if attention and attention_batch is None:
            raise ValueError(
                "delta attention measures the source's channels on training examples: pass attention_batch "
                "(inputs, labels), or train through transferkit.train / transferkit run, which pass it"
            )
        if attention and isinstance(attention_batch[0] if attention_batch else None, dict):
            raise ValueError(
                "delta attention weighs the channels of convolutional feature maps; for a text backbone use delta "
                "without attention"
            )
        self.layers = layers
        self.alpha, self.beta, self.attention = alpha, beta, attention
        self.attention_batch = attention_batch
        self.new_weights = L2SP(reference, 0.0, beta)
        self.weights: dict[str, torch.Tensor] | None = None
        self._hooked: nn.Module | None = None
        self._maps: dict[str, torch.Tensor] = {}

    def _hook(self, backbone: nn.Module, store: dict[str, torch.Tensor]) -> list[Any]:
        handles = []
        for name in self.layers:
            try:
                module = backbone.get_submodule(name)
            except AttributeError as e:
                raise ValueError(f"delta layer '{name}' is not a module of the backbone") from e
            handles.append(
                module.register_forward_hook(
                    lambda m, i, o, n=name: store.__setitem__(n, o[0] if isinstance(o, tuple) else o)
                )
            )
        return handles

    @torch.no_grad()
    def _source_maps(self, x: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}
        handles = self._hook(self.source, store)
        try:
            self.source(x)
        finally:
            for h in handles:
                h.remove()
        return store

    def _probe(self, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
        """A linear classifier of the target's classes on the frozen source's features (L-BFGS from zeros, a little
        L2: deterministic): what the channel scores measure the source's loss with."""
        import torch.nn.functional as F

        with torch.no_grad():
            features = self.source(x)
        probe = nn.Linear(features.shape[1], int(y.max()) + 1).to(features.device)
        nn.init.zeros_(probe.weight)
        nn.init.zeros_(probe.bias)
        optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(probe(features), y) + 1e-3 * probe.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return probe.eval().requires_grad_(False)

    @torch.no_grad()
    def _channel_attention(self, head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax over channels of the loss increase when a channel of the source is zeroed (Li et al. 2019), the
        loss of ``head`` (a probe fitted on the source's features) on ``x``, ``y``."""
        import torch.nn.functional as F

        base = F.cross_entropy(head(self.source(x)), y)
        weights = {}
        for name in self.layers:
            module = self.source.get_submodule(name)
            channels = self._source_maps(x[:1])[name].shape[1]
            increase = torch.zeros(channels)
            for c in range(channels):

                def drop(m: nn.Module, i: Any, o: torch.Tensor, c: int = c) -> torch.Tensor:
                    o = o.clone()
                    o[:, c] = 0
                    return o

                h = module.register_forward_hook(drop)
                try:
                    increase[c] = F.cross_entropy(head(self.source(x)), y) - base
                finally:
                    h.remove()
            weights[name] = torch.softmax(increase, dim=0) * channels  # mean weight 1, like the unweighted form
        return weights

    def fit_attention(self, device: Any = None) -> dict[str, torch.Tensor]:
        """The channel weights from ``attention_batch``: a probe on the source's features, then each channel's
        loss increase when zeroed (computed on ``device``; returned on the CPU)."""
        from transferkit.engine.loop import to_device

        assert self.attention_batch is not None
        device = device or next(self.source.parameters()).device
        x, y = (to_device(t, device) for t in self.attention_batch)
        weights = self._channel_attention(self._probe(x, y), x, y)
        return {k: v.cpu() for k, v in weights.items()}

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this penalty: the channel weights, once measured."""
        return {"delta_weights": self.weights} if self.weights else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("delta_weights"):
            self.weights = dict(state["delta_weights"])

    def prepare(self, model: nn.Module) -> None:
        """Before the objective's forward: hooks on the trained backbone catch its feature maps during it."""
        target = unwrap(model)
        if self._hooked is not target:
            self._hook(cast(nn.Module, target.backbone), self._maps)
            self._hooked = target

    def forward(
        self,
        model: nn.Module,
        features: torch.Tensor | None = None,
        *,
        inputs: torch.Tensor | dict[str, torch.Tensor],
        targets: torch.Tensor | None = None,
        **batch: Any,
    ) -> torch.Tensor:
        target = unwrap(model)
        tokens = isinstance(inputs, dict)  # a tokenized batch: hidden units are the last dimension
        device = next(target.parameters()).device  # where the inputs and the target's maps are
        if next(self.source.parameters()).device != device:
            self.source.to(device)
        if self.weights is None:  # once, before the first step (a resumed run reads them from its checkpoint)
            self.weights = self.fit_attention(device) if self.attention else {}
        source_maps = self._source_maps(inputs)
        total = torch.zeros((), device=device)
        for name in self.layers:
            diff = (self._maps[name] - source_maps[name]).pow(2)
            if tokens and diff.ndim > 2:
                per_channel = diff.flatten(0, -2).mean(0)
            else:
                per_channel = diff.flatten(2).mean(-1).mean(0) if diff.ndim > 2 else diff.mean(0)
            w = self.weights.get(name)
            total = total + (per_channel * w.to(per_channel.device) if w is not None else per_channel).sum()
        return self.alpha / 2 * total + self.new_weights(model)


def default_delta_layers(backbone: nn.Module) -> list[str]:
    """The output of each stage: timm's ``blocks.N``, a transformers encoder's ``...encoder.layer.N`` (else the
    backbone's top-level children)."""
    names = [n for n, _ in backbone.named_children()]
    if "blocks" in names:
        return [f"blocks.{i}" for i in range(len(cast(Sized, backbone.get_submodule("blocks"))))]
    for name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers") and len(module):
            return [f"{name}.{i}" for i in range(len(module))]
    return [n for n, m in backbone.named_children() if any(True for _ in m.parameters())]


# name -> (config dataclass, builder(config, reference, source backbone) -> penalty module)
REGULARIZERS: Registry[tuple[type, Callable[..., nn.Module]]] = Registry("regularizer")
REGULARIZERS.register("l2sp", help="pull transferred weights towards the source (Li et al. 2018)")(
    (L2SPConfig, lambda c, ref, src: L2SP(ref, c.alpha, c.beta))
)
REGULARIZERS.register("bss", help="shrink the smallest singular values of batch features (Chen et al. 2019)")(
    (BSSConfig, lambda c, ref, src: BSS(c.k, c.weight))
)
REGULARIZERS.register("delta", help="keep feature maps near the frozen source's (Li et al. 2019)")(
    (
        DeltaConfig,
        lambda c, ref, src, batch=None: Delta(
            src, c.layers or default_delta_layers(src), ref, c.alpha, c.beta, c.attention, batch
        ),
    )
)


def regularizer_config(spec: str | dict[str, Any]) -> tuple[str, Any]:
    """Name and validated config from ``"l2sp"`` or ``{name: l2sp, alpha: 0.1}``."""
    name, _, cfg = parse_spec(spec, REGULARIZERS, lambda entry: entry[0])
    return name, cfg


def build_penalties(
    specs: list[tuple[str, dict[str, Any]]],
    reference: dict[str, torch.Tensor],
    source: nn.Module | None = None,
    examples: Callable[[int], tuple[Any, torch.Tensor]] | None = None,
) -> list[nn.Module]:
    """Penalty modules for ``specs``; ``source`` is the frozen source backbone (needed by ``delta``); ``examples(n)``
    gives ``(inputs, labels)`` of ``n`` unaugmented training examples (``delta`` with attention measures on them)."""
    out = []
    for name, options in specs:
        _, cfg = regularizer_config({"name": name, **options})
        if name == "delta" and source is None:
            raise ValueError("delta needs the source network: pass train(..., source=...) or use transferkit run")
        if name == "delta" and cfg.attention:
            if examples is None:
                raise ValueError("delta attention measures the source on training examples: pass examples")
            out.append(REGULARIZERS.get(name)[1](cfg, reference, source, examples(cfg.attention_examples)))
            continue
        out.append(REGULARIZERS.get(name)[1](cfg, reference, source))
    return out
