"""Tests of the PCam data layer: validation, writing, reading, stats, meta, checksums."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import pickle
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from pcamlib import pcam
from pcamlib.pcam import (
    EXPECTED_LENGTHS,
    META_COLUMNS,
    PCAM_FILES,
    SPLITS,
    PCamFormatError,
    PCamSplit,
    PCamWriter,
    channel_stats,
    file_name,
    read_meta,
    validate_split,
)


def _paths(root: Path, split: str = "train") -> tuple[Path, Path, Path]:
    return tuple(root / file_name(split, k) for k in ("x", "y", "meta"))


def _h5(path: Path, name: str, data=None, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data, **kwargs)


def _raw_split(root: Path, x, y, split: str = "train", x_name: str = "x", y_name: str = "y"):
    x_path, y_path, _ = _paths(root, split)
    _h5(x_path, x_name, x)
    _h5(y_path, y_name, y)
    return x_path, y_path


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)


def _labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 1000).integers(0, 2, n, dtype=np.uint8)


def _direct(x_path: Path) -> np.ndarray:
    with h5py.File(x_path, "r") as f:
        return f["x"][()]


def _no_partials(root: Path) -> bool:
    return not [n for n in os.listdir(root) if n.endswith(".partial")]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {n: (root / n).read_bytes() for n in sorted(os.listdir(root))}


def _check_both(root: Path, split: str = "train", **kwargs):
    """Run validate_split and PCamSplit on root; both must raise the same error."""
    with pytest.raises(PCamFormatError) as a:
        validate_split(root, split, **kwargs)
    with pytest.raises(PCamFormatError) as b:
        PCamSplit(root, split, **kwargs)
    assert str(a.value) == str(b.value)
    return str(a.value)


# ---------------------------------------------------------------- validate_split / PCamSplit


def test_valid_split_info(make_pcam_dir):
    root = make_pcam_dir({"train": 12, "valid": 5})
    info = validate_split(root, "train")
    with h5py.File(info.y_path, "r") as f:
        labels = f["y"][()].reshape(-1)
    assert info.length == 12 and info.split == "train"
    assert info.positives == int(labels.sum())
    assert info.x_path == root / "camelyonpatch_level_2_split_train_x.h5"
    assert info.meta_path is None
    assert not info.is_official_size
    assert validate_split(root, "valid").length == 5
    assert pcam.available_splits(root) == ["train", "valid"]


def test_unknown_split_named(make_pcam_dir):
    root = make_pcam_dir({"train": 2})
    with pytest.raises(ValueError, match="'training'"):
        validate_split(root, "training")


@pytest.mark.parametrize("kind", ["x", "y"])
def test_missing_file(make_pcam_dir, kind):
    root = make_pcam_dir({"train": 3})
    path = root / file_name("train", kind)
    path.unlink()
    msg = _check_both(root)
    assert str(path) in msg and "not found" in msg
    other = root / file_name("train", "y" if kind == "x" else "x")
    assert str(other) not in msg


def test_length_mismatch(tmp_path):
    x_path, y_path = _raw_split(tmp_path, _images(4), np.zeros((5, 1, 1, 1), np.uint8))
    msg = _check_both(tmp_path)
    assert str(x_path) in msg and str(y_path) in msg
    assert "4" in msg and "5" in msg and "match" in msg


def test_wrong_image_shape(tmp_path):
    x_path, _ = _raw_split(tmp_path, np.zeros((4, 64, 64, 3), np.uint8),
                           np.zeros((4, 1, 1, 1), np.uint8))
    msg = _check_both(tmp_path)
    assert str(x_path) in msg
    assert "(4, 64, 64, 3)" in msg and "(N, 96, 96, 3)" in msg


def test_wrong_image_dtype(tmp_path):
    x_path, _ = _raw_split(tmp_path, np.zeros((4, 96, 96, 3), np.float32),
                           np.zeros((4, 1, 1, 1), np.uint8))
    msg = _check_both(tmp_path)
    assert str(x_path) in msg and "float32" in msg and "uint8" in msg


@pytest.mark.parametrize("y_shape", [(4,), (4, 1), (4, 2, 1, 1)])
def test_wrong_label_shape(tmp_path, y_shape):
    _, y_path = _raw_split(tmp_path, _images(4), np.zeros(y_shape, np.uint8))
    msg = _check_both(tmp_path)
    assert str(y_path) in msg
    assert str(y_shape) in msg and "(N, 1, 1, 1)" in msg


def test_float_labels_rejected(tmp_path):
    _, y_path = _raw_split(tmp_path, _images(4), np.zeros((4, 1, 1, 1), np.float32))
    msg = _check_both(tmp_path)
    assert str(y_path) in msg and "float32" in msg


def test_label_out_of_range_names_row(tmp_path):
    y = np.zeros((6, 1, 1, 1), np.uint8)
    y[3] = 2
    y[5] = 7
    _, y_path = _raw_split(tmp_path, _images(6), y)
    msg = _check_both(tmp_path)
    assert str(y_path) in msg
    assert "row 3" in msg and "found 2" in msg and "0 or 1" in msg
    assert "2 bad rows" in msg


@pytest.mark.parametrize("kind", ["x", "y"])
def test_dataset_key_missing(tmp_path, kind):
    names = {"x_name": "x", "y_name": "y", f"{kind}_name": "images"}
    paths = _raw_split(tmp_path, _images(3), np.zeros((3, 1, 1, 1), np.uint8), **names)
    msg = _check_both(tmp_path)
    path = paths[0] if kind == "x" else paths[1]
    assert str(path) in msg and f"no dataset '{kind}'" in msg and "images" in msg


@pytest.mark.parametrize("kind", ["x", "y"])
def test_truncated_file(make_pcam_dir, kind):
    root = make_pcam_dir({"train": 8})
    path = root / file_name("train", kind)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _check_both(root)
    assert str(path) in msg
    assert re.search("truncated|corrupt", msg)


def test_garbage_file(make_pcam_dir):
    root = make_pcam_dir({"train": 3})
    x_path = root / file_name("train", "x")
    x_path.write_bytes(b"this is not an HDF5 file\n" * 200)
    msg = _check_both(root)
    assert str(x_path) in msg and "HDF5" in msg


def test_empty_dataset(tmp_path):
    x_path, _ = _raw_split(tmp_path, np.zeros((0, 96, 96, 3), np.uint8),
                           np.zeros((0, 1, 1, 1), np.uint8))
    msg = _check_both(tmp_path)
    assert str(x_path) in msg and "empty" in msg


@pytest.mark.parametrize("split", ["train", "valid"])
def test_full_size_names_official_length(make_pcam_dir, split):
    root = make_pcam_dir({split: 4})
    validate_split(root, split)  # fine without full_size
    msg = _check_both(root, split, full_size=True)
    assert str(root / file_name(split, "x")) in msg
    assert str(EXPECTED_LENGTHS[split]) in msg.replace(",", "")
    assert re.search(r"\b4 rows", msg)


# ---------------------------------------------------------------- PCamWriter


def test_writer_roundtrip_in_pieces(tmp_path):
    images, labels = _images(10), _labels(10)
    with PCamWriter(tmp_path, "valid", 10) as w:
        w.write(images[:3], labels[:3])
        w.write(images[3:], labels[3:].reshape(-1, 1, 1, 1))
    x_path, y_path, _ = _paths(tmp_path, "valid")
    np.testing.assert_array_equal(_direct(x_path), images)
    with h5py.File(y_path, "r") as f:
        assert f["y"].shape == (10, 1, 1, 1) and f["y"].dtype == np.uint8
        np.testing.assert_array_equal(f["y"][()].reshape(-1), labels)
    assert _no_partials(tmp_path)


def test_writer_atomic_on_exception(make_pcam_dir):
    root = make_pcam_dir({"train": 6})
    meta = pd.DataFrame({"wsi": ["a"] * 6})
    meta.to_csv(root / file_name("train", "meta"), index=False)
    before = _snapshot(root)
    with pytest.raises(RuntimeError, match="boom"):
        with PCamWriter(root, "train", 6) as w:
            w.write(_images(6, seed=5), _labels(6, seed=5))
            assert not _no_partials(root)  # really writing to temporary files
            raise RuntimeError("boom")
    assert _snapshot(root) == before
    assert _no_partials(root)


def test_writer_wrong_row_count(make_pcam_dir):
    root = make_pcam_dir({"train": 6})
    before = _snapshot(root)
    x_path = root / file_name("train", "x")
    with pytest.raises(PCamFormatError) as err:
        with PCamWriter(root, "train", 8) as w:
            w.write(_images(4, seed=3), _labels(4))
    msg = str(err.value)
    assert str(x_path) in msg and "wrote 4" in msg and "declared 8" in msg
    assert _snapshot(root) == before
    assert _no_partials(root)


def test_writer_too_many_rows(tmp_path):
    with pytest.raises(PCamFormatError, match="exceed the declared length 4"):
        with PCamWriter(tmp_path, "train", 4) as w:
            w.write(_images(3), _labels(3))
            w.write(_images(2), _labels(2))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("images", "labels", "expected"),
    [
        (np.zeros((2, 64, 64, 3), np.uint8), [0, 1], r"\(2, 64, 64, 3\)"),
        (np.zeros((2, 96, 96, 3), np.float32), [0, 1], "float32"),
        (np.zeros((96, 96, 3), np.uint8), [0], r"\(96, 96, 3\)"),
        (np.zeros((2, 96, 96, 3), np.uint8), [0, 2], r"0 or 1, got \[0, 2\]"),
        (np.zeros((2, 96, 96, 3), np.uint8), [0, -1], r"0 or 1, got \[-1, 0\]"),
        (np.zeros((2, 96, 96, 3), np.uint8), [0, 1, 1], "2 images but 3 labels"),
    ],
)
def test_writer_rejects_bad_rows(tmp_path, images, labels, expected):
    with pytest.raises(PCamFormatError, match=expected):
        with PCamWriter(tmp_path, "test", 2) as w:
            w.write(images, np.asarray(labels))
    assert os.listdir(tmp_path) == []


def test_writer_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="length must be positive, got 0"):
        PCamWriter(tmp_path, "train", 0)
    with pytest.raises(ValueError, match="'val'"):
        PCamWriter(tmp_path, "val", 3)


def _meta(n: int, offset: int = 0) -> pd.DataFrame:
    return pd.DataFrame({
        "coord_y": np.arange(n) + offset, "coord_x": np.arange(n) * 2,
        "tumor_patch": np.arange(n) % 2 == 0, "center_tumor_patch": np.arange(n) % 3 == 0,
        "wsi": [f"camelyon16_train_normal_{i:03d}" for i in range(n)],
    })


def test_writer_meta_roundtrip(tmp_path):
    meta = _meta(7)
    with PCamWriter(tmp_path, "train", 7, meta=True) as w:
        w.write(_images(4), _labels(4), meta.iloc[:4])
        w.write(_images(3, 1), _labels(3, 1), meta.iloc[4:])
    info = validate_split(tmp_path, "train")
    assert info.meta_path == tmp_path / file_name("train", "meta")
    back = read_meta(tmp_path, "train", 7)
    assert tuple(back.columns) == META_COLUMNS
    pd.testing.assert_frame_equal(back, meta)
    np.testing.assert_array_equal(PCamSplit(tmp_path, "train", rows=3).meta()["coord_y"], [0, 1, 2])


def test_writer_meta_required_each_write(tmp_path):
    with pytest.raises(PCamFormatError, match="meta rows must be given"):
        with PCamWriter(tmp_path, "train", 2, meta=True) as w:
            w.write(_images(2), _labels(2))
    assert os.listdir(tmp_path) == []


def test_writer_removes_stale_meta(tmp_path):
    with PCamWriter(tmp_path, "train", 3, meta=True) as w:
        w.write(_images(3), _labels(3), _meta(3))
    meta_path = tmp_path / file_name("train", "meta")
    assert meta_path.is_file()
    with PCamWriter(tmp_path, "train", 5) as w:
        w.write(_images(5), _labels(5))
    assert not meta_path.exists()
    assert read_meta(tmp_path, "train") is None
    assert validate_split(tmp_path, "train").meta_path is None


# ---------------------------------------------------------------- reading


def _chunked_split(root: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _images(n, seed=7), _labels(n, seed=7)
    x_path, y_path, _ = _paths(root)
    _h5(x_path, "x", images, chunks=(4, 96, 96, 3), compression="gzip")
    _h5(y_path, "y", labels.reshape(-1, 1, 1, 1))
    return images, labels


@pytest.fixture(params=["pread", "h5py"])
def split_any(request, make_pcam_dir, tmp_path):
    """A 50-row split read through the fast pread path or the h5py fallback."""
    if request.param == "pread":
        root = make_pcam_dir({"train": 50}, seed=3)
    else:
        root = tmp_path / "chunked"
        _chunked_split(root, 50)
    ds = PCamSplit(root, "train")
    assert (ds._offset is not None) == (request.param == "pread")
    yield ds
    ds.close()


def test_read_matches_h5py(split_any):
    ds = split_any
    expected = _direct(ds.info.x_path)
    with h5py.File(ds.info.y_path, "r") as f:
        labels = f["y"][()].reshape(-1)
    rng = np.random.default_rng(0)
    cases = [
        rng.integers(0, 50, 40),  # random, unsorted, repeats
        np.array([5, 6, 7, 20, 21, 3, 3, 49, 0, 6]),  # runs, repeats, both ends
        np.arange(50)[::-1],
        np.arange(50),
        [17],
    ]
    for idx in cases:
        idx = np.asarray(idx)
        np.testing.assert_array_equal(ds.read_images(idx), expected[idx])
        x, y = ds.read_batch(list(idx))
        assert x.dtype == torch.uint8 and tuple(x.shape) == (len(idx), 96, 96, 3)
        assert y.dtype == torch.int64
        np.testing.assert_array_equal(x.numpy(), expected[idx])
        np.testing.assert_array_equal(y.numpy(), labels[idx])
    assert ds.read_images([]).shape == (0, 96, 96, 3)
    image, label = ds[-1]
    np.testing.assert_array_equal(image.numpy(), expected[49])
    assert label == labels[49]


def test_read_path_used(split_any):
    ds = split_any
    ds.read_images([1, 2])
    if ds._offset is not None:
        assert ds._fd is not None and ds._file is None  # pread only, h5py never opened
    else:
        assert ds._file is not None and ds._fd is None


@pytest.mark.parametrize("idx", [[50], [-1], [0, 3, 50], [10**9]])
def test_read_out_of_range(split_any, idx):
    with pytest.raises(IndexError, match="out of range"):
        split_any.read_images(idx)
    with pytest.raises(IndexError):
        split_any.read_batch(idx)


def test_getitem_out_of_range(split_any):
    with pytest.raises(IndexError, match="index 50 out of range"):
        split_any[50]
    with pytest.raises(IndexError):
        split_any[-51]


def test_rows_limit(make_pcam_dir):
    root = make_pcam_dir({"train": 20})
    expected = _direct(root / file_name("train", "x"))
    ds = PCamSplit(root, "train", rows=8)
    assert len(ds) == 8 and len(ds.labels) == 8
    np.testing.assert_array_equal(ds.read_images([7, 0]), expected[[7, 0]])
    with pytest.raises(IndexError):
        ds.read_images([8])
    with pytest.raises(IndexError):
        ds[8]
    chunks = list(ds.iter_chunks(3))
    assert [start for start, _ in chunks] == [0, 3, 6]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), expected[:8])
    for bad in (0, 21, -1):
        with pytest.raises(ValueError, match=rf"rows must be in 1\.\.20 .*got {bad}"):
            PCamSplit(root, "train", rows=bad)


def test_failed_construction_is_quiet(tmp_path, monkeypatch):
    # __del__ of a half-built PCamSplit must not raise (it used to: AttributeError '_pid').
    import gc
    import sys

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(PCamFormatError):
        PCamSplit(tmp_path, "train")  # no files
    with PCamWriter(tmp_path, "train", 2) as w:
        w.write(_images(2), _labels(2))
    with pytest.raises(ValueError, match="rows"):
        PCamSplit(tmp_path, "train", rows=0)
    gc.collect()
    assert [repr(u.exc_value) for u in unraisable] == []


def test_pickle_after_open(split_any):
    ds = split_any
    expected = _direct(ds.info.x_path)
    ds.read_images([0, 1])
    _ = ds.images  # open the h5py handle too: neither may be pickled
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._fd is None and clone._file is None
    idx = [9, 2, 2, 33]
    np.testing.assert_array_equal(clone.read_images(idx), expected[idx])
    np.testing.assert_array_equal(clone.labels, ds.labels)
    np.testing.assert_array_equal(ds.read_images(idx), expected[idx])  # original untouched
    clone.close()


def test_torch_dataloader_spawn(make_pcam_dir):
    root = make_pcam_dir({"train": 12}, seed=11)
    ds = PCamSplit(root, "train")
    ds.read_images([0])  # the parent's handle is open while workers are made
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, multiprocessing_context="spawn"
    )
    xs, ys = zip(*loader, strict=True)
    np.testing.assert_array_equal(torch.cat(xs).numpy(), _direct(ds.info.x_path))
    np.testing.assert_array_equal(torch.cat(ys).numpy(), ds.labels)


def _child_read(ds: PCamSplit, idx, expected, queue) -> None:
    try:
        ok = bool(np.array_equal(ds.read_images(idx), expected))
        queue.put((os.getpid(), ds._pid, ds._fd, ds._file is not None, ok, None))
    except Exception as err:  # noqa: BLE001 - reported to the parent
        queue.put((os.getpid(), None, None, None, False, repr(err)))


def test_fork_opens_own_handle(split_any):
    ds = split_any
    expected = _direct(ds.info.x_path)
    idx = [4, 40, 4, 0]
    ds.read_images(idx)
    parent_pid, parent_fd, parent_file = ds._pid, ds._fd, ds._file
    assert parent_pid == os.getpid()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child_read, args=(ds, idx, expected[idx], queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(timeout=20)
        assert p.exitcode == 0
    for child_pid, handle_pid, fd, has_file, ok, err in results:
        assert err is None and ok
        assert child_pid != parent_pid and handle_pid == child_pid
        if parent_fd is not None:
            assert fd is not None and fd != parent_fd  # its own descriptor
        else:
            assert has_file
    assert len({r[0] for r in results}) == 2
    # The parent's handle is still its own and still works.
    assert ds._pid == parent_pid and ds._fd == parent_fd and ds._file is parent_file
    np.testing.assert_array_equal(ds.read_images(idx), expected[idx])
    if parent_fd is not None:
        os.fstat(parent_fd)


def test_close_and_reopen(split_any):
    ds = split_any
    expected = _direct(ds.info.x_path)
    ds.read_images([1])
    ds.close()
    assert ds._fd is None and ds._file is None
    np.testing.assert_array_equal(ds.read_images([3]), expected[[3]])


# ---------------------------------------------------------------- channel_stats


def _numpy_stats(x_path: Path, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    pixels = _direct(x_path)[:rows].reshape(-1, 3).astype(np.float64) / 255
    return pixels.mean(0), pixels.std(0)


def _cache_path(ds: PCamSplit) -> Path:
    return ds.info.x_path.with_name(ds.info.x_path.stem + ".stats.json")


def test_channel_stats_exact(split_any):
    ds = split_any
    mean, std = _numpy_stats(ds.info.x_path)
    stats = channel_stats(ds, chunk_rows=7, cache=False)
    np.testing.assert_allclose(stats["mean"], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats["std"], std, rtol=0, atol=1e-9)
    assert stats["rows"] == 50
    assert not _cache_path(ds).exists()


def test_channel_stats_rows(make_pcam_dir):
    root = make_pcam_dir({"train": 30})
    ds = PCamSplit(root, "train", rows=10)
    mean, std = _numpy_stats(ds.info.x_path, rows=10)
    stats = channel_stats(ds, chunk_rows=4)
    np.testing.assert_allclose(stats["mean"], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats["std"], std, rtol=0, atol=1e-9)
    full = channel_stats(PCamSplit(root, "train"))  # a different key: not the cached one
    assert full["rows"] == 30
    np.testing.assert_allclose(full["mean"], _numpy_stats(ds.info.x_path)[0], atol=1e-9)


def _count_chunks(monkeypatch, fail_after: int = 1) -> list[int]:
    calls: list[int] = []
    original = PCamSplit.iter_chunks

    def counting(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > fail_after:
            raise AssertionError("iter_chunks called again: cache not used")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PCamSplit, "iter_chunks", counting)
    return calls


def test_channel_stats_cache_reused(make_pcam_dir, monkeypatch):
    root = make_pcam_dir({"train": 16})
    calls = _count_chunks(monkeypatch)
    ds = PCamSplit(root, "train")
    first = channel_stats(ds, chunk_rows=5)
    cache = _cache_path(ds)
    assert cache.parent == root and cache.is_file()
    assert json.loads(cache.read_text())["value"] == first
    second = channel_stats(PCamSplit(root, "train"))  # would raise if it re-read the data
    assert second == first and len(calls) == 1
    assert not list(root.glob("*.tmp"))


def test_channel_stats_cache_invalidated(make_pcam_dir, monkeypatch):
    root = make_pcam_dir({"train": 16}, seed=0)
    x_path = root / file_name("train", "x")
    old = channel_stats(PCamSplit(root, "train"))
    before = x_path.stat()
    make_pcam_dir({"train": 16}, seed=99)  # same size, other pixels
    # Filesystem timestamps can be coarse; make sure the rewrite is visible as one.
    after = x_path.stat()
    if after.st_mtime_ns == before.st_mtime_ns:
        os.utime(x_path, ns=(after.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert x_path.stat().st_size == before.st_size
    new = channel_stats(PCamSplit(root, "train"))
    mean, std = _numpy_stats(x_path)
    np.testing.assert_allclose(new["mean"], mean, atol=1e-9)
    np.testing.assert_allclose(new["std"], std, atol=1e-9)
    assert not np.allclose(new["mean"], old["mean"], rtol=0, atol=1e-9)
    # A different number of rows changes the size: recomputed too.
    make_pcam_dir({"train": 9}, seed=5)
    assert channel_stats(PCamSplit(root, "train"))["rows"] == 9


def test_channel_stats_corrupt_cache(make_pcam_dir):
    root = make_pcam_dir({"train": 8})
    ds = PCamSplit(root, "train")
    _cache_path(ds).write_text("{not json")
    stats = channel_stats(ds)
    np.testing.assert_allclose(stats["mean"], _numpy_stats(ds.info.x_path)[0], atol=1e-9)
    assert json.loads(_cache_path(ds).read_text())["value"] == stats


def test_channel_stats_read_only_dir(make_pcam_dir, monkeypatch):
    root = make_pcam_dir({"train": 8})
    ds = PCamSplit(root, "train")
    if os.geteuid() == 0:  # root ignores permissions: simulate the refusal
        def refuse(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "write_text", refuse)
    mode = root.stat().st_mode
    root.chmod(0o555)
    try:
        before = sorted(os.listdir(root))
        stats = channel_stats(ds)
        assert sorted(os.listdir(root)) == before
    finally:
        root.chmod(mode)
    mean, std = _numpy_stats(ds.info.x_path)
    np.testing.assert_allclose(stats["mean"], mean, atol=1e-9)
    np.testing.assert_allclose(stats["std"], std, atol=1e-9)


# ---------------------------------------------------------------- read_meta


def test_read_meta_missing(make_pcam_dir):
    root = make_pcam_dir({"train": 3})
    assert read_meta(root, "train") is None
    assert read_meta(root, "train", 3) is None
    assert PCamSplit(root, "train").meta() is None


def test_read_meta_wrong_length(make_pcam_dir):
    root = make_pcam_dir({"train": 5})
    path = root / file_name("train", "meta")
    _meta(3).to_csv(path, index=False)
    assert len(read_meta(root, "train")) == 3
    with pytest.raises(PCamFormatError) as err:
        read_meta(root, "train", 5)
    msg = str(err.value)
    assert str(path) in msg and "3 rows" in msg and "has 5" in msg
    with pytest.raises(PCamFormatError, match="3 rows"):
        PCamSplit(root, "train").meta()


def test_read_meta_drops_index_column(tmp_path):
    _meta(4).to_csv(tmp_path / file_name("valid", "meta"))  # with the pandas index
    meta = read_meta(tmp_path, "valid", 4)
    assert tuple(meta.columns) == META_COLUMNS


@pytest.mark.parametrize(
    "content",
    [b"a,b\n1,2\n3,4,5,6\n", b"\xff\xfe\x00\x81garbage\x00\xff" * 50, b""],
    ids=["ragged", "binary", "empty"],
)
def test_read_meta_unreadable(tmp_path, content):
    path = tmp_path / file_name("test", "meta")
    path.write_bytes(content)
    with pytest.raises(PCamFormatError) as err:
        read_meta(tmp_path, "test")
    assert str(path) in str(err.value) and "not a readable CSV" in str(err.value)


def test_read_meta_empty_wsi(tmp_path):
    path = tmp_path / file_name("train", "meta")
    path.write_text("coord_y,wsi\n1,\n2,\n")
    with pytest.raises(PCamFormatError, match="'wsi'.*empty"):
        read_meta(tmp_path, "train")


# ---------------------------------------------------------------- PCAM_FILES


def test_pcam_files_table():
    assert len(PCAM_FILES) == 9
    assert set(PCAM_FILES) == set(itertools.product(SPLITS, ("x", "y", "meta")))
    for (split, kind), f in PCAM_FILES.items():
        ext = "csv" if kind == "meta" else "h5"
        assert f.name == f"camelyonpatch_level_2_split_{split}_{kind}.{ext}"
        assert f.name == file_name(split, kind)
        if kind == "meta":
            assert f.download_name == f.name and not f.compressed
            assert f.download_md5 == f.md5
        else:
            assert f.download_name == f.name + ".gz" and f.compressed
            assert f.download_md5 != f.md5
        assert re.fullmatch("[0-9a-f]{32}", f.md5) and re.fullmatch("[0-9a-f]{32}", f.download_md5)
    md5s = [f.md5 for f in PCAM_FILES.values()] + [
        f.download_md5 for f in PCAM_FILES.values() if f.compressed
    ]
    assert len(set(md5s)) == len(md5s)


@pytest.mark.parametrize(
    ("key", "download_md5", "md5"),
    [
        # Downloads: torchvision's table, which corrects the PCam README's valid/test swap.
        (("train", "x"), "1571f514728f59376b705fc836ff4b63", "01844da899645b4d6f84946d417ba453"),
        (("train", "y"), "35c2d7259d906cfc8143347bb8e05be7", "0781386bf6c2fb62d58ff18891466aca"),
        (("valid", "x"), "d5b63470df7cfa627aeec8b9dc0c066e", "81cf9680f1724c40673f10dc88e909b1"),
        (("valid", "y"), "2b85f58b927af9964a4c15b8f7e8f179", "94d8aacc249253159ce2a2e78a86e658"),
        (("test", "x"), "d8c2d60d490dbd479f8199bdfa0cf6ec", "2614b2e6717d6356be141d9d6dbfcb7e"),
        (("test", "y"), "60a7035772fbdb7f34eb86d4420cf66a", "11ed647efe9fe457a4eb45df1dba19ba"),
        # Meta CSVs: the md5s of the files (the README swaps valid and test here too).
        (("train", "meta"), "5a3dd671e465cfd74b5b822125e65b0a", "5a3dd671e465cfd74b5b822125e65b0a"),
        (("valid", "meta"), "67589e00a4a37ec317f2d1932c7502ca", "67589e00a4a37ec317f2d1932c7502ca"),
        (("test", "meta"), "3455fd69135b66734e1008f3af684566", "3455fd69135b66734e1008f3af684566"),
    ],
)
def test_pcam_checksums(key, download_md5, md5):
    assert PCAM_FILES[key].download_md5 == download_md5
    assert PCAM_FILES[key].md5 == md5


def test_read_into_given_buffer(make_pcam_dir):
    root = make_pcam_dir({"train": 40}, seed=5, index_pixels=True)
    data = PCamSplit(root, "train")
    idx = [7, 3, 3, 39, 8, 9, 10, 0]
    buf = np.zeros((len(idx), 96, 96, 3), dtype=np.uint8)
    assert data.read_images(idx, out=buf) is buf
    assert buf[:, 0, 0, 0].tolist() == idx
    with pytest.raises(ValueError, match=r"out must be a C-contiguous uint8 array of shape"):
        data.read_images(idx, out=np.zeros((len(idx), 96, 96, 3), dtype=np.float32))
    images, labels = data.read_batch(idx)
    assert images[:, 0, 0, 0].tolist() == idx
    assert labels.tolist() == [i % 2 for i in idx]
