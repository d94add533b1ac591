"""The ``prune``, ``quantize`` and ``export`` stages: in a recipe after training, resumed, and ``transferkit compress``
on a finished run; ``transferkit predict`` on an exported folder without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_stages import TINY

from transferkit.cli import main
from transferkit.io import read_json
from transferkit.models.base import load_model
from transferkit.recipe import load_recipe, validate_recipe
from transferkit.runner import run_recipe

DATA = {**TINY["data"], "classes": ["0", "1", "2"], "per_class": 4, "test_size": 24}
RECIPE = {
    **TINY,
    "data": DATA,
    "prune": {"ratio": 0.5, "round_to": 4, "recovery": {"epochs": 1}},
    "quantize": {"method": "auto", "calibration": 8},
    "export": {"quantize": "int8", "check_examples": 6, "calibration": 8},
}


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compress") / "run"
    run_recipe(load_recipe(RECIPE), out=out)
    return out


def test_the_pruned_model_joins_the_run_with_its_record_and_reloads(compressed_run: Path) -> None:
    metrics = read_json(compressed_run / "metrics.json")
    assert list(metrics["models"]) == ["full", "full-pruned", "full-pruned-int8"]
    pruned = metrics["models"]["full-pruned"]
    record = pruned["pruned"]
    assert pruned["strategy"] == "prune:magnitude" and record["from"] == "full"
    assert record["macs_after"] < record["macs_before"] and record["params_after"] < record["params_before"]
    assert set(record["before_recovery"]) == {"val", "test"}
    assert pruned["epochs_run"] == 1 and len(pruned["history"]) >= 1  # the recovery fine-tuning ran
    cost = pruned["cost"]
    assert cost["full-pruned"]["macs"] == record["macs_after"] and cost["full"]["macs"] == record["macs_before"]
    assert cost["full-pruned"]["file_bytes"] < cost["full"]["file_bytes"]
    model = load_model(compressed_run / "models" / "full-pruned")  # the channel counts come from model.json
    assert sum(p.numel() for p in model.parameters()) == record["params_after"]
    meta = read_json(compressed_run / "models" / "full-pruned" / "model.json")
    assert meta["pruned"]["shapes"] and meta["num_features"] == model.head.in_features
    assert not (compressed_run / "checkpoints" / "full-pruned" / "last.pt").exists()  # done: resume state dropped


def test_quantize_takes_the_pruned_model_and_export_writes_checked_folders(compressed_run: Path) -> None:
    metrics = read_json(compressed_run / "metrics.json")
    q = metrics["models"]["full-pruned-int8"]
    assert q["strategy"] == "quantize:int8_static" and q["quantized"]["from"] == "full-pruned"
    exports = metrics["exports"]
    assert set(exports) == {"full-pruned-onnx", "full-pruned-onnx-int8"}
    fp32 = exports["full-pruned-onnx"]
    assert fp32["check"]["top1_agreement"] == 1.0 and fp32["check"]["max_rel_diff"] <= 1e-4
    # ONNX Runtime runs the fp32 export to the PyTorch model's accuracy on the same test split
    assert fp32["test"]["accuracy"] == pytest.approx(metrics["models"]["full-pruned"]["test"]["accuracy"], abs=1e-9)
    for name in exports:
        folder = compressed_run / "exports" / name
        assert (folder / "model.onnx").is_file() and (folder / "export_report.json").is_file()
    int8_meta = read_json(compressed_run / "exports" / "full-pruned-onnx-int8" / "model.json")
    assert int8_meta["onnx_quantized"]["mode"] == "static"  # images: the modality's own kind of int8
    # model.json says all that was done: pruned (ratio, MACs), exported, quantized
    assert int8_meta["pruned"]["ratio"] == 0.5 and int8_meta["pruned"]["from"] == "full"
    assert int8_meta["export"]["format"] == "onnx" and int8_meta["strategy"] == "prune:magnitude"
    tables = [t["title"] for t in metrics["tables"]]
    assert {"Prune full-pruned", "Quantize full-pruned-int8", "Export full-pruned"} <= set(tables)


def test_a_resumed_run_reads_every_step_back(compressed_run: Path) -> None:
    before = read_json(compressed_run / "metrics.json")
    run_recipe(load_recipe(RECIPE), out=compressed_run, resume=True)
    after = read_json(compressed_run / "metrics.json")
    for name in ("full-pruned", "full-pruned-int8"):
        assert after["models"][name]["weights_sha256"] == before["models"][name]["weights_sha256"]
    assert after["exports"] == before["exports"]


def test_predict_runs_an_exported_folder_without_torch(compressed_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    from transferkit.data.images import mnist5k

    image = tmp_path / "digit.png"
    Image.fromarray(mnist5k().items[0]).save(image)
    folder = compressed_run / "exports" / "full-pruned-onnx"
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        "from transferkit.cli import main\n"
        f"sys.exit(main(['predict', {str(folder)!r}, {str(image)!r}, '--json', '--top-k', '2']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows[0]["file"].endswith(Path(str(image)).name) and len(rows[0]["top"]) == 2
    assert rows[0]["top"][0]["label"] in DATA["classes"]


def test_compress_cli_adds_the_stages_to_a_copy_of_the_run(
    compressed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain"
    run_recipe(load_recipe(TINY | {"data": DATA}), out=plain)
    out = tmp_path / "small"
    assert (
        main(
            ["compress", str(plain), "--prune", "0.25", "--recovery-epochs", "0", "--export", "onnx", "--out", str(out)]
        )
        == 0
    )
    metrics = read_json(out / "metrics.json")
    assert metrics["models"]["full-pruned"]["epochs_run"] == 0 and "full-pruned-onnx" in metrics["exports"]
    assert not (plain / "models" / "full-pruned").exists()  # the run itself is left as it was
    capsys.readouterr()
    assert main(["compress", str(out), "--prune", "0.5"]) == 1
    assert "already has a prune: section; compress a copy with --out NEW_DIR" in capsys.readouterr().err
    assert main(["compress", str(out)]) == 2  # a usage problem
    assert "nothing to do: give --prune RATIO" in capsys.readouterr().err


def test_recipe_problems_name_the_key() -> None:
    _, problems = validate_recipe({**TINY, "prune": {"ratio": 0.5, "macs": 1e6}})
    assert any("prune" in p and "not both" in p for p in problems)
    _, problems = validate_recipe({**TINY, "prune": {"ratio": 0.5, "recovery": {"epochs": 0}}})
    assert any(p.startswith("prune.recovery.epochs") for p in problems)
    _, problems = validate_recipe({**TINY, "export": {"quantize": "int4"}})
    assert any(p.startswith("export.quantize") for p in problems)


def test_a_distilled_recovery_learns_from_the_unpruned_model_on_the_pool(tmp_path: Path) -> None:
    recipe = {
        **TINY,
        "data": {**DATA, "unlabelled": "rest", "unlabelled_max": 40},
        "prune": {"ratio": 0.5, "round_to": 4, "recovery": {"epochs": 1}, "distill": {"name": "kd", "alpha": 0.9}},
    }
    out = run_recipe(load_recipe(recipe), out=tmp_path / "run")
    pruned = read_json(out / "metrics.json")["models"]["full-pruned"]
    assert pruned["distill"]["loss"] == "kd" and pruned["distill"]["pool"] == 40
    steps = -(-(len(DATA["classes"]) * DATA["per_class"] + 40) // TINY["train"]["batch_size"])
    assert pruned["history"][-1]["step"] == steps  # one epoch over the labelled examples and the pool
    assert not list((out / "checkpoints" / "full-pruned").glob("teacher-round*.pt"))
    assert "Prune full-pruned" in [t["title"] for t in read_json(out / "metrics.json")["tables"]]
    _, problems = validate_recipe({**recipe, "prune": {**recipe["prune"], "distill": "kdd"}})
    assert any(p.startswith("prune.distill: unknown") for p in problems)


def test_each_step_can_be_added_to_a_finished_run_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = run_recipe(load_recipe(TINY | {"data": DATA}), out=tmp_path / "plain")
    assert main(["quantize", str(plain), "method=auto", "calibration=8"]) == 0
    metrics = read_json(plain / "metrics.json")
    assert metrics["models"]["full-int8"]["quantized"]["from"] == "full"  # no prune: the main model
    assert load_model(plain / "models" / "full-int8").labels == DATA["classes"]
    capsys.readouterr()
    assert main(["export", str(plain), "model=full-int8"]) == 1  # int8 for PyTorch does not export to ONNX
    assert "quantized for PyTorch (torchao int8), which ONNX does not carry: export the float model" in (
        capsys.readouterr().err
    )
    assert main(["export", str(plain), "check_examples=6"]) == 0
    assert "full-onnx" in read_json(plain / "metrics.json")["exports"]
