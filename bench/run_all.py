"""Run every benchmark and write ``SUMMARY.md`` with the key ratios against their targets.

Each benchmark runs as its own subprocess (so one crash or memory peak does not touch
the others), writes ``<out>/<name>.csv`` and leaves its output in ``<out>/<name>.log``:

==========  ==================================================================  ==========
name        what                                                                target
==========  ==================================================================  ==========
loader      ``bench_loader.py``: this loader vs torchvision PCAM, PNG fastai    >= 20x
memory      ``bench_memory.py``: peak RSS streaming a 262,144-row train file    <= 1.5 GB
train       ``bench_train.py``: fastai Learner vs bare PyTorch loop             >= 0.9
inference   ``bench_inference.py``: ``predict_probs`` TTA vs plain              ~ 1/8
optim       ``bench_optim.py``: ForeachSGD vs fastai's SGD (same update), step   >= 1
            and training step
predict     ``bench_predict.py``: ``pcamlib predict`` vs the bare model;        >= 0.9,
            ``pcamlib slide`` tiles/s and peak RSS on two slide sizes           <= +100 MB
import      ``bench_import.py``: JPEG folders to HDF5 (only when ../shared      none
            exists; not with ``--quick`` unless named in ``--only``)
distributed ``bench_distributed.py``: training with 2 processes (gloo) vs 1,     none
            same data and global batch (2.0 = perfect scaling on twice the
            cores)
precision   ``bench_precision.py``: CPU training step in bf16 vs fp32            none
            (``mixed_precision="bf16"``; needs AMX or AVX512-BF16)
==========  ==================================================================  ==========

``SUMMARY.md`` has the machine (CPU count, torch, device), a table of the key ratios
with PASS/FAIL, and every benchmark's full table. GPU results are not produced here:
copy ``gpu.csv`` and ``gpu_estimate.csv`` from a ``bench/gpu.sh`` run into ``--out`` and
run ``--summary-only`` to add them. Benchmarks that fail a target still exit 0; the exit
status is non-zero only when a benchmark crashes.

Usage::

    python bench/run_all.py             # full CPU run (several minutes; 7.2 GB of data)
    python bench/run_all.py --quick     # small sizes, about 2 minutes
    python bench/run_all.py --only loader,train --out /tmp/bench
    python bench/run_all.py --summary-only
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402 - sets sys.path for pcamlib
import pandas as pd  # noqa: E402

from pcamlib import config  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
NAMES = ("loader", "memory", "train", "inference", "optim", "predict", "import", "distributed",
         "precision")
TIMEOUT_S = 1800  # per benchmark; the full memory run generates 7.2 GB first
PAPER_TRAIN_ROWS = 262_144  # full-size train split
TARGETS = {"loader": 20.0, "memory_mb": 1500.0, "train": 0.9, "inference_min": 0.10,
           "gpu_pipeline": 0.8, "gpu_minutes": 30.0, "predict": 0.9,
           "slide_rss_growth_mb": 100.0}


def _command(name: str, out: Path, quick: bool, memory_rows: int | None) -> list[str] | None:
    """The command line of one benchmark, or None when it cannot run here."""
    script = BENCH_DIR / f"bench_{name}.py"
    cmd = [sys.executable, str(script), "--out", str(out / f"{name}.csv")]
    if name == "import":
        return cmd if config.SHARED_PCAM_SUBSET.is_dir() else None
    if name == "memory":
        if memory_rows:  # with --quick in a temporary folder, else in data/bench/
            return [*cmd, *(["--quick"] if quick else []), "--rows", str(memory_rows)]
        return [*cmd, "--small"] if quick else cmd
    return [*cmd, "--quick"] if quick else cmd


def run_benchmarks(names: list[str], out: Path, quick: bool, memory_rows: int | None,
                   timeout: float) -> list[dict]:
    """Run ``names`` one after the other; return one status row each."""
    status = []
    for name in names:
        cmd = _command(name, out, quick, memory_rows)
        if cmd is None:
            print(f"== {name}: skipped ({config.SHARED_PCAM_SUBSET} not found)", flush=True)
            status.append({"benchmark": name, "status": "skipped", "seconds": 0.0})
            continue
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        log = out / f"{name}.log"
        try:
            with log.open("w") as fh:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                    timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        seconds = time.perf_counter() - t0
        state = "ok" if rc == 0 else f"failed ({rc})"
        print(f"   {state} in {seconds:.0f} s; log {log}", flush=True)
        if rc != 0:
            print("   " + "\n   ".join(log.read_text().splitlines()[-15:]), flush=True)
        status.append({"benchmark": name, "status": state, "seconds": round(seconds, 1)})
    return status


def _read(out: Path, name: str) -> pd.DataFrame | None:
    path = out / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() else None


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def key_ratios(out: Path) -> list[dict]:
    """The headline numbers of every CSV present in ``out``, with their verdicts."""
    rows = []

    def add(bench, measure, value, target, verdict):
        rows.append({"benchmark": bench, "measure": measure, "value": value,
                     "target": target, "verdict": verdict})

    loader = _read(out, "loader")
    if loader is not None:
        for _, r in loader.iterrows():
            ratio = r["ratio_vs_torchvision"]
            if pd.isna(ratio) or r["loader"] == "torchvision_pcam":
                continue
            # The loader yields uint8 batches; float conversion, augmentation and
            # normalisation are batch transforms of the training device (the GPU there),
            # so the loader itself is what the target is about. The CPU-side pipeline
            # rows are shown for information.
            key = r["loader"] == "pcamlib_raw_uint8"
            add("loader", f"{r['loader']} / torchvision_pcam, workers={r['workers']} "
                f"({r['images_per_s']:,.0f} img/s)", f"{ratio:.1f}x",
                f">= {TARGETS['loader']:.0f}x" if key else "",
                _verdict(ratio >= TARGETS["loader"]) if key else "info")
    memory = _read(out, "memory")
    if memory is not None:
        for _, r in memory.iterrows():
            key = r["measure"] == "peak_streaming"
            size = "" if r["rows"] >= PAPER_TRAIN_ROWS else ", smaller than full size"
            add("memory", f"{r['measure']} ({r['rows']:,} rows, workers={r['workers']}{size})",
                f"{r['rss_mb']:,.0f} MB", f"<= {TARGETS['memory_mb']:,.0f} MB" if key else "",
                _verdict(r["rss_mb"] <= TARGETS["memory_mb"]) if key else "info")
    train = _read(out, "train")
    if train is not None:
        for _, r in train[train.loop == "fastai"].iterrows():
            add("train", f"fastai / bare, {r['arch']} (bs {r['batch_size']}, "
                f"{r['images_per_s']:,.1f} img/s)", f"{r['ratio_fastai_vs_bare']:.2f}",
                f">= {TARGETS['train']}", _verdict(r["ratio_fastai_vs_bare"] >= TARGETS["train"]))
    inference = _read(out, "inference")
    if inference is not None:
        for _, r in inference[inference.variant == "tta"].iterrows():
            add("inference", f"TTA / plain, {r['arch']} on {r['device']} "
                f"({r['images_per_s']:,.1f} img/s)", f"{r['ratio_vs_plain']:.3f}",
                f"~0.125, >= {TARGETS['inference_min']}",
                _verdict(r["ratio_vs_plain"] >= TARGETS["inference_min"]))
    optim = _read(out, "optim")
    if optim is not None:
        for _, r in optim[optim.optimizer == "fastai_foreach_sgd"].iterrows():
            key = r["measure"] == "step"
            add("optim", f"fastai SGD / ForeachSGD time, {r['measure']}, {r['arch']} on "
                f"{r['device']} ({r['ms_per_step']:,.2f} ms)", f"{r['ratio_vs_fastai']:.2f}x",
                ">= 1x" if key else "", _verdict(r["ratio_vs_fastai"] >= 1) if key else "info")
    precision = _read(out, "precision")
    if precision is not None:
        for _, r in precision[precision.precision == "bf16"].iterrows():
            cap = r.get("onednn_max_isa")
            cap = f", oneDNN capped at {cap}" if isinstance(cap, str) and cap else ""
            add("precision", f"fp32 / bf16 training step time, {r['arch']} on the CPU "
                f"({r['ms_per_step']:,.1f} ms; bf16 units: {r['cpu_bf16_units'] or 'none'}"
                f"{cap})",
                f"{r['ratio_vs_fp32']:.2f}x", "", "info")
    gpu_optim = _read(out, "gpu_optim")
    if gpu_optim is not None:
        for _, r in gpu_optim[gpu_optim.optimizer == "fastai_foreach_sgd"].iterrows():
            add("gpu", f"fastai SGD / ForeachSGD time, {r['measure']}, {r['arch']} "
                f"({r['ms_per_step']:,.2f} ms)", f"{r['ratio_vs_fastai']:.2f}x", "", "info")
    predict = _read(out, "predict")
    if predict is not None:
        rows_ = predict[predict.measure == "predict"]
        for _, r in rows_[rows_.input != "bare_forward"].iterrows():
            add("predict", f"{r['input']} / bare forward, {r['arch']} on {r['device']} "
                f"({r['items_per_s']:,.1f} img/s)", f"{r['ratio_vs_bare']:.2f}",
                f">= {TARGETS['predict']}", _verdict(r["ratio_vs_bare"] >= TARGETS["predict"]))
        slides = predict[predict.measure == "slide"]
        for _, r in slides.iterrows():
            add("predict", f"slide {r['input']} px, {r['arch']} ({r['items']:,} tissue tiles, "
                f"{r['ratio_vs_bare']:.2f} of bare forward)", f"{r['items_per_s']:,.1f} tiles/s",
                "", "info")
        if len(slides) >= 2:
            small, large = slides.iloc[0], slides.iloc[-1]
            growth = large["peak_rss_mb"] - small["peak_rss_mb"]
            add("predict", f"slide peak RSS {small['input']} -> {large['input']} px "
                f"({small['peak_rss_mb']:,.0f} -> {large['peak_rss_mb']:,.0f} MB)",
                f"{growth:+,.0f} MB", f"<= +{TARGETS['slide_rss_growth_mb']:.0f} MB",
                _verdict(growth <= TARGETS["slide_rss_growth_mb"]))
    distributed = _read(out, "distributed")
    if distributed is not None:
        for _, r in distributed[distributed.processes > 1].iterrows():
            add("distributed", f"{r['processes']} processes ({r['backend']}) / 1 process, "
                f"{r['arch']} (global bs {r['global_batch']}, {r['images_per_s']:,.1f} img/s, "
                f"{r['torch_threads']} thread(s) each)", f"{r['ratio_vs_1_process']:.2f}",
                "", "info")
    gpu = _read(out, "gpu")
    if gpu is not None:
        for _, r in gpu[gpu.measure == "pipeline_train"].iterrows():
            add("gpu", f"pipeline / bare training, {r['arch']} "
                f"({r['images_per_s']:,.0f} img/s)", f"{r['ratio']:.2f}",
                f">= {TARGETS['gpu_pipeline']}", _verdict(r["ratio"] >= TARGETS["gpu_pipeline"]))
        for _, r in gpu[gpu.measure == "train_2_processes_one_device"].iterrows():
            add("gpu", f"2 processes / 1 process on one device, {r['arch']} "
                f"({r['images_per_s']:,.0f} img/s)", f"{r['ratio']:.2f}", "", "info")
    estimate = _read(out, "gpu_estimate")
    if estimate is not None:
        if "variant" not in estimate:
            estimate["variant"] = "as_is"
        for variant, part in estimate.groupby("variant", sort=False):
            minutes = float(part.minutes.sum())
            key = variant == "as_is"
            add("gpu", f"paper profile estimate ({', '.join(part.arch.unique())}"
                f"{'' if key else ', ' + variant})", f"{minutes:.1f} min",
                f"<= {TARGETS['gpu_minutes']:.0f} min" if key else "",
                _verdict(minutes <= TARGETS["gpu_minutes"]) if key else "info")
    imported = _read(out, "import")
    if imported is not None:
        for _, r in imported.iterrows():
            add("import", f"{r['benchmark']} ({r['images']:,} images)",
                f"{r['images_per_s']:,.0f} img/s", "", "info")
    return rows


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no dependency on tabulate)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def write_summary(out: Path, status: list[dict] | None, quick: bool | None) -> Path:
    """Write ``out/SUMMARY.md`` from the CSVs present in ``out``."""
    info = benchlib.machine_info()
    lines = ["# Benchmark summary", "",
             f"Written {dt.datetime.now().isoformat(timespec='seconds')}"
             + ("" if quick is None else f" ({'quick' if quick else 'full'} run)") + ".", "",
             "## Machine", "",
             markdown_table(pd.DataFrame([info])), "",
             "Every number below is a ratio of two things measured side by side in one run "
             "on this machine, except the `gpu` rows, which come from a GPU machine "
             "(`bench/gpu.sh`; their CSVs name the device).", ""]
    if status:
        lines += ["## Runs", "", markdown_table(pd.DataFrame(status)), ""]
    keys = key_ratios(out)
    lines += ["## Key ratios vs targets", ""]
    if keys:
        lines += [markdown_table(pd.DataFrame(keys)), ""]
        failed = [k for k in keys if k["verdict"] == "FAIL"]
        passed = [k for k in keys if k["verdict"] == "PASS"]
        lines += [f"{len(passed)} PASS, {len(failed)} FAIL"
                  + (": " + "; ".join(f"{k['benchmark']}: {k['measure']}" for k in failed)
                     if failed else "") + ".", ""]
    else:
        lines += ["No benchmark CSVs found.", ""]
    for name in (*NAMES, "gpu", "gpu_optim", "gpu_estimate"):
        frame = _read(out, name)
        if frame is not None:
            lines += [f"## {name}", "", f"From `{name}.csv`.", "", markdown_table(frame), ""]
    path = out / "SUMMARY.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (loader/train/inference --quick, memory --small)")
    parser.add_argument("--out", type=Path, default=benchlib.REPORTS_DIR,
                        help="folder of the CSVs, logs and SUMMARY.md (default: %(default)s)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of {', '.join(NAMES)}")
    parser.add_argument("--memory-rows", type=int, default=None,
                        help="rows of the memory benchmark's train file (overrides the mode)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S,
                        help="seconds per benchmark (default: %(default)s)")
    parser.add_argument("--summary-only", action="store_true",
                        help="only rebuild SUMMARY.md from the CSVs in --out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:
        path = write_summary(args.out, None, None)
        print(path.read_text())
        return 0
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - set(NAMES))
        if unknown:
            parser.error(f"unknown benchmarks {unknown}; expected some of {', '.join(NAMES)}")
    else:
        names = [n for n in NAMES if not (args.quick and n == "import")]
    t0 = time.perf_counter()
    status = run_benchmarks(names, args.out, args.quick, args.memory_rows, args.timeout)
    path = write_summary(args.out, status, args.quick)
    print(path.read_text())
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0 if all(s["status"] in ("ok", "skipped") for s in status) else 1


if __name__ == "__main__":
    raise SystemExit(main())
