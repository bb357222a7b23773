"""Evaluation metrics, uncertainty and model comparison for binary PCam predictions.

Everything takes numpy arrays: ``y`` holds the true labels (0 = normal, 1 = tumour) and
``prob`` the predicted probability of class 1. Results are plain Python numbers, dicts or
tidy pandas tables.

Point metrics come from scikit-learn and tests/distributions from scipy. Two things are
computed here because no library provides them:

* the fast DeLong covariance of correlated AUCs (Sun & Xu 2014), built on
  :func:`scipy.stats.rankdata`;
* vectorised bootstrap replicates. A resample is represented by how many times each row was
  drawn, so accuracy and NLL replicates are weighted means and AUC replicates are the
  weighted Mann-Whitney statistic, which equals :func:`sklearn.metrics.roc_auc_score` on the
  explicit resample (the tests check this).

The module also holds the reference numbers of the reproduced study (Zhao, "Automatic Deep
Learning-based Histopathologic Image Classification", Table 1) and of Veeling et al. (2018),
and builds the measured-vs-published comparison table.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    recall_score,
    roc_auc_score,
)

from pcamlib.errors import InputError

NLL_EPS = 1e-7
"""Probabilities are clipped to ``[NLL_EPS, 1 - NLL_EPS]`` before the log loss.

Model outputs are float32 softmax values, which reach exactly 0 or 1; without clipping one
confidently wrong patch would make the NLL infinite. ``1e-7`` (about float32 resolution near 1)
caps the loss of one sample at about 16.1 nats.
"""

BOOTSTRAP_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "auc",
    "nll",
)
"""Metric names accepted by :func:`bootstrap_ci`."""

REFERENCE_ZHAO = "Zhao Table 1"
"""``reference`` value of rows compared with :data:`STUDY_TABLE1`."""

REFERENCE_VEELING = "Veeling et al. 2018 P4M-DenseNet"
"""``reference`` value of rows compared with :data:`VEELING_2018`."""

STUDY_SOURCE = 'Zhao, "Automatic Deep Learning-based Histopathologic Image Classification", Table 1'
"""Citation of the reproduced study's results table."""

STUDY_TABLE1 = pd.DataFrame(
    {
        "train_accuracy": [0.9568, 0.9377],
        "valid_accuracy": [0.8812, 0.8686],
        "test_accuracy": [0.8437, 0.8249],
        "test_auc": [0.96, 0.93],
    },
    index=pd.Index(["DenseNet", "ResNet"], name="family"),
)
"""Published results of the reproduced study, one row per model family (see STUDY_SOURCE).

AUCs are published to two decimals only, so AUC deltas against them are coarse.
"""

VEELING_2018: dict[str, Any] = {
    "model": "P4M-DenseNet",
    "test_accuracy": 0.898,
    "test_auc": 0.963,
    "test_nll": 0.260,
}
"""Veeling et al. (2018), "Rotation Equivariant CNNs for Digital Pathology": the PCam
authors' best model, the external reference point for test accuracy, AUC and NLL."""

_TABLE1_METRICS: tuple[str, ...] = ("train_accuracy", "valid_accuracy", "test_accuracy", "test_auc")
_VEELING_METRICS: tuple[str, ...] = ("test_accuracy", "test_auc", "test_nll")
_FAMILY_RE = re.compile(r"^(densenet|resnet)[-_]?(\d*)$")
_FAMILIES = {"densenet": "DenseNet", "resnet": "ResNet"}


# --------------------------------------------------------------------------- validation


def _as_labels(y: Any, name: str = "y") -> np.ndarray:
    """Return ``y`` as a 1-D int64 array of 0/1 labels, or raise a clear ValueError."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise InputError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{name} is empty")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{name} must hold 0/1 numbers; got dtype {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        raise InputError(
            f"{name} must contain only 0 and 1; {int(bad.sum())} of {arr.size} values are not "
            f"(e.g. {arr[bad][0].item()!r})"
        )
    return arr.astype(np.int64)


def _as_probs(prob: Any, n: int, name: str = "prob", y_name: str = "y") -> np.ndarray:
    """Return ``prob`` as a 1-D float64 array of length ``n`` in [0, 1], or raise."""
    arr = np.asarray(prob)
    if arr.ndim != 1:
        raise InputError(f"{name} must be 1-D (probability of class 1); got shape {arr.shape}")
    if arr.size != n:
        raise InputError(f"length mismatch: {y_name} has {n} values but {name} has {arr.size}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(f"{name} must be numeric; got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    n_nan = int(np.isnan(arr).sum())
    if n_nan:
        raise InputError(f"{name} contains {n_nan} NaN value(s); probabilities must be in [0, 1]")
    bad = (arr < 0) | (arr > 1)
    if bad.any():
        raise InputError(
            f"{name} must be probabilities in [0, 1]; {int(bad.sum())} value(s) are outside "
            f"(min {arr.min():.6g}, max {arr.max():.6g})"
        )
    return arr


def _require_both_classes(y: np.ndarray, name: str = "y") -> None:
    """Raise if ``y`` holds a single class (AUC and specificity/sensitivity are undefined)."""
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = 1 if n_pos else 0
        raise InputError(
            f"only one class present in {name}: all {y.size} labels are {only}; "
            "AUC is undefined (need at least one 0 and one 1)"
        )


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be in [0, 1]; got {threshold}")
    return threshold


def _check_boot_args(n_boot: int, alpha: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise InputError(f"n_boot must be a positive integer; got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must be in (0, 1); got {alpha!r}")


def _predict(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Hard labels: class 1 where ``prob >= threshold``."""
    return (prob >= threshold).astype(np.int64)


def _per_sample_nll(y: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Per-row log loss with the same clipping as :func:`binary_metrics` (for bootstrapping)."""
    p = np.clip(prob, NLL_EPS, 1.0 - NLL_EPS)
    return -np.where(y == 1, np.log(p), np.log1p(-p))


# --------------------------------------------------------------------------- point metrics


def binary_metrics(y: Any, prob: Any, threshold: float = 0.5) -> dict[str, float]:
    """Standard binary classification metrics from scikit-learn.

    Args:
        y: True labels, 0 or 1, shape (n,).
        prob: Predicted probability of class 1, shape (n,), in [0, 1].
        threshold: Predict class 1 where ``prob >= threshold``.

    Returns:
        ``accuracy``, ``balanced_accuracy``, ``auc`` (ROC AUC), ``nll`` (log loss, natural log,
        probabilities clipped to ``[NLL_EPS, 1 - NLL_EPS]``), ``sensitivity`` (recall of class
        1), ``specificity`` (recall of class 0) as floats, and the confusion counts ``tn``,
        ``fp``, ``fn``, ``tp`` and ``n`` as ints.

    Raises:
        ValueError: If lengths differ, ``y`` holds values other than 0/1, ``prob`` holds NaN
            or values outside [0, 1], or ``y`` holds only one class (AUC undefined).
    """
    y_arr = _as_labels(y)
    p = _as_probs(prob, y_arr.size)
    _require_both_classes(y_arr)
    pred = _predict(p, _check_threshold(threshold))
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y_arr, pred, labels=[0, 1]).ravel())
    return {
        "accuracy": float(accuracy_score(y_arr, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_arr, pred)),
        "auc": float(roc_auc_score(y_arr, p)),
        "nll": float(log_loss(y_arr, np.clip(p, NLL_EPS, 1.0 - NLL_EPS), labels=[0, 1])),
        "sensitivity": float(recall_score(y_arr, pred, pos_label=1)),
        "specificity": float(recall_score(y_arr, pred, pos_label=0)),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "n": int(y_arr.size),
    }


# --------------------------------------------------------------------------- bootstrap


def _bootstrap_counts(
    rng: np.random.Generator, n: int, n_boot: int, max_cells: int = 4_000_000
) -> Iterator[np.ndarray]:
    """Yield (chunk, n) float arrays: how often each row is drawn in each resample.

    Resamples are drawn in chunks of at most ``max_cells`` cells to bound memory; the draws
    depend only on ``rng``, ``n`` and ``n_boot``.
    """
    chunk = max(1, min(n_boot, max_cells // n))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(b, n))
        idx += (np.arange(b) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


class _WeightedAUC:
    """ROC AUC of one score vector under many row weightings (bootstrap counts).

    With ties counted as one half, AUC is the Mann-Whitney statistic, which is exactly what
    :func:`sklearn.metrics.roc_auc_score` computes (trapezoidal ROC). Rows are sorted once;
    per resample, positive and negative weight is summed per tied-score group.
    """

    def __init__(self, y: np.ndarray, prob: np.ndarray) -> None:
        order = np.argsort(prob, kind="mergesort")
        sorted_prob = prob[order]
        self.order = order
        self.pos = y[order].astype(np.float64)
        self.neg = 1.0 - self.pos
        self.starts = np.flatnonzero(np.r_[True, sorted_prob[1:] != sorted_prob[:-1]])

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        w = counts[:, self.order]
        pos_g = np.add.reduceat(w * self.pos, self.starts, axis=1)
        neg_g = np.add.reduceat(w * self.neg, self.starts, axis=1)
        neg_below = np.cumsum(neg_g, axis=1) - neg_g
        num = (pos_g * (neg_below + 0.5 * neg_g)).sum(axis=1)
        den = pos_g.sum(axis=1) * neg_g.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def bootstrap_ci(
    y: Any,
    prob: Any,
    *,
    metrics: Sequence[str] = ("accuracy", "auc", "nll"),
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    threshold: float = 0.5,
) -> pd.DataFrame:
    """Percentile bootstrap confidence intervals for metrics of one model.

    Rows are resampled with replacement ``n_boot`` times. Replicates are vectorised (see the
    module docstring), so 1000 resamples of 30k rows take about a second. Resamples that lack
    a class are skipped for ``auc``, ``balanced_accuracy``, ``sensitivity`` and
    ``specificity``; how many were skipped is reported.

    Args:
        y: True labels, 0 or 1, shape (n,).
        prob: Predicted probability of class 1, shape (n,).
        metrics: Names from :data:`BOOTSTRAP_METRICS`.
        n_boot: Number of resamples.
        alpha: Two-sided level; the interval covers ``1 - alpha``.
        seed: Seed of the numpy generator that draws the resamples.
        threshold: Decision threshold for the accuracy-type metrics.

    Returns:
        One row per metric with columns ``metric``, ``value`` (on the full data, from
        :func:`binary_metrics`), ``ci_low``, ``ci_high``, ``n_boot`` (resamples used) and
        ``n_skipped`` (resamples skipped because a class was missing).

    Raises:
        ValueError: On invalid inputs (as :func:`binary_metrics`), unknown metric names,
            ``n_boot < 1`` or ``alpha`` outside (0, 1).
    """
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in metrics if m not in BOOTSTRAP_METRICS]
    if unknown or not metrics:
        raise InputError(f"unknown metric(s) {unknown}; choose from {', '.join(BOOTSTRAP_METRICS)}")
    _check_boot_args(n_boot, alpha)
    full = binary_metrics(y, prob, threshold)
    y_arr = _as_labels(y)
    p = _as_probs(prob, y_arr.size)
    n = y_arr.size
    pred = _predict(p, threshold)
    correct = (pred == y_arr).astype(np.float64)
    tp_vec = (correct * y_arr).astype(np.float64)
    tn_vec = (correct * (1 - y_arr)).astype(np.float64)
    nll_vec = _per_sample_nll(y_arr, p)
    auc_fn = _WeightedAUC(y_arr, p) if "auc" in metrics else None

    reps: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    rng = np.random.default_rng(seed)
    for counts in _bootstrap_counts(rng, n, int(n_boot)):
        n_pos = counts @ y_arr.astype(np.float64)
        sens = _ratio(counts @ tp_vec, n_pos)
        spec = _ratio(counts @ tn_vec, n - n_pos)
        for m in metrics:
            if m == "accuracy":
                vals = counts @ correct / n
            elif m == "nll":
                vals = counts @ nll_vec / n
            elif m == "sensitivity":
                vals = sens
            elif m == "specificity":
                vals = spec
            elif m == "balanced_accuracy":
                vals = (sens + spec) / 2.0
            else:
                vals = auc_fn(counts)
            reps[m].append(vals)

    rows = []
    for m in metrics:
        vals = np.concatenate(reps[m])
        ok = vals[~np.isnan(vals)]
        lo, hi = _percentile_ci(ok, alpha)
        rows.append(
            {
                "metric": m,
                "value": full[m],
                "ci_low": lo,
                "ci_high": hi,
                "n_boot": int(ok.size),
                "n_skipped": int(vals.size - ok.size),
            }
        )
    return pd.DataFrame(
        rows, columns=["metric", "value", "ci_low", "ci_high", "n_boot", "n_skipped"]
    )


def paired_bootstrap_auc(
    y: Any,
    prob_a: Any,
    prob_b: Any,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Paired percentile bootstrap of the AUC difference ``AUC(a) - AUC(b)``.

    Both models are scored on the same resamples, so the correlation between them (same
    patches) is respected. Resamples lacking a class are skipped.

    Args:
        y: True labels, 0 or 1, shape (n,).
        prob_a: Probabilities of class 1 from model a.
        prob_b: Probabilities of class 1 from model b.
        n_boot: Number of resamples.
        seed: Seed of the numpy generator that draws the resamples.
        alpha: Two-sided level; the interval covers ``1 - alpha``.

    Returns:
        ``auc_a``, ``auc_b``, ``delta`` (on the full data), ``ci_low``/``ci_high`` (percentile
        interval of the delta), ``se`` (bootstrap standard deviation of the delta),
        ``p_value`` (two-sided: ``2 * min(P(delta* <= 0), P(delta* >= 0))`` with the
        ``(k + 1) / (B + 1)`` correction so it is never 0, capped at 1), ``n_boot`` (resamples
        used) and ``n_skipped``.

    Raises:
        ValueError: On invalid inputs (see :func:`binary_metrics`).
    """
    _check_boot_args(n_boot, alpha)
    y_arr = _as_labels(y)
    pa = _as_probs(prob_a, y_arr.size, "prob_a")
    pb = _as_probs(prob_b, y_arr.size, "prob_b")
    _require_both_classes(y_arr)
    auc_a = float(roc_auc_score(y_arr, pa))
    auc_b = float(roc_auc_score(y_arr, pb))
    fa, fb = _WeightedAUC(y_arr, pa), _WeightedAUC(y_arr, pb)
    rng = np.random.default_rng(seed)
    deltas = np.concatenate(
        [fa(c) - fb(c) for c in _bootstrap_counts(rng, y_arr.size, int(n_boot))]
    )
    ok = deltas[~np.isnan(deltas)]
    lo, hi = _percentile_ci(ok, alpha)
    if ok.size:
        b = ok.size
        tail = min((np.sum(ok <= 0) + 1) / (b + 1), (np.sum(ok >= 0) + 1) / (b + 1))
        p_value = float(min(1.0, 2.0 * tail))
        se = float(ok.std(ddof=1)) if b > 1 else float("nan")
    else:
        p_value, se = float("nan"), float("nan")
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "delta": auc_a - auc_b,
        "ci_low": lo,
        "ci_high": hi,
        "se": se,
        "p_value": p_value,
        "n_boot": int(ok.size),
        "n_skipped": int(deltas.size - ok.size),
    }


# --------------------------------------------------------------------------- tests


def _delong_components(y: np.ndarray, probs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Fast DeLong (Sun & Xu 2014): AUCs and their covariance matrix for k score vectors."""
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    scores = np.vstack(probs)
    x, z = scores[:, pos], scores[:, ~pos]
    k = scores.shape[0]
    tx = np.vstack([stats.rankdata(x[i]) for i in range(k)])
    ty = np.vstack([stats.rankdata(z[i]) for i in range(k)])
    tz = np.vstack([stats.rankdata(np.concatenate([x[i], z[i]])) for i in range(k)])
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n
    v10 = 1.0 - (tz[:, m:] - ty) / m
    sx = np.atleast_2d(np.cov(v01)) if m > 1 else np.zeros((k, k))
    sy = np.atleast_2d(np.cov(v10)) if n > 1 else np.zeros((k, k))
    return aucs, sx / m + sy / n


def delong_test(y: Any, prob_a: Any, prob_b: Any, *, alpha: float = 0.05) -> dict[str, float]:
    """DeLong test for two correlated ROC AUCs on the same samples.

    Uses the fast algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21(11)) with
    mid-ranks from :func:`scipy.stats.rankdata` and the normal distribution from
    :mod:`scipy.stats`.

    Args:
        y: True labels, 0 or 1, shape (n,).
        prob_a: Probabilities of class 1 from model a.
        prob_b: Probabilities of class 1 from model b.
        alpha: Two-sided level of the Wald interval for the delta.

    Returns:
        ``auc_a``, ``auc_b``, ``delta`` (``auc_a - auc_b``), ``se`` (DeLong standard error of
        the delta), ``z``, ``p_value`` (two-sided) and ``ci_low``/``ci_high``
        (``delta +/- z_{1-alpha/2} * se``). Identical predictions give delta 0, se 0 and
        p_value 1.

    Raises:
        ValueError: On invalid inputs (see :func:`binary_metrics`).
    """
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must be in (0, 1); got {alpha!r}")
    y_arr = _as_labels(y)
    pa = _as_probs(prob_a, y_arr.size, "prob_a")
    pb = _as_probs(prob_b, y_arr.size, "prob_b")
    _require_both_classes(y_arr)
    _, cov = _delong_components(y_arr, [pa, pb])
    auc_a = float(roc_auc_score(y_arr, pa))
    auc_b = float(roc_auc_score(y_arr, pb))
    delta = auc_a - auc_b
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    if se < 1e-12:
        se = 0.0
        z = 0.0 if abs(delta) < 1e-12 else float(np.copysign(np.inf, delta))
    else:
        z = delta / se
    p_value = float(2.0 * stats.norm.sf(abs(z)))
    half = float(stats.norm.ppf(1.0 - alpha / 2.0)) * se
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "delta": delta,
        "se": se,
        "z": float(z),
        "p_value": min(p_value, 1.0),
        "ci_low": delta - half,
        "ci_high": delta + half,
    }


def mcnemar_test(y: Any, pred_a: Any, pred_b: Any) -> dict[str, Any]:
    """McNemar test of paired accuracies (which patches each model gets right).

    Uses the exact binomial test (:func:`scipy.stats.binomtest`, p = 0.5 on the discordant
    pairs) when ``b + c < 25``, else the chi-square statistic with continuity correction,
    ``max(|b - c| - 1, 0)^2 / (b + c)``, on 1 degree of freedom.

    Args:
        y: True labels, 0 or 1, shape (n,).
        pred_a: Hard predictions (0/1) of model a.
        pred_b: Hard predictions (0/1) of model b.

    Returns:
        ``b`` (a right, b wrong), ``c`` (a wrong, b right), ``n_discordant`` (``b + c``),
        ``statistic`` (``min(b, c)`` for the exact test, the chi-square value otherwise),
        ``p_value`` (1.0 when there are no discordant pairs) and ``method`` (``"exact"`` or
        ``"chi2"``).

    Raises:
        ValueError: If lengths differ or any array holds values other than 0/1.
    """
    y_arr = _as_labels(y)
    a = _as_labels(pred_a, "pred_a")
    b_arr = _as_labels(pred_b, "pred_b")
    for name, arr in (("pred_a", a), ("pred_b", b_arr)):
        if arr.size != y_arr.size:
            raise InputError(
                f"length mismatch: y has {y_arr.size} values but {name} has {arr.size}"
            )
    right_a, right_b = a == y_arr, b_arr == y_arr
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    n_disc = b + c
    if n_disc == 0:
        method, statistic, p_value = "exact", 0.0, 1.0
    elif n_disc < 25:
        method = "exact"
        statistic = float(min(b, c))
        p_value = float(stats.binomtest(b, n_disc, 0.5, alternative="two-sided").pvalue)
    else:
        method = "chi2"
        statistic = max(abs(b - c) - 1.0, 0.0) ** 2 / n_disc
        p_value = float(stats.chi2.sf(statistic, df=1))
    return {
        "b": b,
        "c": c,
        "n_discordant": n_disc,
        "statistic": float(statistic),
        "p_value": min(p_value, 1.0),
        "method": method,
    }


# --------------------------------------------------------------------------- study comparison


def study_family(arch: str) -> str:
    """Map an architecture name to the study's model family.

    Args:
        arch: Architecture name such as ``"densenet121"``, ``"densenet169"``, ``"resnet34"``
            or ``"ResNet-50"`` (case-insensitive).

    Returns:
        ``"DenseNet"`` or ``"ResNet"``.

    Raises:
        ValueError: If ``arch`` is neither a DenseNet nor a ResNet.
    """
    match = _FAMILY_RE.match(str(arch).strip().lower())
    if match is None:
        raise InputError(
            f"unknown architecture {arch!r}: expected a DenseNet (e.g. densenet121) or a "
            "ResNet (e.g. resnet34)"
        )
    return _FAMILIES[match.group(1)]


def _comparison_row(
    rec: pd.Series, run: Any, family: str, reference: str, metric: str, study: float
) -> dict[str, Any]:
    """One row of :func:`comparison_table`; a metric the run lacks is NaN."""
    value = float(rec[metric]) if metric in rec.index else float("nan")
    ci_low = ci_high = float("nan")
    if metric == "test_auc":
        if "test_auc_ci_low" in rec.index:
            ci_low = float(rec["test_auc_ci_low"])
        if "test_auc_ci_high" in rec.index:
            ci_high = float(rec["test_auc_ci_high"])
    return {
        "run": run,
        "arch": rec["arch"],
        "family": family,
        "reference": reference,
        "metric": metric,
        "measured": value,
        "measured_ci_low": ci_low,
        "measured_ci_high": ci_high,
        "study": study,
        "delta": value - study,
    }


def comparison_table(measured: pd.DataFrame) -> pd.DataFrame:
    """Compare measured runs with the study's Table 1 and with Veeling et al. (2018).

    Args:
        measured: One row per run with columns ``arch``, ``train_accuracy``,
            ``valid_accuracy``, ``test_accuracy`` and ``test_auc``; optional ``test_nll``,
            ``test_auc_ci_low``/``test_auc_ci_high`` and ``run`` (a run label; the row index
            is used when absent).

    Returns:
        A long table with columns ``run``, ``arch``, ``family``, ``reference``
        (:data:`REFERENCE_ZHAO` or :data:`REFERENCE_VEELING`), ``metric``, ``measured``,
        ``measured_ci_low``/``measured_ci_high`` (filled for ``test_auc`` when given),
        ``study`` (the published value, NaN when the reference does not report it) and
        ``delta`` (``measured - study``, NaN when either is missing). Per run: one Zhao row
        for each Table 1 metric (plus ``test_nll`` when measured, with NaN study), then one
        Veeling row for ``test_accuracy``, ``test_auc`` and ``test_nll``.

    Raises:
        ValueError: If required columns are missing or an ``arch`` is not DenseNet/ResNet.
    """
    required = ("arch", *_TABLE1_METRICS)
    missing = [c for c in required if c not in measured.columns]
    if missing:
        raise InputError(
            f"measured is missing column(s) {missing}; required: {', '.join(required)}"
        )
    has_nll = "test_nll" in measured.columns
    zhao_metrics = (*_TABLE1_METRICS, "test_nll") if has_nll else _TABLE1_METRICS
    columns = [
        "run", "arch", "family", "reference", "metric", "measured",
        "measured_ci_low", "measured_ci_high", "study", "delta",
    ]  # fmt: skip
    rows = []
    for idx, rec in measured.iterrows():
        family = study_family(rec["arch"])
        run = rec["run"] if "run" in measured.columns else idx
        for metric in zhao_metrics:
            study = (
                float(STUDY_TABLE1.loc[family, metric])
                if metric in STUDY_TABLE1.columns
                else float("nan")
            )
            rows.append(_comparison_row(rec, run, family, REFERENCE_ZHAO, metric, study))
        for metric in _VEELING_METRICS:
            study = float(VEELING_2018[metric])
            rows.append(_comparison_row(rec, run, family, REFERENCE_VEELING, metric, study))
    return pd.DataFrame(rows, columns=columns)


def _fmt_p(p: float) -> str:
    if np.isnan(p):
        return "p = n/a"
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.4f}"


def verdict(
    a_name: str,
    b_name: str,
    y: Any,
    prob_a: Any,
    prob_b: Any,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> str:
    """One generated paragraph comparing two models on the same test set.

    States which model has the higher test AUC and by how much, the 95% paired-bootstrap
    interval of the difference, the DeLong p-value, and the McNemar p-value for accuracy at
    threshold 0.5. Says "no significant difference" when the interval contains 0.

    Args:
        a_name: Display name of model a (e.g. ``"DenseNet-121"``).
        b_name: Display name of model b.
        y: True labels, 0 or 1, shape (n,).
        prob_a: Probabilities of class 1 from model a.
        prob_b: Probabilities of class 1 from model b.
        n_boot: Resamples for the paired bootstrap.
        seed: Seed of the bootstrap.

    Returns:
        The sentence(s), numbers rounded to 4 decimals.

    Raises:
        ValueError: On invalid inputs (see :func:`binary_metrics`).
    """
    boot = paired_bootstrap_auc(y, prob_a, prob_b, n_boot=n_boot, seed=seed)
    dl = delong_test(y, prob_a, prob_b)
    y_arr = _as_labels(y)
    pred_a = _predict(_as_probs(prob_a, y_arr.size, "prob_a"), 0.5)
    pred_b = _predict(_as_probs(prob_b, y_arr.size, "prob_b"), 0.5)
    mc = mcnemar_test(y_arr, pred_a, pred_b)
    acc_a, acc_b = float(np.mean(pred_a == y_arr)), float(np.mean(pred_b == y_arr))

    delta, lo, hi = boot["delta"], boot["ci_low"], boot["ci_high"]
    if delta == 0:
        head = (
            f"{a_name} and {b_name} have the same test AUC ({boot['auc_a']:.4f}; "
            f"95% paired-bootstrap CI of the difference {lo:.4f} to {hi:.4f}"
        )
    else:
        if delta > 0:
            win, lose, auc_w, auc_l = a_name, b_name, boot["auc_a"], boot["auc_b"]
        else:
            win, lose, auc_w, auc_l = b_name, a_name, boot["auc_b"], boot["auc_a"]
            delta, lo, hi = -delta, -hi, -lo
        head = (
            f"{win} has the higher test AUC than {lose} ({auc_w:.4f} vs {auc_l:.4f}, "
            f"difference {delta:.4f}; 95% paired-bootstrap CI {lo:.4f} to {hi:.4f}"
        )
    head += f"; DeLong {_fmt_p(dl['p_value'])})."
    if lo <= 0.0 <= hi:
        sig = "There is no significant difference in AUC (the 95% interval contains 0)."
    else:
        sig = "The AUC difference is significant (the 95% interval excludes 0)."
    acc = (
        f"Accuracy at threshold 0.5: {a_name} {acc_a:.4f}, {b_name} {acc_b:.4f} "
        f"(McNemar {mc['method']} {_fmt_p(mc['p_value'])})."
    )
    return f"{head} {sig} {acc}"


# --------------------------------------------------------------------------- calibration

RELIABILITY_COLUMNS: tuple[str, ...] = (
    "bin", "bin_low", "bin_high", "count", "positives", "mean_prob", "observed", "ci_low",
    "ci_high", "gap",
)
"""Columns of :func:`reliability_table`."""


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise InputError(f"n_bins must be a positive integer; got {n_bins!r}")
    return int(n_bins)


def calibration_bins(prob: Any, n_bins: int = 10) -> np.ndarray:
    """Equal-width bin of each probability: bin k (0-based) is ``(k/M, (k+1)/M]``.

    Bins are closed on the right, as in Guo et al. (2017), and the first also holds 0, so
    ``prob = 0.3`` with ten bins falls in ``(0.2, 0.3]``. Edges are ``k / M`` rounded once
    (not accumulated steps), so a probability equal to an edge is binned exactly.

    Args:
        prob: Probabilities in [0, 1], shape (n,).
        n_bins: Number of bins M.

    Returns:
        int64 bin indices in ``0..M-1``, shape (n,).
    """
    n_bins = _check_n_bins(n_bins)
    p = _as_probs(prob, np.asarray(prob).size)
    edges = np.arange(n_bins + 1) / n_bins
    return np.clip(np.searchsorted(edges, p, side="left") - 1, 0, n_bins - 1)


def reliability_table(y: Any, prob: Any, *, n_bins: int = 10, alpha: float = 0.05) -> pd.DataFrame:
    """Reliability (calibration) table over equal-width probability bins.

    Args:
        y: True labels, 0 or 1, shape (n,).
        prob: Predicted probability of class 1, shape (n,).
        n_bins: Number of equal-width bins (see :func:`calibration_bins`).
        alpha: Two-sided level of the Wilson interval of each bin's observed fraction.

    Returns:
        One row per bin, empty bins included, with columns :data:`RELIABILITY_COLUMNS`:
        ``bin`` (0-based), ``bin_low``/``bin_high`` (edges), ``count``, ``positives``,
        ``mean_prob`` (mean predicted probability), ``observed`` (fraction of label 1),
        ``ci_low``/``ci_high`` (Wilson score interval of ``observed``, from
        :meth:`scipy.stats.binomtest`'s ``proportion_ci``) and ``gap``
        (``observed - mean_prob``: positive where the model is under-confident about
        tumour). Statistics of an empty bin are NaN.

    Raises:
        ValueError: On invalid inputs (as :func:`binary_metrics`, except that one class
            is allowed), ``n_bins < 1`` or ``alpha`` outside (0, 1).
    """
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must be in (0, 1); got {alpha!r}")
    y_arr = _as_labels(y)
    p = _as_probs(prob, y_arr.size)
    n_bins = _check_n_bins(n_bins)
    bins = calibration_bins(p, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    positives = np.bincount(bins, weights=y_arr, minlength=n_bins).round().astype(np.int64)
    prob_sum = np.bincount(bins, weights=p, minlength=n_bins)
    rows = []
    for k in range(n_bins):
        n_k, pos_k = int(count[k]), int(positives[k])
        mean_prob = observed = lo = hi = float("nan")
        if n_k:
            mean_prob, observed = prob_sum[k] / n_k, pos_k / n_k
            ci = stats.binomtest(pos_k, n_k).proportion_ci(1.0 - alpha, method="wilson")
            lo, hi = float(ci.low), float(ci.high)
        rows.append({
            "bin": k, "bin_low": k / n_bins, "bin_high": (k + 1) / n_bins, "count": n_k,
            "positives": pos_k, "mean_prob": float(mean_prob), "observed": float(observed),
            "ci_low": lo, "ci_high": hi, "gap": float(observed - mean_prob),
        })
    return pd.DataFrame(rows, columns=list(RELIABILITY_COLUMNS))


def _ece_terms(y: np.ndarray, p: np.ndarray, bins: np.ndarray, n_bins: int) -> np.ndarray:
    """(n, M) matrix whose column k holds ``y - p`` for rows of bin k, else 0.

    ``ECE = sum_k n_k / n * |observed_k - mean_prob_k| = sum_k |sum_{i in k} (y_i - p_i)| / n``,
    so a (weighted) row sum per bin is all the ECE of a resample needs.
    """
    terms = np.zeros((y.size, n_bins))
    terms[np.arange(y.size), bins] = y - p
    return terms


def expected_calibration_error(y: Any, prob: Any, *, n_bins: int = 10) -> float:
    """Expected calibration error over equal-width bins (Guo et al. 2017; Naeini et al. 2015).

    ``ECE = sum_k (n_k / n) * |observed_k - mean_prob_k|`` over the bins of
    :func:`calibration_bins` (``(k/M, (k+1)/M]``, first bin closed at 0), where
    ``observed_k`` is the fraction of label 1 and ``mean_prob_k`` the mean predicted
    probability of class 1 in bin k; empty bins contribute nothing.

    Args:
        y: True labels, 0 or 1, shape (n,).
        prob: Predicted probability of class 1, shape (n,).
        n_bins: Number of bins M.

    Returns:
        The ECE, in [0, 1].

    Raises:
        ValueError: On invalid inputs (one class is allowed) or ``n_bins < 1``.
    """
    y_arr = _as_labels(y)
    p = _as_probs(prob, y_arr.size)
    n_bins = _check_n_bins(n_bins)
    sums = _ece_terms(y_arr, p, calibration_bins(p, n_bins), n_bins).sum(axis=0)
    return float(np.abs(sums).sum() / y_arr.size)


def calibration_metrics(
    y: Any, prob: Any, *, n_bins: int = 10, n_boot: int = 1000, alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """ECE and NLL with percentile bootstrap intervals, plus the Brier score.

    The ECE and NLL replicates come from the same resamples (the draws of
    :func:`bootstrap_ci` with the same ``seed``), so their intervals are paired.

    Args:
        y: True labels, 0 or 1, shape (n,).
        prob: Predicted probability of class 1, shape (n,).
        n_bins: Bins of the ECE (see :func:`expected_calibration_error`).
        n_boot: Number of resamples.
        alpha: Two-sided level; intervals cover ``1 - alpha``.
        seed: Seed of the numpy generator that draws the resamples.

    Returns:
        ``n``, ``n_bins``, ``ece``, ``ece_ci_low``, ``ece_ci_high``, ``nll`` (as
        :func:`binary_metrics`: natural log, clipped at :data:`NLL_EPS`), ``nll_ci_low``,
        ``nll_ci_high`` and ``brier`` (mean squared error of the probability).

    Raises:
        ValueError: On invalid inputs (as :func:`binary_metrics`: both classes are
            needed), ``n_bins < 1``, ``n_boot < 1`` or ``alpha`` outside (0, 1).
    """
    _check_boot_args(n_boot, alpha)
    nll = bootstrap_ci(y, prob, metrics=["nll"], n_boot=n_boot, alpha=alpha, seed=seed).iloc[0]
    y_arr = _as_labels(y)
    p = _as_probs(prob, y_arr.size)
    n_bins = _check_n_bins(n_bins)
    terms = _ece_terms(y_arr, p, calibration_bins(p, n_bins), n_bins)
    rng = np.random.default_rng(seed)
    reps = [np.abs(counts @ terms).sum(axis=1) / y_arr.size
            for counts in _bootstrap_counts(rng, y_arr.size, int(n_boot))]
    lo, hi = _percentile_ci(np.concatenate(reps), alpha)
    return {
        "n": int(y_arr.size),
        "n_bins": n_bins,
        "ece": float(np.abs(terms.sum(axis=0)).sum() / y_arr.size),
        "ece_ci_low": lo,
        "ece_ci_high": hi,
        "nll": float(nll["value"]),
        "nll_ci_low": float(nll["ci_low"]),
        "nll_ci_high": float(nll["ci_high"]),
        "brier": float(np.mean((p - y_arr) ** 2)),
    }


# --------------------------------------------------------------------------- operating points

OPERATING_TARGETS: tuple[tuple[str, float], ...] = (
    ("specificity", 0.90),
    ("specificity", 0.95),
    ("sensitivity", 0.90),
    ("sensitivity", 0.95),
)
"""Default operating points of :func:`operating_points`: (fixed metric, target)."""

OPERATING_COLUMNS: tuple[str, ...] = (
    "fixed", "target", "estimated", "threshold", "sensitivity", "specificity", "value",
    "ci_low", "ci_high", "n_boot", "n_skipped",
)
"""Columns of :func:`operating_points`."""


class _WeightedROC:
    """Every ROC point of one score vector under many row weightings (bootstrap counts).

    Point 0 is the threshold ``inf`` (nothing predicted positive); point g >= 1 is the
    g-th distinct score from the top, predicting class 1 where ``prob >= threshold``.
    """

    def __init__(self, y: np.ndarray, prob: np.ndarray) -> None:
        order = np.argsort(-prob, kind="mergesort")
        sorted_prob = prob[order]
        self.order = order
        self.pos = y[order].astype(np.float64)
        self.neg = 1.0 - self.pos
        self.starts = np.flatnonzero(np.r_[True, sorted_prob[1:] != sorted_prob[:-1]])
        self.thresholds = np.r_[np.inf, sorted_prob[self.starts]]

    def __call__(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sensitivity and specificity at every point, shape (resamples, points)."""
        w = counts[:, self.order]
        tp = np.cumsum(np.add.reduceat(w * self.pos, self.starts, axis=1), axis=1)
        fp = np.cumsum(np.add.reduceat(w * self.neg, self.starts, axis=1), axis=1)
        zero = np.zeros((w.shape[0], 1))
        tp, fp = np.hstack([zero, tp]), np.hstack([zero, fp])
        n_pos, n_neg = tp[:, -1:], fp[:, -1:]
        return _ratio(tp, n_pos), _ratio(n_neg - fp, n_neg)


def _pick_point(sens: np.ndarray, spec: np.ndarray, fixed: str, target: float) -> np.ndarray:
    """Index of the chosen ROC point in each row (see :func:`operating_points`).

    Along the points sensitivity never falls and specificity never rises, so the points
    with specificity >= target are a prefix and those with sensitivity >= target a suffix.
    """
    if fixed == "specificity":
        last = (spec >= target).sum(axis=1) - 1  # point 0 always qualifies (spec 1)
        best = np.take_along_axis(sens, last[:, None], axis=1)
        return np.argmax(sens == best, axis=1)  # the first such point has the highest spec
    first = sens.shape[1] - (sens >= target).sum(axis=1)  # the last point has sens 1
    best = np.take_along_axis(spec, first[:, None], axis=1)
    return sens.shape[1] - 1 - np.argmax((spec == best)[:, ::-1], axis=1)


def operating_points(
    y: Any,
    prob: Any,
    *,
    targets: Sequence[tuple[str, float]] = OPERATING_TARGETS,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Sensitivity at fixed specificity and specificity at fixed sensitivity, with intervals.

    Class 1 is predicted where ``prob >= threshold``; the candidate thresholds are the
    distinct predicted probabilities plus ``inf`` (nothing positive), i.e. every point of
    the empirical ROC curve (``sklearn.metrics.roc_curve`` with
    ``drop_intermediate=False``). For ``("specificity", 0.95)`` the chosen point is the
    one with the highest sensitivity among those whose specificity (``tn / negatives``)
    is >= 0.95, ties going to the higher specificity; for ``("sensitivity", 0.95)`` the
    highest specificity among points with sensitivity >= 0.95, ties going to the higher
    sensitivity. The threshold reported is that point's.

    Intervals are percentile bootstrap intervals of the estimated metric, the whole
    choice (threshold included) being redone on each resample, as pROC's ``ci.coords``
    does. Resamples come from the same draws as :func:`bootstrap_ci` with the same
    ``seed``; those without both classes are skipped and counted.

    Args:
        y: True labels, 0 or 1, shape (n,).
        prob: Predicted probability of class 1, shape (n,).
        targets: ``(fixed metric, target)`` pairs; the metric is ``"specificity"`` or
            ``"sensitivity"``, the target in (0, 1].
        n_boot: Number of resamples.
        alpha: Two-sided level; intervals cover ``1 - alpha``.
        seed: Seed of the numpy generator that draws the resamples.

    Returns:
        One row per target, columns :data:`OPERATING_COLUMNS`: ``fixed``, ``target``,
        ``estimated`` (the other metric), ``threshold``, ``sensitivity`` and
        ``specificity`` at that threshold, ``value`` (the estimated metric),
        ``ci_low``/``ci_high``, ``n_boot`` (resamples used) and ``n_skipped``.

    Raises:
        ValueError: On invalid inputs (as :func:`binary_metrics`), an unknown fixed
            metric, a target outside (0, 1], ``n_boot < 1`` or ``alpha`` outside (0, 1).
    """
    _check_boot_args(n_boot, alpha)
    y_arr = _as_labels(y)
    p = _as_probs(prob, y_arr.size)
    _require_both_classes(y_arr)
    targets = [(str(f), float(t)) for f, t in targets]
    for fixed, target in targets:
        if fixed not in ("specificity", "sensitivity"):
            raise InputError(
                f"targets: fixed metric must be 'specificity' or 'sensitivity'; got {fixed!r}"
            )
        if not 0.0 < target <= 1.0:
            raise InputError(f"targets: {fixed} target must be in (0, 1]; got {target}")
    roc = _WeightedROC(y_arr, p)
    sens, spec = roc(np.ones((1, y_arr.size)))
    reps: dict[int, list[np.ndarray]] = {i: [] for i in range(len(targets))}
    rng = np.random.default_rng(seed)
    for counts in _bootstrap_counts(rng, y_arr.size, int(n_boot)):
        b_sens, b_spec = roc(counts)
        both = ~np.isnan(b_sens[:, 0]) & ~np.isnan(b_spec[:, 0])
        for i, (fixed, target) in enumerate(targets):
            vals = np.full(counts.shape[0], np.nan)
            if both.any():
                s, c = b_sens[both], b_spec[both]
                idx = _pick_point(s, c, fixed, target)
                free = c if fixed == "sensitivity" else s
                vals[both] = np.take_along_axis(free, idx[:, None], axis=1)[:, 0]
            reps[i].append(vals)
    rows = []
    for i, (fixed, target) in enumerate(targets):
        k = int(_pick_point(sens, spec, fixed, target)[0])
        estimated = "sensitivity" if fixed == "specificity" else "specificity"
        vals = np.concatenate(reps[i])
        ok = vals[~np.isnan(vals)]
        lo, hi = _percentile_ci(ok, alpha)
        point = {"sensitivity": float(sens[0, k]), "specificity": float(spec[0, k])}
        rows.append({
            "fixed": fixed, "target": target, "estimated": estimated,
            "threshold": float(roc.thresholds[k]), **point, "value": point[estimated],
            "ci_low": lo, "ci_high": hi, "n_boot": int(ok.size),
            "n_skipped": int(vals.size - ok.size),
        })
    return pd.DataFrame(rows, columns=list(OPERATING_COLUMNS))


# --------------------------------------------------------------------------- the study's claims

CLAIM_COLUMNS = ("claim", "study", "measured", "ci_low", "ci_high", "p_value", "finding")
"""Columns of :func:`study_claims`."""


def _paired_accuracy_difference(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray,
                                n_boot: int, seed: int, alpha: float = 0.05) -> dict:
    diff = (pred_a == y).astype(np.float64) - (pred_b == y).astype(np.float64)
    rng = np.random.default_rng(seed)
    deltas = np.array([diff[rng.integers(0, y.size, y.size)].mean() for _ in range(n_boot)])
    lo, hi = _percentile_ci(deltas, alpha)
    return {"delta": float(diff.mean()), "ci_low": lo, "ci_high": hi}


def _difference_finding(delta: float, lo: float, hi: float, study_delta: float) -> str:
    same_direction = np.sign(delta) == np.sign(study_delta)
    if lo > 0 or hi < 0:
        return ("supported: the difference has the study's sign and its 95% interval "
                "excludes 0" if same_direction else
                "contradicted: the 95% interval excludes 0 with the opposite sign")
    return ("not shown: same direction as the study, but the 95% interval contains 0"
            if same_direction else "not shown: opposite direction, 95% interval contains 0")


def _value_finding(study: float, lo: float, hi: float) -> str:
    if lo <= study <= hi:
        return "consistent: the study's value lies in the 95% interval"
    return ("lower here: the whole 95% interval lies below the study's value" if hi < study
            else "higher here: the whole 95% interval lies above the study's value")


def study_claims(y: Any, prob_densenet: Any, prob_resnet: Any, *, n_boot: int = 1000,
                 seed: int = 0, threshold: float = 0.5) -> pd.DataFrame:
    """The study's test-split claims, one by one, against a DenseNet and a ResNet here.

    Claims (Zhao, Table 1): DenseNet above ResNet in test accuracy (0.8437 vs 0.8249) and
    in test AUC (0.96 vs 0.93); each model's test accuracy and AUC. A difference is
    "supported" when its 95% paired-bootstrap interval excludes 0 with the study's sign;
    a value is "consistent" when the study's number lies in its 95% bootstrap interval.
    The p-values are McNemar's (accuracy) and DeLong's (AUC).

    Args:
        y: Test labels.
        prob_densenet: The DenseNet's probabilities of class 1.
        prob_resnet: The ResNet's.
        n_boot: Bootstrap resamples.
        seed: Seed of the resampling.
        threshold: Decision threshold for accuracy.

    Returns:
        One row per claim, columns :data:`CLAIM_COLUMNS`.
    """
    y_arr = _as_labels(y)
    pa = _as_probs(prob_densenet, y_arr.size, "prob_densenet")
    pb = _as_probs(prob_resnet, y_arr.size, "prob_resnet")
    _require_both_classes(y_arr)
    _check_boot_args(n_boot, 0.05)
    threshold = _check_threshold(threshold)
    pred_a, pred_b = _predict(pa, threshold), _predict(pb, threshold)
    study = STUDY_TABLE1
    rows = []
    acc = _paired_accuracy_difference(y_arr, pred_a, pred_b, n_boot, seed)
    study_acc = float(study.loc["DenseNet", "test_accuracy"] - study.loc["ResNet", "test_accuracy"])
    rows.append({"claim": "DenseNet has a higher test accuracy than ResNet (difference)",
                 "study": study_acc, "measured": acc["delta"], "ci_low": acc["ci_low"],
                 "ci_high": acc["ci_high"],
                 "p_value": mcnemar_test(y_arr, pred_a, pred_b)["p_value"],
                 "finding": _difference_finding(acc["delta"], acc["ci_low"], acc["ci_high"],
                                                study_acc)})
    auc = paired_bootstrap_auc(y_arr, pa, pb, n_boot=n_boot, seed=seed)
    study_auc = float(study.loc["DenseNet", "test_auc"] - study.loc["ResNet", "test_auc"])
    rows.append({"claim": "DenseNet has a higher test AUC than ResNet (difference)",
                 "study": study_auc, "measured": auc["delta"], "ci_low": auc["ci_low"],
                 "ci_high": auc["ci_high"], "p_value": delong_test(y_arr, pa, pb)["p_value"],
                 "finding": _difference_finding(auc["delta"], auc["ci_low"], auc["ci_high"],
                                                study_auc)})
    for family, prob in (("DenseNet", pa), ("ResNet", pb)):
        cis = bootstrap_ci(y_arr, prob, metrics=("accuracy", "auc"), n_boot=n_boot,
                           seed=seed, threshold=threshold).set_index("metric")
        values = binary_metrics(y_arr, prob, threshold)
        for metric, label in (("accuracy", "test accuracy"), ("auc", "test AUC")):
            reference = float(study.loc[family, f"test_{metric}"])
            lo, hi = float(cis.loc[metric, "ci_low"]), float(cis.loc[metric, "ci_high"])
            rows.append({"claim": f"{family} {label}", "study": reference,
                         "measured": float(values[metric]), "ci_low": lo, "ci_high": hi,
                         "p_value": float("nan"), "finding": _value_finding(reference, lo, hi)})
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))
