"""Peak memory (RSS) of streaming a full-size PCam train file through the project's loader.

A child process imports the loader (torch, numpy, h5py, fastai, pcamlib) and records
its peak resident set size (``VmHWM`` of ``/proc/self/status``; ``ru_maxrss`` where
there is no ``/proc``): the baseline, imports only. It then streams one epoch of the
``train`` split in random order through ``PCamDataLoader`` as uint8 batches of 64 (no
model, no float conversion) and records the peak again. Running it in a fresh child
makes the peak its own and nothing else's. With ``--workers > 0`` the largest worker's
peak is reported too (workers are separate processes; each holds a few batches).

The file is generated once (contiguous uint8 HDF5, like the official one) into
``--data-dir`` (default ``data/bench/train-<rows>``: 262,144 rows, 7.2 GB; free space is
checked first) and reused on later runs. ``--small`` uses 32,768 rows and ``--quick``
4,096 (in a temporary folder), for CI.

How to read it: ``peak_streaming`` must stay <= 1.5 GB (1,500 MB) however large the
file: batches are read with ``pread`` into fresh arrays, so neither the file nor its
page cache counts towards RSS. ``delta_streaming`` (peak minus baseline) is what the
data itself costs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402 - sets sys.path for pcamlib

TARGET_MB = 1500.0  # 1.5 GB (10^6-byte MB, the stricter reading of "1.5 GB")
BATCH_SIZE = 64  # the study's batch size
SIZES = {"full": 262_144, "small": 32_768, "quick": 4096}  # rows per mode
KB = 1024  # ru_maxrss is in kilobytes on Linux
MB = 1e6


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM`` on Linux, else ``ru_maxrss``.

    ``VmHWM`` belongs to the current program image; ``ru_maxrss`` of a freshly started
    child also remembers the parent's RSS at fork time (Linux carries it over ``exec``),
    which would charge the parent's memory to the child.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KB / MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KB / MB


def _child(data_dir: Path, workers: int, bs: int) -> None:
    """Measure in this process; print one JSON line."""
    import torch  # noqa: F401 - part of the baseline: what a training process imports

    from pcamlib.data import PCamDataLoader
    from pcamlib.pcam import PCamSplit

    baseline = _peak_rss_mb()
    data = PCamSplit(data_dir, "train")
    dl = PCamDataLoader(data, bs=bs, shuffle=True, drop_last=False, num_workers=workers)
    checksum = images = 0
    t0 = time.perf_counter()
    for xb, _ in dl:
        checksum += int(xb[:, 48, 48, 0].sum())  # touch every batch
        images += len(xb)
    seconds = time.perf_counter() - t0
    del dl
    peak = _peak_rss_mb()
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * KB / MB
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak, "workers_peak_mb": workers_peak,
                      "images": images, "seconds": seconds, "checksum": checksum}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder of the generated train split (default "
                             "data/bench/train-<rows>; a temporary folder with --quick); an "
                             "existing split there is reused when it has --rows rows, else "
                             "replaced")
    parser.add_argument("--rows", type=int, default=None,
                        help=f"train rows (default {SIZES['full']:,}; --small {SIZES['small']:,}; "
                             f"--quick {SIZES['quick']:,})")
    parser.add_argument("--small", action="store_true", help="32,768 rows")
    parser.add_argument("--quick", action="store_true", help="4,096 rows in a temporary folder")
    parser.add_argument("--workers", type=int, default=0, help="loader workers")
    parser.add_argument("--bs", type=int, default=BATCH_SIZE, help="batch size")
    parser.add_argument("--out", type=Path, default=benchlib.REPORTS_DIR / "memory.csv",
                        help="CSV path (default: %(default)s)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(args.child, args.workers, args.bs)
        return 0

    mode = "quick" if args.quick else "small" if args.small else "full"
    rows = args.rows or SIZES[mode]
    temp = tempfile.TemporaryDirectory(prefix="bench-memory-") if args.data_dir is None \
        and mode == "quick" else None
    data_dir = (Path(temp.name) if temp else args.data_dir
                or benchlib.REPO_ROOT / "data" / "bench" / f"train-{rows}")
    try:
        t0 = time.perf_counter()
        print(f"data: {rows:,} rows ({rows * benchlib.ROW_BYTES / 1e9:.2f} GB) in {data_dir}",
              flush=True)
        _, made = benchlib.ensure_split(data_dir, "train", rows, progress=True)
        print(f"data {'generated' if made else 'reused'} in {time.perf_counter() - t0:.1f} s",
              flush=True)
        cmd = [sys.executable, __file__, "--child", str(data_dir), "--workers",
               str(args.workers), "--bs", str(args.bs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        if temp:
            temp.cleanup()
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
        raise SystemExit(f"bench_memory: child failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rate = result["images"] / result["seconds"]
    common = {"rows": rows, "workers": args.workers, "batch_size": args.bs}
    table = [
        {"measure": "baseline_imports", **common, "rss_mb": result["baseline_mb"],
         "target_mb": None, "verdict": "info", "seconds": None, "images_per_s": None},
        {"measure": "peak_streaming", **common, "rss_mb": result["peak_mb"],
         "target_mb": TARGET_MB,
         "verdict": "PASS" if result["peak_mb"] <= TARGET_MB else "FAIL",
         "seconds": round(result["seconds"], 2), "images_per_s": round(rate, 1)},
        {"measure": "delta_streaming", **common,
         "rss_mb": result["peak_mb"] - result["baseline_mb"], "target_mb": None,
         "verdict": "info", "seconds": None, "images_per_s": None},
    ]
    if args.workers:
        table.append({"measure": "peak_per_worker", **common, "rss_mb": result["workers_peak_mb"],
                      "target_mb": None, "verdict": "info", "seconds": None,
                      "images_per_s": None})
    for row in table:
        row["rss_mb"] = round(row["rss_mb"], 1)
    benchlib.write_csv(table, args.out)
    peak = table[1]
    print(f"peak RSS streaming {rows:,} rows: {peak['rss_mb']:,.0f} MB "
          f"(baseline {table[0]['rss_mb']:,.0f} MB; target <= {TARGET_MB:,.0f} MB): "
          f"{peak['verdict']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
