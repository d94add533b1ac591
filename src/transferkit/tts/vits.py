"""VITS (Kim et al. 2021, "Conditional Variational Autoencoder with Adversarial Learning for End-to-End
Text-to-Speech") for inference, in PyTorch, with the module names of the reference implementation so that an ONNX
export's initializers (``enc_p.encoder.attn_layers.0.conv_q.weight``...) load by name.

Inference path (paper section 2.5 and appendix):

    phoneme ids ─▶ text encoder (transformer with relative positions) ─▶ prior mean/log-std per phoneme
               └─▶ stochastic duration predictor (a normalising flow run backwards from noise) ─▶ frames per phoneme
    prior stats expanded to frames ─▶ z_p = m + noise * exp(logs) * noise_scale ─▶ flow backwards ─▶ z
    z ─▶ HiFi-GAN generator ─▶ waveform

Only what inference runs is built: no posterior encoder (``enc_q``), no posterior flows of the duration predictor,
no discriminator; the duration predictor's first coupling flow (``dp.flows.1``), which the inference direction skips
("a useless vflow" the reference drops), is a parameterless placeholder, so the module holds exactly the tensors
an inference export holds. Weight norm is not applied (exports remove it).

Randomness is an explicit input: ``infer`` takes the two noise tensors (or a ``torch.Generator`` that draws them)
and returns the noise it used, so the same noise can be fed to another implementation (ONNX Runtime) for parity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.1  # HiFi-GAN's slope inside the generator (the last activation uses PyTorch's default 0.01)


@dataclass(frozen=True)
class VitsConfig:
    """Architecture of a VITS voice (defaults: a Piper "medium" voice such as en_US-joe-medium).

    Attributes:
        n_vocab: phoneme id vocabulary size (rows of the embedding).
        hidden: channels of the text encoder, the duration predictor input and the flow.
        inter: channels of the latent z (the prior's mean/log-std each have this many).
        filter: inner channels of the text encoder's feed-forward layers.
        n_heads: attention heads of the text encoder.
        n_layers: transformer layers of the text encoder.
        kernel: kernel size of the text encoder's feed-forward convolutions.
        window: relative-position window of the attention (positions -window..window have embeddings).
        dp_filter: channels of the stochastic duration predictor.
        dp_kernel: kernel size of its dilated depthwise-separable convolutions.
        dp_layers: layers of each such convolution stack.
        dp_flows: coupling flows of the duration predictor (one of which inference skips).
        dp_bins: bins of its rational-quadratic splines.
        dp_tail: the splines act on [-dp_tail, dp_tail] and are the identity outside.
        flow_couplings: residual coupling layers of the flow.
        flow_kernel: kernel of their WaveNet convolutions.
        flow_layers: WaveNet layers per coupling.
        up_initial: channels entering the generator's first upsampling.
        up_rates: upsampling factors (their product is the hop length: samples per frame).
        up_kernels: transposed-convolution kernel sizes.
        res_kernels: kernels of the multi-receptive-field residual blocks (one block per kernel per upsampling).
        res_dilations: dilations of each residual block's convolutions (HiFi-GAN's ResBlock2: one conv per dilation).
    """

    n_vocab: int = 256
    hidden: int = 192
    inter: int = 192
    filter: int = 768
    n_heads: int = 2
    n_layers: int = 6
    kernel: int = 3
    window: int = 4
    dp_filter: int = 192
    dp_kernel: int = 3
    dp_layers: int = 3
    dp_flows: int = 4
    dp_bins: int = 10
    dp_tail: float = 5.0
    flow_couplings: int = 4
    flow_kernel: int = 5
    flow_layers: int = 4
    up_initial: int = 256
    up_rates: tuple[int, ...] = (8, 8, 4)
    up_kernels: tuple[int, ...] = (16, 16, 8)
    res_kernels: tuple[int, ...] = (3, 5, 7)
    res_dilations: tuple[tuple[int, ...], ...] = field(default=((1, 2), (2, 6), (3, 12)))

    def __post_init__(self) -> None:
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})")
        if len(self.up_rates) != len(self.up_kernels):
            raise ValueError(f"up_rates {self.up_rates} and up_kernels {self.up_kernels} must have the same length")
        if len(self.res_kernels) != len(self.res_dilations):
            raise ValueError(f"res_kernels {self.res_kernels} and res_dilations {self.res_dilations} differ in length")

    @property
    def hop(self) -> int:
        """Waveform samples per latent frame."""
        return math.prod(self.up_rates)


@dataclass
class VitsOutput:
    """What ``VITS.infer`` produced.

    Attributes:
        wave: (batch, samples) float waveform in [-1, 1]; item b is valid up to ``lengths[b]``.
        lengths: samples per item.
        durations: (batch, phonemes) frames given to each phoneme.
        noise_dp: (batch, 2, phonemes) the standard-normal noise the duration predictor started from.
        noise_z: (batch, inter, frames) the standard-normal noise of the prior sample.
    """

    wave: torch.Tensor
    lengths: torch.Tensor
    durations: torch.Tensor
    noise_dp: torch.Tensor
    noise_z: torch.Tensor


def sequence_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(batch, max_len) float mask: 1 where the position is inside the item."""
    return (torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]).float()


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of a (batch, channels, time) tensor (VITS names its parameters gamma/beta)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.transpose(1, -1), (x.shape[1],), self.gamma, self.beta, self.eps).transpose(1, -1)


# ----------------------------------------------------------------------------------------------------------------
# Text encoder: a transformer whose attention adds learned relative-position terms (Shaw et al. 2018) to keys and
# values, with windowed embeddings shared by the heads


class RelativeAttention(nn.Module):
    """Multi-head self-attention with relative positions in [-window, window] (beyond it: no positional term)."""

    def __init__(self, channels: int, n_heads: int, window: int):
        super().__init__()
        self.n_heads, self.window, self.k_channels = n_heads, window, channels // n_heads
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)
        scale = self.k_channels**-0.5
        self.emb_rel_k = nn.Parameter(torch.randn(1, 2 * window + 1, self.k_channels) * scale)
        self.emb_rel_v = nn.Parameter(torch.randn(1, 2 * window + 1, self.k_channels) * scale)

    def _relative_index(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, t) index into the 2w+1 relative embeddings for the offset j - i, and whether it is in the window."""
        pos = torch.arange(t, device=device)
        offset = pos[None, :] - pos[:, None]
        inside = offset.abs() <= self.window
        return (offset.clamp(-self.window, self.window) + self.window), inside

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        h, d = self.n_heads, self.k_channels
        q = self.conv_q(x).view(b, h, d, t).transpose(2, 3) / math.sqrt(d)  # (b, h, t, d)
        k = self.conv_k(x).view(b, h, d, t).transpose(2, 3)
        v = self.conv_v(x).view(b, h, d, t).transpose(2, 3)
        index, inside = self._relative_index(t, x.device)
        scores = q @ k.transpose(-2, -1)
        # query i against relative key (j - i): q_i . e_{j-i}, zero outside the window
        rel_logits = q @ self.emb_rel_k[0].transpose(0, 1)  # (b, h, t, 2w+1)
        scores = scores + torch.gather(rel_logits, 3, index.expand(b, h, t, t)) * inside
        scores = scores.masked_fill(attn_mask == 0, -1e4)
        p = torch.softmax(scores, dim=-1)
        out = p @ v
        # the same offsets weight the relative value embeddings: sum_j p_ij e_{j-i}
        rel_weights = torch.zeros(b, h, t, 2 * self.window + 1, dtype=p.dtype, device=p.device)
        rel_weights = rel_weights.scatter_add(3, index.expand(b, h, t, t), p * inside)
        out = out + rel_weights @ self.emb_rel_v[0]
        return self.conv_o(out.transpose(2, 3).reshape(b, c, t))


class FeedForward(nn.Module):
    """Two convolutions with a ReLU between them, masked before each (padding must not leak into the sequence)."""

    def __init__(self, channels: int, filter_channels: int, kernel: int):
        super().__init__()
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel, padding=kernel // 2)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv_1(x * mask))
        return self.conv_2(x * mask) * mask


class TransformerEncoder(nn.Module):
    """Post-norm transformer layers (attention, then feed-forward, each with a residual and a ChannelNorm)."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        n = cfg.n_layers
        self.attn_layers = nn.ModuleList([RelativeAttention(cfg.hidden, cfg.n_heads, cfg.window) for _ in range(n)])
        self.norm_layers_1 = nn.ModuleList([ChannelNorm(cfg.hidden) for _ in range(n)])
        self.ffn_layers = nn.ModuleList([FeedForward(cfg.hidden, cfg.filter, cfg.kernel) for _ in range(n)])
        self.norm_layers_2 = nn.ModuleList([ChannelNorm(cfg.hidden) for _ in range(n)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn_mask = mask.unsqueeze(2) * mask.unsqueeze(-1)  # (b, 1, t, t)
        x = x * mask
        for attn, norm1, ffn, norm2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2):
            x = norm1(x + attn(x, attn_mask))
            x = norm2(x + ffn(x, mask))
        return x * mask


class TextEncoder(nn.Module):
    """Phoneme ids -> hidden states and the prior's per-phoneme mean and log-std (paper eq. 4)."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.hidden, self.inter = cfg.hidden, cfg.inter
        self.emb = nn.Embedding(cfg.n_vocab, cfg.hidden)
        nn.init.normal_(self.emb.weight, 0.0, cfg.hidden**-0.5)
        self.encoder = TransformerEncoder(cfg)
        self.proj = nn.Conv1d(cfg.hidden, 2 * cfg.inter, 1)

    def forward(
        self, ids: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (self.emb(ids) * math.sqrt(self.hidden)).transpose(1, 2)  # (b, hidden, t)
        mask = sequence_mask(lengths, ids.shape[1]).unsqueeze(1)
        x = self.encoder(x * mask, mask)
        m, logs = torch.split(self.proj(x) * mask, self.inter, dim=1)
        return x, m, logs, mask


# ----------------------------------------------------------------------------------------------------------------
# Stochastic duration predictor (paper section 2.2.2): a flow from noise to log-durations, conditioned on the text


class DDSConv(nn.Module):
    """Dilated depthwise-separable convolutions (dilation kernel**i), each with norms, GELU and a residual."""

    def __init__(self, channels: int, kernel: int, n_layers: int):
        super().__init__()
        dil = [kernel**i for i in range(n_layers)]
        self.convs_sep = nn.ModuleList(
            [
                nn.Conv1d(channels, channels, kernel, groups=channels, dilation=d, padding=d * (kernel - 1) // 2)
                for d in dil
            ]
        )
        self.convs_1x1 = nn.ModuleList([nn.Conv1d(channels, channels, 1) for _ in dil])
        self.norms_1 = nn.ModuleList([ChannelNorm(channels) for _ in dil])
        self.norms_2 = nn.ModuleList([ChannelNorm(channels) for _ in dil])

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        if g is not None:
            x = x + g
        for sep, one, n1, n2 in zip(self.convs_sep, self.convs_1x1, self.norms_1, self.norms_2):
            y = F.gelu(n1(sep(x * mask)))
            y = F.gelu(n2(one(y)))
            x = x + y
        return x * mask


class ElementwiseAffine(nn.Module):
    """y = m + exp(logs) * x per channel; inference runs it backwards."""

    def __init__(self, channels: int):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(channels, 1))
        self.logs = nn.Parameter(torch.zeros(channels, 1))

    def reverse(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (x - self.m) * torch.exp(-self.logs) * mask


class Flip(nn.Module):
    """Reverses the channel order, so the next coupling transforms the other half."""

    def reverse(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return torch.flip(x, [1])


class SkippedFlow(nn.Module):
    """Place of a flow the inference direction never runs (the reference drops ``dp.flows.1``); holds nothing."""

    def reverse(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return x


def _bins(unnormalised: torch.Tensor, bound: float, min_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Knot positions (K+1) and bin sizes (K) on [-bound, bound], each bin at least ``min_size`` of the range."""
    k = unnormalised.shape[-1]
    sizes = min_size + (1 - min_size * k) * torch.softmax(unnormalised, dim=-1)
    inner = -bound + 2 * bound * torch.cumsum(sizes, dim=-1)[..., :-1]
    edge = torch.full_like(inner[..., :1], bound)
    knots = torch.cat([-edge, inner, edge], dim=-1)  # the ends exactly at +-bound, whatever the rounding
    return knots, knots[..., 1:] - knots[..., :-1]


def rational_quadratic_inverse(
    y: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    bound: float,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> torch.Tensor:
    """Inverse of a monotonic rational-quadratic spline with linear tails (Durkan et al. 2019, "Neural Spline
    Flows", section 3.1 and appendix A): inside [-bound, bound] the spline, outside the identity.

    Args:
        y: values to invert, any shape S.
        widths, heights: (*S, K) unnormalised bin widths and heights.
        derivatives: (*S, K-1) unnormalised derivatives at the inner knots; the boundary derivatives are 1, so
            the spline meets the identity tails smoothly.
    """
    inside = (y >= -bound) & (y <= bound)
    yc = y.clamp(-bound, bound)  # outside values take the identity; clamping keeps their (unused) spline finite
    xk, w = _bins(widths, bound, min_width)
    yk, h = _bins(heights, bound, min_height)
    d = min_derivative + F.softplus(derivatives)
    one = torch.ones_like(d[..., :1])
    d = torch.cat([one, d, one], dim=-1)
    # the bin of each y: the last knot is nudged up so y == bound falls in the last bin
    locs = torch.cat([yk[..., :-1], yk[..., -1:] + 1e-6], dim=-1)
    k = (yc[..., None] >= locs).sum(dim=-1, keepdim=True) - 1
    k = k.clamp(0, w.shape[-1] - 1)

    def at(t: torch.Tensor) -> torch.Tensor:
        return torch.gather(t, -1, k)[..., 0]

    x0, wk, y0, hk, dk, dk1 = at(xk), at(w), at(yk), at(h), at(d), at(d[..., 1:])
    sk = hk / wk
    dy = yc - y0
    # solve the quadratic a xi^2 + b xi + c = 0 for xi in [0, 1] (the numerically stable root)
    a = hk * (sk - dk) + dy * (dk1 + dk - 2 * sk)
    b = hk * dk - dy * (dk1 + dk - 2 * sk)
    c = -sk * dy
    xi = (2 * c) / (-b - torch.sqrt(b * b - 4 * a * c))
    return torch.where(inside, xi * wk + x0, y)


class ConvFlow(nn.Module):
    """Coupling flow whose transform of the second half is a rational-quadratic spline predicted from the first."""

    def __init__(self, in_channels: int, filter_channels: int, kernel: int, n_layers: int, bins: int, tail: float):
        super().__init__()
        self.n_half, self.filter, self.bins, self.tail = in_channels // 2, filter_channels, bins, tail
        self.pre = nn.Conv1d(self.n_half, filter_channels, 1)
        self.convs = DDSConv(filter_channels, kernel, n_layers)
        self.proj = nn.Conv1d(filter_channels, self.n_half * (3 * bins - 1), 1)

    def reverse(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        x0, x1 = torch.split(x, [self.n_half, self.n_half], dim=1)
        hid = self.convs(self.pre(x0), mask, g)
        hid = self.proj(hid) * mask
        b, c, t = x0.shape
        hid = hid.reshape(b, c, -1, t).permute(0, 1, 3, 2)  # (b, half, t, 3*bins-1)
        scale = math.sqrt(self.filter)
        widths, heights = hid[..., : self.bins] / scale, hid[..., self.bins : 2 * self.bins] / scale
        x1 = rational_quadratic_inverse(x1, widths, heights, hid[..., 2 * self.bins :], self.tail)
        return torch.cat([x0, x1], dim=1) * mask


class StochasticDurationPredictor(nn.Module):
    """Log-durations from noise, by the duration flow run backwards and conditioned on the text encoding."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        f = cfg.dp_filter
        self.pre = nn.Conv1d(cfg.hidden, f, 1)
        self.proj = nn.Conv1d(f, f, 1)
        self.convs = DDSConv(f, cfg.dp_kernel, cfg.dp_layers)
        flows: list[nn.Module] = [ElementwiseAffine(2)]
        for i in range(cfg.dp_flows):
            coupling = ConvFlow(2, f, cfg.dp_kernel, cfg.dp_layers, cfg.dp_bins, cfg.dp_tail)
            flows += [SkippedFlow() if i == 0 else coupling, Flip()]
        self.flows = nn.ModuleList(flows)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """(b, 1, t) log-durations; ``noise`` (b, 2, t) is the flow's starting point (already scaled)."""
        x = self.pre(x.detach())
        x = self.proj(self.convs(x, mask)) * mask
        z = noise
        # backwards through the flows; the first coupling (next to the affine) is skipped, the affine runs last
        for flow in reversed(list(self.flows)):
            z = flow.reverse(z, mask, g=x)  # type: ignore[operator]
        return z[:, :1]


# ----------------------------------------------------------------------------------------------------------------
# Flow (paper section 2.1.3): affine coupling layers with WaveNet transforms, volume-preserving (mean only)


class WaveNet(nn.Module):
    """Non-causal WaveNet: gated tanh*sigmoid units, residual and skip outputs (no conditioning here)."""

    def __init__(self, hidden: int, kernel: int, n_layers: int):
        super().__init__()
        self.hidden = hidden
        self.in_layers = nn.ModuleList(
            [nn.Conv1d(hidden, 2 * hidden, kernel, padding=(kernel - 1) // 2) for _ in range(n_layers)]
        )
        out = [2 * hidden] * (n_layers - 1) + [hidden]  # the last layer has only a skip output
        self.res_skip_layers = nn.ModuleList([nn.Conv1d(hidden, o, 1) for o in out])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        skip = torch.zeros_like(x)
        last = len(self.in_layers) - 1
        for i, (conv_in, conv_rs) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            a = conv_in(x)
            acts = torch.tanh(a[:, : self.hidden]) * torch.sigmoid(a[:, self.hidden :])
            rs = conv_rs(acts)
            if i < last:
                x = (x + rs[:, : self.hidden]) * mask
                skip = skip + rs[:, self.hidden :]
            else:
                skip = skip + rs
        return skip * mask


class ResidualCoupling(nn.Module):
    """x1 <- x1 + m(x0) (mean-only coupling: log-determinant 0)."""

    def __init__(self, channels: int, hidden: int, kernel: int, n_layers: int):
        super().__init__()
        self.n_half = channels // 2
        self.pre = nn.Conv1d(self.n_half, hidden, 1)
        self.enc = WaveNet(hidden, kernel, n_layers)
        self.post = nn.Conv1d(hidden, self.n_half, 1)

    def reverse(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        x0, x1 = torch.split(x, [self.n_half, self.n_half], dim=1)
        m = self.post(self.enc(self.pre(x0) * mask, mask)) * mask
        return torch.cat([x0, (x1 - m) * mask], dim=1)


class Flow(nn.Module):
    """Coupling layers alternating with flips; inference maps the prior sample z_p back to the latent z."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        flows: list[nn.Module] = []
        for _ in range(cfg.flow_couplings):
            flows += [ResidualCoupling(cfg.inter, cfg.hidden, cfg.flow_kernel, cfg.flow_layers), Flip()]
        self.flows = nn.ModuleList(flows)

    def reverse(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for flow in reversed(list(self.flows)):
            z = flow.reverse(z, mask)  # type: ignore[operator]
        return z


# ----------------------------------------------------------------------------------------------------------------
# HiFi-GAN generator (Kong et al. 2020), the VITS decoder


class ResBlock(nn.Module):
    """HiFi-GAN's ResBlock2: one dilated convolution per dilation, each with a leaky ReLU before and a residual."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2) for d in dilations]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, LRELU_SLOPE))
        return x


class Generator(nn.Module):
    """Latent frames -> waveform: transposed-convolution upsamplings, each followed by the mean of residual blocks
    of several kernel sizes (the multi-receptive-field fusion)."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.n_kernels = len(cfg.res_kernels)
        self.conv_pre = nn.Conv1d(cfg.inter, cfg.up_initial, 7, padding=3)
        ups, blocks = [], []
        ch = cfg.up_initial
        for rate, kernel in zip(cfg.up_rates, cfg.up_kernels):
            ups.append(nn.ConvTranspose1d(ch, ch // 2, kernel, rate, padding=(kernel - rate) // 2))
            ch //= 2
            blocks += [ResBlock(ch, k, tuple(d)) for k, d in zip(cfg.res_kernels, cfg.res_dilations)]
        self.ups = nn.ModuleList(ups)
        self.resblocks = nn.ModuleList(blocks)
        self.conv_post = nn.Conv1d(ch, 1, 7, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(x)
        n = self.n_kernels
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            x = sum((block(x) for block in self.resblocks[i * n : (i + 1) * n]), torch.zeros_like(x)) / n
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


# ----------------------------------------------------------------------------------------------------------------


def alignment_path(durations: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
    """(b, frames, phonemes) hard monotonic alignment: frame j belongs to phoneme i when it lies in
    [end_i - d_i, end_i), end_i the cumulative duration."""
    end = torch.cumsum(durations, dim=-1)  # (b, tx)
    frames = torch.arange(y_mask.shape[-1], device=durations.device, dtype=durations.dtype)[None, :, None]
    path = (frames < end[:, None, :]) & (frames >= (end - durations)[:, None, :])
    return path.float() * y_mask.transpose(1, 2) * x_mask


class VITS(nn.Module):
    """The VITS inference model: text encoder ``enc_p``, duration predictor ``dp``, ``flow`` and decoder ``dec``."""

    def __init__(self, cfg: VitsConfig | None = None):
        super().__init__()
        self.cfg = cfg or VitsConfig()
        self.enc_p = TextEncoder(self.cfg)
        self.dp = StochasticDurationPredictor(self.cfg)
        self.flow = Flow(self.cfg)
        self.dec = Generator(self.cfg)

    @torch.no_grad()
    def infer(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor | None = None,
        *,
        noise_scale: float = 0.667,
        length_scale: float = 1.0,
        noise_w: float = 0.8,
        noise_dp: torch.Tensor | None = None,
        noise_z: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> VitsOutput:
        """Waveforms for a batch of phoneme id sequences.

        Args:
            ids: (batch, phonemes) int64 phoneme ids, padded.
            lengths: (batch,) valid phonemes per item; default: all.
            noise_scale: scales the prior sample's noise (0: the prior mean, a flat, deterministic voice).
            length_scale: multiplies every duration (> 1: slower speech).
            noise_w: scales the duration predictor's noise (0: deterministic durations).
            noise_dp: (batch, 2, phonemes) standard-normal noise of the duration flow; drawn when None.
            noise_z: (batch, inter, >= frames) standard-normal noise of the prior sample, cut to the frames the
                durations give; drawn when None.
            generator: the random source for noise that is drawn (None: torch's global one).

        Returns:
            The waveform, its lengths, the durations and the noise used (see ``VitsOutput``).
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, phonemes), got shape {tuple(ids.shape)}")
        b, tx = ids.shape
        if lengths is None:
            lengths = torch.full((b,), tx, dtype=torch.long, device=ids.device)
        x, m_p, logs_p, x_mask = self.enc_p(ids, lengths)
        if noise_dp is None:
            noise_dp = torch.randn(b, 2, tx, generator=generator, device=ids.device)
        logw = self.dp(x, x_mask, noise_dp * noise_w)
        w_ceil = torch.ceil(torch.exp(logw) * x_mask * length_scale)
        y_lengths = torch.clamp_min(w_ceil.sum(dim=(1, 2)), 1).long()
        ty = int(y_lengths.max())
        y_mask = sequence_mask(y_lengths, ty).unsqueeze(1)
        path = alignment_path(w_ceil[:, 0], x_mask, y_mask)  # (b, ty, tx)
        m_p = (path @ m_p.transpose(1, 2)).transpose(1, 2)
        logs_p = (path @ logs_p.transpose(1, 2)).transpose(1, 2)
        if noise_z is None:
            noise_z = torch.randn(m_p.shape, generator=generator, device=ids.device)
        if noise_z.shape[-1] < ty:
            raise ValueError(f"noise_z has {noise_z.shape[-1]} frames; the durations need {ty}")
        noise_z = noise_z[..., :ty]
        z_p = m_p + noise_z * torch.exp(logs_p) * noise_scale
        z = self.flow.reverse(z_p, y_mask)
        wave = self.dec(z * y_mask)[:, 0]
        return VitsOutput(wave, y_lengths * self.cfg.hop, w_ceil[:, 0].long(), noise_dp, noise_z)
