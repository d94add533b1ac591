"""The command line. Each subcommand calls one plain function of the Python API and nothing more."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from transferkit.errors import RecipeError, TransferKitError


def _cmd_run(args: argparse.Namespace) -> int:
    from transferkit.runner import run_recipe

    out = run_recipe(
        args.recipe,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        overrides=args.overrides,
        from_run=args.from_run,
    )
    print(f"run directory: {out}\nreport: {out / 'report.html'}")
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from transferkit.runner import run_stage

    out = run_stage(args.command, args.run_dir, args.options)
    print(f"run directory: {out}\nreport: {out / 'report.html'}")
    return 0


def _copy_run(host: Any, out: Any, why: str) -> Any:
    """A copy of the run directory ``host`` in ``out`` (new or empty), which later stages change instead of it."""
    import shutil

    from transferkit.errors import RunDirError

    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"'{out}' is not empty; choose another --out ({why})")
    if not (host / "run.json").is_file():
        raise RunDirError(f"'{host}' is not a transferkit run directory (run.json is missing)")
    shutil.copytree(host, out, dirs_exist_ok=True)
    return out


def _cmd_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transferkit.runner import add_stage

    if not args.refit_heads and (args.refit_epochs is not None or args.refit_lr is not None):
        raise RecipeError("--refit-epochs and --refit-lr set the head refit: give --refit-heads as well")
    host, *others = args.runs
    method: dict[str, Any] = {"name": args.method}
    for key in ("density", "lam", "p", "scope", "combine", "vote", "seed"):
        if getattr(args, key) is not None:
            method[key] = getattr(args, key)
    if args.out:  # a copy of the first run receives the merge; the first run stays as it was
        host = str(_copy_run(Path(host), Path(args.out), f"the merge is added to a copy of {host}"))
    from transferkit.io import read_json

    selected = read_json(Path(host) / "metrics.json")["selected"]  # each run gives its selected model
    options: dict[str, Any] = {
        "models": [selected],
        "runs": others,
        "method": method,
        "recalibrate_bn": not args.no_recalibrate,
    }
    if args.label:
        options["label"] = args.label
    for key in ("lora", "lora_combination", "lora_rank"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.refit_heads:
        options["refit_heads"] = True
        refit = {k: v for k, v in (("epochs", args.refit_epochs), ("lr", args.refit_lr)) if v is not None}
        if refit:
            options["refit_train"] = refit
    out_dir = add_stage("merge", host, options)
    print(f"run directory: {out_dir}\nreport: {out_dir / 'report.html'}")
    label = args.label or f"merge-{args.method}"
    tasks = read_json(out_dir / "metrics.json").get("multi_task", {}).get(label, {}).get("tasks")
    if tasks:  # different label sets: a multi-task model, not the run's selected model
        folder = out_dir / "models" / label
        print(
            f"multi-task model: {folder} (tasks: {', '.join(tasks)}); transferkit predict {folder} INPUT [--task NAME]"
        )
    return 0


def distill_recipe(
    teacher_run: str, out: str, entry: dict[str, Any], student: str | None, unlabelled: str | None
) -> Any:
    """The recipe of a new run in which a student learns from ``teacher_run``'s selected model: the teacher run's
    data (the same split) and training settings, the student as its source (so ``train:`` gives the same student
    trained on the labels alone, beside the distilled one), and one ``distill:`` entry."""
    from pathlib import Path

    from transferkit.errors import RunDirError
    from transferkit.recipe import load_recipe, read_yaml

    recipe_file = Path(teacher_run) / "recipe.yaml"
    if not recipe_file.is_file():
        raise RunDirError(f"'{teacher_run}' is not a transferkit run directory (recipe.yaml is missing)")
    theirs = read_yaml(recipe_file)
    if not isinstance(theirs.get("data"), dict):
        raise RunDirError(f"'{teacher_run}' has no data: section (a recommendation run cannot teach a classifier)")
    data = dict(theirs["data"])
    if unlabelled is not None:
        data["unlabelled"] = unlabelled
    raw: dict[str, Any] = {
        "name": Path(out).name,
        "seed": theirs.get("seed", 0),
        "source": student or theirs.get("source"),
        "data": data,
        "train": theirs.get("train", {}),
        "distill": [{"teacher_runs": [str(teacher_run)], **entry}],
    }
    return load_recipe(raw)


def _cmd_distill(args: argparse.Namespace) -> int:
    import yaml

    from transferkit.io import read_json
    from transferkit.runner import add_stage, run_recipe

    student = yaml.safe_load(args.student) if args.student and args.student.lstrip().startswith("{") else args.student
    entry: dict[str, Any] = {"rounds": args.rounds, "unlabelled": not args.labels_only}
    loss: dict[str, Any] = {"name": args.loss}
    for key in ("temperature", "alpha", "beta", "threshold", "weight"):
        if getattr(args, key) is not None:
            loss[key] = getattr(args, key)
    entry["loss"] = loss
    entry["train"] = {k: getattr(args, k) for k in ("epochs", "lr", "strategy") if getattr(args, k) is not None}
    if args.label:
        entry["label"] = args.label
    if args.out:
        recipe = distill_recipe(args.teacher_run, args.out, entry, student, args.unlabelled)
        out = run_recipe(recipe, out=args.out, resume=args.resume)
    else:  # the student joins the teacher's own run, taught by its selected model
        if args.unlabelled is not None:
            raise TransferKitError(
                "--unlabelled changes the run's data: give --out NEW_RUN_DIR for a new run with the teacher run's "
                "data and this pool"
            )
        from pathlib import Path

        entry["teacher"] = read_json(Path(args.teacher_run) / "metrics.json")["selected"]
        if student:
            entry["student"] = student
        out = add_stage("distill", args.teacher_run, entry)
    print(f"run directory: {out}\nreport: {out / 'report.html'}")
    return 0


def compress_sections(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe sections ``transferkit compress`` adds: ``prune:`` (with its recovery), and ``quantize:`` (torchao)
    or, with ``--export onnx``, ``export:`` with ONNX Runtime int8."""
    sections: dict[str, Any] = {}
    if args.prune is None and args.macs is None and args.quantize is None and args.export is None:
        raise RecipeError("nothing to do: give --prune RATIO (or --macs N), --quantize int8 and/or --export onnx")
    if args.prune is not None or args.macs is not None:
        prune: dict[str, Any] = {"ratio": args.prune} if args.prune is not None else {"macs": args.macs}
        prune.update({k: v for k, v in (("model", args.model), ("importance", args.importance)) if v is not None})
        if args.round_to is not None:
            prune["round_to"] = args.round_to
        if args.recovery_epochs == 0:
            prune["recovery"] = None
        elif args.recovery_epochs is not None:
            prune["recovery"] = {"epochs": args.recovery_epochs}
        sections["prune"] = prune
    model = {"model": args.model} if args.model and "prune" not in sections else {}
    if args.export is not None:
        export: dict[str, Any] = {"format": args.export, **model}
        if args.quantize is not None:
            export["quantize"] = args.quantize
        sections["export"] = export
    elif args.quantize is not None:
        method = "auto" if args.quantize == "int8" else args.quantize
        sections["quantize"] = {"method": method, **model}
    return sections


def _cmd_compress(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transferkit.errors import RunDirError
    from transferkit.recipe import load_recipe, read_yaml
    from transferkit.runner import run_recipe

    sections = compress_sections(args)
    host = Path(args.run_dir)
    if not (host / "run.json").is_file() or not (host / "recipe.yaml").is_file():
        raise RunDirError(f"'{host}' is not a finished transferkit run directory (run.json/recipe.yaml are missing)")
    if args.out:  # a copy of the run receives the compressed models; the run itself stays as it was
        host = _copy_run(host, Path(args.out), "the run is copied there, then compressed")
    raw = read_yaml(host / "recipe.yaml")
    taken = [k for k in sections if raw.get(k) is not None]
    if taken:
        raise RunDirError(
            f"'{host}' already has a {', '.join(taken)}: section; compress a copy with --out NEW_DIR, or add it "
            "with other settings through `transferkit run RECIPE --from RUN_DIR`"
        )
    out_dir = run_recipe(load_recipe({**raw, **sections}), from_run=host)
    print(f"run directory: {out_dir}\nreport: {out_dir / 'report.html'}")
    from transferkit.io import is_temporary

    for folder in sorted(p for p in (out_dir / "exports").glob("*/model.onnx") if not is_temporary(p.parent)):
        print(f"exported: {folder.parent} (transferkit predict {folder.parent} INPUT runs it with ONNX Runtime)")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from transferkit.recipe import apply_overrides, read_yaml, validate_recipe

    raw = apply_overrides(read_yaml(args.recipe), args.overrides)
    _, problems = validate_recipe(raw)
    if problems:
        print(f"{args.recipe}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"{args.recipe}: valid")
    return 0


def _predict_exported(args: argparse.Namespace) -> int:
    """``transferkit predict EXPORTED_FOLDER``: ONNX Runtime with the model's own preprocessing; torch is never
    imported on this path (``transferkit.exported``)."""
    from transferkit.exported import OnnxPredictor, read_lines

    if args.task:
        raise TransferKitError("--task is for multi-task models; an exported folder holds one single-task model")
    predictor = OnnxPredictor(args.run_dir)
    inputs: list[Any] = list(args.inputs)
    if args.file:  # one text per line (an image or audio model refuses texts, naming what it takes)
        inputs += read_lines(args.file)
    if not inputs:
        raise TransferKitError("nothing to predict: give inputs (image or audio files, or texts)")
    _print_predictions(predictor.predict(inputs, top_k=args.top_k), args.json)
    return 0


def _print_predictions(predictions: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(predictions, indent=2))
        return
    for p in predictions:
        top = "  ".join(f"{t['label']} {t['probability']:.3f}" for t in p["top"])
        task = f" [{p['task']}]" if "task" in p else ""  # a multi-task model: one line per task
        print(f"{p.get('file', p.get('text', p.get('user')))}{task}: {top}")


def _cmd_predict(args: argparse.Namespace) -> int:
    from transferkit.exported import is_exported

    if args.top_k < 1:
        raise RecipeError(f"--top-k {args.top_k}: give 1 or more (the number of labels listed per input)")
    if is_exported(args.run_dir):
        return _predict_exported(args)
    from transferkit.data.modality import MODALITIES
    from transferkit.exported import read_lines
    from transferkit.predict import load_run, path_inputs

    if args.top_k < 1:
        raise RecipeError(f"--top-k {args.top_k}: give 1 or more (the number of labels listed per input)")
    predictor = load_run(args.run_dir, task=args.task)
    modality = MODALITIES.get(predictor.modality)
    inputs = path_inputs(args.inputs, predictor.modality) if modality is not None else list(args.inputs)
    if args.file:
        if modality is None or not modality.reads_lines:
            raise TransferKitError("--file reads one text per line, for text models; give image paths as arguments")
        inputs += read_lines(args.file)
    if not inputs:
        what = modality.inputs_help if modality is not None else "user ids"  # a recommendation model
        raise TransferKitError(f"nothing to predict: give {what}")
    _print_predictions(predictor.predict(inputs, top_k=args.top_k), args.json)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from transferkit.demo import run_demo

    run_demo(args.task, out=args.out, resume=args.resume)
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    from transferkit.data import DATASETS
    from transferkit.distill.losses import LOSSES
    from transferkit.evaluation.baselines import BASELINES
    from transferkit.merge.methods import METHODS
    from transferkit.sources import BUILTIN_SOURCES, PREFIXES
    from transferkit.strategies import STRATEGIES
    from transferkit.strategies.regularizers import REGULARIZERS

    sections = {
        "sources (built-in; also "
        + ", ".join(f"{p}:NAME" for p in PREFIXES)
        + ", or a path)": BUILTIN_SOURCES.describe(),
        "strategies": STRATEGIES.describe(),
        "regularizers (train.regularizer; combine with any strategy)": REGULARIZERS.describe(),
        "datasets (built-in; also an image folder, a CSV manifest path,label, a CSV/JSONL/Parquet file of "
        "texts, or an audio folder of WAV/FLAC/OGG)": DATASETS.describe(),
        "baselines (recipe baselines: [...])": BASELINES.describe(),
        "merge methods (recipe merge: [{method: ...}], transferkit merge)": METHODS.describe(),
        "distillation losses (recipe distill: [{loss: ...}], transferkit distill)": LOSSES.describe(),
    }
    if args.json:
        print(json.dumps({k.split(" ")[0]: v for k, v in sections.items()}, indent=2))
        return 0
    for title, items in sections.items():
        print(title)
        for name, help_ in items.items():
            print(f"  {name:<16} {help_}")
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from transferkit.config import DataConfig
    from transferkit.rank.candidates import SCORE_NAMES, rank_candidates

    flags = {"dataset": "--data", "per_class": "--per-class", "image_size": "--image-size"}
    try:
        data = DataConfig(dataset=args.data, per_class=args.per_class, image_size=args.image_size)
    except ValidationError as e:
        raise RecipeError(
            "; ".join(
                f"{flags.get(str(err['loc'][0]), err['loc'][0])} {err['input']}: {err['msg']}" for err in e.errors()
            )
        ) from None
    if args.max_examples is not None and args.max_examples < 1:
        raise RecipeError(f"--max-examples {args.max_examples}: give 1 or more (or leave it out: every example)")
    specs: list[Any] = []
    for c in args.candidates:
        if not c.lstrip().startswith("{"):
            specs.append(c)
            continue
        try:
            specs.append(json.loads(c))
        except json.JSONDecodeError as e:
            raise RecipeError(
                f"--candidates {c!r} is not valid JSON ({e.msg} at column {e.colno}); give a source name or a JSON "
                'object with double-quoted keys, e.g. \'{"name": "timm:resnet18", "pretrained": false}\''
            ) from None
    rows = rank_candidates(data, specs, max_examples=args.max_examples, score=args.score, seed=args.seed)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        names = list(SCORE_NAMES)
        short = {n: n.replace("_shrinkage", "_shr") + ("*" if n == args.score else "") for n in names}
        width = max(len("candidate"), *(len(r["candidate"]) for r in rows))
        print(f"{'rank':<4}  {'candidate':<{width}}" + "".join(f"  {short[n]:>10}" for n in names) + "  time (s)")
        print("-" * (4 + 2 + width + 12 * len(names) + 10))
        for r in rows:
            cells = "".join(f"  {r['scores'][n]:>10.4f}" if n in r["scores"] else f"  {'-':>10}" for n in names)
            if r["status"] != "ok":
                cells = f"  {'failed':>10}" + " " * 12 * (len(names) - 1)
            print(f"{r['rank']:<4}  {r['candidate']:<{width}}{cells}  {r['times']['total_s']:>8.2f}")
        for r in rows:
            if r["status"] != "ok":
                print(f"failed: {r['error']}")
        print(f"sorted by {args.score} (higher is better); '-': no usable source classifier head (--json says why)")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def _parse_structured(value: str | None, what: str) -> object:
    """A YAML/JSON value given inline or as a file path (YAML is a superset of JSON)."""
    if value is None:
        return None
    from pathlib import Path

    import yaml

    text = Path(value).read_text() if Path(value).is_file() else value
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"--{what}: {value!r} is neither a file nor valid JSON/YAML: {e}") from e


def _cmd_transfer(args: argparse.Namespace) -> int:
    from transferkit.config.transfer import LAYER_CHOICES
    from transferkit.transfer.api import check_transfer_out, format_report, save_transfer, transfer

    check_transfer_out(args.out, overwrite=args.overwrite)
    rules: Any = _parse_structured(args.rules, "rules")  # a file or an inline list of {from, to}
    kwargs = _parse_structured(args.kwargs, "kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RecipeError(
            f"--kwargs must be a JSON/YAML mapping of architecture arguments, e.g. '{{\"depth\": 6}}', not {kwargs!r}"
        )
    twins = sorted({"in_chans", "img_size"} & set(kwargs))
    if twins:
        raise RecipeError(f"give {twins[0]} as --{twins[0].replace('_', '-')}, not inside --kwargs")
    if args.in_chans:
        kwargs["in_chans"] = args.in_chans
    if args.img_size:
        kwargs["img_size"] = args.img_size
    blocks: str | list[int] | None = args.source_blocks
    if args.source_blocks is not None and args.source_blocks not in LAYER_CHOICES:
        try:
            blocks = [int(i) for i in args.source_blocks.split(",")]
        except ValueError:
            raise RecipeError(
                f"--source-blocks {args.source_blocks!r}: give one of {', '.join(LAYER_CHOICES)} or "
                "comma-separated source block indices such as 0,2,4"
            ) from None
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    bad = [m for m in methods or [] if m not in ("names", "rules", "structure")]
    if bad or methods == []:
        raise RecipeError(f"--methods {args.methods!r}: choose from names, rules, structure (comma-separated)")
    extra: dict[str, Any] = {"methods": methods} if methods else {}
    if getattr(args, "widen", None):
        extra["widen"] = args.widen
    model, report = transfer(
        args.source,
        args.target,
        rules=rules,
        strict=args.strict,
        labels=args.labels.split(",") if args.labels else None,
        extra_blocks="identity" if args.identity_blocks else "fresh",
        source_blocks=blocks,
        resize=args.resize,
        target_kwargs=kwargs or None,
        **extra,
    )
    out = save_transfer(model, report, args.out, overwrite=args.overwrite)
    print(format_report(report), end="")
    print(f"saved: {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def _cmd_speak(args: argparse.Namespace) -> int:
    import time

    import torch

    from transferkit.tts.voice import duration_s, load_voice, resolve_voice, write_wav

    voice = load_voice(resolve_voice(args.voice))
    scales = {
        k: v
        for k, v in (("noise_scale", args.noise_scale), ("length_scale", args.length_scale), ("noise_w", args.noise_w))
        if v is not None
    }
    start = time.perf_counter()
    wave = voice.speak(args.text, generator=torch.Generator().manual_seed(args.seed), **scales)
    took = time.perf_counter() - start
    out = write_wav(args.out, wave, voice.sample_rate)
    secs = duration_s(wave, voice.sample_rate)
    print(
        f"wrote {out}: {secs:.2f} s of audio at {voice.sample_rate} Hz in {took:.2f} s "
        f"(real-time factor {took / secs:.3f}; voice {voice.path.name})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferkit", description="Transfer learning on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe and write a run directory")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=5")
    p.add_argument("--out", help="run directory (default runs/NAME)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    g.add_argument(
        "--from",
        dest="from_run",
        metavar="RUN_DIR",
        help="run the recipe's stages on this finished run: what it holds is read back, new stages and models added",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("merge", help="merge the models of runs into one (soups, TIES, DARE) or an ensemble")
    p.add_argument("runs", nargs="+", help="run directories: the first receives the merge (or a copy, with --out)")
    p.add_argument(
        "--method",
        default="uniform_soup",
        help="uniform_soup, greedy_soup, task_arithmetic, ties, dare or ensemble (default uniform_soup)",
    )
    p.add_argument("--density", type=float, help="ties: the fraction of each task vector kept")
    p.add_argument("--lambda", dest="lam", type=float, help="task_arithmetic, ties, dare: the task vectors' scale")
    p.add_argument("--p", type=float, help="dare: the drop rate")
    p.add_argument("--scope", choices=["tensor", "global"], help="ties: trim per tensor or over the whole model")
    p.add_argument("--combine", choices=["sum", "ties"], help="dare: then task arithmetic (sum) or TIES")
    p.add_argument("--vote", choices=["mean", "majority"], help="ensemble: mean probabilities or majority vote")
    p.add_argument("--seed", type=int, help="dare: the seed of the random drop")
    p.add_argument("--label", help="the merged model's name (default merge-METHOD)")
    p.add_argument("--no-recalibrate", action="store_true", help="keep the averaged BatchNorm statistics")
    p.add_argument(
        "--lora",
        choices=["fold", "adapters"],
        help="LoRA members: fold the adapters into the weights first (default), or merge the adapters through "
        "peft into a LoRA model",
    )
    p.add_argument(
        "--lora-combination",
        help="with --lora adapters: peft's combination (cat, svd, ties_svd, dare_linear_svd, dare_ties_svd, ...)",
    )
    p.add_argument("--lora-rank", type=int, help="with --lora adapters: the rank of an SVD combination's adapter")
    p.add_argument(
        "--refit-heads",
        action="store_true",
        help="refit each task's head by a linear probe on the merged backbone's training features",
    )
    p.add_argument("--refit-epochs", type=int, help="with --refit-heads: the probe's epochs")
    p.add_argument("--refit-lr", type=float, help="with --refit-heads: the probe's learning rate")
    p.add_argument("--out", help="a new run directory: a copy of the first run, with the merge added")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("distill", help="train a student from a run's selected model (labels + unlabelled pool)")
    p.add_argument("teacher_run", help="the teacher's run directory (its selected model teaches)")
    p.add_argument(
        "--student",
        help="the student's source: timm:efficientnet_lite0, or {name: ..., pretrained: false} (default: the run's)",
    )
    p.add_argument("--unlabelled", help="rest (the dataset's unused examples) or a folder/file of unlabelled examples")
    p.add_argument("--labels-only", action="store_true", help="do not train on the unlabelled pool")
    p.add_argument("--loss", default="kd", help="kd, dkd, hint or pseudo_label (default kd)")
    p.add_argument("--temperature", type=float, help="kd, dkd, hint: the temperature T")
    p.add_argument("--alpha", type=float, help="kd, hint: weight of the distillation term; dkd: of TCKD")
    p.add_argument("--beta", type=float, help="dkd: weight of NCKD")
    p.add_argument("--threshold", type=float, help="pseudo_label: the teacher confidence a pool example needs")
    p.add_argument("--weight", type=float, help="hint: weight of the feature term")
    p.add_argument("--rounds", type=int, default=1, help="more than 1: each round's student teaches the next")
    p.add_argument("--epochs", type=int, help="the student's epochs (default: the teacher run's train.epochs)")
    p.add_argument("--lr", type=float, help="the student's learning rate (default: the teacher run's)")
    p.add_argument("--strategy", help="the student's strategy (default: the teacher run's)")
    p.add_argument("--label", help="the student's name (default distill-LOSS)")
    p.add_argument("--out", help="a new run directory (the teacher run's data and settings); default: add to it")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --out run")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("compress", help="prune, quantize and export a run's model (a copy of the run, with --out)")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--prune", type=float, metavar="RATIO", help="structured pruning: the fraction of channels removed")
    p.add_argument("--macs", type=float, help="instead of --prune: prune until the model's MACs are at most this")
    p.add_argument("--importance", choices=["magnitude", "taylor"], help="which channels go (default magnitude)")
    p.add_argument("--round-to", type=int, help="channel counts kept at multiples of this (default 8)")
    p.add_argument("--recovery-epochs", type=int, help="fine-tuning after pruning (default: train.epochs; 0: none)")
    p.add_argument(
        "--quantize",
        choices=["int8", "int8_dynamic", "int8_static"],
        help="int8 (dynamic for text/audio, static for images): for PyTorch (torchao), or with --export for ONNX "
        "Runtime",
    )
    p.add_argument("--export", choices=["onnx"], help="ONNX, checked against PyTorch; predict runs it without torch")
    p.add_argument("--model", help="the model to compress (default: the last distilled student, else the main model)")
    p.add_argument("--out", help="a new run directory: a copy of the run, with the compressed models added")
    p.set_defaults(func=_cmd_compress)

    from transferkit.stages import STAGES

    for stage in STAGES.values():
        if stage.extend is None or stage.name in sub.choices:
            continue
        p = sub.add_parser(stage.name, help=f"add to a finished run: {stage.help}")
        p.add_argument("run_dir", help="a run directory written by `transferkit run`")
        p.add_argument("options", nargs="*", help=f"key=value options of its recipe section, e.g. {stage.example}")
        p.set_defaults(func=_cmd_stage)

    p = sub.add_parser("validate", help="report every problem of a recipe")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("predict", help="top-k labels for images or texts, from a run directory or model folder")
    p.add_argument("run_dir")
    p.add_argument(
        "inputs", nargs="*", help="image files (image model), texts (text model) or user ids (recommendation model)"
    )
    p.add_argument("--file", help="text model: a UTF-8 file with one text per line")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--task", help="multi-task model (a merge of different label sets): this task only (default all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "demo",
        help="offline demos on real weights and data: image (EfficientNet-Lite0 -> MNIST), "
        "text (MiniLM -> Rotten Tomatoes), speech (GRU pretrained on spoken digits 0-4 -> 5-9), recsys "
        "(MovieLens 100K: old films -> new releases)",
    )
    p.add_argument(
        "task",
        nargs="?",
        default="image",
        choices=["image", "text", "speech", "recsys"],
        help="which demo (default image)",
    )
    p.add_argument("--out", default="demo_runs")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --out (the default)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted demo run in --out instead")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("ls", help="list sources, strategies and datasets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_ls)
    p = sub.add_parser("rank", help="rank candidate sources for a dataset: one forward pass each, then scores")
    p.add_argument("--data", required=True, help="a built-in dataset, an image folder or a CSV manifest")
    p.add_argument(
        "--candidates",
        nargs="+",
        required=True,
        metavar="SPEC",
        help='source specs, as in a recipe: a name, or JSON such as \'{"name": "efficientnet_lite0", '
        '"pretrained": false}\'',
    )
    p.add_argument("--max-examples", type=int, help="score on at most N training examples (stratified)")
    p.add_argument("--per-class", type=int, help="training examples per class, as data.per_class in a recipe")
    p.add_argument("--image-size", type=int, help="input size (default: each source's own)")
    p.add_argument(
        "--score",
        default="logme",
        choices=["logme", "leep", "nce", "hscore", "hscore_shrinkage"],
        help="the score to sort by (default logme)",
    )
    p.add_argument("--seed", type=int, default=0, help="fixes the split and the choice of examples (default 0)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_rank)

    p = sub.add_parser("transfer", help="move a source's weights into a target of another structure, with a report")
    p.add_argument("source", help="a source name, model folder or weights file (.safetensors/.pt)")
    p.add_argument("target", help="the target architecture, e.g. timm:resnet34 (built with random weights)")
    p.add_argument("--out", required=True, help="folder for the model and transfer_report.json/.txt")
    p.add_argument(
        "--rules", help='rename rules: a YAML/JSON file or inline, e.g. \'[{"from": "^features", "to": "blocks"}]\''
    )
    p.add_argument("--strict", action="store_true", help="an ambiguous structural pairing is an error")
    p.add_argument("--labels", help="comma-separated target classes: a new head, rows kept for shared labels")
    p.add_argument("--in-chans", type=int, help="input channels of the target (e.g. 1 for grey images)")
    p.add_argument("--img-size", type=int, help="input size of a ViT-style target (position embeddings resized)")
    p.add_argument("--kwargs", help="other architecture arguments: a JSON/YAML mapping or file, e.g. '{\"depth\": 6}'")
    p.add_argument(
        "--source-blocks",
        metavar="HOW",
        help="a shallower target takes these source blocks: every_other, "
        "uniform, first, last, or comma-separated indices (0,2,4)",
    )
    p.add_argument("--methods", help="matching passes in order, comma-separated (default names,rules,structure)")
    p.add_argument(
        "--resize",
        action="store_true",
        help="slice/tile same-role tensors of other shapes (an initialisation, not exact)",
    )
    p.add_argument(
        "--widen",
        choices=["net2net"],
        help="a wider target copies source channels (function-"
        "preserving), a narrower one keeps the largest; plain Linear/Conv(+BatchNorm) chains only",
    )
    p.add_argument("--identity-blocks", action="store_true", help="extra target blocks start as the identity")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.set_defaults(func=_cmd_transfer)

    p = sub.add_parser("speak", help="text to speech with a VITS voice (default: the packaged en_US joe voice)")
    p.add_argument(
        "voice", nargs="?", help="a VITS .onnx voice with its .onnx.json, or a folder holding one (default: joe)"
    )
    p.add_argument("text", help="what to say (quote it)")
    p.add_argument("--out", required=True, help="the WAV file to write (16-bit PCM)")
    p.add_argument("--noise-scale", type=float, help="prior noise (default: the voice's, 0.667 for joe)")
    p.add_argument("--length-scale", type=float, help="> 1 speaks slower (default: the voice's)")
    p.add_argument("--noise-w", type=float, help="duration noise (default: the voice's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the noise, so the same text gives the same audio")
    p.set_defaults(func=_cmd_speak)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TransferKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
