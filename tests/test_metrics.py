"""Tests for pcamlib.metrics: sklearn parity, validation, bootstrap, DeLong, McNemar, study."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    recall_score,
    roc_auc_score,
)

from pcamlib import metrics as M


def _data(n: int = 2000, seed: int = 0, sep: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    prob = np.clip(rng.normal(0.35 + sep * y, 0.2), 0.0, 1.0)
    return y, prob


def _two_models(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    shared = rng.normal(0, 0.15, n)
    a = np.clip(0.35 + 0.3 * y + shared + rng.normal(0, 0.1, n), 0, 1)
    b = np.clip(0.38 + 0.2 * y + shared + rng.normal(0, 0.1, n), 0, 1)
    return y, a, b


# --------------------------------------------------------------------------- binary_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_binary_metrics_match_sklearn(seed: int, threshold: float) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    prob = rng.random(500)
    pred = (prob >= threshold).astype(int)
    m = M.binary_metrics(y, prob, threshold=threshold)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, prob))
    assert m["nll"] == pytest.approx(log_loss(y, prob))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert (m["tn"], m["fp"], m["fn"], m["tp"], m["n"]) == (tn, fp, fn, tp, 500)
    assert all(type(v) in (float, int) for v in m.values())


def test_binary_metrics_threshold_is_inclusive_and_hand_checked() -> None:
    y = np.array([0, 0, 1, 1])
    prob = np.array([0.1, 0.5, 0.5, 0.9])
    m = M.binary_metrics(y, prob)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (1, 1, 0, 2)
    assert m["accuracy"] == 0.75
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.5
    assert m["auc"] == pytest.approx(0.875)  # 3.5 of 4 pairs ordered (one tie)


def test_binary_metrics_nll_is_finite_for_confident_mistakes() -> None:
    y = np.array([0, 1, 1, 0])
    prob = np.array([0.0, 1.0, 0.0, 0.2], dtype=np.float32)
    m = M.binary_metrics(y, prob)
    assert math.isfinite(m["nll"])
    assert m["nll"] == pytest.approx((-math.log(M.NLL_EPS) - math.log(0.8)) / 4, rel=1e-6)


def test_binary_metrics_accepts_bool_labels_and_lists() -> None:
    m = M.binary_metrics([True, False, True], [0.9, 0.2, 0.4])
    assert m["n"] == 3 and m["auc"] == 1.0


@pytest.mark.parametrize(
    ("y", "prob", "match"),
    [
        ([0, 1, 1], [0.1, 0.9], r"length mismatch: y has 3 values but prob has 2"),
        ([0, 1, 2], [0.1, 0.9, 0.5], r"only 0 and 1; 1 of 3 values are not \(e\.g\. 2\)"),
        ([0, 1, 1], [0.1, np.nan, 0.5], r"prob contains 1 NaN"),
        ([0, 1, 1], [-0.1, 0.9, 1.5], r"2 value\(s\) are outside \(min -0\.1, max 1\.5\)"),
        ([1, 1, 1, 1], [0.1, 0.9, 0.5, 0.3], r"only one class present in y: all 4 labels are 1"),
        ([0, 0], [0.1, 0.9], r"all 2 labels are 0; AUC is undefined"),
        ([], [], r"y is empty"),
        ([[0, 1]], [[0.1, 0.9]], r"y must be 1-D"),
        (["a", "b"], [0.1, 0.9], r"0/1 numbers"),
    ],
)
def test_binary_metrics_rejects_invalid_input(y: list, prob: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        M.binary_metrics(y, prob)


def test_binary_metrics_rejects_bad_threshold() -> None:
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        M.binary_metrics([0, 1], [0.2, 0.8], threshold=1.5)


# --------------------------------------------------------------------------- bootstrap


def test_weighted_auc_equals_sklearn_on_explicit_resample() -> None:
    y, prob = _data(600, seed=3)
    prob = np.round(prob, 2)  # many ties
    rng = np.random.default_rng(0)
    fn = M._WeightedAUC(y, prob)
    for _ in range(5):
        idx = rng.integers(0, y.size, y.size)
        counts = np.bincount(idx, minlength=y.size).astype(float)[None]
        assert fn(counts)[0] == pytest.approx(roc_auc_score(y[idx], prob[idx]), abs=1e-12)


def test_bootstrap_counts_are_resamples() -> None:
    chunks = list(M._bootstrap_counts(np.random.default_rng(0), 50, 7, max_cells=150))
    counts = np.vstack(chunks)
    assert counts.shape == (7, 50) and len(chunks) == 3
    assert (counts.sum(axis=1) == 50).all()


def test_bootstrap_ci_contains_estimate_and_has_tidy_columns() -> None:
    y, prob = _data(1500)
    df = M.bootstrap_ci(y, prob, metrics=M.BOOTSTRAP_METRICS, n_boot=300, seed=1)
    assert list(df.columns) == ["metric", "value", "ci_low", "ci_high", "n_boot", "n_skipped"]
    assert list(df["metric"]) == list(M.BOOTSTRAP_METRICS)
    full = M.binary_metrics(y, prob)
    for row in df.itertuples():
        assert row.value == pytest.approx(full[row.metric])
        assert row.ci_low < row.value < row.ci_high
        assert row.n_boot == 300 and row.n_skipped == 0


def test_bootstrap_ci_is_reproducible_and_seed_dependent() -> None:
    y, prob = _data(300)
    a = M.bootstrap_ci(y, prob, n_boot=100, seed=5)
    b = M.bootstrap_ci(y, prob, n_boot=100, seed=5)
    c = M.bootstrap_ci(y, prob, n_boot=100, seed=6)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["ci_low"], c["ci_low"])


def test_bootstrap_ci_narrows_with_n() -> None:
    def width(n: int) -> pd.Series:
        y, prob = _data(n, seed=2)
        df = M.bootstrap_ci(y, prob, n_boot=200).set_index("metric")
        return df["ci_high"] - df["ci_low"]

    small, large = width(200), width(5000)
    assert (large < small / 2).all()


def test_bootstrap_replicates_match_sklearn_with_sample_weight() -> None:
    y, prob = _data(400, seed=4)
    counts = next(M._bootstrap_counts(np.random.default_rng(0), y.size, 1))[0]
    pred = (prob >= 0.5).astype(int)
    correct = (pred == y).astype(float)
    assert counts @ correct / y.size == pytest.approx(accuracy_score(y, pred, sample_weight=counts))
    nll = M._per_sample_nll(y, prob)
    assert counts @ nll / y.size == pytest.approx(log_loss(y, prob, sample_weight=counts))


def test_bootstrap_ci_skips_single_class_resamples_for_auc() -> None:
    y = np.array([0] * 9 + [1])
    prob = np.linspace(0.05, 0.95, 10)
    df = M.bootstrap_ci(y, prob, n_boot=400, seed=0).set_index("metric")
    auc = df.loc["auc"]
    assert auc["n_skipped"] > 50  # P(no positive drawn) = 0.9**10 ~ 0.35
    assert auc["n_boot"] + auc["n_skipped"] == 400
    assert df.loc["accuracy", "n_skipped"] == 0


def test_bootstrap_ci_rejects_bad_arguments() -> None:
    y, prob = _data(50)
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['f1'\]"):
        M.bootstrap_ci(y, prob, metrics=("auc", "f1"))
    with pytest.raises(ValueError, match="n_boot must be a positive integer"):
        M.bootstrap_ci(y, prob, n_boot=0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        M.bootstrap_ci(y, prob, alpha=1.0)


# --------------------------------------------------------------------------- DeLong / paired


def test_delong_identical_predictions() -> None:
    y, prob = _data(500)
    res = M.delong_test(y, prob, prob.copy())
    assert res["delta"] == 0.0 and res["se"] == 0.0
    assert res["z"] == 0.0 and res["p_value"] == 1.0
    assert res["ci_low"] == res["ci_high"] == 0.0


def test_delong_clearly_better_model_has_small_p() -> None:
    y, a, b = _two_models(2000)
    res = M.delong_test(y, a, b)
    assert res["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert res["auc_b"] == pytest.approx(roc_auc_score(y, b))
    assert res["delta"] > 0.02 and res["p_value"] < 1e-6
    assert res["ci_low"] > 0
    swapped = M.delong_test(y, b, a)
    assert swapped["delta"] == pytest.approx(-res["delta"])
    assert swapped["p_value"] == pytest.approx(res["p_value"])


def test_delong_aucs_match_sklearn_with_ties() -> None:
    y, a, b = _two_models(700, seed=9)
    aucs, cov = M._delong_components(y, [np.round(a, 1), np.round(b, 1)])
    assert aucs[0] == pytest.approx(roc_auc_score(y, np.round(a, 1)))
    assert aucs[1] == pytest.approx(roc_auc_score(y, np.round(b, 1)))
    assert np.allclose(cov, cov.T) and (np.diag(cov) > 0).all()


def test_delong_variance_matches_hanley_mcneil_and_bootstrap() -> None:
    y, a, b = _two_models(1500, seed=3)
    _, cov = M._delong_components(y, [a])
    auc = roc_auc_score(y, a)
    n1, n0 = int(y.sum()), int((1 - y).sum())
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    hanley = (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)
    assert cov[0, 0] == pytest.approx(hanley, rel=0.25)

    dl = M.delong_test(y, a, b)
    boot = M.paired_bootstrap_auc(y, a, b, n_boot=600, seed=0)
    assert boot["se"] == pytest.approx(dl["se"], rel=0.25)


def test_paired_bootstrap_auc() -> None:
    y, a, b = _two_models(1500, seed=4)
    res = M.paired_bootstrap_auc(y, a, b, n_boot=300, seed=1)
    assert res["delta"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert res["ci_low"] < res["delta"] < res["ci_high"]
    assert res["ci_low"] > 0 and res["p_value"] == pytest.approx(2 / 301)
    same = M.paired_bootstrap_auc(y, a, a, n_boot=50)
    assert same["delta"] == 0.0 and same["p_value"] == 1.0
    assert same["ci_low"] == same["ci_high"] == 0.0


def test_paired_bootstrap_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="y has 3 values but prob_b has 2"):
        M.paired_bootstrap_auc([0, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2])


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_hand_checked_exact_case() -> None:
    # a right & b wrong on 1 patch (b=1), a wrong & b right on 5 patches (c=5).
    y = np.array([1] * 10)
    pred_a = np.array([1, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    pred_b = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    res = M.mcnemar_test(y, pred_a, pred_b)
    assert (res["b"], res["c"], res["n_discordant"]) == (1, 5, 6)
    assert res["method"] == "exact" and res["statistic"] == 1.0
    assert res["p_value"] == pytest.approx(14 / 64)  # 2 * (C(6,0) + C(6,1)) / 2**6


def test_mcnemar_chi2_branch() -> None:
    y = np.zeros(60, dtype=int)
    pred_a = np.r_[np.zeros(30), np.ones(10), np.zeros(20)].astype(int)  # wrong on 10
    pred_b = np.r_[np.ones(30), np.zeros(10), np.zeros(20)].astype(int)  # wrong on 30
    res = M.mcnemar_test(y, pred_a, pred_b)
    assert (res["b"], res["c"]) == (30, 10) and res["method"] == "chi2"
    assert res["statistic"] == pytest.approx((20 - 1) ** 2 / 40)
    assert res["p_value"] == pytest.approx(stats.chi2.sf(9.025, 1))


def test_mcnemar_switches_at_25_discordant_pairs() -> None:
    y = np.zeros(30, dtype=int)
    for n_disc, method in ((24, "exact"), (25, "chi2")):
        pred_a = np.zeros(30, dtype=int)
        pred_b = np.r_[np.ones(n_disc), np.zeros(30 - n_disc)].astype(int)
        assert M.mcnemar_test(y, pred_a, pred_b)["method"] == method


def test_mcnemar_no_discordant_pairs_and_equal_counts() -> None:
    y = np.array([0, 1, 1, 0])
    res = M.mcnemar_test(y, y, y)
    assert res["b"] == res["c"] == 0 and res["p_value"] == 1.0
    y = np.zeros(40, dtype=int)
    pred_a = np.r_[np.ones(15), np.zeros(25)].astype(int)
    pred_b = np.r_[np.zeros(15), np.ones(15), np.zeros(10)].astype(int)
    res = M.mcnemar_test(y, pred_a, pred_b)
    assert res["method"] == "chi2" and res["statistic"] == 0.0 and res["p_value"] == 1.0


def test_mcnemar_rejects_invalid_input() -> None:
    with pytest.raises(ValueError, match="y has 3 values but pred_b has 2"):
        M.mcnemar_test([0, 1, 1], [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="pred_a must contain only 0 and 1"):
        M.mcnemar_test([0, 1], [0.2, 0.7], [0, 1])


# --------------------------------------------------------------------------- study comparison


def test_study_reference_numbers() -> None:
    t = M.STUDY_TABLE1
    assert list(t.index) == ["DenseNet", "ResNet"]
    assert t.loc["DenseNet"].tolist() == [0.9568, 0.8812, 0.8437, 0.96]
    assert t.loc["ResNet"].tolist() == [0.9377, 0.8686, 0.8249, 0.93]
    assert M.VEELING_2018 == {
        "model": "P4M-DenseNet",
        "test_accuracy": 0.898,
        "test_auc": 0.963,
        "test_nll": 0.260,
    }


@pytest.mark.parametrize(
    ("arch", "family"),
    [
        ("densenet121", "DenseNet"),
        ("densenet169", "DenseNet"),
        ("DenseNet201", "DenseNet"),
        ("resnet18", "ResNet"),
        ("resnet34", "ResNet"),
        ("ResNet-50", "ResNet"),
    ],
)
def test_study_family(arch: str, family: str) -> None:
    assert M.study_family(arch) == family


@pytest.mark.parametrize("arch", ["vgg16", "xresnet50", "resnext50", "wide_resnet50_2", ""])
def test_study_family_rejects_other_archs(arch: str) -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        M.study_family(arch)


def test_comparison_table_deltas() -> None:
    measured = pd.DataFrame(
        {
            "arch": ["densenet121", "resnet34"],
            "train_accuracy": [0.95, 0.94],
            "valid_accuracy": [0.88, np.nan],
            "test_accuracy": [0.85, 0.82],
            "test_auc": [0.95, 0.94],
            "test_auc_ci_low": [0.94, 0.93],
            "test_auc_ci_high": [0.96, 0.95],
            "test_nll": [0.3, 0.4],
        }
    )
    out = M.comparison_table(measured)
    assert list(out.columns) == [
        "run", "arch", "family", "reference", "metric", "measured",
        "measured_ci_low", "measured_ci_high", "study", "delta",
    ]  # fmt: skip
    assert len(out) == 2 * (5 + 3)
    key = out.set_index(["arch", "reference", "metric"])
    z, v = M.REFERENCE_ZHAO, M.REFERENCE_VEELING
    assert z == "Zhao Table 1" and v == "Veeling et al. 2018 P4M-DenseNet"
    assert key.loc[("densenet121", z, "test_accuracy"), "delta"] == pytest.approx(0.85 - 0.8437)
    assert key.loc[("densenet121", z, "train_accuracy"), "delta"] == pytest.approx(0.95 - 0.9568)
    assert key.loc[("resnet34", z, "test_auc"), "delta"] == pytest.approx(0.94 - 0.93)
    assert key.loc[("resnet34", z, "test_auc"), "family"] == "ResNet"
    assert key.loc[("resnet34", v, "test_auc"), "delta"] == pytest.approx(0.94 - 0.963)
    assert key.loc[("densenet121", v, "test_nll"), "delta"] == pytest.approx(0.3 - 0.26)
    assert key.loc[("densenet121", z, "test_auc"), "measured_ci_low"] == 0.94
    assert np.isnan(key.loc[("densenet121", z, "test_accuracy"), "measured_ci_low"])
    # Missing study value (Zhao has no NLL) or missing measurement -> NaN delta.
    assert np.isnan(key.loc[("densenet121", z, "test_nll"), "study"])
    assert np.isnan(key.loc[("densenet121", z, "test_nll"), "delta"])
    assert np.isnan(key.loc[("resnet34", z, "valid_accuracy"), "delta"])
    assert (out["delta"].dropna() == (out["measured"] - out["study"]).dropna()).all()


def test_comparison_table_without_optional_columns() -> None:
    measured = pd.DataFrame(
        {
            "run": ["seed0"],
            "arch": ["densenet169"],
            "train_accuracy": [0.9],
            "valid_accuracy": [0.8],
            "test_accuracy": [0.8],
            "test_auc": [0.9],
        }
    )
    out = M.comparison_table(measured)
    assert len(out) == 4 + 3 and set(out["run"]) == {"seed0"}
    nll = out[out["metric"] == "test_nll"].iloc[0]
    assert nll["reference"] == M.REFERENCE_VEELING and nll["study"] == 0.26
    assert np.isnan(nll["measured"]) and np.isnan(nll["delta"])


def test_comparison_table_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['test_auc'\]"):
        M.comparison_table(
            pd.DataFrame(
                {"arch": ["resnet18"], "train_accuracy": [1], "valid_accuracy": [1],
                 "test_accuracy": [1]}
            )
        )  # fmt: skip
    bad = pd.DataFrame(
        {"arch": ["vgg16"], "train_accuracy": [1], "valid_accuracy": [1], "test_accuracy": [1],
         "test_auc": [1]}
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'"):
        M.comparison_table(bad)


# --------------------------------------------------------------------------- verdict


def test_verdict_significant_difference() -> None:
    y, a, b = _two_models(1500, seed=4)
    text = M.verdict("DenseNet", "ResNet", y, b, a, n_boot=200)
    assert "DenseNet" in text and "ResNet" in text and "AUC" in text
    assert text.startswith("ResNet has the higher test AUC than DenseNet")
    delta = roc_auc_score(y, a) - roc_auc_score(y, b)
    assert f"difference {delta:.4f}" in text
    assert "DeLong p < 0.0001" in text and "McNemar" in text
    assert "significant (the 95% interval excludes 0)" in text
    assert "no significant difference" not in text


def test_verdict_no_significant_difference() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    a = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.25, 400), 0, 1)
    b = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.25, 400), 0, 1)
    text = M.verdict("A-net", "B-net", y, a, b, n_boot=200)
    assert "A-net" in text and "B-net" in text and "AUC" in text
    assert "no significant difference" in text
    same = M.verdict("A-net", "B-net", y, a, a, n_boot=20)
    assert "have the same test AUC" in same and "DeLong p = 1.0000" in same


def test_delong_se_matches_monte_carlo_spread_of_delta() -> None:
    # Brute force: the spread of the AUC difference over independent test sets drawn from
    # the same population should match DeLong's standard error on one test set.
    deltas, ses = [], []
    for seed in range(150):
        y, a, b = _two_models(400, seed=100 + seed)
        res = M.delong_test(y, a, b)
        deltas.append(res["delta"])
        ses.append(res["se"])
    assert np.mean(ses) == pytest.approx(np.std(deltas, ddof=1), rel=0.25)


# --------------------------------------------------------------------------- study claims


def _scores(y: np.ndarray, separation: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, y.size) + separation * (2 * y - 1)
    return 1 / (1 + np.exp(-logits))


def test_study_claims_support_a_clear_densenet_advantage():
    y = np.tile([0, 1], 1000)
    table = M.study_claims(y, _scores(y, 3.0, 0), _scores(y, 0.5, 1), n_boot=300, seed=0)
    assert list(table.columns) == list(M.CLAIM_COLUMNS)
    rows = table.set_index("claim")
    acc = rows.loc["DenseNet has a higher test accuracy than ResNet (difference)"]
    auc = rows.loc["DenseNet has a higher test AUC than ResNet (difference)"]
    assert acc.study == pytest.approx(0.8437 - 0.8249)
    assert acc.ci_low > 0 and acc.finding.startswith("supported")
    assert auc.ci_low > 0 and auc.finding.startswith("supported") and auc.p_value < 0.001
    pred_d = _scores(y, 3.0, 0) >= 0.5
    assert rows.loc["DenseNet test accuracy"].measured == pytest.approx((pred_d == y).mean())
    assert rows.loc["ResNet test AUC"].finding.startswith("lower here")


def test_study_claims_equal_models_show_nothing_and_swap_is_contradiction():
    y = np.tile([0, 1], 500)
    same = _scores(y, 1.2, 0)
    table = M.study_claims(y, same, same, n_boot=200, seed=0).set_index("claim")
    assert table.loc["DenseNet has a higher test AUC than ResNet (difference)"].finding \
        .startswith("not shown")
    swapped = M.study_claims(y, _scores(y, 0.3, 1), _scores(y, 3.0, 0), n_boot=200,
                             seed=0).set_index("claim")
    assert swapped.loc["DenseNet has a higher test AUC than ResNet (difference)"].finding \
        .startswith("contradicted")


def test_study_value_inside_the_interval_is_consistent():
    y = np.tile([0, 1], 500)
    rng = np.random.default_rng(4)
    # accuracy near the study's DenseNet 0.8437: correct with probability 0.8437
    correct = rng.random(y.size) < 0.8437
    prob = np.where(correct == (y == 1), 0.8, 0.2)
    row = M.study_claims(y, prob, prob, n_boot=300, seed=0).set_index("claim") \
        .loc["DenseNet test accuracy"]
    assert row.ci_low <= 0.8437 <= row.ci_high
    assert row.finding.startswith("consistent")


def test_study_claims_bad_input_is_named():
    with pytest.raises(ValueError, match="length mismatch"):
        M.study_claims([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], [0.5, 0.5], n_boot=10)
