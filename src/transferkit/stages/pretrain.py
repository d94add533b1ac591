"""``pretrain:``: train the recipe's source on its own task first; the run's models then start from it.

Outputs: ``pretrain/model/`` (the trained source), ``pretrain/metrics.json``, ``pretrain/checkpoints/``. Resume
rule: ``pretrain/metrics.json`` on disk means the pretraining is done (an interrupted one resumes exactly from its
checkpoint).
"""

from __future__ import annotations

from typing import Any

from transferkit.config import Recipe, SourceSpec
from transferkit.stages.base import RunContext, Stage, one_accelerator


def done(ctx: RunContext) -> bool:
    return (ctx.out / "pretrain" / "metrics.json").is_file()


def _use(ctx: RunContext, summary: dict[str, Any]) -> None:
    data = summary["data"]
    ctx.source_spec = SourceSpec(name=str(ctx.out / "pretrain" / "model"))
    ctx.sections["pretrain"] = {
        "source": summary["source"],
        "dataset": data["dataset"],
        "classes": data["classes"],
        "splits": data["splits"],
        "test": {k: summary["test"][k] for k in ("accuracy", "macro_f1", "n")},
        "val_accuracy": summary["val"].get("accuracy"),
        "epochs_run": summary["epochs_run"],
        "train_s": summary["timing"]["train_s"],
    }


def load(ctx: RunContext) -> None:
    from transferkit.io import read_json

    summary = read_json(ctx.out / "pretrain" / "metrics.json")
    ctx.log(f"[pretrain] already trained: test accuracy {summary['test']['accuracy']:.4f}")
    _use(ctx, summary)


def run(ctx: RunContext) -> None:
    import torch

    from transferkit.data import prepare_data
    from transferkit.engine.loop import JobPaths
    from transferkit.io import write_json
    from transferkit.models.base import save_model
    from transferkit.pipeline import evaluate, train
    from transferkit.sources import load_source
    from transferkit.transfer import build_target

    recipe, pretrain = ctx.recipe, ctx.recipe.pretrain
    assert pretrain is not None and recipe.source is not None
    folder = ctx.out / "pretrain"
    torch.manual_seed(recipe.seed)  # a source without pretrained weights is initialised reproducibly
    source = load_source(recipe.source)
    data = prepare_data(pretrain.data, source, recipe.seed)
    ctx.log(
        f"[pretrain] {recipe.source.name} on {data.cfg.dataset}: {data.splits.sizes()} | {len(data.classes)} classes"
    )
    model = build_target(source, data.classes, pretrained=True, seed=recipe.seed)
    model.preprocess = data.preprocess
    model.to(ctx.accelerator.device)
    job = train(
        model,
        data,
        pretrain.train,
        seed=recipe.seed,
        accelerator=ctx.accelerator,
        resume=ctx.resume,
        paths=JobPaths(folder / "checkpoints" / "last.pt", folder / "metrics.jsonl", "pretrain"),
    )
    job["test"] = evaluate(model, data.dataset("test"), len(data.classes), device=ctx.accelerator.device)
    summary = {"source": recipe.source.name, "data": data.summary(), **job}
    if ctx.main:
        extra = {"strategy": job["strategy"], "run": recipe.name, "pretrained_on": data.cfg.dataset}
        save_model(model.cpu(), folder / "model", extra=extra)
        write_json(folder / "metrics.json", summary)
        if pretrain.train.checkpoints == "until_done":  # the source is saved: its resume files are not needed
            from transferkit.stages.train import drop_resume_files

            drop_resume_files(folder / "checkpoints")
    ctx.wait()
    ctx.log(
        f"[pretrain] test accuracy {job['test']['accuracy']:.4f} | val accuracy {job['val']['accuracy']:.4f} | "
        f"train {job['timing']['train_s']:.1f}s"
    )
    _use(ctx, summary)


def check(raw: dict[str, Any]) -> list[str]:
    from transferkit.data import check_dataset_spec
    from transferkit.strategies import check_strategy

    pretrain = raw.get("pretrain")
    if not isinstance(pretrain, dict):
        return []
    problems = []
    pre_data, pre_train = pretrain.get("data"), pretrain.get("train")
    if isinstance(pre_data, dict) and isinstance(pre_data.get("dataset"), str):
        problems += [f"pretrain.data.dataset: {p}" for p in check_dataset_spec(pre_data["dataset"])]
    if isinstance(pre_train, dict) and isinstance(pre_train.get("strategy"), (str, dict)):
        problems += [f"pretrain.train.strategy: {p}" for p in check_strategy(pre_train["strategy"])]
    if isinstance(pre_train, dict) and "mixed_precision" in pre_train:
        problems += one_accelerator("pretrain.train.mixed_precision", pre_train["mixed_precision"], raw)
    return problems


def _applies(recipe: Recipe) -> bool:
    return recipe.pretrain is not None


STAGE = Stage(
    "pretrain",
    run,
    _applies,
    done,
    load,
    keys=("pretrain",),
    gives=("source",),
    check=check,
    help="train the source on its own task first; the run's models start from it",
)
