"""``tts:``: a pretrained VITS voice adapted to a new speaker (``transferkit.tts``), a task of its own.

The voice (default: the packaged en_US joe voice, ONNX weights moved into transferkit's PyTorch VITS) is adapted on
the training utterances of ``tts.data`` (``adapted``: what ``frozen`` names stays as the voice had it) and, as the
baseline that measures what the transfer gains, the same architecture is trained from random weights on the same
minutes (``scratch``). The held-out utterances measure each arm and the source voice unchanged (speaker similarity
to the target, word error rate, mel-cepstral distortion, real-time factor; ``transferkit.tts.metrics``), and
``report.html`` plays samples of each.

Outputs: ``models/ARM/`` (a saved voice: ``model.safetensors`` + ``voice.json``), ``voice/`` (the adapted voice:
``transferkit speak RUN_DIR "text"``), ``checkpoints/ARM/checkpoint.pt`` (while training) and
``checkpoints/ARM/result.json``, ``metrics.json``, ``report.html``. Resume rule, per arm: the result file means
trained (read back); a checkpoint without it resumes exactly where it stopped.
"""

from __future__ import annotations

import time
from typing import Any

from transferkit.config import Recipe
from transferkit.stages.base import RunContext, Stage, result_file, settings_sha


def _adapt_config(ctx: RunContext, arm: str) -> Any:
    from transferkit.tts.train import AdaptConfig

    cfg = ctx.recipe.tts
    assert cfg is not None
    return AdaptConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        grad_clip=cfg.grad_clip,
        segment_frames=cfg.segment_frames,
        frozen=tuple(cfg.frozen) if arm == "adapted" else (),
        init="pretrained" if arm == "adapted" else "scratch",
        adversarial=cfg.adversarial,
        posterior_layers=cfg.posterior_layers,
        posterior_warmup=cfg.posterior_warmup if arm == "adapted" else 0,
        checkpoint_every=cfg.checkpoint_every,
        seed=ctx.recipe.seed,
    )


def _settings_sha(ctx: RunContext, arm: str) -> str:
    cfg = ctx.recipe.tts
    assert cfg is not None
    return settings_sha({"arm": arm, "seed": ctx.recipe.seed, **cfg.model_dump(mode="json")})


def _voice_and_data(ctx: RunContext) -> tuple[Any, Any]:
    """The source voice and the target speaker's utterances at its rate (read once per run)."""
    if "tts" not in ctx.cache:
        from transferkit.tts.data import read_tts_folder
        from transferkit.tts.voice import load_voice, resolve_voice

        cfg = ctx.recipe.tts
        assert cfg is not None
        t = time.perf_counter()
        voice = load_voice(resolve_voice(cfg.voice))
        held_out: float | int = int(cfg.held_out) if cfg.held_out >= 1 else cfg.held_out
        data = read_tts_folder(
            cfg.data, voice.sample_rate, held_out=held_out, seed=ctx.recipe.seed, max_seconds=cfg.max_seconds
        )
        ctx.timings["data_s"] = time.perf_counter() - t
        ctx.log(f"voice {voice.path} | target {cfg.data}: {data.summary()}")
        ctx.cache["tts"] = (voice, data)
    return ctx.cache["tts"]


def _read(ctx: RunContext, arm: str) -> dict[str, Any] | None:
    from transferkit.errors import RunDirError
    from transferkit.io import read_json

    path = result_file(ctx, arm)
    if not path.is_file():
        return None
    result = read_json(path)
    if result.get("settings_sha256") != _settings_sha(ctx, arm):
        raise RunDirError(f"'{ctx.out}' holds a {arm} voice trained with other tts: settings; start a new run")
    return result


def train_arm(ctx: RunContext, arm: str) -> dict[str, Any]:
    """Adapt (or train from scratch) one arm; save its voice and result."""
    import shutil

    from transferkit.io import replace_dir, write_json
    from transferkit.tts.train import adapt

    voice, data = _voice_and_data(ctx)
    job = result_file(ctx, arm).parent
    res = adapt(
        voice,
        data,
        _adapt_config(ctx, arm),
        out=job,
        resume=ctx.resume,
        save_to=ctx.out / "models" / arm,
    )
    result = {
        "arm": arm,
        "steps": res["steps"],
        "seconds_per_step": res["seconds_per_step"],
        "trainable": res["trainable"],
        "frozen": res["frozen"],
        "trainable_parameters": res["trainable_parameters"],
        "history": res["history"],
        "final_loss": res["history"][-1] if res["history"] else None,
        "data": data.summary(),
        "settings_sha256": _settings_sha(ctx, arm),
    }
    if arm == "adapted":  # the run's voice: transferkit speak RUN_DIR
        folder = ctx.out / "models" / arm
        replace_dir(ctx.out / "voice", lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True))
    write_json(result_file(ctx, arm), result)
    (job / "checkpoint.pt").unlink(missing_ok=True)  # done: the saved voice holds the weights
    return result


def _measure(ctx: RunContext) -> dict[str, Any]:
    """Every arm and the source voice on the held-out sentences (with their waveforms, for the report)."""
    from transferkit.tts.metrics import compare_voices
    from transferkit.tts.voice import load_voice

    voice, data = _voice_and_data(ctx)
    voices = {"source": voice, **{arm: load_voice(ctx.out / "models" / arm) for arm in ctx.results}}
    t = time.perf_counter()
    measured = compare_voices(voices, data.held_out, seed=ctx.recipe.seed)
    ctx.timings["measure_s"] = time.perf_counter() - t
    return dict(measured)


def _measured(ctx: RunContext) -> bool:
    """Whether metrics.json already holds the measurements of exactly these arms (a finished run resumed): measuring
    is minutes of synthesis and recognition, and gives the same numbers again (seeded noise)."""
    import json

    from transferkit.io import read_json

    path = ctx.out / "metrics.json"
    if not (ctx.resume and path.is_file() and (ctx.out / "report.html").is_file()):
        return False
    try:
        old = read_json(path)
    except (ValueError, OSError):
        return False
    same = json.dumps(old.get("arms"), sort_keys=True) == json.dumps(ctx.results, sort_keys=True, default=str)
    return same and set(old.get("measurements", {})) == {"source", *ctx.results}


def run(ctx: RunContext) -> None:
    from transferkit.io import write_json
    from transferkit.tts.metrics import without_waves
    from transferkit.tts.report import report_samples, write_tts_report

    cfg = ctx.recipe.tts
    assert cfg is not None
    trained = False
    for arm in cfg.arms:
        result = _read(ctx, arm) if ctx.resume else None
        if result is None:
            result, trained = train_arm(ctx, arm), True
        ctx.results[arm] = result
        ctx.log(f"[{arm}] {result['steps']} steps, {result['seconds_per_step']:.2f} s/step")
    if not trained and _measured(ctx):
        ctx.log("[tts] every arm was measured already: metrics.json and report.html kept")
        return
    voice, data = _voice_and_data(ctx)
    measured = _measure(ctx)
    for name, m in measured.items():
        ctx.log(
            f"[{name}] speaker similarity to the target {m['speaker_similarity']:.3f}, to the source voice "
            f"{m['similarity_to_source']:.3f} | WER {m['wer']:.3f} | MCD {m['mcd_db']:.2f} dB | RTF {m['rtf']:.3f}"
        )
    write_json(
        ctx.out / "metrics.json",
        {
            "run": ctx.recipe.name,
            "task": "tts",
            "voice": str(voice.path),
            "data": data.summary(),
            "arms": ctx.results,
            "measurements": without_waves(measured),
            "timings": {**ctx.timings, "total_s": time.perf_counter() - ctx.t_start},
        },
    )
    write_tts_report(
        ctx.out,
        without_waves(measured),
        report_samples(measured, data.held_out),
        voice.sample_rate,
        notes=[
            f"held-out sentences: {len(data.held_out)} of the target's recordings ({cfg.data}); the source voice is "
            "measured unchanged; scratch is the same model trained from random weights on the same minutes"
        ],
    )


def _applies(recipe: Recipe) -> bool:
    return recipe.tts is not None


STAGE = Stage(
    "tts",
    run,
    _applies,
    keys=("tts",),
    gives=("voices",),
    help="adapt a pretrained VITS voice to a new speaker, and the same model from scratch as the baseline",
)
