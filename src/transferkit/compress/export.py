"""ONNX export of a ``SourceModel``, checked against PyTorch before the folder exists.

``export_onnx(model, examples, folder)`` writes ``folder/`` (swapped in whole, see ``transferkit.io.replace_dir``):

- ``model.onnx``: inputs named as the model's batch (``pixel_values`` for an image tensor; the keys of a text or
  audio batch: ``input_ids``, ``attention_mask``...), output ``logits``; a dynamic batch axis, and a dynamic
  sequence axis for token ids, masks, frames and waveforms;
- ``model.json``: what ``save_model`` writes for the model (labels, preprocessing...) plus an ``export`` record;
- ``processor/``: the tokenizer (or feature extractor) of a text or audio model;
- ``export_report.json``: ONNX Runtime against PyTorch eager on every example batch.

The exporter is ``torch.onnx.export(dynamo=True)`` (``torch.export`` then ONNX). The TorchScript exporter still
exists in torch 2.14 and is 5-8x faster to run, but it traces: on MiniLM (transformers 5) it baked the example's
attention mask into the graph (logits off by 0.03, top-1 flips on other batches), and on ``seq:gru`` it baked the
example's sequence lengths. ``torch.export`` records those as graph inputs, and the parity check here would have
caught both. Packed sequences (``pack_padded_sequence``) do not go through ``torch.export``, so a ``seq:gru``
encoder is exported as the same GRUs run on padded frames (``_PaddedGRUEncoder``: the backward direction reads
each utterance reversed within its length), which gives what the packed GRU gives, to float rounding.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.errors import CompressError, ExportError
from transferkit.io import replace_dir, write_json
from transferkit.models.audio import SequenceEncoder, masked_mean
from transferkit.models.base import MultiTaskModel, SourceModel, save_model

IMAGE_INPUT = "pixel_values"  # the input name of an image model (its batch is one tensor, not a dict)
OUTPUT = "logits"
SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "frames", "input_values")  # axis 1 varies


def export_onnx(
    model: SourceModel,
    examples: Sequence[Any],
    folder: str | Path,
    *,
    opset: int | None = None,
    atol: float = 1e-4,
    dynamic_batch: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export ``model`` to ``folder/model.onnx`` and check it against PyTorch eager on ``examples``.

    ``extra``: what ``model.json`` also records (e.g. the ``pruned`` record of a pruned model: what was done to it).

    Every example batch runs through ONNX Runtime (CPU) and through the model; the check fails, and no folder is
    written (an existing one is left as it was), when the largest logit difference divided by the largest
    |logit| exceeds ``atol`` (a tolerance that does not depend on the scale of the logits), or when one input's
    top-1 class differs. With ``dynamic_batch`` the largest example batch is traced and other batch sizes (a
    smaller slice of it, and the other examples' sizes) are checked, so a batch axis fixed by mistake is caught.

    Args:
        model: a single-task ``SourceModel`` (for a multi-task model, export ``model.task(NAME)``).
        examples: real inputs, batched as the model takes them (``transferkit.data.modality.make_batch``, or the
            inputs of a validation loader): image tensors, or dicts of tensors.
        folder: the exported folder to write.
        opset: the ONNX opset (default: the exporter's own).
        atol: the largest relative logit difference accepted (see above).
        dynamic_batch: a dynamic batch axis; without it every example batch must have the traced batch's size.

    Returns:
        The check, as written to ``export_report.json``: ``max_abs_diff``, ``max_rel_diff``, ``top1_agreement``,
        ``examples``, ``batch_sizes``, ``atol``, ``opset``, versions and ``file_bytes``.

    Raises:
        ExportError: the exporter failed, or ONNX Runtime disagrees with PyTorch beyond ``atol``.
        CompressError: the model or the examples cannot be exported as given.
    """
    if isinstance(model, MultiTaskModel):
        raise CompressError(
            f"a multi-task model (tasks: {', '.join(model.tasks)}) has one head per task; export one task: "
            "export_onnx(model.task(NAME), ...)"
        )
    if not isinstance(model, SourceModel):
        raise CompressError(f"export_onnx takes a transferkit SourceModel, got {type(model).__name__}")
    if not atol > 0:
        raise CompressError(f"atol={atol}: give a positive tolerance (1e-4 is the default)")
    from transferkit.models.quantized import StaticInt8Backbone, is_int8_weight

    if isinstance(model.backbone, StaticInt8Backbone) or any(is_int8_weight(p) for p in model.parameters()):
        raise CompressError(
            "this model is quantized for PyTorch (torchao int8), which ONNX does not carry: export the float model "
            "it came from, with ONNX Runtime's int8 as part of the export (export: {quantize: int8}, or transferkit "
            "compress --quantize int8 --export onnx)"
        )
    batches = [_cpu(b) for b in examples]
    names = _input_names(batches)
    sample = max(batches, key=_batch_size)
    if dynamic_batch and _batch_size(sample) < 2:
        raise CompressError(
            "export_onnx traces the largest example batch, and every batch here holds 1 input: torch.export fixes "
            "a size-1 axis. Give at least one example batch of 2 or more inputs (or dynamic_batch=False)"
        )
    sizes = sorted({_batch_size(b) for b in batches})
    if not dynamic_batch and len(sizes) > 1:
        raise CompressError(
            f"dynamic_batch=False fixes the batch size, but the example batches hold {sizes} inputs; give batches "
            "of one size, or keep dynamic_batch=True"
        )
    axes = _dynamic_axes(sample, names, dynamic_batch)
    graph = _ExportGraph(model, names).eval()
    folder = Path(folder)
    report: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        onnx_path = tmp / "model.onnx"
        used_opset = _export(graph, sample, names, axes, onnx_path, opset)
        checks = batches if not dynamic_batch else [*batches, *_other_sizes(sample, batches)]
        report.update(_parity(model, onnx_path, checks, atol))
        report.update(
            {
                "examples": sum(_batch_size(b) for b in batches),
                "example_batches": len(batches),
                "batch_sizes": sorted({_batch_size(b) for b in checks}),
                "atol": atol,
                "opset": used_opset,
                "exporter": "torch.onnx.export(dynamo=True)",
                "onnxruntime_version": _ort_version(),
                "torch_version": torch.__version__,
                "file_bytes": onnx_path.stat().st_size,
            }
        )
        _refuse_disagreement(report)
        meta = {**_saved_parts(model, tmp), **(extra or {})}
        meta["export"] = {
            "format": "onnx",
            "opset": used_opset,
            "inputs": report.pop("inputs"),
            "output": OUTPUT,
            "dynamic_axes": axes,
        }
        write_json(tmp / "model.json", meta)
        write_json(tmp / "export_report.json", report)

    replace_dir(folder, fill)
    return report


# ----------------------------------------------------------------------------------------------------------------
# What is traced


class _ExportGraph(nn.Module):
    """The model with flat tensor inputs (``torch.export`` and ONNX name inputs; a dict batch has none to name)."""

    def __init__(self, model: SourceModel, names: list[str]):
        super().__init__()
        self.backbone = _exportable_backbone(model.backbone)
        self.head = model.head
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        x: Any = tensors[0] if self.names == [IMAGE_INPUT] else dict(zip(self.names, tensors))
        return self.head(self.backbone(x))


def _exportable_backbone(backbone: nn.Module) -> nn.Module:
    """The backbone as ``torch.export`` can trace it: a ``seq:gru`` encoder on padded frames, else itself."""
    if isinstance(backbone, SequenceEncoder) and backbone.kind == "gru":
        return _PaddedGRUEncoder(backbone)
    return backbone


def _one_direction(gru: nn.GRU, suffix: str) -> nn.GRU:
    """A one-layer, one-direction GRU sharing ``gru``'s parameters of one direction (``""`` or ``"_reverse"``)."""
    single = nn.GRU(gru.input_size, gru.hidden_size, batch_first=True)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        setattr(single, f"{name}_l0", getattr(gru, f"{name}_l0{suffix}"))
    return single


class _PaddedGRUEncoder(nn.Module):
    """``SequenceEncoder(kind="gru")`` without packed sequences, giving the same features.

    A GRU reads left to right, so on frames padded at the end its forward direction gives the packed outputs at
    every real frame. The backward direction must start at each utterance's last real frame: the frames are
    reversed within each utterance's length (a gather; padding stays in place), run forward, and put back. Outputs
    at padding are zeroed, as ``pad_packed_sequence`` leaves them, before the next layer and the masked mean.
    """

    def __init__(self, encoder: SequenceEncoder):
        super().__init__()
        self.encoder = encoder
        layers: list[nn.GRU] = list(encoder.layers)  # type: ignore[arg-type]  # a gru encoder holds nn.GRU layers
        self.forward_gru = nn.ModuleList(_one_direction(g, "") for g in layers)
        self.backward_gru = nn.ModuleList(_one_direction(g, "_reverse") for g in layers if g.bidirectional)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        frames = batch["frames"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones(frames.shape[:2], dtype=torch.long, device=frames.device)
        keep = mask.to(frames.dtype).unsqueeze(-1)
        x = self.encoder.input(frames) * keep
        lengths = mask.sum(1, keepdim=True).clamp(min=1)
        steps = torch.arange(frames.shape[1], device=frames.device).unsqueeze(0)
        reverse = torch.where(steps < lengths, lengths - 1 - steps, steps).unsqueeze(-1)  # (batch, time, 1)
        for i, gru in enumerate(self.forward_gru):
            x = self.encoder.drop(x)
            outs = [gru(x)[0] * keep]
            if len(self.backward_gru):
                flipped = torch.gather(x, 1, reverse.expand(-1, -1, x.shape[-1]))
                back = self.backward_gru[i](flipped)[0]
                outs.append(torch.gather(back, 1, reverse.expand(-1, -1, back.shape[-1])) * keep)
            x = torch.cat(outs, dim=-1)
        return masked_mean(x, mask)


def _export(
    graph: nn.Module, sample: Any, names: list[str], axes: dict[str, dict[int, str]], path: Path, opset: int | None
) -> int:
    """Run the exporter; return the opset the file declares. Its failures become an ``ExportError``."""
    import onnx

    args = _tensors(sample, names)
    dims = {label: torch.export.Dim(label, min=1) for a in axes.values() for label in a.values()}
    shapes = tuple({axis: dims[label] for axis, label in axes[n].items()} or None for n in names)
    chatter = io.StringIO()
    try:
        # the exporter prints progress and warns about its internals: kept out of the caller's output
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                args,
                str(path),
                dynamo=True,
                verbose=False,
                input_names=names,
                output_names=[OUTPUT],
                opset_version=opset,
                dynamic_shapes=(shapes,),  # the one *tensors argument of _ExportGraph.forward
                external_data=False,
            )
    except Exception as e:  # torch.export and the ONNX translation raise many types; all mean "cannot export"
        detail = _exception_summary(str(e)) or (str(e).strip().splitlines() or [repr(e)])[0]
        raise ExportError(
            f"torch.onnx.export could not export this {type(graph.backbone).__name__} model: "
            f"{type(e).__name__}: {detail}. Export a model whose forward torch.export can trace (no data-dependent "
            "Python control flow, no packed sequences)"
        ) from e
    declared = [
        o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")
    ]
    return int(declared[0]) if declared else int(opset or 0)


def _exception_summary(text: str) -> str:
    """The line after torch.onnx's '## Exception summary' heading (its message names the real cause there)."""
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("## Exception summary"):
            return next((rest for rest in lines[i + 1 :] if rest), "")
    return ""


# ----------------------------------------------------------------------------------------------------------------
# The parity check


def _parity(model: SourceModel, onnx_path: Path, batches: list[Any], atol: float) -> dict[str, Any]:
    """ONNX Runtime against PyTorch eager on each batch: the largest differences and the top-1 agreement."""
    session = ort_session(onnx_path)
    inputs = [i.name for i in session.get_inputs()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    max_abs, max_logit, agree, total = 0.0, 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            with torch.no_grad():
                ref = model(_to(batch, device)).float().cpu().numpy()
            out = session.run(None, ort_feed(batch, inputs))[0]
            if out.shape != ref.shape:
                raise ExportError(
                    f"ONNX Runtime gives logits of shape {tuple(out.shape)} where PyTorch gives {tuple(ref.shape)} "
                    f"(batch of {_batch_size(batch)}): the exported graph fixed a dimension it should not have"
                )
            max_abs = max(max_abs, float(np.abs(out - ref).max()))
            max_logit = max(max_logit, float(np.abs(ref).max()))
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
            total += len(ref)
    finally:
        model.train(was_training)
    return {
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / max(max_logit, 1e-12),
        "max_abs_logit": max_logit,
        "top1_agreement": agree / total,
        "compared_inputs": total,
        "inputs": inputs,
    }


def _refuse_disagreement(report: dict[str, Any]) -> None:
    if report["max_rel_diff"] <= report["atol"] and report["top1_agreement"] >= 1.0:
        return
    raise ExportError(
        f"the ONNX export disagrees with PyTorch (ONNX Runtime against eager on {report['examples']} example inputs "
        f"and slices of them, {report['compared_inputs']} rows in batches of {report['batch_sizes']}): max abs logit "
        f"difference {report['max_abs_diff']:.3g}, {report['max_rel_diff']:.3g} of the largest |logit| "
        f"{report['max_abs_logit']:.3g} (atol {report['atol']:g} allowed); top-1 agreement "
        f"{report['top1_agreement']:.4f} (1.0 needed). Nothing was written. Check the model for "
        "behaviour that differs when traced (torch.compiler.is_exporting, Python-side shape logic), try another "
        "opset, or raise atol if the difference is rounding"
    )


def ort_session(path: str | Path, threads: int | None = None, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session over ``path`` (``threads``: intra-op threads, default ONNX Runtime's).

    ``spinning=False``: its threads sleep as soon as a run ends instead of spinning for the next one. Spinning is
    ONNX Runtime's default (a little lower latency on back-to-back calls), but it takes the CPU from whatever runs
    next in the process: timing an export interleaved with PyTorch models needs it off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT warns about initializers it folds
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_feed(batch: Any, inputs: list[str]) -> dict[str, np.ndarray]:
    """A batch as the model takes it (a tensor, a dict of tensors or arrays) as ONNX Runtime's inputs of those
    names (a dict's keys the graph does not read are left out)."""
    if isinstance(batch, dict):
        missing = [n for n in inputs if n not in batch]
        if missing:
            raise CompressError(
                f"the batch has no {', '.join(missing)} (it has {', '.join(batch)}); the ONNX model reads "
                f"{', '.join(inputs)}: give batches as make_batch(model, inputs) gives them"
            )
        return {n: _numpy(batch[n]) for n in inputs}
    return {inputs[0]: _numpy(batch)}


# ----------------------------------------------------------------------------------------------------------------
# Batches


def _input_names(batches: list[Any]) -> list[str]:
    if not batches:
        raise CompressError("export_onnx needs example batches (real validation inputs) to check the export with")
    kinds = {tuple(b) if isinstance(b, dict) else (IMAGE_INPUT,) for b in batches}
    if len(kinds) > 1:
        raise CompressError(f"the example batches do not all hold the same inputs: {sorted(kinds)}")
    names = list(next(iter(kinds)))
    for b in batches:
        values = b.values() if isinstance(b, dict) else [b]
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise CompressError(
                "an example batch is not a tensor or a dict of tensors; give batches as make_batch(model, inputs) "
                "gives them"
            )
    return names


def _batch_size(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return int(first.shape[0])


def _dynamic_axes(sample: Any, names: list[str], dynamic_batch: bool) -> dict[str, dict[int, str]]:
    """Which axis of which input varies: the batch axis (axis 0) and, for sequences, the length (axis 1)."""
    tensors = dict(zip(names, _tensors(sample, names)))
    axes: dict[str, dict[int, str]] = {}
    for n, t in tensors.items():
        axes[n] = {0: "batch"} if dynamic_batch else {}
        if n in SEQUENCE_INPUTS and t.dim() >= 2:
            axes[n][1] = "sequence"
    return axes


def _other_sizes(sample: Any, batches: list[Any]) -> list[Any]:
    """Slices of the traced batch of sizes no example batch has (1 and n - 1): the dynamic batch axis, checked."""
    n = _batch_size(sample)
    seen = {_batch_size(b) for b in batches}
    return [_rows(sample, k) for k in sorted({1, n - 1}) if k not in seen and 0 < k < n]


def _rows(batch: Any, k: int) -> Any:
    return {n: t[:k] for n, t in batch.items()} if isinstance(batch, dict) else batch[:k]


def _tensors(batch: Any, names: list[str]) -> tuple[torch.Tensor, ...]:
    return tuple(batch[n] for n in names) if isinstance(batch, dict) else (batch,)


def _cpu(batch: Any) -> Any:
    return _to(batch, torch.device("cpu"))


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


# ----------------------------------------------------------------------------------------------------------------
# The folder's other files


def _saved_parts(model: SourceModel, folder: Path) -> dict[str, Any]:
    """The model's own ``model.json`` content, and its ``processor/`` copied into ``folder``, as ``save_model`` writes
    them: the model is saved once to a scratch folder and read back, so that one place builds ``model.json`` and an
    exported folder never drifts from a saved one (the weights file written there is dropped)."""
    with tempfile.TemporaryDirectory(prefix="transferkit-export-") as scratch:
        saved = save_model(model, Path(scratch) / "model")
        if (saved / "processor").is_dir():
            shutil.copytree(saved / "processor", folder / "processor")
        return dict(json.loads((saved / "model.json").read_text()))


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)
