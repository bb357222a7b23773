"""Notebooks run headless: papermill parameters, reproduce's failure contract, nbval's guard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest

from pcamlib import config
from pcamlib.pcam import file_name
from pcamlib.reproduce import NOTEBOOKS, ReproduceError, check_parameters, reproduce
from pcamlib.sample import write_sample

NB_DIR = config.NOTEBOOKS_DIR
SANITIZE = config.REPO_ROOT / "tests" / "nbval_sanitize.cfg"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("tiny-sample")
    write_sample(dest, sizes={"train": 256, "valid": 64, "test": 64}, seed=3, progress=False)
    return dest


def test_every_notebook_has_one_parameters_cell_of_literals():
    for name in NOTEBOOKS:
        nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        params = pm.inspect_notebook(str(NB_DIR / f"{name}.ipynb"))
        assert {"PROFILE", "DATA_DIR", "REPORT_DIR", "RUNS_DIR", "OVERRIDES"} <= set(params)
        assert all(k.isupper() for k in params), name


NOTEBOOK_BYTES_LIMIT = 1_000_000


def test_committed_notebooks_embed_patches_as_jpeg_and_stay_small():
    """Every tracked notebook, top-level and the sample report's executed copies."""
    paths = sorted(NB_DIR.glob("*.ipynb")) + sorted(
        (config.REPO_ROOT / "reports" / "sample" / "notebooks").glob("*.ipynb")
    )
    assert len(paths) >= 2 * len(NOTEBOOKS)
    too_big = {p.name: p.stat().st_size for p in paths if p.stat().st_size > NOTEBOOK_BYTES_LIMIT}
    assert not too_big, f"notebooks over {NOTEBOOK_BYTES_LIMIT} bytes: {too_big}"
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            for output in cell.get("outputs", []):
                if "image/jpeg" in output.get("data", {}):
                    assert "image/png" not in output["data"], f"{path.name}: PNG beside a JPEG"


def test_misspelled_parameter_is_an_error_not_a_warning():
    with pytest.raises(ValueError, match=r"04_train.ipynb: unknown parameter\(s\) \['ARHC'\]"):
        check_parameters(NB_DIR / "04_train.ipynb", {"ARHC": "resnet18"})
    with pytest.raises(ValueError, match="unknown profile parameter.*'epoch'"):
        reproduce("sample", overrides={"epoch": 1}, reports_root="/nonexistent", progress=False)


@pytest.mark.slow
def test_train_notebook_with_tiny_parameters_records_metrics(tiny_data, tmp_path):
    out = tmp_path / "04_train_resnet18.ipynb"
    pm.execute_notebook(
        str(NB_DIR / "04_train.ipynb"), str(out), kernel_name="python3", progress_bar=False,
        cwd=str(NB_DIR),
        parameters={"PROFILE": "sample", "DATA_DIR": str(tiny_data),
                    "REPORT_DIR": str(tmp_path / "report"), "RUNS_DIR": str(tmp_path / "runs"),
                    "OVERRIDES": {"epochs": 2, "n_boot": 20}, "PROGRESS": False,
                    "ARCH": "resnet18"},
    )
    run_dir = tmp_path / "runs" / "sample" / "resnet18"
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history.epoch) == [0, 1]
    assert history[["train_loss", "valid_loss"]].notna().all().all()
    assert history.accuracy.between(0, 1).all() and history.auc.between(0, 1).all()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["complete"] and run["epochs_run"] == 2 and run["pretrained"] is False
    assert (run_dir / "best.pth").is_file()
    table = pd.read_csv(tmp_path / "report" / "tables" / "history_resnet18.csv")
    pd.testing.assert_frame_equal(table, history.round(6), check_dtype=False)
    assert (tmp_path / "report" / "figures" / "loss_curves_resnet18.png").is_file()


@pytest.mark.slow
def test_failed_notebook_names_cell_and_keeps_previous_report(tiny_data, tmp_path):
    bad = tmp_path / "bad-data"
    shutil.copytree(tiny_data, bad)
    x = bad / file_name("train", "x")
    x.write_bytes(x.read_bytes()[:5000])  # truncated: validation fails inside notebook 01
    reports = tmp_path / "reports"
    previous = reports / "sample"
    previous.mkdir(parents=True)
    (previous / "REPORT.md").write_text("previous complete report\n")
    with pytest.raises(ReproduceError) as err:
        reproduce("sample", data_dir=bad, reports_root=reports, runs_root=tmp_path / "runs",
                  progress=False)
    message = str(err.value)
    assert "01_data_exploration" in message and "cell" in message
    assert "truncated" in message or "corrupt" in message
    assert (previous / "REPORT.md").read_text() == "previous complete report\n"
    assert (reports / ".failed-sample" / "notebooks" / "01_data_exploration.ipynb").is_file()
    assert not list(reports.glob(".tmp-*"))


def _nbval(notebook: Path, env_reports: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PCAM_REPORTS_ROOT": str(env_reports)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
         "--nbval-current-env", "--nbval-sanitize-with", str(SANITIZE), str(notebook)],
        capture_output=True, text=True, env=env, cwd=notebook.parent, timeout=900,
    )


@pytest.mark.slow
def test_nbval_guards_a_deterministic_output(tmp_path):
    source = NB_DIR / "01_data_exploration.ipynb"
    nb = nbformat.read(source, as_version=4)
    cell = next(c for c in nb.cells if c.source.strip() == 'out.tables["split_sizes"]')
    plain = cell.outputs[0]["data"]["text/plain"]
    assert "2048" in plain, "committed outputs must come from the sample profile"
    good = tmp_path / "good" / source.name
    good.parent.mkdir()
    shutil.copy(source, good)
    result = _nbval(good, tmp_path / "reports")
    assert result.returncode == 0, result.stdout[-3000:]
    # Change one deterministic value (the train split's row count) and nbval must fail.
    for key in ("text/plain", "text/html"):
        if key in cell.outputs[0]["data"]:
            cell.outputs[0]["data"][key] = cell.outputs[0]["data"][key].replace("2048", "2049", 1)
    bad = tmp_path / "bad" / source.name
    bad.parent.mkdir()
    nbformat.write(nb, bad)
    result = _nbval(bad, tmp_path / "reports")
    assert result.returncode != 0
    assert "2049" in result.stdout or "mismatch" in result.stdout.lower()
