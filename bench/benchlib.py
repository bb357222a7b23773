"""Shared helpers of the benchmarks: fast PCam-format data, timing, CSV output, machine info.

Benchmarks measure throughput, so the content of the generated patches does not matter:
:func:`write_split` tiles a small pool of smooth random patches into a PCam-format split
(contiguous uint8 HDF5, exactly the layout of the official files) at disk speed. Every
number a benchmark reports is a ratio of two loaders or loops measured side by side in
one process run, so the shared, noisy CPUs of a development machine cancel out as far
as they can.
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository root (``pcamlib`` need not be pip-installed: it is put on sys.path)."""

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402 - after the sys.path fix, like the pcamlib imports below
import pandas as pd  # noqa: E402

from pcamlib.pcam import IMAGE_SHAPE, PCamFormatError, PCamWriter, validate_split  # noqa: E402

REPORTS_DIR = REPO_ROOT / "reports" / "bench"
"""Default folder of benchmark CSVs and the summary."""

ROW_BYTES = int(np.prod(IMAGE_SHAPE))
"""Bytes of one 96 x 96 x 3 uint8 patch (27,648)."""

POOL_SIZE = 1024
"""Distinct patches behind a generated split; rows are drawn from this pool."""

_POOL_GRID = 12  # the smooth field is drawn on a 12 x 12 grid and upsampled 8x to 96 x 96
_POOL_NOISE = 12  # +- grey levels of per-pixel noise, so PNG export is not trivially small
_WRITE_CHUNK = 8192  # rows per write: 226 MB of uint8, bounded memory at any split size


def _pool(seed: int) -> np.ndarray:
    """POOL_SIZE x 96 x 96 x 3 uint8 smooth random patches (stain-like, PNG-compressible)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(POOL_SIZE, 3, _POOL_GRID, _POOL_GRID, generator=gen) * 200 + 40
    smooth = F.interpolate(coarse, size=IMAGE_SHAPE[:2], mode="bilinear", align_corners=False)
    noise = torch.randint(-_POOL_NOISE, _POOL_NOISE + 1, smooth.shape, generator=gen)
    out = (smooth + noise).clamp_(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def write_split(root: str | os.PathLike, split: str, rows: int, *, seed: int = 0,
                progress: bool = False) -> Path:
    """Write a PCam-format split of ``rows`` generated rows under ``root`` (atomically).

    Args:
        root: Destination directory.
        split: ``train``, ``valid`` or ``test``.
        rows: Number of rows.
        seed: Seed of the pool and the row draw.
        progress: Print a line per written gigabyte-ish chunk group.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    pool = _pool(seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with PCamWriter(root, split, rows) as writer:
        for start in range(0, rows, _WRITE_CHUNK):
            n = min(_WRITE_CHUNK, rows - start)
            writer.write(pool[rng.integers(0, POOL_SIZE, n)], rng.integers(0, 2, n))
            if progress and (start // _WRITE_CHUNK) % 8 == 7:
                done = start + n
                print(f"  {split}: {done:,}/{rows:,} rows "
                      f"({done * ROW_BYTES / 1e9:.1f} GB, {time.perf_counter() - t0:.0f} s)",
                      flush=True)
    return root


def split_rows(root: str | os.PathLike, split: str) -> int | None:
    """Rows of a readable PCam-format split under ``root``, or None when absent or broken."""
    try:
        return validate_split(Path(root), split).length
    except (PCamFormatError, OSError):
        return None


def ensure_split(root: str | os.PathLike, split: str, rows: int, *, seed: int = 0,
                 progress: bool = False) -> tuple[Path, bool]:
    """Reuse ``root``'s split when it has exactly ``rows`` rows, else (re)generate it.

    Returns:
        The directory and whether it was generated now.
    """
    if split_rows(root, split) == rows:
        return Path(root), False
    check_free_space(root, rows * ROW_BYTES)
    write_split(root, split, rows, seed=seed, progress=progress)
    return Path(root), True


def check_free_space(path: str | os.PathLike, need_bytes: int, margin: float = 1.1) -> None:
    """Exit with a clear message when ``path``'s file system lacks ``need_bytes`` (+10%)."""
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes * margin:
        raise SystemExit(
            f"not enough free disk space for benchmark data in {path}: need "
            f"{need_bytes * margin / 1e9:.1f} GB (data + 10%), {free / 1e9:.1f} GB free on "
            f"{probe}; pass --data-dir on a larger disk or use a smaller size"
        )


def timed_batches(batches: Iterable, *, max_batches: int, budget_s: float,
                  warmup: int = 1, sync=None) -> tuple[int, int, float]:
    """Iterate ``batches``; time everything after the first ``warmup`` batches.

    The warm-up batches absorb one-off costs (worker start-up, first file open, lazy
    initialisation); timing stops after ``max_batches`` timed batches or once
    ``budget_s`` seconds have passed, whichever comes first.

    Returns:
        (timed batches, timed images, timed seconds).
    """
    it: Iterator = iter(batches)
    for _ in range(warmup):
        next(it)
    if sync is not None:
        sync()
    count = images = 0
    t0 = time.perf_counter()
    for xb, *_ in it:
        images += len(xb)
        count += 1
        if count >= max_batches or time.perf_counter() - t0 >= budget_s:
            break
    if sync is not None:
        sync()
    seconds = time.perf_counter() - t0
    close = getattr(it, "close", None)
    if close is not None:
        # Shut a half-consumed loader down here, not in whatever process later collects it
        # (a forked worker would try to join its parent's workers).
        close()
    del it
    gc.collect()
    return count, images, seconds


THREADS_HELP = (
    "torch intra-op threads (default 1; 0: torch's default, one per core). On a shared "
    "machine whose cores are busy with other work, multi-threaded operations stall on "
    "thread barriers: on 2 busy cores a resnet18 step took 0.2 s with 1 thread and 3.2 s "
    "with 2. Both sides of every ratio use the same setting."
)
"""Help text of the ``--threads`` option of the CPU benchmarks."""


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 keeps torch's default); return the number in use."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_info() -> dict:
    """CPU count, versions and training device, for the report."""
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cpu",
    }
    try:
        import fastai

        info["fastai"] = fastai.__version__
    except ImportError:
        info["fastai"] = "not installed"
    if torch.cuda.is_available():
        info["device"] = f"cuda ({torch.cuda.get_device_name(0)})"
    return info


def write_csv(rows: list[dict], path: str | os.PathLike) -> pd.DataFrame:
    """Write ``rows`` as a CSV (folders created), print it and return the frame."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(frame.to_string(index=False))
    print(f"wrote {path}")
    return frame
