"""``distill:``: students trained from a teacher on the labelled split and the unlabelled pool.

Each entry names a teacher (a model of this run, other runs' selected models, or a source with a matching head),
a student (a source, a transferred copy of the teacher, or the run's own target) and a loss (``kd``, ``dkd``,
``hint``, ``pseudo_label``); ``transferkit.distill.distill`` trains it, round by round. The student is evaluated on
the run's test split like a trained model, joins the models ``select`` chooses from, and the report puts it beside
its teacher: test accuracy, parameters, MACs and CPU latency at batch 1.

Outputs, per entry NAME: ``models/NAME/``, ``checkpoints/NAME/result.json`` (its metrics, the distillation record:
pool size, rounds, pseudo-labels kept and their accuracy), ``checkpoints/NAME/teacher-round*.pt`` (the teacher's
outputs, kept until the student is done). Resume rule: the result file, made with the same settings, is the student
(read back); an interrupted student resumes from its checkpoints (finished rounds are read back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferkit.config import Recipe, TrainConfig
from transferkit.config.recipe import DistillEntry
from transferkit.stages.base import (
    RunContext,
    Stage,
    append_entry,
    one_accelerator,
    result_file,
    settings_sha,
    train_override_problems,
    train_settings,
)


def _train_config(recipe: Recipe, entry: DistillEntry) -> TrainConfig:
    return TrainConfig(**{**recipe.train.model_dump(), **entry.train})


def _settings_sha(recipe: Recipe, entry: DistillEntry) -> str:
    train = train_settings(_train_config(recipe, entry))
    return settings_sha({**entry.model_dump(mode="json", exclude={"train"}), "train": train})


_SPLIT_KEYS = ("dataset", "classes", "test_size")  # with the seed, these fix the test split


def _teacher_run(ctx: RunContext, run: Path) -> tuple[Any, str]:
    """A run directory's selected model, after checking the run split the data as this one does (else the teacher
    may have trained on this run's test examples)."""
    from transferkit.config import read_yaml
    from transferkit.errors import RunDirError
    from transferkit.models.base import load_model

    recipe_file = run / "recipe.yaml"
    if not recipe_file.is_file():
        raise RunDirError(f"distill: teacher run '{run}' has no recipe.yaml; give the directory of a finished run")
    theirs = read_yaml(recipe_file)
    ours = ctx.recipe.model_dump(mode="json")
    data = theirs.get("data") if isinstance(theirs.get("data"), dict) else {}
    assert isinstance(data, dict)
    differ = [
        f"data.{k}: {data.get(k, ours['data'][k])!r} there, {ours['data'][k]!r} here"
        for k in _SPLIT_KEYS
        if data.get(k, ours["data"][k]) != ours["data"][k]
    ]
    if theirs.get("seed", 0) != ours["seed"]:
        differ.append(f"seed: {theirs.get('seed', 0)!r} there, {ours['seed']!r} here")
    if differ:
        raise RunDirError(
            f"distill: teacher run '{run}' split its data otherwise ({'; '.join(differ)}): its training examples "
            "may be in this run's test split. Use the teacher run's data.dataset, data.classes, data.test_size "
            "and seed (transferkit distill TEACHER_RUN copies them)"
        )
    folder = run / "model" if (run / "model" / "model.json").is_file() else run
    if not (folder / "model.json").is_file():
        raise RunDirError(f"distill: teacher run '{run}' holds no selected model (model/model.json is missing)")
    return load_model(folder), str(folder)


def _teachers(ctx: RunContext, entry: DistillEntry) -> tuple[list[Any], list[str]]:
    """The teacher models and how each is named in the report."""
    from transferkit.sources import load_source

    if entry.teacher_runs:
        loaded = [_teacher_run(ctx, Path(r)) for r in entry.teacher_runs]
        return [m for m, _ in loaded], [d for _, d in loaded]
    if entry.teacher_source is not None:
        return [load_source(entry.teacher_source)], [entry.teacher_source.name]
    name = entry.teacher or ctx.recipe.train.strategy_name
    return [ctx.model(name)], [name]


def _student(ctx: RunContext, entry: DistillEntry, teacher: Any, classes: list[str]) -> Any:
    """The student before training: a source with a new head, a transferred copy of the teacher, or the target."""
    import torch

    from transferkit.sources import load_source
    from transferkit.transfer import build_target
    from transferkit.transfer.api import transfer_step

    seed = ctx.recipe.seed
    if entry.student is not None:
        torch.manual_seed(seed)
        source = load_source(entry.student)
        return build_target(source, classes, pretrained=entry.student.pretrained, seed=seed)
    if entry.student_transfer is not None:
        if teacher is None:
            from transferkit.errors import RecipeError

            raise RecipeError("student_transfer builds the student from the teacher, but this loss has no teacher")
        return transfer_step(teacher, entry.student_transfer, classes, seed=seed)
    return ctx.make_target(classes)


def _example(data: Any) -> Any:
    """One validation input (batch of 1), as the model takes it."""
    from transferkit.engine.loop import make_loader

    return next(iter(make_loader(data.dataset("val"), 1)))[0]


def distill_one(ctx: RunContext, entry: DistillEntry) -> dict[str, Any]:
    """Train, evaluate, measure and save one entry's student; returns its entry of ``metrics.json``."""
    from transferkit.distill import distill, for_model
    from transferkit.distill.losses import FixMatchConfig, loss_config
    from transferkit.engine.loop import JobPaths
    from transferkit.evaluation.cost import latency_ms, model_cost
    from transferkit.io import write_json
    from transferkit.models.base import save_model
    from transferkit.pipeline import evaluate, fingerprint
    from transferkit.stages.train import drop_checkpoints

    data, device = ctx.data(), ctx.accelerator.device
    teacherless = isinstance(loss_config(entry.loss)[1], FixMatchConfig)  # the model teaches itself
    teachers, described = ([], []) if teacherless else _teachers(ctx, entry)
    student = _student(ctx, entry, teachers[0] if teachers else None, data.classes)
    mine = for_model(data, student)
    student.preprocess = mine.preprocess
    cfg = _train_config(ctx.recipe, entry)
    job_dir = ctx.out / "checkpoints" / entry.name
    paths = JobPaths(job_dir / "last.pt", ctx.out / "metrics.jsonl", entry.name)

    def on_round(r: int, model: Any) -> dict[str, Any]:
        return {"test_accuracy": evaluate(model, mine.dataset("test"), len(data.classes), device=device)["accuracy"]}

    job = distill(
        student,
        teachers,
        data,
        cfg,
        entry.loss,
        rounds=entry.rounds,
        unlabelled=entry.unlabelled,
        seed=ctx.recipe.seed,
        accelerator=ctx.accelerator,
        paths=paths,
        resume=ctx.resume,
        cache_dir=job_dir if ctx.main else None,  # the teacher's outputs: written by one process
        on_round=on_round,
    )
    job["test"] = evaluate(student, mine.dataset("test"), len(data.classes), device=device)
    teacher_rows = []
    for model, name in zip(teachers, described):
        theirs = for_model(data, model)
        accuracy = (
            ctx.results[name]["test"]["accuracy"]
            if name in ctx.results
            else evaluate(model, theirs.dataset("test"), len(data.classes), device=device)["accuracy"]
        )
        teacher_rows.append((name, model, theirs, accuracy))
    models = {f"teacher {n}": m.cpu() for n, m, _, _ in teacher_rows} | {"student": student.cpu()}
    examples = {f"teacher {n}": _example(d) for n, _, d, _ in teacher_rows} | {"student": _example(mine)}
    latency = latency_ms(models, examples)
    job["cost"] = {
        key: {**model_cost(models[key], examples[key]), "latency_ms": latency[key]["median_ms"]} for key in models
    }
    job["teachers"] = [{"name": n, "test_accuracy": a} for n, _, _, a in teacher_rows]
    job["strategy"] = f"distill:{job['distill']['loss']}"
    job["weights_sha256"] = fingerprint(student)
    job["settings_sha256"] = _settings_sha(ctx.recipe, entry)
    if ctx.accelerator.num_processes > 1:  # every process must end with the same student: record the evidence
        from accelerate.utils import gather_object

        job["rank_weights_sha256"] = gather_object([job["weights_sha256"]])
    if ctx.main:
        save_model(
            student,
            ctx.out / "models" / entry.name,
            extra={"strategy": job["strategy"], "run": ctx.recipe.name, "distill": job["distill"]},
        )
        write_json(result_file(ctx, entry.name), job)
    # the student is done: its checkpoints (train.checkpoints: until_done) and its teacher's outputs are not needed
    drop_checkpoints(ctx, entry.name, cfg)
    if ctx.main:
        for path in job_dir.glob("teacher-round*.pt"):
            path.unlink(missing_ok=True)
    ctx.wait()
    return job


def _use(ctx: RunContext, entry: DistillEntry, result: dict[str, Any]) -> None:
    """The student joins the run's models, with a table beside its teacher (and one row per round)."""
    ctx.results[entry.name] = result
    cost = result["cost"]
    rows = [
        [key, t["test_accuracy"], cost[key]["params"], cost[key]["macs"], cost[key]["latency_ms"]]
        for t in result["teachers"]
        if (key := f"teacher {t['name']}") in cost
    ]
    s = cost["student"]
    rows.append([f"student {entry.name}", result["test"]["accuracy"], s["params"], s["macs"], s["latency_ms"]])
    d = result["distill"]
    ctx.tables.append(
        {
            "title": f"Distill {entry.name}",
            "note": f"loss {d['loss']} {d['options']}; teacher outputs {d['teacher_outputs']}; unlabelled pool "
            f"{d['pool']}; latency: CPU, batch 1, median",
            "columns": ["model", "test accuracy", "parameters", "MACs", "latency ms"],
            "rows": rows,
        }
    )
    if len(d["rounds"]) > 1 or "kept" in d["rounds"][0]:
        ctx.tables.append(
            {
                "title": f"Distill {entry.name}: rounds",
                "note": "kept: pool examples whose teacher confidence reached the threshold",
                "columns": ["round", "val accuracy", "test accuracy", "kept", "pseudo-label accuracy"],
                "rows": [
                    [
                        r["round"],
                        r["val_accuracy"],
                        r.get("test_accuracy"),
                        r.get("kept"),
                        r.get("pseudo_label_accuracy"),
                    ]
                    for r in d["rounds"]
                ],
            }
        )
    ctx.log(
        f"[{entry.name}] {d['loss']} student: test accuracy {result['test']['accuracy']:.4f} | teacher "
        + ", ".join(f"{t['test_accuracy']:.4f}" for t in result["teachers"])
        + f" | {s['params'] / 1e6:.2f} M params, {s['latency_ms']:.1f} ms"
    )


def _read(ctx: RunContext, entry: DistillEntry) -> dict[str, Any] | None:
    from transferkit.errors import RunDirError
    from transferkit.io import read_json

    path = result_file(ctx, entry.name)
    if not path.is_file():
        return None
    result = read_json(path)
    if result.get("settings_sha256") != _settings_sha(ctx.recipe, entry):
        raise RunDirError(
            f"'{ctx.out}' already holds a student '{entry.name}' distilled with other settings; give the new one "
            "another label"
        )
    return result


def done(ctx: RunContext) -> bool:
    return all(result_file(ctx, e.name).is_file() for e in ctx.recipe.distill)


def load(ctx: RunContext) -> None:
    for entry in ctx.recipe.distill:
        result = _read(ctx, entry)
        assert result is not None
        _use(ctx, entry, result)


def run(ctx: RunContext) -> None:
    for entry in ctx.recipe.distill:
        result = _read(ctx, entry) if ctx.resume else None
        _use(ctx, entry, result if result is not None else distill_one(ctx, entry))


def check(raw: dict[str, Any]) -> list[str]:
    """Each entry's loss against the registry; its train settings against TrainConfig and the strategies."""
    from transferkit.distill.losses import loss_config
    from transferkit.errors import RecipeError, UnknownNameError

    entries = raw.get("distill")
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    assert isinstance(train, dict)
    problems = []
    for i, e in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(e, dict):
            continue
        loss = e.get("loss", "kd")
        if isinstance(loss, (str, dict)):
            try:
                loss_config(loss)
            except (UnknownNameError, RecipeError) as err:
                problems.append(f"distill.{i}.loss: {err}")
        overrides = e.get("train")
        if isinstance(overrides, dict):
            problems += train_override_problems(f"distill.{i}.train", train, overrides)
            if "mixed_precision" in overrides:  # the student trains on the run's one accelerator
                problems += one_accelerator(f"distill.{i}.train.mixed_precision", overrides["mixed_precision"], raw)
    return problems


def extend(raw: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``transferkit distill RUN_DIR student=SPEC loss=kd ...`` on a finished run: one more student."""
    usage = "distill on a finished run takes a distill entry (student=SPEC loss=NAME label=... train.epochs=...)"
    return append_entry(raw, "distill", DistillEntry, options, usage)


def _applies(recipe: Recipe) -> bool:
    return bool(recipe.distill)


STAGE = Stage(
    "distill",
    run,
    _applies,
    done,
    load,
    keys=("distill",),
    needs=("models",),
    gives=("models",),
    check=check,
    extend=extend,
    help="train students from a teacher on the labels and the unlabelled pool (kd, dkd, hint, pseudo_label)",
    example="student=timm:efficientnet_lite0 loss={name: kd, temperature: 4}",
)
