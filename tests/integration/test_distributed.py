"""The same code under ``torchrun --nproc_per_node 2`` on CPU (gloo): both processes agree, rank 0 alone writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from transferkit.io import read_json

RECIPE = {
    "name": "ddp",
    "seed": 0,
    "source": {"name": "timm:test_efficientnet", "pretrained": False},
    "data": {"dataset": "mnist5k", "per_class": 4, "val_per_class": 2, "test_size": 40, "image_size": 32},
    "train": {"strategy": "full", "epochs": 2, "batch_size": 8, "lr": 0.01, "log_every": 1},
    "compare": [
        "linear_probe",
        "l2sp",
        {"strategy": {"name": "gradual_unfreeze", "every": 1}},
        {"strategy": {"name": "lp_ft", "lp_epochs": 1}},
        {"strategy": {"name": "lora", "r": 2}},
    ],
}


def _torchrun(recipe_dict: dict, tmp_path: Path, timeout: int) -> tuple[subprocess.CompletedProcess, Path]:
    """``torchrun --nproc_per_node 2 -m transferkit run`` on a recipe; the process and the run directory."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict))
    out = tmp_path / "run"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFERKIT_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"),
    }
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "transferkit", "run", str(recipe), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun is not installed",
)
def test_torchrun_two_processes_agree_and_rank0_writes(tmp_path: Path):
    proc, out = _torchrun(RECIPE, tmp_path, 600)

    run = read_json(out / "run.json")
    assert run["world_size"] == 2 and run["distributed_type"] == "MULTI_CPU" and run["status"] == "done"
    metrics = read_json(out / "metrics.json")
    assert set(metrics["models"]) == {"full", "linear_probe", "l2sp", "gradual_unfreeze", "lp_ft", "lora"}
    for name, m in metrics["models"].items():
        prints = m["rank_weights_sha256"]
        assert len(prints) == 2 and prints[0] == prints[1] == m["weights_sha256"], name
    # rank 0 alone wrote: each step is logged once (a global batch of 8 = 4 per process -> 5 steps per epoch)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if x["job"] == "full" and "loss" in x]
    assert steps == list(range(1, 11))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "cache",
            "checkpoints",
            "metrics.json",
            "metrics.jsonl",
            "model",
            "models",
            "recipe.yaml",
            "report.html",
            "run.json",
            "transfer_report.json",
        ]
    )
    # the summary is printed once, by rank 0
    assert proc.stdout.count("[full] test accuracy") == 1


DISTILL = {
    **RECIPE,
    "data": {**RECIPE["data"], "classes": ["0", "1"], "unlabelled": "rest", "test_size": 400},
    "compare": [],
    "distill": [
        {"loss": {"name": "kd", "temperature": 2.0}, "train": {"batch_size": 32}},
        {"loss": {"name": "hint", "groups": 2}, "train": {"batch_size": 32}, "label": "hint"},
        {"loss": {"name": "pseudo_label", "threshold": 0.5}, "rounds": 2, "train": {"batch_size": 32}, "label": "st"},
    ],
}


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun is not installed",
)
def test_torchrun_distillation_gives_both_processes_the_same_students(tmp_path: Path):
    """Students (with cached teacher outputs, hint projections trained beside the student, pseudo-label rounds)
    end with identical weights on both processes; only rank 0 writes."""
    proc, out = _torchrun(DISTILL, tmp_path, 900)
    metrics = read_json(out / "metrics.json")
    assert list(metrics["models"]) == ["full", "distill-kd", "hint", "st"]
    for name in ("distill-kd", "hint", "st"):
        m = metrics["models"][name]
        assert m["rank_weights_sha256"] == [m["weights_sha256"]] * 2, name
    assert metrics["models"]["hint"]["distill"]["teacher_outputs"] == "online"
    assert proc.stdout.count("[distill-kd] kd student") == 1
