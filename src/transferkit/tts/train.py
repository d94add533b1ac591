"""Speaker adaptation of a VITS voice: the training half of VITS (Kim et al. 2021) that an inference export lacks,
and a small exact-resume loop around it.

Training forward (paper section 2 and figure 1a), for one batch of (phoneme ids, linear spectrogram, waveform):

    spectrogram ─▶ posterior encoder enc_q (fresh: the export has none) ─▶ z ~ q(z|x), its mean and log-std
    z ─▶ flow (forward direction) ─▶ z_p
    phoneme ids ─▶ text encoder enc_p ─▶ prior mean/log-std per phoneme
    monotonic alignment search (MAS) of z_p against the prior ─▶ hard alignment, frames per phoneme
    losses: KL(q(z|x) through the flow || prior expanded by the alignment)            (paper eq. 3)
            duration: log-duration regression of the duration predictor on the MAS durations (see below)
            mel L1 of the decoder's waveform on a random window of ``segment_frames`` latent frames      (eq. 1)
            optional: least-squares adversarial + feature matching against a multi-period discriminator (eq. 6-8)

The duration loss: the voice's duration predictor is the stochastic one, and its posterior flows (``post_*`` in the
reference, which its variational likelihood needs) are not in the export. The loss here is the deterministic
predictor's: the squared error between the log-durations the duration flow gives from zero noise and the log of the
MAS durations. It is frozen by default (the target's speaking rate is learnt only when ``dp`` trains).

What trains is a strategy: ``AdaptConfig.frozen`` names the parts kept as the source voice had them (default: text
encoder and duration predictor, which carry the language; the flow, decoder and the fresh posterior encoder carry the
voice). Randomness (posterior noise, segment starts, batch order) is drawn from generators seeded by the step, so a
run resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.errors import DataError, TrainingError, did_you_mean
from transferkit.tts.data import TtsData, Utterance, linear_spectrogram, mel_spectrogram, pad_stack
from transferkit.tts.vits import VITS, Flip, ResidualCoupling, WaveNet, sequence_mask
from transferkit.tts.voice import Voice, save_voice

PARTS = ("enc_p", "dp", "flow", "dec", "enc_q")
CHECKPOINT = "checkpoint.pt"
POSTERIOR = "posterior.safetensors"


@dataclass(frozen=True)
class AdaptConfig:
    """How a voice adapts (the defaults follow the VITS paper where it gives a value).

    Attributes:
        steps: optimizer steps.
        batch_size: utterances per step (at most the training set).
        lr: AdamW learning rate (paper: 2e-4).
        betas: AdamW betas (paper: 0.8, 0.99).
        eps: AdamW epsilon (paper: 1e-9).
        weight_decay: AdamW decoupled weight decay (paper: 0.01).
        grad_clip: clip the gradient norm to this (None: no clipping, as the paper).
        segment_frames: latent frames the decoder is trained on per item (paper: 32, 8,192 samples at hop 256).
        frozen: parts kept as the source voice had them, of ``PARTS`` (enc_q, the fresh posterior, can be frozen
            only when training from scratch makes no sense of it; it normally trains).
        init: "pretrained" (adapt the voice) or "scratch" (the same architecture re-initialised: the baseline that
            measures what transfer gains; nothing may be frozen then).
        c_mel, c_kl, c_dur: weights of the mel, KL and duration losses (paper: 45, 1, 1).
        adversarial: train a multi-period discriminator from scratch and add its losses. Off by default: on one
            CPU thread it takes a step from 1.6 s to 7.4 s (batch 4, HiFi-GAN's sizes); the pretrained decoder was
            already trained adversarially, and whether the mel loss alone blurs it while adapting is for the
            benchmark to measure.
        c_adv, c_fm: weights of the generator's adversarial and feature-matching losses (paper: 1, 2).
        periods: the discriminator's periods (HiFi-GAN: 2, 3, 5, 7, 11).
        disc_channels: its first convolution's channels (HiFi-GAN: 32; grows x4 per layer up to 1024).
        posterior_layers: WaveNet layers of the posterior encoder (paper: 16).
        posterior_kernel: their kernel (paper: 5).
        n_fft: STFT size of both spectrograms (paper: 1024); the hop is the voice's (256).
        n_mels: mel bands of the reconstruction loss (paper: 80).
        seed: seeds the fresh weights, batch order, noise and segments.
        checkpoint_every: steps between checkpoints (with ``out``); the last step always writes one.
        posterior_warmup: for this many first steps only the fresh posterior encoder is updated (the other trained
            parts get no update): while it is random, its KL gradients would push the pretrained flow towards noise.
            0 (default) trains everything from the first step, as the brief's baseline; the benchmark chooses.
    """

    steps: int = 200
    batch_size: int = 4
    lr: float = 2e-4
    betas: tuple[float, float] = (0.8, 0.99)
    eps: float = 1e-9
    weight_decay: float = 0.01
    grad_clip: float | None = None
    segment_frames: int = 32
    frozen: tuple[str, ...] = ("enc_p", "dp")
    init: str = "pretrained"
    c_mel: float = 45.0
    c_kl: float = 1.0
    c_dur: float = 1.0
    adversarial: bool = False
    c_adv: float = 1.0
    c_fm: float = 2.0
    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    disc_channels: int = 32
    posterior_layers: int = 16
    posterior_kernel: int = 5
    n_fft: int = 1024
    n_mels: int = 80
    seed: int = 0
    checkpoint_every: int = 50
    posterior_warmup: int = 0

    def __post_init__(self) -> None:
        bad = [p for p in self.frozen if p not in PARTS]
        if bad:
            raise ValueError(
                f"frozen part {bad[0]!r} is not a part of VITS; choose from {', '.join(PARTS)}."
                + did_you_mean(bad[0], PARTS)
            )
        if self.init not in ("pretrained", "scratch"):
            raise ValueError(f"init must be 'pretrained' or 'scratch', got {self.init!r}")
        if self.init == "scratch" and self.frozen:
            raise ValueError(
                f"init='scratch' with frozen={self.frozen}: freezing re-initialised weights keeps them random; "
                "set frozen=() for the from-scratch baseline"
            )
        if set(PARTS) <= set(self.frozen):
            raise ValueError("every part is frozen: nothing would train; unfreeze at least one of " + ", ".join(PARTS))
        for name in ("steps", "batch_size", "segment_frames", "posterior_layers", "checkpoint_every", "n_mels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.posterior_warmup < 0:
            raise ValueError(f"posterior_warmup must be >= 0, got {self.posterior_warmup}")
        if self.posterior_warmup and "enc_q" in self.frozen:
            raise ValueError("posterior_warmup trains only enc_q, which frozen names: unfreeze enc_q or set it to 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


# ----------------------------------------------------------------------------------------------------------------
# The posterior encoder and the flow's training direction


class PosteriorEncoder(nn.Module):
    """VITS's ``enc_q``: linear spectrogram -> (z, mean, log-std) of q(z | x), a WaveNet of dilation 1 (paper
    section 2.1.2 and appendix B: 16 layers of kernel 5 on 192 channels)."""

    def __init__(self, spec_channels: int, inter: int, hidden: int, kernel: int = 5, n_layers: int = 16):
        super().__init__()
        self.inter = inter
        self.pre = nn.Conv1d(spec_channels, hidden, 1)
        self.enc = WaveNet(hidden, kernel, n_layers)
        self.proj = nn.Conv1d(hidden, 2 * inter, 1)

    def forward(
        self, spec: torch.Tensor, lengths: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z = m + noise * exp(logs)`` (the reparameterised sample) with ``noise`` (batch, inter, frames)."""
        mask = sequence_mask(lengths, spec.shape[-1]).unsqueeze(1).to(spec.dtype)
        h = self.enc(self.pre(spec) * mask, mask)
        m, logs = torch.split(self.proj(h) * mask, self.inter, dim=1)
        z = (m + noise * torch.exp(logs)) * mask
        return z, m, logs, mask


def flow_forward(flow: nn.Module, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z -> z_p: the flow's training direction (``Flow.reverse`` is inference's), x1 <- x1 + m(x0) per coupling."""
    for layer in flow.flows:  # type: ignore[union-attr]
        if isinstance(layer, ResidualCoupling):
            x0, x1 = torch.split(z, [layer.n_half, layer.n_half], dim=1)
            m = layer.post(layer.enc(layer.pre(x0) * mask, mask)) * mask
            z = torch.cat([x0, (x1 + m) * mask], dim=1)
        elif isinstance(layer, Flip):
            z = torch.flip(z, [1])
        else:
            raise TypeError(f"the flow holds a {type(layer).__name__}; its training direction is not written")
    return z


# ----------------------------------------------------------------------------------------------------------------
# Monotonic alignment search (Glow-TTS, Kim et al. 2020, algorithm 1; VITS section 2.2.1)


def prior_log_likelihood(z_p: torch.Tensor, m_p: torch.Tensor, logs_p: torch.Tensor) -> torch.Tensor:
    """(batch, frames, phonemes): log N(z_p[:, :, j]; m_p[:, :, i], exp(logs_p[:, :, i])^2) summed over channels.

    Expanded as four matrix products (no (b, c, frames, phonemes) tensor): the quadratic's terms in z_p, z_p m_p
    and m_p."""
    inv_var = torch.exp(-2 * logs_p)  # (b, c, tx)
    const = torch.sum(-0.5 * math.log(2 * math.pi) - logs_p, dim=1, keepdim=True)  # (b, 1, tx)
    quad_z = torch.matmul((-0.5 * z_p**2).transpose(1, 2), inv_var)  # (b, ty, tx)
    cross = torch.matmul(z_p.transpose(1, 2), m_p * inv_var)
    quad_m = torch.sum(-0.5 * m_p**2 * inv_var, dim=1, keepdim=True)
    return const + quad_z + cross + quad_m


def monotonic_alignment(log_p: np.ndarray) -> np.ndarray:
    """The monotonic, surjective alignment of frames to phonemes that maximises the summed log-likelihood.

    Every phoneme gets at least one frame, in order, starting at (frame 0, phoneme 0) and ending at the last of each.
    Dynamic programming: Q[j, i] = log_p[j, i] + max(Q[j-1, i], Q[j-1, i-1]), then a backtrack (ties keep the
    phoneme: the reference's rule).

    Args:
        log_p: (frames, phonemes) log-likelihood of frame j under phoneme i; frames >= phonemes.

    Returns:
        (frames, phonemes) 0/1 path, one 1 per frame.
    """
    ty, tx = log_p.shape
    if ty < tx:
        raise ValueError(f"{ty} frames cannot align to {tx} phonemes: each phoneme needs a frame")
    q = np.full((ty, tx), -np.inf)
    q[0, 0] = log_p[0, 0]
    for j in range(1, ty):
        prev = q[j - 1]
        moved = np.concatenate([[-np.inf], prev[:-1]])
        q[j] = log_p[j] + np.maximum(prev, moved)
    path = np.zeros((ty, tx), dtype=np.float32)
    i = tx - 1
    for j in range(ty - 1, -1, -1):
        path[j, i] = 1.0
        if j > 0 and i > 0 and (i == j or q[j - 1, i] < q[j - 1, i - 1]):
            i -= 1
    return path


def batch_alignment(log_p: torch.Tensor, x_lengths: torch.Tensor, y_lengths: torch.Tensor) -> torch.Tensor:
    """(batch, frames, phonemes) MAS path of each item within its lengths (zeros outside)."""
    out = torch.zeros_like(log_p)
    lp = log_p.detach().double().cpu().numpy()
    for b in range(lp.shape[0]):
        tx, ty = int(x_lengths[b]), int(y_lengths[b])
        out[b, :ty, :tx] = torch.from_numpy(monotonic_alignment(lp[b, :ty, :tx])).to(out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Losses (one implementation each; the tests check them by hand)


def kl_loss(
    z_p: torch.Tensor, logs_q: torch.Tensor, m_p: torch.Tensor, logs_p: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """KL(q || p) per latent element on the valid frames (paper eq. 3, the one-sample estimate of the reference):
    ``logs_p - logs_q - 1/2 + (z_p - m_p)^2 exp(-2 logs_p) / 2``, its masked sum over the mask's sum.

    ``logs_q`` is the posterior's log-std before the flow; the flow is volume-preserving, so it is also z_p's."""
    kl = logs_p - logs_q - 0.5 + 0.5 * (z_p - m_p) ** 2 * torch.exp(-2.0 * logs_p)
    return torch.sum(kl * mask) / torch.sum(mask)


def duration_loss(logw: torch.Tensor, durations: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error of predicted log-durations against ``log(durations + 1e-6)``, over the valid phonemes."""
    target = torch.log(durations + 1e-6) * mask
    return torch.sum((logw - target) ** 2 * mask) / torch.sum(mask)


def mel_loss(mel_hat: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of two log-mel spectrograms (paper eq. 1)."""
    return F.l1_loss(mel_hat, mel)


def discriminator_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Least-squares GAN loss of the discriminator (paper eq. 6): sum over sub-discriminators of
    mean((1 - D(y))^2) + mean(D(G(z))^2)."""
    return sum((torch.mean((1 - r) ** 2) + torch.mean(f**2) for r, f in zip(real, fake)), torch.zeros(()))


def generator_adversarial_loss(fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Least-squares GAN loss of the generator (paper eq. 7): sum over sub-discriminators of mean((1 - D(G(z)))^2)."""
    return sum((torch.mean((1 - f) ** 2) for f in fake), torch.zeros(()))


def feature_matching_loss(
    real: Sequence[Sequence[torch.Tensor]], fake: Sequence[Sequence[torch.Tensor]]
) -> torch.Tensor:
    """L1 between the discriminator's feature maps on real and generated audio (paper eq. 8), summed over layers
    and sub-discriminators; the real maps are targets (no gradient)."""
    total = torch.zeros(())
    for rs, fs in zip(real, fake):
        for r, f in zip(rs, fs):
            total = total + torch.mean(torch.abs(r.detach() - f))
    return total


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN's period sub-discriminator: the waveform folded into (samples / p, p) and 2-D convolutions along
    time, so it sees every p-th sample (periodic structure)."""

    def __init__(self, period: int, channels: int = 32):
        super().__init__()
        self.period = period
        chans = [1, channels, channels * 4, min(channels * 16, 1024), min(channels * 32, 1024)]
        self.convs = nn.ModuleList(
            [nn.Conv2d(a, b, (5, 1), (3, 1), padding=(2, 0)) for a, b in itertools.pairwise(chans)]
            + [nn.Conv2d(chans[-1], chans[-1], (5, 1), 1, padding=(2, 0))]
        )
        self.post = nn.Conv2d(chans[-1], 1, (3, 1), 1, padding=(1, 0))

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, t = y.shape
        if t % self.period:
            y = F.pad(y[:, None], (0, self.period - t % self.period), mode="reflect")[:, 0]
        x = y.view(b, 1, -1, self.period)
        feats = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            feats.append(x)
        x = self.post(x)
        feats.append(x)
        return x.flatten(1), feats


class MultiPeriodDiscriminator(nn.Module):
    """Period sub-discriminators (HiFi-GAN's MPD; VITS adds a scale one, left out here: the MPD alone is the part
    that removes the metallic periodic artefacts, at a fraction of the cost)."""

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), channels: int = 32):
        super().__init__()
        self.discs = nn.ModuleList([PeriodDiscriminator(p, channels) for p in periods])

    def forward(self, y: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        outs = [d(y) for d in self.discs]
        return [o for o, _ in outs], [f for _, f in outs]


# ----------------------------------------------------------------------------------------------------------------
# Data -> tensors


@dataclass
class Item:
    """One training utterance as the model reads it."""

    name: str
    ids: torch.Tensor  # (phonemes,)
    spec: torch.Tensor  # (1 + n_fft // 2, frames)
    wave: torch.Tensor  # (frames * hop,)


def prepare_items(voice: Voice, utts: Sequence[Utterance], n_fft: int = 1024) -> list[Item]:
    """Phoneme ids (espeak-ng through the voice's map) and the linear spectrogram of each utterance.

    Raises:
        DataError: an utterance at another rate than the voice's, or with fewer frames than phonemes (its audio is
            too short for its transcript: the alignment needs a frame per phoneme), naming it.
    """
    hop = voice.model.cfg.hop
    items = []
    for u in utts:
        if u.rate != voice.sample_rate:
            raise DataError(
                f"utterance '{u.name}' is at {u.rate} Hz, the voice at {voice.sample_rate} Hz; read the "
                "folder with read_tts_folder(root, voice.sample_rate)"
            )
        ids = torch.tensor(voice.phonemes(u.text), dtype=torch.long)
        wave = torch.from_numpy(u.wave[: len(u.wave) // hop * hop].copy())
        spec = linear_spectrogram(wave, n_fft, hop)[0]
        if spec.shape[-1] < len(ids):
            raise DataError(
                f"utterance '{u.name}' has {spec.shape[-1]} frames ({u.seconds:.2f} s) for {len(ids)} phoneme ids: "
                "each phoneme needs a frame; check that its transcript is what the recording says"
            )
        items.append(Item(u.name, ids, spec, wave))
    return items


def collate(items: Sequence[Item]) -> dict[str, torch.Tensor]:
    ids, id_lengths = pad_stack([i.ids for i in items])
    spec, spec_lengths = pad_stack([i.spec for i in items])
    wave, _ = pad_stack([i.wave for i in items])
    return {"ids": ids, "id_lengths": id_lengths, "spec": spec, "spec_lengths": spec_lengths, "wave": wave}


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The items of step ``step`` (0-based): consecutive slices of one seeded permutation per epoch, computed from
    the step alone (a resumed run draws the same batches)."""
    bs = min(batch_size, n)
    out = []
    for pos in range(step * bs, (step + 1) * bs):
        epoch, k = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[k]))
    return out


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random source of one step (posterior noise, segment starts): a function of the seed and the step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


# ----------------------------------------------------------------------------------------------------------------
# The training forward


@dataclass
class Forward:
    """What one training forward computed: the losses and the decoder's window (for the discriminator)."""

    losses: dict[str, torch.Tensor]
    wave_hat: torch.Tensor
    wave_seg: torch.Tensor
    durations: torch.Tensor
    path: torch.Tensor = field(repr=False)


def training_forward(
    model: VITS,
    posterior: PosteriorEncoder,
    batch: dict[str, torch.Tensor],
    cfg: AdaptConfig,
    rate: int,
    generator: torch.Generator,
) -> Forward:
    """The VITS training forward on one batch: KL, duration and mel losses (weighted sum in ``losses['loss']``)."""
    frozen = set(cfg.frozen)
    hop = model.cfg.hop
    ids, id_lengths, spec, spec_lengths, wave = (
        batch[k] for k in ("ids", "id_lengths", "spec", "spec_lengths", "wave")
    )
    with torch.set_grad_enabled(torch.is_grad_enabled() and "enc_p" not in frozen):
        x, m_p, logs_p, x_mask = model.enc_p(ids, id_lengths)
    noise = torch.randn(spec.shape[0], posterior.inter, spec.shape[-1], generator=generator)
    z, _m_q, logs_q, y_mask = posterior(spec, spec_lengths, noise)
    z_p = flow_forward(model.flow, z, y_mask)
    with torch.no_grad():
        path = batch_alignment(prior_log_likelihood(z_p, m_p, logs_p), id_lengths, spec_lengths)  # (b, ty, tx)
    durations = path.sum(dim=1)  # (b, tx)
    with torch.set_grad_enabled(torch.is_grad_enabled() and "dp" not in frozen):
        logw = model.dp(x, x_mask, torch.zeros(x.shape[0], 2, x.shape[-1]))[:, 0]
        l_dur = duration_loss(logw, durations, x_mask[:, 0])
    m_f = torch.matmul(path, m_p.transpose(1, 2)).transpose(1, 2)  # the prior of each frame's phoneme
    logs_f = torch.matmul(path, logs_p.transpose(1, 2)).transpose(1, 2)
    l_kl = kl_loss(z_p, logs_q, m_f, logs_f, y_mask)
    # the decoder trains on a random window of each item (paper: 32 frames), which is what keeps its cost bounded
    seg = cfg.segment_frames
    room = torch.clamp_min(spec_lengths - seg, 0) + 1
    starts = (torch.rand(len(room), generator=generator) * room).long()
    if z.shape[-1] < seg:
        z = F.pad(z, (0, seg - z.shape[-1]))
        wave = F.pad(wave, (0, seg * hop - wave.shape[-1]))
    z_seg = torch.stack([z[b, :, s : s + seg] for b, s in enumerate(starts.tolist())])
    wave_seg = torch.stack([wave[b, s * hop : (s + seg) * hop] for b, s in enumerate(starts.tolist())])
    wave_hat = model.dec(z_seg)[:, 0]
    l_mel = mel_loss(
        mel_spectrogram(wave_hat, rate, cfg.n_fft, hop, cfg.n_mels),
        mel_spectrogram(wave_seg, rate, cfg.n_fft, hop, cfg.n_mels),
    )
    total = cfg.c_mel * l_mel + cfg.c_kl * l_kl + cfg.c_dur * l_dur
    losses = {"loss": total, "mel": l_mel, "kl": l_kl, "dur": l_dur}
    return Forward(losses, wave_hat, wave_seg, durations, path)


# ----------------------------------------------------------------------------------------------------------------
# Strategy: what trains


def part_modules(model: VITS, posterior: PosteriorEncoder) -> dict[str, nn.Module]:
    """The parts a strategy names (``PARTS``) -> their modules."""
    return {"enc_p": model.enc_p, "dp": model.dp, "flow": model.flow, "dec": model.dec, "enc_q": posterior}


def apply_strategy(model: VITS, posterior: PosteriorEncoder, frozen: Sequence[str]) -> list[nn.Parameter]:
    """Freeze the named parts (``requires_grad=False``) and return the parameters that train, in a fixed order."""
    params = []
    for name, module in part_modules(model, posterior).items():
        train = name not in frozen
        for p in module.parameters():
            p.requires_grad_(train)
            if train:
                params.append(p)
    return params


def fingerprints(model: VITS, posterior: PosteriorEncoder | None = None) -> dict[str, float]:
    """Per part, the sum of |w| in float64: equal fingerprints, (almost surely) unchanged weights."""
    parts: dict[str, nn.Module] = {"enc_p": model.enc_p, "dp": model.dp, "flow": model.flow, "dec": model.dec}
    if posterior is not None:
        parts["enc_q"] = posterior
    return {n: math.fsum(float(p.detach().double().abs().sum()) for p in m.parameters()) for n, m in parts.items()}


def new_posterior(model: VITS, cfg: AdaptConfig) -> PosteriorEncoder:
    """A freshly initialised posterior encoder for ``model`` (seeded by ``cfg.seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return PosteriorEncoder(
            cfg.n_fft // 2 + 1, model.cfg.inter, model.cfg.hidden, cfg.posterior_kernel, cfg.posterior_layers
        )


def _scratch(model: VITS, seed: int) -> VITS:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        return VITS(model.cfg)


# ----------------------------------------------------------------------------------------------------------------
# The loop


def _show_progress() -> bool:
    from transferkit.engine.loop import show_progress

    return show_progress()


def _config_record(cfg: AdaptConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def adapt(
    voice: Voice,
    data: TtsData,
    cfg: AdaptConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    save_to: str | Path | None = None,
) -> dict[str, Any]:
    """Adapt ``voice`` to the speaker of ``data.train`` (the source voice itself is left unchanged).

    Args:
        voice: the source voice (``load_voice()``).
        data: the target speaker (``read_tts_folder(root, voice.sample_rate)``).
        cfg: what trains and how (``AdaptConfig``; default: 200 steps, text encoder and duration predictor frozen).
        out: a folder for ``checkpoint.pt`` (every ``cfg.checkpoint_every`` steps and at the end) and the adapted
            voice (``out/voice``, loadable by ``load_voice``). None: nothing written.
        resume: continue from ``out/checkpoint.pt`` (same config required); a finished run returns at once.
        on_step: called after every step with (step, losses as floats), e.g. for logging or stopping early (an
            exception it raises ends the run; the last checkpoint stays).
        save_to: where the adapted voice folder goes (default ``out/voice``; a run keeps it under models/NAME).

    Returns:
        ``voice`` (the adapted ``Voice``), ``posterior`` (the trained encoder), ``history`` (losses per step),
        ``steps``, ``seconds_per_step`` (of the steps run in this call), ``trainable`` / ``frozen`` (parts),
        ``trainable_parameters``, ``out`` (the saved voice folder, or None).

    Raises:
        TrainingError: a loss that is NaN or infinite (naming the step and the loss parts), or a checkpoint written
            with another configuration.
    """
    from tqdm.auto import tqdm

    from transferkit.io import replace_dir, safe_torch_load, save_tensors, torch_save

    cfg = cfg or AdaptConfig()
    if not data.train:
        raise DataError("the target data has no training utterances; add recordings or lower held_out")
    if data.rate != voice.sample_rate:
        raise DataError(
            f"the target data is at {data.rate} Hz and the voice at {voice.sample_rate} Hz; read it with "
            "read_tts_folder(root, voice.sample_rate)"
        )
    hop = voice.model.cfg.hop
    if cfg.segment_frames * hop <= (cfg.n_fft - hop) // 2:
        raise ValueError(
            f"segment_frames={cfg.segment_frames} ({cfg.segment_frames * hop} samples) is too short for the mel loss's "
            f"STFT of {cfg.n_fft} (it pads {(cfg.n_fft - hop) // 2} samples by reflection); use at least "
            f"{(cfg.n_fft - hop) // 2 // hop + 1} frames"
        )
    model = _scratch(voice.model, cfg.seed) if cfg.init == "scratch" else copy.deepcopy(voice.model)
    posterior = new_posterior(model, cfg)
    params = apply_strategy(model, posterior, cfg.frozen)
    model.train()
    posterior.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    disc: MultiPeriodDiscriminator | None = None
    opt_d: torch.optim.Optimizer | None = None
    if cfg.adversarial:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 13)
            disc = MultiPeriodDiscriminator(cfg.periods, cfg.disc_channels)
        opt_d = torch.optim.AdamW(
            disc.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    trained = [n for n in PARTS if n not in cfg.frozen]
    own = {id(p) for p in posterior.parameters()}
    others = [p for p in params if id(p) not in own]
    items = prepare_items(voice, data.train, cfg.n_fft)
    out_dir = Path(out).expanduser() if out is not None else None
    ckpt = out_dir / CHECKPOINT if out_dir is not None else None
    record = _config_record(cfg)
    start, history = 0, []
    if resume and ckpt is not None and ckpt.is_file():
        state = safe_torch_load(ckpt)
        if state.get("config") != record:
            changed = sorted(k for k in record if state.get("config", {}).get(k) != record[k])
            raise TrainingError(
                f"'{ckpt}' was written with another configuration (differs in {', '.join(changed) or 'format'}); "
                "resume with the same settings, or start again without resume"
            )
        modules = part_modules(model, posterior)
        for name in trained:
            modules[name].load_state_dict(state["parts"][name])
        opt.load_state_dict(state["optimizer"])
        if disc is not None and opt_d is not None:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["opt_d"])
        start, history = int(state["step"]), list(state["history"])

    def save_checkpoint(step: int) -> None:
        if ckpt is None:
            return
        modules = part_modules(model, posterior)
        state = {
            "step": step,
            "config": record,
            "history": history,
            "parts": {n: modules[n].state_dict() for n in trained},
            "optimizer": opt.state_dict(),
        }
        if disc is not None and opt_d is not None:
            state["disc"], state["opt_d"] = disc.state_dict(), opt_d.state_dict()
        torch_save(ckpt, state)

    began = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc="adapt voice", disable=not _show_progress(), unit="step")
    try:
        for step in range(start, cfg.steps):
            gen = step_generator(cfg.seed, step)
            batch = collate([items[i] for i in batch_indices(len(items), cfg.batch_size, step, cfg.seed)])
            fwd = training_forward(model, posterior, batch, cfg, voice.sample_rate, gen)
            losses = fwd.losses
            if disc is not None and opt_d is not None:
                # the discriminator's step first, on the generator's output detached (paper: alternating updates)
                real_d, _ = disc(fwd.wave_seg)
                fake_d, _ = disc(fwd.wave_hat.detach())
                l_d = discriminator_loss(real_d, fake_d)
                _check_finite(step, {"disc": l_d})
                opt_d.zero_grad(set_to_none=True)
                l_d.backward()
                opt_d.step()
                real_d, real_f = disc(fwd.wave_seg)
                fake_d, fake_f = disc(fwd.wave_hat)
                l_adv, l_fm = generator_adversarial_loss(fake_d), feature_matching_loss(real_f, fake_f)
                losses = {
                    **losses,
                    "loss": losses["loss"] + cfg.c_adv * l_adv + cfg.c_fm * l_fm,
                    "adv": l_adv,
                    "fm": l_fm,
                    "disc": l_d.detach(),
                }
            _check_finite(step, losses)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if step < cfg.posterior_warmup:
                for p in others:
                    p.grad = None  # AdamW skips a parameter without a gradient: no update, no weight decay
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            row = {k: float(v.detach()) for k, v in losses.items()}
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", mel=f"{row['mel']:.3f}", kl=f"{row['kl']:.3f}")
            done = step + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(done)
            if on_step is not None:
                on_step(done, row)
    finally:
        bar.close()
    ran = cfg.steps - start
    seconds = (time.perf_counter() - began) / ran if ran else 0.0
    model.eval()
    posterior.eval()
    # back to how a loaded voice is (all trainable): the freezing belongs to this training only, and PyTorch's CPU
    # convolutions round differently for weights without grad, which would make the reloaded voice differ slightly
    for p in list(model.parameters()) + list(posterior.parameters()):
        p.requires_grad_(True)
    adapted = Voice(
        model=model,
        sample_rate=voice.sample_rate,
        phoneme_id_map=voice.phoneme_id_map,
        settings=voice.settings,
        report={"source": str(voice.path), "adapted": True, "trained": trained, "steps": cfg.steps},
        espeak_voice=voice.espeak_voice,
        path=voice.path,
        config=voice.config,
    )
    saved = None
    if out_dir is not None:
        info = {
            "source_voice": str(voice.path),
            "init": cfg.init,
            "steps": cfg.steps,
            "trained": trained,
            "frozen": list(cfg.frozen),
            "data": data.summary(),
            "final_loss": history[-1] if history else None,
            "config": record,
        }

        def fill(tmp: Path) -> None:
            save_voice(adapted, tmp, adaptation=info)
            save_tensors(tmp / POSTERIOR, posterior.state_dict())  # to continue training it later

        # built aside and swapped in whole: a voice folder on disk is always a complete one (a stage's done rule)
        saved = replace_dir(Path(save_to).expanduser() if save_to is not None else out_dir / "voice", fill)
        adapted.path = saved
    return {
        "voice": adapted,
        "posterior": posterior,
        "history": history,
        "steps": cfg.steps,
        "seconds_per_step": seconds,
        "trainable": trained,
        "frozen": list(cfg.frozen),
        "trainable_parameters": sum(p.numel() for p in params),
        "out": saved,
    }


def _check_finite(step: int, losses: dict[str, torch.Tensor]) -> None:
    if not all(bool(torch.isfinite(v.detach()).all()) for v in losses.values()):
        parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        raise TrainingError(
            f"step {step + 1}: the loss is not finite ({parts}); lower lr, set grad_clip, or check the target "
            "audio (silence or clipping)"
        )


def evaluate_losses(
    model: VITS, posterior: PosteriorEncoder, items: Sequence[Item], cfg: AdaptConfig, rate: int, seed: int = 12345
) -> dict[str, float]:
    """The training losses on all ``items`` at once, with fixed noise and windows (``seed``): comparable before and
    after training."""
    with torch.no_grad():
        fwd = training_forward(model, posterior, collate(items), cfg, rate, torch.Generator().manual_seed(seed))
    return {k: float(v) for k, v in fwd.losses.items()}
