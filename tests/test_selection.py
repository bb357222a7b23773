"""Selection trials: valid metrics only, from finished runs; the committed table is sound."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
from test_train import ARCH, make_profile, write_toy_pcam

import pcamlib.evaluate as E
import pcamlib.runs as R
import pcamlib.train as T
from pcamlib import selection as S
from pcamlib.cli import main

pytestmark = pytest.mark.usefixtures("empty_weights_cache")


def test_committed_real_subset_trials_have_no_test_column_and_commands():
    table = S.read_trials("real-subset")
    assert table is not None, "reports/selection/real_subset_trials.csv is committed"
    assert list(table.columns) == S.TRIAL_COLUMNS
    assert not [c for c in table.columns if "test" in c]
    assert table.trial.is_unique
    assert table.command.str.startswith("pcamlib train --profile real-subset").all()
    assert table.source.notna().all()


@pytest.fixture(scope="module")
def trial_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trial")
    data_dir = write_toy_pcam(root / "pcam")
    profile = make_profile(data_dir, epochs=1, n_boot=20, eval_splits=["valid"],
                           lrs={"resnet": 0.002})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T.train(profile, ARCH, runs_root=root / "runs", progress=False)
        E.evaluate_run(profile, ARCH, runs_root=root / "runs", progress=False)
    return {"profile": profile, "run_dir": R.run_dir_for(profile, ARCH, root / "runs"),
            "root": root, "data_dir": data_dir}


@pytest.mark.slow
def test_trial_row_reads_valid_metrics_of_the_run(trial_run):
    row = S.trial_row(trial_run["run_dir"], "toy", source="test", command="pcamlib train ...")
    metrics = pd.read_csv(trial_run["run_dir"] / "metrics.csv")
    auc = metrics[(metrics.split == "valid") & (metrics.metric == "auc")
                  & (metrics.variant == "plain")].value.iloc[0]
    assert row["valid_auc"] == pytest.approx(round(auc, 4))
    assert row["arch"] == ARCH and row["lr"] == 0.002 and row["epochs"] == "1"
    assert row["early_stopping"] == "patience 3"
    assert row["other"] == ""  # fp32: nothing to add
    assert set(row) == set(S.TRIAL_COLUMNS)


@pytest.mark.slow
def test_trial_row_says_when_training_steps_ran_in_bf16(trial_run, tmp_path):
    import json
    import shutil

    run_dir = shutil.copytree(trial_run["run_dir"], tmp_path / "run")
    params = json.loads((run_dir / "params.json").read_text())
    params["resolved"]["precision"] = "bf16"
    (run_dir / "params.json").write_text(json.dumps(params))
    row = S.trial_row(run_dir, "toy", source="x", command="y", other="final run")
    assert row["other"] == "final run; bf16 training steps"


@pytest.mark.slow
def test_a_run_scored_on_test_is_refused(trial_run):
    profile = make_profile(trial_run["data_dir"], epochs=1, n_boot=20, lrs={"resnet": 0.002})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        E.evaluate_run(profile, ARCH, runs_root=trial_run["root"] / "runs", progress=False)
    with pytest.raises(ValueError, match="scored on the test split"):
        S.trial_row(trial_run["run_dir"], "toy", source="x", command="y")


def test_unevaluated_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished run"):
        S.trial_row(tmp_path, "x", source="s", command="c")


@pytest.mark.slow
def test_record_trial_cli_adds_and_replaces(trial_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(S, "SELECTION_DIR", tmp_path)
    args = ["record-trial", str(trial_run["run_dir"]), "--trial", "toy", "--profile", "sample",
            "--source", "commit abc", "--command", "pcamlib train --profile sample"]
    # the run may have been scored on test by another test; score valid only again
    profile = trial_run["profile"]
    (trial_run["run_dir"] / "evaluation.json").unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        E.evaluate_run(profile, ARCH, runs_root=trial_run["root"] / "runs", progress=False)
    assert main(args) == 0
    assert main(args) == 0  # the same trial again replaces its row
    table = pd.read_csv(tmp_path / "sample_trials.csv")
    assert table.trial.tolist() == ["toy"]
    assert "valid AUC" in capsys.readouterr().out
