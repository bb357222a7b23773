"""Patch model to whole slide: tissue mask, tiled inference, heatmap.

PCam patches were cut from Camelyon16 slides at 10x (level 2 of the 40x scans), 96 px
each; :func:`predict_slide` goes back the other way. A slide is opened with

- ``tifffile`` for TIFF and OME-TIFF files (tiled or striped, any pyramid level) whose
  compression it decodes without extra codecs (none, deflate, LZMA, ...), reading only
  the TIFF tiles a region needs;
- OpenSlide (``openslide-python`` with the ``openslide-bin`` library) for every other
  format it reads (SVS, NDPI, MRXS, SCN, JPEG-compressed generic tiled TIFF, ...).

The tissue mask is Otsu's threshold on the grey levels of a thumbnail (tissue is darker
than the glass). Tiles of 96 px at the chosen level and stride whose footprint is tissue
enough are read a block of neighbouring tiles at a time (one region read per block, a
few megabytes whatever the slide's size) by a background thread, and predicted in
batches through the model's evaluation pipeline. Peak memory therefore does not grow
with the slide: only the thumbnail and the per-tile probability grid are kept.

Outputs, written into a temporary folder beside ``OUT_DIR`` and renamed at the end:

- ``tiles.csv``: ``x,y,prob_tumour``, level-0 pixel coordinates of each predicted tile's
  top-left corner, row-major (y, then x);
- ``probabilities.npy``: float32 grid (rows x columns of tiles), NaN where no tissue;
- ``heatmap.png``: the probabilities over the thumbnail; ``tissue_mask.png``: the mask;
- ``slide.json``: slide, level, stride, grid geometry, model, counts and timings.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pcamlib.deploy import (
    PatchClassifier,
    check_output_folder,
    load_model,
    move_into_place,
    prefetch,
    scratch_beside,
)
from pcamlib.errors import InputError, MissingInputError

TILE = 96
"""Side of one tile at the chosen level, pixels (a PCam patch)."""

TIFF_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".btf", ".tf2", ".tf8")
"""Suffixes tried with tifffile first (``.ome.tif`` included)."""

MAX_SEGMENT_BYTES = 64 * 2**20
"""Largest decoded TIFF tile or strip read (a single-strip image would need it whole)."""

REGION_SIDE = 2048
"""Target side, pixels, of the region read per block of tiles (bounds memory)."""

THUMBNAIL_SIDE = 2048
"""Default longer side of the thumbnail the tissue mask and heatmap are made on."""

MIN_CONTRAST = 16
"""Grey-level range below which a thumbnail is one class (Otsu would split noise)."""

BLANK_GREY = 220
"""Grey level above which a featureless thumbnail counts as empty glass."""

HEATMAP_COLORMAP = "inferno"
"""Matplotlib colormap of the heatmap (0 = black/purple, 1 = yellow)."""


class SlideFormatError(InputError):
    """A slide file cannot be read as an RGB whole-slide image."""


def _white(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), 255, dtype=np.uint8)


class SlideReader(ABC):
    """Region reading from one slide, in the coordinates of a pyramid level.

    Attributes:
        path: The slide file.
        backend: ``tifffile`` or ``openslide``.
        level_dimensions: (width, height) of every level, level 0 first.
    """

    backend = ""

    def __init__(self, path: Path, level_dimensions: list[tuple[int, int]]):
        self.path = path
        self.level_dimensions = level_dimensions

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    def level_scale(self, level: int) -> tuple[float, float]:
        """Level-0 pixels per pixel of ``level``, along x and y."""
        width0, height0 = self.level_dimensions[0]
        width, height = self.level_dimensions[level]
        return width0 / width, height0 / height

    def check_level(self, level: int) -> None:
        """Raise ValueError unless ``level`` is one of the slide's levels."""
        if not isinstance(level, int) or not 0 <= level < self.level_count:
            sizes = ", ".join(f"{i}: {w}x{h}" for i, (w, h) in enumerate(self.level_dimensions))
            raise InputError(
                f"{self.path}: level must be in 0..{self.level_count - 1} (levels {sizes}); "
                f"got {level!r}"
            )

    @abstractmethod
    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 pixels of a rectangle of ``level`` (white outside the image).

        Args:
            level: Pyramid level.
            x: Left edge, pixels of ``level``.
            y: Top edge, pixels of ``level``.
            width: Width, pixels.
            height: Height, pixels.

        Returns:
            height x width x 3 uint8 array.
        """

    @abstractmethod
    def thumbnail(self, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
        """A downsampled RGB image of the whole slide.

        Returns:
            The thumbnail and the level-0 pixels per thumbnail pixel along x and y.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _block_mean_thumbnail(reader: SlideReader, level: int, max_side: int) -> np.ndarray:
    """Area-average thumbnail of ``level``, built block by block (bounded memory)."""
    width, height = reader.level_dimensions[level]
    factor = max(1, math.ceil(max(width, height) / max_side))
    thumb_w, thumb_h = math.ceil(width / factor), math.ceil(height / factor)
    thumb = np.empty((thumb_h, thumb_w, 3), dtype=np.uint8)
    step = max(1, REGION_SIDE // factor)  # thumbnail pixels per block side
    for top in range(0, thumb_h, step):
        for left in range(0, thumb_w, step):
            rows, cols = min(step, thumb_h - top), min(step, thumb_w - left)
            region = reader.read_region(level, left * factor, top * factor,
                                        cols * factor, rows * factor)
            blocks = region.reshape(rows, factor, cols, factor, 3)
            thumb[top:top + rows, left:left + cols] = np.rint(
                blocks.mean(axis=(1, 3), dtype=np.float32))
    return thumb


class TiffSlide(SlideReader):
    """A TIFF or OME-TIFF slide read with tifffile, TIFF tile by TIFF tile.

    Series 0 is the image; its pyramid levels (SubIFDs or reduced-resolution pages) are
    the levels. Each level must be 8-bit RGB (or RGBA, alpha dropped), samples
    interleaved, in tiles or strips of at most :data:`MAX_SEGMENT_BYTES` decoded.
    """

    backend = "tifffile"

    def __init__(self, path: Path):
        import tifffile

        try:
            self._tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as err:
            raise SlideFormatError(f"{path}: not a readable TIFF file ({err})") from None
        try:
            if not self._tif.series:
                raise SlideFormatError(f"{path}: TIFF file holds no image")
            self._pages = [self._check_level(path, i, lvl)
                           for i, lvl in enumerate(self._tif.series[0].levels)]
            super().__init__(path, [(p.imagewidth, p.imagelength) for p in self._pages])
            self._lock = threading.RLock()
            self._check_data_in_file()
            self._probe_decode()
        except BaseException:
            self._tif.close()
            raise

    @staticmethod
    def _check_level(path: Path, index: int, level):
        page = level.keyframe
        found = (f"{page.samplesperpixel} samples of {page.dtype}, "
                 f"{'planar' if page.planarconfig == 2 else 'interleaved'}, "
                 f"series shape {level.shape} ({level.axes})")
        if (len(level.pages) != 1 or page.dtype != np.uint8
                or page.samplesperpixel not in (3, 4) or page.planarconfig != 1
                or page.imagedepth != 1):
            raise SlideFormatError(
                f"{path}: level {index} is not an RGB slide image: expected one page of "
                f"8-bit RGB(A) with interleaved samples; found {found}"
            )
        if page.is_tiled:
            segment = page.tilelength * page.tilewidth * page.samplesperpixel
        else:
            segment = min(page.rowsperstrip, page.imagelength) * page.imagewidth \
                * page.samplesperpixel
        if segment > MAX_SEGMENT_BYTES:
            raise SlideFormatError(
                f"{path}: level {index} is stored in strips of {segment / 2**20:.0f} MiB "
                f"decoded (expected tiles or strips of at most "
                f"{MAX_SEGMENT_BYTES / 2**20:.0f} MiB, so that memory stays bounded); "
                "save it as a tiled TIFF, e.g. tifffile.imwrite(..., tile=(256, 256))"
            )
        return page

    def _check_data_in_file(self) -> None:
        size = os.path.getsize(self.path)
        for index, page in enumerate(self._pages):
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)
                    if c]
            if ends and max(ends) > size:
                raise SlideFormatError(
                    f"{self.path}: truncated: level {index} needs {max(ends):,} bytes, the "
                    f"file has {size:,}"
                )

    def _probe_decode(self) -> None:
        page = self._pages[0]
        try:
            self._segment(page, 0)
        except SlideFormatError:
            raise
        except Exception as err:  # noqa: BLE001 - tifffile raises many kinds here
            raise SlideFormatError(
                f"{self.path}: tifffile cannot decode its {page.compression.name} compression "
                f"({type(err).__name__}: {err})"
            ) from None

    def _geometry(self, page) -> tuple[int, int, int]:
        if page.is_tiled:
            return page.tilelength, page.tilewidth, math.ceil(page.imagewidth / page.tilewidth)
        return min(page.rowsperstrip, page.imagelength), page.imagewidth, 1

    def _segment(self, page, index: int) -> np.ndarray | None:
        offsets, counts = page.dataoffsets, page.databytecounts
        if not counts[index]:
            return None  # a sparse (never written) tile: nothing there
        with self._lock:
            fh = self._tif.filehandle
            fh.seek(offsets[index])
            data = fh.read(counts[index])
        segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        return None if segment is None else segment[0]

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """See :meth:`SlideReader.read_region`."""
        page = self._pages[level]
        image_w, image_h = self.level_dimensions[level]
        out = _white(height, width)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, image_w), min(y + height, image_h)
        if x0 >= x1 or y0 >= y1:
            return out
        seg_h, seg_w, across = self._geometry(page)
        for row in range(y0 // seg_h, (y1 - 1) // seg_h + 1):
            for col in range(x0 // seg_w, (x1 - 1) // seg_w + 1):
                index = row * across + col
                try:
                    segment = self._segment(page, index)
                except Exception as err:  # noqa: BLE001 - named with the tile below
                    raise SlideFormatError(
                        f"{self.path}: level {level} segment {index} cannot be decoded "
                        f"(corrupt file?): {type(err).__name__}: {err}"
                    ) from None
                if segment is None:
                    continue
                top, left = row * seg_h, col * seg_w
                iy0, iy1 = max(y0, top), min(y1, top + segment.shape[0])
                ix0, ix1 = max(x0, left), min(x1, left + segment.shape[1])
                out[iy0 - y:iy1 - y, ix0 - x:ix1 - x] = \
                    segment[iy0 - top:iy1 - top, ix0 - left:ix1 - left, :3]
        return out

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
        """See :meth:`SlideReader.thumbnail`: from the coarsest level still large enough."""
        large = [i for i, dims in enumerate(self.level_dimensions) if max(dims) >= max_side]
        level = large[-1] if large else 0
        thumb = _block_mean_thumbnail(self, level, max_side)
        width0, height0 = self.level_dimensions[0]
        return thumb, (width0 / thumb.shape[1], height0 / thumb.shape[0])

    def close(self) -> None:
        """See :meth:`SlideReader.close`."""
        self._tif.close()


class OpenSlideSlide(SlideReader):
    """Any slide OpenSlide reads (SVS, NDPI, MRXS, SCN, generic tiled TIFF, ...)."""

    backend = "openslide"

    def __init__(self, path: Path):
        import openslide

        try:
            self._slide = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideFormatError(
                f"{path}: not a slide format OpenSlide reads (expected e.g. .svs, .ndpi, "
                ".mrxs, .scn, a tiled TIFF or an OME-TIFF)"
            ) from None
        except openslide.OpenSlideError as err:
            raise SlideFormatError(f"{path}: OpenSlide cannot read it: {err}") from None
        super().__init__(path, [tuple(d) for d in self._slide.level_dimensions])

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """See :meth:`SlideReader.read_region`."""
        scale_x, scale_y = self.level_scale(level)
        region = self._slide.read_region((round(x * scale_x), round(y * scale_y)), level,
                                         (width, height))
        rgba = np.asarray(region)
        alpha = rgba[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        # Transparent pixels lie outside the scanned area: glass, so white.
        rgb = rgba[..., :3].astype(np.float32) * (alpha / 255.0) + 255.0 * (1 - alpha / 255.0)
        return np.rint(rgb).astype(np.uint8)

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
        """See :meth:`SlideReader.thumbnail`: OpenSlide's own, from its best level."""
        thumb = np.asarray(self._slide.get_thumbnail((max_side, max_side)).convert("RGB"))
        width0, height0 = self.level_dimensions[0]
        return thumb, (width0 / thumb.shape[1], height0 / thumb.shape[0])

    def close(self) -> None:
        """See :meth:`SlideReader.close`."""
        self._slide.close()


BACKENDS: tuple[str, ...] = ("auto", "tifffile", "openslide")
"""Accepted values of ``backend``."""


def open_slide(path: str | os.PathLike, backend: str = "auto") -> SlideReader:
    """Open a slide: tifffile for TIFF files it can decode, OpenSlide otherwise.

    Args:
        path: The slide file.
        backend: ``auto`` (as above), or force ``tifffile`` or ``openslide``.

    Raises:
        FileNotFoundError: the file does not exist.
        SlideFormatError: neither reader can use it; the message says what was found.
    """
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: slide file not found")
    if backend == "tifffile":
        return TiffSlide(path)
    if backend == "openslide":
        return OpenSlideSlide(path)
    if path.name.lower().endswith(TIFF_SUFFIXES):
        try:
            return TiffSlide(path)
        except SlideFormatError as tiff_error:
            try:  # e.g. JPEG tiles, which tifffile needs imagecodecs for
                return OpenSlideSlide(path)
            except SlideFormatError as openslide_error:
                raise SlideFormatError(
                    f"{tiff_error}; OpenSlide cannot read it either ({openslide_error})"
                ) from None
    return OpenSlideSlide(path)


# ------------------------------------------------------------------------ tissue mask


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: ``values <= t`` and ``> t`` are the two classes."""
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256)
    hist = hist.astype(np.float64)
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    levels = np.arange(256, dtype=np.float64)
    cum_mean = np.cumsum(hist * levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean0 = cum_mean / weight0
        mean1 = (cum_mean[-1] - cum_mean) / weight1
        between = weight0 * weight1 * (mean0 - mean1) ** 2
    between[~np.isfinite(between)] = -1
    return int(np.argmax(between))


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: grey levels at or below Otsu's threshold.

    A featureless thumbnail (grey range below :data:`MIN_CONTRAST`) is all tissue when
    darker than :data:`BLANK_GREY`, else all glass.
    """
    grey = np.rint(thumbnail.astype(np.float32).mean(axis=2)).astype(np.uint8)
    if int(grey.max()) - int(grey.min()) < MIN_CONTRAST:
        return grey < BLANK_GREY
    return grey <= otsu_threshold(grey)


def _box_means(mask: np.ndarray, top: np.ndarray, bottom: np.ndarray, left: np.ndarray,
               right: np.ndarray) -> np.ndarray:
    """Mean of ``mask`` over boxes [top, bottom) x [left, right) (grids of boxes)."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    t, b = top[:, None], bottom[:, None]
    sums = integral[b, right] - integral[t, right] - integral[b, left] + integral[t, left]
    return sums / ((b - t) * (right - left))


# --------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class TileGrid:
    """Tile positions at one level.

    Attributes:
        level: Pyramid level.
        stride: Step between tiles, pixels of ``level``.
        xs: Left edges of the columns, pixels of ``level``.
        ys: Top edges of the rows, pixels of ``level``.
        scale: Level-0 pixels per pixel of ``level`` (x, y).
    """

    level: int
    stride: int
    xs: np.ndarray
    ys: np.ndarray
    scale: tuple[float, float]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns)."""
        return len(self.ys), len(self.xs)

    def level0(self, row: int, col: int) -> tuple[int, int]:
        """Level-0 (x, y) of tile (row, col)'s top-left corner."""
        return round(self.xs[col] * self.scale[0]), round(self.ys[row] * self.scale[1])


def tile_grid(reader: SlideReader, level: int, stride: int) -> TileGrid:
    """Every 96 px tile of ``level`` at ``stride``, from the top-left corner.

    Raises:
        ValueError: a bad level or stride, or a level smaller than one tile.
    """
    reader.check_level(level)
    if not isinstance(stride, int) or isinstance(stride, bool) or stride <= 0:
        raise InputError(f"stride must be a positive number of pixels; got {stride!r}")
    width, height = reader.level_dimensions[level]
    if width < TILE or height < TILE:
        raise SlideFormatError(
            f"{reader.path}: level {level} is {width}x{height} px, smaller than one "
            f"{TILE}x{TILE} tile; choose a lower level"
        )
    xs = np.arange(0, width - TILE + 1, stride)
    ys = np.arange(0, height - TILE + 1, stride)
    return TileGrid(level, stride, xs, ys, reader.level_scale(level))


def tissue_fractions(grid: TileGrid, mask: np.ndarray,
                     mask_scale: tuple[float, float]) -> np.ndarray:
    """Fraction of each tile's footprint that the mask calls tissue (rows x columns).

    Args:
        grid: The tiles.
        mask: Tissue mask of the thumbnail.
        mask_scale: Level-0 pixels per mask pixel (x, y).
    """
    def edges(starts, scale_level, scale_mask, size):
        begin = np.floor(starts * scale_level / scale_mask).astype(np.int64)
        end = np.ceil((starts + TILE) * scale_level / scale_mask).astype(np.int64)
        begin = np.clip(begin, 0, size - 1)
        return begin, np.clip(np.maximum(end, begin + 1), 1, size)

    left, right = edges(grid.xs, grid.scale[0], mask_scale[0], mask.shape[1])
    top, bottom = edges(grid.ys, grid.scale[1], mask_scale[1], mask.shape[0])
    return _box_means(mask, top, bottom, left, right)


def _tile_batches(reader: SlideReader, grid: TileGrid, keep: np.ndarray,
                  batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tile indices, uint8 tiles) batches of the kept tiles, one region read per block."""
    block = max(1, (REGION_SIDE - TILE) // grid.stride + 1)  # tiles per block side
    rows, cols = grid.shape
    indices = np.empty((batch_size, 2), dtype=np.int64)
    tiles = np.empty((batch_size, TILE, TILE, 3), dtype=np.uint8)
    filled = 0
    for row0 in range(0, rows, block):
        for col0 in range(0, cols, block):
            wanted = keep[row0:row0 + block, col0:col0 + block]
            if not wanted.any():
                continue
            span_h = (wanted.shape[0] - 1) * grid.stride + TILE
            span_w = (wanted.shape[1] - 1) * grid.stride + TILE
            region = reader.read_region(grid.level, int(grid.xs[col0]), int(grid.ys[row0]),
                                        span_w, span_h)
            for r, c in np.argwhere(wanted):
                top, left = r * grid.stride, c * grid.stride
                tiles[filled] = region[top:top + TILE, left:left + TILE]
                indices[filled] = (row0 + r, col0 + c)
                filled += 1
                if filled == batch_size:
                    yield indices.copy(), tiles
                    tiles = np.empty_like(tiles)
                    filled = 0
    if filled:
        yield indices[:filled].copy(), tiles[:filled]


def _heatmap(thumbnail: np.ndarray, probs: np.ndarray, grid: TileGrid,
             thumb_scale: tuple[float, float]):
    """The probability grid as a translucent colour layer over the thumbnail (PIL image)."""
    import matplotlib
    from PIL import Image

    colours = matplotlib.colormaps[HEATMAP_COLORMAP](np.nan_to_num(probs, nan=0.0), bytes=True)
    colours[..., 3] = np.where(np.isnan(probs), 0, 160)
    # Each grid cell stands for the stride x stride square around its tile's centre.
    cell_w = grid.stride * grid.scale[0] / thumb_scale[0]
    cell_h = grid.stride * grid.scale[1] / thumb_scale[1]
    offset = (TILE - grid.stride) / 2
    left = round(offset * grid.scale[0] / thumb_scale[0])
    top = round(offset * grid.scale[1] / thumb_scale[1])
    size = (max(1, round(probs.shape[1] * cell_w)), max(1, round(probs.shape[0] * cell_h)))
    layer = Image.fromarray(colours, "RGBA").resize(size, Image.Resampling.NEAREST)
    overlay = Image.new("RGBA", (thumbnail.shape[1], thumbnail.shape[0]), (0, 0, 0, 0))
    overlay.paste(layer, (left, top))
    base = Image.fromarray(thumbnail, "RGB").convert("RGBA")
    return Image.alpha_composite(base, overlay).convert("RGB")


@dataclass
class SlideResult:
    """Outcome of :func:`predict_slide`.

    Attributes:
        out_dir: The folder written.
        backend: Reader used (tifffile or openslide).
        level: Pyramid level of the tiles.
        stride: Step between tiles, pixels of ``level``.
        grid_shape: (rows, columns) of the tile grid.
        tiles: Tiles predicted (those with enough tissue).
        positives: Predicted tiles at or above the model's threshold.
        seconds: Wall time of the whole run.
        tiles_per_s: Tiles predicted per second of the inference pass.
    """

    out_dir: Path
    backend: str
    level: int
    stride: int
    grid_shape: tuple[int, int]
    tiles: int
    positives: int
    seconds: float
    tiles_per_s: float

    def summary(self) -> str:
        """Human-readable report."""
        rows, cols = self.grid_shape
        return (f"slide: {self.tiles:,} of {rows * cols:,} tiles had tissue ({rows} x {cols} "
                f"grid, level {self.level}, stride {self.stride}, {self.backend}); "
                f"{self.positives:,} at or above threshold; {self.tiles_per_s:,.1f} tiles/s; "
                f"{self.seconds:.1f} s -> {self.out_dir}")


def predict_slide(
    model: PatchClassifier | str | os.PathLike,
    slide: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    level: int = 0,
    stride: int = TILE,
    tta: bool = False,
    min_tissue: float = 0.5,
    batch_size: int = 128,
    thumbnail_side: int = THUMBNAIL_SIDE,
    overwrite: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> SlideResult:
    """Predict every tissue tile of a slide and write tiles, grid and heatmap.

    Args:
        model: A loaded classifier or a model folder (``pcamlib export``).
        slide: The slide file.
        out_dir: Folder to write (built beside it, renamed at the end).
        level: Pyramid level the 96 px tiles are cut from (PCam: 10x, i.e. level 2 of a
            40x Camelyon16 scan).
        stride: Step between tiles, pixels of ``level`` (96: adjacent tiles).
        tta: Average over the 8 dihedral views of each tile.
        min_tissue: Smallest tissue fraction of a tile's footprint (on the thumbnail's
            Otsu mask) for it to be predicted; 0 predicts every tile.
        batch_size: Tiles per forward pass.
        thumbnail_side: Longer side of the thumbnail, pixels.
        overwrite: Replace an existing non-empty ``out_dir``.
        progress: Show a progress bar.
        device: Device when ``model`` is a folder (default: GPU when present).
        backend: Slide reader (see :func:`open_slide`).

    Returns:
        Counts and timings.

    Raises:
        FileNotFoundError: the slide or the model folder does not exist.
        SlideFormatError: the slide cannot be read (see :func:`open_slide`).
        ValueError: a bad level, stride, fraction or size.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
    """
    from PIL import Image
    from tqdm import tqdm

    t0 = time.perf_counter()
    if not 0 <= min_tissue <= 1:
        raise InputError(f"min_tissue must be in [0, 1]; got {min_tissue}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}")
    if not isinstance(thumbnail_side, int) or thumbnail_side < 16:
        raise InputError(f"thumbnail_side must be an integer >= 16; got {thumbnail_side!r}")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite, "the slide results")
    classifier = model if isinstance(model, PatchClassifier) else load_model(model, device=device)
    with open_slide(slide, backend) as reader:
        grid = tile_grid(reader, level, stride)
        thumb, thumb_scale = reader.thumbnail(thumbnail_side)
        mask = tissue_mask(thumb)
        keep = tissue_fractions(grid, mask, thumb_scale) >= min_tissue
        probs = np.full(grid.shape, np.nan, dtype=np.float32)
        n_keep = int(keep.sum())
        t_infer = time.perf_counter()
        with tqdm(total=n_keep, desc="slide", unit="tile", disable=not progress) as bar:
            for where, tiles in prefetch(_tile_batches(reader, grid, keep, batch_size)):
                probs[where[:, 0], where[:, 1]] = classifier.predict(tiles, tta=tta)
                bar.update(len(tiles))
        infer_seconds = time.perf_counter() - t_infer
        backend, dims = reader.backend, reader.level_dimensions
    positives = int(np.nansum(probs >= classifier.threshold))
    scratch = scratch_beside(out_dir)
    try:
        with (scratch / "tiles.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(("x", "y", "prob_tumour"))
            for row, col in np.argwhere(~np.isnan(probs)):
                x, y = grid.level0(row, col)
                writer.writerow((x, y, repr(float(probs[row, col]))))
        np.save(scratch / "probabilities.npy", probs)
        _heatmap(thumb, probs, grid, thumb_scale).save(scratch / "heatmap.png")
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(scratch / "tissue_mask.png")
        seconds = time.perf_counter() - t0
        description = {
            "slide": str(Path(slide).resolve()),
            "backend": backend,
            "level_dimensions": [list(d) for d in dims],
            "level": level,
            "level_scale": list(grid.scale),
            "tile_size": TILE,
            "stride": stride,
            "grid": {"rows": grid.shape[0], "columns": grid.shape[1],
                     "origin_level0": [0, 0],
                     "step_level0": [grid.stride * grid.scale[0], grid.stride * grid.scale[1]],
                     "tile_level0": [TILE * grid.scale[0], TILE * grid.scale[1]]},
            "tissue": {"method": "Otsu on thumbnail grey levels", "min_tissue": min_tissue,
                       "thumbnail_size": [thumb.shape[1], thumb.shape[0]],
                       "thumbnail_scale_level0": list(thumb_scale)},
            "tta": tta,
            "model": {"architecture": classifier.spec.architecture,
                      "threshold": classifier.threshold,
                      "source_run": classifier.spec.raw.get("source_run"),
                      "folder": None if classifier.model_dir is None
                      else str(Path(classifier.model_dir).resolve())},
            "tiles_predicted": n_keep,
            "tiles_at_or_above_threshold": positives,
            "heatmap_colormap": HEATMAP_COLORMAP,
            "seconds": round(seconds, 3),
            "tiles_per_s": round(n_keep / infer_seconds, 2) if infer_seconds > 0 else None,
        }
        (scratch / "slide.json").write_text(json.dumps(description, indent=1))
        move_into_place(scratch, out_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return SlideResult(out_dir, backend, level, stride, grid.shape, n_keep, positives,
                       time.perf_counter() - t0,
                       n_keep / infer_seconds if infer_seconds > 0 else float("nan"))

