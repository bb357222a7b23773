"""Benchmarks: every script runs end to end on tiny sizes and writes the promised CSV.

Timings are never asserted (the CPUs are shared): only that each benchmark finishes,
writes the documented columns and rows, and that ratios are computed consistently.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SCRIPTS = ["bench_loader.py", "bench_memory.py", "bench_train.py", "bench_inference.py",
           "bench_optim.py", "bench_predict.py", "bench_gpu.py", "bench_distributed.py",
           "bench_precision.py",
           "sample_variation.py", "run_all.py"]
TIMEOUT = 600


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                          env=env)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    proc = _run([sys.executable, str(BENCH / script), "--help"])
    assert proc.stdout.startswith("usage:")
    assert "--out" in proc.stdout


def test_write_split_and_reuse(tmp_path):
    benchlib = _load("benchlib")
    from pcamlib.pcam import PCamSplit

    root, made = benchlib.ensure_split(tmp_path, "train", 100)
    assert made
    data = PCamSplit(root, "train")
    assert len(data) == 100
    assert data.read_images([0, 99]).shape == (2, 96, 96, 3)
    assert set(data.labels.tolist()) <= {0, 1}
    assert benchlib.ensure_split(tmp_path, "train", 100) == (tmp_path, False)
    assert benchlib.ensure_split(tmp_path, "train", 64)[1]
    assert benchlib.split_rows(tmp_path, "train") == 64
    assert benchlib.split_rows(tmp_path, "valid") is None


def test_free_space_check_names_the_shortfall(tmp_path):
    benchlib = _load("benchlib")
    with pytest.raises(SystemExit, match="not enough free disk space"):
        benchlib.check_free_space(tmp_path / "not" / "yet", 10**18)


def test_summary_from_csvs(tmp_path):
    pd.DataFrame([
        {"loader": "pcamlib_raw_uint8", "workers": 0, "batch_size": 64, "images": 640,
         "seconds": 0.1, "images_per_s": 6400.0, "ratio_vs_torchvision": 32.0},
        {"loader": "torchvision_pcam", "workers": 0, "batch_size": 64, "images": 640,
         "seconds": 3.2, "images_per_s": 200.0, "ratio_vs_torchvision": 1.0},
        {"loader": "pcamlib_raw_uint8", "workers": 2, "batch_size": 64, "images": 640,
         "seconds": 0.1, "images_per_s": 2000.0, "ratio_vs_torchvision": 10.0},
        {"loader": "torchvision_pcam", "workers": 2, "batch_size": 64, "images": 640,
         "seconds": 3.2, "images_per_s": 200.0, "ratio_vs_torchvision": 1.0},
    ]).to_csv(tmp_path / "loader.csv", index=False)
    pd.DataFrame([{"measure": "peak_streaming", "rows": 262_144, "workers": 0,
                   "batch_size": 64, "rss_mb": 900.0, "target_mb": 1500.0, "verdict": "PASS",
                   "seconds": 10.0, "images_per_s": 26000.0}]).to_csv(tmp_path / "memory.csv",
                                                                      index=False)
    pd.DataFrame([
        {"arch": "resnet18", "loop": "bare", "batch_size": 64, "steps": 6, "images": 384,
         "seconds": 1.0, "images_per_s": 384.0, "ratio_fastai_vs_bare": 1.0},
        {"arch": "resnet18", "loop": "fastai", "batch_size": 64, "steps": 6, "images": 384,
         "seconds": 1.1, "images_per_s": 349.0, "ratio_fastai_vs_bare": 0.91},
    ]).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame([
        {"arch": "resnet50", "measure": "pipeline_train", "images_per_s": 700.0, "ratio": 0.7},
        {"arch": "resnet50", "measure": "bare_train", "images_per_s": 1000.0, "ratio": 1.0},
    ]).to_csv(tmp_path / "gpu.csv", index=False)
    pd.DataFrame([
        {"arch": "resnet50", "variant": "as_is", "component": "train_epochs", "minutes": 20.0},
        {"arch": "resnet50", "variant": "as_is", "component": "evaluation", "minutes": 2.5},
    ]).to_csv(tmp_path / "gpu_estimate.csv", index=False)

    pd.DataFrame([
        {"arch": "resnet18", "processes": p, "backend": b, "device": "cpu", "global_batch": 64,
         "batch_per_process": 64 // p, "steps": 6, "images": 384, "seconds": s,
         "images_per_s": 384 / s, "torch_threads": 1, "ratio_vs_1_process": 1.0 / s}
        for p, b, s in ((1, "none", 1.0), (2, "gloo", 0.8))
    ]).to_csv(tmp_path / "distributed.csv", index=False)

    run_all = _load("run_all")
    assert run_all.main(["--summary-only", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "## Key ratios vs targets" in text and "cpu_count" in text
    lines = {line for line in text.splitlines() if line.startswith("| ")}
    verdicts = {line.split("|")[2].strip(): line.split("|")[-2].strip() for line in lines
                if line.count("|") == 6}
    assert verdicts["pcamlib_raw_uint8 / torchvision_pcam, workers=0 (6,400 img/s)"] \
        == "PASS"
    assert verdicts["pcamlib_raw_uint8 / torchvision_pcam, workers=2 (2,000 img/s)"] \
        == "FAIL"
    assert verdicts["peak_streaming (262,144 rows, workers=0)"] == "PASS"
    assert verdicts["fastai / bare, resnet18 (bs 64, 349.0 img/s)"] == "PASS"
    assert verdicts["pipeline / bare training, resnet50 (700 img/s)"] == "FAIL"
    assert verdicts["paper profile estimate (resnet50)"] == "PASS"
    assert verdicts["2 processes (gloo) / 1 process, resnet18 (global bs 64, 480.0 img/s, "
                    "1 thread(s) each)"] == "info"
    assert "4 PASS, 2 FAIL" in text
    for section in ("## loader", "## memory", "## train", "## distributed", "## gpu",
                    "## gpu_estimate"):
        assert section in text


@pytest.mark.slow
@pytest.mark.bench_run
def test_gpu_script_small_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = _run(["bash", str(BENCH / "gpu.sh"), "--small", "--device", "cpu"], env=env)
    frame = pd.read_csv(tmp_path / "gpu.csv")
    assert list(frame.columns) == ["arch", "measure", "images_per_s", "ratio"]
    assert set(frame.arch) == {"resnet18"}
    assert set(frame.measure) == {"loader_only", "pipeline_train", "bare_train",
                                  "bare_train_fastai_opt", "eval_plain", "eval_tta",
                                  "train_1_process", "train_2_processes_one_device"}
    assert (frame.images_per_s > 0).all()
    rate = frame.set_index("measure").images_per_s
    ratio = frame.set_index("measure").ratio
    assert ratio["pipeline_train"] == pytest.approx(
        rate["pipeline_train"] / rate["bare_train"], rel=0.01)
    assert ratio["eval_tta"] == pytest.approx(rate["eval_tta"] / rate["eval_plain"], rel=0.01)
    assert ratio["bare_train"] == 1.0
    assert ratio["train_1_process"] == 1.0  # 1 vs 2 training processes on the one device
    assert ratio["train_2_processes_one_device"] == pytest.approx(
        rate["train_2_processes_one_device"] / rate["train_1_process"], rel=0.01)
    estimate = pd.read_csv(tmp_path / "gpu_estimate.csv")
    assert list(estimate.columns) == ["arch", "variant", "component", "minutes"]
    assert set(estimate.component) == {"train_epochs", "epoch_validation", "lr_find",
                                       "evaluation"}
    assert (estimate.minutes > 0).all()
    line = re.search(r"^estimate: paper profile .* = ([\d.]+) min .*(PASS|FAIL)$", proc.stdout,
                     re.M)
    assert line, proc.stdout[-3000:]
    assert float(line.group(1)) == pytest.approx(estimate.minutes.sum(), abs=0.1)
    assert re.search(r"^pipeline/bare resnet18: [\d.]+ \(target >= 0.8\): (PASS|FAIL)$",
                     proc.stdout, re.M)
    optim = pd.read_csv(tmp_path / "gpu_optim.csv")
    assert set(optim.optimizer) == {"fastai_sgd", "fastai_foreach_sgd", "torch_sgd_foreach"}


@pytest.mark.slow
@pytest.mark.bench_run
def test_optim_quick(tmp_path):
    out = tmp_path / "optim.csv"
    _run([sys.executable, str(BENCH / "bench_optim.py"), "--quick", "--device", "cpu",
          "--out", str(out)])
    frame = pd.read_csv(out)
    assert set(frame.measure) == {"step", "train_step"} and set(frame.arch) == {"resnet18"}
    assert (frame.ms_per_step > 0).all()
    for _, part in frame.groupby("measure"):
        base = part.set_index("optimizer").ms_per_step
        ratio = part.set_index("optimizer").ratio_vs_fastai
        assert ratio["fastai_sgd"] == 1.0
        assert ratio["fastai_foreach_sgd"] == pytest.approx(
            base["fastai_sgd"] / base["fastai_foreach_sgd"], rel=0.01)


@pytest.mark.slow
@pytest.mark.bench_run
def test_precision_quick(tmp_path):
    out = tmp_path / "precision.csv"
    _run([sys.executable, str(BENCH / "bench_precision.py"), "--quick", "--out", str(out),
          "--isa-caps", "AVX2"])
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame.onednn_max_isa) == ["", "", "AVX2", "AVX2"]
    assert not list(tmp_path.glob(".*"))  # the capped process's part file is merged and gone
    for _, part in frame.groupby("onednn_max_isa"):
        part = part.set_index("precision")
        assert list(part.index) == ["fp32", "bf16"] and (part.ms_per_step > 0).all()
        assert part.loc["fp32", "ratio_vs_fp32"] == 1.0
        assert part.loc["bf16", "ratio_vs_fp32"] == pytest.approx(
            part.loc["fp32", "ms_per_step"] / part.loc["bf16", "ms_per_step"], rel=0.01)


@pytest.mark.slow
@pytest.mark.bench_run
def test_distributed_quick(tmp_path):
    out = tmp_path / "distributed.csv"
    proc = _run([sys.executable, str(BENCH / "bench_distributed.py"), "--quick", "--out",
                 str(out)])
    frame = pd.read_csv(out).set_index("processes")
    assert list(frame.index) == [1, 2]
    assert frame.loc[1, "backend"] == "none" and frame.loc[2, "backend"] == "gloo"
    assert (frame.global_batch == 32).all() and frame.batch_per_process.tolist() == [32, 16]
    assert (frame.images == 96).all() and (frame.images_per_s > 0).all()
    assert frame.loc[1, "ratio_vs_1_process"] == 1.0
    assert frame.loc[2, "ratio_vs_1_process"] == pytest.approx(
        frame.loc[2, "images_per_s"] / frame.loc[1, "images_per_s"], rel=0.01)
    assert re.search(r"^2 processes / 1 process, resnet18: [\d.]+ ", proc.stdout, re.M)


@pytest.mark.slow
@pytest.mark.bench_run
def test_loader_quick(tmp_path):
    out = tmp_path / "loader.csv"
    proc = _run([sys.executable, str(BENCH / "bench_loader.py"), "--quick", "--rounds", "1",
                 "--out", str(out)])
    frame = pd.read_csv(out)
    assert list(frame.columns)[:7] == ["loader", "workers", "batch_size", "images", "seconds",
                                       "images_per_s", "ratio_vs_torchvision"]
    assert len(frame) == 10
    assert set(frame.workers) == {0, 2}
    assert set(frame.loader) == {"pcamlib_pipeline_aug_off", "pcamlib_pipeline_aug_on",
                                 "pcamlib_raw_uint8", "torchvision_pcam", "fastai_png_folder"}
    assert (frame.images > 0).all() and (frame.batch_size == 64).all()
    assert (frame[frame.loader == "torchvision_pcam"].ratio_vs_torchvision == 1.0).all()
    for _, part in frame.groupby("workers"):
        tv = part[part.loader == "torchvision_pcam"].images_per_s.iloc[0]
        ours = part[part.loader == "pcamlib_pipeline_aug_off"].iloc[0]
        assert ours.ratio_vs_torchvision == pytest.approx(ours.images_per_s / tv, rel=0.01)
    assert "pcamlib loader vs torchvision PCAM, workers=0" in proc.stdout


@pytest.mark.slow
@pytest.mark.bench_run
def test_memory_quick(tmp_path):
    out = tmp_path / "memory.csv"
    proc = _run([sys.executable, str(BENCH / "bench_memory.py"), "--quick", "--out", str(out)])
    frame = pd.read_csv(out).set_index("measure")
    assert {"baseline_imports", "peak_streaming", "delta_streaming"} <= set(frame.index)
    assert (frame.rows == 4096).all()
    peak, base = frame.loc["peak_streaming"], frame.loc["baseline_imports"]
    assert peak.rss_mb >= base.rss_mb > 0
    assert peak.verdict in ("PASS", "FAIL") and peak.target_mb == 1500
    assert "peak RSS streaming 4,096 rows" in proc.stdout


@pytest.mark.slow
@pytest.mark.bench_run
def test_train_quick(tmp_path):
    out = tmp_path / "train.csv"
    _run([sys.executable, str(BENCH / "bench_train.py"), "--quick", "--out", str(out)])
    frame = pd.read_csv(out)
    assert list(frame.columns)[:8] == ["arch", "loop", "batch_size", "steps", "images",
                                       "seconds", "images_per_s", "torch_threads"]
    assert set(frame.loop) == {"bare", "fastai"} and set(frame.arch) == {"resnet18"}
    bare = frame[frame.loop == "bare"].iloc[0]
    fast = frame[frame.loop == "fastai"].iloc[0]
    assert bare.ratio_fastai_vs_bare == 1.0
    assert bare.images == fast.images > 0  # same number of timed steps on both sides
    assert fast.ratio_fastai_vs_bare == pytest.approx(fast.images_per_s / bare.images_per_s,
                                                      rel=0.01)


@pytest.mark.slow
@pytest.mark.bench_run
def test_inference_quick(tmp_path):
    out = tmp_path / "inference.csv"
    _run([sys.executable, str(BENCH / "bench_inference.py"), "--quick", "--rows", "64",
          "--device", "cpu", "--out", str(out)])
    frame = pd.read_csv(out).set_index("variant")
    assert set(frame.index) == {"plain", "tta"}
    assert (frame.rows == 64).all()
    assert frame.loc["plain", "ratio_vs_plain"] == 1.0
    # Eight forward passes: far slower than plain, however noisy the machine.
    assert 0.02 < frame.loc["tta", "ratio_vs_plain"] < 0.5


@pytest.mark.slow
@pytest.mark.bench_run
def test_run_all_cheap_parts(tmp_path):
    proc = _run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--only", "memory",
                 "--memory-rows", "2048", "--out", str(tmp_path)])
    assert (tmp_path / "memory.csv").is_file() and (tmp_path / "memory.log").is_file()
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "| memory | ok |" in text
    assert "peak_streaming (2,048 rows, workers=0, smaller than full size)" in text
    assert "wrote" in proc.stdout
