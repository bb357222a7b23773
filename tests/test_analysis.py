"""Analyses for reviewers: calibration, operating points, errors, Grad-CAM, per-slide tables.

Array-level numbers are checked against hand-computed cases and brute force; the fastai
and Grad-CAM parts run on a resnet18 trained for 2 epochs on tiny learnable toy data
(dark-blue centre = tumour) whose test split has four deliberately wrong labels, so the
model makes confident errors whose rows are known.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from fastai.data.transforms import Category  # noqa: E402
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score  # noqa: E402

import pcamlib.learner as L  # noqa: E402
import pcamlib.runs as R  # noqa: E402
import pcamlib.train as T  # noqa: E402
from pcamlib import analysis as A  # noqa: E402
from pcamlib import figures as F  # noqa: E402
from pcamlib import metrics as M  # noqa: E402
from pcamlib.data import PCamRows, split_dataloader  # noqa: E402
from pcamlib.evaluate import predict_probs  # noqa: E402
from pcamlib.pcam import CENTRE_BOX, PCamSplit, PCamWriter  # noqa: E402
from pcamlib.profiles import get_profile  # noqa: E402
from pcamlib.sample import write_sample  # noqa: E402

SIZES = {"train": 128, "valid": 64, "test": 64}
FLIPPED_TEST_ROWS = (0, 1, 2, 3)
"""Test rows whose label contradicts the image: 1 and 3 are tumour images labelled normal
(false positives for a model that learned), 0 and 2 normal images labelled tumour."""

REAL_SUBSET = Path(__file__).resolve().parents[1] / "data" / "real-subset"

pytestmark = pytest.mark.usefixtures("empty_weights_cache")


@pytest.fixture(autouse=True)
def _no_pyplot_leaks():
    yield
    plt.close("all")


def write_noisy_toy_pcam(root: Path, sizes=SIZES, seed: int = 0) -> Path:
    """Learnable toy PCam (label 1 = dark blue centre 32x32) with flipped test labels."""
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        x = rng.integers(100, 200, (n, 96, 96, 3), dtype=np.uint8)
        y = (np.arange(n) % 2).astype(np.uint8)
        x[y == 1, 32:64, 32:64, 2] = 40
        if split == "test":
            y[list(FLIPPED_TEST_ROWS)] = 1 - y[list(FLIPPED_TEST_ROWS)]
        with PCamWriter(root, split, n) as writer:
            writer.write(x, y)
    return root


def predictions_table(y, prob, split="test", prob_tta=None) -> pd.DataFrame:
    y = np.asarray(y)
    tta = np.full(len(y), np.nan) if prob_tta is None else prob_tta
    return pd.DataFrame({"split": split, "row": np.arange(len(y)), "label": y, "prob": prob,
                         "prob_tta": tta})


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    return buf.getvalue()


# --------------------------------------------------------------------------- calibration


def test_calibration_bins_are_right_closed_with_exact_edges():
    prob = [0.0, 0.05, 0.1, 0.1000001, 0.3, 0.7, 0.95, 1.0]
    assert M.calibration_bins(prob, 10).tolist() == [0, 0, 0, 1, 2, 6, 9, 9]
    assert M.calibration_bins(prob, 1).tolist() == [0] * 8


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval, written out (independent of scipy)."""
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * np.sqrt(k * (n - k) / n + z * z / 4)
    return centre - half, centre + half


def test_reliability_table_and_ece_hand_computed():
    y = [0, 1, 0, 1, 1, 1]
    prob = [0.1, 0.2, 0.6, 0.7, 0.8, 0.9]
    table = M.reliability_table(y, prob, n_bins=4)
    assert list(table.columns) == list(M.RELIABILITY_COLUMNS)
    assert table["count"].tolist() == [2, 0, 2, 2]
    assert table["positives"].tolist() == [1, 0, 1, 2]
    np.testing.assert_allclose(table["mean_prob"], [0.15, np.nan, 0.65, 0.85])
    np.testing.assert_allclose(table["observed"], [0.5, np.nan, 0.5, 1.0])
    np.testing.assert_allclose(table["gap"], [0.35, np.nan, -0.15, 0.15])
    np.testing.assert_allclose(table["bin_low"], [0, 0.25, 0.5, 0.75])
    for k, n, row in ((1, 2, 0), (1, 2, 2), (2, 2, 3)):
        np.testing.assert_allclose(table.loc[row, ["ci_low", "ci_high"]].astype(float),
                                   wilson(k, n), rtol=1e-9)
    assert table.loc[1, ["ci_low", "ci_high"]].isna().all()
    # ECE = (2 * 0.35 + 2 * 0.15 + 2 * 0.15) / 6
    assert M.expected_calibration_error(y, prob, n_bins=4) == pytest.approx(1.3 / 6)
    # With two bins: (0, .5] holds 0.1 and 0.2 (observed .5, mean .15); the rest are exact.
    assert M.expected_calibration_error(y, prob, n_bins=2) == pytest.approx(2 / 6 * 0.35)


def test_perfectly_calibrated_case_has_zero_ece():
    # In bin k (of 20) every patch gets p = (k + 0.5) / 20, and exactly that share of the
    # patches in the bin is tumour: observed == predicted everywhere.
    y, prob = [], []
    for k in range(20):
        n_pos = 2 * k + 1  # of 40 patches: (2k + 1) / 40 = (k + 0.5) / 20
        y += [1] * n_pos + [0] * (40 - n_pos)
        prob += [(k + 0.5) / 20] * 40
    table = M.reliability_table(y, prob, n_bins=20)
    np.testing.assert_allclose(table["gap"], 0.0, atol=1e-12)
    assert M.expected_calibration_error(y, prob, n_bins=20) == pytest.approx(0.0, abs=1e-12)
    assert M.expected_calibration_error(y, prob, n_bins=10) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_sampled_calibrated_and_overconfident_models():
    rng = np.random.default_rng(7)
    prob = rng.random(100_000)
    y = (rng.random(prob.size) < prob).astype(int)  # calibrated by construction
    assert M.expected_calibration_error(y, prob) < 0.01
    overconfident = np.clip(0.5 + 1.8 * (prob - 0.5), 0, 1)
    assert M.expected_calibration_error(y, overconfident) > 0.1


def test_calibration_metrics_reuse_the_bootstrap_and_nll():
    rng = np.random.default_rng(3)
    prob = rng.random(400)
    y = (rng.random(400) < prob ** 1.5).astype(int)
    cal = M.calibration_metrics(y, prob, n_bins=10, n_boot=200, seed=5)
    assert cal["nll"] == pytest.approx(M.binary_metrics(y, prob)["nll"])
    boot = M.bootstrap_ci(y, prob, metrics=["nll"], n_boot=200, seed=5).iloc[0]
    assert (cal["nll_ci_low"], cal["nll_ci_high"]) == (boot["ci_low"], boot["ci_high"])
    assert cal["ece"] == pytest.approx(M.expected_calibration_error(y, prob, n_bins=10))
    assert 0 < cal["ece_ci_low"] < cal["ece_ci_high"] < 1
    assert cal["brier"] == pytest.approx(brier_score_loss(y, prob))
    # The ECE replicates are real resamples: the same seed gives the same interval, another
    # seed another one.
    again = M.calibration_metrics(y, prob, n_boot=200, seed=5)
    other = M.calibration_metrics(y, prob, n_boot=200, seed=6)
    assert again["ece_ci_low"] == cal["ece_ci_low"]
    assert other["ece_ci_low"] != cal["ece_ci_low"]


def test_calibration_table_per_model_puts_nll_beside_ece():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good = np.clip(y * 0.7 + rng.random(300) * 0.3, 0, 1)
    bad = np.clip(0.5 + 0.5 * (good - 0.5) * 0.2, 0, 1)
    preds = {"a": predictions_table(y, good), "b": predictions_table(y, bad)}
    table = A.calibration_table(preds, n_boot=100, seed=1)
    assert table["model"].tolist() == ["a", "b"]
    assert {"ece", "ece_ci_low", "ece_ci_high", "nll", "nll_ci_low", "nll_ci_high",
            "veeling_nll", "brier"} <= set(table.columns)
    assert (table["veeling_nll"] == 0.260).all()
    for model, prob in (("a", good), ("b", bad)):
        row = table.set_index("model").loc[model]
        assert row["ece"] == pytest.approx(M.expected_calibration_error(y, prob))
        assert row["nll"] == pytest.approx(M.binary_metrics(y, prob)["nll"])
    valid = A.calibration_table({"a": predictions_table(y, good, split="valid")},
                                split="valid", n_boot=20)
    assert valid["veeling_nll"].isna().all()  # Veeling's NLL is a test-split number


def test_reliability_bins_long_table_and_figure():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    prob = np.clip(y * 0.6 + rng.random(500) * 0.4, 0, 1)
    tta = np.clip(prob * 0.9 + 0.05, 0, 1)
    preds = {"resnet18": predictions_table(y, prob, prob_tta=tta),
             "densenet121": predictions_table(y, 1 - prob / 2, prob_tta=tta)}
    bins = A.reliability_bins(preds, n_bins=10)
    assert len(bins) == 20 and bins.groupby("model")["count"].sum().eq(500).all()
    first = bins[bins.model == "resnet18"].reset_index(drop=True)
    expected = M.reliability_table(y, prob, n_bins=10)
    pd.testing.assert_frame_equal(first[list(M.RELIABILITY_COLUMNS)], expected)
    tta_bins = A.reliability_bins(preds, variant="tta")
    assert (tta_bins.variant == "tta").all()
    fig = F.reliability_figure(bins)
    assert isinstance(fig, F.ReportFigure) and not plt.get_fignums()
    top, bottom = fig.axes
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    ece = M.expected_calibration_error(y, prob)
    assert f"resnet18 (ECE {ece:.3f})" in labels
    assert bottom.get_yscale() == "log"
    assert png_bytes(fig) == png_bytes(F.reliability_figure(bins))  # deterministic


# --------------------------------------------------------------------------- operating points


def brute_force_point(y, prob, fixed, target):
    """Try every threshold; keep the best qualifying (free metric, fixed metric)."""
    y, prob = np.asarray(y), np.asarray(prob)
    best = None
    for threshold in np.r_[np.inf, np.unique(prob)]:
        pred = prob >= threshold
        sens = (pred & (y == 1)).sum() / (y == 1).sum()
        spec = (~pred & (y == 0)).sum() / (y == 0).sum()
        fixed_value, free_value = (spec, sens) if fixed == "specificity" else (sens, spec)
        if fixed_value >= target and (best is None or (free_value, fixed_value) > best[0]):
            best = ((free_value, fixed_value), threshold, sens, spec)
    return best[1:]


@pytest.mark.parametrize("seed", range(6))
def test_operating_points_match_brute_force_threshold_search(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 120))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    prob = np.round(np.clip(y * 0.3 + rng.random(n) * 0.7, 0, 1), 2)  # many ties
    table = M.operating_points(y, prob, n_boot=50, seed=seed)
    assert list(table.columns) == list(M.OPERATING_COLUMNS)
    assert table[["fixed", "target"]].apply(tuple, axis=1).tolist() == list(M.OPERATING_TARGETS)
    for _, row in table.iterrows():
        threshold, sens, spec = brute_force_point(y, prob, row["fixed"], row["target"])
        assert row["threshold"] == threshold
        assert row["sensitivity"] == pytest.approx(sens)
        assert row["specificity"] == pytest.approx(spec)
        assert row["value"] == row[row["estimated"]]
        assert 0 <= row["ci_low"] <= row["ci_high"] <= 1
        assert row["n_boot"] + row["n_skipped"] == 50


def test_operating_points_hand_computed():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    prob = [0.1, 0.2, 0.3, 0.4, 0.35, 0.6, 0.7, 0.8]
    table = M.operating_points(y, prob, targets=[("specificity", 0.75), ("specificity", 1.0),
                                                 ("sensitivity", 1.0)], n_boot=20)
    # spec >= 0.75 needs 3 normals below the threshold: 0.35 keeps every tumour (sens 1).
    assert table.loc[0, ["threshold", "sensitivity", "specificity"]].tolist() == [0.35, 1, 0.75]
    # spec 1 needs the threshold above 0.4: 0.6 finds 3 of 4 tumours.
    assert table.loc[1, ["threshold", "sensitivity", "specificity"]].tolist() == [0.6, 0.75, 1]
    # sens 1 needs 0.35 or lower; 0.35 has the highest specificity.
    assert table.loc[2, ["threshold", "value"]].tolist() == [0.35, 0.75]


def test_operating_points_threshold_reproduces_its_metrics():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 2000)
    prob = np.clip(y * 0.25 + rng.random(2000) * 0.75, 0, 1)
    table = M.operating_points(y, prob, n_boot=100)
    for _, row in table.iterrows():
        pred = prob >= row["threshold"]
        got = M.binary_metrics(y, prob, threshold=row["threshold"])
        assert got["sensitivity"] == pytest.approx(row["sensitivity"])
        assert got["specificity"] == pytest.approx(row["specificity"])
        assert row[row["fixed"]] >= row["target"]
        assert pred.any()
    # The classes overlap (tumour in [0.25, 1], normal in [0, 0.75]): 95% of both cannot
    # be kept, and the stricter specificity costs sensitivity.
    assert table.loc[1, "value"] < table.loc[0, "value"] < 0.95


def test_operating_point_table_and_figure():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    preds = {name: predictions_table(y, np.clip(y * w + rng.random(400) * (1 - w), 0, 1))
             for name, w in (("densenet121", 0.4), ("resnet18", 0.2))}
    table = A.operating_point_table(preds, n_boot=100, seed=3)
    assert len(table) == 8 and set(table["model"]) == set(preds)
    dn = table[table.model == "densenet121"].reset_index(drop=True)
    expected = M.operating_points(y, preds["densenet121"]["prob"], n_boot=100, seed=3)
    pd.testing.assert_frame_equal(dn[list(M.OPERATING_COLUMNS)], expected)
    fig = F.operating_points_figure(table)
    assert len(fig.axes) == 2 and not plt.get_fignums()
    assert png_bytes(fig) == png_bytes(F.operating_points_figure(table))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: M.expected_calibration_error([0, 1, 1], [0.2, 0.4]),
         ["length mismatch", "y has 3", "prob has 2"]),
        (lambda: M.reliability_table([0, 1], [0.2, 1.4]), ["prob", "[0, 1]", "1.4"]),
        (lambda: M.reliability_table([0, 1], [0.2, 0.4], n_bins=0), ["n_bins", "0"]),
        (lambda: M.operating_points([1, 1, 1], [0.2, 0.4, 0.9]),
         ["only one class", "y", "all 3 labels are 1"]),
        (lambda: M.operating_points([0, 1], [0.2, 0.4], targets=[("ppv", 0.9)]),
         ["targets", "'ppv'", "specificity", "sensitivity"]),
        (lambda: M.operating_points([0, 1], [0.2, 0.4], targets=[("specificity", 1.5)]),
         ["targets", "(0, 1]", "1.5"]),
        (lambda: M.calibration_metrics([0, 0], [0.2, 0.4]), ["only one class"]),
        (lambda: A.calibration_table({"m": predictions_table([0, 1], [0.1, 0.9])},
                                     split="tset"), ["split", "train, valid, test", "'tset'"]),
        (lambda: A.calibration_table({"m": predictions_table([0, 1], [0.1, 0.9])},
                                     split="valid"),
         ["'m'", "no rows for split 'valid'", "['test']"]),
        (lambda: A.calibration_table({"m": predictions_table([1, 1], [0.1, 0.9])}),
         ["predictions of 'm', split 'test'", "only one class", "all 2 labels are 1"]),
        (lambda: A.operating_point_table({"m": predictions_table([0, 0], [0.1, 0.9])}),
         ["predictions of 'm', split 'test'", "only one class", "all 2 labels are 0"]),
        (lambda: A.reliability_bins({"m": predictions_table([0, 1], [0.1, 0.9])},
                                    variant="tta"),
         ["'m'", "tta", "prob_tta", "variant='plain'"]),
        (lambda: A.reliability_bins({"m": predictions_table([0, 1], [0.1, 0.9])},
                                    variant="dihedral"), ["variant", "plain, tta", "dihedral"]),
        (lambda: A.operating_point_table(predictions_table([0, 1], [0.1, 0.9])),
         ["predictions", "model names", "DataFrame"]),
        (lambda: A.operating_point_table(
            {"m": predictions_table([0, 1], [0.1, 0.9]).drop(columns="label")}),
         ["'m'", "lacks", "'label'", "split, row, label, prob"]),
        (lambda: A.confident_examples(predictions_table([0, 1], [0.1, 0.9]), k=0),
         ["k", "positive", "0"]),
        (lambda: F.reliability_figure(pd.DataFrame({"count": [1]})),
         ["bins", "lacks", "mean_prob"]),
    ],
)
def test_bad_inputs_are_named(call, words):
    with pytest.raises(ValueError) as err:
        call()
    for word in words:
        assert word in str(err.value), (word, str(err.value))


# --------------------------------------------------------------------------- per slide


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("sample") / "sample"
    write_sample(dest, sizes={"train": 8, "valid": 8, "test": 300}, progress=False)
    return dest


def test_per_slide_table_on_sample_meta(sample_dir):
    test = PCamSplit(sample_dir, "test")
    meta = test.meta()
    rng = np.random.default_rng(4)
    prob = np.clip(test.labels * 0.5 + rng.random(len(test)) * 0.5, 0, 1)
    preds = {"resnet18": predictions_table(test.labels, prob),
             "densenet121": predictions_table(test.labels, rng.random(len(test)))}
    table = A.per_slide_table(preds, meta)
    slides = sorted(meta["wsi"].unique())
    assert len(slides) >= 3
    assert table.columns.tolist() == ["model", "split", "variant", "wsi", "n", "positives",
                                      "accuracy", "auc"]
    assert len(table) == 2 * len(slides)
    rows = table[table.model == "resnet18"].set_index("wsi")
    assert rows.index.tolist() == slides
    for wsi in slides:
        mask = (meta["wsi"] == wsi).to_numpy()
        y, p = test.labels[mask], prob[mask]
        assert rows.loc[wsi, "n"] == mask.sum()
        assert rows.loc[wsi, "positives"] == y.sum()
        assert rows.loc[wsi, "accuracy"] == pytest.approx(((p >= 0.5) == y).mean())
        assert rows.loc[wsi, "auc"] == pytest.approx(roc_auc_score(y, p))
    fig = F.per_slide_figure(table)
    assert len(fig.axes) == 1 and not plt.get_fignums()
    assert len(F.per_slide_figure(table, max_slides=2).axes[0].get_yticks()) == 2


def test_per_slide_table_edge_cases(sample_dir):
    test = PCamSplit(sample_dir, "test")
    meta = test.meta()
    preds = {"m": predictions_table(test.labels, np.full(len(test), 0.7))}
    # No slide ids (imported data records source files instead): nothing to show.
    assert A.per_slide_table(preds, None) is None
    assert A.per_slide_table(preds, meta.drop(columns="wsi").assign(source_file="x.jpg")) is None
    # A slide with one class has accuracy but no AUC.
    one_class = meta.assign(wsi=np.where(test.labels == 1, "tumour_only", "normal_only"))
    table = A.per_slide_table(preds, one_class).set_index("wsi")
    assert table["auc"].isna().all()
    assert table.loc["tumour_only", "accuracy"] == 1.0
    # The meta table of another split is refused.
    with pytest.raises(ValueError, match=r"meta has 8 rows.*row 299.*split 'test'"):
        A.per_slide_table(preds, PCamSplit(sample_dir, "valid").meta())
    shuffled = meta.iloc[::-1].reset_index(drop=True)
    with pytest.raises(ValueError, match="center_tumor_patch disagrees"):
        A.per_slide_table(preds, shuffled)


@pytest.mark.skipif(not (REAL_SUBSET / "camelyonpatch_level_2_split_test_y.h5").is_file(),
                    reason="the imported real subset (data/real-subset) is absent")
def test_per_slide_table_is_none_on_imported_real_subset():
    test = PCamSplit(REAL_SUBSET, "test")
    preds = {"m": predictions_table(test.labels, np.full(len(test), 0.5))}
    assert A.per_slide_table(preds, test.meta()) is None


# --------------------------------------------------------------------------- learner


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A resnet18 trained 3 epochs on noisy toy data, its test split and predictions.

    3 epochs at LR 0.005 separate the toy classes with a wide margin on 1 or 2 threads
    (2 epochs at 0.002 left one flipped row near 0.5, which the thread count decided).
    """
    root = tmp_path_factory.mktemp("analysis")
    data_dir = write_noisy_toy_pcam(root / "pcam")
    profile = get_profile("sample", data_dir=data_dir, archs=["resnet18"], epochs=3, bs=32,
                          n_boot=50, pretrained="no", lrs={"resnet": 0.005})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T.train(profile, "resnet18", runs_root=root / "runs", progress=False)
    learn, _ = R.load_best_learner(profile, "resnet18", runs_root=root / "runs")
    test = PCamSplit(data_dir, "test")
    prob = predict_probs(learn, test)
    return {"profile": profile, "root": root, "learn": learn, "test": test, "prob": prob,
            "predictions": predictions_table(test.labels, prob)}


@pytest.fixture(scope="module")
def interp(toy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return A.interpretation(toy["learn"], toy["test"])


@pytest.mark.slow
def test_toy_model_learned_and_errs_on_the_flipped_rows(toy):
    y, prob = toy["test"].labels, toy["prob"]
    correct = (prob >= 0.5) == y
    clean = np.setdiff1d(np.arange(len(y)), FLIPPED_TEST_ROWS)
    assert correct[clean].mean() >= 0.9
    assert not correct[list(FLIPPED_TEST_ROWS)].any()


@pytest.mark.slow
def test_loaders_decode_to_patches_and_class_names(toy):
    learn = toy["learn"]
    assert list(learn.dls.vocab) == list(F.CLASS_NAMES)
    xb, yb = learn.dls.valid.one_batch()
    x, y, samples = learn.dls.valid._pre_show_batch((xb, yb), max_n=3)
    raw, labels = learn.dls.valid.dataset.read_batch(range(len(xb)))
    # Decoding undoes normalisation and the NHWC -> NCHW float conversion exactly.
    assert torch.equal(x.cpu(), raw)
    assert [type(s[1]) for s in samples] == [Category] * 3
    assert [str(s[1]) for s in samples] == [F.CLASS_NAMES[int(v)] for v in labels[:3]]


@pytest.mark.slow
def test_show_batch_draws_patches_with_class_names(toy):
    toy["learn"].dls.show_batch(max_n=4)
    axes = [ax for ax in plt.gcf().axes if ax.images]
    assert len(axes) == 4
    assert {ax.get_title() for ax in axes} <= set(F.CLASS_NAMES)
    assert axes[0].images[0].get_array().shape == (96, 96, 3)


@pytest.mark.slow
def test_row_selection_reads_the_chosen_rows(toy):
    test = toy["test"]
    rows = PCamRows(test).iloc[np.array([5, 2, 9])]
    assert rows.rows.tolist() == [5, 2, 9] and len(rows) == 3
    nested = rows.iloc[[2, 0]]
    assert nested.rows.tolist() == [9, 5]
    np.testing.assert_array_equal(nested.read_images([0, 1]), test.read_images([9, 5]))
    np.testing.assert_array_equal(nested.labels, test.labels[[9, 5]])
    xb, yb = next(iter(split_dataloader(toy["learn"].dls, nested)))
    assert yb.tolist() == test.labels[[9, 5]].tolist()


@pytest.mark.slow
def test_top_losses_agree_with_predict_probs(toy, interp):
    y, prob = toy["test"].labels, toy["prob"]
    with np.errstate(divide="ignore"):
        expected = -np.log(np.where(y == 1, prob, 1 - prob))
    losses, idx = interp.top_losses()
    losses, expected = losses.numpy(), expected[idx.numpy()]
    # A float32 softmax rounds to exactly 0 or 1 once the logits are ~17 apart: the loss
    # from probabilities is then inf, fastai's (from the logits) large but finite.
    finite = np.isfinite(expected)
    np.testing.assert_allclose(losses[finite], expected[finite], rtol=1e-4, atol=1e-5)
    assert (losses[~finite] > 15).all()
    assert (np.diff(losses) <= 0).all()
    # Tumour images labelled normal (rows 1, 3) are the most confident mistakes.
    assert set(idx[:2].tolist()) == {1, 3}
    cm = interp.confusion_matrix()
    np.testing.assert_array_equal(cm, confusion_matrix(y, (prob >= 0.5).astype(int)))


@pytest.mark.slow
def test_top_errors_table_and_figure(toy, interp):
    y, prob = toy["test"].labels, toy["prob"]
    table = A.top_errors(interp, k=3)
    assert table.columns.tolist() == ["kind", "rank", "split", "row", "label", "prob", "loss"]
    fp, fn = table[table.kind == "false positive"], table[table.kind == "false negative"]
    # Rows 1 and 3 are tumour images labelled normal, 0 and 2 the reverse.
    assert set(fp.row[:2]) == {1, 3} and set(fn.row[:2]) == {0, 2}
    assert (fp.label == 0).all() and (fp.prob >= 0.5).all()
    assert (fn.label == 1).all() and (fn.prob < 0.5).all()
    np.testing.assert_allclose(table.prob, prob[table.row], rtol=1e-4, atol=1e-5)
    assert table.groupby("kind", sort=False)["loss"].apply(
        lambda s: s.is_monotonic_decreasing).all()
    assert (table.split == "test").all() and (table.label == y[table.row]).all()
    fig = F.top_errors_figure(toy["test"].read_images(table.row), table)
    assert not plt.get_fignums()
    boxes = [p for ax in fig.axes for p in ax.patches]
    assert len(boxes) == len(table)  # the centre box on every patch
    assert png_bytes(fig) == png_bytes(
        F.top_errors_figure(toy["test"].read_images(table.row), table))


@pytest.mark.slow
def test_fastai_plot_top_losses_and_confusion_matrix(interp):
    interp.plot_top_losses(4)
    axes = [ax for ax in plt.gcf().axes if ax.images]
    assert len(axes) == 4
    # fastai titles read "prediction/actual / loss / probability"; the flipped rows have
    # the four highest losses, and each is a mistake between the two named classes.
    for ax in axes:
        predicted, actual = ax.get_title().split(" / ")[0].split("/")
        assert {predicted, actual} == set(F.CLASS_NAMES)
    plt.close("all")
    interp.plot_confusion_matrix()
    ax = plt.gcf().axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(F.CLASS_NAMES)
    cells = sorted(int(t.get_text()) for t in ax.texts)
    assert cells == sorted(interp.confusion_matrix().ravel().tolist())


# --------------------------------------------------------------------------- Grad-CAM


def build(profile, arch, run_dir, **overrides):
    profile = dataclasses.replace(profile, **overrides)
    choice = L.PretrainedChoice(False, "", "untrained")
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return L.build_learner(profile, arch, run_dir=run_dir, pretrained=choice, norm=norm,
                               progress=False)


@pytest.mark.slow
def test_gradcam_layer_choice_per_family(toy):
    name, layer = A.gradcam_target_layer(toy["learn"].model)
    assert name == "0.7.1" and type(layer).__name__ == "BasicBlock"  # layer4[-1]
    dense = build(toy["profile"], "densenet121", toy["root"]).model
    name, layer = A.gradcam_target_layer(dense)
    assert name == "0.0.norm5" and isinstance(layer, torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="model: expected a torchvision ResNet or DenseNet"):
        A.gradcam_target_layer(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


@pytest.mark.slow
def test_gradcam_examples_on_trained_toy_model(toy):
    test = toy["test"]
    ex = A.gradcam_examples(toy["learn"], test, toy["predictions"], model="resnet18", k=4)
    table = ex.table
    assert table.columns.tolist() == ["model", "outcome", "rank", "split", "row", "label",
                                      "prob", "target", "layer", "input_size", "centre_mass"]
    assert set(table.outcome) == set(A.OUTCOMES)
    fp = table[table.outcome == "false positive"]
    assert set(fp.row[:2]) == {1, 3}  # tumour images labelled normal, most confident first
    assert (table.layer == "0.7.1").all() and (table.target == "tumour").all()
    assert ex.maps.shape == (len(table), 96, 96) and ex.maps.dtype == np.float32
    assert np.isfinite(ex.maps).all() and ex.maps.min() >= 0 and ex.maps.max() <= 1
    assert (ex.maps.reshape(len(table), -1).std(axis=1) > 0.01).all()  # none constant
    np.testing.assert_array_equal(ex.images, test.read_images(table.row))
    # Tumour lives in the centre box of tumour images: the map concentrates there. (The
    # box is 1/9 of the patch, the share of a uniform map.)
    tumour_image = test.read_images(table.row)[:, 48, 48, 2] == 40
    share = table.centre_mass.to_numpy()
    assert share[tumour_image].min() > 1 / 9 > np.median(share[~tumour_image])
    assert share[tumour_image].mean() > share[~tumour_image].mean() + 0.05
    top, left, bottom, right = CENTRE_BOX
    np.testing.assert_allclose(
        share, ex.maps[:, top:bottom, left:right].sum(axis=(1, 2)) / ex.maps.sum(axis=(1, 2)),
        rtol=1e-5)
    fig = F.gradcam_figure(ex.images, ex.maps, table)
    assert not plt.get_fignums()
    assert len(fig.axes) == 2 * len(table)
    assert "resnet18" in fig.get_suptitle() and "0.7.1" in fig.get_suptitle()
    assert png_bytes(fig) == png_bytes(F.gradcam_figure(ex.images, ex.maps, table))


@pytest.mark.slow
def test_gradcam_is_independent_of_memory_layout(toy):
    learn, test = toy["learn"], toy["test"]
    conv = learn.model[0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    rows = [4, 5, 6, 7]
    nhwc = A.gradcam_maps(learn, test, rows)
    learn.model.to(memory_format=torch.contiguous_format)
    try:
        nchw = A.gradcam_maps(learn, test, rows)
    finally:
        learn.model.to(memory_format=torch.channels_last)
    np.testing.assert_allclose(nhwc, nchw, atol=1e-3)
    learn.model.train()
    predicted = A.gradcam_maps(learn, test, rows, target_class=None)
    assert learn.model.training  # the model's mode is restored
    learn.model.eval()
    assert predicted.shape == (4, 96, 96) and np.isfinite(predicted).all()


@pytest.mark.slow
def test_gradcam_densenet_and_centre_crop(toy):
    test, rows = toy["test"], [5, 7]  # tumour images
    dense = build(toy["profile"], "densenet121", toy["root"])
    maps = A.gradcam_maps(dense, test, rows)
    assert maps.shape == (2, 96, 96) and np.isfinite(maps).all()
    # The trained weights on 64 px centre crops (the head pools whatever size comes).
    cropped = build(toy["profile"], "resnet18", toy["root"], centre_crop=64)
    cropped.model.load_state_dict(toy["learn"].model.state_dict())
    maps = A.gradcam_maps(cropped, test, rows)
    assert maps.shape == (2, 96, 96) and np.isfinite(maps).all()
    assert not maps[:, :16].any() and not maps[:, :, 80:].any()  # the model saw 16..80 only
    assert maps[:, 16:80, 16:80].max() > 0


@pytest.mark.slow
def test_gradcam_bad_inputs(toy):
    learn, test = toy["learn"], toy["test"]
    with pytest.raises(ValueError, match=r"rows must be in 0\.\.63.*found 0\.\.64"):
        A.gradcam_maps(learn, test, [0, 64])
    with pytest.raises(ValueError, match="target_class must be 0, 1 or None; got 2"):
        A.gradcam_maps(learn, test, [0], target_class=2)
    wrong = toy["predictions"].assign(label=1 - toy["predictions"]["label"])
    with pytest.raises(ValueError, match="predictions: label of test row .* other data"):
        A.gradcam_examples(learn, test, wrong)
    with pytest.raises(ValueError, match="no rows for split 'test'; found splits"):
        A.gradcam_examples(learn, test, toy["predictions"].assign(split="valid"))
