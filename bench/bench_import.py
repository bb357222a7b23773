"""Time importing one split of the shared real PCam subset (JPEG folders) to HDF5.

Usage: ``python bench/bench_import.py [--src DIR] [--split train] [--out CSV]``. The
import goes into a temporary folder that is removed afterwards; the result is printed
and written as a one-row CSV.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from pcamlib import config
from pcamlib.importer import import_image_folders
from pcamlib.pcam import SPLITS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", type=Path, default=config.SHARED_PCAM_SUBSET,
        help="image-folder source: SRC/{split}/{0,1}/*.jpg (default: %(default)s)",
    )
    parser.add_argument("--split", default="train", choices=SPLITS, help="split to import")
    parser.add_argument(
        "--out", type=Path, default=config.REPORTS_DIR / "bench" / "import.csv",
        help="one-row CSV with the result (default: %(default)s)",
    )
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)
    if not (args.src / args.split).is_dir():
        sys.exit(
            f"bench_import: source {args.src / args.split} not found; the shared real subset "
            "is only present beside the checkout (pass --src to use another folder)"
        )
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        t0 = time.perf_counter()
        result = import_image_folders(args.src, tmp, splits=[args.split], progress=args.progress)
        seconds = time.perf_counter() - t0
    images = result.splits[args.split].rows
    row = {
        "benchmark": f"import_image_folders:{args.split}",
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
        "cpu_count": os.cpu_count(),
    }
    print(
        f"imported {images:,} images ({args.split}) in {seconds:.2f} s: "
        f"{images / seconds:,.0f} images/s on {os.cpu_count()} CPUs"
    )
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad images", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row]).to_csv(args.out, index=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
