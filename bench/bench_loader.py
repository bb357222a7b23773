"""Loader throughput: this project's PCam loader vs torchvision's PCAM and a PNG-folder fastai.

Every loader reads the same PCam-format ``train`` file (generated: 32,768 rows by
default; ``--data-dir`` to use an existing folder with ``train`` and ``valid`` splits), in
random order, batch size 64, on the CPU, once with ``num_workers=0`` and once with 2:

- ``pcamlib_pipeline_aug_off`` / ``pcamlib_pipeline_aug_on``: this project's
  ``pcam_dataloaders(...).train`` with ``device='cpu'``: whole-batch HDF5 reads, then the
  batch pipeline to normalised float N x 3 x 96 x 96 (uint8 to float, normalisation, and
  for ``aug_on`` the default ``AugmentConfig``, all on the CPU here; on a GPU machine the
  batch transforms run on the GPU instead).
- ``pcamlib_raw_uint8``: ``PCamDataLoader`` alone: uint8 N x 96 x 96 x 3 batches.
- ``torchvision_pcam``: ``torchvision.datasets.PCAM`` (opens the HDF5 file for every
  item, PIL image, ``transforms.ToTensor()``) in a ``torch.utils.data.DataLoader``.
  The files are symlinked into the ``root/pcam/<official names>`` layout it expects.
- ``fastai_png_folder``: the study's style: ``--png-images`` patches exported once to
  PNG (untimed) and read by ``ImageDataLoaders.from_folder`` with per-item
  ``Resize(96)`` and batch transforms ``aug_transforms()`` + ``Normalize`` (ImageNet
  statistics), i.e. PIL decode and per-item collation.

Timing starts after the first batch (worker start-up excluded) and stops after one epoch
or the loader's share of its time budget, whichever comes first (torchvision and PNG get
a larger budget: they are slow). The loaders take turns over ``--rounds`` rounds, so a
burst of load from other processes hits them all alike, and each row reports its best
round. The main process runs torch with ``--threads`` intra-op threads (default 1): on
a shared machine whose cores are busy, multi-threaded batch operations stall on thread
barriers (uint8 to normalised float of one batch took 1.3 ms with 1 thread and 38 ms
with 2 on 2 busy cores), while torchvision's per-image operations are too small to be
split over threads anyway. ``ratio_vs_torchvision`` is images/s over ``torchvision_pcam``'s
at the same ``workers``: target >= 20 for this project's loader, ``pcamlib_raw_uint8`` (what
the loader hands over; the float conversion of the ``pcamlib_pipeline_*`` rows runs on the
training device, the GPU there, and is shown for information).
Run with ``--quick`` for a seconds-long smoke run on tiny sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402 - sets sys.path for pcamlib
import numpy as np  # noqa: E402

from pcamlib.pcam import PCamSplit, file_name  # noqa: E402

BATCH_SIZE = 64  # the study's batch size
TARGET_RATIO = 20.0  # this loader >= 20x torchvision's PCAM, same workers
FULL = {"rows": 32_768, "png_images": 4096, "budget": 15.0, "slow_budget": 30.0}
QUICK = {"rows": 2048, "png_images": 256, "budget": 2.0, "slow_budget": 3.0}
VALID_ROWS = 256  # pcam_dataloaders also opens a valid split; it is never iterated here


def _torchvision_root(data_dir: Path, scratch: Path) -> Path:
    """``scratch/tv`` with ``pcam/<official train names>`` symlinked to ``data_dir``'s files."""
    root = scratch / "tv"
    (root / "pcam").mkdir(parents=True, exist_ok=True)
    for kind in ("x", "y"):
        link = root / "pcam" / file_name("train", kind)
        if not link.exists():
            link.symlink_to((data_dir / file_name("train", kind)).resolve())
    return root


def _export_png(data_dir: Path, scratch: Path, n: int) -> Path:
    """Write the first ``n`` train rows as ``png/train/<label>/<row>.png`` (+ a tiny valid)."""
    from PIL import Image

    root = scratch / "png"
    data = PCamSplit(data_dir, "train", rows=min(n, PCamSplit(data_dir, "train").info.length))
    n_valid = BATCH_SIZE  # fastai needs a valid folder; one batch, never iterated
    images = data.read_images(np.arange(len(data)))
    for i, (img, label) in enumerate(zip(images, data.labels, strict=True)):
        folder = root / ("valid" if i < n_valid else "train") / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    data.close()
    return root


def _pcamlib_loader(data_dir: Path, workers: int, augment: bool, train_rows: int | None):
    from pcamlib.data import IMAGENET_STATS, AugmentConfig, pcam_dataloaders

    mean, std = IMAGENET_STATS
    dls = pcam_dataloaders(data_dir, mean=mean, std=std, bs=BATCH_SIZE,
                           augment=AugmentConfig() if augment else None, num_workers=workers,
                           device="cpu", seed=0, train_rows=train_rows)
    return dls.train


def _raw_loader(data_dir: Path, workers: int, train_rows: int | None):
    from pcamlib.data import PCamDataLoader

    return PCamDataLoader(PCamSplit(data_dir, "train", rows=train_rows), bs=BATCH_SIZE,
                          shuffle=True, drop_last=True, num_workers=workers)


def _torchvision_loader(tv_root: Path, workers: int, train_rows: int | None):
    import torch
    from torchvision import datasets, transforms

    ds = datasets.PCAM(str(tv_root), split="train", transform=transforms.ToTensor())
    if train_rows is not None:
        ds = torch.utils.data.Subset(ds, range(train_rows))
    return torch.utils.data.DataLoader(ds, batch_size=BATCH_SIZE, shuffle=True,
                                       num_workers=workers, drop_last=True)


def _fastai_png_loader(png_root: Path, workers: int):
    from fastai.vision.all import (
        ImageDataLoaders,
        Normalize,
        Resize,
        aug_transforms,
        imagenet_stats,
    )

    dls = ImageDataLoaders.from_folder(
        png_root, train="train", valid="valid", item_tfms=Resize(96),
        batch_tfms=[*aug_transforms(), Normalize.from_stats(*imagenet_stats)],
        bs=BATCH_SIZE, num_workers=workers, device="cpu")
    return dls.train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="existing PCam-format folder with train and valid splits "
                             "(default: generate --rows rows into a temporary folder)")
    parser.add_argument("--rows", type=int, default=None,
                        help=f"generated train rows (default {FULL['rows']:,}; "
                             f"--quick {QUICK['rows']:,})")
    parser.add_argument("--workers", default="0,2", help="comma-separated num_workers values")
    parser.add_argument("--png-images", type=int, default=None,
                        help=f"patches exported to PNG for fastai_png_folder "
                             f"(default {FULL['png_images']:,})")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds per fast loader (default {FULL['budget']})")
    parser.add_argument("--slow-budget", type=float, default=None,
                        help="seconds for torchvision and PNG loaders "
                             f"(default {FULL['slow_budget']})")
    parser.add_argument("--loaders", default="all",
                        help="comma-separated subset of pcamlib_pipeline_aug_off, "
                             "pcamlib_pipeline_aug_on, pcamlib_raw_uint8, torchvision_pcam, "
                             "fastai_png_folder")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds the loaders take turns over; best round reported")
    parser.add_argument("--threads", type=int, default=1, help=benchlib.THREADS_HELP)
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes: {QUICK}")
    parser.add_argument("--out", type=Path, default=benchlib.REPORTS_DIR / "loader.csv",
                        help="CSV path (default: %(default)s)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    rows = args.rows or sizes["rows"]
    png_images = args.png_images or sizes["png_images"]
    budget = args.budget or sizes["budget"]
    slow_budget = args.slow_budget or sizes["slow_budget"]
    workers_list = [int(w) for w in args.workers.split(",")]
    threads = benchlib.set_threads(args.threads)
    names = ["pcamlib_pipeline_aug_off", "pcamlib_pipeline_aug_on", "pcamlib_raw_uint8",
             "torchvision_pcam", "fastai_png_folder"]
    wanted = names if args.loaders == "all" else args.loaders.split(",")
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        parser.error(f"unknown loaders {unknown}; expected some of {names}")
    if "torchvision_pcam" not in wanted:
        print("note: without torchvision_pcam, ratio_vs_torchvision stays empty")

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        scratch = Path(tmp)
        train_rows = None
        if args.data_dir is None:
            data_dir = scratch / "data"
            t0 = time.perf_counter()
            benchlib.write_split(data_dir, "train", rows, seed=0)
            benchlib.write_split(data_dir, "valid", VALID_ROWS, seed=1)
            print(f"generated {rows:,} train rows in {time.perf_counter() - t0:.1f} s")
        else:
            data_dir = args.data_dir
            if args.rows:
                train_rows = args.rows
        data_len = train_rows or PCamSplit(data_dir, "train").info.length
        print(f"data: {data_dir} ({data_len:,} train rows), bs={BATCH_SIZE}, "
              f"workers={workers_list}, cpus={os.cpu_count()}", flush=True)
        tv_root = _torchvision_root(data_dir, scratch) if "torchvision_pcam" in wanted else None
        png_root = None
        if "fastai_png_folder" in wanted:
            t0 = time.perf_counter()
            png_root = _export_png(data_dir, scratch, png_images)
            print(f"exported {png_images:,} PNG files in {time.perf_counter() - t0:.1f} s "
                  "(untimed)", flush=True)

        makers = {
            "pcamlib_pipeline_aug_off": lambda w: _pcamlib_loader(data_dir, w, False, train_rows),
            "pcamlib_pipeline_aug_on": lambda w: _pcamlib_loader(data_dir, w, True, train_rows),
            "pcamlib_raw_uint8": lambda w: _raw_loader(data_dir, w, train_rows),
            "torchvision_pcam": lambda w: _torchvision_loader(tv_root, w, train_rows),
            "fastai_png_folder": lambda w: _fastai_png_loader(png_root, w),
        }
        slow = {"torchvision_pcam", "fastai_png_folder"}
        best: dict[tuple[str, int], dict] = {}
        for round_ in range(args.rounds):
            for workers in workers_list:
                for name in wanted:
                    share = (slow_budget if name in slow else budget) / args.rounds
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", category=UserWarning)
                        dl = makers[name](workers)
                        _, images, seconds = benchlib.timed_batches(
                            dl, max_batches=len(dl) - 1,  # one epoch minus the warm-up batch
                            budget_s=share)
                    del dl
                    rate = images / seconds
                    print(f"  round {round_ + 1} {name:26s} workers={workers}: {images:6,} "
                          f"images in {seconds:5.2f} s = {rate:9,.0f} img/s", flush=True)
                    key = (name, workers)
                    if key not in best or rate > best[key]["images_per_s"]:
                        best[key] = {"loader": name, "workers": workers,
                                     "batch_size": BATCH_SIZE, "images": images,
                                     "seconds": round(seconds, 3),
                                     "images_per_s": round(rate, 1), "torch_threads": threads}
        results = [best[(name, w)] for w in workers_list for name in wanted]
    for row in results:
        ref = [r["images_per_s"] for r in results
               if r["loader"] == "torchvision_pcam" and r["workers"] == row["workers"]]
        row["ratio_vs_torchvision"] = round(row["images_per_s"] / ref[0], 2) if ref else None
        row["torch_threads"] = row.pop("torch_threads")  # extra column last
    benchlib.write_csv(results, args.out)
    for row in results:
        if row["loader"] == "pcamlib_raw_uint8" and row["ratio_vs_torchvision"]:
            verdict = "PASS" if row["ratio_vs_torchvision"] >= TARGET_RATIO else "FAIL"
            print(f"pcamlib loader vs torchvision PCAM, workers={row['workers']}: "
                  f"{row['ratio_vs_torchvision']:.1f}x (target >= {TARGET_RATIO:.0f}x): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
