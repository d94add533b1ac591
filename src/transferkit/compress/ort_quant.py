"""int8 quantization of an exported ONNX model with ONNX Runtime's own tools (``onnxruntime.quantization``).

``quantize_onnx(folder, out)`` reads an exported folder (``export_onnx``'s) and writes another one, ``out/``, whose
``model.onnx`` is int8:

- ``dynamic`` (``quantize_dynamic``): int8 weights; activations quantized on the fly, per batch. Suits Linear-heavy
  models (transformer text encoders): the MatMuls run as integer MatMuls, nothing to calibrate. The graph uses
  ONNX Runtime's integer operators (``DynamicQuantizeLinear`` + ``MatMulInteger``), so its format is recorded as
  ``QOperator``.
- ``static`` (``quantize_static``): weights and activations int8 (QDQ: ``QuantizeLinear``/``DequantizeLinear`` pairs
  around each quantized operator, which ONNX Runtime fuses into integer kernels), activation ranges calibrated
  (min/max) on real training batches. Suits conv nets, whose convolutions dynamic mode leaves in float.

Weights are scaled per output channel by default (``per_channel``). The graph goes through
``quant_pre_process`` first (symbolic shape inference, then ONNX Runtime's graph optimisations), as ONNX Runtime
advises; where symbolic shape inference gives up (MiniLM's attention reshapes), the model is quantized without the
pre-pass, which is recorded. The int8 model is compared with the fp32 export on ``examples``: informative figures
in ``export_report.json``, an error only when the two agree on the top-1 class of fewer than ``atol_top1`` of the
inputs (the quantized model is then broken, not merely rounded).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from transferkit.compress.export import ort_feed, ort_session
from transferkit.errors import CompressError
from transferkit.io import read_json, replace_dir, write_json

MODES = ("dynamic", "static")


def quantize_onnx(
    folder: str | Path,
    out: str | Path,
    *,
    mode: Literal["dynamic", "static"] = "dynamic",
    calibration: Sequence[Any] | None = None,
    per_channel: bool = True,
    examples: Sequence[Any] | None = None,
    atol_top1: float = 0.5,
) -> dict[str, Any]:
    """An int8 copy of the exported model in ``folder``, written to ``out`` (an exported folder, swapped in whole).

    Args:
        folder: an exported folder (``model.onnx``, ``model.json``), from ``export_onnx``.
        out: the int8 folder to write; it must not be ``folder`` (the fp32 model is the reference).
        mode: ``dynamic`` or ``static`` (see the module docstring).
        calibration: for ``static``, real training batches as the model takes them (``make_batch``'s, or a loader's
            inputs: tensors, dicts of tensors or of arrays), whose activations set the int8 ranges.
        per_channel: int8 weight scales per output channel (else one per tensor).
        examples: batches the int8 model is compared on with the fp32 one (validation inputs); without them the
            calibration batches are used, and without either there are no figures.
        atol_top1: the lowest top-1 agreement with the fp32 model accepted (a fraction of the inputs).

    Returns:
        The comparison, as written to ``export_report.json``: ``top1_agreement``, ``max_abs_diff``,
        ``max_rel_diff``, ``examples``, file sizes, ``mode``, ``per_channel``, ``format``, ``calibration_examples``.

    Raises:
        CompressError: ``folder`` is not an exported folder, the options do not fit, ONNX Runtime fails to quantize,
            or the int8 model's top-1 agreement is below ``atol_top1``.
    """
    folder, out = Path(folder), Path(out)
    if not (folder / "model.onnx").is_file() or not (folder / "model.json").is_file():
        raise CompressError(
            f"'{folder}' is not an exported model folder (model.onnx and model.json); export the model first with "
            "transferkit.compress.export.export_onnx"
        )
    if out.resolve() == folder.resolve():
        raise CompressError(
            f"out is the exported folder '{folder}' itself; give another folder: the fp32 model is kept"
        )
    if mode not in MODES:
        raise CompressError(f"unknown quantization mode '{mode}'; valid: {', '.join(MODES)}")
    if mode == "static" and not calibration:
        raise CompressError(
            "static int8 needs calibration batches (real training inputs, batched as the model takes them) to set "
            "the activation ranges; give calibration=[...], or use mode='dynamic'"
        )
    if not 0 <= atol_top1 <= 1:
        raise CompressError(f"atol_top1={atol_top1}: give the lowest top-1 agreement accepted, between 0 and 1")
    meta = read_json(folder / "model.json")
    if "export" not in meta:
        raise CompressError(f"'{folder}/model.json' has no export record; export the model with export_onnx first")
    fp32 = ort_session(folder / "model.onnx")
    inputs = [i.name for i in fp32.get_inputs()]
    compare = list(examples) if examples else list(calibration or [])
    report: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        onnx_path = tmp / "model.onnx"
        pre = _quantize(folder / "model.onnx", onnx_path, mode, per_channel, calibration, inputs)
        record = {
            "backend": "onnxruntime",
            "mode": mode,
            "per_channel": per_channel,
            "format": "QDQ" if mode == "static" else "QOperator",
            "calibration_examples": sum(_rows(b) for b in calibration or []) if mode == "static" else 0,
            "pre_process": pre,
        }
        report.update(_compare(fp32, ort_session(onnx_path), compare, inputs))
        report.update(
            {
                "reference": "the fp32 ONNX export",
                "compared_on": "examples" if examples else ("calibration batches" if compare else "nothing"),
                **record,
                "atol_top1": atol_top1,
                "fp32_file_bytes": (folder / "model.onnx").stat().st_size,
                "file_bytes": onnx_path.stat().st_size,
                "size_ratio": onnx_path.stat().st_size / (folder / "model.onnx").stat().st_size,
                "onnxruntime_version": _ort_version(),
            }
        )
        agreement = report["top1_agreement"]
        if agreement is not None and agreement < atol_top1:
            raise CompressError(
                f"the {mode} int8 model agrees with the fp32 export on the top-1 class of only {agreement:.1%} of "
                f"{report['examples']} inputs (at least {atol_top1:.0%} expected; max abs logit difference "
                f"{report['max_abs_diff']:.3g}): it is broken, not rounded. Nothing was written. Try "
                f"{'more or more varied calibration batches, ' if mode == 'static' else ''}per_channel=True, or the "
                "other mode"
            )
        if (folder / "processor").is_dir():
            shutil.copytree(folder / "processor", tmp / "processor")
        write_json(tmp / "model.json", {**meta, "onnx_quantized": record})
        write_json(tmp / "export_report.json", report)

    replace_dir(out, fill)
    return report


def _quantize(
    source: Path, target: Path, mode: str, per_channel: bool, calibration: Sequence[Any] | None, inputs: list[str]
) -> str:
    """Write the int8 graph of ``source`` to ``target``; return which pre-pass ran (``quant_pre_process`` or none)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Batches(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
        """The calibration batches as ONNX Runtime's feeds, one per ``get_next``."""

        def __init__(self) -> None:
            self.batches: Iterator[Any] = iter(calibration or [])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else ort_feed(batch, inputs)

    with tempfile.TemporaryDirectory(prefix="transferkit-quant-") as scratch:
        model, pre = _pre_process(source, Path(scratch) / "pre.onnx")
        try:
            with _quiet():
                if mode == "dynamic":
                    quantize_dynamic(model, target, per_channel=per_channel, weight_type=QuantType.QInt8)
                else:
                    quantize_static(
                        model,
                        target,
                        Batches(),
                        quant_format=QuantFormat.QDQ,
                        per_channel=per_channel,
                        activation_type=QuantType.QUInt8,  # u8 activations, s8 weights: ORT's fast CPU kernels
                        weight_type=QuantType.QInt8,
                    )
        except CompressError:
            raise
        except Exception as e:  # ONNX Runtime's quantizer raises plain exceptions of many types
            raise CompressError(
                f"ONNX Runtime could not quantize '{source}' ({mode}): {type(e).__name__}: {e}. Try the other mode, "
                "or per_channel=False"
            ) from e
    return pre


@contextlib.contextmanager
def _working_directory(folder: Path) -> Iterator[None]:
    """The process's working directory is ``folder`` for the block (and put back after, even on error)."""
    import os

    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _pre_process(source: Path, target: Path) -> tuple[Path, str]:
    """``quant_pre_process`` into ``target`` where it succeeds (``source`` as it is, otherwise)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        # its symbolic shape inference writes scratch files (sym_shape_infer_temp.onnx, UUID.data of the weights)
        # into the working directory and leaves them there when it gives up: it runs in the scratch folder instead
        with _quiet(), _working_directory(target.parent):
            quant_pre_process(str(source.resolve()), str(target.resolve()))
    except Exception:  # symbolic shape inference gives up on some graphs: quantization works without it
        return source, "none (quant_pre_process failed: symbolic shape inference incomplete)"
    return target, "quant_pre_process"


def _compare(fp32: Any, int8: Any, batches: list[Any], inputs: list[str]) -> dict[str, Any]:
    """The int8 model's logits against the fp32 model's on ``batches``."""
    if not batches:
        return {"top1_agreement": None, "max_abs_diff": None, "max_rel_diff": None, "examples": 0}
    max_abs, max_logit, agree, total = 0.0, 0.0, 0, 0
    for batch in batches:
        feed = ort_feed(batch, inputs)
        ref, got = fp32.run(None, feed)[0], int8.run(None, feed)[0]
        max_abs = max(max_abs, float(np.abs(ref - got).max()))
        max_logit = max(max_logit, float(np.abs(ref).max()))
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
        total += len(ref)
    return {
        "top1_agreement": agree / total,
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / max(max_logit, 1e-12),
        "examples": total,
    }


def _rows(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return int(first.shape[0])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice and progress through the root logger and print: kept out of the
    caller's output (its errors still raise)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)
