from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from pcamlib import sample
from pcamlib.pcam import (
    CENTRE_BOX,
    EXPECTED_LENGTHS,
    META_COLUMNS,
    SPLITS,
    PCamSplit,
    file_name,
    read_meta,
    validate_split,
)

TOP, LEFT, BOTTOM, RIGHT = CENTRE_BOX
SMALL = {"train": 512, "valid": 256, "test": 257}


@pytest.fixture(scope="module")
def patches() -> sample.Patches:
    return sample.generate_patches(1000, seed=7)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple:
    dest = tmp_path_factory.mktemp("sample")
    infos = sample.write_sample(dest, sizes=SMALL, seed=3, progress=False, chunk_rows=256)
    return dest, infos


def _read(dest, split) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    with h5py.File(dest / file_name(split, "x"), "r") as fx, \
            h5py.File(dest / file_name(split, "y"), "r") as fy:
        x, y = fx["x"][:], fy["y"][:].reshape(-1)
    return x, y, read_meta(dest, split, len(x))


# ----------------------------------------------------------------------------- patches


def test_shapes_and_types(patches):
    images, labels, masks = patches
    assert images.shape == (1000, 96, 96, 3) and images.dtype == np.uint8
    assert labels.shape == (1000,) and set(np.unique(labels)) == {0, 1}
    assert masks.shape == (1000, 96, 96) and masks.dtype == bool
    assert labels.sum() == 500  # positive_fraction=0.5, exactly


def test_deterministic_by_seed():
    a = sample.generate_patches(48, seed=11)
    b = sample.generate_patches(48, seed=11)
    c = sample.generate_patches(48, seed=12)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.images, c.images)


def test_label_rule_is_exact(patches):
    images, labels, masks = patches
    centre = masks[:, TOP:BOTTOM, LEFT:RIGHT]
    np.testing.assert_array_equal(labels, centre.any(axis=(1, 2)))
    # Positives carry a real amount of tumour in the centre, not a stray pixel.
    assert centre[labels == 1].sum(axis=(1, 2)).min() >= 100
    # PCam-like negatives: tumour outside the centre only, in roughly 40% of them.
    ring = masks[labels == 0].any(axis=(1, 2))
    assert 0.25 < ring.mean() < 0.55


def test_ring_tumour_stays_clear_of_the_centre(patches):
    _, labels, masks = patches
    neg = masks[labels == 0]
    # Tumour in negatives keeps a margin from the box, so blur cannot carry it inside.
    grown = neg[:, TOP - 3:BOTTOM + 3, LEFT - 3:RIGHT + 3]
    assert not grown.any()


def test_options():
    p = sample.generate_patches(40, seed=1, positive_fraction=0.25)
    assert p.labels.sum() == 10
    assert sample.generate_patches(0, seed=1).images.shape == (0, 96, 96, 3)
    light = sample.generate_patches(64, seed=2, stain_style="light").images.mean()
    dark = sample.generate_patches(64, seed=2, stain_style="dark").images.mean()
    assert dark < light - 5
    with pytest.raises(ValueError, match="stain_style"):
        sample.generate_patches(4, seed=1, stain_style="blue")
    with pytest.raises(ValueError, match="positive_fraction"):
        sample.generate_patches(4, seed=1, positive_fraction=1.5)


def test_colour_looks_like_h_and_e(patches):
    mean = patches.images.reshape(-1, 3).mean(axis=0)
    red, green, blue = mean
    assert red > green + 15 and blue > green + 10  # pink/purple, not grey or green
    assert 120 < mean.mean() < 220
    # Stroma far from nuclei is pink: red clearly above green.
    bright = patches.images.reshape(-1, 3)[::97].astype(int)
    stroma = bright[(bright.sum(1) > 500) & (bright.sum(1) < 700)]
    assert (stroma[:, 0] - stroma[:, 1]).mean() > 30


def _auc(features: np.ndarray, labels: np.ndarray) -> float:
    x = (features - features.mean(0)) / (features.std(0) + 1e-9)
    prob = cross_val_predict(LogisticRegression(max_iter=1000), x, labels, cv=4,
                             method="predict_proba")[:, 1]
    return roc_auc_score(labels, prob)


def test_learnable_from_the_centre_not_from_global_colour(patches):
    images, labels, _ = patches
    centre = images[:, TOP:BOTTOM, LEFT:RIGHT].reshape(len(images), -1, 3).astype(np.float32)
    dark = (centre.sum(-1) < 330).mean(1, keepdims=True)  # dark nuclear pixels (lymphocytes)
    centre_features = np.c_[centre.mean(1), centre.std(1), dark]
    global_mean = images.reshape(len(images), -1, 3).mean(1)
    assert _auc(centre_features, labels) > 0.8
    assert _auc(global_mean, labels) < 0.75


# ----------------------------------------------------------------------------- files


def test_write_sample_files(written):
    dest, infos = written
    assert set(infos) == set(SPLITS)
    for split in SPLITS:
        info = validate_split(dest, split)
        assert info.length == SMALL[split] == infos[split].length
        assert info.positives == SMALL[split] // 2  # balanced; odd row negative
        assert info.meta_path is not None
        x, y, meta = _read(dest, split)
        assert tuple(meta.columns) == META_COLUMNS
        np.testing.assert_array_equal(meta["center_tumor_patch"].to_numpy(), y.astype(bool))
        assert (meta["tumor_patch"] >= meta["center_tumor_patch"]).all()
        assert (meta["tumor_patch"] & ~meta["center_tumor_patch"]).any()
        assert meta["wsi"].map(lambda w: bool(re.fullmatch(r"sample_wsi_\d{3,}", w))).all()
        assert meta["wsi"].nunique() >= 2
        assert np.issubdtype(meta["coord_y"].dtype, np.integer)
    ds = PCamSplit(dest, "valid")
    assert len(ds) == SMALL["valid"] and ds[0][0].shape == (96, 96, 3)
    ds.close()


def test_splits_are_wsi_disjoint(written):
    dest, _ = written
    slides = {s: set(read_meta(dest, s)["wsi"]) for s in SPLITS}
    assert not slides["train"] & slides["valid"]
    assert not slides["train"] & slides["test"]
    assert not slides["valid"] & slides["test"]


def test_write_is_deterministic_and_independent_of_chunking(written, tmp_path):
    dest, _ = written
    sample.write_sample(tmp_path, sizes=SMALL, seed=3, progress=False, chunk_rows=4096)
    for split in SPLITS:
        xa, ya, ma = _read(dest, split)
        xb, yb, mb = _read(tmp_path, split)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        pd.testing.assert_frame_equal(ma, mb)


def test_sample_ready_stamp(written):
    dest, _ = written
    assert sample.sample_ready(dest, SMALL, seed=3)
    assert not sample.sample_ready(dest, SMALL, seed=4)
    assert not sample.sample_ready(dest, SMALL, seed=3, fast=True)
    assert not sample.sample_ready(dest, {**SMALL, "test": 258}, seed=3)
    assert not sample.sample_ready(dest / "missing", SMALL, seed=3)
    stamp = json.loads((dest / sample.STAMP_NAME).read_text())
    assert stamp["generator_version"] == sample.GENERATOR_VERSION
    # A matching stamp means no rewrite.
    x_path = dest / file_name("train", "x")
    before = x_path.stat().st_mtime_ns
    infos = sample.write_sample(dest, sizes=SMALL, seed=3, progress=False)
    assert x_path.stat().st_mtime_ns == before
    assert infos["train"].length == SMALL["train"]


def test_stamp_notices_changed_files(tmp_path):
    sizes = {"train": 8, "valid": 4, "test": 4}
    sample.write_sample(tmp_path, sizes=sizes, seed=0, progress=False)
    assert sample.sample_ready(tmp_path, sizes, seed=0)
    (tmp_path / file_name("test", "meta")).unlink()
    assert not sample.sample_ready(tmp_path, sizes, seed=0)
    sample.write_sample(tmp_path, sizes=sizes, seed=0, progress=False)
    assert sample.sample_ready(tmp_path, sizes, seed=0)
    assert read_meta(tmp_path, "test") is not None


def test_fast_mode(tmp_path):
    sizes = {"train": 3000, "valid": 64, "test": 64}
    infos = sample.write_sample(tmp_path, sizes=sizes, seed=5, fast=True, progress=False)
    assert sample.sample_ready(tmp_path, sizes, seed=5, fast=True)
    assert not sample.sample_ready(tmp_path, sizes, seed=5)
    assert infos["train"].length == 3000 and infos["train"].positives == 1500
    x, y, meta = _read(tmp_path, "train")
    assert x.shape == (3000, 96, 96, 3)
    # Every row is a rotated or flipped pool patch with that patch's label.
    pool = sample._fast_pool(5)
    n_pool = sample.FAST_POOL_SIZE
    assert pool.images.shape == (8 * n_pool, 96, 96, 3)
    pool_labels = np.zeros(n_pool, dtype=np.uint8)
    pool_labels[pool.by_label[1]] = 1
    index = {img.tobytes(): i % n_pool for i, img in enumerate(pool.images)}
    rows = [index[img.tobytes()] for img in x[:300]]
    np.testing.assert_array_equal(y[:300], pool_labels[rows])
    np.testing.assert_array_equal(meta["tumor_patch"][:300], pool.tumour[rows])
    assert len(set(rows)) > 100
    np.testing.assert_array_equal(meta["center_tumor_patch"].to_numpy(), y.astype(bool))


def test_dihedral_transforms_keep_labels():
    # Fast mode relies on this: every rotation or flip maps the centre box onto itself.
    p = sample.generate_patches(8, seed=3)
    for k in range(4):
        for flip in (False, True):
            m = np.rot90(p.masks, k, axes=(1, 2))
            m = m[:, :, ::-1] if flip else m
            np.testing.assert_array_equal(m[:, TOP:BOTTOM, LEFT:RIGHT].any(axis=(1, 2)),
                                          p.labels)


def test_resolve_sizes():
    assert sample.resolve_sizes() == sample.DEFAULT_SIZES
    assert sample.resolve_sizes(full_size=True) == EXPECTED_LENGTHS
    assert sample.resolve_sizes({"train": 10}) == {**sample.DEFAULT_SIZES, "train": 10}
    with pytest.raises(ValueError, match="unknown split"):
        sample.resolve_sizes({"training": 10})
    with pytest.raises(ValueError, match="not both"):
        sample.resolve_sizes({"train": 10}, full_size=True)
    with pytest.raises(ValueError, match="at least 2"):
        sample.resolve_sizes({"valid": 1})
