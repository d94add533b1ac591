"""Property tests (hypothesis) of the recipe parser and the ``key.path=value`` overrides (issue 18).

Whatever a recipe holds, reading and validating it raises only transferkit errors (``TransferKitError``: a
RecipeError listing the problems), never a KeyError, TypeError, AttributeError, a YAML error, a pydantic
ValidationError or a RecursionError. Validation only: ``validate_recipe`` checks names against the registries and
paths for existence, it loads no model and reads no dataset, so nothing here touches the network or trains.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transferkit.config.recipe import read_yaml
from transferkit.errors import RecipeError, TransferKitError
from transferkit.recipe import Recipe, apply_overrides, load_recipe, parse_override, validate_recipe

SETTINGS = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

BASE = {"name": "t", "source": "timm:test_efficientnet", "data": {"dataset": "mnist5k"}}

# The recipe's keys and their sections' keys (src/transferkit/config/), so that the fuzzer reaches the validators
# of each section and not only the "unknown key" error.
TOP = ["name", "seed", "source", "data", "train", "compare", "baselines", "merge", "distill", "evaluate", "rank"]
TOP += ["pretrain", "transfer", "recsys"]
SUB = [
    # source / rank candidates / distill student
    "name", "pretrained", "weights", "candidates", "score", "max_examples",
    # data
    "dataset", "per_class", "val_per_class", "val_fraction", "test_size", "image_size", "classes", "text_column",
    "label_column", "max_length", "unlabelled", "unlabelled_max", "augment", "strict", "num_workers",
    "random_resized_crop", "hflip", "rotation", "translate", "color_jitter",
    # train
    "strategy", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule", "warmup_epochs", "grad_accum",
    "max_grad_norm", "label_smoothing", "regularizer", "mixed_precision", "monitor", "early_stopping_patience",
    "checkpoint_every", "checkpoints", "log_every", "threads", "seed", "alpha", "groups", "backbone_lr_scale",
    # compare / merge / distill / evaluate
    "label", "overrides", "method", "models", "runs", "recalibrate_bn", "teacher", "teacher_runs", "teacher_source",
    "student", "student_transfer", "loss", "rounds", "train", "data", "temperature",
    # transfer
    "target", "in_chans", "img_size", "kwargs", "rules", "methods", "extra_blocks", "source_blocks", "resize",
    "widen", "from", "to",
    # recsys
    "interactions", "user_column", "item_column", "rating_column", "timestamp_column", "item_features",
    "user_features", "movielens", "min_per_item", "model", "dim", "hidden", "num_negatives", "patience", "seeds",
    "metrics", "source_run", "target_only", "baselines", "path", "id_column", "columns", "numeric", "domain", "k",
]  # fmt: skip
# Values the validators treat specially: registered names, enum members, paths that exist or cannot.
NAMES = ["full", "freeze", "l2sp", "kd", "dkd", "hint", "ties", "uniform_soup", "logme", "tfidf", "mnist5k", "rest"]
NAMES += ["timm:test_efficientnet", "timm:", "hf:", "efficientnet_lite0", "movielens-100k", "adamw", "cosine", "auto"]
NAMES += ["bf16", "every_other", "net2net", ".", "..", "/", "~", "~nosuchuser_fz", "a\0b", "x" * 300, "", " "]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(NAMES),
)
keys = st.one_of(st.sampled_from(TOP + SUB), st.text(max_size=8), st.integers(-3, 3), st.none(), st.booleans())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(keys, inner, max_size=5),
    ),
    max_leaves=20,
)
sections = st.dictionaries(st.sampled_from(SUB), values, max_size=6) | values
# A valid recipe with names and paths put where the registries and the file system are asked about them.
names = st.one_of(st.sampled_from(NAMES), st.text(max_size=12), values)
targeted = st.one_of(
    st.builds(lambda v: {**BASE, "source": v}, names),
    st.builds(lambda v: {**BASE, "source": {"name": v, "weights": "w.pt"}}, names),
    st.builds(lambda v: {**BASE, "data": {"dataset": v}}, names),
    st.builds(lambda v, n: {**BASE, "data": {"dataset": "mnist5k", "unlabelled": v, "per_class": n}}, names, values),
    st.builds(lambda v: {**BASE, "evaluate": [{"dataset": v}]}, names),
    st.builds(lambda v: {**BASE, "rank": {"candidates": [v]}}, names),
    st.builds(lambda v: {**BASE, "baselines": [v]}, names),
    st.builds(lambda v, o: {**BASE, "train": {"strategy": v, "regularizer": o}}, names, names),
    st.builds(lambda v, o: {**BASE, "compare": [{"strategy": v, "overrides": o}]}, names, values),
    st.builds(lambda v, o: {**BASE, "distill": [{"loss": v, "train": o}]}, names, values),
    st.builds(lambda v: {**BASE, "merge": [{"method": v}]}, names),
    st.builds(lambda v, o: {**BASE, "pretrain": {"data": {"dataset": v}, "train": o}}, names, values),
)
recipes = st.one_of(
    targeted,
    st.dictionaries(st.sampled_from(TOP), sections, max_size=8),
    st.dictionaries(keys, values, max_size=6),
    st.builds(lambda extra: {**BASE, **extra}, st.dictionaries(st.sampled_from(TOP), sections, max_size=4)),
)


def _only_transferkit_errors(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except TransferKitError:
        return None  # any other exception fails the property, with its traceback


@SETTINGS
@given(recipes)
def test_validate_recipe_never_raises(raw: dict[Any, Any]) -> None:
    recipe, problems = validate_recipe(raw)
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
    assert recipe is None or isinstance(recipe, Recipe)


@SETTINGS
@given(recipes)
def test_load_recipe_raises_only_recipe_errors(raw: dict[Any, Any]) -> None:
    try:
        recipe = load_recipe(raw)
    except RecipeError as e:
        assert e.problems or str(e)
    else:
        assert isinstance(recipe, Recipe)


YAML_BITS = [
    "name: t\n", "source: timm:test_efficientnet\n", "data: {dataset: mnist5k}\n", "data:\n  dataset: mnist5k\n",
    "a: &x [1, 2]\n", "b: *x\n", "c: *nosuch\n", "<<: *x\n", "d: &y {k: 1}\n", "e: {<<: *y, k: 2}\n",
    "f: !!python/object:os.system {}\n", "g: !!python/object/apply:os.system ['true']\n", "h: !!binary aGk=\n",
    "i: !!set {a, b}\n", "j: !custom 3\n", "name: t\nname: u\n", "? [1, 2]\n: v\n", "? {a: 1}\n: v\n",
    "train: {epochs: .inf, lr: .nan}\n", "seed: 0x1f\n", "--- \n", "...\n", "%YAML 1.1\n---\n", "- 1\n- 2\n",
    "k: [" * 60 + "]" * 60 + "\n", "l: " + "[" * 5000 + "\n", "  bad indent:\n x\n", "\t: tab\n", '"unterminated\n',
    "m: 2001-12-14\n", "n: ~\n", "o: 1_000\n", "p: '\\x00'\n", "\ufeffq: bom\n", "compare:\n  - full\n  - freeze\n",
]  # fmt: skip
yaml_texts = st.one_of(
    st.lists(st.sampled_from(YAML_BITS), max_size=6).map("".join),
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(YAML_BITS), st.text(max_size=20)), max_size=6).map("".join),
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@SETTINGS
@given(text=yaml_texts)
def test_read_yaml_text_raises_only_recipe_errors(fuzz_dir: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=fuzz_dir, delete=False, encoding="utf-8") as f:
        try:
            f.write(text)
        except UnicodeEncodeError:  # a lone surrogate cannot be written as UTF-8; not a recipe
            return
    raw = _only_transferkit_errors(read_yaml, f.name)
    if raw is not None:
        assert isinstance(raw, dict)
        _only_transferkit_errors(load_recipe, f.name)


@SETTINGS
@given(data=st.binary(max_size=200) | st.lists(st.sampled_from(YAML_BITS)).map(lambda b: "".join(b).encode("utf-16")))
def test_read_yaml_bytes_raises_only_recipe_errors(fuzz_dir: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml", dir=fuzz_dir, delete=False) as f:
        f.write(data)
    _only_transferkit_errors(read_yaml, f.name)


path_parts = st.one_of(
    st.sampled_from(TOP + SUB), st.sampled_from(["0", "1", "-1", "99", "x", ""]), st.text(max_size=5)
)
override_values = st.one_of(
    st.sampled_from(["", "5", "-1", "0.5", ".nan", "null", "[1, 2]", "{a: 1}", "{name: freeze}", "full", "[", "&a 1"]),
    st.sampled_from(["*a", "!!python/object:os.system {}", "a: b: c", "'q", "timm:x", "{strategy: full}", "[full]"]),
    st.text(max_size=15),
)
overrides = st.one_of(
    st.builds(lambda p, v: ".".join(p) + "=" + v, st.lists(path_parts, min_size=1, max_size=4), override_values),
    st.text(max_size=30),
)


@SETTINGS
@given(st.lists(overrides, max_size=4))
def test_overrides_raise_only_recipe_errors(texts: list[str]) -> None:
    for text in texts:
        _only_transferkit_errors(parse_override, text)
    raw = _only_transferkit_errors(apply_overrides, BASE, texts)
    assert BASE == {"name": "t", "source": "timm:test_efficientnet", "data": {"dataset": "mnist5k"}}  # a copy
    if raw is not None:
        validate_recipe(raw)
        _only_transferkit_errors(load_recipe, BASE, texts)


@SETTINGS
@given(recipes.filter(lambda r: isinstance(r, dict)), st.lists(overrides, max_size=3))
def test_overrides_on_any_recipe_raise_only_recipe_errors(raw: dict[Any, Any], texts: list[str]) -> None:
    _only_transferkit_errors(apply_overrides, raw, texts)


def test_float_values_survive_validation() -> None:
    """A sanity check of the strategy's reach: nan and inf are refused with the key named, not crashed on."""
    _, problems = validate_recipe({**BASE, "train": {"lr": math.nan, "epochs": math.inf}})
    assert any(p.startswith("train.lr") for p in problems) and any(p.startswith("train.epochs") for p in problems)


# Regressions: what the properties found (each was a crash of validate_recipe, now a problem naming the key).


def test_a_number_as_a_top_level_key_is_a_problem_not_a_type_error() -> None:
    """``0: x`` in a YAML recipe: Recipe(**raw) raised TypeError (keywords must be strings)."""
    recipe, problems = validate_recipe({**BASE, 0: None})
    assert recipe is None and any(p.startswith("0: Keys should be strings") for p in problems), problems


def test_a_list_among_the_baselines_is_a_problem_not_a_type_error() -> None:
    """``baselines: [[]]``: the registry check raised TypeError (unhashable type: 'list')."""
    recipe, problems = validate_recipe({**BASE, "baselines": [[]]})
    assert recipe is None and any(p.startswith("baselines.0: unknown baseline") for p in problems), problems


@pytest.mark.parametrize("where", ["source", "data.dataset", "data.unlabelled", "evaluate.0.dataset", "rank"])
@pytest.mark.parametrize("name", ["x" * 300, "~nosuchuser_fz/data"])
def test_a_name_that_cannot_be_a_path_is_a_problem(where: str, name: str) -> None:
    """A name too long for a path (OSError: File name too long) or ``~user`` of no such user (RuntimeError: Could
    not determine home directory) escaped the existence checks of sources and datasets."""
    raw: dict[str, Any] = {**BASE, "data": {"dataset": "mnist5k", "per_class": 5}}
    if where == "source":
        raw["source"] = {"name": name, "weights": "w.pt"}
    elif where == "data.dataset":
        raw["data"] = {"dataset": name}
    elif where == "data.unlabelled":
        raw["data"]["unlabelled"] = name
    elif where == "evaluate.0.dataset":
        raw["evaluate"] = [{"dataset": name}]
    else:
        raw["rank"] = {"candidates": [name]}
        where = "rank.candidates.0"
    _, problems = validate_recipe(raw)
    found = [p for p in problems if p.startswith(where)]
    assert found and "cannot be looked up as a path" in found[0], problems
    with pytest.raises(RecipeError, match="cannot be looked up as a path"):
        load_recipe(raw)


@pytest.mark.parametrize(
    "extra",
    [{"compare": [{"strategy": "full", "overrides": {0: None}}]}, {"train": {0: 1}, "distill": [{"train": {}}]}],
)
def test_a_number_as_a_train_override_key_is_a_problem(extra: dict[str, Any]) -> None:
    """Found by the properties: ``TrainConfig(**...)`` raised TypeError for a key that is no string."""
    _, problems = validate_recipe({**BASE, **extra})
    assert problems
