"""Distillation: the losses against hand computations, the teacher (frozen, cached = online), and ``distill``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import small_mnist, tiny_source

from transferkit.config import TrainConfig
from transferkit.distill import DistillObjective, Teacher, cached_outputs, distill, dkd_terms, kd_loss, loss_config
from transferkit.distill.api import DistillSet, for_model
from transferkit.distill.losses import KDConfig, labelled_cross_entropy
from transferkit.distill.teacher import bridge_images
from transferkit.engine.objective import ClassificationObjective
from transferkit.errors import RecipeError
from transferkit.pipeline import fingerprint
from transferkit.transfer import build_target

CLASSES = [str(i) for i in range(10)]


def test_kd_with_t1_and_alpha1_is_cross_entropy_on_the_teachers_soft_labels() -> None:
    torch.manual_seed(0)
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(6, 5)
    soft = F.softmax(teacher, 1)
    objective = DistillObjective(KDConfig(temperature=1.0, alpha=1.0), ClassificationObjective())
    labels = torch.tensor([0, 1, 2, 3, 4, -1])
    out = objective(lambda x: student, None, {"label": labels, "teacher": teacher})
    soft_ce = -(soft * F.log_softmax(student, 1)).sum(1).mean()
    entropy = -(soft * soft.log()).sum(1).mean()
    # KL = soft cross-entropy - the teacher's entropy (a constant): same value up to it, same gradients
    assert out["loss"].item() == pytest.approx((soft_ce - entropy).item(), abs=1e-6)
    (g_kd,) = torch.autograd.grad(out["loss"], student)
    (g_ce,) = torch.autograd.grad(soft_ce, student)
    torch.testing.assert_close(g_kd, g_ce, atol=1e-7, rtol=1e-6)


def test_kd_scales_by_t_squared_and_mixes_cross_entropy_by_alpha() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 1])
    kl = (F.softmax(t / 3, 1) * (F.log_softmax(t / 3, 1) - F.log_softmax(s / 3, 1))).sum(1).mean()
    assert kd_loss(s, t, 3.0).item() == pytest.approx(9 * kl.item(), rel=1e-6)
    out = DistillObjective(KDConfig(3.0, 0.25), ClassificationObjective())(
        lambda x: s, None, {"label": y, "teacher": t}
    )
    assert out["loss"].item() == pytest.approx(0.25 * 9 * kl.item() + 0.75 * F.cross_entropy(s, y).item(), rel=1e-6)


def _dkd_by_hand(s: np.ndarray, t: np.ndarray, y: np.ndarray, temp: float) -> tuple[float, float]:
    tckd, nckd = [], []
    for si, ti, yi in zip(s, t, y):
        ps, pt = np.exp(si / temp) / np.exp(si / temp).sum(), np.exp(ti / temp) / np.exp(ti / temp).sum()
        bs, bt = np.array([ps[yi], 1 - ps[yi]]), np.array([pt[yi], 1 - pt[yi]])
        tckd.append((bt * np.log(bt / bs)).sum())
        others = [k for k in range(len(si)) if k != yi]
        qs = np.exp(si[others] / temp) / np.exp(si[others] / temp).sum()
        qt = np.exp(ti[others] / temp) / np.exp(ti[others] / temp).sum()
        nckd.append((qt * np.log(qt / qs)).sum())
    return float(np.mean(tckd) * temp**2), float(np.mean(nckd) * temp**2)


def test_dkd_terms_match_a_hand_computation_and_recompose_kd() -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    y = np.array([0, 3, 5, 2, 2])
    tckd, nckd = dkd_terms(torch.tensor(s), torch.tensor(t), torch.tensor(y), 2.0)
    want_t, want_n = _dkd_by_hand(s, t, y, 2.0)
    assert tckd.item() == pytest.approx(want_t, rel=1e-5)
    assert nckd.item() == pytest.approx(want_n, rel=1e-5)
    # Zhao et al. eq. 7, per example: KD = TCKD + (1 - p_target of the teacher) * NCKD
    for i in range(5):
        one = [torch.tensor(a[i : i + 1]) for a in (s, t, y)]
        tc, nc = dkd_terms(*one, 2.0)
        p_target = F.softmax(one[1] / 2.0, 1)[0, y[i]]
        assert kd_loss(one[0], one[1], 2.0).item() == pytest.approx((tc + (1 - p_target) * nc).item(), rel=1e-5)


def test_dkd_objective_weights_its_terms_and_gives_pool_examples_the_teachers_class() -> None:
    torch.manual_seed(2)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, -1, -1])
    _, cfg = loss_config({"name": "dkd", "alpha": 0.5, "beta": 2.0, "temperature": 1.0})
    out = DistillObjective(cfg, ClassificationObjective())(lambda x: s, None, {"label": y, "teacher": t})
    target = torch.where(y >= 0, y, t.argmax(1))
    tc, nc = dkd_terms(s, t, target, 1.0)
    ce = F.cross_entropy(s[:2], y[:2])
    assert out["loss"].item() == pytest.approx((ce + 0.5 * tc + 2.0 * nc).item(), rel=1e-6)


def test_cross_entropy_counts_labelled_examples_only() -> None:
    logits = torch.randn(4, 3)
    assert labelled_cross_entropy(logits, torch.tensor([-1, -1, -1, -1])).item() == 0.0
    y = torch.tensor([2, -1, 0, -1])
    want = F.cross_entropy(logits[[0, 2]], y[[0, 2]])
    assert labelled_cross_entropy(logits, y).item() == pytest.approx(want.item(), rel=1e-6)


def test_bad_loss_options_are_named() -> None:
    with pytest.raises(RecipeError, match="temperature must be > 0"):
        loss_config({"name": "kd", "temperature": 0})
    with pytest.raises(RecipeError, match="has no option"):
        loss_config({"name": "dkd", "gamma": 1})
    with pytest.raises(Exception, match="unknown distillation loss 'kdd'.*Did you mean 'kd'"):
        loss_config("kdd")


def test_an_ensemble_teacher_gives_the_log_of_its_mean_probabilities() -> None:
    a, b = build_target(tiny_source(0), CLASSES), build_target(tiny_source(1), CLASSES, seed=1)
    x = torch.randn(3, 3, 32, 32)
    logits, _ = Teacher([a, b])(x)
    want = (F.softmax(a.eval()(x), 1) + F.softmax(b.eval()(x), 1)) / 2
    torch.testing.assert_close(F.softmax(logits, 1), want, atol=1e-6, rtol=1e-5)


def test_the_bridge_renormalises_and_resizes_a_student_batch_for_the_teacher() -> None:
    raw = torch.rand(2, 3, 32, 32)
    student = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "channels": 3}
    teacher = {"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channels": 3}
    x = (raw - 0.5) / 0.25
    want = (raw - torch.tensor(teacher["mean"]).view(1, 3, 1, 1)) / torch.tensor(teacher["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(bridge_images(x, student, teacher), want, atol=1e-5, rtol=1e-5)
    bigger = bridge_images(x, student, {**teacher, "input_size": [3, 48, 48]})
    assert bigger.shape == (2, 3, 48, 48)
    grey = bridge_images(x, student, {**teacher, "channels": 1, "mean": [0.5], "std": [0.5]})
    torch.testing.assert_close(grey, (raw.mean(1, keepdim=True) - 0.5) / 0.5, atol=1e-5, rtol=1e-5)


def _pool_data(**augment):
    data = small_mnist(per_class=3, val_per_class=2, test_size=40, **augment)
    data.cfg.unlabelled = "rest"
    data._pool = None
    # a small pool keeps the test fast: the first 60 examples outside the splits
    pool = data.unlabelled()
    assert pool is not None and len(pool) > 4000
    object.__setattr__(pool, "items", pool.items[:60])
    object.__setattr__(pool, "labels", pool.labels[:60])
    return data


def test_cached_teacher_outputs_equal_an_online_pass() -> None:
    data = _pool_data()
    teacher = Teacher(build_target(tiny_source(3), CLASSES, seed=3))
    sets = [DistillSet([data.dataset("train"), data.pool_dataset()], torch.zeros(30 + 60, dtype=torch.long))]
    cached = cached_outputs(teacher, sets, with_features=True, batch_size=16)
    xs = torch.stack([sets[0][i][0] for i in range(len(sets[0]))])
    logits, features = teacher(xs, with_features=True)
    torch.testing.assert_close(cached["logits"], logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached["features"], features, atol=1e-4, rtol=1e-4)


def _student_and_teacher():
    teacher = build_target(tiny_source(5), CLASSES, seed=5)
    student = build_target(tiny_source(6), CLASSES, seed=6)
    return student, teacher


CFG = TrainConfig(epochs=2, batch_size=16, lr=3e-3, strategy="full")


def test_distill_trains_on_the_pool_and_never_touches_the_teacher() -> None:
    data = _pool_data()
    student, teacher = _student_and_teacher()
    before, start = fingerprint(teacher), fingerprint(student)
    summary = distill(student, teacher, data, CFG, {"name": "kd", "temperature": 2.0})
    assert fingerprint(teacher) == before  # frozen, and no gradient ever reached it
    assert all(p.grad is None for p in teacher.parameters())
    assert fingerprint(student) != start
    d = summary["distill"]
    assert d["loss"] == "kd" and d["options"] == {"temperature": 2.0, "alpha": 0.9}
    assert d["teacher_outputs"] == "cached" and d["pool"] == 60
    assert d["rounds"][0]["labelled"] == 30 and d["rounds"][0]["pool"] == 60
    # 90 examples in batches of 16: 6 steps per epoch
    assert summary["history"][-1]["step"] == 12
    assert 0 <= d["rounds"][0]["teacher_pool_accuracy"] <= 1


def test_with_augmentation_the_teacher_runs_online_and_stays_in_eval_mode() -> None:
    data = _pool_data(hflip=True)
    student, teacher = _student_and_teacher()
    before = fingerprint(teacher)
    x = torch.randn(4, 3, 32, 32)
    plain = teacher.eval()(x)
    with Teacher(teacher).fast(x) as fast:  # channels-last, batch norms folded: the same outputs
        torch.testing.assert_close(fast(x)[0], plain, atol=1e-4, rtol=1e-4)
    summary = distill(student, teacher, data, CFG.model_copy(update={"epochs": 1}), "dkd")
    assert summary["distill"]["teacher_outputs"] == "online"
    assert fingerprint(teacher) == before  # the folded weights were put back
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


def test_pseudo_labels_keep_the_confident_pool_examples_and_record_their_accuracy() -> None:
    data = _pool_data()
    student, teacher = _student_and_teacher()
    summary = distill(
        student,
        teacher,
        data,
        CFG.model_copy(update={"epochs": 1}),
        {"name": "pseudo_label", "threshold": 0.0},
        rounds=2,
    )
    rounds = summary["distill"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["kept"] == 60 and sum(rounds[0]["kept_per_class"]) == 60
    assert rounds[0]["pseudo_label_accuracy"] == pytest.approx(rounds[0]["teacher_pool_accuracy"])
    strict = distill(
        student, teacher, data, CFG.model_copy(update={"epochs": 1}), {"name": "pseudo_label", "threshold": 0.99}
    )
    assert strict["distill"]["rounds"][0]["kept"] < 60


def test_hints_train_a_projection_that_leaves_the_student_afterwards() -> None:
    data = _pool_data()
    student, teacher = _student_and_teacher()
    summary = distill(student, teacher, data, CFG.model_copy(update={"epochs": 1}), {"name": "hint", "groups": 2})
    assert summary["distill"]["teacher_outputs"] == "online"  # inner layers: the teacher runs on each batch
    assert not hasattr(student, "aux")
    assert set(student.state_dict()) == set(build_target(tiny_source(6), CLASSES).state_dict())
    pooled = distill(student, teacher, data, CFG.model_copy(update={"epochs": 1}), "hint")
    assert pooled["distill"]["teacher_outputs"] == "cached"


def test_a_teacher_of_other_classes_is_refused() -> None:
    data = _pool_data()
    student, _ = _student_and_teacher()
    other = build_target(tiny_source(5), ["a", "b"])
    with pytest.raises(RecipeError, match="teacher 0 predicts"):
        distill(student, other, data, CFG, "kd")


def test_a_strategy_on_cached_features_is_refused_for_distillation() -> None:
    data = _pool_data()
    student, teacher = _student_and_teacher()
    with pytest.raises(RecipeError, match="trains the head on cached features"):
        distill(student, teacher, data, CFG.model_copy(update={"strategy": "linear_probe"}), "kd")


class _Stop(Exception):
    pass


def test_an_interrupted_distillation_resumes_to_identical_weights(tmp_path) -> None:
    from transferkit.engine.loop import JobPaths

    data = _pool_data()
    cfg = CFG.model_copy(update={"checkpoint_every": 2})

    def run(folder, stop_at=None, resume=False):
        student, teacher = _student_and_teacher()

        def on_step(step: int) -> None:
            if stop_at is not None and step == stop_at:
                raise _Stop

        paths = JobPaths(folder / "last.pt", folder / "metrics.jsonl", "student")
        distill(student, teacher, data, cfg, "kd", paths=paths, resume=resume, cache_dir=folder, on_step=on_step)
        return fingerprint(student)

    straight = run(tmp_path / "a")
    with pytest.raises(_Stop):
        run(tmp_path / "b", stop_at=8)
    assert (tmp_path / "b" / "teacher-round0.pt").is_file()
    assert run(tmp_path / "b", resume=True) == straight


def test_for_model_keeps_the_split_and_takes_the_models_preprocessing() -> None:
    data = small_mnist()
    model = build_target(tiny_source(), CLASSES)
    model.preprocess = {**model.preprocess, "mean": [0.1, 0.1, 0.1]}
    mine = for_model(data, model)
    assert mine.splits is data.splits and mine.preprocess["mean"] == [0.1, 0.1, 0.1]
    assert not math.isclose(mine.dataset("val")[0][0].mean().item(), data.dataset("val")[0][0].mean().item())


def test_a_text_student_with_every_other_layer_of_its_teacher(tmp_path) -> None:
    """A shallower copy of the teacher built by the transfer machinery (``student_transfer``), distilled on text."""
    from helpers import tiny_text_folder, write_reviews

    from transferkit.config import DataConfig
    from transferkit.data import prepare_data
    from transferkit.sources import load_source
    from transferkit.transfer.api import transfer_step

    source = load_source(str(tiny_text_folder(tmp_path / "bert")))
    data = prepare_data(
        DataConfig(dataset=str(write_reviews(tmp_path / "r.csv")), per_class=6, val_per_class=4, test_size=8),
        source,
        seed=0,
    )
    teacher = build_target(source, data.classes)
    student = transfer_step(teacher, {"kwargs": {"num_hidden_layers": 1}, "source_blocks": [1]}, data.classes)
    assert student.backbone.model.config.num_hidden_layers == 1
    taken = student.report["source_blocks"]
    assert taken["taken"] == [1] and student.report["summary"]["coverage"] == 1.0
    layer = dict(student.named_parameters())["backbone.model.encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(
        layer, dict(teacher.named_parameters())["backbone.model.encoder.layer.1.attention.self.query.weight"]
    )
    summary = distill(student, teacher, data, TrainConfig(epochs=1, batch_size=8, strategy="full"), "kd")
    assert summary["distill"]["teacher_outputs"] == "cached"  # text: no augmentation, outputs computed once
    assert student.backbone.model.config.num_hidden_layers == 1


def test_fixmatch_labels_strong_views_with_confident_weak_predictions() -> None:
    from transferkit.distill.losses import FixMatchConfig
    from transferkit.distill.objective import FixMatchObjective

    torch.manual_seed(3)
    net = torch.nn.Linear(4, 3)
    weak, strong = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 2, -1, -1, -1])
    out = FixMatchObjective(FixMatchConfig(threshold=0.0, weight=2.0), ClassificationObjective())(
        net, weak, {"label": labels, "strong": strong}
    )
    pseudo = net(weak[2:]).argmax(1)
    want_u = F.cross_entropy(net(strong[2:]), pseudo)
    want_ce = F.cross_entropy(net(weak[:2]), labels[:2])
    assert out["consistency"].item() == pytest.approx(want_u.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((want_ce + 2.0 * want_u).item(), rel=1e-5)
    none = FixMatchObjective(FixMatchConfig(threshold=0.999), ClassificationObjective())(
        net, weak, {"label": labels, "strong": strong}
    )
    assert none["consistency"].item() == 0.0  # no weak prediction is that confident: no pool example is labelled


def test_fixmatch_trains_on_weak_and_strong_views_of_the_pool_without_a_teacher() -> None:
    data = _pool_data(rotation=10.0)
    weak, strong = data.pool_dataset(train=True), data.strong_pool_dataset(2, 10)
    assert weak[0][0].shape == strong[0][0].shape and not torch.equal(weak[0][0], strong[0][0])
    student, _ = _student_and_teacher()
    summary = distill(student, [], data, CFG.model_copy(update={"epochs": 1}), {"name": "fixmatch", "threshold": 0.5})
    d = summary["distill"]
    assert d["teacher_outputs"] == "none" and d["teachers"] == 0 and d["pool"] == 60
    assert 0 <= d["rounds"][0]["kept"] <= 60 and d["rounds"][0]["threshold"] == 0.5
    assert d["rounds"][0]["labelled_repeats"] == 1  # 60 pool examples for the labelled ones: under 7 per label
    with pytest.raises(RecipeError, match="give rounds: 1"):
        distill(student, [], data, CFG, "fixmatch", rounds=2)


def test_fixmatch_repeats_the_labelled_examples_to_one_per_ratio_pool_examples() -> None:
    """FixMatch draws one labelled example per mu unlabelled ones; a few labels in a large pool are repeated."""
    from transferkit.distill.api import training_set
    from transferkit.distill.losses import UNLABELLED, FixMatchConfig

    assert FixMatchConfig().labelled_repeats(200, 3600) == 3  # 3,600 / (7 x 200) = 2.6
    assert FixMatchConfig(ratio=1).labelled_repeats(200, 3600) == 18
    assert FixMatchConfig().labelled_repeats(200, 100) == 1  # at least once
    data = _pool_data(rotation=10.0)
    n_labelled, n_pool = len(data.splits.train), len(data.unlabelled().items)
    cfg = FixMatchConfig(ratio=1)
    repeats = cfg.labelled_repeats(n_labelled, n_pool)
    assert repeats > 1, (n_labelled, n_pool)
    train_set, info = training_set(None, data, cfg, use_pool=True, online=True, device="cpu")
    assert info["labelled_repeats"] == repeats
    assert len(train_set) == repeats * n_labelled + n_pool
    labels = train_set.labels
    want = torch.as_tensor(data.examples.labels[data.splits.train])
    for r in range(repeats):  # each repeat: the labelled examples in their order, with their labels
        assert torch.equal(labels[r * n_labelled : (r + 1) * n_labelled], want)
    assert (labels[repeats * n_labelled :] == UNLABELLED).all()
    x, target = train_set[repeats * n_labelled]  # a pool example: its weak view and a strong one
    assert target["label"].item() == UNLABELLED and target["strong"].shape == x.shape
    with pytest.raises(ValueError, match="ratio .* must be an integer >= 1, got 0"):
        FixMatchConfig(ratio=0)
