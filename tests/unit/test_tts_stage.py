"""The ``tts:`` task in a recipe: both arms trained and saved, the run's voice spoken by ``transferkit speak``,
resumed from what is on disk, and the recipe problems that belong to it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_tts_adapt import espeak_speaker

from transferkit.cli import main
from transferkit.io import read_json
from transferkit.recipe import load_recipe, validate_recipe
from transferkit.runner import run_recipe

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng binary not installed")
TINY_TTS = {"steps": 2, "batch_size": 2, "segment_frames": 8, "posterior_layers": 2, "held_out": 1}


@needs_espeak
def test_a_tts_recipe_trains_both_arms_and_the_run_speaks(tmp_path: Path) -> None:
    speaker = espeak_speaker(tmp_path / "speaker", n=4)
    recipe = {"name": "voice", "tts": {"data": str(speaker), "arms": ["adapted", "scratch"], **TINY_TTS}}
    out = run_recipe(load_recipe(recipe), out=tmp_path / "run")
    metrics = read_json(out / "metrics.json")
    assert metrics["task"] == "tts" and set(metrics["arms"]) == {"adapted", "scratch"}
    assert metrics["data"]["train_utterances"] == 3 and metrics["data"]["held_out_utterances"] == 1
    adapted, scratch = metrics["arms"]["adapted"], metrics["arms"]["scratch"]
    assert adapted["frozen"] == ["enc_p", "dp"] and scratch["frozen"] == []
    assert adapted["steps"] == scratch["steps"] == 2 and len(adapted["history"]) == 2
    for arm in ("adapted", "scratch"):
        assert (out / "models" / arm / "voice.json").is_file()
        assert not (out / "checkpoints" / arm / "checkpoint.pt").exists()
    assert (out / "voice" / "voice.json").is_file() and read_json(out / "run.json")["status"] == "done"
    measured = metrics["measurements"]
    assert set(measured) == {"source", "adapted", "scratch"}
    assert measured["source"]["similarity_to_source"] == pytest.approx(1.0)
    for m in measured.values():
        assert -1 <= m["speaker_similarity"] <= 1 and m["wer"] >= 0 and m["mcd_db"] > 0 and m["rtf"] > 0
    page = (out / "report.html").read_text()
    assert page.count("<audio controls") == 4  # the held-out recording and one sample of each voice
    wav = tmp_path / "hello.wav"
    assert main(["speak", str(out), "Hello there.", "--out", str(wav)]) == 0 and wav.stat().st_size > 1000
    import transferkit.tts.metrics as tts_metrics

    def no_measuring(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run resumed measured its voices again")

    before = ((out / "metrics.json").read_bytes(), (out / "report.html").read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tts_metrics, "compare_voices", no_measuring)
        again = run_recipe(load_recipe(recipe), out=out, resume=True)  # read back: nothing retrained or re-measured
    assert ((again / "metrics.json").read_bytes(), (again / "report.html").read_bytes()) == before
    assert read_json(again / "metrics.json")["arms"]["adapted"]["history"] == adapted["history"]


def test_tts_recipe_problems_name_the_key(tmp_path: Path) -> None:
    _, problems = validate_recipe({"tts": {"data": str(tmp_path), "frozen": ["flwo"]}})
    assert any(p.startswith("tts.frozen") and "Did you mean 'flow'?" in p for p in problems)
    _, problems = validate_recipe({"tts": {"data": str(tmp_path)}, "source": "efficientnet_lite0"})
    assert any("tts: adapts a voice on its own; source is not used with it" in p for p in problems)
    _, problems = validate_recipe({"tts": {"data": str(tmp_path), "arms": ["scratch", "scratch"]}})
    assert any(p.startswith("tts.arms") for p in problems)
    assert f"tts.data: '{tmp_path}' has no metadata.csv: write one line 'file|text' per recording (LJSpeech style)" in (
        problems
    )
    _, problems = validate_recipe({"tts": {"data": str(tmp_path / "nope")}})
    assert any(p.startswith(f"tts.data: '{tmp_path / 'nope'}' is not a folder") for p in problems)
