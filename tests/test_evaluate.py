"""Evaluation contract: predictions, metrics, fastai agreement, TTA, reuse, run comparison.

One resnet18 and one resnet34 run (1 epoch each, CPU) are trained on tiny learnable toy
data whose images are all invariant under the dihedral group (flips and 90-degree
turns), so TTA must reproduce the plain prediction exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    recall_score,
    roc_auc_score,
)

import pcamlib.evaluate as E
import pcamlib.runs as R
import pcamlib.train as T
from pcamlib.metrics import REFERENCE_ZHAO, STUDY_TABLE1
from pcamlib.pcam import PCamSplit, PCamWriter
from pcamlib.profiles import get_profile

ARCHS = ["resnet18", "resnet34"]
SIZES = {"train": 128, "valid": 64, "test": 64}
TABLE1_COLUMNS = [
    "arch", "train_accuracy", "valid_accuracy", "test_accuracy", "test_auc",
    "test_auc_ci_low", "test_auc_ci_high", "test_nll", "test_accuracy_tta", "test_auc_tta",
]


def dihedral_views(x: np.ndarray) -> list[np.ndarray]:
    """The 8 dihedral transforms of an N x H x W x C batch."""
    views = []
    for flipped in (x, x[:, :, ::-1]):
        views += [np.rot90(flipped, k, axes=(1, 2)) for k in range(4)]
    return [np.ascontiguousarray(v) for v in views]


def symmetric_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """Random images invariant under flips and 90-degree turns.

    Pixel (i, j) takes the value of base[a, b] with a <= b the distances of i and j to
    the nearest edge, which no dihedral transform of the 96 x 96 grid changes.
    """
    base = rng.integers(100, 200, (n, 48, 48, 3), dtype=np.uint8)
    edge = np.minimum(np.arange(96), 95 - np.arange(96))
    a = np.minimum(edge[:, None], edge[None, :])
    b = np.maximum(edge[:, None], edge[None, :])
    return base[:, a, b, :]


def write_split(root: Path, split: str, x: np.ndarray, y: np.ndarray) -> None:
    with PCamWriter(root, split, len(x)) as writer:
        writer.write(x, y)


def write_symmetric_pcam(root: Path, sizes=SIZES, seed: int = 0) -> Path:
    """Learnable and dihedral-invariant: label 1 = dark blue centre 32x32."""
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        x = symmetric_images(n, rng)
        y = (np.arange(n) % 2).astype(np.uint8)
        x[y == 1, 32:64, 32:64, 2] = 40  # the centre box is itself dihedral-invariant
        write_split(root, split, x, y)
    return root


pytestmark = pytest.mark.usefixtures("empty_weights_cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Profile, runs root and data dir with one finished 1-epoch run per architecture."""
    root = tmp_path_factory.mktemp("evaluate")
    data_dir = write_symmetric_pcam(root / "pcam")
    profile = get_profile(
        "sample", data_dir=data_dir, archs=ARCHS, epochs=1, bs=32, n_boot=50,
        lr_find_iters=10, pretrained="no", lrs={"resnet": 0.002}, tta_splits=["valid", "test"],
    )
    runs = root / "runs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch in ARCHS:
            T.train(profile, arch, runs_root=runs, progress=False)
    return {"profile": profile, "runs": runs, "data_dir": data_dir}


@pytest.fixture(scope="module")
def evaluation(trained):
    return E.evaluate_run(trained["profile"], ARCHS[0], runs_root=trained["runs"],
                          progress=False)


@pytest.fixture(scope="module")
def learner(trained):
    learn, _ = R.load_best_learner(trained["profile"], ARCHS[0], runs_root=trained["runs"])
    return learn


# --------------------------------------------------------------------------- contract


@pytest.mark.slow
def test_evaluation_files_and_layout(trained, evaluation):
    run_dir = evaluation.run_dir
    for name in ("predictions.csv", "metrics.csv", "evaluation.json"):
        assert (run_dir / name).is_file(), name
    preds = pd.read_csv(run_dir / "predictions.csv")
    assert list(preds.columns) == ["split", "row", "label", "prob", "prob_tta"]
    assert preds.groupby("split", sort=False).size().to_dict() == SIZES
    for split, n in SIZES.items():
        part = preds[preds.split == split]
        assert part.row.tolist() == list(range(n))
        labels = PCamSplit(trained["data_dir"], split).labels
        np.testing.assert_array_equal(part.label.to_numpy(), labels)
        assert part.prob.between(0, 1).all()
        # TTA is skipped on train by design, done on valid and test.
        assert part.prob_tta.isna().all() == (split == "train")
    assert preds.prob.nunique() > 10, "predictions should not be constant"

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns) == ["arch", "split", "variant", "metric", "value",
                                     "ci_low", "ci_high"]
    assert set(zip(metrics.split, metrics.variant, strict=True)) == {
        ("train", "plain"), ("valid", "plain"), ("valid", "tta"), ("test", "plain"),
        ("test", "tta")}
    assert (metrics.arch == ARCHS[0]).all()
    saved = json.loads((run_dir / "evaluation.json").read_text())
    assert set(saved["fastai_validate"]) == {"valid_loss", "accuracy", "auc"}
    assert saved["key"]["evaluation"]["splits"] == ["train", "valid", "test"]
    pd.testing.assert_frame_equal(evaluation.predictions, preds)
    assert evaluation.value("test", "auc") == metrics.query(
        "split == 'test' and variant == 'plain' and metric == 'auc'").value.iloc[0]
    with pytest.raises(KeyError):
        evaluation.value("train", "auc", "tta")


@pytest.mark.slow
def test_metrics_equal_sklearn_on_saved_predictions(evaluation):
    preds = pd.read_csv(evaluation.run_dir / "predictions.csv")
    metrics = pd.read_csv(evaluation.run_dir / "metrics.csv")
    checked = 0
    for (split, variant), m in metrics.groupby(["split", "variant"]):
        part = preds[preds.split == split]
        y = part.label.to_numpy()
        prob = part["prob" if variant == "plain" else "prob_tta"].to_numpy()
        pred = (prob >= 0.5).astype(int)
        tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
        expected = {
            "accuracy": accuracy_score(y, pred),
            "balanced_accuracy": balanced_accuracy_score(y, pred),
            "auc": roc_auc_score(y, prob),
            "nll": log_loss(y, prob, labels=[0, 1]),
            "sensitivity": recall_score(y, pred, pos_label=1),
            "specificity": recall_score(y, pred, pos_label=0),
            "tn": tn, "fp": fp, "fn": fn, "tp": tp, "n": len(y),
        }
        got = m.set_index("metric")
        for name, value in expected.items():
            assert got.loc[name, "value"] == pytest.approx(value, rel=1e-9, abs=1e-12), (
                split, variant, name)
            checked += 1
        for name in ("accuracy", "auc", "nll"):
            low, high = got.loc[name, "ci_low"], got.loc[name, "ci_high"]
            assert np.isfinite(low) and np.isfinite(high) and low <= high
        assert got.loc[["sensitivity", "tn"], "ci_low"].isna().all()
    assert checked == 5 * 11


@pytest.mark.slow
def test_fastai_validate_matches_saved_valid_predictions(evaluation):
    """Predictions go through the validation pipeline: fastai's own numbers agree."""
    preds = pd.read_csv(evaluation.run_dir / "predictions.csv").query("split == 'valid'")
    y, prob = preds.label.to_numpy(), preds.prob.to_numpy()
    fv = evaluation.fastai_validate
    # fastai's accuracy is argmax (p1 > 0.5); no probability sits exactly at 0.5 here.
    assert not np.any(prob == 0.5)
    assert np.float32(fv["accuracy"]) == np.float32(np.mean((prob > 0.5) == y))
    assert fv["auc"] == pytest.approx(roc_auc_score(y, prob), abs=1e-6)
    assert fv["valid_loss"] == pytest.approx(log_loss(y, prob, labels=[0, 1]), abs=1e-4)
    assert fv["accuracy"] == pytest.approx(evaluation.value("valid", "accuracy"), abs=1e-7)


# --------------------------------------------------------------------------- TTA


def test_symmetric_fixture_images_are_dihedral_invariant():
    x = symmetric_images(4, np.random.default_rng(1))
    x[1, 32:64, 32:64, 2] = 40
    for view in dihedral_views(x):
        np.testing.assert_array_equal(view, x)


@pytest.mark.slow
def test_tta_of_invariant_images_equals_plain_in_evaluation(evaluation):
    preds = evaluation.predictions.query("split != 'train'")
    assert len(preds) == SIZES["valid"] + SIZES["test"]
    np.testing.assert_allclose(preds.prob_tta, preds.prob, rtol=0, atol=1e-5)
    m = evaluation.metrics.set_index(["split", "variant", "metric"]).value
    for split in ("valid", "test"):
        assert m[(split, "tta", "accuracy")] == m[(split, "plain", "accuracy")]
        assert m[(split, "tta", "auc")] == pytest.approx(m[(split, "plain", "auc")], abs=1e-3)


@pytest.mark.slow
def test_predict_probs_tta_on_invariant_split(trained, learner):
    data = PCamSplit(trained["data_dir"], "valid")
    plain = E.predict_probs(learner, data)
    tta = E.predict_probs(learner, data, tta=True)
    assert plain.shape == tta.shape == (SIZES["valid"],)
    assert plain.dtype == np.float64
    np.testing.assert_allclose(tta, plain, rtol=0, atol=1e-5)
    # Row order and pipeline are the validation loader's.
    fastai_probs, _ = learner.get_preds(dl=learner.dls.valid)
    np.testing.assert_allclose(plain, fastai_probs[:, 1].numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_predict_probs_tta_averages_the_eight_dihedral_views(learner, tmp_path):
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (24, 96, 96, 3), dtype=np.uint8)
    x[:, 10:40, 50:90, 2] = 30  # asymmetric structure: TTA must matter
    y = (np.arange(24) % 2).astype(np.uint8)
    write_split(tmp_path / "orig", "test", x, y)
    for k, view in enumerate(dihedral_views(x)):
        write_split(tmp_path / f"view{k}", "test", view, y)
    tta = E.predict_probs(learner, PCamSplit(tmp_path / "orig", "test"), tta=True)
    plain = E.predict_probs(learner, PCamSplit(tmp_path / "orig", "test"))
    views = [E.predict_probs(learner, PCamSplit(tmp_path / f"view{k}", "test"))
             for k in range(8)]
    np.testing.assert_allclose(tta, np.mean(views, axis=0), rtol=0, atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-4, "TTA changed nothing on asymmetric images"


# --------------------------------------------------------------------------- reuse


@pytest.mark.slow
def test_evaluation_is_reused_when_nothing_changed(trained, evaluation, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an up-to-date evaluation must be reused")

    monkeypatch.setattr(E, "predict_probs", forbidden)
    monkeypatch.setattr(E, "load_best_learner", forbidden)
    again = E.evaluate_run(trained["profile"], ARCHS[0], runs_root=trained["runs"],
                           progress=False)
    pd.testing.assert_frame_equal(again.predictions, evaluation.predictions)
    pd.testing.assert_frame_equal(again.metrics, evaluation.metrics)
    assert again.fastai_validate == evaluation.fastai_validate


@pytest.mark.slow
def test_evaluation_is_recomputed_when_best_model_changes(trained, evaluation, tmp_path,
                                                          monkeypatch):
    runs = tmp_path / "runs"
    shutil.copytree(trained["runs"], runs)
    profile = trained["profile"]
    calls = []
    real = E.predict_probs

    def counting(*args, **kwargs):
        calls.append(kwargs.get("tta", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "predict_probs", counting)
    E.evaluate_run(profile, ARCHS[0], runs_root=runs, progress=False)
    assert calls == [], "a copied, unchanged run keeps its evaluation"

    best = R.run_dir_for(profile, ARCHS[0], runs) / "best.pth"
    state = R.load_checkpoint(best)
    last_weight = [k for k in state if k.endswith("weight")][-1]
    state[last_weight] = -state[last_weight]
    mtime = best.stat().st_mtime_ns
    torch.save(state, best)
    os.utime(best, ns=(mtime + 2_000_000_000, mtime + 2_000_000_000))
    changed = E.evaluate_run(profile, ARCHS[0], runs_root=runs, progress=False)
    assert calls.count(False) == 3 and calls.count(True) == 2
    assert not np.allclose(changed.predictions.prob, evaluation.predictions.prob, atol=1e-3)
    saved = json.loads((best.parent / "evaluation.json").read_text())
    assert saved["key"]["best_sha256"] == E._sha256(best)
    pd.testing.assert_frame_equal(pd.read_csv(best.parent / "predictions.csv"),
                                  changed.predictions)


@pytest.mark.slow
def test_tta_only_on_the_tta_splits(trained, evaluation, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(trained["runs"], runs)
    profile = dataclasses.replace(trained["profile"], tta_splits=("test",))
    ev = E.evaluate_run(profile, ARCHS[0], runs_root=runs, progress=False)
    preds = ev.predictions
    assert preds[preds.split == "valid"].prob_tta.isna().all()
    assert preds[preds.split == "test"].prob_tta.notna().all()
    assert {(s, v) for s, v in zip(ev.metrics.split, ev.metrics.variant, strict=True)} == {
        ("train", "plain"), ("valid", "plain"), ("test", "plain"), ("test", "tta")}
    pd.testing.assert_frame_equal(ev.predictions.drop(columns="prob_tta"),
                                  evaluation.predictions.drop(columns="prob_tta"))


def test_tta_splits_are_checked():
    with pytest.raises(ValueError, match="tta_splits must be a non-empty subset of valid, test"):
        get_profile("sample", tta_splits=["train"])


# --------------------------------------------------------------------------- comparison


@pytest.mark.slow
def test_compare_runs_two_architectures(trained, evaluation):
    profile = trained["profile"]
    comp = E.compare_runs(profile, ARCHS, runs_root=trained["runs"], progress=False)
    assert list(comp.evaluations) == ARCHS

    t1 = comp.table1
    assert list(t1.columns) == TABLE1_COLUMNS
    assert t1.arch.tolist() == ARCHS
    for _, row in t1.iterrows():
        ev = comp.evaluations[row.arch]
        for split in ("train", "valid", "test"):
            assert row[f"{split}_accuracy"] == ev.value(split, "accuracy")
        assert row.test_auc == ev.value("test", "auc")
        assert row.test_auc_tta == ev.value("test", "auc", "tta")
        assert row.test_auc_ci_low <= row.test_auc_ci_high
    pd.testing.assert_frame_equal(comp.evaluations[ARCHS[0]].metrics, evaluation.metrics)

    paired = comp.paired
    expected_tests = {"DeLong AUC", "paired bootstrap AUC", "McNemar accuracy"}
    for variant in ("plain", "tta"):
        assert set(paired[paired.variant == variant].test) == expected_tests
    assert (paired.model_a == ARCHS[0]).all() and (paired.model_b == ARCHS[1]).all()
    assert paired.p_value.between(0, 1).all()
    y, pa = comp.roc_data()[ARCHS[0]]
    _, pb = comp.roc_data()[ARCHS[1]]
    delong = paired.query("variant == 'plain' and test == 'DeLong AUC'").iloc[0]
    assert delong.estimate == pytest.approx(roc_auc_score(y, pa) - roc_auc_score(y, pb),
                                            abs=1e-9)

    for arch in ARCHS:
        assert arch in comp.verdict

    study = comp.study_comparison
    assert set(study.arch) == set(ARCHS)
    assert (study.family == "ResNet").all()
    np.testing.assert_allclose(study.delta, study.measured - study.study, equal_nan=True)
    zhao = study[(study.reference == REFERENCE_ZHAO) & study.metric.isin(STUDY_TABLE1.columns)]
    assert len(zhao) == 2 * len(STUDY_TABLE1.columns)
    for _, row in zhao.iterrows():
        assert row.study == STUDY_TABLE1.loc["ResNet", row.metric]
        measured = t1.set_index("arch").loc[row.arch, row.metric]
        assert row.measured == measured
        assert row.delta == pytest.approx(measured - row.study)

    assert set(comp.histories) == set(ARCHS)
    assert all(len(h) == 1 for h in comp.histories.values())
    assert set(comp.confusion_matrices()) == set(ARCHS)
