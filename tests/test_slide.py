"""Slide inference (pcamlib.slide): mosaics of known patches written as tiled TIFFs.

Each test slide is a white, slightly noisy "glass" with 96x96 patches pasted at known,
tile-aligned places, so every predicted tile can be compared with the prediction of the
patch file itself.

- Real data (skipped without ``../shared``): a resnet18 is trained from scratch in a
  module fixture on 2,000 real patches (1,000 per class), centre crop 32, 3 epochs
  (about 35 s on 2 busy cores; test AUC about 0.75). The mosaic uses real test patches
  that this model classifies confidently and correctly and that are dense tissue, so the
  test can demand that the high tiles are exactly the tumour patches.
- Everything else runs on generated H&E-like patches (``pcamlib.sample``) with a model
  folder exported from a hand-written run directory holding random weights: the geometry,
  the readers and the errors do not need a trained model.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from test_train import make_profile

import pcamlib.train as T
from pcamlib import config, deploy, slide
from pcamlib.cli import main
from pcamlib.data import IMAGENET_STATS
from pcamlib.importer import import_image_folders
from pcamlib.sample import generate_patches

CPU = torch.device("cpu")
TILE = 96

pytestmark = pytest.mark.usefixtures("empty_weights_cache")

needs_subset = pytest.mark.skipif(
    not config.SHARED_PCAM_SUBSET.is_dir(),
    reason=f"shared real PCam subset not found at {config.SHARED_PCAM_SUBSET}",
)


def _glass(height: int, width: int, seed: int = 0) -> np.ndarray:
    """White slide background with a little noise (real glass is not exactly 255)."""
    rng = np.random.default_rng(seed)
    return rng.integers(238, 256, (height, width, 3), dtype=np.uint8)


def _mosaic(canvas: np.ndarray, patches: np.ndarray, cells: list[tuple[int, int]],
            scale: int = 1) -> np.ndarray:
    """Paste ``patches`` at tile cells (row, col) of a canvas, each upsampled ``scale`` x."""
    for patch, (row, col) in zip(patches, cells, strict=True):
        big = patch.repeat(scale, 0).repeat(scale, 1)
        y, x = row * TILE * scale, col * TILE * scale
        canvas[y:y + big.shape[0], x:x + big.shape[1]] = big
    return canvas


def _write_tiff(path: Path, image: np.ndarray, **kwargs) -> Path:
    kwargs.setdefault("tile", (256, 256))
    kwargs.setdefault("compression", "zlib")
    tifffile.imwrite(path, image, photometric="rgb", **kwargs)
    return path


def _tiles(out_dir: Path) -> pd.DataFrame:
    return pd.read_csv(out_dir / "tiles.csv")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """A model folder exported from a hand-written run directory with random weights."""
    root = tmp_path_factory.mktemp("random-model")
    run_dir = root / "run"
    run_dir.mkdir()
    mean, std = IMAGENET_STATS
    (run_dir / "params.json").write_text(json.dumps({
        "identity": {"arch": "resnet18", "centre_crop": None, "train_rows": None},
        "resolved": {"normalisation": {"source": "imagenet", "mean": list(mean),
                                       "std": list(std)}},
        "data_dir": None}))
    (run_dir / "run.json").write_text(json.dumps({"complete": True, "best_epoch": 0}))
    torch.manual_seed(0)
    torch.save(deploy.build_model("resnet18").state_dict(), run_dir / "best.pth")
    deploy.export_model(run_dir, root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def classifier(random_model):
    return deploy.load_model(random_model, device=CPU)


@pytest.fixture(scope="module")
def synthetic_patches() -> np.ndarray:
    return generate_patches(6, seed=3).images


CELLS = [(1, 1), (1, 6), (3, 3), (4, 8), (6, 0), (6, 5)]


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory, synthetic_patches) -> Path:
    """A 1,000 x 700 px single-level slide with six patches at CELLS."""
    path = tmp_path_factory.mktemp("slide") / "mosaic.tif"
    return _write_tiff(path, _mosaic(_glass(700, 1000), synthetic_patches, CELLS))


# ------------------------------------------------------------------------------ geometry


def test_tiles_land_on_the_patches(classifier, synthetic_slide, synthetic_patches, tmp_path):
    expected = classifier.predict(synthetic_patches)
    assert np.ptp(expected) > 1e-4  # random weights still tell these patches apart
    result = slide.predict_slide(classifier, synthetic_slide, tmp_path / "out", progress=False)
    tiles = _tiles(tmp_path / "out")
    assert list(tiles.columns) == ["x", "y", "prob_tumour"]
    assert result.tiles == len(tiles) == len(CELLS)  # the glass is masked out
    assert result.grid_shape == (7, 10) and result.backend == "tifffile"
    got = {(x, y): p for x, y, p in tiles.itertuples(index=False)}
    for (row, col), prob in zip(CELLS, expected, strict=True):
        assert got[(col * TILE, row * TILE)] == pytest.approx(prob, abs=1e-6)
    grid = np.load(tmp_path / "out" / "probabilities.npy")
    assert grid.shape == (7, 10) and grid.dtype == np.float32
    assert np.argwhere(~np.isnan(grid)).tolist() == sorted(map(list, CELLS))
    for (row, col), prob in zip(CELLS, expected, strict=True):
        assert grid[row, col] == pytest.approx(prob, abs=1e-6)
    meta = json.loads((tmp_path / "out" / "slide.json").read_text())
    assert meta["grid"]["rows"] == 7 and meta["grid"]["columns"] == 10
    assert meta["tiles_predicted"] == 6 and meta["backend"] == "tifffile"
    assert Image.open(tmp_path / "out" / "heatmap.png").size == (1000, 700)
    mask = np.asarray(Image.open(tmp_path / "out" / "tissue_mask.png")) > 0
    assert mask[100:180, 100:180].mean() > 0.9 and mask[0:90, 0:90].mean() < 0.01


def test_stride_and_min_tissue(classifier, synthetic_slide, synthetic_patches, tmp_path):
    result = slide.predict_slide(classifier, synthetic_slide, tmp_path / "s48", stride=48,
                                 min_tissue=0.0, progress=False)
    assert result.grid_shape == ((700 - 96) // 48 + 1, (1000 - 96) // 48 + 1)
    tiles = _tiles(tmp_path / "s48")
    assert len(tiles) == result.tiles == 13 * 19  # min_tissue=0: every tile
    assert set(tiles.x) == set(range(0, 1000 - 95, 48))
    got = {(x, y): p for x, y, p in tiles.itertuples(index=False)}
    expected = classifier.predict(synthetic_patches)
    for (row, col), prob in zip(CELLS, expected, strict=True):
        # Batches of 128 tiles here, of 6 patches there: oneDNN picks other kernels for
        # other batch sizes, so float32 results differ in the last digits.
        assert got[(col * TILE, row * TILE)] == pytest.approx(prob, abs=1e-5)


def test_pyramid_level_coordinates_are_level0(classifier, synthetic_patches, tmp_path):
    """Level 1 holds the patches at 96 px; level 0 the same slide at twice the size."""
    level1 = _mosaic(_glass(700, 1000), synthetic_patches, CELLS)
    level0 = level1.repeat(2, 0).repeat(2, 1)
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(level0, photometric="rgb", tile=(256, 256), subifds=1, compression="zlib")
        tw.write(level1, photometric="rgb", tile=(256, 256), subfiletype=1, compression="zlib")
    with slide.open_slide(path) as reader:
        assert reader.level_dimensions == [(2000, 1400), (1000, 700)]
        np.testing.assert_array_equal(reader.read_region(1, 90, 80, 300, 200),
                                      level1[80:280, 90:390])
    result = slide.predict_slide(classifier, path, tmp_path / "out", level=1, progress=False)
    tiles = _tiles(tmp_path / "out")
    assert result.level == 1 and len(tiles) == len(CELLS)
    expected = classifier.predict(synthetic_patches)
    got = {(x, y): p for x, y, p in tiles.itertuples(index=False)}
    for (row, col), prob in zip(CELLS, expected, strict=True):
        assert got[(2 * col * TILE, 2 * row * TILE)] == pytest.approx(prob, abs=1e-6)
    meta = json.loads((tmp_path / "out" / "slide.json").read_text())
    assert meta["level_scale"] == [2.0, 2.0] and meta["grid"]["step_level0"] == [192.0, 192.0]


def test_openslide_reads_what_tifffile_reads(classifier, synthetic_slide, tmp_path):
    with slide.open_slide(synthetic_slide, "tifffile") as tiff, \
            slide.open_slide(synthetic_slide, "openslide") as osr:
        assert tiff.level_dimensions == osr.level_dimensions == [(1000, 700)]
        for x, y, w, h in ((0, 0, 96, 96), (250, 250, 300, 20), (900, 600, 200, 200),
                           (-10, -5, 50, 50)):
            np.testing.assert_array_equal(tiff.read_region(0, x, y, w, h),
                                          osr.read_region(0, x, y, w, h))
        assert tiff.read_region(0, 950, 650, 100, 100)[60:, 60:].min() == 255  # outside: white
    slide.predict_slide(classifier, synthetic_slide, tmp_path / "tf", progress=False)
    slide.predict_slide(classifier, synthetic_slide, tmp_path / "os", backend="openslide",
                        thumbnail_side=1000, progress=False)
    a, b = _tiles(tmp_path / "tf"), _tiles(tmp_path / "os")
    pd.testing.assert_frame_equal(a, b)


def test_region_reads_stay_small_on_a_large_slide(classifier, tmp_path, monkeypatch):
    """Every read is one block (or thumbnail block), never a whole level."""
    pool = generate_patches(8, seed=5).images
    patches = pool[np.argsort(pool.mean(axis=(1, 2, 3)))[:2]]  # the two most tissue-like
    image = _mosaic(_glass(2500, 4600), patches, [(2, 3), (20, 44)])
    path = _write_tiff(tmp_path / "wide.tif", image)
    del image
    areas = []
    original = slide.TiffSlide.read_region

    def record(self, level, x, y, width, height):
        areas.append(width * height)
        return original(self, level, x, y, width, height)

    monkeypatch.setattr(slide.TiffSlide, "read_region", record)
    result = slide.predict_slide(classifier, path, tmp_path / "out", thumbnail_side=1024,
                                 progress=False)
    assert result.tiles == 2
    assert max(areas) <= (slide.REGION_SIDE + TILE) ** 2 < 4600 * 2500 / 2


def test_interrupted_slide_leaves_nothing(classifier, synthetic_slide, tmp_path, monkeypatch):
    calls = []

    def interrupt(images, tta=False):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.zeros(len(images))

    monkeypatch.setattr(classifier, "predict", interrupt)
    with pytest.raises(KeyboardInterrupt):
        slide.predict_slide(classifier, synthetic_slide, tmp_path / "out", batch_size=2,
                            progress=False)
    assert list(tmp_path.iterdir()) == []


def test_otsu_threshold_splits_two_populations():
    values = np.r_[np.full(500, 60), np.full(300, 200)].astype(np.uint8)
    assert 60 <= slide.otsu_threshold(values) < 200
    flat = np.full((20, 20, 3), 250, np.uint8)
    assert not slide.tissue_mask(flat).any()  # featureless glass
    assert slide.tissue_mask(np.full((20, 20, 3), 150, np.uint8)).all()  # all tissue


# ---------------------------------------------------------------------------- real patches


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    """resnet18 trained from scratch on 2,000 real patches (centre crop 32, 3 epochs)."""
    if not config.SHARED_PCAM_SUBSET.is_dir():
        pytest.skip(f"shared real PCam subset not found at {config.SHARED_PCAM_SUBSET}")
    root = tmp_path_factory.mktemp("real")
    for split, per_class in (("train", 1000), ("valid", 128)):
        for label in "01":
            source = config.SHARED_PCAM_SUBSET / split / label
            folder = root / "src" / split / label
            folder.mkdir(parents=True)
            for name in sorted(os.listdir(source))[:per_class]:
                os.symlink(source / name, folder / name)
    import_image_folders(root / "src", root / "pcam", progress=False)
    profile = make_profile(root / "pcam", epochs=3, bs=64, centre_crop=32, patience=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = T.train(profile, "resnet18", runs_root=root / "runs", progress=False, device=CPU)
    deploy.export_model(run.run_dir, root / "model")
    return root / "model"


def _dense_tissue(path: Path) -> bool:
    return (np.asarray(Image.open(path)).mean(axis=2) < 200).mean() > 0.8


@needs_subset
def test_real_tumour_patches_light_up_on_a_slide(real_model, tmp_path):
    from sklearn.metrics import roc_auc_score

    candidates = [config.SHARED_PCAM_SUBSET / "test" / label / name
                  for label in "01"
                  for name in sorted(os.listdir(config.SHARED_PCAM_SUBSET / "test" / label))[:64]]
    labels = np.array([int(p.parent.name) for p in candidates])
    per_file = tmp_path / "per_file.csv"
    assert main(["predict", str(real_model), *map(str, candidates), "--out", str(per_file),
                 "--quiet", "--device", "cpu"]) == 0
    probs = pd.read_csv(per_file).set_index("path").prob_tumour
    p = probs[[str(c) for c in candidates]].to_numpy()
    assert roc_auc_score(labels, p) > 0.65, "the fixture's model did not learn; test void"
    tumour = [c for c, y, q in zip(candidates, labels, p, strict=True)
              if y == 1 and q >= 0.7 and _dense_tissue(c)][:4]
    normal = [c for c, y, q in zip(candidates, labels, p, strict=True)
              if y == 0 and q <= 0.3 and _dense_tissue(c)][:8]
    assert len(tumour) >= 3 and len(normal) >= 6, "too few confident, correct patches"
    chosen = tumour + normal
    rng = np.random.default_rng(0)
    cells = [(1, 1), (1, 10), (1, 20), (5, 5), (5, 15), (9, 25), (10, 2), (12, 12), (15, 7),
             (15, 20), (19, 3), (20, 24)]
    cells = [cells[i] for i in rng.permutation(len(cells))[:len(chosen)]]
    patches = np.stack([np.asarray(Image.open(c)) for c in chosen])
    # 2,600 x 2,200 px: larger than one read block, so tiles come from several regions.
    path = _write_tiff(tmp_path / "real.tif", _mosaic(_glass(2200, 2600), patches, cells))
    out = tmp_path / "slide"
    assert main(["slide", str(real_model), str(path), "--out", str(out), "--quiet",
                 "--device", "cpu", "--batch-size", "5"]) == 0
    tiles = _tiles(out)
    got = {(x, y): q for x, y, q in tiles.itertuples(index=False)}
    placed = {(col * TILE, row * TILE): c for (row, col), c in zip(cells, chosen, strict=True)}
    assert set(got) == set(placed)  # every patch is tissue, the glass is not
    for xy, file in placed.items():
        assert got[xy] == pytest.approx(probs[str(file)], abs=1e-5)  # other batch sizes
    high = {xy for xy, q in got.items() if q >= 0.5}
    assert high == {xy for xy, c in placed.items() if c in tumour}
    assert json.loads((out / "slide.json").read_text())["tiles_at_or_above_threshold"] \
        == len(tumour)


# ---------------------------------------------------------------------------------- errors


def test_bad_slides_name_the_file(classifier, synthetic_slide, tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"this is not a TIFF file" * 10)
    with pytest.raises(slide.SlideFormatError, match=r"garbage\.tif: not a readable TIFF file"
                                                     r".*OpenSlide cannot read it either"):
        slide.open_slide(garbage)
    truncated = tmp_path / "truncated.tif"
    data = synthetic_slide.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(slide.SlideFormatError,
                       match=r"truncated\.tif: truncated: level 0 needs [\d,]+ bytes, the file "
                             r"has [\d,]+"):
        slide.open_slide(truncated)
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, np.zeros((300, 300), np.uint8), tile=(256, 256))
    with pytest.raises(slide.SlideFormatError,
                       match=r"grey\.tif: level 0 is not an RGB slide image: expected .*8-bit "
                             r"RGB\(A\).*found 1 samples of uint8"):
        slide.open_slide(grey, "tifffile")
    striped = tmp_path / "striped.tif"
    tifffile.imwrite(striped, np.zeros((200, 300, 3), np.uint8), photometric="rgb",
                     rowsperstrip=200)
    monkeypatch.setattr(slide, "MAX_SEGMENT_BYTES", 1000)
    with pytest.raises(slide.SlideFormatError, match=r"striped\.tif: level 0 is stored in "
                                                     r"strips .*save it as a tiled TIFF"):
        slide.open_slide(striped, "tifffile")
    other = tmp_path / "scan.svs"
    other.write_bytes(b"\0" * 64)
    with pytest.raises(slide.SlideFormatError,
                       match=r"scan\.svs: not a slide format OpenSlide reads"):
        slide.open_slide(other)
    with pytest.raises(FileNotFoundError, match=r"missing\.tif: slide file not found"):
        slide.open_slide(tmp_path / "missing.tif")


def test_bad_options_and_outputs(classifier, random_model, synthetic_slide, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"level must be in 0\.\.0 \(levels 0: 1000x700\); "
                                         r"got 2"):
        slide.predict_slide(classifier, synthetic_slide, tmp_path / "o", level=2,
                            progress=False)
    with pytest.raises(ValueError, match="stride must be a positive number of pixels; got 0"):
        slide.predict_slide(classifier, synthetic_slide, tmp_path / "o", stride=0,
                            progress=False)
    small = _write_tiff(tmp_path / "small.tif", _glass(64, 300), tile=(32, 32))
    with pytest.raises(slide.SlideFormatError, match=r"small\.tif: level 0 is 300x64 px, "
                                                     r"smaller than one 96x96 tile"):
        slide.predict_slide(classifier, small, tmp_path / "o", progress=False)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["slide", str(random_model), str(synthetic_slide), "--out", str(out),
                 "--quiet", "--device", "cpu"]) == 1
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").is_file()
    assert main(["slide", str(random_model), str(synthetic_slide), "--out", str(out),
                 "--quiet", "--device", "cpu", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "heatmap.png", "probabilities.npy", "slide.json", "tiles.csv", "tissue_mask.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
