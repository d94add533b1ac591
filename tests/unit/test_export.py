"""ONNX export checked against PyTorch (``compress.export``) and ONNX Runtime int8 (``compress.ort_quant``).

Real weights and data: EfficientNet-Lite0 on MNIST-5k digits (64 px), all-MiniLM-L6-v2 on Rotten Tomatoes reviews
(32 tokens), a seq:gru encoder on FSDD MFCC frames. The image and text heads are fitted (L-BFGS on 200 training
examples' features) so that int8 top-1 agreement measures something: a fresh head's logits all but tie.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from transferkit.compress.export import export_onnx
from transferkit.compress.ort_quant import quantize_onnx
from transferkit.config import SourceSpec
from transferkit.data import read_dataset
from transferkit.data.modality import make_batch
from transferkit.errors import CompressError, ExportError
from transferkit.models.base import MultiTaskModel, SourceModel, save_model
from transferkit.sources import load_source
from transferkit.transfer import build_target

MNIST = [str(i) for i in range(10)]


def fit_head(model: SourceModel, items: list[Any], labels: np.ndarray) -> SourceModel:
    """The head fitted by L-BFGS on the frozen backbone's features of ``items`` (an L2-regularised linear probe: the
    logits of a trained model, not the hundreds an unregularised probe on separable features reaches), in eval mode."""
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(make_batch(model, items[i : i + 50])) for i in range(0, len(items), 50)])
    y = torch.as_tensor(labels)
    opt = torch.optim.LBFGS(model.head.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model.head(feats), y) + 1e-3 * model.head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def batches(model: SourceModel, items: list[Any], size: int = 25) -> list[Any]:
    return [make_batch(model, items[i : i + size]) for i in range(0, len(items), size)]


@pytest.fixture(scope="module")
def lite0(mnist5k) -> tuple[SourceModel, list[Any], list[Any]]:
    """Lite0 at 64 px, head fitted on 200 training digits; (model, calibration batches, 200 held-out check batches)."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(mnist5k.items))
    train, held = order[:200], order[200:400]
    model = build_target(load_source(SourceSpec(name="efficientnet_lite0")), MNIST)
    model.preprocess = {**model.preprocess, "input_size": [3, 64, 64]}
    fit_head(model, [mnist5k.items[i] for i in train], mnist5k.labels[train])
    return (
        model,
        batches(model, [mnist5k.items[i] for i in train[:128]], 16),
        batches(model, [mnist5k.items[i] for i in held]),
    )


@pytest.fixture(scope="module")
def lite0_export(lite0, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    model, _, checks = lite0
    folder = tmp_path_factory.mktemp("lite0") / "onnx"
    return folder, export_onnx(model, checks, folder)


@pytest.fixture(scope="module")
def reviews() -> Any:
    return read_dataset("rotten_tomatoes", modality="text")


@pytest.fixture(scope="module")
def minilm(reviews) -> tuple[SourceModel, list[Any]]:
    rng = np.random.default_rng(0)
    order = rng.permutation(len(reviews.items))
    train, held = order[:200], order[200:400]
    model = build_target(load_source(SourceSpec(name="all-minilm-l6-v2")), reviews.classes)
    model.preprocess = {**model.preprocess, "max_length": 32}
    fit_head(model, [reviews.items[int(i)] for i in train], reviews.labels[train])
    return model, batches(model, [reviews.items[int(i)] for i in held])


@pytest.fixture(scope="module")
def minilm_export(minilm, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    model, checks = minilm
    folder = tmp_path_factory.mktemp("minilm") / "onnx"
    return folder, export_onnx(model, checks, folder)


def ort_logits(folder: Path, batch: Any) -> np.ndarray:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {n: batch[n].numpy() for n in names} if isinstance(batch, dict) else {names[0]: batch.numpy()}
    return session.run(None, feed)[0]


def tiny_image_model(seed: int = 0) -> SourceModel:
    torch.manual_seed(seed)
    model = load_source({"name": "timm:test_efficientnet", "pretrained": False})
    model.reset_head(3, ["a", "b", "c"])
    model.preprocess = {**model.preprocess, "input_size": [3, 32, 32]}
    nn.init.normal_(model.head.weight, std=1.0)  # logits far apart: ties cannot decide top-1
    return model.eval()


# ---------------------------------------------------------------------------------------------------- export


@pytest.mark.slow  # exporting Lite0 through torch.export takes ~12 s here
def test_lite0_export_matches_pytorch_on_mnist_and_writes_the_folder(lite0, lite0_export) -> None:
    model, _, checks = lite0
    folder, report = lite0_export
    assert report["max_rel_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    assert report["max_abs_diff"] < 1e-3 and report["examples"] == 200 and report["example_batches"] == 8
    assert report["batch_sizes"] == [1, 24, 25]  # slices of the traced batch of 25: the batch axis is dynamic
    assert report["opset"] >= 18 and report["onnxruntime_version"] == ort.__version__
    assert report["torch_version"] == torch.__version__
    assert report["file_bytes"] == (folder / "model.onnx").stat().st_size > 10_000_000  # 3.4M float32 weights
    assert json.loads((folder / "export_report.json").read_text()) == report
    assert sorted(p.name for p in folder.iterdir()) == ["export_report.json", "model.json", "model.onnx"]

    meta = json.loads((folder / "model.json").read_text())
    saved = json.loads((save_model(model, folder.parent / "saved") / "model.json").read_text())
    assert {k: v for k, v in meta.items() if k != "export"} == saved
    assert meta["export"] == {
        "format": "onnx",
        "opset": report["opset"],
        "inputs": ["pixel_values"],
        "output": "logits",
        "dynamic_axes": {"pixel_values": {"0": "batch"}},
    }
    assert meta["labels"] == MNIST and meta["preprocess"]["input_size"] == [3, 64, 64]

    # other batch sizes than any the export saw, straight through ONNX Runtime
    both = torch.cat([checks[0], checks[1]])[:37]
    with torch.no_grad():
        ref = model(both).numpy()
    got = ort_logits(folder, both)
    assert got.shape == (37, 10)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.slow  # MiniLM through torch.export: ~11 s
def test_minilm_export_matches_pytorch_on_reviews_with_dynamic_length(minilm, minilm_export, reviews) -> None:
    model, _ = minilm
    folder, report = minilm_export
    assert report["max_rel_diff"] <= 1e-4 and report["top1_agreement"] == 1.0 and report["examples"] == 200
    meta = json.loads((folder / "model.json").read_text())
    assert meta["export"]["inputs"] == ["input_ids", "token_type_ids", "attention_mask"]
    assert meta["export"]["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "sequence"}
    assert meta["task"] == "text_classification" and meta["preprocess"]["max_length"] == 32
    assert (folder / "processor" / "tokenizer.json").is_file()
    # a length and a batch size the export never saw: 3 short reviews (padded to 9 tokens or so)
    short = make_batch(model, ["a joyous triumph", "dull", "I hated every minute of it"])
    assert short["input_ids"].shape[1] < 16
    with torch.no_grad():
        ref = model(short).numpy()
    got = ort_logits(folder, short)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4 and (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.slow  # ~16 s: torch.export of the GRU layers
def test_gru_frames_export_matches_the_packed_pytorch_gru(tmp_path) -> None:
    fsdd = read_dataset("fsdd_digits", modality="frames")
    torch.manual_seed(0)
    model = build_target(load_source(SourceSpec(name="seq:gru", pretrained=False)), MNIST).eval()
    nn.init.normal_(model.head.weight, std=1.0)
    items = list(fsdd.items[:60])
    report = export_onnx(model, batches(model, items, 20), tmp_path / "gru")
    assert report["max_rel_diff"] <= 1e-4 and report["top1_agreement"] == 1.0 and report["examples"] == 60
    meta = json.loads((tmp_path / "gru" / "model.json").read_text())
    assert meta["export"]["inputs"] == ["frames", "attention_mask"]
    # utterances of very different lengths in one batch: the backward GRU must start at each one's last frame
    mixed = make_batch(model, [fsdd.items[i] for i in (100, 101, 102)] + [fsdd.items[103][:5]])
    lengths = mixed["attention_mask"].sum(1)
    assert lengths.max() > 2 * lengths.min()
    with torch.no_grad():
        ref = model(mixed).numpy()
    got = ort_logits(tmp_path / "gru", mixed)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


class _ExportsDifferently(nn.Module):
    """A head that shifts its logits while torch.export traces it: the exported graph is not the eager model."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if torch.compiler.is_exporting():
            return y + 10.0 * torch.arange(y.shape[1], dtype=y.dtype)
        return y


def test_an_export_that_differs_raises_and_leaves_no_folder(tmp_path) -> None:
    model = tiny_image_model()
    model.head = _ExportsDifferently(model.head)
    with pytest.raises(ExportError, match=r"disagrees with PyTorch .* top-1 agreement 0\.\d+ \(1\.0 needed\)"):
        export_onnx(model, [torch.randn(4, 3, 32, 32)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


def test_a_failed_export_leaves_an_existing_folder_as_it_was(tmp_path, monkeypatch) -> None:
    """ONNX Runtime's output nudged by 1e-3 of the largest logit: over atol 1e-4, though every top-1 agrees."""
    import transferkit.compress.export as export

    real = export.ort_session

    class Nudged:
        def __init__(self, session: Any):
            self.session = session

        def get_inputs(self) -> Any:
            return self.session.get_inputs()

        def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            out = self.session.run(names, feed)[0]
            return [out + 1e-3 * np.abs(out).max()]

    monkeypatch.setattr(export, "ort_session", lambda path, threads=None: Nudged(real(path, threads)))
    old = tmp_path / "out"
    old.mkdir()
    (old / "keep.txt").write_text("the previous export")
    with pytest.raises(
        ExportError, match=r"0\.001 of the largest \|logit\| .*\(atol 0\.0001 allowed\); top-1 agreement 1\.0000"
    ):
        export_onnx(tiny_image_model(), [torch.randn(4, 3, 32, 32)], old)
    assert [p.name for p in old.iterdir()] == ["keep.txt"] and (old / "keep.txt").read_text() == "the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_refuses_what_it_cannot_check(tmp_path) -> None:
    model = tiny_image_model()
    with pytest.raises(CompressError, match="needs example batches"):
        export_onnx(model, [], tmp_path / "a")
    with pytest.raises(CompressError, match="every batch here holds 1 input: .* at least one example batch of 2"):
        export_onnx(model, [torch.randn(1, 3, 32, 32)], tmp_path / "a")
    with pytest.raises(CompressError, match=r"dynamic_batch=False .* hold \[2, 3\] inputs"):
        export_onnx(model, [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)], tmp_path / "a", dynamic_batch=False)
    with pytest.raises(CompressError, match="atol=0: give a positive tolerance"):
        export_onnx(model, [torch.randn(2, 3, 32, 32)], tmp_path / "a", atol=0)
    merged = MultiTaskModel(model.backbone, [model.head, model.head], ["x", "y"], [None, None], model.arch,
                            model.preprocess, model.num_features)  # fmt: skip
    with pytest.raises(CompressError, match=r"multi-task model \(tasks: x, y\).*export_onnx\(model\.task\(NAME\)"):
        export_onnx(merged, [torch.randn(2, 3, 32, 32)], tmp_path / "a")  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists()


def test_fixed_batch_export_has_no_batch_axis(tmp_path) -> None:
    model = tiny_image_model()
    report = export_onnx(model, [torch.randn(3, 3, 32, 32)] * 2, tmp_path / "fixed", dynamic_batch=False)
    assert report["batch_sizes"] == [3] and report["top1_agreement"] == 1.0
    session = ort.InferenceSession(str(tmp_path / "fixed" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [3, 3, 32, 32]
    assert json.loads((tmp_path / "fixed" / "model.json").read_text())["export"]["dynamic_axes"] == {"pixel_values": {}}


# ---------------------------------------------------------------------------------------------------- int8


@pytest.mark.slow  # static calibration of Lite0 twice: ~10 s
def test_static_int8_lite0_agrees_with_fp32_on_real_digits(lite0, lite0_export, tmp_path) -> None:
    _, calibration, checks = lite0
    folder, _ = lite0_export
    report = quantize_onnx(folder, tmp_path / "int8", mode="static", calibration=calibration, examples=checks)
    # measured: 0.895 of the 200 held-out digits (64 px, min/max calibration on 128 training digits; the fp32 probe
    # is right on 78.5% of them, the int8 model on 74%); per-tensor weight scales agree on 58% only
    assert report["top1_agreement"] >= 0.85 and report["examples"] == 200 and report["compared_on"] == "examples"
    assert report["file_bytes"] < 0.35 * report["fp32_file_bytes"] and report["size_ratio"] < 0.35
    assert report["file_bytes"] == (tmp_path / "int8" / "model.onnx").stat().st_size
    meta = json.loads((tmp_path / "int8" / "model.json").read_text())
    fp32 = json.loads((folder / "model.json").read_text())
    assert "quantized" not in meta  # load_model's key for PyTorch-quantized weights
    assert meta["onnx_quantized"] == {
        "backend": "onnxruntime",
        "mode": "static",
        "per_channel": True,
        "format": "QDQ",
        "calibration_examples": 128,
        "pre_process": "quant_pre_process",
    }
    assert {k: v for k, v in meta.items() if k != "onnx_quantized"} == fp32
    assert json.loads((tmp_path / "int8" / "export_report.json").read_text()) == report
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    # an agreement floor the model does not reach is an error naming the figure, and nothing is written
    shown = f"{report['top1_agreement']:.1%}".replace(".", r"\.")
    with pytest.raises(CompressError, match=rf"agrees with the fp32 export on the top-1 class of only {shown} of 200"):
        quantize_onnx(folder, tmp_path / "strict", mode="static", calibration=calibration, examples=checks,
                      atol_top1=1.0)  # fmt: skip
    assert not (tmp_path / "strict").exists()


@pytest.mark.slow  # ~5 s on top of the MiniLM export
def test_dynamic_int8_minilm_agrees_with_fp32_on_real_reviews(minilm, minilm_export, tmp_path) -> None:
    _, checks = minilm
    folder, _ = minilm_export
    report = quantize_onnx(folder, tmp_path / "int8", mode="dynamic", examples=checks)
    assert report["top1_agreement"] >= 0.9 and report["examples"] == 200  # measured: 0.94
    assert report["file_bytes"] < 0.3 * report["fp32_file_bytes"]  # 23.5 MB against 91 MB
    meta = json.loads((tmp_path / "int8" / "model.json").read_text())
    assert meta["onnx_quantized"]["mode"] == "dynamic" and meta["onnx_quantized"]["format"] == "QOperator"
    assert meta["onnx_quantized"]["calibration_examples"] == 0
    assert (tmp_path / "int8" / "processor" / "tokenizer.json").is_file()
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops


def test_quantize_refuses_bad_folders_and_options(tmp_path) -> None:
    with pytest.raises(CompressError, match=r"not an exported model folder \(model.onnx and model.json\).*export_onnx"):
        quantize_onnx(tmp_path, tmp_path / "out")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model.onnx").write_bytes(b"")
    (fake / "model.json").write_text("{}")
    with pytest.raises(CompressError, match="static int8 needs calibration batches"):
        quantize_onnx(fake, tmp_path / "out", mode="static")
    with pytest.raises(CompressError, match="unknown quantization mode 'int4'; valid: dynamic, static"):
        quantize_onnx(fake, tmp_path / "out", mode="int4")  # type: ignore[arg-type]
    with pytest.raises(CompressError, match="out is the exported folder"):
        quantize_onnx(fake, fake)
    with pytest.raises(CompressError, match="has no export record"):
        quantize_onnx(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()
