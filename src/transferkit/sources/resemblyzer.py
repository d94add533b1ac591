"""Built-in audio source ``resemblyzer-speaker-encoder``: Resemblyzer's GE2E speaker encoder (3-layer LSTM, 40 power
mel bands -> 256-d L2-normalised embedding, 1.42M parameters), its weights read from the ``resemblyzer`` wheel
(``pretrained.pt``) into transferkit's own module (``models.audio.SpeakerEncoder``); the package is never imported.

It takes 16 kHz waveforms: any audio folder is resampled to 16 kHz, and the mel front end runs inside the model.
"""

from __future__ import annotations

from transferkit.models.base import SourceModel

NAME = "resemblyzer-speaker-encoder"


def load_resemblyzer(pretrained: bool = True) -> SourceModel:
    from transferkit.models.base import build_backbone
    from transferkit.sources import _from_backbone

    arch = {"family": "resemblyzer", "name": NAME, "kwargs": {}}
    model = _from_backbone(build_backbone(arch, pretrained=pretrained), arch, None)
    model.origin = {k: f"{NAME}:{k}" for k in model.state_dict()} if pretrained else {}
    return model


from transferkit.sources import BUILTIN_SOURCES  # noqa: E402

BUILTIN_SOURCES.register(
    NAME,
    help="Resemblyzer speaker encoder (audio, 16 kHz, 3-layer LSTM over 40 mel bands, 256-d speaker embedding; "
    "from the resemblyzer wheel)",
)(load_resemblyzer)
