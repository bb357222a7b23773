"""How much the sample run's key metrics move between runs and between machines.

Trains and evaluates the ``sample`` profile (both architectures, fresh runs) under
several conditions in subprocesses, one after the other, and writes each condition's
Table 1 and the largest difference from the first condition per metric. The tolerance of
``tests/test_sample_report.py`` is derived from this.

Conditions: the default twice (run-to-run), 1 torch thread instead of 2 (another
reduction order), and AVX2 instead of AVX-512 kernels in both ATen and oneDNN (what an
older or an AMD CPU runs).

Usage::

    python bench/sample_variation.py --out reports/bench/sample_variation.csv
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
CONDITIONS = {
    "default": {},
    "default (again)": {},
    "1 thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "avx2 kernels": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
METRICS = ("train_accuracy", "valid_accuracy", "test_accuracy", "test_auc", "test_nll",
           "test_auc_tta")


def run_condition(name: str, env_extra: dict, work: Path) -> pd.DataFrame:
    runs = work / name.replace(" ", "_").replace("(", "").replace(")", "")
    env = {**os.environ, **env_extra}
    base = [sys.executable, "-m", "pcamlib"]
    for command in ("train", "evaluate"):
        subprocess.run([*base, command, "--profile", "sample", "--runs-dir", str(runs),
                        "--quiet"], check=True, env=env, cwd=REPO, capture_output=True)
    rows = []
    for arch in ("densenet121", "resnet18"):
        metrics = pd.read_csv(runs / "sample" / arch / "metrics.csv")
        row = {"condition": name, "arch": arch}
        for key in METRICS:
            split, metric = key.split("_", 1)
            variant = "tta" if metric.endswith("_tta") else "plain"
            metric = metric.removesuffix("_tta")
            sel = metrics[(metrics.split == split) & (metrics.metric == metric)
                          & (metrics.variant == variant)]
            row[key] = float(sel.value.iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" /
                        "sample_variation.csv")
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "pcamlib", "sample", "--quiet"], check=True, cwd=REPO)
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in CONDITIONS.items():
            start = time.time()
            tables.append(run_condition(name, env, Path(tmp)))
            print(f"{name}: {time.time() - start:.0f} s", flush=True)
    table = pd.concat(tables, ignore_index=True)
    first = table[table.condition == "default"].set_index("arch")[list(METRICS)]
    deltas = []
    for name in CONDITIONS:
        other = table[table.condition == name].set_index("arch")[list(METRICS)]
        delta = (other - first).abs().max()
        deltas.append({"condition": name, "arch": "max |delta| vs default", **delta.to_dict()})
    out = pd.concat([table, pd.DataFrame(deltas)], ignore_index=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out, index=False)
    print(out.to_string(index=False))


if __name__ == "__main__":
    main()
