"""``merge:``: trained models merged into one (uniform or greedy soup, task arithmetic, TIES, DARE) or ensembled.

The members are models of this run (``models:``, default all) and the selected models of other runs that share
the run's architecture and source (``runs:``). The weights the members started from (the task vectors' base) are
the run's target before training. A merged model is evaluated on the run's validation and test splits like a
trained model, joins the models ``select`` chooses from, and is saved as ``models/NAME/``; an ensemble (several
models kept) is evaluated and reported but not saved as one model.

Members of different label sets (a weight merge only) give a multi-task model: the merged backbone with each
member's head as one task, named after the member's run. Each task is evaluated on its own run's validation and test
splits (that run's ``data:`` and seed, read from its recipe.yaml), beside the member itself; BatchNorm statistics are
recomputed on every task's training split. It is saved as ``models/NAME/`` and reported (``metrics.json``
``multi_task``), but ``select`` does not choose it: it answers several tasks, not the run's.

Members that kept LoRA adapters are folded into plain weights first (``lora: fold``), or, with ``lora: adapters``,
their adapters are merged through peft into one adapter (``merge.adapters``): the merged model is a LoRA model.
With ``refit_heads: true`` each head is fitted again after the merge (and the BatchNorm recalibration) by the
``linear_probe`` fit on the merged backbone's features of its task's training split (``refit_heads``); the
backbone is left as merged.

Outputs: ``models/NAME/`` and ``checkpoints/NAME/result.json`` (the merged model, its metrics and how it was
made), a table in report.html comparing it with its members. Resume rule: the result file on disk, made with the
same settings, is the merge (read back).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.config import Recipe
from transferkit.config.recipe import MergeEntry
from transferkit.stages.base import RunContext, Stage, append_entry, result_file, settings_of, settings_sha

# options added after runs with merges were made: left out of the settings at their defaults, so those runs resume
_ADDED = ("lora", "lora_combination", "lora_rank", "refit_heads", "refit_train")


def _settings_sha(entry: MergeEntry) -> str:
    return settings_sha(settings_of(entry, added=_ADDED))


def _members(ctx: RunContext, entry: MergeEntry) -> list[tuple[Path, Path]]:
    """The model folders to merge, each with its run directory: this run's (by name) and the selected model of each
    other run."""
    from transferkit.errors import DataError
    from transferkit.io import read_json

    merged = {e.name for e in ctx.recipe.merge}
    names = entry.models or [n for n in ctx.results if n not in merged]
    unknown = [n for n in names if n not in ctx.results]
    if unknown:
        raise DataError(f"merge: {unknown} are not models of this run; trained: {', '.join(ctx.results)}")
    members = [(ctx.out / "models" / n, ctx.out) for n in names]
    for run in map(Path, entry.runs):
        metrics = run / "metrics.json"
        source = read_json(metrics).get("source") if metrics.is_file() else None
        here = ctx.source_spec.name if ctx.source_spec else None
        if source != here:
            raise DataError(
                f"merge: the run '{run}' started from {source!r}, this run from {here!r}: merged models must share "
                "their source (the task vectors' base)"
            )
        members.append((run / "model" if (run / "model" / "model.json").is_file() else run, run))
    return members


@dataclass
class _Task:
    """One task of a multi-task merge: a member, its run's data (split as that run split it) and its own scores."""

    name: str
    member: Path
    data: Any
    scores: dict[str, Any]


def _tasks(ctx: RunContext, members: list[tuple[Path, Path]]) -> list[_Task]:
    """The tasks of members of different label sets: each named after its run (``_task_names``), with its run's
    data, and the member evaluated there."""
    from transferkit.models.base import SourceModel, load_model
    from transferkit.pipeline import evaluate

    names = _task_names([_run_and_model(ctx, folder, run) for folder, run in members])
    tasks = []
    for name, (folder, run) in zip(names, members):
        model = load_model(folder)  # one member in memory at a time
        assert isinstance(model, SourceModel)  # check_compatible refuses multi-task members
        data = ctx.data() if run == ctx.out else _run_data(run, model)
        device, n = ctx.accelerator.device, len(data.classes)
        scores = {split: evaluate(model, data.dataset(split), n, device=device) for split in ("val", "test")}
        tasks.append(_Task(name, folder, data, scores))
    return tasks


def _run_and_model(ctx: RunContext, folder: Path, run: Path) -> tuple[str, str]:
    """The name of a member's run (its recipe's ``name``) and of the model in it."""
    from transferkit.config import read_yaml
    from transferkit.errors import RunDirError
    from transferkit.io import read_json

    if run == ctx.out:
        return ctx.recipe.name, folder.name
    if not (run / "recipe.yaml").is_file():
        raise RunDirError(f"merge: '{run}' has no recipe.yaml, so the data (the split) of its task is not known")
    return str(read_yaml(run / "recipe.yaml").get("name", run.name)), read_json(run / "metrics.json")["selected"]


def _run_data(run: Path, model: Any) -> Any:
    """The data of another run as it split it (its recipe's ``data:`` and seed), with ``model``'s preprocessing."""
    from transferkit.config import DataConfig, read_yaml
    from transferkit.data import prepare_data

    theirs = read_yaml(run / "recipe.yaml")
    return prepare_data(DataConfig.model_validate(theirs.get("data") or {}), model, int(theirs.get("seed", 0)))


def _task_names(named: list[tuple[str, str]]) -> list[str]:
    """Unique names from (run name, model name): the run's name; RUN-MODEL where runs share one; then -2, -3..."""
    runs = [r for r, _ in named]
    names = [r if runs.count(r) == 1 else f"{r}-{m}" for r, m in named]
    return [n if names[:i].count(n) == 0 else f"{n}-{names[:i].count(n) + 1}" for i, n in enumerate(names)]


def _base(ctx: RunContext) -> dict[str, Any]:
    """The weights every member started from: the run's target before training, without its new head."""
    target = ctx.make_target(ctx.data().classes, pretrained=True)
    return {k: v for k, v in target.state_dict().items() if not k.startswith("head.")}


def merge_one(ctx: RunContext, entry: MergeEntry) -> dict[str, Any]:
    """Merge (or ensemble) one entry's members; evaluate, save and describe the result."""
    import tempfile

    from transferkit.merge.api import plain_members

    data, device = ctx.data(), ctx.accelerator.device
    members = _members(ctx, entry)
    named = [f for f, _ in members]  # how the report names the members
    if entry.lora == "adapters":  # the adapters themselves are merged: the members stay LoRA models
        return _merge(ctx, entry, members, named, named, data, device)
    with tempfile.TemporaryDirectory(prefix="transferkit-merge-") as scratch:
        folders = plain_members(named, Path(scratch))  # LoRA adapters folded into the weights (peft)
        return _merge(ctx, entry, members, named, folders, data, device)


def _merge(
    ctx: RunContext,
    entry: MergeEntry,
    members: list[tuple[Path, Path]],
    named: list[Path],
    folders: list[Path],
    data: Any,
    device: Any,
) -> dict[str, Any]:
    import dataclasses

    from transferkit.errors import DataError
    from transferkit.io import write_json
    from transferkit.merge.adapters import check_adapters, combination_for, merge_adapters
    from transferkit.merge.api import (
        Ensemble,
        check_compatible,
        differing_norms,
        greedy_soup,
        has_batch_norm,
        merge_state,
        merged_model,
        method_of,
        multi_task_model,
        recalibrate_batch_norms,
        same_labels,
    )
    from transferkit.models.base import load_model, save_model
    from transferkit.pipeline import evaluate, fingerprint

    name, method, options = method_of(entry.method)
    if entry.refit_heads and method.kind == "ensemble":
        raise DataError(_REFIT_ENSEMBLE)
    if entry.lora == "adapters":
        combination = combination_for(name, method, options, entry.lora_combination)
        metas = check_adapters(folders)  # LoRA models of one rank, targets and label set
    else:
        metas = check_compatible(folders, one_label_set=name if method.kind != "weights" else None)
    tasks = None if same_labels(metas) else _tasks(ctx, members)  # different label sets: one head per task
    train_sets = [data.dataset("train")] if tasks is None else [task.data.dataset("train") for task in tasks]
    t = time.perf_counter()
    recalibrated = {"examples": 0, "norms": 0}

    def prepare(model: Any, how: Any) -> None:
        if entry.recalibrate_bn and has_batch_norm(model):
            only = differing_norms(how)
            net = model.task(model.tasks[0]) if tasks else model  # a task's view runs the shared backbone
            recalibrated["examples"] = recalibrate_batch_norms(net, train_sets, device=device, only=only)
            recalibrated["norms"] = len(only)

    def val_accuracy(model: Any) -> float:
        return float(evaluate(model, data.dataset("val"), len(data.classes), device=device)["accuracy"])

    how: dict[str, Any] = {}
    if entry.lora == "adapters":
        model: Any
        model, adapters = merge_adapters(
            folders, method.merge_config(options, len(folders)), combination, entry.lora_rank
        )
        prepare(model, {})  # the members share their base, BatchNorm statistics included: nothing to recompute
        how = {
            "tensors": {k: len(v) for k, v in adapters.items() if isinstance(v, list)},
            "adapter_merge": {k: v for k, v in adapters.items() if not isinstance(v, list)},
        }
    elif method.kind == "ensemble":
        model = Ensemble([load_model(f) for f in folders], options.vote).eval()
    elif method.kind == "greedy":
        model, kept, steps = greedy_soup(folders, val_accuracy, prepare)
        how = {"kept": [str(named[i]) for i in kept], "steps": steps}
    else:
        state, tensors = merge_state(folders, method.merge_config(options, len(folders)), _base(ctx))
        if tasks is None:
            model = merged_model(folders[0], state)
        else:
            model = multi_task_model(folders, [task.name for task in tasks], state)
        prepare(model, tensors)
        how = {"tensors": {k: len(v) for k, v in tensors.items()}}
    refits = None
    if entry.refit_heads:  # the heads fitted again on the merged backbone's features, task by task
        views: list[tuple[str | None, Any, Any]] = (
            [(None, model, data)] if tasks is None else [(t.name, model.task(t.name), t.data) for t in tasks]
        )
        refits = refit_heads(views, _refit_config(ctx, entry), ctx.recipe.seed, ctx.accelerator)
    merge_s = time.perf_counter() - t
    if tasks is None:
        scores: dict[str, Any] = {
            split: evaluate(model, data.dataset(split), len(data.classes), device=device) for split in ("val", "test")
        }
    else:  # each task on its own run's splits, beside the member that learned it
        scores = {"tasks": {task.name: _task_scores(model, task, device) for task in tasks}}
    description = {
        "method": name,
        "options": dataclasses.asdict(options),
        "members": [str(f) for f in named],
        "lora": entry.lora,
        "adapters_folded": [str(f) for f, p in zip(named, folders) if f != p],
        "adapters_merged": [str(f) for f in named] if entry.lora == "adapters" else [],
        "refit_heads": refits,
        "batchnorm_recalibrated_on": recalibrated["examples"],
        "batchnorms_recalibrated": recalibrated["norms"],
        **how,
    }
    result = {
        "strategy": f"merge:{name}",
        "from_scratch": False,
        "merge": description,
        **scores,
        "history": [],
        "best_epoch": 0,
        "epochs_run": 0,
        "timing": {"merge_s": merge_s},
        "trainable_params": 0,
        "total_params": sum(p.numel() for p in model.parameters()),
        "weights_sha256": fingerprint(model),
        "settings_sha256": _settings_sha(entry),
    }
    if ctx.main:
        if method.kind != "ensemble":  # an ensemble keeps its members: it is not one model folder
            save_model(
                model.cpu(),
                ctx.out / "models" / entry.name,
                extra={"strategy": result["strategy"], "run": ctx.recipe.name, "merge": description},
            )
        write_json(result_file(ctx, entry.name), result)
    ctx.wait()
    return result


_REFIT_ENSEMBLE = (
    "refit_heads refits a merged model's heads; an ensemble keeps its members' own heads: drop refit_heads, or "
    "choose a weight merge (uniform_soup, task_arithmetic, ties, dare) or greedy_soup"
)


def _refit_config(ctx: RunContext, entry: MergeEntry) -> Any:
    """The head refit's training: the run's ``train:`` with the ``linear_probe`` strategy, then ``refit_train``."""
    from transferkit.config import TrainConfig

    return TrainConfig.model_validate(
        {**ctx.recipe.train.model_dump(), "strategy": "linear_probe", **entry.refit_train}
    )


def refit_heads(
    views: list[tuple[str | None, Any, Any]], cfg: Any, seed: int, accelerator: Any
) -> list[dict[str, Any]]:
    """Refit each head of a merged model on the merged backbone's frozen features of its task's training split.

    The merge moves the backbone's features away from what each member's head was trained on; a head fitted again
    on the merged features (the backbone untouched) recovers part of what the merge lost. The fit is the
    ``linear_probe`` strategy's (``pipeline.train``: features computed once, the head trained on them, the best
    epoch on validation kept), starting from the merged head.

    Args:
        views: per head: the task's name (None for a single-task merge), a model whose ``head`` is that head (a
            multi-task model's ``task`` view shares it) and the task's prepared data.
        cfg: the training (``strategy: linear_probe``).
        seed: the seed of the fit's data order.
        accelerator: the run's.

    Returns:
        Per head: the task, its training and validation accuracy before and after, and the fit's epochs.
    """
    from transferkit.pipeline import evaluate, train

    out = []
    device = accelerator.device
    for task, view, data in views:

        def accuracy(split: str, view: Any = view, data: Any = data) -> float:
            return float(evaluate(view, data.dataset(split), len(data.classes), device=device)["accuracy"])

        before = {"train": accuracy("train"), "val": accuracy("val")}
        summary = train(view, data, cfg, seed=seed, accelerator=accelerator)
        out.append(
            {
                "task": task,
                "train_accuracy_before": before["train"],
                "train_accuracy_after": accuracy("train"),
                "val_accuracy_before": before["val"],
                "val_accuracy_after": accuracy("val"),
                "epochs_run": summary["epochs_run"],
                "best_epoch": summary["best_epoch"],
            }
        )
    return out


def _task_scores(model: Any, task: _Task, device: Any) -> dict[str, Any]:
    """One task of a multi-task model on its run's splits, and the member's scores there."""
    from transferkit.pipeline import evaluate

    view, n = model.task(task.name), len(task.data.classes)
    merged = {split: evaluate(view, task.data.dataset(split), n, device=device) for split in ("val", "test")}
    return {"member": str(task.member), **merged, "member_scores": task.scores}


def _use(ctx: RunContext, entry: MergeEntry, result: dict[str, Any]) -> None:
    """The merged model joins the run's models (an ensemble or a multi-task model only the report), with a table
    beside its members."""
    if "tasks" in result:
        _use_multi_task(ctx, entry, result)
        return
    if not result["strategy"].endswith(":ensemble"):
        ctx.results[entry.name] = result
    else:
        ctx.sections.setdefault("ensembles", {})[entry.name] = result
    members = {str(ctx.out / "models" / n): n for n in ctx.results}
    rows = [
        [members.get(f, f), ctx.results[members[f]]["val"]["accuracy"], ctx.results[members[f]]["test"]["accuracy"]]
        for f in result["merge"]["members"]
        if f in members
    ]
    rows.append([f"{entry.name} ({result['merge']['method']})", result["val"]["accuracy"], result["test"]["accuracy"]])
    ctx.tables.append(
        {
            "title": f"Merge {entry.name}",
            "note": f"{len(result['merge']['members'])} models; members of other runs are listed in metrics.json"
            + _how_note(result["merge"]),
            "columns": ["model", "val accuracy", "test accuracy"],
            "rows": rows,
        }
    )
    ctx.log(
        f"[{entry.name}] {result['merge']['method']} of {len(result['merge']['members'])} models: test accuracy "
        f"{result['test']['accuracy']:.4f} | val accuracy {result['val']['accuracy']:.4f}"
    )


def _how_note(merge: dict[str, Any]) -> str:
    """What the table note adds about adapters merged and heads refitted (absent from merges made before them)."""
    note = ""
    if merge.get("lora") == "adapters":
        adapter = merge["adapter_merge"]
        exact = "exact" if adapter["exact"] else "approximate"
        note += f"; LoRA adapters merged by peft ({adapter['combination']}, {exact}), the result a LoRA model"
    if merge.get("refit_heads"):
        note += "; heads refitted by a linear probe on the merged features"
    return note


def _use_multi_task(ctx: RunContext, entry: MergeEntry, result: dict[str, Any]) -> None:
    """A multi-task model: reported task by task beside the member that learned the task; not selectable."""
    ctx.sections.setdefault("multi_task", {})[entry.name] = result
    tasks = result["tasks"]
    rows = [
        [task, t["member"], t["member_scores"]["test"]["accuracy"], t["test"]["accuracy"]] for task, t in tasks.items()
    ]
    ctx.tables.append(
        {
            "title": f"Merge {entry.name} (multi-task)",
            "note": f"{result['merge']['method']}: one head per task; each task on its own run's test split"
            + _how_note(result["merge"]),
            "columns": ["task", "input model", "input test accuracy", "merged test accuracy"],
            "rows": rows,
        }
    )
    for task, t in tasks.items():
        ctx.log(
            f"[{entry.name}] task {task}: test accuracy {t['test']['accuracy']:.4f} merged, "
            f"{t['member_scores']['test']['accuracy']:.4f} as trained"
        )


def done(ctx: RunContext) -> bool:
    return all(result_file(ctx, e.name).is_file() for e in ctx.recipe.merge)


def _read(ctx: RunContext, entry: MergeEntry) -> dict[str, Any] | None:
    from transferkit.errors import RunDirError
    from transferkit.io import read_json

    path = result_file(ctx, entry.name)
    if not path.is_file():
        return None
    result = read_json(path)
    if result.get("settings_sha256") != _settings_sha(entry):
        raise RunDirError(
            f"'{ctx.out}' already holds a merge '{entry.name}' made with other settings; give the new one another label"
        )
    return result


def load(ctx: RunContext) -> None:
    for entry in ctx.recipe.merge:
        result = _read(ctx, entry)
        assert result is not None
        _use(ctx, entry, result)


def run(ctx: RunContext) -> None:
    for entry in ctx.recipe.merge:
        result = _read(ctx, entry) if ctx.resume else None
        _use(ctx, entry, result if result is not None else merge_one(ctx, entry))


def check(raw: dict[str, Any]) -> list[str]:
    from transferkit.errors import DataError, RecipeError, UnknownNameError
    from transferkit.merge.adapters import combination_for
    from transferkit.merge.api import method_of

    entries = raw.get("merge")
    problems = []
    for i, e in enumerate(entries if isinstance(entries, list) else []):
        method = e.get("method", "uniform_soup") if isinstance(e, dict) else None
        if not isinstance(method, (str, dict)):
            continue
        try:
            name, kind, options = method_of(method)
        except (UnknownNameError, RecipeError) as err:
            problems.append(f"merge.{i}.method: {err}")
            continue
        if e.get("refit_heads") and kind.kind == "ensemble":
            problems.append(f"merge.{i}.refit_heads: {_REFIT_ENSEMBLE}")
        if e.get("lora") == "adapters":
            combination = e.get("lora_combination")
            try:
                combination_for(name, kind, options, combination if isinstance(combination, str) else None)
            except DataError as err:
                problems.append(f"merge.{i}.lora: {err}")
            problems += [f"merge.{i}.lora: {p}" for p in _adapter_members(raw, e)]
    return problems


def _adapter_members(raw: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    """What keeps the members of a ``lora: adapters`` merge from merging their adapters, as far as the recipe and the
    other runs' ``model.json`` tell: a member that is no LoRA model keeping its adapters, or another rank or target
    modules than the first member's. The merge checks the members' saved folders again (``check_adapters``)."""
    from transferkit.io import read_json
    from transferkit.specs import parse_spec, spec_name
    from transferkit.strategies import STRATEGIES

    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    assert isinstance(train, dict)
    strategies: dict[str, Any] = {spec_name(train.get("strategy", "full")): train.get("strategy", "full")}
    for c in raw.get("compare") or []:
        if isinstance(c, dict) and "strategy" in c:
            strategies[c.get("label") or spec_name(c["strategy"])] = c["strategy"]
    found: list[tuple[str, dict[str, Any] | None]] = []  # (member, its LoRA r and targets, or None: no adapters)
    models = entry.get("models")
    for name in models if isinstance(models, list) and models else list(strategies):
        spec = strategies.get(name)
        if spec is None or spec_name(spec) == "auto":
            continue  # a student, a model not in the recipe or a strategy chosen at run time: checked at the merge
        try:
            _, _, options = parse_spec(spec, STRATEGIES, lambda s: s.config)
        except Exception:
            continue  # an unknown strategy or option: the train stage's check names it
        kept = spec_name(spec) == "lora" and not options.merge
        found.append((f"model '{name}'", {"r": options.r, "target_modules": options.target_modules} if kept else None))
    source = raw.get("source")
    here = source.get("name") if isinstance(source, dict) else source
    problems = []
    runs = entry.get("runs")
    for run in map(Path, runs if isinstance(runs, list) else []):
        theirs = read_json(run / "metrics.json").get("source") if (run / "metrics.json").is_file() else here
        if theirs != here:
            problems.append(
                f"adapters merges adapters on one base, but run '{run}' started from {theirs!r}, this run from "
                f"{here!r}: merge runs of one source"
            )
        folder = run / "model" if (run / "model" / "model.json").is_file() else run
        if (folder / "model.json").is_file():
            adapter = read_json(folder / "model.json").get("adapter") or {}
            has = adapter.get("type") == "lora"
            found.append((f"run '{run}'", {k: adapter.get(k) for k in ("r", "target_modules")} if has else None))
    problems += [
        f"adapters merges LoRA adapters, but {who} keeps none (not trained with lora, merge: false): use lora: fold "
        "(its weights merged as they are, LoRA members folded first), or leave it out of the merge"
        for who, lora in found
        if lora is None
    ]
    loras = [(who, layout) for who, layout in found if layout is not None]
    for who, layout in loras[1:]:
        (first, first_layout) = loras[0]
        for key, what in (("r", "rank"), ("target_modules", "target modules")):
            default = key == "target_modules" and None in (layout[key], first_layout[key])  # resolved when trained
            if layout[key] != first_layout[key] and not default:
                problems.append(
                    f"{who} has LoRA {what} {layout[key]!r}, {first} {first_layout[key]!r}: adapters merges "
                    f"adapters of one {what}; use lora: fold"
                )
    return problems


def extend(raw: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``transferkit merge RUN_DIR runs=[OTHER, ...] method=ties ...``: one more merge on a finished run."""
    usage = "merge on a finished run takes runs=[RUN, ...] method=NAME|{name: ..., option: value} label=NAME"
    return append_entry(raw, "merge", MergeEntry, options, usage)


def _applies(recipe: Recipe) -> bool:
    return bool(recipe.merge)


STAGE = Stage(
    "merge",
    run,
    _applies,
    done,
    load,
    keys=("merge",),
    needs=("models",),
    gives=("models",),
    check=check,
    extend=extend,
    help="merge trained models into one (soups, task arithmetic, TIES, DARE) or an ensemble",
    example="runs=[runs/other] method={name: ties, density: 0.2}",
)
