"""``prune:``, ``quantize:``, ``export:``: a trained model made small and fast, and shipped.

- ``prune``: structured pruning of a trained model (``transferkit.compress.prune``: torch-pruning's DepGraph, by a
  channel ratio or a target MAC count), then recovery fine-tuning on the training split with any strategy
  (``recovery:``, train settings over ``train:``). The pruned model joins the run's models as ``MODEL-pruned``.
- ``quantize``: int8 for PyTorch inference (``transferkit.compress.quantize``: torchao), calibrated on training
  examples where the method needs it; joins the run's models as ``MODEL-int8``.
- ``export``: ONNX (``transferkit.compress.export``), checked against PyTorch on validation examples when it is
  written (a disagreement beyond ``atol`` is an error), optionally int8-quantized for ONNX Runtime
  (``transferkit.compress.ort_quant``). Each export is evaluated on the test split with ONNX Runtime; the folders
  ``exports/NAME/`` are what ``transferkit predict`` runs without torch. Exports are reported, not selected.

They chain: by default ``quantize`` and ``export`` take the pruned model when the recipe prunes, and ``prune`` takes
the last distilled student when the recipe distills, else the main model.

Outputs: ``models/NAME/`` (pruned, quantized), ``exports/NAME/`` (exported), and per step
``checkpoints/NAME/result.json`` (metrics, cost: parameters, MACs, file size, CPU latency at batch 1). Resume rule:
the result file, made with the same settings, is the step (read back); an interrupted recovery resumes from its
checkpoint (pruning is deterministic, so the pruned architecture is rebuilt the same before the weights go back).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from transferkit.config import Recipe, TrainConfig
from transferkit.config.recipe import ExportConfig, PruneConfig, QuantizeConfig
from transferkit.stages.base import (
    RunContext,
    Stage,
    result_file,
    settings_sha,
    train_override_problems,
    validated_section,
)

# ----------------------------------------------------------------------------------------------------------------
# Which model each step takes, and what it is called.


def _default_input(recipe: Recipe) -> str:
    """The model ``prune`` takes unless it names one: the last distilled student, else the main model (stages run
    in the written order, so a distilled student exists before prune runs, wherever distill is written)."""
    return recipe.distill[-1].name if recipe.distill else recipe.train.strategy_name


def prune_name(recipe: Recipe) -> str:
    assert recipe.prune is not None
    return recipe.prune.label or f"{recipe.prune.model or _default_input(recipe)}-pruned"


def _after_prune(recipe: Recipe, named: str | None, key: str) -> str:
    """The model ``quantize``/``export`` (``key``) take: the one named, else the pruned one when the recipe prunes
    before (it is written first), else ``prune``'s default."""
    if named:
        return named
    written = recipe.written
    before = recipe.prune is not None and written.index("prune") < written.index(key)
    return prune_name(recipe) if before else _default_input(recipe)


def quantize_name(recipe: Recipe) -> str:
    assert recipe.quantize is not None
    return recipe.quantize.label or f"{_after_prune(recipe, recipe.quantize.model, 'quantize')}-int8"


def export_name(recipe: Recipe) -> str:
    assert recipe.export is not None
    return recipe.export.label or f"{_after_prune(recipe, recipe.export.model, 'export')}-{recipe.export.format}"


def _input_model(ctx: RunContext, name: str, step: str) -> Any:
    from transferkit.errors import RunDirError

    if name not in ctx.results:
        raise RunDirError(
            f"{step}: '{name}' is not a model of this run; models: {', '.join(ctx.results) or 'none'} (name one "
            f"with {step}.model)"
        )
    return ctx.model(name)


def _batches(dataset: Any, n: int, batch_size: int = 32) -> list[Any]:
    """The inputs of the first ``n`` examples of ``dataset``, batched as the model takes them (no labels)."""
    import torch

    from transferkit.engine.loop import make_loader

    subset = torch.utils.data.Subset(dataset, list(range(min(n, len(dataset)))))
    return [x for x, _ in make_loader(subset, batch_size)]


def _one_example(data: Any) -> Any:
    """One validation input (batch of 1): what MACs are counted on and latency is timed with."""
    return _batches(data.dataset("val"), 1, 1)[0]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".onnx"))


def _cost(models: dict[str, Any], example: Any, folders: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Parameters, MACs, file size and CPU latency at batch 1 of each model (timed interleaved)."""
    from transferkit.evaluation.cost import latency_ms, model_cost

    latency = latency_ms(models, dict.fromkeys(models, example))
    return {
        key: {
            **model_cost(m, example),
            "file_bytes": _folder_bytes(folders[key]),
            "latency_ms": latency[key]["median_ms"],
        }
        for key, m in models.items()
    }


def _read(ctx: RunContext, name: str, sha: str, what: str) -> dict[str, Any] | None:
    from transferkit.errors import RunDirError
    from transferkit.io import read_json

    path = result_file(ctx, name)
    if not path.is_file():
        return None
    result = read_json(path)
    if result.get("settings_sha256") != sha:
        raise RunDirError(
            f"'{ctx.out}' already holds a {what} model '{name}' made with other settings; give the new one another "
            "label"
        )
    return result


def _scores(model: Any, data: Any, device: Any) -> dict[str, Any]:
    from transferkit.pipeline import evaluate

    n = len(data.classes)
    return {split: evaluate(model, data.dataset(split), n, device=device) for split in ("val", "test")}


# ----------------------------------------------------------------------------------------------------------------
# prune


def _recovery(recipe: Recipe) -> TrainConfig | None:
    assert recipe.prune is not None
    if recipe.prune.recovery is None:
        return None
    return TrainConfig(**{**recipe.train.model_dump(), "strategy": "full", **recipe.prune.recovery})


def _prune_sha(recipe: Recipe) -> str:
    assert recipe.prune is not None
    recovery = _recovery(recipe)
    settings = recipe.prune.model_dump(mode="json", exclude={"recovery"})
    return settings_sha(
        {**settings, "recovery": recovery.model_dump(mode="json", exclude={"checkpoints"}) if recovery else None}
    )


def _taylor_batches(data: Any, n: int = 64) -> list[tuple[Any, Any]]:
    """Labelled training batches: the gradients Taylor importance ranks channels by."""
    import torch

    from transferkit.engine.loop import make_loader

    train = data.dataset("train")
    return list(make_loader(torch.utils.data.Subset(train, list(range(min(n, len(train))))), 16))


def prune_step(ctx: RunContext) -> dict[str, Any]:
    """Prune the input model, fine-tune it back, evaluate, measure and save it; its entry of ``metrics.json``."""
    from transferkit.compress.prune import prune
    from transferkit.engine.loop import JobPaths
    from transferkit.io import write_json
    from transferkit.models.base import save_model
    from transferkit.pipeline import fingerprint, train

    recipe, data, device = ctx.recipe, ctx.data(), ctx.accelerator.device
    cfg = recipe.prune
    assert cfg is not None
    source_name, name = cfg.model or _default_input(recipe), prune_name(recipe)
    model = _input_model(ctx, source_name, "prune")
    original = copy.deepcopy(model)  # before pruning: the cost baseline and a distilled recovery's teacher
    example = _one_example(data)
    t = time.perf_counter()
    pruned = prune(
        model,
        example,
        ratio=cfg.ratio,
        target_macs=int(cfg.macs) if cfg.macs is not None else None,
        importance=cfg.importance,
        round_to=cfg.round_to,
        keep=cfg.keep,
        taylor_batches=_taylor_batches(data) if cfg.importance == "taylor" else None,
    )
    prune_s = time.perf_counter() - t
    before = _scores(pruned.model, data, device) if cfg.recovery is not None else None
    recovery = _recovery(recipe)
    job_dir = result_file(ctx, name).parent
    if recovery is not None:
        paths = JobPaths(job_dir / "last.pt", ctx.out / "metrics.jsonl", name)
        how = {"seed": recipe.seed, "accelerator": ctx.accelerator, "paths": paths, "resume": ctx.resume}
        if cfg.distill is not None:  # the model before pruning teaches, on the labels and the unlabelled pool
            from transferkit.distill import distill, for_model

            job = distill(pruned.model, [original], data, recovery, cfg.distill, **how, cache_dir=job_dir)
            job["test"] = _scores(pruned.model, for_model(data, pruned.model), device)["test"]
        else:
            job = train(pruned.model, data, recovery, **how)
            job["test"] = _scores(pruned.model, data, device)["test"]
    else:
        job = {**_scores(pruned.model, data, device), "history": [], "best_epoch": 0, "epochs_run": 0, "timing": {}}
    job["timing"]["prune_s"] = prune_s
    job["strategy"] = f"prune:{cfg.importance}"
    job["pruned"] = {**pruned.record, "from": source_name}
    if before is not None:
        job["pruned"]["before_recovery"] = {split: before[split]["accuracy"] for split in ("val", "test")}
    job["weights_sha256"] = fingerprint(pruned.model)
    job["settings_sha256"] = _prune_sha(recipe)
    if ctx.main:
        folder = ctx.out / "models" / name
        save_model(
            pruned.model.cpu(),
            folder,
            extra={"strategy": job["strategy"], "run": recipe.name, "pruned": job["pruned"]},
        )
        job["cost"] = _cost(
            {source_name: original, name: pruned.model},
            example,
            {source_name: ctx.out / "models" / source_name, name: folder},
        )
        write_json(result_file(ctx, name), job)
    ctx.wait()
    if recovery is not None:
        from transferkit.stages.train import drop_checkpoints

        drop_checkpoints(ctx, name, recovery)
        if ctx.main:
            for path in job_dir.glob("teacher-round*.pt"):  # a distilled recovery's cached teacher outputs
                path.unlink(missing_ok=True)
    return job


def _cost_table(ctx: RunContext, title: str, note: str, result: dict[str, Any], accuracy: dict[str, float]) -> None:
    cost = result.get("cost", {})
    ctx.tables.append(
        {
            "title": title,
            "note": note + "; latency: CPU, batch 1, median of interleaved runs",
            "columns": ["model", "test accuracy", "parameters", "MACs", "file MB", "latency ms"],
            "rows": [
                [k, accuracy.get(k), c["params"], c["macs"], round(c["file_bytes"] / 1e6, 2), c["latency_ms"]]
                for k, c in cost.items()
            ],
        }
    )


def _use_pruned(ctx: RunContext, result: dict[str, Any]) -> None:
    name, p = prune_name(ctx.recipe), result["pruned"]
    ctx.results[name] = result
    accuracy = {p["from"]: ctx.results[p["from"]]["test"]["accuracy"], name: result["test"]["accuracy"]}
    how = f"ratio {p['ratio']}" if p.get("ratio") is not None else f"target {p.get('target_macs'):.3g} MACs"
    recovered = "distilled recovery" if "distill" in result else "recovery" if result["epochs_run"] else "no recovery"
    _cost_table(ctx, f"Prune {name}", f"{p['importance']} importance, {how}, then {recovered}", result, accuracy)
    ctx.log(
        f"[{name}] MACs {p['macs_before'] / 1e6:.1f} M -> {p['macs_after'] / 1e6:.1f} M, parameters "
        f"{p['params_before'] / 1e6:.2f} M -> {p['params_after'] / 1e6:.2f} M | test accuracy "
        f"{result['test']['accuracy']:.4f} ({ctx.results[p['from']]['test']['accuracy']:.4f} before)"
    )


def _run_prune(ctx: RunContext) -> None:
    name = prune_name(ctx.recipe)
    result = _read(ctx, name, _prune_sha(ctx.recipe), "pruned") if ctx.resume else None
    _use_pruned(ctx, result if result is not None else prune_step(ctx))


def _load_prune(ctx: RunContext) -> None:
    result = _read(ctx, prune_name(ctx.recipe), _prune_sha(ctx.recipe), "pruned")
    assert result is not None
    _use_pruned(ctx, result)


# ----------------------------------------------------------------------------------------------------------------
# quantize (PyTorch, torchao)


def quantize_method(method: str, modality: str) -> str:
    """``auto``/``int8``: the modality's own kind of int8 (``Modality.int8``: static for conv nets, dynamic for
    Linear-heavy text and audio encoders)."""
    from transferkit.data.modality import get_modality

    if method not in ("auto", "int8"):
        return method
    return f"int8_{get_modality(modality).int8}"


def _quantize_sha(recipe: Recipe) -> str:
    assert recipe.quantize is not None
    return settings_sha(
        {**recipe.quantize.model_dump(mode="json"), "input": _after_prune(recipe, recipe.quantize.model, "quantize")}
    )


def quantize_step(ctx: RunContext) -> dict[str, Any]:
    """Quantize the input model to int8, evaluate, measure and save it; its entry of ``metrics.json``."""
    from transferkit.compress.quantize import quantize
    from transferkit.io import read_json, write_json
    from transferkit.models.base import load_model, save_model
    from transferkit.pipeline import fingerprint

    recipe, data = ctx.recipe, ctx.data()
    cfg = recipe.quantize
    assert cfg is not None
    source_name, name = _after_prune(recipe, cfg.model, "quantize"), quantize_name(recipe)
    model = _input_model(ctx, source_name, "quantize")
    method = quantize_method(cfg.method, model.modality)
    calibration = _batches(data.dataset("train"), cfg.calibration) if method == "int8_static" else None
    example = _one_example(data)
    t = time.perf_counter()
    q = quantize(model, method=method, calibration=calibration, example=example)
    quantize_s = time.perf_counter() - t
    scores = _scores(q.model, data, "cpu")  # int8 kernels run on the CPU
    folder = ctx.out / "models" / name
    result: dict[str, Any] = {
        "strategy": f"quantize:{method}",
        "from_scratch": False,
        **scores,
        "quantized": {**q.record, "from": source_name},
        "history": [],
        "best_epoch": 0,
        "epochs_run": 0,
        "timing": {"quantize_s": quantize_s},
        "settings_sha256": _quantize_sha(recipe),
    }
    if ctx.main:
        before = read_json(ctx.out / "models" / source_name / "model.json")
        carried = {"pruned": before["pruned"]} if before.get("pruned") else {}  # a pruned input keeps its shapes
        save_model(
            q.model,
            folder,
            extra={"strategy": result["strategy"], "run": recipe.name, **carried, "quantized": q.record},
        )
        reloaded = load_model(folder)  # what is measured is what reloads
        result["weights_sha256"] = fingerprint(reloaded)
        result["cost"] = _cost(
            {source_name: model, name: reloaded}, example, {source_name: ctx.out / "models" / source_name, name: folder}
        )
        write_json(result_file(ctx, name), result)
    ctx.wait()
    return result


def _use_quantized(ctx: RunContext, result: dict[str, Any]) -> None:
    name, q = quantize_name(ctx.recipe), result["quantized"]
    ctx.results[name] = result
    accuracy = {q["from"]: ctx.results[q["from"]]["test"]["accuracy"], name: result["test"]["accuracy"]}
    _cost_table(ctx, f"Quantize {name}", f"{result['strategy'].split(':')[1]} (torchao), on the CPU", result, accuracy)
    ctx.log(
        f"[{name}] {result['strategy']}: test accuracy {result['test']['accuracy']:.4f} "
        f"({accuracy[q['from']]:.4f} before)"
    )


def _run_quantize(ctx: RunContext) -> None:
    result = _read(ctx, quantize_name(ctx.recipe), _quantize_sha(ctx.recipe), "quantized") if ctx.resume else None
    _use_quantized(ctx, result if result is not None else quantize_step(ctx))


def _load_quantize(ctx: RunContext) -> None:
    result = _read(ctx, quantize_name(ctx.recipe), _quantize_sha(ctx.recipe), "quantized")
    assert result is not None
    _use_quantized(ctx, result)


# ----------------------------------------------------------------------------------------------------------------
# export (ONNX, ONNX Runtime)


def _export_sha(recipe: Recipe) -> str:
    assert recipe.export is not None
    return settings_sha(
        {**recipe.export.model_dump(mode="json"), "input": _after_prune(recipe, recipe.export.model, "export")}
    )


def onnx_scores(folder: Path, data: Any) -> dict[str, Any]:
    """An exported model's validation and test metrics, computed by ONNX Runtime on the run's splits."""
    from transferkit.compress.runtime import OnnxModule
    from transferkit.engine.loop import evaluate_model

    module, n = OnnxModule(folder), len(data.classes)
    return {split: evaluate_model(module, data.dataset(split), 32, n, "cpu") for split in ("val", "test")}


def export_step(ctx: RunContext) -> dict[str, Any]:
    """Export the input model to ONNX (checked), optionally int8 for ONNX Runtime; evaluate and measure each."""
    from transferkit.compress.export import export_onnx
    from transferkit.compress.ort_quant import quantize_onnx
    from transferkit.compress.runtime import OnnxModule
    from transferkit.evaluation.cost import latency_ms
    from transferkit.io import read_json, write_json

    recipe, data = ctx.recipe, ctx.data()
    cfg = recipe.export
    assert cfg is not None
    source_name, name = _after_prune(recipe, cfg.model, "export"), export_name(recipe)
    model = _input_model(ctx, source_name, "export")
    folders = {name: ctx.out / "exports" / name}
    checks = _batches(data.dataset("val"), cfg.check_examples)
    result: dict[str, Any] = {"from": source_name, "settings_sha256": _export_sha(recipe), "exports": {}}
    if ctx.main:
        t = time.perf_counter()
        before = read_json(ctx.out / "models" / source_name / "model.json")  # what was done to it before
        done = {k: before[k] for k in ("strategy", "run", "pruned", "distill") if k in before}
        report = export_onnx(model, checks, folders[name], opset=cfg.opset, atol=cfg.atol, extra=done)
        result["exports"][name] = {"folder": str(folders[name]), "check": report, "export_s": time.perf_counter() - t}
        if cfg.quantize is not None:
            mode = quantize_method(cfg.quantize, model.modality).removeprefix("int8_")
            int8 = f"{name}-int8"
            folders[int8] = ctx.out / "exports" / int8
            calibration = _batches(data.dataset("train"), cfg.calibration) if mode == "static" else None
            t = time.perf_counter()
            report = quantize_onnx(
                folders[name],
                folders[int8],
                mode="static" if mode == "static" else "dynamic",
                calibration=calibration,
                per_channel=cfg.per_channel,
                examples=checks,
            )
            result["exports"][int8] = {
                "folder": str(folders[int8]),
                "check": report,
                "export_s": time.perf_counter() - t,
            }
        for key, folder in folders.items():
            result["exports"][key].update(onnx_scores(folder, data))
        example = _one_example(data)
        modules = {"pytorch": model, **{k: OnnxModule(f) for k, f in folders.items()}}
        latency = latency_ms(modules, dict.fromkeys(modules, example))
        result["latency_ms"] = {k: v["median_ms"] for k, v in latency.items()}
        for key, folder in folders.items():
            result["exports"][key]["file_bytes"] = _folder_bytes(folder)
        write_json(result_file(ctx, name), result)
    ctx.wait()
    return result


def _use_export(ctx: RunContext, result: dict[str, Any]) -> None:
    ctx.sections.setdefault("exports", {}).update(result["exports"])
    latency = result.get("latency_ms", {})
    base = ctx.results[result["from"]]["test"]["accuracy"]
    rows = [["pytorch " + result["from"], base, None, None, None, latency.get("pytorch")]]
    for key, e in result["exports"].items():
        rows.append(
            [
                key,
                e["test"]["accuracy"],
                e["check"].get("max_abs_diff"),
                e["check"].get("top1_agreement"),
                round(e["file_bytes"] / 1e6, 2),
                latency.get(key),
            ]
        )
    ctx.tables.append(
        {
            "title": f"Export {result['from']}",
            "note": "ONNX Runtime on the test split; the check: validation examples against PyTorch eager; "
            "latency: CPU, batch 1, median of interleaved runs",
            "columns": ["model", "test accuracy", "max abs diff", "top-1 agreement", "file MB", "latency ms"],
            "rows": rows,
        }
    )
    for key, e in result["exports"].items():
        ctx.log(f"[{key}] exported to {e['folder']}: test accuracy {e['test']['accuracy']:.4f} (ONNX Runtime)")


def _run_export(ctx: RunContext) -> None:
    result = _read(ctx, export_name(ctx.recipe), _export_sha(ctx.recipe), "exported") if ctx.resume else None
    _use_export(ctx, result if result is not None else export_step(ctx))


def _load_export(ctx: RunContext) -> None:
    result = _read(ctx, export_name(ctx.recipe), _export_sha(ctx.recipe), "exported")
    assert result is not None
    _use_export(ctx, result)


# ----------------------------------------------------------------------------------------------------------------
# The three stages


def check(raw: dict[str, Any]) -> list[str]:
    """The recovery's train settings against TrainConfig and the strategies; its distillation loss."""
    from transferkit.distill.losses import loss_config
    from transferkit.errors import RecipeError, UnknownNameError

    prune = raw.get("prune")
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    assert isinstance(train, dict)
    problems = []
    if isinstance(prune, dict) and isinstance(prune.get("recovery"), dict):
        problems += train_override_problems("prune.recovery", train, prune["recovery"])
    if isinstance(prune, dict) and isinstance(prune.get("distill"), (str, dict)):
        try:
            loss_config(prune["distill"])
        except (UnknownNameError, RecipeError) as e:
            problems.append(f"prune.distill: {e}")
    return problems


def _extend(key: str, entry: type) -> Any:
    """``transferkit KEY RUN_DIR key=value...``: the section ``key`` added to a finished run's recipe."""

    def extend(raw: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        return {**raw, key: validated_section(entry, options, f"{key} on a finished run")}

    return extend


def _done(key: str, name: Any) -> Any:
    return lambda ctx: getattr(ctx.recipe, key) is not None and result_file(ctx, name(ctx.recipe)).is_file()


PRUNE = Stage(
    "prune",
    _run_prune,
    lambda recipe: recipe.prune is not None,
    _done("prune", prune_name),
    _load_prune,
    keys=("prune",),
    needs=("models",),
    gives=("models",),
    check=check,
    extend=_extend("prune", PruneConfig),
    help="structured pruning (channels, attention heads) by a ratio or a MAC target, then recovery fine-tuning",
    example="ratio=0.5 recovery.epochs=5",
)
QUANTIZE = Stage(
    "quantize",
    _run_quantize,
    lambda recipe: recipe.quantize is not None,
    _done("quantize", quantize_name),
    _load_quantize,
    keys=("quantize",),
    needs=("models",),
    gives=("models",),
    extend=_extend("quantize", QuantizeConfig),
    help="int8 quantization for PyTorch inference (torchao): dynamic for text/audio, static for conv nets",
    example="method=int8_dynamic",
)
EXPORT = Stage(
    "export",
    _run_export,
    lambda recipe: recipe.export is not None,
    _done("export", export_name),
    _load_export,
    keys=("export",),
    needs=("models",),
    gives=("exports",),
    extend=_extend("export", ExportConfig),
    help="ONNX export checked against PyTorch (and int8 for ONNX Runtime); predict runs it without torch",
    example="quantize=int8",
)
