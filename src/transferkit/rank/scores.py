"""Transferability scores: how well a source's features (or its classifier) fit a target's labels, before training.

Every score is a plain function on NumPy arrays that returns a float; higher means "expected to transfer
better". Labels are integers in ``[0, C)`` with every class present (``num_classes`` fixes ``C`` when the
labels alone cannot show it). Bad input raises ``DataError`` with a message that says what is wrong; the caller
(``rank_candidates``) adds the candidate's name.

- ``logme(features, labels)``: LogME (You et al., ICML 2021), the maximum over (alpha, beta) of the log evidence
  of a Bayesian linear regression from the features to each one-hot label column, per example, averaged over
  classes. Computed from one thin SVD of the ``N x D`` feature matrix, as in the 2021 follow-up (You et al.,
  "Ranking and Tuning Pre-trained Models", arXiv:2110.10545), but maximised by a search over alpha / beta
  instead of the follow-up's fixed-point iteration, which can stop at a lower local maximum (below).
- ``leep(source_probs, labels)``: LEEP (Nguyen et al., ICML 2020), the mean log-likelihood of the target labels
  under the "expected empirical predictor" built from the source classifier's probabilities.
- ``nce(source_preds, labels)``: NCE (Tran et al., ICCV 2019), the negative conditional entropy of the target
  labels given the source classifier's argmax predictions.
- ``hscore(features, labels)``: H-score (Bao et al., ICIP 2019), ``tr(pinv(cov f) cov E[f|y])``.
- ``hscore_shrinkage(features, labels)``: the regularised H-score of Ibrahim et al. 2022 ("Newer is not always
  better: rethinking transferability metrics..."), with the feature covariance replaced by its Ledoit-Wolf
  shrinkage estimate ``(1 - a) S + a (tr S / D) I`` and the between-class covariance scaled by ``1 - a``.

Natural logarithms throughout.

**LogME when N < D: which value transferkit computes, and why.** The two published algorithms agree when the
feature matrix has full column rank (N > D, rank D) and differ otherwise. The ICML 2021 algorithm eigendecomposes
the ``D x D`` matrix ``F^T F``, so the ``D - k`` zero eigenvalues (``k = rank F <= N``) enter the log-determinant
as ``log(alpha + beta * 0) = log alpha`` each; the result is the exact log evidence
``log N(y; 0, I / beta + F F^T / alpha)``. The fixed-point algorithm of the follow-up (in the authors' LogME
repository and in TLlib) works from the thin SVD, whose ``k`` singular values leave those zero eigenvalues out of
the log-determinant while the ``D / 2 log alpha`` term keeps all ``D``, so its value is the exact one plus
``(D - k) / (2 N) * log alpha``. That extra term is not part of the evidence: it grows with the feature width D
and with the scale of the features (through alpha), and so favours or penalises candidates for their width alone
- which matters exactly when ranking backbones of different widths (e.g. a network truncated after an early
block). transferkit therefore computes the **exact evidence** (the ICML 2021 value) at the follow-up's speed:
one SVD, O(N D min(N, D)), then O(min(N, D)) per evaluation of the evidence. Singular values below
``max(N, D) * eps * s_max`` count as zero.

**How the maximum is found.** For a fixed ratio ``t = alpha / beta`` the best beta has a closed form, which
leaves the evidence a smooth function of ``log t`` alone; it is evaluated on a grid over the whole admissible
range and refined by golden-section search (``_max_log_evidence``). The follow-up's fixed-point updates
``alpha = gamma / |m|^2``, ``beta = (N - gamma) / |y - F m|^2`` (until 2026-11 transferkit's solver too) solve
the stationarity conditions of the same evidence, but (1) where the evidence has two local maxima in t - a
spectrum in two groups, seen on a randomly initialised EfficientNet-Lite0's features of 50 MNIST images, 2 of 10
classes - they can stop at the lower one (the test builds such a case: the gap is 2.8 nats), and (2) when the
maximum is at a boundary (t -> 0 or infinity) they creep towards it and took 10,000 iterations. Where the
fixed point finds the global maximum both give the same value to 1e-12. For N > D with full-rank features the
value equals both published algorithms' up to their tolerances (they stop at 1e-3 or 1e-2).

**H-score when N <= D.** With at most D + 1 examples the centred features span every direction the examples
have, ``pinv(cov f)`` whitens them completely and the H-score equals ``C - 1`` whatever the features are (it is
computed from the SVD of the centred features, which makes this exact). That is the degeneracy the shrinkage
form removes; prefer ``hscore_shrinkage`` (or LogME) when N is not well above D.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from transferkit.errors import DataError

LOGME_GRID = 256  # points of log(alpha / beta) the evidence is first evaluated at (see _max_log_evidence)
LOGME_XTOL = 1e-10  # then golden-section search to this width in log(alpha / beta)


# ----------------------------------------------------------------------------------------------------------------
# Input checks (shared by every score)


def check_labels(
    labels: Any, num_examples: int | None = None, num_classes: int | None = None
) -> tuple[np.ndarray, int]:
    """Validate target labels; returns them as int64 and the number of classes ``C``.

    Args:
        labels: one integer label per example, in ``[0, C)``.
        num_examples: the number of rows the labels must match (the features' or probabilities' rows).
        num_classes: ``C``; default ``max(labels) + 1``.

    Raises:
        DataError: not one integer label per example, negative or out-of-range labels, one class only, fewer
            examples than classes, or a class without examples.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise DataError(f"labels must be one integer per example (a 1-D array), got shape {y.shape}")
    if num_examples is not None and len(y) != num_examples:
        raise DataError(f"{len(y)} labels for {num_examples} examples: give one label per example")
    if len(y) == 0:
        raise DataError("no examples: scores need labelled examples of at least 2 classes")
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise DataError(f"labels must be integers in [0, C), got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise DataError(f"labels must be integers in [0, C); found {int(y.min())}")
    present = np.unique(y)
    if len(present) < 2:
        raise DataError(
            f"only one class ({int(present[0])}) among the {len(y)} labels: a transferability score "
            "compares classes, so it needs examples of at least 2 classes"
        )
    c = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if y.max() >= c:
        raise DataError(f"label {int(y.max())} is out of range for num_classes={c}: labels must be in [0, {c})")
    if len(y) < c:
        raise DataError(f"fewer examples ({len(y)}) than classes ({c}): every class needs at least one example")
    missing = np.setdiff1d(np.arange(c), present)
    if len(missing):
        shown = ", ".join(str(int(m)) for m in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise DataError(
            f"{len(missing)} of the {c} classes have no example (class {shown}): every class in "
            f"[0, {c}) needs at least one (relabel to consecutive integers, or pass num_classes)"
        )
    return y, c


def check_features(features: Any, name: str = "features") -> np.ndarray:
    """Validate a 2-D ``(examples, dims)`` array of finite numbers; returns it as float64."""
    f = np.asarray(features)
    if f.ndim != 2:
        raise DataError(f"{name} must be a 2-D array (examples x dimensions), got shape {f.shape}")
    if f.dtype.kind not in "fiub":
        raise DataError(f"{name} must be numbers, got dtype {f.dtype}")
    f = f.astype(np.float64)
    bad = ~np.isfinite(f)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        kinds = " and ".join(k for k, m in (("NaN", np.isnan(f)), ("infinite", np.isinf(f))) if m.any())
        raise DataError(
            f"{name} hold {int(bad.sum())} {kinds} value(s), in {len(rows)} of {len(f)} examples "
            f"(first: example {int(rows[0])}): the model's output is not usable (diverged weights, "
            "or inputs it cannot handle)"
        )
    if f.shape[1] == 0:
        raise DataError(f"{name} have 0 dimensions")
    return f


# ----------------------------------------------------------------------------------------------------------------
# LogME


def logme(features: Any, labels: Any, *, num_classes: int | None = None) -> float:
    """LogME: the maximum log evidence per example of a linear model from features to labels (higher is better).

    The exact evidence (the ICML 2021 value), maximised over the whole range of alpha / beta; see the module
    docstring for why this differs from the published fixed-point code when N < D, and how it is maximised.

    Args:
        features: ``(N, D)`` features of N labelled target examples.
        labels: ``(N,)`` integer labels in ``[0, C)``.
        num_classes: ``C`` (default ``max(labels) + 1``).

    Returns:
        The mean over classes of ``max_{alpha, beta} log p(y_c | F, alpha, beta) / N``, ``y_c`` the one-hot column.
    """
    f = check_features(features)
    y, c = check_labels(labels, len(f), num_classes)
    n = len(f)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma, u = _nonzero_spectrum(s, u, f.shape)
    if len(sigma) == 0:
        raise DataError("features are all zero: they carry no information about the labels")
    onehot = np.eye(c)[y]
    x2 = (u.T @ onehot) ** 2  # (k, C): squared coordinates of each label column on the left singular vectors
    # |y|^2 outside the column space of F; exactly 0 when F spans every direction (rounding would count there)
    outside = np.zeros(c) if len(sigma) == n else np.maximum(onehot.sum(axis=0) - x2.sum(axis=0), 0.0)
    evidences, _, _ = _max_log_evidence(x2, outside, sigma, n)
    return float(np.mean(evidences) / n)


def _nonzero_spectrum(s: np.ndarray, u: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values above the numerical-rank threshold, and their left singular vectors."""
    if s.size == 0 or s[0] == 0:
        return s[:0] ** 2, u[:, :0]
    keep = s > s[0] * max(shape) * np.finfo(np.float64).eps
    return s[keep] ** 2, u[:, keep]


def log_evidence(alpha: Any, beta: Any, x2: np.ndarray, outside: Any, sigma: np.ndarray, n: int) -> Any:
    """Exact ``log N(y; 0, I / beta + F F^T / alpha)`` from the SVD of F (for any alpha, beta > 0).

    Args:
        alpha: prior precision of the weights.
        beta: noise precision.
        x2: squared projections of y on the left singular vectors with nonzero singular values: ``(k,)`` for one
            label column, or ``(k, C)`` for C columns at once (then alpha, beta and outside are ``(C,)`` arrays
            and the result is one value per column).
        outside: ``|y|^2`` minus ``sum(x2)``, the part of y outside the column space of F.
        sigma: the nonzero squared singular values of F (k of them).
        n: number of examples.
    """
    sig = sigma.reshape((-1,) + (1,) * (np.ndim(x2) - 1))
    t = alpha / beta
    r = 1.0 / (sig + t)  # written with 1 / (sigma + t) so that a huge t underflows instead of overflowing
    m2 = np.sum(sig * x2 * r**2, axis=0)  # |m|^2, m the posterior mean of the weights
    res2 = np.sum(x2 * (t * r) ** 2, axis=0) + outside  # |y - F m|^2
    k = len(sigma)
    # D/2 log(alpha) - 1/2 sum over all D eigenvalues of log(alpha + beta sigma): the D - k zero eigenvalues
    # cancel D - k of the D halves of log(alpha), leaving k/2 log(alpha).
    value = (
        k / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - 0.5 * np.sum(np.log(alpha + beta * sig), axis=0)
        - beta / 2 * res2
        - alpha / 2 * m2
        - n / 2 * np.log(2 * np.pi)
    )
    return float(value) if np.ndim(x2) == 1 else value


def _profile_log_evidence(u: np.ndarray, x2: np.ndarray, outside: np.ndarray, sigma: np.ndarray, n: int) -> np.ndarray:
    """The log evidence at ``t = alpha / beta = exp(u)`` with beta at its optimum for that t, up to a constant.

    For fixed t the evidence is ``k/2 log t - 1/2 sum log(t + sigma) + n/2 log beta - beta/2 E(t)`` (+ const) with
    ``E(t) = |y - F m|^2 + t |m|^2 = t sum x2 / (sigma + t) + outside``, so the best beta is ``n / E(t)``.

    Args:
        u: ``(G, C)``: G values of log t for each of C label columns.
        x2, outside, sigma, n: as in ``log_evidence`` (``x2`` is ``(k, C)``).

    Returns:
        ``(G, C)``: ``k/2 u - 1/2 sum log(t + sigma) - n/2 log E(t)``.
    """
    t = np.exp(u)
    log_det = np.sum(np.log(sigma[:, None] + t[:, None, :]), axis=1)  # sum over the k singular values
    return len(sigma) / 2 * u - 0.5 * log_det - n / 2 * np.log(_fit_energy(t, x2, outside, sigma))


def _fit_energy(t: np.ndarray, x2: np.ndarray, outside: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``E(t) = |y - F m|^2 + t |m|^2 = t sum x2 / (sigma + t) + outside`` for ``t`` of shape ``(..., C)``, kept
    above the smallest positive double (the best beta for t is ``n / E(t)``)."""
    e = t * np.sum(x2 / (sigma[:, None] + t[..., None, :]), axis=-2) + outside
    return np.maximum(e, np.finfo(np.float64).tiny)


def _max_log_evidence(x2: np.ndarray, outside: Any, sigma: np.ndarray, n: int) -> tuple[Any, Any, Any]:
    """The maximum over (alpha, beta) of the log evidence; returns (log evidence, alpha, beta) at the optimum, one
    value per column of ``x2`` (``(k, C)``; plain floats for one column ``(k,)``).

    beta is eliminated in closed form (``_profile_log_evidence``), leaving a smooth function of ``u = log t``
    alone, ``t = alpha / beta``, on ``[log lo, log hi]`` with ``lo, hi = min(sigma) 1e-15, max(sigma) 1e15``: 1e15
    times beyond the spectrum, where the evidence equals its limit (t -> 0: exact interpolation, N = rank F; t ->
    infinity: weights held at 0, the labels explained as noise) to double precision. It is evaluated on
    ``LOGME_GRID`` points spread evenly over that range, then golden-section search narrows the bracket around
    the best point to ``LOGME_XTOL`` in u. All label columns are solved at once.

    Why not the follow-up's fixed-point iteration (``alpha = gamma / |m|^2``, ``beta = (N - gamma) / |y - F m|^2``,
    the stationarity conditions of the same evidence): it finds a stationary point, not the maximum, and the
    evidence can have two local maxima in t (``test_logme_takes_the_higher_of_two_local_maxima_of_the_evidence``;
    on real features too). And when the maximum is at a boundary it creeps towards it, t shrinking by a nearly
    constant factor per step, for thousands of iterations on real features (docs/benchmarks.md); this search
    takes a fixed, small number of evaluations.
    """
    one = np.ndim(x2) == 1
    x2 = x2.reshape(len(sigma), -1)
    c = x2.shape[1]
    outside = np.broadcast_to(np.asarray(outside, dtype=np.float64), (c,))
    lo, hi = np.log(float(sigma.min()) * 1e-15), np.log(float(sigma.max()) * 1e15)
    grid = np.linspace(lo, hi, LOGME_GRID)
    chunk = max(1, (1 << 22) // (len(sigma) * c))  # grid points per evaluation: at most 4M numbers at once
    values = np.concatenate(
        [
            _profile_log_evidence(np.repeat(grid[i : i + chunk, None], c, axis=1), x2, outside, sigma, n)
            for i in range(0, LOGME_GRID, chunk)
        ]
    )
    best = np.argmax(values, axis=0)  # (C,)
    a = grid[np.maximum(best - 1, 0)]
    b = grid[np.minimum(best + 1, LOGME_GRID - 1)]
    inv_phi = (np.sqrt(5.0) - 1) / 2
    while np.max(b - a) > LOGME_XTOL:
        u1, u2 = b - inv_phi * (b - a), a + inv_phi * (b - a)
        g1, g2 = _profile_log_evidence(np.stack([u1, u2]), x2, outside, sigma, n)
        a, b = np.where(g1 >= g2, a, u1), np.where(g1 >= g2, u2, b)  # keep the side of the higher point
    u = np.stack([(a + b) / 2, grid[best]])
    u = u[np.argmax(_profile_log_evidence(u, x2, outside, sigma, n), axis=0), np.arange(c)]  # never below the grid
    t = np.exp(u)
    beta = n / _fit_energy(t, x2, outside, sigma)
    alpha = t * beta
    value = log_evidence(alpha, beta, x2, outside, sigma, n)
    if one:
        return float(value[0]), float(alpha[0]), float(beta[0])
    return value, alpha, beta


# ----------------------------------------------------------------------------------------------------------------
# LEEP and NCE (need the source classifier)


def leep(source_probs: Any, labels: Any, *, num_classes: int | None = None) -> float:
    """LEEP: mean log-likelihood of the labels under the expected empirical predictor (higher is better; <= 0).

    ``P(y, z) = 1/N sum_{i: y_i = y} theta(x_i)_z``, ``P(y | z) = P(y, z) / P(z)``, and
    ``LEEP = 1/N sum_i log sum_z P(y_i | z) theta(x_i)_z``.

    Args:
        source_probs: ``(N, C_s)`` the source classifier's probabilities (softmax) on the target examples.
        labels: ``(N,)`` target labels in ``[0, C)``.
        num_classes: ``C`` (default ``max(labels) + 1``).
    """
    p = check_features(source_probs, "source_probs")
    y, c = check_labels(labels, len(p), num_classes)
    if p.min() < 0:
        raise DataError(f"source_probs must be probabilities (softmax of the source logits); found {p.min():.4g} < 0")
    sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1)))
    if abs(sums[worst] - 1) > 1e-3:
        raise DataError(
            f"source_probs rows must sum to 1 (softmax of the source logits, not the logits); row "
            f"{worst} sums to {sums[worst]:.4g}"
        )
    joint = np.eye(c)[y].T @ p / len(p)  # (C, C_s)
    pz = joint.sum(axis=0)
    cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)  # P(y | z); z never predicted -> 0
    eep = np.sum(p * cond[y], axis=1)  # > 0: example i itself contributes to P(y_i | z) wherever theta_z > 0
    return float(np.mean(np.log(eep)))


def nce(source_preds: Any, labels: Any, *, num_classes: int | None = None) -> float:
    """NCE: the negative conditional entropy ``-H(Y | Z)`` of labels given source predictions (higher is better).

    ``NCE = sum_{y, z} P(y, z) log P(y | z)`` with the empirical joint distribution of (target label, source
    argmax prediction).

    Args:
        source_preds: ``(N,)`` the source classifier's predicted classes (argmax) on the target examples.
        labels: ``(N,)`` target labels in ``[0, C)``.
        num_classes: ``C`` (default ``max(labels) + 1``).
    """
    z = np.asarray(source_preds)
    if z.ndim != 1 or z.dtype.kind not in "iu":
        raise DataError(
            f"source_preds must be integer class predictions, one per example (1-D); got shape "
            f"{z.shape}, dtype {z.dtype} (take the argmax of the source probabilities)"
        )
    y, c = check_labels(labels, len(z), num_classes)
    if len(z) and z.min() < 0:
        raise DataError(f"source_preds must be class indices >= 0; found {int(z.min())}")
    _, zi = np.unique(z, return_inverse=True)
    joint = np.zeros((c, int(zi.max()) + 1))
    np.add.at(joint, (y, zi.reshape(-1)), 1.0 / len(y))
    pz = joint.sum(axis=0)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log((joint / pz)[nz])))


# ----------------------------------------------------------------------------------------------------------------
# H-score and its shrinkage form


def _class_sums(u: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    """``diag(U^T P U)``, P the projector onto per-class means: ``sum_c |sum_{i in c} u_i|^2 / n_c`` per column."""
    onehot = np.eye(c)[y]
    sums = onehot.T @ u  # (C, k)
    return np.sum(sums**2 / onehot.sum(axis=0)[:, None], axis=0)


def _centred_svd(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred features' nonzero squared singular values, their left singular vectors, and all singular values."""
    x = f - f.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    sigma, u = _nonzero_spectrum(s, u, x.shape)
    if len(sigma) == 0:
        raise DataError("features are the same for every example: they carry no information about the labels")
    return sigma, u, s


def ledoit_wolf_shrinkage(x: np.ndarray, s: np.ndarray | None = None) -> float:
    """Ledoit-Wolf shrinkage coefficient of centred data ``x`` (N, D), as ``sklearn.covariance.ledoit_wolf_shrinkage``
    computes it, but from the singular values ``s`` of ``x`` and its row norms: O(N D) given the SVD instead of
    sklearn's O(N D^2) (``|X^T X|_F^2 = sum s^4``, ``sum_jk (X^2)^T X^2 = sum_i |x_i|^4``).

    Args:
        x: centred data (each column has mean 0).
        s: the singular values of ``x`` (computed when None).
    """
    n, d = x.shape
    if s is None:
        s = np.linalg.svd(x, compute_uv=False)
    s2 = s.astype(np.float64) ** 2
    mu = float(np.sum(s2)) / (n * d)  # tr(S) / D, S = X^T X / N
    delta_ = float(np.sum(s2**2)) / n**2  # |S|_F^2
    beta_ = float(np.sum(np.sum(x**2, axis=1) ** 2))
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * float(np.sum(s2)) / n + d * mu**2) / d  # |S - mu I|_F^2 / D
    beta = min(beta, delta)
    return 0.0 if beta == 0 else beta / delta


def hscore(features: Any, labels: Any, *, num_classes: int | None = None) -> float:
    """H-score: ``tr(pinv(cov f) cov E[f | y])`` (higher is better; between 0 and C - 1).

    With ``X`` the centred features and ``X = U S V^T`` its SVD, this equals ``tr(U^T P U)``, P the projector onto
    per-class means, computed without forming any ``D x D`` matrix. The 1/N or 1/(N-1) normalisation of the two
    covariances cancels. When N <= D + 1 the value is C - 1 for any features (see the module docstring).

    Args:
        features: ``(N, D)`` features of N labelled target examples.
        labels: ``(N,)`` integer labels in ``[0, C)``.
        num_classes: ``C`` (default ``max(labels) + 1``).
    """
    f = check_features(features)
    y, c = check_labels(labels, len(f), num_classes)
    _, u, _ = _centred_svd(f)
    return float(np.sum(_class_sums(u, y, c)))


def hscore_shrinkage(features: Any, labels: Any, *, num_classes: int | None = None) -> float:
    """Regularised H-score (Ibrahim et al. 2022): ``tr(S_a^-1 (1 - a) cov E[f | y])``, Ledoit-Wolf ``S_a``.

    ``S_a = (1 - a) S + a mu I`` with ``S`` the (1/N) covariance of the features, ``mu = tr(S) / D`` and ``a`` the
    Ledoit-Wolf shrinkage coefficient (``ledoit_wolf_shrinkage``: sklearn's estimate, computed from the SVD); the
    between-class covariance uses the same 1/N normalisation. Computed in the span of the centred features (the
    between-class covariance lives there), so no ``D x D`` matrix is formed.

    Args:
        features: ``(N, D)`` features of N labelled target examples.
        labels: ``(N,)`` integer labels in ``[0, C)``.
        num_classes: ``C`` (default ``max(labels) + 1``).
    """
    f = check_features(features)
    y, c = check_labels(labels, len(f), num_classes)
    n, d = f.shape
    s2, u, s_all = _centred_svd(f)
    lam = s2 / n  # eigenvalues of S in the span of the centred features
    a = ledoit_wolf_shrinkage(f - f.mean(axis=0, keepdims=True), s_all)
    mu = float(np.sum(lam)) / d
    q = _class_sums(u, y, c)
    return float((1 - a) * np.sum(lam * q / ((1 - a) * lam + a * mu)))


# ----------------------------------------------------------------------------------------------------------------
# Evaluating scores against fine-tuned accuracies


def correlation(scores: Any, accuracies: Any) -> dict[str, float]:
    """Pearson correlation and weighted Kendall's tau between scores and fine-tuned accuracies.

    Weighted tau is ``scipy.stats.weightedtau`` with its defaults (hyperbolic weigher ``1 / (r + 1)``, ranks by
    decreasing value, averaged over both rankings), which weights agreement among the best candidates most; it
    is the measure TLlib's model-selection benchmark reports. NaN when either side is constant.

    Scores that agree to 12 significant digits count as ties: a score that is constant in exact arithmetic (the
    H-score of every candidate with at least as many feature dimensions as examples is ``C - 1``) comes out of
    floating point as ``1.0``, ``1.0000000000000002``, ``0.9999999999999999``, and those rounding errors must not
    order the candidates.

    Args:
        scores: one score per candidate.
        accuracies: the fine-tuned accuracy of the same candidates, in the same order.
    """
    import warnings

    from scipy import stats

    s = np.asarray(scores, dtype=np.float64)
    a = np.asarray(accuracies, dtype=np.float64)
    if s.ndim != 1 or s.shape != a.shape:
        raise DataError(f"scores and accuracies must be 1-D and of the same length, got {s.shape} and {a.shape}")
    if len(s) < 2:
        raise DataError(f"correlation needs at least 2 candidates, got {len(s)}")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(a))):
        raise DataError("scores and accuracies must be finite numbers (leave failed candidates out)")
    scale = float(np.max(np.abs(s)))
    if scale > 0:
        s = np.round(s, 11 - int(np.floor(np.log10(scale))))
    if np.ptp(s) == 0 or np.ptp(a) == 0:
        return {"pearson": float("nan"), "weighted_kendall_tau": float("nan")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = float(stats.pearsonr(s, a)[0])
        tau = float(stats.weightedtau(s, a)[0])
    return {"pearson": pearson, "weighted_kendall_tau": tau}
