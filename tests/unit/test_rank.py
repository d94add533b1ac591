"""Transferability scores against independent computations, and ranking candidate sources end to end (tiny)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import linalg, optimize
from torch import nn

from transferkit.errors import DataError, UnknownNameError
from transferkit.rank import correlation, hscore, hscore_shrinkage, leep, logme, nce
from transferkit.rank import scores as S

# ----------------------------------------------------------------------------------------------------------------
# LogME


def _problem(n: int, d: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with some class signal in the first column, every class present."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    rng.shuffle(y)
    f = rng.normal(size=(n, d)) + 0.5
    f[:, 0] += 2.0 * y
    return f, y


def _gaussian_log_evidence(f: np.ndarray, t: np.ndarray, log_alpha: float, log_beta: float) -> float:
    """``log N(t; 0, I / beta + F F^T / alpha)`` by Cholesky, O(N^3): the evidence without any SVD."""
    n = len(f)
    cov = np.eye(n) / math.exp(log_beta) + f @ f.T / math.exp(log_alpha)
    chol = linalg.cho_factor(cov, lower=True)
    logdet = 2.0 * np.sum(np.log(np.diag(chol[0])))
    return -0.5 * (logdet + t @ linalg.cho_solve(chol, t) + n * math.log(2 * math.pi))


def _direct_logme(f: np.ndarray, y: np.ndarray) -> tuple[float, list[float]]:
    """Maximise the exact evidence over (log alpha, log beta) with scipy, per class; LogME and the argmax alphas."""
    total, alphas = 0.0, []
    for c in range(int(y.max()) + 1):
        t = (y == c).astype(float)
        runs = [
            optimize.minimize(
                lambda p, t=t: -_gaussian_log_evidence(f, t, p[0], p[1]),
                x0,
                method="Nelder-Mead",
                options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 20000},
            )
            for x0 in ([0.0, 0.0], [3.0, 3.0], [-3.0, 2.0])
        ]
        best = min(runs, key=lambda r: r.fun)
        total += -best.fun
        alphas.append(math.exp(best.x[0]))
    return total / (int(y.max()) + 1) / len(f), alphas


@pytest.mark.parametrize(("n", "d", "c"), [(40, 5, 3), (60, 12, 4)], ids=["N>D", "N>>D"])
def test_logme_equals_direct_evidence_maximisation_when_n_exceeds_d(n: int, d: int, c: int) -> None:
    f, y = _problem(n, d, c)
    direct, _ = _direct_logme(f, y)
    assert logme(f, y) == pytest.approx(direct, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(("n", "d", "c"), [(12, 30, 3), (20, 100, 4)], ids=["N<D", "N<<D"])
def test_logme_equals_direct_evidence_maximisation_when_n_below_d(n: int, d: int, c: int) -> None:
    f, y = _problem(n, d, c, seed=1)
    direct, _ = _direct_logme(f, y)
    assert logme(f, y) == pytest.approx(direct, rel=1e-9, abs=1e-9)


def test_logme_n_below_d_is_the_exact_evidence_not_the_published_fixed_point_value() -> None:
    # The follow-up's fixed-point code keeps D/2 log(alpha) but sums log(alpha + beta sigma) over the k = rank(F)
    # nonzero singular values only; for N < D that adds (D - k) / (2N) log(alpha) to the exact evidence.
    f, y = _problem(12, 30, 3, seed=1)
    n, d = f.shape
    k = np.linalg.matrix_rank(f)
    assert k == n
    ours = logme(f, y)
    direct, alphas = _direct_logme(f, y)
    published = direct + float(np.mean([(d - k) / (2 * n) * math.log(a) for a in alphas]))
    assert ours == pytest.approx(direct, rel=1e-9)
    assert abs(published - ours) > 0.05  # the two published algorithms really disagree here
    # the exact evidence depends on F F^T only: zero feature columns (wider D, same rank) leave it unchanged,
    # which the published fixed-point value would not (its extra term grows with D)
    assert logme(np.hstack([f, np.zeros((n, 50))]), y) == pytest.approx(ours, rel=1e-12)


def test_log_evidence_formula_matches_the_gaussian_marginal_at_any_alpha_beta() -> None:
    f, y = _problem(15, 25, 3, seed=2)
    t = (y == 1).astype(float)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    x2 = (u.T @ t) ** 2
    for alpha, beta in [(0.3, 2.0), (5.0, 0.7), (100.0, 50.0)]:
        ours = S.log_evidence(alpha, beta, x2, float(t @ t - x2.sum()), s**2, len(f))
        assert ours == pytest.approx(_gaussian_log_evidence(f, t, math.log(alpha), math.log(beta)), rel=1e-10)


def test_logme_at_the_boundary_alpha_to_infinity_is_the_noise_only_evidence() -> None:
    # features orthogonal to every label column: the best linear model has zero weights, the evidence grows as
    # alpha -> infinity towards that of y ~ N(0, I / beta), maximised at beta = N / |y|^2
    rng = np.random.default_rng(10)
    y = np.repeat(np.arange(3), 8)
    onehot = np.eye(3)[y]
    f = rng.normal(size=(24, 6))
    f -= onehot @ np.linalg.lstsq(onehot, f, rcond=None)[0]  # remove the class means: f^T y_c = 0 for every c
    n = len(y)
    limit = np.mean([-0.5 * (math.log(2 * math.pi * onehot[:, c].sum() / n) + 1) for c in range(3)])
    with np.errstate(all="raise"):  # no overflow on the way
        assert logme(f, y) == pytest.approx(limit, rel=1e-9)


def test_logme_at_the_boundary_t_to_zero_where_gamma_rounds_to_n() -> None:
    # N = rank F = 30 < D, class means far apart and little noise: the evidence grows as alpha / beta -> 0 (exact
    # interpolation), and there gamma = sum(sigma / (sigma + t)) rounds to exactly N, so beta = (N - gamma) / |r|^2
    # is 0. This raised ZeroDivisionError (found ranking EfficientNet-Lite0 on 50 MNIST images).
    rng = np.random.default_rng(24)
    n, d = int(rng.choice([20, 30, 50])), int(rng.choice([64, 256, 1280]))
    noise = 10 ** rng.uniform(-4, 0)
    y = np.arange(n) % 10
    f = np.eye(10)[y] @ rng.standard_normal((10, d)) * 10 + noise * rng.standard_normal((n, d))
    assert (n, d) == (30, 64) and np.linalg.matrix_rank(f) == n
    value = logme(f, y)
    assert math.isfinite(value)
    # per class it is the maximum: no (alpha, beta) on a wide grid gives a higher evidence
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    per_class = []
    for c in range(10):
        x2 = (u.T @ (y == c).astype(float)) ** 2
        per_class.append(S._max_log_evidence(x2, 0.0, s**2, n)[0])
        grid = max(S.log_evidence(10.0**a, 10.0**b, x2, 0.0, s**2, n) for a in range(-8, 9) for b in range(-8, 17))
        assert grid <= per_class[-1] + 1e-9 * abs(grid)
    assert value == pytest.approx(np.mean(per_class) / n, rel=1e-12)


def _mackay_fixed_point(x2: np.ndarray, sigma: np.ndarray, n: int) -> tuple[float, float, float]:
    """The follow-up's solver for one label column: alpha = gamma / |m|^2, beta = (N - gamma) / |y - F m|^2 from
    alpha = beta = 1, to a relative change of 1e-10 in alpha / beta; returns (log evidence, alpha, beta)."""
    alpha = beta = 1.0
    for _ in range(10_000):
        t = alpha / beta
        r = 1.0 / (sigma + t)
        gamma = float(np.sum(sigma * r))
        alpha = gamma / float(np.sum(sigma * x2 * r**2))
        beta = (n - gamma) / float(np.sum(x2 * (t * r) ** 2))
        if abs(alpha / beta - t) <= 1e-10 * t:
            break
    return S.log_evidence(alpha, beta, x2, 0.0, sigma, n), alpha, beta


def test_logme_takes_the_higher_of_two_local_maxima_of_the_evidence() -> None:
    # Singular values in two groups (3 large, 9 small) make the evidence of a label column bimodal in
    # alpha / beta. MacKay's fixed point (the follow-up's solver) from alpha = beta = 1 stops at the lower maximum;
    # transferkit's search over the whole range finds the higher one. (Seen on real features: a randomly
    # initialised EfficientNet-Lite0 on 50 MNIST images, 2 of 10 classes.)
    rng = np.random.default_rng(0)
    n, d = 12, 24
    y = np.arange(n) % 2
    q1, _ = np.linalg.qr(rng.normal(size=(n, n)))
    q2, _ = np.linalg.qr(rng.normal(size=(d, n)))
    f = (q1 * np.where(np.arange(n) < 3, 300.0, 1.0) * rng.uniform(0.5, 2, n)) @ q2.T
    f[:, 0] += 3 * y
    t = (y == 1).astype(float)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    x2, sigma = (u.T @ t) ** 2, s**2
    # the profile evidence (beta at its best for each alpha / beta) has two local maxima
    grid = np.linspace(-10, 20, 3001)
    g = S._profile_log_evidence(grid[:, None], x2[:, None], np.zeros(1), sigma, n)[:, 0]
    peaks = np.flatnonzero((g[1:-1] > g[:-2]) & (g[1:-1] > g[2:])) + 1
    assert len(peaks) == 2
    fixed, _, _ = _mackay_fixed_point(x2, sigma, n)
    ours, alpha, beta = S._max_log_evidence(x2, 0.0, sigma, n)
    assert ours > fixed + 1.0
    # ours is the evidence at its (alpha, beta), computed independently, and nothing on a wide grid beats it
    assert ours == pytest.approx(_gaussian_log_evidence(f, t, math.log(alpha), math.log(beta)), rel=1e-9)
    assert ours >= max(
        S.log_evidence(10.0**a, 10.0**b, x2, 0.0, sigma, n)
        for a in np.arange(-8, 9, 0.25)
        for b in np.arange(-8, 9, 0.25)
    )
    assert math.log(alpha / beta) == pytest.approx(grid[peaks[np.argmax(g[peaks])]], abs=0.02)
    # and logme, all columns at once, agrees with the two columns solved one by one
    per_class = [S._max_log_evidence((u.T @ (y == c).astype(float)) ** 2, 0.0, sigma, n)[0] for c in range(2)]
    assert logme(f, y) == pytest.approx(np.mean(per_class) / n, rel=1e-12)


def test_logme_prefers_features_that_separate_the_classes() -> None:
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(4), 25)
    noise = rng.normal(size=(100, 16))
    informative = noise.copy()
    informative[:, :4] += 3.0 * np.eye(4)[y]
    assert logme(informative, y) > logme(noise, y) + 0.1


# ----------------------------------------------------------------------------------------------------------------
# LEEP and NCE on small hand-computed examples


def test_leep_by_hand_on_3_examples_and_4_source_classes() -> None:
    probs = np.array([[0.50, 0.25, 0.25, 0.00], [0.25, 0.50, 0.00, 0.25], [0.00, 0.25, 0.50, 0.25]])
    labels = np.array([0, 1, 1])
    # joint P(y, z) = 1/3 sum of rows per class: y=0: [.5, .25, .25, 0]/3; y=1: [.25, .75, .5, .5]/3
    # P(z) = [.75, 1, .75, .5]/3; P(y=0|z) = [2/3, 1/4, 1/3, 0]; P(y=1|z) = [1/3, 3/4, 2/3, 1]
    # expected empirical prediction of each example's own label:
    #   ex 0 (y=0): .5*2/3 + .25*1/4 + .25*1/3 + 0*0  = 23/48
    #   ex 1 (y=1): .25*1/3 + .5*3/4 + 0*2/3 + .25*1  = 17/24
    #   ex 2 (y=1): 0*1/3 + .25*3/4 + .5*2/3 + .25*1  = 37/48
    expected = (math.log(23 / 48) + math.log(17 / 24) + math.log(37 / 48)) / 3
    assert leep(probs, labels) == pytest.approx(expected, rel=1e-12)
    assert leep(probs, labels) == pytest.approx(-0.4469, abs=1e-4)


def test_nce_by_hand_on_a_3_by_4_joint_table() -> None:
    # 3 target classes x 4 source classes (source class 2 is never predicted)
    preds = np.array([0, 0, 1, 1, 1, 3])
    labels = np.array([0, 1, 2, 2, 0, 1])
    # P(y|z=0) = [1/2, 1/2, 0] (2 examples); P(y|z=1) = [1/3, 0, 2/3] (3); P(y|z=3) = [0, 1, 0] (1)
    # NCE = sum P(y,z) log P(y|z) = 2/6 log(1/2) + 1/6 log(1/3) + 2/6 log(2/3) + 1/6 log(1)
    expected = 2 / 6 * math.log(1 / 2) + 1 / 6 * math.log(1 / 3) + 2 / 6 * math.log(2 / 3)
    assert nce(preds, labels) == pytest.approx(expected, rel=1e-12)
    assert nce(preds, labels) == pytest.approx(-0.5493, abs=1e-4)
    # predictions that determine the label have zero conditional entropy
    assert nce(np.array([5, 5, 7, 9]), np.array([0, 0, 1, 2])) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# H-score and the shrinkage form


def _class_mean_rows(f: np.ndarray, y: np.ndarray) -> np.ndarray:
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(axis=0)
    return g


def test_hscore_equals_its_formula() -> None:
    f, y = _problem(60, 5, 3, seed=4)
    cov_f = np.cov(f, rowvar=False)
    cov_g = np.cov(_class_mean_rows(f, y), rowvar=False)
    expected = float(np.trace(np.linalg.pinv(cov_f) @ cov_g))
    assert hscore(f, y) == pytest.approx(expected, rel=1e-10)
    assert 0 < hscore(f, y) < 2  # between 0 and C - 1


def test_hscore_is_c_minus_1_for_any_features_when_examples_do_not_exceed_dims() -> None:
    rng = np.random.default_rng(5)
    y = np.arange(10) % 3
    for _ in range(3):
        assert hscore(rng.normal(size=(10, 20)), y) == pytest.approx(2.0, rel=1e-10)


def test_ledoit_wolf_shrinkage_from_the_svd_equals_sklearn() -> None:
    from sklearn.covariance import ledoit_wolf_shrinkage

    rng = np.random.default_rng(6)
    for n, d in [(50, 5), (20, 300), (7, 7)]:
        x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d)
        x -= x.mean(axis=0)
        assert S.ledoit_wolf_shrinkage(x) == pytest.approx(ledoit_wolf_shrinkage(x, assume_centered=True), rel=1e-10)


@pytest.mark.parametrize(("n", "d"), [(60, 5), (15, 40)], ids=["N>D", "N<D"])
def test_hscore_shrinkage_equals_its_formula_with_sklearn_ledoit_wolf(n: int, d: int) -> None:
    from sklearn.covariance import LedoitWolf

    f, y = _problem(n, d, 3, seed=7)
    lw = LedoitWolf().fit(f)  # (1 - a) S + a tr(S)/D I, S the 1/N covariance
    g = _class_mean_rows(f, y)
    cov_g = (g - g.mean(axis=0)).T @ (g - g.mean(axis=0)) / n  # the same 1/N normalisation
    expected = float(np.trace(np.linalg.inv(lw.covariance_) @ ((1 - lw.shrinkage_) * cov_g)))
    assert 0 < lw.shrinkage_ < 1
    assert hscore_shrinkage(f, y) == pytest.approx(expected, rel=1e-9)


def test_hscore_shrinkage_is_not_degenerate_when_examples_do_not_exceed_dims() -> None:
    rng = np.random.default_rng(8)
    y = np.repeat(np.arange(3), 5)
    noise = rng.normal(size=(15, 40))
    informative = noise.copy()
    informative[:, :3] += 4.0 * np.eye(3)[y]
    assert hscore(noise, y) == pytest.approx(hscore(informative, y))  # both C - 1 = 2
    assert hscore_shrinkage(informative, y) > hscore_shrinkage(noise, y) + 0.3


# ----------------------------------------------------------------------------------------------------------------
# Invariance to the order of examples


def test_every_score_is_invariant_to_permuting_examples() -> None:
    rng = np.random.default_rng(9)
    f, y = _problem(30, 8, 3, seed=9)
    logits = rng.normal(size=(30, 6))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    preds = probs.argmax(axis=1)
    p = rng.permutation(30)
    for fn, x in [(logme, f), (hscore, f), (hscore_shrinkage, f), (leep, probs), (nce, preds)]:
        assert fn(x[p], y[p]) == pytest.approx(fn(x, y), rel=1e-10, abs=1e-12), fn.__name__
    for fn, x in [(logme, np.hstack([f, f])), (hscore_shrinkage, np.hstack([f, f]))]:  # N < D too
        assert fn(x[p], y[p]) == pytest.approx(fn(x, y), rel=1e-10), fn.__name__


# ----------------------------------------------------------------------------------------------------------------
# The correlation helper on TLlib's published CIFAR-10 model-selection table

# thuml/Transfer-Learning-Library, examples/model_selection/README.md (commit 56ccfd7416b21b95351dffacc2aab1fe30f68561),
# "Model Ranking Benchmark on CIFAR10": GoogleNet, Inception V3, ResNet50, ResNet101, ResNet152, DenseNet121,
# DenseNet169, Densenet201, MobileNet V2, MNasNet.
CIFAR10_ACC = [96.2, 97.5, 96.8, 97.7, 97.9, 97.2, 97.4, 97.4, 95.7, 96.8]
CIFAR10_SCORES = {
    "hscore": [5.911, 6.363, 6.567, 6.901, 6.945, 6.210, 6.547, 6.706, 5.928, 6.018],
    "leep": [-1.385, -1.259, -1.010, -0.829, -0.838, -1.035, -0.934, -0.888, -1.100, -1.066],
    "logme": [0.293, 0.349, 0.388, 0.463, 0.469, 0.302, 0.343, 0.369, 0.291, 0.304],
    "nce": [-1.139, -1.060, -1.007, -0.838, -0.851, -1.006, -0.946, -0.866, -1.089, -1.086],
}
# the table's "Pearson Corr" and "Weighted Tau" rows
CIFAR10_PRINTED = {"hscore": (0.839, 0.800), "leep": (0.604, 0.638), "logme": (0.733, 0.785), "nce": (0.786, 0.714)}


@pytest.mark.parametrize("score", sorted(CIFAR10_SCORES))
def test_correlation_reproduces_tllib_cifar10_rows(score: str) -> None:
    got = correlation(CIFAR10_SCORES[score], CIFAR10_ACC)
    pearson, tau = CIFAR10_PRINTED[score]
    assert abs(got["pearson"] - pearson) <= 0.003
    assert abs(got["weighted_kendall_tau"] - tau) <= 0.003


def test_correlation_values_recomputed_from_the_rounded_columns() -> None:
    logme_row = correlation(CIFAR10_SCORES["logme"], CIFAR10_ACC)
    assert logme_row["pearson"] == pytest.approx(0.7312, abs=1e-4)  # printed 0.733: from unrounded scores
    assert logme_row["weighted_kendall_tau"] == pytest.approx(0.7846, abs=1e-4)
    hscore_row = correlation(CIFAR10_SCORES["hscore"], CIFAR10_ACC)
    assert hscore_row["pearson"] == pytest.approx(0.8395, abs=1e-4)
    assert hscore_row["weighted_kendall_tau"] == pytest.approx(0.7997, abs=1e-4)


def test_correlation_edge_cases() -> None:
    assert correlation([1, 2, 3], [10, 20, 30]) == pytest.approx({"pearson": 1.0, "weighted_kendall_tau": 1.0})
    assert correlation([3, 2, 1], [10, 20, 30])["weighted_kendall_tau"] == pytest.approx(-1.0)
    assert math.isnan(correlation([1, 1, 1], [1, 2, 3])["pearson"])
    with pytest.raises(DataError, match="same length"):
        correlation([1, 2, 3], [1, 2])
    with pytest.raises(DataError, match="at least 2"):
        correlation([1], [1])
    with pytest.raises(DataError, match="finite"):
        correlation([1, float("nan")], [1, 2])


def test_correlation_treats_floating_point_noise_as_ties() -> None:
    # the H-scores of bench/rank.py --target text: C - 1 = 1 for every 384-d candidate, up to rounding
    noisy = [1.0, 1.0000000000000002, 0.9999999999999999, 1.0000000000000002, 1.0000000000000009]
    assert math.isnan(correlation(noisy, [0.73, 0.64, 0.53, 0.72, 0.77])["weighted_kendall_tau"])
    # two candidates tied by rounding, a third apart: the tie stays a tie (tau as for exact ties)
    tied = correlation([9.0, 9.000000000000002, 4.997], [0.92, 0.94, 0.58])
    assert tied == pytest.approx(correlation([9.0, 9.0, 4.997], [0.92, 0.94, 0.58]))
    # real differences, however small against the scale, still count
    assert correlation([1.0, 1.0 + 1e-9, 1.0 + 2e-9], [1, 2, 3])["weighted_kendall_tau"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("fn", [logme, hscore, hscore_shrinkage], ids=lambda f: f.__name__)
def test_feature_scores_refuse_bad_input(fn) -> None:
    f, y = _problem(12, 4, 3)
    with pytest.raises(DataError, match=r"only one class \(0\) among the 12 labels"):
        fn(f, np.zeros(12, dtype=int))
    with pytest.raises(DataError, match=r"fewer examples \(2\) than classes \(3\)"):
        fn(f[:2], np.array([0, 2]))
    with pytest.raises(DataError, match=r"fewer examples \(3\) than classes \(5\)"):
        fn(f[:3], np.array([0, 1, 2]), num_classes=5)
    bad = f.copy()
    bad[3, 1] = np.nan
    bad[5, 0] = np.inf
    with pytest.raises(
        DataError,
        match=r"features hold 2 NaN and infinite value\(s\), in 2 of 12 examples "
        r"\(first: example 3\)",
    ):
        fn(bad, y)
    with pytest.raises(DataError, match="11 labels for 12 examples"):
        fn(f, y[:11])
    with pytest.raises(DataError, match=r"1 of the 4 classes have no example \(class 2\)"):
        fn(f, np.where(y == 2, 3, y))
    with pytest.raises(DataError, match="integers"):
        fn(f, y + 0.5)
    with pytest.raises(DataError, match="2-D"):
        fn(f[:, 0], y)


def test_leep_and_nce_refuse_bad_input() -> None:
    logits = np.array([[2.0, 1.0], [0.5, 3.0], [1.0, 1.0]])
    with pytest.raises(DataError, match="rows must sum to 1 .* not the logits.*row 1 sums to 3.5"):
        leep(logits, np.array([0, 1, 1]))
    with pytest.raises(DataError, match="source_probs hold 1 NaN"):
        leep(np.array([[0.5, 0.5], [np.nan, 1.0]]), np.array([0, 1]))
    with pytest.raises(DataError, match="only one class"):
        leep(np.full((3, 2), 0.5), np.array([1, 1, 1]))
    with pytest.raises(DataError, match="integer class predictions.*argmax"):
        nce(np.array([0.2, 0.8]), np.array([0, 1]))
    with pytest.raises(DataError, match=r"fewer examples \(2\) than classes \(3\)"):
        nce(np.array([0, 1]), np.array([0, 2]))


# ----------------------------------------------------------------------------------------------------------------
# rank_candidates and the CLI (tiny random-weight timm models on a small slice of MNIST-5k)

TINY = {"name": "timm:test_efficientnet", "pretrained": False}


def _data(per_class: int = 4):
    from transferkit.recipe import DataConfig

    return DataConfig(dataset="mnist5k", per_class=per_class, val_per_class=2, test_size=40, image_size=32)


class _NaNBackbone(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 256), float("nan"))  # the width the tiny model's head takes


def _tiny_variant(backbone: nn.Module | None = None, headless: bool = False):
    from transferkit.sources import load_source

    def load():
        model = load_source(TINY)
        if backbone is not None:
            model.backbone = backbone
        if headless:
            model.head = nn.Identity()
        return model

    return load


def test_rank_candidates_ranks_the_others_when_one_fails_to_load_or_gives_nan() -> None:
    from transferkit.rank import Candidate, rank_candidates

    cands = [
        "no_such_source",
        TINY,
        Candidate("nan-features", _tiny_variant(_NaNBackbone())),
        Candidate("headless", _tiny_variant(headless=True)),
    ]
    rows = rank_candidates(_data(), cands, seed=0)
    assert [r["candidate"] for r in rows][2:] == ["no_such_source", "nan-features"]  # failed last, in given order
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["candidate"] for r in ok} == {"timm:test_efficientnet (random init)", "headless"}
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert ok[0]["scores"]["logme"] >= ok[1]["scores"]["logme"]
    tiny = next(r for r in ok if r["candidate"].startswith("timm"))
    assert set(tiny["scores"]) == {"logme", "leep", "nce", "hscore", "hscore_shrinkage"}
    assert tiny["source_classes"] == 1000 and tiny["num_examples"] == 40
    assert {"load_s", "features_s", "head_s", "logme_s", "leep_s", "nce_s", "total_s"} <= set(tiny["times"])
    headless = next(r for r in ok if r["candidate"] == "headless")
    assert set(headless["scores"]) == {"logme", "hscore", "hscore_shrinkage"}
    assert headless["skipped"] == {
        "leep": "the source has no classifier head",
        "nce": "the source has no classifier head",
    }
    failed = {r["candidate"]: r for r in rows if r["status"] == "failed"}
    assert failed["no_such_source"]["error"].startswith("candidate 'no_such_source': UnknownNameError: unknown source")
    assert failed["nan-features"]["error"].startswith(
        "candidate 'nan-features': DataError: features hold 10240 NaN value(s), in 40 of 40 examples"
    )
    assert failed["nan-features"]["scores"] == {}


def test_a_score_that_raises_fails_its_candidate_not_the_ranking(monkeypatch: pytest.MonkeyPatch) -> None:
    from transferkit.rank import Candidate, rank_candidates
    from transferkit.rank import candidates as C

    real = C.SCORES.get("hscore")
    calls = iter([True, False])

    def once(features, labels, *, num_classes=None):  # breaks on the first candidate only
        if next(calls):
            raise ZeroDivisionError("float division by zero")
        return real.fn(features, labels, num_classes=num_classes)

    monkeypatch.setitem(C.SCORES._items, "hscore", C.Score(once, "features"))
    rows = rank_candidates(_data(), [Candidate("first", _tiny_variant()), Candidate("second", _tiny_variant())], seed=0)
    assert [(r["candidate"], r["status"]) for r in rows] == [("second", "ok"), ("first", "failed")]
    assert rows[1]["error"] == (
        "candidate 'first': score 'hscore' failed on its features: ZeroDivisionError: float division by zero"
    )
    assert rows[1]["scores"] == {} and "hscore" in rows[0]["scores"]


def test_rank_candidates_sorts_by_the_chosen_score_and_keeps_rows_without_it_before_failures() -> None:
    from transferkit.rank import Candidate, rank_candidates

    cands = [Candidate("headless", _tiny_variant(headless=True)), "no_such_source", TINY]
    rows = rank_candidates(_data(), cands, score="leep")
    assert [(r["candidate"], r["status"]) for r in rows] == [
        ("timm:test_efficientnet (random init)", "ok"),
        ("headless", "ok"),
        ("no_such_source", "failed"),
    ]
    with pytest.raises(UnknownNameError, match="unknown score 'logne'. Did you mean 'logme'.*hscore, hscore_shrinkage"):
        rank_candidates(_data(), [TINY], score="logne")


def test_rank_candidates_features_are_the_linear_probe_train_features() -> None:
    from transferkit.pipeline import compute_features, prepare_data
    from transferkit.rank import rank_candidates
    from transferkit.sources import load_source

    rows = rank_candidates(_data(), [TINY], seed=0, return_features=True)
    torch.manual_seed(0)
    source = load_source(TINY)
    data = prepare_data(_data(), source.preprocess, seed=0)
    expected = compute_features(source.backbone, data.dataset("train"))
    assert set(rows[0]["features"]) == {"train"}
    torch.testing.assert_close(rows[0]["features"]["train"], expected)
    assert rows[0]["example_positions"].tolist() == list(range(40))


def test_candidates_that_preprocess_alike_share_the_preprocessed_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    from transferkit.pipeline import compute_features, prepare_data
    from transferkit.rank import Candidate, rank_candidates
    from transferkit.rank import candidates as C
    from transferkit.sources import load_source

    built: list[int] = []
    real_init = C._Inputs.__init__

    def counting(self, dataset, positions):
        built.append(len(positions))
        real_init(self, dataset, positions)

    monkeypatch.setattr(C._Inputs, "__init__", counting)

    def other_normalisation():  # the same model, inputs scaled to [-1, 1] instead of ImageNet's mean and std
        model = load_source(TINY)
        model.preprocess = {**model.preprocess, "mean": [0.5] * 3, "std": [0.5] * 3}
        return model

    cands = [TINY, Candidate("headless", _tiny_variant(headless=True)), Candidate("halves", other_normalisation), TINY]
    rows = rank_candidates(_data(), cands, seed=0, max_examples=30, return_features=True)
    assert built == [30, 30]  # one preprocessing for the three alike, one for the other normalisation
    by_name = {r["candidate"]: r for r in rows}
    # the shared inputs give each candidate the features of its own preprocessing of the same chosen examples
    torch.manual_seed(0)
    source = other_normalisation()
    data = prepare_data(_data(), source.preprocess, seed=0)
    positions = by_name["halves"]["example_positions"].tolist()
    expected = compute_features(source.backbone, torch.utils.data.Subset(data.dataset("train"), positions))
    torch.testing.assert_close(by_name["halves"]["features"]["train"], expected)
    assert not torch.allclose(by_name["halves"]["features"]["train"], by_name["headless"]["features"]["train"])
    # nothing is kept beyond the byte budget: every candidate then preprocesses for itself
    built.clear()
    monkeypatch.setattr(C._SharedInputs.__init__, "__defaults__", (1000,))
    rank_candidates(_data(), cands[:2], seed=0, max_examples=30)
    assert built == [30, 30]


def test_rank_candidates_refuses_data_problems_before_loading_anything() -> None:
    from transferkit.rank import Candidate, rank_candidates

    def never():
        raise AssertionError("a candidate was loaded")

    with pytest.raises(DataError, match="max_examples=5 is fewer than the 10 classes of 'mnist5k'"):
        rank_candidates(_data(), [Candidate("x", never)], max_examples=5)
    with pytest.raises(DataError, match="max_examples must be >= 1"):
        rank_candidates(_data(), [Candidate("x", never)], max_examples=0)


def test_rank_candidates_refuses_one_class_data(tmp_path, write_image) -> None:
    from transferkit.rank import Candidate, rank_candidates
    from transferkit.recipe import DataConfig

    for i in range(6):
        write_image(tmp_path / "only" / f"{i}.png", color=(10 * i, 0, 0))
    with pytest.raises(DataError, match="1 class"):
        rank_candidates(DataConfig(dataset=str(tmp_path), test_size=1), [Candidate("x", lambda: None)])


def test_select_examples_is_stratified_and_seeded() -> None:
    from transferkit.rank import select_examples

    labels = np.repeat(np.arange(4), [10, 10, 10, 3])
    picked = select_examples(labels, 18, seed=0)
    assert len(picked) == 18 and np.all(np.diff(picked) > 0)
    assert np.bincount(labels[picked]).tolist() == [5, 5, 5, 3]  # the small class gives all it has
    assert np.bincount(labels[select_examples(labels, 8, seed=1)]).tolist() == [2, 2, 2, 2]
    assert select_examples(labels, 18, seed=0).tolist() == picked.tolist()
    assert select_examples(labels, 18, seed=1).tolist() != picked.tolist()
    assert select_examples(labels, None, seed=0).tolist() == list(range(33))


def test_cli_rank_prints_a_table_and_json(capsys) -> None:
    from transferkit.cli import main

    args = [
        "rank",
        "--data",
        "mnist5k",
        "--per-class",
        "3",
        "--image-size",
        "32",
        "--candidates",
        json.dumps(TINY),
        "no_such_source",
        "--max-examples",
        "20",
    ]
    assert main(args + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[0]["num_examples"] == 20 and set(rows[0]["scores"]) >= {"logme", "leep"}
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "candidate", "logme*", "leep", "nce", "hscore", "hscore_shr", "time", "(s)"]
    assert lines[2].startswith("1") and "timm:test_efficientnet (random init)" in lines[2]
    assert "failed" in lines[3] and "candidate 'no_such_source': UnknownNameError" in out
    assert main(["rank", "--data", "mnist5k", "--candidates", "no_such_source", "--per-class", "2"]) == 1
