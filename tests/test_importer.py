"""Tests of pcamlib.importer: generated fixtures, and the shared real data when present."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pcamlib import config
from pcamlib.importer import (
    ImportResult,
    SkippedFile,
    _split_counts,
    import_image_folders,
    import_kaggle,
)
from pcamlib.pcam import PCamFormatError, PCamSplit, PCamWriter, file_name, validate_split


def _pixels(rng: np.random.Generator, size: tuple[int, int] = (96, 96)) -> np.ndarray:
    return rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode is not None:
        im = im.convert(mode)
    im.save(path)
    return arr


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """src/{train,test}/{0,1} with lossless PNG and TIFF patches named patchNNNNNNN."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    arrays: dict[str, np.ndarray] = {}
    layout = {
        "train": [(7, 0, "png"), (2, 1, "tif"), (11, 1, "png"), (3, 0, "tiff"), (5, 1, "png")],
        "test": [(4, 1, "png"), (1, 0, "tif"), (9, 0, "png")],
    }
    for split, rows in layout.items():
        for row, label, ext in rows:
            rel = f"{split}/{label}/patch{row:07d}.{ext}"
            arrays[rel] = _save(src / rel, _pixels(rng))
    return src, arrays


def test_folders_happy_path(folders, tmp_path):
    src, arrays = folders
    dest = tmp_path / "dest"
    result = import_image_folders(src, dest, progress=False)
    assert isinstance(result, ImportResult)
    assert list(result.splits) == ["train", "test"]
    assert result.splits["train"].rows == 5 and result.splits["train"].positives == 3
    assert result.splits["test"].rows == 3 and result.splits["test"].positives == 1
    assert result.skipped == [] and result.rows == 8
    for split, expected_rows in (("train", [2, 3, 5, 7, 11]), ("test", [1, 4, 9])):
        data = PCamSplit(dest, split)
        meta = data.meta()
        assert list(meta.columns) == ["source_file", "label", "source_row"]
        assert meta["source_row"].tolist() == expected_rows
        images = data.read_images(np.arange(len(data)))
        for i, rel in enumerate(meta["source_file"]):
            assert rel.startswith(f"{split}/{meta['label'][i]}/patch{expected_rows[i]:07d}.")
            np.testing.assert_array_equal(images[i], arrays[rel])
            assert data.labels[i] == int(Path(rel).parent.name)
        data.close()
    assert not any(p.name.startswith(".") for p in dest.iterdir())


def test_folders_order_by_name_and_jpeg_matches_pil(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    for rel in ("valid/1/b.jpg", "valid/0/a.jpeg", "valid/0/c.JPG", "valid/1/a2.png"):
        _save(src / rel, _pixels(rng))
    (src / "valid/0/notes.txt").write_text("ignored")
    (src / "valid/README").write_text("ignored")
    import_image_folders(src, tmp_path / "dest", progress=False)
    data = PCamSplit(tmp_path / "dest", "valid")
    meta = data.meta()
    assert list(meta.columns) == ["source_file", "label"]
    assert meta["source_file"].tolist() == [
        "valid/0/a.jpeg", "valid/1/a2.png", "valid/1/b.jpg", "valid/0/c.JPG"
    ]
    assert data.labels.tolist() == [0, 1, 1, 0]
    for i, rel in enumerate(meta["source_file"]):
        np.testing.assert_array_equal(data.read_images([i])[0], _decode(src / rel))
    data.close()


def test_patch_rows_sort_numerically_and_deterministically(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    for rel in ("test/0/patch10.png", "test/1/patch9.png", "test/0/patch100.png"):
        _save(src / rel, _pixels(rng))
    import_image_folders(src, tmp_path / "a", progress=False, chunk_rows=1)
    import_image_folders(src, tmp_path / "b", progress=False)
    meta_a = pd.read_csv(tmp_path / "a" / file_name("test", "meta"))
    meta_b = pd.read_csv(tmp_path / "b" / file_name("test", "meta"))
    assert meta_a["source_row"].tolist() == [9, 10, 100]
    pd.testing.assert_frame_equal(meta_a, meta_b)
    a, b = PCamSplit(tmp_path / "a", "test"), PCamSplit(tmp_path / "b", "test")
    np.testing.assert_array_equal(a.read_images(range(3)), b.read_images(range(3)))
    a.close()
    b.close()


def test_splits_argument_selects(folders, tmp_path):
    src, _ = folders
    result = import_image_folders(src, tmp_path / "dest", splits=["test"], progress=False)
    assert list(result.splits) == ["test"]
    assert not (tmp_path / "dest" / file_name("train", "x")).exists()
    with pytest.raises(PCamFormatError, match="valid: split folder not found"):
        import_image_folders(src, tmp_path / "dest", splits=["valid"], progress=False)
    with pytest.raises(ValueError, match="split must be one of"):
        import_image_folders(src, tmp_path / "dest", splits=["val"], progress=False)
    with pytest.raises(ValueError, match="on_bad"):
        import_image_folders(src, tmp_path / "dest", on_bad="ignore", progress=False)


def test_wrong_size_names_file_and_sizes(folders, tmp_path):
    src, _ = folders
    bad = src / "train/0/patch0000013.png"
    _save(bad, _pixels(np.random.default_rng(3), size=(95, 96)))
    with pytest.raises(PCamFormatError) as err:
        import_image_folders(src, tmp_path / "dest", progress=False)
    msg = str(err.value)
    assert str(bad) in msg and "95x96" in msg and "expected 96x96" in msg
    assert not (tmp_path / "dest" / file_name("train", "x")).exists()


def test_unreadable_file_names_file(folders, tmp_path):
    src, _ = folders
    bad = src / "test/1/patch0000020.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(PCamFormatError) as err:
        import_image_folders(src, tmp_path / "dest", progress=False)
    assert str(bad) in str(err.value) and "not a readable image" in str(err.value)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_mode_is_an_error(folders, tmp_path, mode):
    src, _ = folders
    bad = src / "train/1/patch0000030.png"
    _save(bad, _pixels(np.random.default_rng(4)), mode=mode)
    with pytest.raises(PCamFormatError) as err:
        import_image_folders(src, tmp_path / "dest", progress=False)
    msg = str(err.value)
    assert str(bad) in msg and repr(mode) in msg and "'RGB'" in msg


def test_skip_lists_bad_files_and_writes_the_rest(folders, tmp_path):
    src, arrays = folders
    rng = np.random.default_rng(5)
    small = src / "train/0/patch0000013.png"
    _save(small, _pixels(rng, size=(95, 96)))
    gray = src / "train/1/patch0000014.png"
    _save(gray, _pixels(rng), mode="L")
    garbage = src / "test/0/patch0000008.jpg"
    garbage.write_bytes(b"\x00garbage")
    result = import_image_folders(src, tmp_path / "dest", on_bad="skip", progress=False)
    assert result.splits["train"].rows == 5 and result.splits["test"].rows == 3
    assert {f.path for f in result.skipped} == {small, gray, garbage}
    assert all(isinstance(f, SkippedFile) and f.reason for f in result.skipped)
    summary = result.summary()
    assert str(small) in summary and str(garbage) in summary and "95x96" in summary
    meta = pd.read_csv(tmp_path / "dest" / file_name("train", "meta"))
    assert sorted(meta["source_file"]) == sorted(k for k in arrays if k.startswith("train/"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_image_fails_at_decode(folders, tmp_path):
    src, _ = folders
    bad = src / "train/1/patch0000011.png"
    _truncate(bad)
    with pytest.raises(PCamFormatError) as err:
        import_image_folders(src, tmp_path / "dest", progress=False)
    assert str(bad) in str(err.value) and "cannot decode" in str(err.value)
    result = import_image_folders(
        src, tmp_path / "dest", on_bad="skip", chunk_rows=2, progress=False
    )
    assert [f.path for f in result.skipped] == [bad]
    assert result.splits["train"].rows == 4 and result.splits["train"].positives == 2
    assert validate_split(tmp_path / "dest", "train").length == 4
    meta = pd.read_csv(tmp_path / "dest" / file_name("train", "meta"))
    assert meta["source_row"].tolist() == [2, 3, 5, 7]


def test_failing_import_leaves_dest_byte_identical(folders, tmp_path):
    src, _ = folders
    dest = tmp_path / "dest"
    rng = np.random.default_rng(6)
    for split, n in (("train", 3), ("test", 2)):
        with PCamWriter(dest, split, n, meta=True) as w:
            w.write(
                rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
                np.arange(n) % 2,
                pd.DataFrame({"source_file": [f"old{i}" for i in range(n)]}),
            )
    before = _digest(dest)
    # train imports fine; test fails only while decoding, after train was written
    _truncate(src / "test/0/patch0000009.png")
    with pytest.raises(PCamFormatError, match="cannot decode"):
        import_image_folders(src, dest, progress=False)
    assert _digest(dest) == before
    # header failures too
    _save(src / "test/0/patch0000009.png", _pixels(rng, size=(96, 95)))
    with pytest.raises(PCamFormatError, match="96x95"):
        import_image_folders(src, dest, progress=False)
    assert _digest(dest) == before


def test_layout_errors(tmp_path):
    src = tmp_path / "src"
    with pytest.raises(PCamFormatError, match="source folder not found"):
        import_image_folders(src, tmp_path / "dest", progress=False)
    (src / "val").mkdir(parents=True)
    with pytest.raises(PCamFormatError, match=r"no split folders.*'val'"):
        import_image_folders(src, tmp_path / "dest", progress=False)
    (src / "train/0").mkdir(parents=True)
    with pytest.raises(PCamFormatError, match=r"train/1: label folder missing"):
        import_image_folders(src, tmp_path / "dest", progress=False)
    (src / "train/1").mkdir()
    with pytest.raises(PCamFormatError, match="train: no images"):
        import_image_folders(src, tmp_path / "dest", progress=False)
    (src / "train/2").mkdir()
    with pytest.raises(PCamFormatError, match=r"unexpected folders \['2'\]"):
        import_image_folders(src, tmp_path / "dest", progress=False)


def test_same_name_in_both_label_folders(tmp_path):
    rng = np.random.default_rng(7)
    src = tmp_path / "src"
    for rel in ("test/0/patch1.png", "test/1/patch1.png", "test/0/patch2.png"):
        _save(src / rel, _pixels(rng))
    with pytest.raises(PCamFormatError, match="both label folders"):
        import_image_folders(src, tmp_path / "dest", progress=False)
    result = import_image_folders(src, tmp_path / "dest", on_bad="skip", progress=False)
    assert result.splits["test"].rows == 1 and len(result.skipped) == 2


def test_all_images_skipped_is_an_error(tmp_path):
    src = tmp_path / "src"
    (src / "test/1").mkdir(parents=True)
    _save(src / "test/0/x.png", _pixels(np.random.default_rng(8), size=(32, 32)))
    with pytest.raises(PCamFormatError, match="no readable images"):
        import_image_folders(src, tmp_path / "dest", on_bad="skip", progress=False)


# ---------------------------------------------------------------------------- Kaggle


@pytest.fixture
def kaggle(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], pd.DataFrame]:
    """Kaggle layout with 20 lossless TIFFs: 8 positives, 12 negatives."""
    rng = np.random.default_rng(10)
    src = tmp_path / "kaggle"
    ids = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(20)]
    labels = [1 if i % 5 in (0, 2) else 0 for i in range(20)]
    arrays = {i: _save(src / "train" / f"{i}.tif", _pixels(rng)) for i in ids}
    table = pd.DataFrame({"id": ids, "label": labels})
    table.to_csv(src / "train_labels.csv", index=False)
    return src, arrays, table


def test_kaggle_happy_path(kaggle, tmp_path):
    src, arrays, table = kaggle
    dest = tmp_path / "dest"
    result = import_kaggle(src, dest, valid_fraction=0.2, test_fraction=0.2, progress=False)
    assert list(result.splits) == ["train", "valid", "test"]
    assert result.rows == 20 and result.positives == 8
    seen: list[str] = []
    order = {k: i for i, k in enumerate(table["id"])}
    for split in result.splits:
        data = PCamSplit(dest, split)
        meta = data.meta()
        assert list(meta.columns) == ["source_file", "label", "kaggle_id"]
        assert set(data.labels.tolist()) == {0, 1}
        ranks = [order[k] for k in meta["kaggle_id"]]
        assert ranks == sorted(ranks)  # CSV order within a split
        images = data.read_images(np.arange(len(data)))
        for i, kid in enumerate(meta["kaggle_id"]):
            assert meta["source_file"][i] == f"train/{kid}.tif"
            np.testing.assert_array_equal(images[i], arrays[kid])
            assert data.labels[i] == table.set_index("id").loc[kid, "label"]
        seen += meta["kaggle_id"].tolist()
        data.close()
    assert sorted(seen) == sorted(table["id"])
    assert (result.splits["valid"].rows, result.splits["test"].rows) == (4, 4)


def test_kaggle_split_is_seeded_and_test_may_be_empty(kaggle, tmp_path):
    src, _, _ = kaggle

    def ids(dest: Path, split: str) -> list[str]:
        return pd.read_csv(dest / file_name(split, "meta"))["kaggle_id"].tolist()

    import_kaggle(src, tmp_path / "a", seed=3, progress=False)
    import_kaggle(src, tmp_path / "b", seed=3, progress=False)
    for split in ("train", "valid", "test"):
        assert ids(tmp_path / "a", split) == ids(tmp_path / "b", split)
    result = import_kaggle(src, tmp_path / "c", test_fraction=0, progress=False)
    assert list(result.splits) == ["train", "valid"]
    assert not (tmp_path / "c" / file_name("test", "x")).exists()
    assert result.rows == 20


def test_kaggle_tiny_input_gets_both_classes_everywhere(kaggle, tmp_path):
    src, _, table = kaggle
    keep = pd.concat([table[table.label == 1].head(3), table[table.label == 0].head(3)])
    keep.to_csv(src / "train_labels.csv", index=False)
    result = import_kaggle(src, tmp_path / "dest", progress=False)
    for split in ("train", "valid", "test"):
        assert result.splits[split].rows == 2 and result.splits[split].positives == 1
    keep = pd.concat([table[table.label == 1].head(2), table[table.label == 0].head(5)])
    keep.to_csv(src / "train_labels.csv", index=False)
    with pytest.raises(PCamFormatError, match="2 usable image.*labelled 1.*at least 3"):
        import_kaggle(src, tmp_path / "dest", progress=False)


def test_split_counts():
    assert _split_counts(10, 0.1, 0.1) == {"valid": 1, "test": 1, "train": 8}
    assert _split_counts(5, 0.1, 0.1) == {"valid": 1, "test": 1, "train": 3}
    assert _split_counts(3, 0.4, 0.4) == {"valid": 1, "test": 1, "train": 1}
    assert _split_counts(1000, 0.1, 0) == {"valid": 100, "test": 0, "train": 900}


def test_kaggle_label_file_errors(kaggle, tmp_path):
    src, _, table = kaggle
    dest = tmp_path / "dest"
    csv = src / "train_labels.csv"
    csv.rename(src / "labels.bak")
    with pytest.raises(PCamFormatError, match="train_labels.csv: label file not found"):
        import_kaggle(src, dest, progress=False)
    table.rename(columns={"label": "target"}).to_csv(csv, index=False)
    with pytest.raises(PCamFormatError, match=r"missing column\(s\) \['label'\]"):
        import_kaggle(src, dest, progress=False)
    bad = table.copy()
    bad.loc[4, "label"] = 2
    bad.to_csv(csv, index=False)
    with pytest.raises(PCamFormatError, match=f"label must be 0 or 1; id '{bad.id[4]}'.*'2'"):
        import_kaggle(src, dest, progress=False)
    pd.concat([table, table.iloc[[3]]]).to_csv(csv, index=False)
    with pytest.raises(PCamFormatError, match=f"duplicate ids: '{table.id[3]}'"):
        import_kaggle(src, dest, progress=False)
    with pytest.raises(ValueError, match="test_fraction"):
        import_kaggle(src, dest, test_fraction=1.2, progress=False)
    assert not dest.exists() or not any(dest.iterdir())


def test_kaggle_missing_image_names_id_and_path(kaggle, tmp_path):
    src, _, table = kaggle
    gone = src / "train" / f"{table.id[6]}.tif"
    gone.unlink()
    with pytest.raises(PCamFormatError) as err:
        import_kaggle(src, tmp_path / "dest", progress=False)
    assert repr(table.id[6]) in str(err.value) and str(gone) in str(err.value)


def test_kaggle_bad_image(kaggle, tmp_path):
    src, _, table = kaggle
    bad = src / "train" / f"{table.id[1]}.tif"
    _save(bad, _pixels(np.random.default_rng(11), size=(96, 48)))
    with pytest.raises(PCamFormatError) as err:
        import_kaggle(src, tmp_path / "dest", progress=False)
    assert str(bad) in str(err.value) and "96x48" in str(err.value)
    result = import_kaggle(src, tmp_path / "dest", on_bad="skip", progress=False)
    assert [f.path for f in result.skipped] == [bad] and result.rows == 19


# ----------------------------------------------------------------------- shared real data


def _require(path: Path) -> None:
    if not path.is_dir():
        pytest.skip(f"shared real data not found at {path} (only present beside the checkout)")


@pytest.mark.shared
def test_shared_pcam_test_split(tmp_path):
    _require(config.SHARED_PCAM_SUBSET)
    src = config.SHARED_PCAM_SUBSET
    result = import_image_folders(src, tmp_path, splits=["test"], progress=False)
    assert result.splits["test"].rows == 1000 and result.splits["test"].positives == 500
    assert result.skipped == []
    data = PCamSplit(tmp_path, "test")
    meta = data.meta()
    assert len(data) == 1000 and int(data.labels.sum()) == 500
    assert meta["source_row"].is_monotonic_increasing
    sample = np.sort(np.random.default_rng(0).choice(len(data), size=50, replace=False))
    images = data.read_images(sample)
    for img, row in zip(images, sample, strict=True):
        rel = Path(meta["source_file"][row])
        np.testing.assert_array_equal(img, _decode(src / rel))
        assert data.labels[row] == int(rel.parent.name) == meta["label"][row]
        assert meta["source_row"][row] == int(rel.stem.removeprefix("patch"))
    data.close()


@pytest.mark.shared
def test_shared_kaggle_mini(tmp_path):
    _require(config.SHARED_KAGGLE_MINI)
    src = config.SHARED_KAGGLE_MINI
    result = import_kaggle(src, tmp_path, progress=False)
    assert result.rows == 15 and result.positives == 5
    labels = pd.read_csv(src / "train_labels.csv", dtype={"id": str}).set_index("id")["label"]
    for split in result.splits:
        info = validate_split(tmp_path, split)
        assert info.length == result.splits[split].rows
        data = PCamSplit(tmp_path, split)
        meta = data.meta()
        images = data.read_images(np.arange(len(data)))
        for i, kid in enumerate(meta["kaggle_id"]):
            np.testing.assert_array_equal(images[i], _decode(src / meta["source_file"][i]))
            assert data.labels[i] == labels[kid]
        data.close()
