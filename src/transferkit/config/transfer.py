"""The recipe's ``transfer:`` step: how the target is built from the source by the transfer machinery.

A recipe without ``transfer:`` trains the source's own architecture with a new head (``build_target``). With it,
the target is another architecture, or the same one with other input channels, image size or depth, and its
weights come from the source through ``transfer`` (names, rules, structure; surgery where shapes differ)::

    transfer:
      in_chans: 1                       # grey images: the first convolution summed over RGB
    transfer:
      target: timm:vit_tiny_patch16_224
      img_size: 96                      # position embeddings resized (bicubic)
      rules: [{from: '^features\\.(\\d+)', to: 'blocks.\\1'}]
      strict: true                      # an ambiguous pairing is an error
    transfer:
      kwargs: {depth: 6}                # a shallower ViT ...
      source_blocks: every_other        # ... initialised from blocks 0, 2, 4... of the source

Plain pydantic, no torch: the recipe validates it without importing models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Method = Literal["names", "rules", "structure"]
METHOD_NAMES: tuple[Method, ...] = ("names", "rules", "structure")

LAYER_CHOICES = ("every_other", "uniform", "first", "last")


class TransferConfig(BaseModel):
    """How the target is built and initialised from the source (every field maps onto ``transfer()``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    target: str | None = Field(
        default=None,
        description="target architecture (timm:NAME, torchvision:NAME, hf:NAME); "
        "default: the source's own architecture",
    )
    in_chans: int | None = Field(
        default=None,
        ge=1,
        description="input channels of the target (1 = grey images: "
        "the first convolution summed over RGB; N: repeated and scaled)",
    )
    img_size: int | None = Field(
        default=None,
        ge=8,
        description="input size of a ViT-style target (position "
        "embeddings resized); set data.image_size to the same or leave it unset",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="other architecture arguments, e.g. {depth: 6}")
    rules: list[dict[str, str]] = Field(default_factory=list, description="regex renames [{from: REGEX, to: REPL}]")
    methods: list[Method] = Field(
        default_factory=lambda: list(METHOD_NAMES), min_length=1, description="matching passes, in order"
    )
    strict: bool = Field(default=False, description="an ambiguous structural pairing is an error")
    extra_blocks: Literal["fresh", "identity"] = Field(
        default="fresh", description="target blocks that get no weights: random, or the identity (net2net-deeper)"
    )
    source_blocks: Literal["every_other", "uniform", "first", "last"] | list[int] | None = Field(
        default=None, description="a shallower target takes these source blocks (or explicit indices)"
    )
    resize: bool = Field(
        default=False, description="slice/tile same-role tensors of other shapes (an initialisation, not exact)"
    )
    widen: Literal["net2net"] | None = Field(
        default=None,
        description="net2net: a wider target copies channels "
        "(function-preserving), a narrower one keeps the largest by weight "
        "norm; plain Linear/Conv(+BatchNorm) chains only",
    )

    @field_validator("rules")
    @classmethod
    def _rules_compile(cls, v: list[dict[str, str]]) -> list[dict[str, str]]:
        import re

        for i, rule in enumerate(v):
            if set(rule) != {"from", "to"}:
                raise ValueError(f"rule {i} {rule} must have exactly the keys 'from' and 'to'")
            try:
                re.compile(rule["from"])
            except re.error as e:
                raise ValueError(f"rule {i}: {rule['from']!r} is not a valid regex: {e}") from e
        return v

    @field_validator("kwargs")
    @classmethod
    def _no_twins(cls, v: dict[str, Any]) -> dict[str, Any]:
        twins = sorted({"in_chans", "img_size"} & set(v))
        if twins:
            raise ValueError(f"give {', '.join(twins)} as transfer.{twins[0]}, not inside transfer.kwargs")
        return v

    def arch_kwargs(self) -> dict[str, Any]:
        """The architecture keyword arguments: ``kwargs`` plus ``in_chans`` and ``img_size`` when set."""
        out = dict(self.kwargs)
        if self.in_chans is not None:
            out["in_chans"] = self.in_chans
        if self.img_size is not None:
            out["img_size"] = self.img_size
        return out
