"""The embedded default dataset: small, generated, H&E-like patches in PCam format.

The generator draws patches that look like lymph-node H&E at PCam's scale and follow
PCam's label rule exactly: a patch is positive iff tumour tissue touches the centre
32x32 box (:data:`~pcamlib.pcam.CENTRE_BOX`); tumour elsewhere does not count.

* Background: pink eosin stroma with wavy collagen fibres, white gaps (fat, lumen),
  scattered or densely packed small dark lymphocytes, a few spindle-shaped
  fibroblast nuclei and, in some patches, single large pale histiocyte nuclei that
  mimic tumour cells (whatever the label).
* Tumour: irregular regions of purple-ish cytoplasm crowded with large, pale,
  vesicular nuclei (radius 6-9.5 px) with irregular outlines, a dark membrane,
  chromatin grain and often a nucleolus.
* Each patch has a tumour mask (tumour regions and their nuclei); the label is
  ``mask[32:64, 32:64].any()``. About 40% of negatives carry tumour only in the outer
  ring, kept clear of the centre box by construction.
* Colour comes from a Beer-Lambert mix of haematoxylin and eosin; two stain styles
  (``light``: pinker and lighter, ``dark``: darker and bluer) are assigned per fake
  slide, with a small per-slide jitter.

Nuclei are drawn from fixed banks of pre-rendered shapes and composited with
``np.maximum.at``; everything is vectorised numpy (about 3,000 patches per CPU second)
and deterministic by seed. :func:`write_sample` writes
the three splits with :class:`~pcamlib.pcam.PCamWriter` (plus a meta CSV with
:data:`~pcamlib.pcam.META_COLUMNS`), chunk by chunk, so any size fits in memory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from pcamlib.errors import InputError
from pcamlib.pcam import (
    CENTRE_BOX,
    EXPECTED_LENGTHS,
    IMAGE_SHAPE,
    META_COLUMNS,
    SPLITS,
    PCamWriter,
    SplitInfo,
    file_name,
    validate_split,
)

GENERATOR_VERSION = 1
"""Bumped whenever the generated content changes; part of the ``sample.json`` stamp."""

DEFAULT_SIZES: dict[str, int] = {"train": 2048, "valid": 512, "test": 512}
"""Rows per split of the default embedded dataset."""

STAIN_STYLES: tuple[str, ...] = ("light", "dark")
"""Stain styles: ``light`` (pinker, lighter) and ``dark`` (darker, bluer)."""

ROWS_PER_WSI = 128
"""Rows per fake whole-slide image (each split has at least two slides)."""

RING_NEGATIVE_FRACTION = 0.4
"""Share of negatives that carry tumour outside the centre box."""

STAMP_NAME = "sample.json"
"""File written beside a finished sample, recording how it was made."""

FAST_POOL_SIZE = 512
"""Distinct patches behind a ``fast=True`` sample."""

_BLOCK = 256  # rows drawn from one child seed: content does not depend on chunk_rows
_RENDER_ROWS = 32  # rows rendered at once: temporaries stay in cache
_SIZE = IMAGE_SHAPE[0]
_TOP, _LEFT, _BOTTOM, _RIGHT = CENTRE_BOX
_PAD = 16  # canvas margin for nuclei whose centre lies near an edge
_SIDE = _SIZE + 2 * _PAD
_REGION_WOBBLE = 0.3  # tumour region radius varies by up to this fraction
_RING_MARGIN = 4.0  # clearance between ring tumour and the centre box (soft edges)
_BANK_SEED = 20240607  # nucleus shapes and textures are fixed: part of GENERATOR_VERSION
_TILE = 256

# Macenko's reference H&E optical-density vectors (rows: H, E; columns: R, G, B),
# and a darker, bluer variant; then H and E strength and illumination.
_STAINS = {
    "light": (np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]]), 0.85, 0.80, 246.0),
    "dark": (np.array([[0.6600, 0.6900, 0.3000], [0.3000, 0.8300, 0.4700]]), 1.15, 1.00, 236.0),
}


class Patches(NamedTuple):
    """Generated patches.

    Attributes:
        images: N x 96 x 96 x 3 uint8 RGB.
        labels: N int64 labels, ``masks[:, 32:64, 32:64].any()``.
        masks: N x 96 x 96 bool tumour masks.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


# ----------------------------------------------------------------------------- helpers


@lru_cache(maxsize=8)
def _noise_basis(cells: int) -> np.ndarray:
    """Weights (96 x cells) that turn a cells x cells grid of N(0, 1) into a smooth field."""
    spacing = _SIZE / (cells - 3)
    pos = (np.arange(cells) - 1.0) * spacing
    w = np.exp(-0.5 * ((np.arange(_SIZE)[:, None] + 0.5 - pos[None, :]) / spacing) ** 2)
    w /= np.sqrt((w**2).sum(1, keepdims=True))  # unit variance at every pixel
    return w.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """N x 96 x 96 float32 smooth noise with unit variance; ``cells`` sets the scale."""
    w = _noise_basis(cells)
    z = rng.standard_normal((n, cells, cells), dtype=np.float32)
    return np.matmul(np.matmul(w, z), w.T)


def _blur(x: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 blur along the last two axes, edges replicated."""
    p = np.concatenate([x[..., :1, :], x, x[..., -1:, :]], axis=-2)
    x = 0.25 * (p[..., :-2, :] + p[..., 2:, :]) + 0.5 * x
    p = np.concatenate([x[..., :1], x, x[..., -1:]], axis=-1)
    return 0.25 * (p[..., :-2] + p[..., 2:]) + 0.5 * x


def _box_distance(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Euclidean distance from points to the nearest pixel centre of the centre box."""
    dy = np.maximum(np.maximum(_TOP - y, y - (_BOTTOM - 1)), 0)
    dx = np.maximum(np.maximum(_LEFT - x, x - (_RIGHT - 1)), 0)
    return np.hypot(dy, dx)


def _stain_vectors(rng: np.random.Generator, styles: np.ndarray) -> np.ndarray:
    """Per-row stain: N x 3 x 3 float32, rows H and E optical density and illumination."""
    n = styles.size
    out = np.empty((n, 3, 3), dtype=np.float32)
    jitter = rng.normal(0.0, 0.035, (n, 2, 3))
    scale = rng.uniform(0.9, 1.1, (n, 2))
    light = rng.uniform(-6.0, 4.0, n)
    for code, name in enumerate(STAIN_STYLES):
        vec, h_scale, e_scale, illum = _STAINS[name]
        sel = styles == code
        v = np.abs(vec[None] + jitter[sel])
        v /= np.linalg.norm(v, axis=2, keepdims=True)
        out[sel, 0] = v[:, 0] * (h_scale * scale[sel, :1])
        out[sel, 1] = v[:, 1] * (e_scale * scale[sel, 1:])
        out[sel, 2] = (illum + light[sel])[:, None]
    return out


def _style_codes(stain_style: str | int | np.ndarray | None, n: int,
                 rng: np.random.Generator) -> np.ndarray:
    if stain_style is None:
        return rng.integers(0, len(STAIN_STYLES), n).astype(np.int8)
    if isinstance(stain_style, str):
        if stain_style not in STAIN_STYLES:
            raise InputError(f"stain_style must be one of {STAIN_STYLES}, got {stain_style!r}")
        return np.full(n, STAIN_STYLES.index(stain_style), dtype=np.int8)
    codes = np.broadcast_to(np.asarray(stain_style), (n,)).astype(np.int8)
    if codes.min(initial=0) < 0 or codes.max(initial=0) >= len(STAIN_STYLES):
        raise InputError(f"stain style codes must be in 0..{len(STAIN_STYLES) - 1}")
    return codes


def _nuclei(rng: np.random.Generator, m: int, semi: np.ndarray, angle: np.ndarray,
            wobble: float, h_in: np.ndarray, h_rim: np.ndarray, nucleolus: np.ndarray,
            reach: int) -> np.ndarray:
    """Draw M centred nuclei into (2 reach + 1)^2 haematoxylin stamps (float32).

    Args:
        rng: Random generator (outline harmonics).
        m: Number of nuclei.
        semi: M x 2 semi-axes (along ``angle``, across).
        angle: Orientation of the first semi-axis (radians).
        wobble: Bound on the outline harmonics (2nd order; 3rd order gets 0.7 of it).
        h_in: Haematoxylin inside the nucleus.
        h_rim: Extra haematoxylin along the membrane.
        nucleolus: Haematoxylin of a small nucleolus (0 for none).
        reach: Stamp half-size.
    """
    ar = np.arange(-reach, reach + 1, dtype=np.float64)
    dy, dx = ar[None, :, None], ar[None, None, :]
    ca, sa = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    a, b = semi[:, 0, None, None], semi[:, 1, None, None]
    u = (dx * ca + dy * sa) / a
    v = (dy * ca - dx * sa) / b
    q = np.sqrt(u * u + v * v) + 1e-9
    c, s = u / q, v / q
    w = rng.uniform(-wobble, wobble, (4, m, 1, 1)) * np.array([1, 1, 0.7, 0.7])[:, None, None, None]
    c2, s2 = c * c - s * s, 2 * c * s
    edge = 1 + w[0] * c2 + w[1] * s2 + w[2] * (c * c2 - s * s2) + w[3] * (s * c2 + c * s2)
    depth = (edge - q) * b  # pixels inside the outline (negative outside)
    alpha = np.clip(depth + 0.5, 0, 1)
    rim = np.clip(1 - np.abs(depth - 1.2) * 0.8, 0, 1)
    h = alpha * (h_in[:, None, None] + h_rim[:, None, None] * rim)
    r2 = (dy + 0.3 * a) ** 2 + (dx - 0.2 * a) ** 2
    h += nucleolus[:, None, None] * np.clip(1.8 - r2 * 0.5, 0, 1) * (alpha > 0.99)
    return _blur(h).astype(np.float32)


class _Bank(NamedTuple):
    """Nucleus stamps stored sparsely, as offsets in the padded canvas."""

    offset: np.ndarray  # linear offsets from the stamp centre in a _SIDE x _SIDE canvas
    value: np.ndarray  # haematoxylin
    start: np.ndarray  # first pixel of each stamp
    length: np.ndarray  # pixels of each stamp
    angle: np.ndarray  # orientation of each stamp
    reach: float  # furthest pixel from a stamp's centre


_BANK_KINDS = ("tumour", "lymph", "fibro", "histio")


@lru_cache(maxsize=4)
def _bank(kind: str) -> _Bank:
    """Pre-drawn nuclei of one of :data:`_BANK_KINDS`, fixed for a generator version."""
    rng = np.random.default_rng([_BANK_SEED, _BANK_KINDS.index(kind)])
    if kind == "tumour":
        m, reach = 1024, 14
        rad = rng.uniform(6.0, 9.5, m)
        semi = np.stack([np.minimum(rad * rng.uniform(1.0, 1.18, m), 9.5), rad], axis=1)
        angle = rng.uniform(0, np.pi, m)
        h = _nuclei(rng, m, semi, angle, 0.1, rng.uniform(0.45, 0.7, m),
                    rng.uniform(0.2, 0.4, m),
                    np.where(rng.random(m) < 0.65, rng.uniform(0.5, 0.9, m), 0.0), reach)
    elif kind == "lymph":
        m, reach = 512, 7
        rad = rng.uniform(2.9, 4.2, m)
        semi = np.stack([rad * rng.uniform(1.0, 1.12, m), rad], axis=1)
        angle = rng.uniform(0, np.pi, m)
        h = _nuclei(rng, m, semi, angle, 0.05, rng.uniform(0.9, 1.4, m),
                    rng.uniform(0.05, 0.25, m), np.zeros(m), reach)
    elif kind == "histio":
        # Histiocytes: large, pale, oval or bean-shaped nuclei that mimic tumour cells.
        m, reach = 256, 14
        rad = rng.uniform(4.5, 6.0, m)
        semi = np.stack([rad * rng.uniform(1.2, 1.5, m), rad], axis=1)
        angle = rng.uniform(0, np.pi, m)
        h = _nuclei(rng, m, semi, angle, 0.12, rng.uniform(0.35, 0.55, m),
                    rng.uniform(0.15, 0.3, m), np.zeros(m), reach)
    else:
        m, reach = 256, 8
        angle = (np.arange(m) % 32) * (np.pi / 32) + rng.uniform(-0.05, 0.05, m)
        semi = np.stack([rng.uniform(3.5, 5.0, m), rng.uniform(1.5, 2.0, m)], axis=1)
        h = _nuclei(rng, m, semi, angle, 0.04, rng.uniform(0.8, 1.1, m), np.zeros(m),
                    np.zeros(m), reach)
    h[h < 2e-3] = 0
    ar = np.arange(-reach, reach + 1)
    dy, dx = np.broadcast_arrays(ar[:, None], ar[None, :])
    keep = h.reshape(m, -1) > 0
    if keep.reshape(m, 2 * reach + 1, 2 * reach + 1)[:, [0, -1]].any() or keep.reshape(
            m, 2 * reach + 1, 2 * reach + 1)[:, :, [0, -1]].any():
        raise AssertionError(f"{kind} nuclei do not fit their stamps")
    length = keep.sum(1)
    offset = (dy * _SIDE + dx).reshape(-1)[np.nonzero(keep)[1]]
    far = np.hypot(dy, dx).reshape(-1)[np.nonzero(keep)[1]].max()
    start = np.r_[0, np.cumsum(length)[:-1]]
    return _Bank(offset.astype(np.int64), h.reshape(m, -1)[keep], start, length, angle % np.pi,
                 float(far))


def _scatter(canvas: np.ndarray, bank: _Bank, entries: np.ndarray, patch: np.ndarray,
             y: np.ndarray, x: np.ndarray) -> None:
    """Max-composite bank stamps ``entries`` centred at integer (y, x) of ``patch``."""
    if not entries.size:
        return
    centre = (patch * _SIDE + (y + _PAD)) * _SIDE + (x + _PAD)
    lens = bank.length[entries]
    first = np.cumsum(lens) - lens
    src = np.arange(int(lens.sum())) + np.repeat(bank.start[entries] - first, lens)
    dst = np.repeat(centre, lens) + bank.offset[src]
    np.maximum.at(canvas.reshape(-1), dst, bank.value[src])


@lru_cache(maxsize=1)
def _tiles() -> np.ndarray:
    """Fixed texture tiles (3 x 256 x 256 float32): chromatin, eosin grain, pixel noise."""
    rng = np.random.default_rng([_BANK_SEED, 99])
    t = _TILE
    clumps = _blur(rng.random((t // 2, t // 2)).repeat(2, 0).repeat(2, 1))
    grain = _blur(rng.random((t, t)))
    chromatin = 0.25 + 1.0 * clumps + 0.5 * grain
    e_grain = 0.92 + 0.16 * _blur(rng.random((t, t)))
    noise = rng.random((t, t)) - 0.5
    return np.stack([chromatin, e_grain, noise]).astype(np.float32)


def _crops(rng: np.random.Generator, tile: np.ndarray, n: int) -> np.ndarray:
    """N random 96 x 96 crops of a texture tile."""
    windows = np.lib.stride_tricks.sliding_window_view(tile, (_SIZE, _SIZE))
    oy, ox = rng.integers(0, _TILE - _SIZE + 1, (2, n))
    return windows[oy, ox]


def _jittered_grid(n: int, spacing: np.ndarray, origin: np.ndarray,
                   count: int) -> tuple[np.ndarray, np.ndarray]:
    """N x count^2 points of a square grid per patch (spacing and origin per patch)."""
    k = np.arange(count) - 1
    gy = origin[:, 0, None, None] + spacing[:, None, None] * k[None, :, None]
    gx = origin[:, 1, None, None] + spacing[:, None, None] * k[None, None, :]
    gy, gx = np.broadcast_arrays(gy, gx)
    return gy.reshape(n, -1), gx.reshape(n, -1)


def _lookup(field: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Values of N x 96 x 96 ``field`` at N x K integer points (clipped to the image)."""
    yi = np.clip(y, 0, _SIZE - 1)
    xi = np.clip(x, 0, _SIZE - 1)
    return field[np.arange(len(field))[:, None], yi, xi]


def _inside(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (y >= 0) & (y <= _SIZE - 1) & (x >= 0) & (x <= _SIZE - 1)


# ----------------------------------------------------------------------------- rendering


def _tumour_regions(rng: np.random.Generator, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed depth (px) inside tumour regions, N x 96 x 96, and the anchor of blob 0."""
    n = labels.size
    pos = labels == 1
    nb = 3
    cy = np.zeros((n, nb))
    cx = np.zeros((n, nb))
    r = np.zeros((n, nb))
    on = np.zeros((n, nb), dtype=bool)

    # Positives: blob 0 sits on the centre box (often a sheet filling most of the
    # patch); sometimes another blob anywhere.
    cy[:, 0], cx[:, 0] = rng.uniform(38, 58, (2, n))
    sheet = rng.random(n) < 0.2
    r[:, 0] = np.where(sheet, rng.uniform(34, 60, n), rng.uniform(10, 26, n))
    on[:, 0] = pos
    cy[:, 1], cx[:, 1] = rng.uniform(-10, 106, (2, n))
    r[:, 1] = rng.uniform(8, 22, n)
    on[:, 1] = pos & (rng.random(n) < 0.35)

    # Ring negatives: one or two blobs whose furthest reach (region wobble plus the
    # nuclei on its edge) stays _RING_MARGIN px clear of the centre box.
    ring = ~pos & (rng.random(n) < RING_NEGATIVE_FRACTION)
    slack = _bank("tumour").reach + _RING_MARGIN
    min_r = 7.0
    for b, share in ((0, 1.0), (2, 0.5)):
        want = ring & (rng.random(n) < share)
        cand_y, cand_x = rng.uniform(-8, 104, (2, n, 32))
        dist = _box_distance(cand_y, cand_x)
        ok = dist >= slack + min_r * (1 + _REGION_WOBBLE)
        first = np.argmax(ok, axis=1)
        pick_y = cand_y[np.arange(n), first]
        pick_x = cand_x[np.arange(n), first]
        found = ok[np.arange(n), first]
        pick_y = np.where(found, pick_y, -6.0)  # a corner is always clear
        pick_x = np.where(found, pick_x, -6.0)
        limit = (_box_distance(pick_y, pick_x) - slack) / (1 + _REGION_WOBBLE)
        radius = np.minimum(limit * rng.uniform(0.55, 1.0, n), 34.0)
        sel = want & (radius >= min_r * 0.9)
        cy[sel, b], cx[sel, b], r[sel, b] = pick_y[sel], pick_x[sel], radius[sel]
        on[sel, b] = True

    wobble = np.clip(_smooth_noise(rng, n, 7) * 0.8, -1, 1) * np.float32(_REGION_WOBBLE)
    depth = np.full((n, _SIZE, _SIZE), -1e3, dtype=np.float32)
    grid = np.arange(_SIZE, dtype=np.float32)
    for b in range(nb):
        idx = np.flatnonzero(on[:, b])
        if not idx.size:
            continue
        dy2 = (grid[None, :] - cy[idx, b, None].astype(np.float32)) ** 2
        dx2 = (grid[None, :] - cx[idx, b, None].astype(np.float32)) ** 2
        rho = np.sqrt(dy2[:, :, None] + dx2[:, None, :])
        d = r[idx, b, None, None].astype(np.float32) * (1 + wobble[idx]) - rho
        depth[idx] = np.maximum(depth[idx], d)
    return depth, np.stack([cy[:, 0], cx[:, 0]], axis=1)


def _render(rng: np.random.Generator, labels: np.ndarray,
            stain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draw patches for the intended ``labels``; returns uint8 images and tumour masks."""
    n = labels.size
    f32 = np.float32
    depth, anchor = _tumour_regions(rng, labels)
    region = depth > 0
    region_a = np.clip(depth * f32(0.5) + f32(0.5), 0, 1)

    # Stroma: eosin with wavy collagen fibres that fade in and out, and low-frequency
    # density changes.
    theta = rng.uniform(0, np.pi, n)
    period = rng.uniform(7.0, 13.0, n).astype(f32)[:, None, None]
    grid = np.arange(_SIZE, dtype=f32)
    sin_t = np.sin(theta).astype(f32)[:, None, None]
    cos_t = np.cos(theta).astype(f32)[:, None, None]
    phase = grid[None, :, None] * sin_t + grid[None, None, :] * cos_t
    phase = phase * (f32(2 * np.pi) / period) + _smooth_noise(rng, n, 6) * f32(5.0)
    fibre = np.sin(phase)
    fibre *= fibre
    fibre *= fibre  # thin bright bands
    low = _smooth_noise(rng, n, 5)
    strength = np.clip(f32(0.2) + f32(0.35) * _smooth_noise(rng, n, 5), 0, 1)
    e_level = rng.uniform(0.5, 0.85, n).astype(f32)[:, None, None]
    e = e_level * (1 - strength * (f32(0.4) - f32(0.5) * fibre)) * (f32(0.9) + f32(0.1) * low)
    h = f32(0.08) + f32(0.03) * low

    # White gaps (fat, lumen, tears), never inside tumour.
    gap_field = _smooth_noise(rng, n, 5)
    thresh = np.where(rng.random(n) < 0.55, rng.uniform(0.7, 1.6, n), 99.0).astype(f32)
    gap = np.clip((gap_field - thresh[:, None, None]) * f32(7.0), 0, 1) * (1 - region_a)
    keep = 1 - f32(0.94) * gap
    e *= keep
    h *= keep

    # Tumour cytoplasm: paler eosin, a purple tint.
    e += region_a * (f32(0.55) - e)
    h += region_a * (f32(0.2) - h)

    canvas = np.zeros((2, n, _SIDE, _SIDE), dtype=f32)  # tumour nuclei, other nuclei

    # Tumour nuclei on a jittered grid inside the regions; for positives a grid point
    # sits on blob 0's anchor, so the centre box always holds tumour nuclei.
    spacing = rng.uniform(11.5, 14.5, n)
    origin = np.where((labels == 1)[:, None], anchor % spacing[:, None],
                      rng.uniform(0, 1, (n, 2)) * spacing[:, None])
    ty, tx = _jittered_grid(n, spacing, origin, math.ceil(_SIZE / 11.5) + 2)
    ty = np.rint(ty + rng.uniform(-2.0, 2.0, ty.shape)).astype(np.int64)
    tx = np.rint(tx + rng.uniform(-2.0, 2.0, tx.shape)).astype(np.int64)
    tsel = _inside(ty, tx) & (_lookup(depth, ty, tx) > 1.0)
    patch, slot = np.nonzero(tsel)
    bank = _bank("tumour")
    entries = rng.integers(0, bank.length.size, patch.size)
    _scatter(canvas[0], bank, entries, patch, ty[patch, slot], tx[patch, slot])

    # Lymphocytes: small, round, dark; density from sparse to packed sheets.
    mode = rng.random(n)
    base = np.where(mode < 0.45, rng.uniform(0.04, 0.2, n),
                    np.where(mode < 0.8, rng.uniform(0.25, 0.5, n), rng.uniform(0.6, 0.95, n)))
    density = base.astype(f32)[:, None, None] + f32(0.35) * _smooth_noise(rng, n, 5)
    ly, lx = _jittered_grid(n, np.full(n, 8.0), rng.uniform(0, 8, (n, 2)), 14)
    ly = np.rint(ly + rng.uniform(-2.4, 2.4, ly.shape)).astype(np.int64)
    lx = np.rint(lx + rng.uniform(-2.4, 2.4, lx.shape)).astype(np.int64)
    lsel = (_inside(ly, lx) & (rng.random(ly.shape) < _lookup(density, ly, lx))
            & (_lookup(depth, ly, lx) < -3.0) & (_lookup(gap, ly, lx) < 0.3))
    patch, slot = np.nonzero(lsel)
    bank = _bank("lymph")
    entries = rng.integers(0, bank.length.size, patch.size)
    _scatter(canvas[1], bank, entries, patch, ly[patch, slot], lx[patch, slot])

    # Histiocytes in a third of the patches, whatever the label: single large pale
    # nuclei that a model must tell from crowded tumour.
    k = 4
    hy, hx = rng.integers(8, _SIZE - 8, (2, n, k))
    hsel = ((rng.random((n, 1)) < 0.35) & (rng.random((n, k)) < 0.6)
            & (_lookup(depth, hy, hx) < -8.0) & (_lookup(gap, hy, hx) < 0.2))
    patch, slot = np.nonzero(hsel)
    bank = _bank("histio")
    entries = rng.integers(0, bank.length.size, patch.size)
    _scatter(canvas[1], bank, entries, patch, hy[patch, slot], hx[patch, slot])

    # Fibroblasts: a few spindles along the fibres.
    k = 6
    fy, fx = rng.integers(0, _SIZE, (2, n, k))
    fsel = ((rng.random((n, k)) < rng.uniform(0, 1, n)[:, None])
            & (_lookup(depth, fy, fx) < -4.0) & (_lookup(gap, fy, fx) < 0.2))
    patch, slot = np.nonzero(fsel)
    bank = _bank("fibro")
    along = (np.pi / 2 - theta[patch] + rng.normal(0, 0.12, patch.size)) % np.pi
    bins = np.rint(along / (np.pi / 32)).astype(np.int64) % 32
    entries = bins + 32 * rng.integers(0, bank.length.size // 32, patch.size)
    _scatter(canvas[1], bank, entries, patch, fy[patch, slot], fx[patch, slot])

    crop = canvas[:, :, _PAD:_PAD + _SIZE, _PAD:_PAD + _SIZE]
    masks = region | (crop[0] > 0)
    nuc_h = np.maximum(crop[0], crop[1])

    # Chromatin texture in every nucleus; nuclei replace the cytoplasm they sit on.
    tiles = _tiles()
    nuc_h *= _crops(rng, tiles[0], n)
    nuc_a = np.minimum(nuc_h * f32(3.0), f32(1.0))
    h = h * (1 - nuc_a) + nuc_h
    e *= 1 - f32(0.45) * nuc_a
    e *= _crops(rng, tiles[1], n)

    noise = _crops(rng, tiles[2], n) * f32(0.06)
    rgb = np.empty((n, _SIZE, _SIZE, 3), dtype=f32)
    for c in range(3):
        ch = rgb[..., c]
        np.multiply(h, stain[:, 0, c, None, None], out=ch)
        ch += e * stain[:, 1, c, None, None]
        ch += noise
    np.exp(-rgb, out=rgb)
    rgb *= stain[:, None, None, 2, :]
    images = np.clip(rgb, 0, 255).astype(np.uint8)
    return images, masks


def _labels_from_masks(masks: np.ndarray) -> np.ndarray:
    return masks[:, _TOP:_BOTTOM, _LEFT:_RIGHT].any(axis=(1, 2)).astype(np.int64)


def _draw(rng: np.random.Generator, labels: np.ndarray, styles: np.ndarray,
          stain: np.ndarray | None = None) -> Patches:
    """Render in blocks of _BLOCK rows from ``rng``; labels follow the masks exactly."""
    if stain is None:
        stain = _stain_vectors(rng, styles)
    images = np.empty((labels.size, *IMAGE_SHAPE), dtype=np.uint8)
    masks = np.empty((labels.size, _SIZE, _SIZE), dtype=bool)
    for start in range(0, labels.size, _RENDER_ROWS):
        sl = slice(start, start + _RENDER_ROWS)
        images[sl], masks[sl] = _render(rng, labels[sl], stain[sl])
    got = _labels_from_masks(masks)
    if not np.array_equal(got, labels):  # a generator bug, never data-dependent
        raise AssertionError(f"{int((got != labels).sum())} patches missed their intended label")
    return Patches(images, got, masks)


# ----------------------------------------------------------------------------- public API


def generate_patches(
    n: int,
    *,
    seed: int,
    stain_style: str | int | np.ndarray | None = None,
    positive_fraction: float = 0.5,
) -> Patches:
    """Generate ``n`` H&E-like patches with exact PCam labels.

    Args:
        n: Number of patches.
        seed: Random seed; the same seed and arguments give identical arrays.
        stain_style: ``"light"`` or ``"dark"`` for every patch, per-patch codes
            (indices into :data:`STAIN_STYLES`), or None for a random style per patch.
        positive_fraction: Share of positives (rounded to a whole number of patches);
            the order is shuffled.

    Returns:
        ``Patches(images, labels, masks)``: N x 96 x 96 x 3 uint8 images, N int64 labels
        and N x 96 x 96 bool tumour masks, with ``labels == masks[:, 32:64, 32:64].any()``.
    """
    if n < 0:
        raise InputError(f"n must be non-negative, got {n}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise InputError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    rng = np.random.default_rng(seed)
    n_pos = round(n * positive_fraction)
    labels = rng.permutation(np.r_[np.ones(n_pos, np.int64), np.zeros(n - n_pos, np.int64)])
    styles = _style_codes(stain_style, n, rng)
    return _draw(rng, labels, styles)


def resolve_sizes(sizes: Mapping[str, int] | None = None, *, full_size: bool = False
                  ) -> dict[str, int]:
    """Rows per split for :func:`write_sample`.

    Args:
        sizes: Rows for some or all splits; missing splits take :data:`DEFAULT_SIZES`.
        full_size: Use the official lengths (:data:`~pcamlib.pcam.EXPECTED_LENGTHS`).

    Returns:
        ``{split: rows}`` for every split, in :data:`~pcamlib.pcam.SPLITS` order.
    """
    if full_size:
        if sizes is not None:
            raise InputError("give either sizes or full_size=True, not both")
        return dict(EXPECTED_LENGTHS)
    sizes = dict(sizes or {})
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise InputError(f"unknown split(s) {sorted(unknown)}; expected some of {SPLITS}")
    out = {s: int(sizes.get(s, DEFAULT_SIZES[s])) for s in SPLITS}
    for split, rows in out.items():
        if rows < 2:
            raise InputError(f"{split}: need at least 2 rows (one per class), got {rows}")
    return out


class _SplitPlan(NamedTuple):
    labels: np.ndarray
    styles: np.ndarray
    stain: np.ndarray
    meta: pd.DataFrame


def _wsi_counts(sizes: Mapping[str, int]) -> dict[str, int]:
    return {s: max(2, math.ceil(sizes[s] / ROWS_PER_WSI)) for s in SPLITS}


def _plan_split(seed: int, split: str, sizes: Mapping[str, int]) -> _SplitPlan:
    """Labels, slides, stains and meta of a whole split (small: no pixels)."""
    index = SPLITS.index(split)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 0)))
    n = sizes[split]
    labels = rng.permutation(np.r_[np.ones(n // 2, np.int64), np.zeros(n - n // 2, np.int64)])
    counts = _wsi_counts(sizes)
    first = sum(counts[s] for s in SPLITS[:index])  # slide ids never repeat across splits
    n_wsi = counts[split]
    slide = rng.permutation(np.arange(n) % n_wsi)
    slide_style = ((first + np.arange(n_wsi)) % len(STAIN_STYLES)).astype(np.int8)
    slide_stain = _stain_vectors(rng, slide_style)
    origin = rng.integers(0, 1000, (n_wsi, 2)) * 96
    coords = origin[slide] + rng.integers(0, 400, (n, 2)) * 96
    meta = pd.DataFrame({
        "coord_y": coords[:, 0],
        "coord_x": coords[:, 1],
        "tumor_patch": np.zeros(n, dtype=bool),  # filled in from the masks
        "center_tumor_patch": labels.astype(bool),
        "wsi": np.char.add("sample_wsi_", np.char.zfill((first + slide).astype(str), 3)),
    })[list(META_COLUMNS)]
    return _SplitPlan(labels, slide_style[slide], slide_stain[slide], meta)


def _block_rng(seed: int, split: str, block: int) -> np.random.Generator:
    key = (SPLITS.index(split), 1, block)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


class _FastPool(NamedTuple):
    images: np.ndarray  # 8 P x 96 x 96 x 3: every dihedral transform of every pool patch
    by_label: tuple[np.ndarray, np.ndarray]  # pool rows of each class
    tumour: np.ndarray  # any tumour, per pool row (transforms keep it)


def _fast_pool(seed: int) -> _FastPool:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(len(SPLITS), 0)))
    labels = np.repeat(np.array([1, 0], dtype=np.int64), FAST_POOL_SIZE // 2)
    styles = np.arange(FAST_POOL_SIZE, dtype=np.int8) % len(STAIN_STYLES)
    pool = _draw(rng, labels, styles)
    # Rotations and flips map the centre box onto itself, so labels carry over.
    variants = [np.rot90(pool.images, k, axes=(1, 2)) for k in range(4)]
    variants += [v[:, :, ::-1] for v in variants]
    return _FastPool(np.concatenate(variants),
                     (np.flatnonzero(pool.labels == 0), np.flatnonzero(pool.labels == 1)),
                     pool.masks.any(axis=(1, 2)))


def _fast_rows(pool: _FastPool, labels: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Images for ``labels``: pool patches under random rotations and flips."""
    pick = np.empty(labels.size, dtype=np.int64)
    for c in (0, 1):
        sel = labels == c
        pick[sel] = pool.by_label[c][rng.integers(0, pool.by_label[c].size, int(sel.sum()))]
    transform = rng.integers(0, 8, labels.size)
    return pool.images[transform * FAST_POOL_SIZE + pick], pool.tumour[pick]


def _stamp(sizes: Mapping[str, int], seed: int, fast: bool) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "fast": bool(fast),
            "sizes": {s: int(sizes[s]) for s in SPLITS}}


def _file_sizes(dest: Path) -> dict[str, int]:
    out = {}
    for split in SPLITS:
        for kind in ("x", "y", "meta"):
            path = dest / file_name(split, kind)
            out[path.name] = path.stat().st_size if path.is_file() else -1
    return out


def sample_ready(
    dest: str | os.PathLike,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    *,
    fast: bool = False,
    full_size: bool = False,
) -> bool:
    """Whether ``dest`` holds a finished sample made with these parameters.

    Compares the ``sample.json`` stamp written by :func:`write_sample` (parameters,
    :data:`GENERATOR_VERSION`, file sizes) with the arguments and the files on disk;
    it does not read the data.

    Args:
        dest: Sample directory.
        sizes: As for :func:`write_sample`.
        seed: As for :func:`write_sample`.
        fast: As for :func:`write_sample`.
        full_size: As for :func:`write_sample`.

    Returns:
        True when regenerating would give the same files.
    """
    dest = Path(dest)
    try:
        stamp = json.loads((dest / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict):
        return False
    want = _stamp(resolve_sizes(sizes, full_size=full_size), seed, fast)
    return {k: stamp.get(k) for k in want} == want and stamp.get("files") == _file_sizes(dest)


def write_sample(
    dest: str | os.PathLike,
    *,
    sizes: Mapping[str, int] | None = None,
    full_size: bool = False,
    seed: int = 0,
    fast: bool = False,
    progress: bool = True,
    chunk_rows: int = 2048,
    force: bool = False,
) -> dict[str, SplitInfo]:
    """Write the generated sample (all three splits, with meta CSVs) in PCam format.

    Each split is balanced 50/50 (the odd row of an odd size is negative), drawn from
    its own fake slides (``sample_wsi_000``, ...; about :data:`ROWS_PER_WSI` rows each,
    never shared between splits) and written atomically, ``chunk_rows`` at a time.
    Content depends only on ``seed``, ``sizes`` and ``fast`` (not on ``chunk_rows``).
    A ``sample.json`` stamp is written last; when it already matches, nothing is
    regenerated unless ``force``.

    Args:
        dest: Destination directory (created if needed).
        sizes: Rows per split; missing splits take :data:`DEFAULT_SIZES`.
        full_size: Use the official PCam lengths instead of ``sizes``.
        seed: Random seed.
        fast: Fill rows from a pool of :data:`FAST_POOL_SIZE` patches under random
            flips and rotations (labels stay exact): for throughput benchmarks at full
            size, where content does not matter.
        progress: Show a progress bar (stderr).
        chunk_rows: Rows generated and written at a time (rounded to a multiple of 256).
        force: Regenerate even when ``dest`` already holds this sample.

    Returns:
        ``{split: SplitInfo}`` as validated after writing.
    """
    from tqdm import tqdm

    dest = Path(dest)
    sizes = resolve_sizes(sizes, full_size=full_size)
    if not force and sample_ready(dest, sizes, seed, fast=fast):
        return {s: validate_split(dest, s) for s in SPLITS}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / STAMP_NAME).unlink(missing_ok=True)
    blocks_per_chunk = max(1, chunk_rows // _BLOCK)
    pool = _fast_pool(seed) if fast else None
    infos: dict[str, SplitInfo] = {}
    with tqdm(total=sum(sizes.values()), unit="patch", disable=not progress,
              desc=f"sample -> {dest}") as bar:
        for split in SPLITS:
            n = sizes[split]
            plan = _plan_split(seed, split, sizes)
            writer = PCamWriter(dest, split, n, meta=True)
            try:
                n_blocks = math.ceil(n / _BLOCK)
                for first_block in range(0, n_blocks, blocks_per_chunk):
                    parts_x, parts_t = [], []
                    for block in range(first_block, min(first_block + blocks_per_chunk, n_blocks)):
                        sl = slice(block * _BLOCK, min((block + 1) * _BLOCK, n))
                        rng = _block_rng(seed, split, block)
                        if pool is not None:
                            x, tumour = _fast_rows(pool, plan.labels[sl], rng)
                        else:
                            x, _, masks = _draw(rng, plan.labels[sl], plan.styles[sl],
                                                plan.stain[sl])
                            tumour = masks.any(axis=(1, 2))
                        parts_x.append(x)
                        parts_t.append(tumour)
                    rows = slice(first_block * _BLOCK, first_block * _BLOCK
                                 + sum(len(p) for p in parts_x))
                    meta = plan.meta.iloc[rows].copy()
                    meta["tumor_patch"] = np.concatenate(parts_t)
                    writer.write(np.concatenate(parts_x), plan.labels[rows], meta)
                    bar.update(rows.stop - rows.start)
                infos[split] = writer.close()
            except BaseException:
                writer.abort()
                raise
    stamp = _stamp(sizes, seed, fast) | {"files": _file_sizes(dest)}
    tmp = dest / f".{STAMP_NAME}.partial"
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    tmp.replace(dest / STAMP_NAME)
    return infos
