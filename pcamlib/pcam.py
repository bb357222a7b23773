"""The one place that knows PatchCamelyon: file names, checksums, shapes, reading and writing.

PCam ships one pair of HDF5 files per split, ``camelyonpatch_level_2_split_{split}_x.h5``
(``x``: N x 96 x 96 x 3 uint8) and ``..._y.h5`` (``y``: N x 1 x 1 x 1 uint8), plus an
optional ``..._meta.csv``. Any directory that holds files of this layout, with any
number of rows, is accepted: the official data, an imported subset or generated data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pcamlib.errors import InputError

SPLITS: tuple[str, ...] = ("train", "valid", "test")
"""Split names as they appear in the official file names."""

IMAGE_SHAPE: tuple[int, int, int] = (96, 96, 3)
"""Height, width and channels of one patch."""

LABEL_SHAPE: tuple[int, int, int] = (1, 1, 1)
"""Trailing shape of the official label arrays."""

CENTRE_BOX: tuple[int, int, int, int] = (32, 32, 64, 64)
"""(top, left, bottom, right) of the centre 32x32 region that decides the label."""

EXPECTED_LENGTHS: dict[str, int] = {"train": 262_144, "valid": 32_768, "test": 32_768}
"""Rows per split in the official release."""

META_COLUMNS: tuple[str, ...] = ("coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi")
"""Columns of the official meta CSV files."""

ZENODO_RECORD = "2546921"
"""Zenodo record that hosts the official release."""

ZENODO_URL = "https://zenodo.org/records/2546921/files/{filename}?download=1"
"""Download address template; ``filename`` is the name as stored on Zenodo."""


CLASS_NAMES: tuple[str, str] = ("normal", "tumour")
"""Class names by label: 0 = no tumour in the centre 32x32, 1 = tumour there."""


@dataclass(frozen=True)
class PCamFile:
    """One file of the official release.

    Attributes:
        name: File name on disk after download (decompressed).
        download_name: File name on Zenodo (``.gz`` for HDF5 files).
        download_md5: MD5 of the file as downloaded.
        md5: MD5 of the file on disk (decompressed); equal to ``download_md5`` for CSVs.
    """

    name: str
    download_name: str
    download_md5: str
    md5: str

    @property
    def compressed(self) -> bool:
        """Whether the download is gzip-compressed."""
        return self.download_name.endswith(".gz")


def check_split(split: str) -> str:
    """Return ``split`` if it is a PCam split name, else raise a clear error."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    return split


def file_name(split: str, kind: str) -> str:
    """Official file name of one part of a split.

    Args:
        split: One of ``train``, ``valid``, ``test``.
        kind: ``x`` (images), ``y`` (labels) or ``meta`` (CSV).

    Returns:
        The file name, e.g. ``camelyonpatch_level_2_split_train_x.h5``.
    """
    check_split(split)
    if kind not in ("x", "y", "meta"):
        raise InputError(f"kind must be one of 'x', 'y', 'meta', got {kind!r}")
    suffix = "csv" if kind == "meta" else "h5"
    return f"camelyonpatch_level_2_split_{split}_{kind}.{suffix}"


# Download checksums follow torchvision, which corrected the PCam README's swap of the
# valid and test rows (pytorch/vision PR 6644); decompressed checksums follow kaiko-ai/eva.
# The README swaps the valid and test meta CSV checksums too; these are the md5s of the
# files themselves (as computed by e.g. dvc pipelines that download them by id).
_CHECKSUMS: dict[tuple[str, str], tuple[str, str]] = {
    ("train", "x"): ("1571f514728f59376b705fc836ff4b63", "01844da899645b4d6f84946d417ba453"),
    ("train", "y"): ("35c2d7259d906cfc8143347bb8e05be7", "0781386bf6c2fb62d58ff18891466aca"),
    ("valid", "x"): ("d5b63470df7cfa627aeec8b9dc0c066e", "81cf9680f1724c40673f10dc88e909b1"),
    ("valid", "y"): ("2b85f58b927af9964a4c15b8f7e8f179", "94d8aacc249253159ce2a2e78a86e658"),
    ("test", "x"): ("d8c2d60d490dbd479f8199bdfa0cf6ec", "2614b2e6717d6356be141d9d6dbfcb7e"),
    ("test", "y"): ("60a7035772fbdb7f34eb86d4420cf66a", "11ed647efe9fe457a4eb45df1dba19ba"),
    ("train", "meta"): ("5a3dd671e465cfd74b5b822125e65b0a", "5a3dd671e465cfd74b5b822125e65b0a"),
    ("valid", "meta"): ("67589e00a4a37ec317f2d1932c7502ca", "67589e00a4a37ec317f2d1932c7502ca"),
    ("test", "meta"): ("3455fd69135b66734e1008f3af684566", "3455fd69135b66734e1008f3af684566"),
}

PCAM_FILES: dict[tuple[str, str], PCamFile] = {
    key: PCamFile(
        name=file_name(*key),
        download_name=file_name(*key) + ("" if key[1] == "meta" else ".gz"),
        download_md5=gz_md5,
        md5=md5,
    )
    for key, (gz_md5, md5) in _CHECKSUMS.items()
}
"""Every official file, keyed by ``(split, kind)``."""


_IOV_MAX = 1024  # most buffers one preadv call accepts on Linux


class PCamFormatError(InputError):
    """A file is missing or does not follow the PCam layout."""


@dataclass(frozen=True)
class SplitInfo:
    """What validation found for one split.

    Attributes:
        split: Split name.
        length: Number of rows.
        x_path: Image file.
        y_path: Label file.
        meta_path: Meta CSV, or None when absent.
        positives: Number of rows labelled 1.
    """

    split: str
    length: int
    x_path: Path
    y_path: Path
    meta_path: Path | None
    positives: int

    @property
    def is_official_size(self) -> bool:
        """Whether the split has the official number of rows."""
        return self.length == EXPECTED_LENGTHS[self.split]


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise PCamFormatError(f"{path}: file not found (expected a PCam HDF5 file)")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise PCamFormatError(
            f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}"
        ) from err


def _check_readable_end(path: Path, dset: h5py.Dataset) -> None:
    """Fail clearly when the data of ``dset`` runs past the end of a truncated file."""
    offset = dset.id.get_offset()
    if offset is not None:
        end = offset + dset.id.get_storage_size()
        size = path.stat().st_size
        if end > size:
            raise PCamFormatError(
                f"{path}: truncated: dataset {dset.name!r} needs {end:,} bytes, "
                f"file has {size:,}"
            )
    if len(dset):
        try:
            dset[len(dset) - 1]
        except (OSError, RuntimeError) as err:
            raise PCamFormatError(f"{path}: corrupt: cannot read the last row: {err}") from err


def validate_split(root: str | os.PathLike, split: str, *, full_size: bool = False) -> SplitInfo:
    """Check that ``root`` holds a readable PCam-format split.

    Args:
        root: Directory with the split's files.
        split: Split name.
        full_size: Also require the official number of rows.

    Returns:
        What was found.

    Raises:
        PCamFormatError: naming the file and what was expected versus found.
    """
    root = Path(root)
    check_split(split)
    x_path, y_path = root / file_name(split, "x"), root / file_name(split, "y")
    with _open_h5(x_path) as fx, _open_h5(y_path) as fy:
        if "x" not in fx:
            raise PCamFormatError(f"{x_path}: no dataset 'x' (found {sorted(fx.keys())})")
        if "y" not in fy:
            raise PCamFormatError(f"{y_path}: no dataset 'y' (found {sorted(fy.keys())})")
        x, y = fx["x"], fy["y"]
        if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise PCamFormatError(
                f"{x_path}: dataset 'x' has shape {x.shape}, expected (N, 96, 96, 3)"
            )
        if x.dtype != np.uint8:
            raise PCamFormatError(f"{x_path}: dataset 'x' has dtype {x.dtype}, expected uint8")
        if tuple(y.shape[1:]) != LABEL_SHAPE:
            raise PCamFormatError(
                f"{y_path}: dataset 'y' has shape {y.shape}, expected (N, 1, 1, 1)"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise PCamFormatError(
                f"{y_path}: dataset 'y' has dtype {y.dtype}, expected an integer type (uint8)"
            )
        if len(x) != len(y):
            raise PCamFormatError(
                f"{x_path} has {len(x):,} rows but {y_path} has {len(y):,}: lengths must match"
            )
        if len(x) == 0:
            raise PCamFormatError(f"{x_path}: dataset 'x' is empty")
        _check_readable_end(x_path, x)
        _check_readable_end(y_path, y)
        try:
            labels = y[:].reshape(-1)
        except OSError as err:
            raise PCamFormatError(f"{y_path}: corrupt: cannot read labels: {err}") from err
        bad = np.flatnonzero((labels != 0) & (labels != 1))
        if bad.size:
            raise PCamFormatError(
                f"{y_path}: labels must be 0 or 1; found {labels[bad[0]]} at row {bad[0]} "
                f"({bad.size:,} bad rows)"
            )
        length = len(x)
    if full_size and length != EXPECTED_LENGTHS[split]:
        raise PCamFormatError(
            f"{x_path}: {length:,} rows, expected the official {EXPECTED_LENGTHS[split]:,}"
        )
    meta_path = root / file_name(split, "meta")
    return SplitInfo(
        split=split,
        length=length,
        x_path=x_path,
        y_path=y_path,
        meta_path=meta_path if meta_path.is_file() else None,
        positives=int(labels.sum()),
    )


def available_splits(root: str | os.PathLike) -> list[str]:
    """Splits whose x and y files both exist under ``root`` (not yet validated)."""
    root = Path(root)
    return [
        s for s in SPLITS
        if (root / file_name(s, "x")).is_file() and (root / file_name(s, "y")).is_file()
    ]


def read_meta(
    root: str | os.PathLike, split: str, length: int | None = None
) -> pd.DataFrame | None:
    """Read a split's meta CSV when present.

    The official columns are :data:`META_COLUMNS`; imported data has ``source_file``
    instead. Callers check for the columns they need.

    Args:
        root: Data directory.
        split: Split name.
        length: Expected number of rows (checked when given).

    Returns:
        The table, or None when the split has no meta CSV.
    """
    path = Path(root) / file_name(split, "meta")
    if not path.is_file():
        return None
    try:
        meta = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise PCamFormatError(f"{path}: not a readable CSV: {err}") from err
    if meta.columns[0].startswith("Unnamed"):
        meta = meta.drop(columns=meta.columns[0])
    # Imported data records other columns (e.g. ``source_file``); the official ones are
    # optional, but when one is present it must make sense.
    if "wsi" in meta.columns and meta["wsi"].isna().all():
        raise PCamFormatError(f"{path}: column 'wsi' is present but empty")
    if length is not None and len(meta) != length:
        raise PCamFormatError(f"{path}: {len(meta):,} rows, but the split has {length:,}")
    return meta


class PCamSplit(Dataset):
    """One PCam split, read lazily from HDF5.

    Nothing is loaded up front but the labels (one byte per row). Each process opens its
    own h5py handle on first access, so the object can be pickled to DataLoader workers
    (fork or spawn). Items are ``(uint8 tensor 96x96x3, int label)``; whole batches come
    from :meth:`read_batch`, which reads rows in file order and is what the fast loader
    uses.

    Args:
        root: Directory with PCam-format files.
        split: Split name.
        full_size: Require the official number of rows.
        rows: Use only the first ``rows`` rows (None = all), e.g. for quick runs.
    """

    def __init__(
        self, root: str | os.PathLike, split: str, *, full_size: bool = False,
        rows: int | None = None,
    ):
        self.root = Path(root)
        self.split = split
        self.info = validate_split(self.root, split, full_size=full_size)
        if rows is not None and not 0 < rows <= self.info.length:
            raise InputError(
                f"rows must be in 1..{self.info.length} for {self.info.x_path}; got {rows}"
            )
        self.rows = rows
        with h5py.File(self.info.y_path, "r") as fy:
            self.labels = fy["y"][:rows].reshape(-1).astype(np.int64)
        self._file: h5py.File | None = None
        self._fd: int | None = None
        self._pid: int | None = None
        with h5py.File(self.info.x_path, "r") as fx:
            x = fx["x"]
            contiguous = x.chunks is None and not x.compression
            # For uncompressed contiguous data (the official files and ours) rows are read
            # with pread at known byte offsets: no per-row HDF5 selection, no mmap pages
            # piling up in RSS. Chunked or compressed files go through h5py.
            self._offset = x.id.get_offset() if contiguous else None

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"PCamSplit({str(self.root)!r}, {self.split!r}, length={len(self)})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"], state["_fd"], state["_pid"] = None, None, None
        return state

    def __del__(self) -> None:
        if "_pid" in self.__dict__:  # __init__ may have failed before the handles existed
            self.close()

    def _check_process(self) -> None:
        if self._pid is not None and self._pid != os.getpid():
            # Inherited through fork: the parent's handles are not ours to use or close.
            self._file, self._fd, self._pid = None, None, None

    @property
    def _rows_fd(self) -> int:
        self._check_process()
        if self._fd is None:
            self._fd = os.open(self.info.x_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    @property
    def images(self) -> h5py.Dataset:
        """The ``x`` dataset, opened in this process on first use."""
        self._check_process()
        if self._file is None:
            # Read-ahead caching is useless for random rows; a modest raw chunk cache is enough.
            self._file = h5py.File(self.info.x_path, "r", rdcc_nbytes=4 * 1024**2)
            self._pid = os.getpid()
        return self._file["x"]

    def close(self) -> None:
        """Close this process's file handle (reopened on next access)."""
        self._check_process()
        if self._file is not None:
            self._file.close()
        if self._fd is not None:
            os.close(self._fd)
        self._file, self._fd, self._pid = None, None, None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        return torch.from_numpy(self.images[index]), int(self.labels[index])

    def read_images(
        self, indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Read rows ``indices`` (any order, repeats allowed) as an N x 96 x 96 x 3 uint8 array.

        Args:
            indices: Row numbers.
            out: Optional C-contiguous uint8 array of shape (N, 96, 96, 3) to read into
                (e.g. shared memory, so a loader worker's batch needs no further copy).

        Returns:
            ``out`` (or a new array) holding the rows in the order of ``indices``.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices out of range 0..{len(self) - 1} for {self!r}")
        shape = (idx.size, *IMAGE_SHAPE)
        if out is None:
            out = np.empty(shape, dtype=np.uint8)
        elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise InputError(
                f"out must be a C-contiguous uint8 array of shape {shape}; got {out.shape} "
                f"{out.dtype}"
            )
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        row_bytes = int(np.prod(IMAGE_SHAPE))
        fd = self._rows_fd if self._offset is not None else None
        dset = None if fd is not None else self.images
        # One read per run of consecutive rows, in file order, scattered straight into each
        # row's place in the batch: far faster than h5py fancy indexing (a selection per
        # row) and no intermediate copy.
        start = 0
        while start < idx.size:
            stop = start + 1
            while (stop < idx.size and stop - start < _IOV_MAX
                   and sorted_idx[stop] == sorted_idx[stop - 1] + 1):
                stop += 1
            first, dest = int(sorted_idx[start]), order[start:stop]
            if fd is not None:
                want = (stop - start) * row_bytes
                got = os.preadv(fd, [out[d] for d in dest], self._offset + first * row_bytes)
                if got != want:
                    raise PCamFormatError(
                        f"{self.info.x_path}: short read at row {first} ({got} of {want} "
                        "bytes): file truncated while open?"
                    )
            else:
                out[dest] = dset[first:first + stop - start]
            start = stop
        return out

    def read_batch(
        self, indices: Sequence[int] | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read a batch: uint8 images (N x 96 x 96 x 3) and int64 labels, as tensors.

        Args:
            indices: Row numbers.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        images = torch.empty((idx.size, *IMAGE_SHAPE), dtype=torch.uint8)
        self.read_images(idx, out=images.numpy())
        return images, torch.from_numpy(self.labels[idx])

    def iter_chunks(self, chunk_rows: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, images)`` over the split in file order, ``chunk_rows`` at a time."""
        dset = self.images
        for start in range(0, len(self), chunk_rows):
            yield start, dset[start:min(start + chunk_rows, len(self))]

    def meta(self) -> pd.DataFrame | None:
        """The split's meta CSV (first ``rows`` rows when limited), or None when absent."""
        meta = read_meta(self.root, self.split, self.info.length)
        return None if meta is None else meta.iloc[: len(self)]


def _cache_key(data: PCamSplit) -> dict:
    """What a cached result about ``data`` depends on: both files' size and mtime, rows."""
    x, y = data.info.x_path.stat(), data.info.y_path.stat()
    return {"size": x.st_size, "mtime_ns": x.st_mtime_ns, "y_size": y.st_size,
            "y_mtime_ns": y.st_mtime_ns, "rows": len(data)}


def _cached(data: PCamSplit, suffix: str, compute, cache: bool) -> dict:
    """``compute()``, cached beside the data as ``<x file stem><suffix>``.

    The cache is reused while the files and the row count are unchanged; a read-only
    data directory just skips it.
    """
    key = _cache_key(data)
    path = data.info.x_path.with_name(data.info.x_path.stem + suffix)
    if cache and path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["value"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    value = compute()
    if cache:
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"key": key, "value": value}, indent=1))
            tmp.replace(path)
        except OSError:
            pass
    return value


def channel_stats(data: PCamSplit, chunk_rows: int = 4096, cache: bool = True) -> dict:
    """Per-channel mean and std of a split, in [0, 1] units, streamed chunk by chunk.

    Cached beside the data as ``<x file>.stats.json`` (see :func:`_cached`).

    Args:
        data: The split.
        chunk_rows: Rows read per chunk (bounds memory).
        cache: Read and write the cache file.

    Returns:
        ``{"mean": [r, g, b], "std": [r, g, b], "rows": N}``.
    """

    def compute() -> dict:
        total = np.zeros(3, dtype=np.float64)
        total_sq = np.zeros(3, dtype=np.float64)
        count = 0
        for _, chunk in data.iter_chunks(chunk_rows):
            pixels = chunk.reshape(-1, 3).astype(np.float64)
            total += pixels.sum(0)
            total_sq += np.square(pixels).sum(0)
            count += pixels.shape[0]
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
        return {"mean": (mean / 255).tolist(), "std": (std / 255).tolist(), "rows": len(data)}

    return _cached(data, ".stats.json", compute, cache)


def content_digest(data: PCamSplit, chunk_rows: int = 4096, cache: bool = True) -> dict:
    """What a split holds, as a checksum of its labels and every pixel (its identity).

    Two directories with the same rows in the same order have the same digest wherever
    they live, whatever HDF5 layout or compression wrote them. Cached beside the data as
    ``<x file>.digest.json`` (a full pass over a 7.2 GB train split takes about a minute).

    Args:
        data: The split (only its first ``rows`` rows when limited).
        chunk_rows: Rows read per chunk (bounds memory).
        cache: Read and write the cache file.

    Returns:
        ``{"rows": N, "positives": P, "sha256": hex digest of labels then pixels}``.
    """

    def compute() -> dict:
        digest = hashlib.sha256(data.labels.astype(np.uint8).tobytes())
        for _, chunk in data.iter_chunks(chunk_rows):
            digest.update(np.ascontiguousarray(chunk).data)
        return {"rows": len(data), "positives": int(data.labels.sum()),
                "sha256": digest.hexdigest()}

    return _cached(data, ".digest.json", compute, cache)


class PCamWriter:
    """Write one split in PCam format, atomically.

    Rows are appended in order with :meth:`write`. Files are written under temporary
    names and renamed into place only by :meth:`close` after every declared row was
    written; on error (or an exception inside ``with``) they are removed, so existing
    files are never replaced by half-written ones.

    Args:
        root: Destination directory (created if needed).
        split: Split name.
        length: Number of rows that will be written.
        meta: Write a meta CSV too; pass rows to :meth:`write` as a DataFrame.
    """

    def __init__(self, root: str | os.PathLike, split: str, length: int, meta: bool = False):
        check_split(split)
        if length <= 0:
            raise InputError(f"length must be positive, got {length}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.split, self.length, self.written = split, length, 0
        self._final = {k: self.root / file_name(split, k) for k in ("x", "y", "meta")}
        self._tmp = {k: p.with_name(f".{p.name}.partial") for k, p in self._final.items()}
        self._fx = h5py.File(self._tmp["x"], "w")
        self._fy = h5py.File(self._tmp["y"], "w")
        # Contiguous storage: random row reads are a single seek, no chunk decompression.
        self._x = self._fx.create_dataset("x", shape=(length, *IMAGE_SHAPE), dtype=np.uint8)
        self._y = self._fy.create_dataset("y", shape=(length, *LABEL_SHAPE), dtype=np.uint8)
        self._meta_parts: list[pd.DataFrame] | None = [] if meta else None

    def write(
        self, images: np.ndarray, labels: np.ndarray, meta: pd.DataFrame | None = None
    ) -> None:
        """Append rows.

        Args:
            images: N x 96 x 96 x 3 uint8.
            labels: N values in {0, 1}.
            meta: N rows of meta data (required when the writer was made with ``meta=True``).
        """
        images = np.asarray(images)
        labels = np.asarray(labels).reshape(-1)
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
            raise PCamFormatError(
                f"images must be N x 96 x 96 x 3 uint8, got {images.shape} {images.dtype}"
            )
        if len(labels) != len(images):
            raise PCamFormatError(f"{len(images)} images but {len(labels)} labels")
        if not np.isin(labels, (0, 1)).all():
            raise PCamFormatError(f"labels must be 0 or 1, got {sorted(set(labels.tolist()))}")
        n = len(images)
        if self.written + n > self.length:
            raise PCamFormatError(
                f"writing {n} rows would exceed the declared length {self.length}"
            )
        sl = np.s_[self.written:self.written + n]
        self._x[sl] = images
        self._y[sl] = labels.astype(np.uint8).reshape(-1, *LABEL_SHAPE)
        if self._meta_parts is not None:
            if meta is None or len(meta) != n:
                raise PCamFormatError("meta rows must be given with every write, one per image")
            self._meta_parts.append(meta)
        self.written += n

    def close(self) -> SplitInfo:
        """Finish: check the row count, rename into place and validate."""
        self._fx.close()
        self._fy.close()
        if self.written != self.length:
            self.abort()
            raise PCamFormatError(
                f"{self._final['x']}: wrote {self.written} rows, declared {self.length}"
            )
        if self._meta_parts is not None:
            pd.concat(self._meta_parts, ignore_index=True).to_csv(self._tmp["meta"], index=False)
        for kind in ("x", "y", "meta"):
            if self._tmp[kind].exists():
                self._tmp[kind].replace(self._final[kind])
        if self._meta_parts is None and self._final["meta"].exists():
            self._final["meta"].unlink()  # a stale meta file would describe other rows
        return validate_split(self.root, self.split)

    def abort(self) -> None:
        """Remove temporary files; existing final files are untouched."""
        for f in (self._fx, self._fy):
            try:
                f.close()
            except Exception:  # noqa: BLE001 - already closed or broken; removal follows
                pass
        for p in self._tmp.values():
            p.unlink(missing_ok=True)

    def __enter__(self) -> PCamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
