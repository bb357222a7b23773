"""One run identity: training, evaluation and its cache agree on what a run is.

Each kind of mismatch (a training setting, the data, the learning rate, a run from an
older pcamlib) is refused with the differing fields named; what only changes the
evaluation (its settings, the test data, the weights) invalidates the cached predictions.
Checkpoints never unpickle objects.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import ARCH, make_profile, write_toy_pcam

import pcamlib.evaluate as E
import pcamlib.runs as R
import pcamlib.train as T
from pcamlib.cli import main
from pcamlib.pcam import PCamWriter, file_name
from pcamlib.report import ReportContext, evaluate_step

pytestmark = pytest.mark.usefixtures("empty_weights_cache")

MARKER_NAME = "payload-ran"
SETTINGS = {"epochs": 1, "n_boot": 20, "lrs": {"resnet": 0.002}}


class Payload:
    """Unpickling this object creates a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run (evaluated once) on toy data."""
    root = tmp_path_factory.mktemp("identity")
    data_dir = write_toy_pcam(root / "pcam")
    profile = make_profile(data_dir, **SETTINGS)
    runs = root / "runs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T.train(profile, ARCH, runs_root=runs, progress=False)
        E.evaluate_run(profile, ARCH, runs_root=runs, progress=False)
    return {"profile": profile, "runs": runs, "data_dir": data_dir, "root": root}


def copied_runs(finished, tmp_path) -> Path:
    runs = tmp_path / "runs"
    shutil.copytree(finished["runs"], runs)
    return runs


def evaluate(profile, runs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return E.evaluate_run(profile, ARCH, runs_root=runs, progress=False)


def eval_key(runs, profile) -> dict:
    path = R.run_dir_for(profile, ARCH, runs) / "evaluation.json"
    return json.loads(path.read_text())["key"]


# --------------------------------------------------------------------------- mismatches


@pytest.mark.slow
@pytest.mark.parametrize(("override", "field"), [
    ({"centre_crop": 64}, "centre_crop: run None, requested 64"),
    ({"lrs": {"resnet": 0.02}}, "lr: run 0.002, requested 0.02"),
    ({"augment": {"max_rotate": 5.0}}, "augment.max_rotate: run 15.0, requested 5.0"),
    ({"train_rows": 64}, "train_rows: run None, requested 64"),
    ({"moms": [0.9, 0.9, 0.9]}, "moms: run [0.95, 0.85, 0.95], requested [0.9, 0.9, 0.9]"),
], ids=["training-field", "learning-rate", "augmentation", "train-rows", "momentum"])
def test_evaluation_refuses_a_run_of_other_settings(finished, override, field):
    profile = make_profile(finished["data_dir"], **{**SETTINGS, **override})
    with pytest.raises(R.RunMismatchError) as err:
        evaluate(profile, finished["runs"])
    assert field in str(err.value)
    assert field in err.value.differences


@pytest.mark.slow
def test_evaluation_refuses_other_data(finished, tmp_path):
    other = write_toy_pcam(tmp_path / "other", seed=7)
    profile = make_profile(other, **SETTINGS)
    with pytest.raises(R.RunMismatchError) as err:
        evaluate(profile, finished["runs"])
    assert any(d.startswith("data.train.sha256:") for d in err.value.differences)
    assert any(d.startswith("data.valid.sha256:") for d in err.value.differences)


@pytest.mark.slow
def test_same_data_elsewhere_is_the_same_run(finished, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(finished["data_dir"], moved)
    runs = copied_runs(finished, tmp_path)
    before = eval_key(runs, finished["profile"])
    evaluation = evaluate(make_profile(moved, **SETTINGS), runs)
    assert eval_key(runs, finished["profile"]) == before, "cached predictions are reused"
    assert len(evaluation.predictions) == 128 + 64 + 64


@pytest.mark.slow
def test_run_without_identity_is_refused(finished, tmp_path):
    runs = copied_runs(finished, tmp_path)
    params_path = R.run_dir_for(finished["profile"], ARCH, runs) / "params.json"
    params = json.loads(params_path.read_text())
    flat = {**params["identity"], **params["resolved"]}  # the layout older runs had
    params_path.write_text(json.dumps(flat))
    with pytest.raises(R.RunMismatchError, match="older pcamlib"):
        evaluate(finished["profile"], runs)


@pytest.mark.slow
def test_training_refuses_to_resume_with_other_data(finished, tmp_path):
    runs = copied_runs(finished, tmp_path)
    other = write_toy_pcam(tmp_path / "other", seed=7)
    profile = make_profile(other, **SETTINGS)
    history_before = R.read_history(R.run_dir_for(profile, ARCH, runs))
    with pytest.raises(R.RunMismatchError, match="data.train.sha256"):
        T.train(profile, ARCH, runs_root=runs, progress=False)
    assert R.read_history(R.run_dir_for(profile, ARCH, runs)).equals(history_before)


@pytest.mark.slow
def test_cli_evaluate_names_the_differing_field(finished, capsys):
    code = main(["evaluate", "--profile", "sample", "--data-dir", str(finished["data_dir"]),
                 "--runs-dir", str(finished["runs"]), "--archs", ARCH, "--quiet",
                 "--set", "centre_crop=64", "--set", "epochs=1", "--set", "bs=32",
                 "--set", "n_boot=20", "--set", "pretrained=no", "--set", "lr_find_iters=10",
                 "--set", 'lrs={"resnet": 0.002}'])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "centre_crop: run None, requested 64" in err


# --------------------------------------------------------------------------- evaluation cache


@pytest.mark.slow
def test_cache_is_keyed_on_evaluation_settings(finished, tmp_path):
    runs = copied_runs(finished, tmp_path)
    before = eval_key(runs, finished["profile"])
    profile = make_profile(finished["data_dir"], **{**SETTINGS, "n_boot": 30})
    evaluate(profile, runs)
    after = eval_key(runs, profile)
    assert after != before and after["evaluation"]["n_boot"] == 30


@pytest.mark.slow
def test_cache_is_keyed_on_the_test_data(finished, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(finished["data_dir"], data)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (64, 96, 96, 3), dtype=np.uint8)
    for kind in ("x", "y", "meta"):
        (data / file_name("test", kind)).unlink(missing_ok=True)
    with PCamWriter(data, "test", 64) as writer:
        writer.write(x, (np.arange(64) % 2).astype(np.uint8))
    runs = copied_runs(finished, tmp_path)
    old = evaluate(finished["profile"], runs)
    new = evaluate(make_profile(data, **SETTINGS), runs)
    old_test = old.predictions.query("split == 'test'").prob.to_numpy()
    new_test = new.predictions.query("split == 'test'").prob.to_numpy()
    assert not np.allclose(old_test, new_test), "new test images must be predicted anew"


@pytest.mark.slow
def test_cache_is_keyed_on_the_weights_not_their_timestamp(finished, tmp_path):
    runs = copied_runs(finished, tmp_path)
    profile = finished["profile"]
    best = R.run_dir_for(profile, ARCH, runs) / "best.pth"
    old = evaluate(profile, runs)
    stat = best.stat()
    weights = R.load_checkpoint(best)
    for value in weights.values():
        if value.is_floating_point():
            value.mul_(0.5)
    R.save_checkpoint(weights, best)
    os.utime(best, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime
    assert best.stat().st_size == stat.st_size
    new = evaluate(profile, runs)
    assert not np.allclose(old.predictions.prob, new.predictions.prob)


# --------------------------------------------------------------------------- missing runs


@pytest.mark.slow
def test_evaluate_step_does_not_train_a_missing_run(finished, tmp_path):
    ctx = ReportContext(finished["profile"], tmp_path / "report", tmp_path / "empty-runs",
                        progress=False)
    with pytest.raises(R.MissingRunError, match=r"pcamlib train --profile sample --archs "):
        evaluate_step(ctx, [ARCH])
    assert not (tmp_path / "empty-runs").exists() or not any((tmp_path / "empty-runs").iterdir())


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("name", ["checkpoint.pth", "best.pth"])
def test_checkpoint_with_a_pickle_payload_is_refused(finished, tmp_path, name):
    runs = copied_runs(finished, tmp_path)
    profile = finished["profile"]
    run_dir = R.run_dir_for(profile, ARCH, runs)
    marker = tmp_path / MARKER_NAME
    state = R.load_checkpoint(run_dir / name)
    state["extra"] = Payload(marker) if name == "checkpoint.pth" else None
    if name == "best.pth":
        state = {"weights": state, "payload": Payload(marker)}
    torch.save(state, run_dir / name)
    if name == "checkpoint.pth":
        (run_dir / "run.json").unlink()  # unfinished: training resumes from the checkpoint

        def action():
            return T.train(profile, ARCH, runs_root=runs, progress=False)
    else:

        def action():
            return E.evaluate_run(profile, ARCH, runs_root=runs, progress=False, reuse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(R.CheckpointError) as err:
            action()
    assert str(run_dir / name) in str(err.value) and "refused" in str(err.value)
    assert not marker.exists(), "the payload must never run"


def test_checkpoint_round_trip_of_rng_states_is_plain_data(tmp_path):
    import random

    rng = random.Random(5)
    state = R.rng_state(rng)
    R.save_checkpoint({"rng": state}, tmp_path / "c.pth")
    loaded = R.load_checkpoint(tmp_path / "c.pth")["rng"]
    expected = (torch.rand(3), np.random.rand(3), random.random(), rng.random())
    R.restore_rng(rng, loaded)
    got = (torch.rand(3), np.random.rand(3), random.random(), rng.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2:] == got[2:]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "best.pth"
    torch.save({"w": torch.ones(3)}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(R.CheckpointError, match="not a readable PyTorch checkpoint"):
        R.load_checkpoint(path)


def test_a_setting_added_later_counts_as_its_default():
    recorded = {"epochs": 3, "augment": {"max_rotate": 15.0}}
    assert R.differences(recorded, {"epochs": 3, "mixup": 0.0,
                                    "augment": {"max_rotate": 15.0, "stain_jitter": 0.0}}) == []
    assert R.differences(recorded, {"epochs": 3, "mixup": 0.4,
                                    "augment": {"max_rotate": 15.0}}) == [
        "mixup: run 0.0, requested 0.4"]
