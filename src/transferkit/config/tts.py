"""The ``tts:`` section of a recipe: a pretrained VITS voice adapted to a new speaker, run by ``transferkit run``.

Example (a folder of the new speaker's WAV files with ``metadata.csv``, ``file|text`` per line, LJSpeech style)::

    name: new-voice
    tts:
      data: recordings/               # metadata.csv + WAVs (resampled to the voice's rate)
      voice: null                     # the packaged voice (en_US joe, VITS); or an .onnx voice, a saved voice
      arms: [adapted, scratch]        # adapted: from the voice; scratch: the same model from random weights
      steps: 300
      frozen: [enc_p, dp]             # text encoder and duration predictor kept; flow, decoder, posterior trained

The source voice is always measured too, untrained, on the same held-out sentences.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from transferkit.errors import did_you_mean

# the parts of a VITS voice a strategy trains or freezes: text encoder, duration predictor, flow, HiFi-GAN decoder,
# posterior encoder (fresh: the exported voice has none)
TTS_PARTS = ("enc_p", "dp", "flow", "dec", "enc_q")
Arm = Literal["adapted", "scratch"]


class TtsConfig(BaseModel):
    """Speaker adaptation of a VITS voice (``transferkit.tts``)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="a folder with metadata.csv (file|text per line) and the WAV files")
    voice: str | None = Field(default=None, description="an .onnx voice, a saved voice or a run (default: packaged)")
    held_out: float = Field(default=0.1, gt=0, description="utterances kept out for measuring: a fraction or count")
    max_seconds: float | None = Field(default=30.0, gt=0, description="longer recordings are refused")
    arms: list[Arm] = Field(default_factory=lambda: list[Arm](["adapted"]), min_length=1)
    steps: int = Field(default=200, ge=1)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    grad_clip: float | None = Field(default=None, gt=0)
    segment_frames: int = Field(default=32, ge=4, description="latent frames the decoder trains on per utterance")
    posterior_layers: int = Field(default=16, ge=1)
    posterior_warmup: int = Field(default=0, ge=0, description="first steps in which only the posterior trains")
    frozen: list[str] = Field(default_factory=lambda: ["enc_p", "dp"], description=f"of {', '.join(TTS_PARTS)}")
    adversarial: bool = Field(default=False, description="train a discriminator from scratch too (slow on CPU)")
    checkpoint_every: int = Field(default=50, ge=1)

    @field_validator("frozen")
    @classmethod
    def _parts(cls, v: list[str]) -> list[str]:
        for part in v:
            if part not in TTS_PARTS:
                raise ValueError(
                    f"'{part}' is not a part of a VITS voice.{did_you_mean(part, TTS_PARTS)} Parts: "
                    f"{', '.join(TTS_PARTS)}"
                )
        return v

    @field_validator("arms")
    @classmethod
    def _unique(cls, v: list[Arm]) -> list[Arm]:
        if len(set(v)) != len(v):
            raise ValueError(f"each arm once: {v}")
        return v
