"""bench/bench_predict.py: runs end to end on tiny sizes; run_all summarises its CSV.

Timings are never asserted (the CPUs are shared): only the columns, rows and the
consistency of the ratios, and the verdicts run_all derives from a given CSV.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_bench import _load

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def _load_run_all():
    return _load("run_all")


def _predict_csv(path: Path, growth_mb: float) -> None:
    common = {"arch": "resnet18", "device": "cpu", "batch_size": 128, "torch_threads": 1}
    pd.DataFrame([
        {"measure": "predict", "input": "bare_forward", **common, "items": 1024,
         "seconds": 6.4, "items_per_s": 160.0, "ratio_vs_bare": 1.0},
        {"measure": "predict", "input": "predict_hdf5", **common, "items": 1024,
         "seconds": 6.7, "items_per_s": 152.0, "ratio_vs_bare": 0.95},
        {"measure": "predict", "input": "predict_jpeg", **common, "items": 1024,
         "seconds": 7.5, "items_per_s": 136.0, "ratio_vs_bare": 0.85},
        {"measure": "slide", "input": "10000x10000", **common, "items": 1100, "seconds": 9.0,
         "items_per_s": 140.0, "ratio_vs_bare": 0.875, "peak_rss_mb": 1200.0,
         "baseline_rss_mb": 990.0},
        {"measure": "slide", "input": "20000x20000", **common, "items": 4300, "seconds": 33.0,
         "items_per_s": 141.0, "ratio_vs_bare": 0.88, "peak_rss_mb": 1200.0 + growth_mb,
         "baseline_rss_mb": 990.0},
    ]).to_csv(path, index=False)


@pytest.mark.parametrize(("growth", "rss_verdict"), [(12.0, "PASS"), (150.0, "FAIL")])
def test_summary_rows(tmp_path, growth, rss_verdict):
    _predict_csv(tmp_path / "predict.csv", growth)
    run_all = _load_run_all()
    rows = {r["measure"]: r for r in run_all.key_ratios(tmp_path) if r["benchmark"] == "predict"}
    assert rows["predict_hdf5 / bare forward, resnet18 on cpu (152.0 img/s)"]["verdict"] \
        == "PASS"
    assert rows["predict_jpeg / bare forward, resnet18 on cpu (136.0 img/s)"]["verdict"] \
        == "FAIL"
    slide_row = rows["slide 20000x20000 px, resnet18 (4,300 tissue tiles, 0.88 of bare forward)"]
    assert slide_row["value"] == "141.0 tiles/s" and slide_row["verdict"] == "info"
    rss = [r for m, r in rows.items() if m.startswith("slide peak RSS")]
    assert len(rss) == 1 and rss[0]["verdict"] == rss_verdict
    assert rss[0]["value"] == f"{growth:+,.0f} MB"
    assert run_all.main(["--summary-only", "--out", str(tmp_path)]) == 0
    assert "## predict" in (tmp_path / "SUMMARY.md").read_text()


def test_help():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_predict.py"), "--help"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.startswith("usage:") and "--slides" in proc.stdout


@pytest.mark.slow
@pytest.mark.bench_run
def test_quick_run_through_run_all(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--only", "predict", "--out",
         str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    frame = pd.read_csv(tmp_path / "predict.csv")
    predict = frame[frame.measure == "predict"].set_index("input")
    assert list(predict.index) == ["bare_forward", "predict_hdf5", "predict_jpeg"]
    assert (predict["items"] == 128).all() and predict.loc["bare_forward", "ratio_vs_bare"] == 1
    for name in ("predict_hdf5", "predict_jpeg"):
        assert predict.loc[name, "ratio_vs_bare"] == pytest.approx(
            predict.loc[name, "items_per_s"] / predict.loc["bare_forward", "items_per_s"],
            rel=0.01)
    slides = frame[frame.measure == "slide"]
    assert slides.input.tolist() == ["4096x4096", "8192x8192"]
    assert (slides["items"] > 128).all()  # several full batches of tissue tiles
    assert slides["items"].iloc[1] > 3 * slides["items"].iloc[0]  # 4x the area
    assert (slides.peak_rss_mb >= slides.baseline_rss_mb).all()
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "| predict | ok |" in text and "slide peak RSS 4096x4096 -> 8192x8192" in text
