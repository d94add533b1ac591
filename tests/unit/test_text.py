"""Text classification: readers, tokenization, the MiniLM source, training, saving, prediction and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import tiny_text_folder, write_reviews

import transferkit as tk
from transferkit.data import TextDataset, read_dataset, read_text_file
from transferkit.errors import DataError, DataNotFoundError, RecipeError
from transferkit.models.base import load_model, save_model
from transferkit.pipeline import prepare_data
from transferkit.recipe import DataConfig


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    return tiny_text_folder(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def minilm():
    return tk.load_source("all-minilm-l6-v2")


# ---------------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_text_files_read_with_custom_columns_and_skip_empty_texts(tmp_path, fmt):
    path = write_reviews(tmp_path / f"reviews.{fmt}", fmt, text_column="review", label_column="sentiment", empty=3)
    data = read_text_file(path, text_column="review", label_column="sentiment")
    assert data.classes == ["bad", "good"]
    assert len(data) == 40 and data.modality == "text"
    assert np.bincount(data.labels).tolist() == [20, 20]
    assert data.items[0] == "a wonderful, moving film" and data.labels[0] == 1
    assert [s["reason"] for s in data.skipped] == ["empty text"] * 3
    assert data.skipped[0]["item"] == "row 41"
    with pytest.raises(DataError, match="3 empty text.*first at data row 41.*data.strict"):
        read_text_file(path, text_column="review", label_column="sentiment", strict=True)


def test_missing_text_column_lists_the_columns(tmp_path):
    path = write_reviews(tmp_path / "r.csv", text_column="review")
    with pytest.raises(DataError, match=r"no column 'text'; its columns are \['review', 'label'\].*data.text_column"):
        read_text_file(path)
    with pytest.raises(DataError, match="no column 'text' or 'y'"):
        read_text_file(path, label_column="y")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_text_file(tmp_path / "nope.csv")
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(DataError, match=r"must be one of \.csv, \.json, \.jsonl, \.parquet"):
        read_text_file(tmp_path / "r.txt")


def test_rotten_tomatoes_is_read_from_the_installed_package():
    data = read_dataset("rotten_tomatoes", modality="text")
    assert data.classes == ["fresh", "rotten"]
    assert np.bincount(data.labels).tolist() == [7403, 5405]  # the 1,097 plot summaries are left out
    assert all(isinstance(t, str) and t.strip() for t in data.items[:100])


def test_plot_vs_review_is_another_task_on_the_same_corpus():
    data = read_dataset("rotten_tomatoes_plots", modality="text")
    assert data.classes == ["plot", "review"]
    # 14 empty snippets skipped; the reviews are rotten_tomatoes' fresh and rotten together
    assert np.bincount(data.labels).tolist() == [1083, 12808]


def test_a_dataset_of_the_wrong_modality_is_refused():
    with pytest.raises(DataError, match="holds text data but the source takes image inputs"):
        read_dataset("rotten_tomatoes", modality="image")
    with pytest.raises(DataError, match="holds image data but the source takes text inputs"):
        read_dataset("mnist5k", modality="text")


# ---------------------------------------------------------------------------------------------------- models


def test_minilm_source_gives_the_sentence_transformers_embedding(minilm):
    """Mean pooling over real tokens, as the model's 1_Pooling config says: equal to pooling transformers' output."""
    from transformers import AutoModel, AutoTokenizer

    from transferkit.sources.minilm import minilm_folder

    assert minilm.modality == "text" and minilm.num_features == 384
    assert minilm.preprocess["pooling"] == "mean" and minilm.preprocess["max_length"] == 128
    texts = ["a wonderful, moving film", "dull"]
    tok = AutoTokenizer.from_pretrained(minilm_folder())
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = minilm.eval().features(dict(batch))
        hidden = AutoModel.from_pretrained(minilm_folder()).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    assert ours.shape == (2, 384)
    assert torch.allclose(ours, expected, atol=1e-5)
    # the two texts are far apart in cosine similarity terms (a real encoder, not random weights)
    assert float(torch.nn.functional.cosine_similarity(ours[0:1], ours[1:2])) < 0.5


def test_dynamic_padding_pads_each_batch_to_its_longest_text(minilm):
    ds = TextDataset(
        ["short", "a much longer text with many more words in it"], np.array([0, 1]), minilm.processor, max_length=8
    )
    x, y = ds.collate([ds[0], ds[1]])
    assert x["input_ids"].shape == (2, 8)  # the long text is truncated to max_length
    assert x["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # [CLS] short [SEP] + padding
    x, _ = ds.collate([ds[0]])
    assert x["input_ids"].shape == (1, 3) and y.tolist() == [0, 1]


def test_text_model_saves_with_its_tokenizer_and_reloads_identically(tiny_text, tmp_path):
    source = tk.load_source(f"hf:{tiny_text}")
    assert source.arch["family"] == "hf_text"
    target = tk.build_target(source, ["bad", "good"])
    save_model(target, tmp_path / "m")
    assert (tmp_path / "m" / "processor" / "tokenizer.json").is_file()
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["task"] == "text_classification" and meta["preprocess"]["modality"] == "text"
    loaded = load_model(tmp_path / "m")
    batch = dict(loaded.processor(["great film", "bad"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert torch.equal(target.eval()(batch), loaded(batch))


def test_max_length_beyond_the_source_limit_is_a_recipe_error(tiny_text, tmp_path):
    source = tk.load_source(f"hf:{tiny_text}")
    path = write_reviews(tmp_path / "r.csv")
    with pytest.raises(RecipeError, match="data.max_length=500 is more than the source accepts \\(128 tokens\\)"):
        prepare_data(DataConfig(dataset=str(path), max_length=500, test_size=10), source, seed=0)


# ---------------------------------------------------------------------------------------------------- end to end


def _recipe(tmp_path, tiny_text, **extra):
    data = write_reviews(tmp_path / "reviews.jsonl", "jsonl", text_column="review", empty=2)
    recipe = {
        "name": "text-test",
        "source": f"hf:{tiny_text}",
        "data": {
            "dataset": str(data),
            "text_column": "review",
            "per_class": 8,
            "val_per_class": 4,
            "test_size": 16,
            "max_length": 16,
        },
        "train": {"strategy": "full", "epochs": 2, "batch_size": 8, "lr": 0.01},
        "compare": ["linear_probe", {"strategy": "lora", "label": "lora"}],
        "baselines": ["tfidf"],
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def test_text_run_trains_strategies_and_baseline_and_predicts(tiny_text, tmp_path):
    run = tk.run_recipe(_recipe(tmp_path, tiny_text), out=tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["models"]) == {"full", "linear_probe", "lora"}
    assert metrics["data"]["modality"] == "text" and metrics["data"]["max_length"] == 16
    assert metrics["data"]["splits"] == {"train": 16, "val": 8, "test": 16}
    assert metrics["data"]["skipped_count"] == 2
    tfidf = metrics["baselines"]["tfidf"]
    assert tfidf["test"]["n"] == 16 and 0.0 <= tfidf["test"]["accuracy"] <= 1.0 and tfidf["C"] in (0.1, 1, 10, 100)
    for m in metrics["models"].values():
        assert m["test"]["n"] == 16 and len(m["history"]) >= 1
    html = (run / "report.html").read_text()
    assert "Baselines" in html and "TF-IDF" in html and "Tokens per text" in html
    predictor = tk.load_run(run)
    out = predictor.predict(["a wonderful film", "a dull mess"], top_k=2)
    assert [o["text"] for o in out] == ["a wonderful film", "a dull mess"]
    assert {t["label"] for t in out[0]["top"]} == {"bad", "good"}
    assert abs(sum(t["probability"] for t in out[0]["top"]) - 1) < 1e-5


@pytest.mark.slow  # command-line runs in subprocesses: left out of make test-fast
def test_predict_cli_takes_texts_and_a_file_of_lines(tiny_text, tmp_path):
    run = tk.run_recipe(_recipe(tmp_path, tiny_text, compare=[]), out=tmp_path / "run")
    lines = tmp_path / "reviews.txt"
    lines.write_text("great fun\n\nboring\n")
    cmd = [sys.executable, "-m", "transferkit", "predict", str(run), "superb cast", "--file", str(lines), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert [p["text"] for p in json.loads(out.stdout)] == ["superb cast", "great fun", "boring"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    bad = subprocess.run(cmd[:5] + ["--file", str(empty)], capture_output=True, text=True)
    assert bad.returncode != 0 and "holds no text" in bad.stderr


def test_tfidf_baseline_learns_an_easy_task(tmp_path):
    """Words decide these labels: the bag-of-words baseline must get the held-out reviews right."""
    from transferkit.evaluation.baselines import tfidf_baseline

    path = write_reviews(tmp_path / "r.csv")
    data = prepare_data(
        DataConfig(dataset=str(path), per_class=12, val_per_class=4, test_size=8),
        {"modality": "text", "max_length": 16},
        seed=0,
    )
    result = tfidf_baseline(data)
    assert result["test"]["accuracy"] >= 0.75
    assert result["features"] > 50  # unigrams and bigrams of the training reviews
    with pytest.raises(ValueError, match="needs text data"):
        tfidf_baseline(type("D", (), {"modality": "image"})())


def test_rank_scores_text_sources_on_a_text_target(tiny_text):
    """The real sentence encoder must out-score a random 2-layer BERT on real reviews (LogME on 60 examples)."""
    from transferkit.rank import rank_candidates

    cfg = DataConfig(dataset="rotten_tomatoes", per_class=30, val_per_class=5, test_size=100, max_length=48)
    rows = rank_candidates(cfg, ["all-minilm-l6-v2", f"hf:{tiny_text}", "efficientnet_lite0"], score="logme")
    assert [r["candidate"] for r in rows] == ["all-minilm-l6-v2", f"hf:{tiny_text}", "efficientnet_lite0"]
    assert rows[0]["num_examples"] == 60 and rows[0]["num_features"] == 384
    assert rows[0]["scores"]["logme"] > rows[1]["scores"]["logme"]
    assert rows[2]["status"] == "failed"
    assert "the target data is text but this source takes image inputs" in rows[2]["error"]
