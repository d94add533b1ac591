"""Running a recipe: the run directory, then the recipe's stages in order.

``run_recipe`` is the whole flow: prepare the run directory, then run each stage (``transferkit.stages``) in the
order the recipe writes them; a stage already done on disk (its resume rule) is read back instead of run again.
``run_stage`` adds one stage to a finished run (``transferkit STAGE RUN_DIR key=value...``).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from transferkit import __version__
from transferkit.config import Recipe, apply_overrides, dump_recipe, read_yaml
from transferkit.errors import RecipeError, RunDirError, UnknownNameError, did_you_mean
from transferkit.io import make_dirs, read_json, remove_temporaries, write_json, write_text
from transferkit.recipe import load_recipe
from transferkit.stages import STAGES, RunContext, stage_order

# what a run's models are trained on: a recipe run --from a run directory must keep these as they are
_INPUTS = ("seed", "source", "rank", "pretrain", "transfer", "data", "recsys")


def run_recipe(
    recipe: Recipe | str | Path,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    overrides: list[str] | None = None,
    from_run: str | Path | None = None,
) -> Path:
    """Run a whole recipe and write its run directory; returns the directory.

    Args:
        recipe: a Recipe, or the path of a YAML recipe.
        out: the run directory (default ``runs/NAME``).
        resume: continue an interrupted run of the same recipe in ``out`` (stages done are read back).
        overwrite: replace the run in ``out``.
        overrides: ``key.path=value`` changes to the recipe.
        from_run: run the recipe's stages on this finished run: what it holds already (same data, same source)
            is read back, not retrained; the new stages and models are added, metrics.json and report.html updated.
    """
    from transferkit.engine.loop import make_accelerator

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    if from_run is not None:
        out = Path(from_run)
        _check_same_inputs(out, recipe)
    out = Path(out or Path("runs") / recipe.name)
    accelerator = make_accelerator(recipe.train.mixed_precision)
    main = accelerator.is_main_process
    if from_run is None:
        prepare_run_dir(out, recipe, resume, overwrite, main)
    if main and (resume or from_run is not None):
        # what an earlier process killed mid-write left (its half-written checkpoint, a model folder it was
        # building): nothing writes to the run now, and every stage writes its outputs again from scratch
        remove_temporaries(out)
    accelerator.wait_for_everyone()
    ctx = RunContext(
        recipe,
        out,
        accelerator,
        resume=resume or from_run is not None,
        log=print if main else _silent,
        source_spec=recipe.source,
    )
    # --resume of a run that is done already (same recipe): it stays "done" whatever happens now (a full disk while
    # its summary is rewritten must not turn a finished run back into "running" or "failed")
    finished = (resume or from_run is not None) and _is_done(out / "run.json", recipe)
    if main and not finished:
        _start(ctx, from_run is not None)
    accelerator.wait_for_everyone()
    try:
        for stage in stage_order(recipe):
            if ctx.resume and stage.load is not None and stage.done(ctx):
                stage.load(ctx)
            else:
                stage.run(ctx)
    except BaseException as e:
        if main and not finished:
            _mark_failed(out / "run.json", e)
        raise
    if main:
        write_json(out / "run.json", {**read_json(out / "run.json"), "status": "done"})
    accelerator.wait_for_everyone()
    return out


def run_stage(name: str, run_dir: str | Path, options: list[str] | None = None) -> Path:
    """Add the stage ``name`` to the finished run in ``run_dir``, configured by ``key=value`` options (e.g.
    ``train``: ``strategy=bitfit label=bitfit-lr overrides.lr=0.01``; ``baselines``: ``names=[tfidf]``).

    What the run holds is read back, not retrained; metrics.json and report.html are updated.
    """
    stage = _addable(name)
    bad = [o for o in options or [] if "=" not in o]
    if bad:
        raise RecipeError(
            f"transferkit {name}: '{bad[0]}' is not a key=value option; e.g. transferkit {name} RUN_DIR {stage.example}"
        )
    return add_stage(name, run_dir, apply_overrides({}, options or []))


def add_stage(name: str, run_dir: str | Path, options: dict[str, Any]) -> Path:
    """``run_stage`` with the options as a mapping (the Python API): the stage's section added to the run's
    recipe, then the recipe run again on the run, every done stage read back."""
    stage = _addable(name)
    assert stage.extend is not None
    run_dir = Path(run_dir)
    extended = stage.extend(read_yaml(_run_file(run_dir, "recipe.yaml")), options)
    return run_recipe(load_recipe(extended), from_run=run_dir)


def _addable(name: str) -> Any:
    if name not in STAGES:
        raise UnknownNameError(
            f"unknown stage '{name}'.{did_you_mean(name, STAGES)} Valid choices: {', '.join(STAGES)}."
        )
    stage = STAGES[name]
    if stage.extend is None:
        addable = [s.name for s in STAGES.values() if s.extend is not None]
        raise RecipeError(
            f"the stage '{name}' cannot be added to a finished run (it comes before training); "
            f"stages that can: {', '.join(addable)}. Start a new run with it in the recipe."
        )
    return stage


def _is_done(run_file: Path, recipe: Recipe) -> bool:
    """Whether ``run_file`` says its run finished, with this very recipe."""
    try:
        info = read_json(run_file)
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("status") == "done" and info.get("recipe_hash") == _recipe_hash(recipe)


def _mark_failed(run_file: Path, error: BaseException) -> None:
    """run.json says the run stopped (``failed`` with the error, or ``interrupted``), not ``running``; writing it
    never hides the error itself."""
    interrupted = isinstance(error, KeyboardInterrupt)
    try:
        info = read_json(run_file)
        info.update(status="interrupted" if interrupted else "failed")
        if not interrupted:
            info["error"] = f"{type(error).__name__}: {error}"
        write_json(run_file, info)
    except Exception:  # an unreadable run.json, a full disk: the run's own error is the one to see
        pass


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


def _run_file(run_dir: Path, name: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        raise RunDirError(
            f"'{run_dir}' is not a transferkit run directory ({name} is missing); give the folder "
            "that `transferkit run` wrote"
        )
    return path


def _check_same_inputs(run_dir: Path, recipe: Recipe) -> None:
    """A recipe run on an existing run keeps what its models were trained on (data, seed, source...)."""
    before = load_recipe(_run_file(run_dir, "recipe.yaml")).model_dump(mode="json", include=set(_INPUTS))
    now = recipe.model_dump(mode="json", include=set(_INPUTS))
    changed = [k for k in _INPUTS if before.get(k) != now.get(k)]
    if changed:
        raise RunDirError(
            f"--from {run_dir}: the recipe changes {', '.join(changed)}, which the run's models were trained on; "
            "keep them as the run's recipe.yaml has them, or start a new run"
        )


def _recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()[:16]


def _start(ctx: RunContext, added: bool) -> None:
    """Write the resolved recipe and run.json; a recipe run on an existing run keeps the hashes it had before."""
    out, accelerator = ctx.out, ctx.accelerator
    make_dirs(out)
    run_file = out / "run.json"
    history: list[str] = []
    if added:  # the hashes the run had before stages were added to it (none when the recipe is unchanged)
        before = read_json(run_file)
        history = list(before.get("history", []))
        if before["recipe_hash"] != _recipe_hash(ctx.recipe):
            history.append(before["recipe_hash"])
    write_text(out / "recipe.yaml", dump_recipe(ctx.recipe))
    write_json(
        run_file,
        {
            "recipe_hash": _recipe_hash(ctx.recipe),
            "transferkit_version": __version__,
            "status": "running",
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type.value),
            "device": str(accelerator.device),
            **({"history": history} if history else {}),
        },
    )


def prepare_run_dir(out: Path, recipe: Recipe, resume: bool, overwrite: bool, main: bool = True) -> None:
    """Refuse to write over a different run; ``--resume`` continues the same run (a failed or interrupted one too),
    ``--overwrite`` replaces it."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise RunDirError(
                f"run directory '{out}': '{path}' is a file, not a folder; give --out a folder path (a new or empty "
                "folder, or a run to --resume)"
            )
    run_file = out / "run.json"
    if out.exists() and any(out.iterdir()):
        if overwrite:
            if not run_file.exists():
                raise RunDirError(
                    f"'{out}' is not a transferkit run directory (no run.json); --overwrite deletes only "
                    "runs. Choose another --out or empty it yourself."
                )
            if main:
                shutil.rmtree(out)
        elif resume and run_file.exists():
            if read_json(run_file).get("recipe_hash") != _recipe_hash(recipe):
                raise RunDirError(
                    f"'{out}' holds a run of a different recipe; --resume continues only the same "
                    "recipe. Use another --out, --from to add the recipe's new stages to it, or --overwrite to "
                    "replace it."
                )
        elif resume:
            raise RunDirError(
                f"'{out}' is not a transferkit run directory (no run.json): nothing to resume. "
                "Use another --out, or --overwrite to replace its contents."
            )
        else:
            what = "a run" if run_file.exists() else "files"
            raise RunDirError(
                f"'{out}' already holds {what}. Pass --resume to continue it, --overwrite to replace "
                "it, or choose another --out."
            )
