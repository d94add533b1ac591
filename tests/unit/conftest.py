"""Shared fixtures for the unit tests: small images, the built-in MNIST subset, a tiny timm model, a recipe."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """``write_image(path, color=(r, g, b), size=16, fmt=None)`` writes a real, decodable image file."""

    def write(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: int = 16, fmt: str | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), color).save(path, format=fmt)
        return path

    return write


@pytest.fixture
def write_truncated_jpeg() -> Callable[[Path], Path]:
    """A real JPEG (noise, so it has many bytes) with its second half cut off."""

    def write(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path

    return write


@pytest.fixture(scope="session")
def mnist5k() -> Any:
    """The built-in 5,000-digit MNIST subset, read once per session (about a second)."""
    from transferkit.data import read_dataset

    return read_dataset("mnist5k")


@pytest.fixture
def tiny_model() -> Callable[..., Any]:
    """``tiny_model(labels=("a", "b", "c"), seed=0)``: timm ``test_efficientnet`` (random weights), new head."""
    import torch

    from transferkit.sources import load_source

    def make(labels: tuple[str, ...] = ("a", "b", "c"), seed: int = 0) -> Any:
        torch.manual_seed(seed)
        model = load_source({"name": "timm:test_efficientnet", "pretrained": False})
        model.reset_head(len(labels), list(labels))
        return model.eval()

    return make


@pytest.fixture
def base_recipe() -> dict[str, Any]:
    """The smallest valid recipe: nothing in it needs the network or a file."""
    return {"name": "t", "source": "timm:test_efficientnet", "data": {"dataset": "mnist5k"}}


# The bad-input corpus (docs/reliability.md): after every case, nothing half-written may be left in the test's
# folder, whether the case ended in an error or not (issue 18: "zero files left half-written").
_CORPUS_MODULES = {
    "test_bad_inputs_more",
    "test_bad_inputs_cli",
    "test_bad_images",
    "test_recipe",
    "test_io",
    "test_data",
    "test_recsys",
    "test_unlabelled_pool",
    "test_audio",
    "test_text",
    "test_sources",
    "test_recipe_keys",
    "test_errors_registry",
    "test_demo_cli",
    "test_disk_full",
    "test_tts_adapt",
    "test_tts_vits",
}


@pytest.fixture(autouse=True)
def _nothing_half_written(request: pytest.FixtureRequest) -> Any:
    yield
    if request.module.__name__.rsplit(".", 1)[-1] not in _CORPUS_MODULES:
        return
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is None:
        return
    from transferkit.io import is_temporary

    left = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if is_temporary(p))
    assert not left, f"half-written temporaries left behind: {left}"
