"""Report figures and tables, built from plain data and returned as matplotlib Figures.

Every figure function takes numpy arrays or pandas DataFrames, builds a standalone
:class:`ReportFigure` in one consistent seaborn style and returns it. That is a
:class:`matplotlib.figure.Figure` not registered with pyplot, so nothing is shown twice or
kept alive behind the caller's back, which still displays as a PNG in notebooks. A
separate call, :func:`save_figure` or :func:`save_table`, writes it to disk atomically
under a validated file stem, leaving out metadata that would change between runs.

Nothing global is changed at import; styles are applied in a context while a figure is
built.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator
from numpy.typing import ArrayLike
from PIL import Image

from pcamlib.errors import InputError, require_columns
from pcamlib.pcam import CENTRE_BOX, CLASS_NAMES, IMAGE_SHAPE, SPLITS

__all__ = [
    "CLASS_COLORS",
    "PhotographicFigure",
    "ReportFigure",
    "CLASS_NAMES",
    "augmentation_grid_figure",
    "channel_stats_table",
    "confusion_matrix_figure",
    "intensity_distribution_figure",
    "loss_curves_figure",
    "lr_find_figure",
    "patch_grid_figure",
    "photographic_image",
    "roc_curve_figure",
    "save_figure",
    "save_table",
    "split_balance_figure",
    "OUTCOME_ORDER",
    "gradcam_figure",
    "operating_points_figure",
    "per_slide_figure",
    "reliability_figure",
    "top_errors_figure",
]


CLASS_COLORS: tuple[str, str] = ("#0173b2", "#d55e00")
"""Colours by label (seaborn ``colorblind`` blue and vermillion), used in every figure."""

CHANNEL_NAMES: tuple[str, str, str] = ("red", "green", "blue")
"""Channel names, in array order."""

CENTRE_COLOR = "#ffd60a"
"""Outline colour of the centre box (visible on pink and purple H&E)."""

_NATIVE_CELL = 1.28
"""Inches per patch so that a 96 px patch shows at about its own size at 80 dpi."""

JPEG_QUALITY = 85
"""JPEG quality of photographic figures shown in notebooks (patches stay legible)."""

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")

P = ParamSpec("P")


# --------------------------------------------------------------------------- style


@contextmanager
def _style() -> Iterator[None]:
    """Apply the figures' seaborn style and a few rc settings for the duration."""
    rc = {
        "figure.dpi": 80,
        "savefig.dpi": 80,
        "axes.titlesize": 11,
        "axes.titleweight": "bold",
        "axes.labelsize": 10,
        "legend.fontsize": 9,
        "legend.title_fontsize": 9,
        "xtick.labelsize": 9,
        "ytick.labelsize": 9,
        "figure.titlesize": 12,
        "figure.titleweight": "bold",
        "image.interpolation": "nearest",
        "svg.hashsalt": "pcamlib",
    }
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook"), mpl.rc_context(rc):
        yield


def _styled(func: Callable[P, Figure]) -> Callable[P, Figure]:
    """Build the figure inside :func:`_style` and lay it out there once.

    Laying out (``draw_without_rendering``) inside the context creates lazily built
    artists such as ticks with the style's settings, so the figure looks the same when
    it is later shown or saved outside the context.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Figure:
        with _style():
            fig = func(*args, **kwargs)
            fig.draw_without_rendering()
        return fig

    return wrapper


class ReportFigure(Figure):
    """A standalone :class:`~matplotlib.figure.Figure` that shows itself in notebooks.

    The figure functions build figures without pyplot, so nothing is displayed or kept
    alive behind the caller's back. A plain standalone Figure renders as text in Jupyter
    unless the inline backend happens to be active; this subclass renders as a PNG
    either way.
    """

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", metadata={"Software": None})
        return buf.getvalue()


class PhotographicFigure(ReportFigure):
    """A report figure made mostly of H&E patches, shown in notebooks as a JPEG only.

    Patches cost about ten times more as lossless PNG, and a notebook that embeds a
    dozen such figures grows to megabytes. ``_ipython_display_`` is used because the
    inline backend registers a PNG printer for every Figure, which would otherwise add
    a PNG beside the JPEG. The files :func:`save_figure` writes stay PNG and SVG.
    """

    def _repr_png_(self) -> None:
        return None

    def _repr_jpeg_(self) -> bytes:
        return _jpeg_bytes(self)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        data = base64.b64encode(_jpeg_bytes(self)).decode("ascii")
        display({"image/jpeg": data, "text/plain": repr(self)}, raw=True)


def _jpeg_bytes(fig: Figure, quality: int = JPEG_QUALITY) -> bytes:
    """The figure rendered as an RGB JPEG (opaque white background), same bytes each time."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None}, facecolor="white")
    buf.seek(0)
    with Image.open(buf) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="jpeg", quality=quality, optimize=True)
    return out.getvalue()


def photographic_image(fig: Figure | None = None, *, quality: int = JPEG_QUALITY) -> Any:
    """A figure of patches as a JPEG-only notebook image; the figure is then closed.

    For figures pcamlib does not build, such as fastai's ``show_batch`` or
    ``plot_top_losses`` (drawn with pyplot): returned as a cell's last value it shows
    as one JPEG, where the inline backend would embed a PNG about ten times larger.

    Args:
        fig: The figure; default pyplot's current figure.
        quality: JPEG quality, 1-95.

    Returns:
        An :class:`IPython.display.Image` holding the JPEG.

    Raises:
        InputError: If ``quality`` is out of range or there is no figure to show.
    """
    from IPython.display import Image as NotebookImage
    from matplotlib import pyplot as plt

    if not isinstance(quality, int) or not 1 <= quality <= 95:
        raise InputError(f"quality must be an integer from 1 to 95; got {quality!r}")
    if fig is None:
        if not plt.get_fignums():
            raise InputError("no figure to show: pyplot has no open figure and fig was not given")
        fig = plt.gcf()
    data = _jpeg_bytes(fig, quality)
    plt.close(fig)  # the inline backend would otherwise show it again, as PNG
    return NotebookImage(data=data, format="jpeg")


def _new_figure(figsize: tuple[float, float], *, photographic: bool = False) -> ReportFigure:
    """A standalone figure (not registered with pyplot) with constrained layout."""
    figure_class = PhotographicFigure if photographic else ReportFigure
    return figure_class(figsize=figsize, layout="constrained")


def _class_name(label: Any) -> str:
    """Display name of a label: ``"tumour (1)"`` for 0/1 labels, ``str(label)`` otherwise."""
    try:
        value = int(label)
    except (TypeError, ValueError):
        return str(label)
    if value in (0, 1) and value == label:
        return f"{CLASS_NAMES[value]} ({value})"
    return str(label)


def _class_color(label: Any, fallback: int = 0) -> str:
    """Colour of a 0/1 label, or a palette colour for anything else."""
    try:
        value = int(label)
        if value in (0, 1) and value == label:
            return CLASS_COLORS[value]
    except (TypeError, ValueError):
        pass
    return sns.color_palette("colorblind")[(fallback + 2) % 10]


# --------------------------------------------------------------------------- saving


def _check_name(name: str) -> str:
    """Return ``name`` if it is a simple file stem (letters, digits, ``_``, ``-``)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InputError(
            f"name must be a simple file stem of ASCII letters, digits, '_' and '-'; got {name!r}"
        )
    return name


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); a report is for others to read
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_figure(fig: Figure, out_dir: str | os.PathLike, name: str, *, dpi: int = 80) -> list[Path]:
    """Write a figure as ``out_dir/name.png`` and ``out_dir/name.svg``.

    Each file is written under a temporary name and renamed into place, so a reader never
    sees a partial file. Timestamps and software versions are left out of the metadata
    and SVG ids are salted with a fixed string, so rerunning with the same data gives the
    same bytes. An opaque PNG is stored as RGB without alpha, which is smaller.

    Photographic content dominates PNG size: at 80 dpi a 96 px patch shows at about its
    own size and costs about 20 KB losslessly, so a 6-patch grid is about 140 KB.

    Args:
        fig: The figure, as returned by one of the figure functions.
        out_dir: Destination folder; created if missing.
        name: File stem: ASCII letters, digits, ``_`` and ``-`` only.
        dpi: Resolution of the PNG.

    Returns:
        The paths written: ``[png, svg]``.

    Raises:
        ValueError: If ``name`` is not a simple file stem.
    """
    _check_name(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write_png(tmp: Path) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
        buf.seek(0)
        with Image.open(buf) as image:
            image.load()
            info_dpi = image.info.get("dpi")
            if image.mode == "RGBA" and image.getextrema()[3] == (255, 255):
                image = image.convert("RGB")  # opaque: the alpha channel only costs bytes
            image.save(tmp, format="png", optimize=True, **({"dpi": info_dpi} if info_dpi else {}))

    def write_svg(tmp: Path) -> None:
        with mpl.rc_context({"svg.hashsalt": "pcamlib"}):
            fig.savefig(tmp, format="svg", dpi=dpi, metadata={"Date": None})

    return [
        _atomic_write(out / f"{name}.png", write_png),
        _atomic_write(out / f"{name}.svg", write_svg),
    ]


def save_table(
    df: pd.DataFrame, out_dir: str | os.PathLike, name: str, *, floatfmt: str = ".4f"
) -> list[Path]:
    """Write a table as ``out_dir/name.csv`` (full precision) and ``out_dir/name.md``.

    Both files are written under temporary names and renamed into place.

    Args:
        df: The table; its index is not written.
        out_dir: Destination folder; created if missing.
        name: File stem: ASCII letters, digits, ``_`` and ``-`` only.
        floatfmt: Format of floats in the Markdown table (``tabulate`` syntax).

    Returns:
        The paths written: ``[csv, md]``.

    Raises:
        ValueError: If ``name`` is not a simple file stem.
    """
    _check_name(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = df.to_markdown(index=False, floatfmt=floatfmt) + "\n"

    def write_csv(tmp: Path) -> None:
        df.to_csv(tmp, index=False, lineterminator="\n")

    def write_md(tmp: Path) -> None:
        tmp.write_text(markdown, encoding="utf-8")

    return [
        _atomic_write(out / f"{name}.csv", write_csv),
        _atomic_write(out / f"{name}.md", write_md),
    ]


# --------------------------------------------------------------------------- patches


def _as_patches(images: ArrayLike, what: str = "images") -> np.ndarray:
    """Validate a stack of RGB patches (N x H x W x 3) and return it ready for ``imshow``."""
    arr = np.asarray(images)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InputError(f"{what} must have shape (N, H, W, 3); got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr, 0.0, 1.0)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _show_patch(ax: Axes, image: np.ndarray, show_centre: bool) -> None:
    """Draw one patch without axes decorations, with the centre box outlined if asked."""
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if show_centre:
        top, left, bottom, right = CENTRE_BOX
        sy = image.shape[0] / IMAGE_SHAPE[0]
        sx = image.shape[1] / IMAGE_SHAPE[1]
        ax.add_patch(
            Rectangle(
                (left * sx - 0.5, top * sy - 0.5),
                (right - left) * sx,
                (bottom - top) * sy,
                fill=False,
                edgecolor=CENTRE_COLOR,
                linewidth=1.5,
            )
        )


@_styled
def patch_grid_figure(
    images: ArrayLike,
    labels: ArrayLike | None,
    *,
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    show_centre: bool = True,
    suptitle: str | None = None,
) -> Figure:
    """A grid of patches, each titled with its class (the study's Figure 1).

    Args:
        images: ``N x H x W x 3`` patches (uint8, or floats in [0, 1]).
        labels: ``N`` labels; 0/1 are shown as ``"normal (0)"`` / ``"tumour (1)"`` in the
            class colour. May be None when ``titles`` is given.
        titles: ``N`` titles to use instead of the labels.
        ncols: Patches per row; default all in one row up to 6.
        show_centre: Outline the centre 32x32 region that decides the label.
        suptitle: Title of the whole figure.

    Returns:
        The figure, one axes per patch.

    Raises:
        ValueError: On inconsistent shapes or lengths.
    """
    patches = _as_patches(images)
    n = len(patches)
    if n == 0:
        raise InputError("images is empty")
    if labels is None and titles is None:
        raise InputError("give labels or titles")
    label_arr = None if labels is None else np.asarray(labels).reshape(-1)
    if label_arr is not None and len(label_arr) != n:
        raise InputError(f"{n} images but {len(label_arr)} labels")
    if titles is not None and len(titles) != n:
        raise InputError(f"{n} images but {len(titles)} titles")
    ncols = min(n, 6) if ncols is None else ncols
    if ncols < 1:
        raise InputError(f"ncols must be positive; got {ncols}")
    nrows = math.ceil(n / ncols)
    cell = min(_NATIVE_CELL, 10.0 / ncols)
    height = nrows * (cell + 0.3) + (0.35 if suptitle else 0.0)
    fig = _new_figure((cell * ncols, height), photographic=True)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i >= n:
            fig.delaxes(ax)
            continue
        _show_patch(ax, patches[i], show_centre)
        if titles is not None:
            ax.set_title(titles[i], fontsize=10)
        else:
            ax.set_title(_class_name(label_arr[i]), fontsize=10, color=_class_color(label_arr[i]))
    if suptitle:
        fig.suptitle(suptitle)
    return fig


@_styled
def augmentation_grid_figure(rows: Mapping[str, ArrayLike], *, show_centre: bool = True) -> Figure:
    """One row of patches per named augmentation, the name on the left.

    Args:
        rows: Augmentation name to ``n x H x W x 3`` patches, in display order (the first
            row is usually ``"original"``). Rows may hold different numbers of patches.
        show_centre: Outline the centre 32x32 region on every patch.

    Returns:
        The figure, one axes per patch.

    Raises:
        ValueError: If ``rows`` is empty or a row is not a stack of RGB patches.
    """
    if not rows:
        raise InputError("rows is empty")
    stacks = {name: _as_patches(imgs, f"row {name!r}") for name, imgs in rows.items()}
    ncols = max(len(s) for s in stacks.values())
    nrows = len(stacks)
    if ncols == 0:
        raise InputError("every row is empty")
    cell = min(_NATIVE_CELL, 8.5 / ncols)
    fig = _new_figure((cell * ncols + 1.5, cell * nrows + 0.1), photographic=True)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    for r, (name, stack) in enumerate(stacks.items()):
        for c in range(ncols):
            ax = grid[r, c]
            if c >= len(stack):
                fig.delaxes(ax)
                continue
            _show_patch(ax, stack[c], show_centre)
            if c == 0:
                ax.set_ylabel(
                    name, rotation=0, ha="right", va="center", fontsize=10, fontweight="bold"
                )
    return fig


# --------------------------------------------------------------------------- exploration


@_styled
def intensity_distribution_figure(
    images: ArrayLike,
    labels: ArrayLike,
    *,
    max_pixels: int = 50_000,
    bins: int = 64,
    seed: int = 0,
) -> Figure:
    """Per-channel pixel intensity distributions by class, one panel per channel.

    Pixels are drawn at random (seeded) from each class's patches, at most
    ``max_pixels`` per class, and their distribution is drawn as a density curve over
    the 0-255 range.

    Args:
        images: ``N x H x W x 3`` uint8 patches.
        labels: ``N`` labels (0 normal, 1 tumour).
        max_pixels: Pixels sampled per class.
        bins: Intensity bins of the density curves.
        seed: Seed of the pixel sample.

    Returns:
        The figure, with three axes (red, green, blue) of one curve per class.

    Raises:
        ValueError: On inconsistent shapes or lengths.
    """
    patches = _as_patches(images)
    if np.issubdtype(patches.dtype, np.floating):
        patches = np.round(patches * 255).astype(np.uint8)
    label_arr = np.asarray(labels).reshape(-1)
    if len(label_arr) != len(patches):
        raise InputError(f"{len(patches)} images but {len(label_arr)} labels")
    rng = np.random.default_rng(seed)
    edges = np.linspace(0, 256, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = _new_figure((10, 3.4))
    axes = fig.subplots(1, 3, sharey=True)
    for i, label in enumerate(np.unique(label_arr)):
        pixels = patches[label_arr == label].reshape(-1, 3)
        if len(pixels) > max_pixels:
            pixels = pixels[np.sort(rng.choice(len(pixels), max_pixels, replace=False))]
        n_images = int((label_arr == label).sum())
        color = _class_color(label, i)
        for ch, ax in enumerate(axes):
            density, _ = np.histogram(pixels[:, ch], bins=edges, density=True)
            ax.plot(
                centres,
                density,
                color=color,
                lw=1.8,
                label=f"{_class_name(label)}, {n_images} patches",
            )
            ax.fill_between(centres, density, color=color, alpha=0.15, lw=0)
    for ch, ax in enumerate(axes):
        ax.set_title(f"{CHANNEL_NAMES[ch]} channel")
        ax.set_xlim(0, 255)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("pixel intensity")
    axes[0].set_ylabel("density")
    axes[0].legend(loc="upper left")
    return fig


def channel_stats_table(stats_by_split: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per-channel statistics of several splits as one tidy table.

    Args:
        stats_by_split: Split name to ``{"mean": [r, g, b], "std": [r, g, b], "rows": n}``
            as returned by :func:`pcamlib.pcam.channel_stats`.

    Returns:
        Columns ``split``, ``channel`` (``red``, ``green``, ``blue``), ``mean``, ``std``;
        three rows per split, splits in the given order.

    Raises:
        ValueError: If a split's mean or std does not have three values.
    """
    records = []
    for split, stats in stats_by_split.items():
        mean = np.asarray(stats["mean"], dtype=float).reshape(-1)
        std = np.asarray(stats["std"], dtype=float).reshape(-1)
        if mean.shape != (3,) or std.shape != (3,):
            raise InputError(
                f"split {split!r}: mean and std need 3 values each; got {mean.size} and {std.size}"
            )
        for ch, channel in enumerate(CHANNEL_NAMES):
            records.append({"split": split, "channel": channel, "mean": mean[ch], "std": std[ch]})
    return pd.DataFrame(records, columns=["split", "channel", "mean", "std"])


@_styled
def split_balance_figure(counts: pd.DataFrame) -> Figure:
    """Bar chart of the class counts of each split, bars labelled with count and share.

    Args:
        counts: Columns ``split``, ``label``, ``count``; one row per split and label.
            Official split names are ordered train, valid, test; others follow in order
            of appearance.

    Returns:
        The figure, one axes.

    Raises:
        ValueError: If a column is missing.
    """
    missing = {"split", "label", "count"} - set(counts.columns)
    if missing:
        raise InputError(f"counts lacks columns: {', '.join(sorted(missing))}")
    table = counts.groupby(["split", "label"], sort=False)["count"].sum().unstack(fill_value=0)
    order = [s for s in SPLITS if s in table.index]
    order += [s for s in table.index if s not in order]
    table = table.loc[order, sorted(table.columns, key=str)]
    totals = table.sum(axis=1).replace(0, np.nan)
    fig = _new_figure((7, 4))
    ax = fig.subplots()
    x = np.arange(len(table))
    width = 0.8 / max(len(table.columns), 1)
    for j, label in enumerate(table.columns):
        values = table[label].to_numpy()
        offset = (j - (len(table.columns) - 1) / 2) * width
        bars = ax.bar(
            x + offset, values, width, label=_class_name(label), color=_class_color(label, j)
        )
        share = (values / totals.to_numpy() * 100).round(1)
        ax.bar_label(
            bars,
            labels=[
                f"{v:,}\n{s:.1f}%" if np.isfinite(s) else f"{v:,}"
                for v, s in zip(values, share, strict=True)
            ],
            padding=2,
            fontsize=8,
        )
    ax.set_xticks(x, [str(s) for s in table.index])
    ax.set_xlabel("split")
    ax.set_ylabel("patches")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.margins(y=0.18)
    ax.set_ylim(bottom=0)
    ax.grid(axis="x", visible=False)
    ax.set_title("Class balance per split")
    ax.legend(title="class")
    return fig


# --------------------------------------------------------------------------- training


@_styled
def lr_find_figure(
    lrs: ArrayLike,
    losses: ArrayLike,
    *,
    suggestions: Mapping[str, float] | None = None,
    chosen: float | None = None,
    title: str | None = None,
) -> Figure:
    """Loss against learning rate from a learning-rate range test, log x axis.

    Args:
        lrs: Learning rates tried, increasing.
        losses: Smoothed loss at each learning rate.
        suggestions: Name to suggested learning rate (e.g. fastai's ``valley``), each
            marked on the curve and listed in the legend as ``"valley: 1.2e-03"``.
        chosen: The learning rate used, drawn as a vertical line.
        title: Axes title; default ``"Learning-rate finder"``.

    Returns:
        The figure, one axes.

    Raises:
        ValueError: If ``lrs`` and ``losses`` differ in length or no learning rate is
            positive and finite.
    """
    lr = np.asarray(lrs, dtype=float).reshape(-1)
    loss = np.asarray(losses, dtype=float).reshape(-1)
    if lr.shape != loss.shape:
        raise InputError(f"{lr.size} learning rates but {loss.size} losses")
    ok = np.isfinite(lr) & np.isfinite(loss) & (lr > 0)
    if not ok.any():
        raise InputError("no finite (learning rate, loss) pair with a positive learning rate")
    lr, loss = lr[ok], loss[ok]
    fig = _new_figure((8, 4.5))
    ax = fig.subplots()
    ax.plot(lr, loss, color="0.25", lw=1.8, label="loss")
    ax.set_xscale("log")
    markers = "ovs^Dp"
    palette = sns.color_palette("colorblind")
    order = np.argsort(lr)
    for k, (name, value) in enumerate((suggestions or {}).items()):
        y = np.interp(np.log10(value), np.log10(lr[order]), loss[order])
        ax.plot(
            [value],
            [y],
            linestyle="none",
            marker=markers[k % len(markers)],
            markersize=9,
            markeredgecolor="white",
            color=palette[k % len(palette)],
            label=f"{name}: {value:.1e}",
            zorder=3,
        )
    if chosen is not None:
        ax.axvline(chosen, color="0.1", ls="--", lw=1.5, label=f"chosen: {chosen:.1e}")
    low, first, high = float(loss.min()), float(loss[0]), float(loss.max())
    if first > low:
        top = min(high, low + 2 * (first - low))
        pad = 0.05 * (top - low)
        ax.set_ylim(low - pad, top + pad)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss")
    ax.set_title(title or "Learning-rate finder")
    ax.legend(loc="upper left")
    return fig


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of True in a boolean array."""
    runs, start = [], None
    for i, flag in enumerate(mask):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            runs.append((start, i - 1))
            start = None
    if start is not None:
        runs.append((start, len(mask) - 1))
    return runs


@_styled
def loss_curves_figure(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Training and validation loss per epoch, one panel per model (the study's Figure 2).

    Epochs trained with a frozen backbone (``phase == "frozen"``) are shaded.

    Args:
        histories: Model name to its training history, with at least the columns
            ``epoch`` (0-based), ``train_loss`` and ``valid_loss``; ``phase`` is optional.

    Returns:
        The figure, one axes per model, sharing the y axis.

    Raises:
        ValueError: If ``histories`` is empty or a history lacks a column.
    """
    if not histories:
        raise InputError("histories is empty")
    for name, hist in histories.items():
        missing = {"epoch", "train_loss", "valid_loss"} - set(hist.columns)
        if missing:
            raise InputError(f"history {name!r} lacks columns: {', '.join(sorted(missing))}")
    n = len(histories)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = _new_figure((min(10.0, 1.0 + 3.6 * ncols), 3.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    palette = sns.color_palette("colorblind")
    for ax, (name, hist) in zip(axes, histories.items(), strict=False):
        hist = hist.sort_values("epoch")
        epoch = hist["epoch"].to_numpy()
        if "phase" in hist.columns:
            frozen = (hist["phase"].astype(str) == "frozen").to_numpy()
            for k, (a, b) in enumerate(_runs(frozen)):
                ax.axvspan(
                    epoch[a] - 0.5,
                    epoch[b] + 0.5,
                    color="0.5",
                    alpha=0.15,
                    lw=0,
                    label="frozen backbone" if k == 0 else None,
                )
        ax.plot(epoch, hist["train_loss"], marker="o", ms=4, color=palette[0], label="train loss")
        ax.plot(epoch, hist["valid_loss"], marker="s", ms=4, color=palette[1], label="valid loss")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="upper right")
    for ax in axes[n:]:
        fig.delaxes(ax)
    for ax in axes[:n:ncols]:
        ax.set_ylabel("loss")
    return fig


# --------------------------------------------------------------------------- evaluation


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve by the trapezoidal rule (as ``sklearn.metrics.auc``)."""
    order = np.lexsort((tpr, fpr))
    return float(np.trapezoid(tpr[order], fpr[order]))


@_styled
def roc_curve_figure(
    curves: Mapping[str, Sequence[ArrayLike]],
    *,
    auc_ci: Mapping[str, tuple[float, float]] | None = None,
    title: str | None = None,
) -> Figure:
    """ROC curves of several models on one axes (the study's Figures 3 and 4).

    Args:
        curves: Model name to ``(fpr, tpr)`` (or the ``(fpr, tpr, thresholds)`` that
            ``sklearn.metrics.roc_curve`` returns).
        auc_ci: Model name to the ``(low, high)`` 95% confidence interval of its AUC.
            The legend reads ``"name (AUC 0.951, 95% CI 0.940-0.962)"``, or
            ``"name (AUC 0.951)"`` for a model without an interval.
        title: Axes title; default ``"ROC curves"``.

    Returns:
        The figure, one square axes.

    Raises:
        ValueError: If ``curves`` is empty or a curve's arrays differ in length.
    """
    if not curves:
        raise InputError("curves is empty")
    fig = _new_figure((6, 6))
    ax = fig.subplots()
    palette = sns.color_palette("colorblind")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.55", label="chance (AUC 0.500)")
    for k, (name, curve) in enumerate(curves.items()):
        fpr = np.asarray(curve[0], dtype=float).reshape(-1)
        tpr = np.asarray(curve[1], dtype=float).reshape(-1)
        if fpr.shape != tpr.shape:
            raise InputError(f"curve {name!r}: {fpr.size} FPR values but {tpr.size} TPR values")
        label = f"{name} (AUC {_auc(fpr, tpr):.3f}"
        if auc_ci and name in auc_ci:
            low, high = auc_ci[name]
            label += f", 95% CI {low:.3f}-{high:.3f}"
        ax.plot(fpr, tpr, lw=2, color=palette[k % len(palette)], label=label + ")")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title or "ROC curves")
    ax.legend(loc="lower right")
    return fig


@_styled
def confusion_matrix_figure(matrices: Mapping[str, ArrayLike]) -> Figure:
    """One 2x2 confusion-matrix heatmap per model.

    Cells show the count and, below it, the share of the true class (row-normalised
    percentage); colour follows the share, so panels are comparable across models.

    Args:
        matrices: Model name to a 2x2 count matrix, rows true class and columns
            predicted class, in label order (normal, tumour), as
            ``sklearn.metrics.confusion_matrix`` returns.

    Returns:
        The figure, one axes per model (no colour bar).

    Raises:
        ValueError: If ``matrices`` is empty or a matrix is not 2x2 non-negative counts.
    """
    if not matrices:
        raise InputError("matrices is empty")
    n = len(matrices)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = _new_figure((min(10.0, 0.6 + 3.4 * ncols), 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, matrix) in zip(axes, matrices.items(), strict=False):
        cm = np.asarray(matrix)
        if cm.shape != (2, 2) or (cm < 0).any():
            raise InputError(f"matrix {name!r} must be 2x2 non-negative counts; got {cm.shape}")
        totals = cm.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(totals > 0, cm / np.where(totals > 0, totals, 1), np.nan)
        annot = np.array(
            [
                [
                    f"{int(cm[i, j]):,}\n({share[i, j]:.1%})"
                    if np.isfinite(share[i, j])
                    else f"{int(cm[i, j]):,}"
                    for j in range(2)
                ]
                for i in range(2)
            ]
        )
        sns.heatmap(
            np.nan_to_num(share),
            ax=ax,
            annot=annot,
            fmt="",
            cmap="Blues",
            vmin=0,
            vmax=1,
            cbar=False,
            square=True,
            linewidths=1,
            linecolor="white",
            annot_kws={"fontsize": 11},
            xticklabels=CLASS_NAMES,
            yticklabels=CLASS_NAMES,
        )
        total = cm.sum()
        accuracy = np.trace(cm) / total if total else float("nan")
        ax.set_title(f"{name}\naccuracy {accuracy:.1%}")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.tick_params(axis="y", rotation=90)
        ax.tick_params(axis="x", rotation=0)
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig


# --------------------------------------------------------------------------- analysis

OUTCOME_ORDER: tuple[str, ...] = (
    "true positive", "false positive", "false negative", "true negative",
)
"""Display order of prediction outcomes (rows of the error and Grad-CAM figures)."""

CAM_CMAP = "inferno"
"""Colour map of Grad-CAM overlays (perceptually uniform, readable over H&E)."""


def _model_groups(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(model name, rows) in order of first appearance; one unnamed model without ``model``."""
    if "model" not in table.columns:
        return [("model", table)]
    return [(str(m), table[table["model"] == m]) for m in table["model"].unique()]


@_styled
def reliability_figure(bins: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Reliability diagram of several models on one axes, and their probability histograms.

    Drawn from :func:`pcamlib.analysis.reliability_bins` (or one model's
    :func:`pcamlib.metrics.reliability_table`): each model's observed fraction of tumour
    against its mean predicted probability per bin, with the bins' Wilson intervals, over
    the diagonal of perfect calibration; below, how many patches fall in each bin (log
    scale). The legend gives each model's ECE, recomputed from the table as
    ``sum(count * |observed - mean_prob|) / sum(count)``.

    Args:
        bins: Columns ``bin_low``, ``bin_high``, ``count``, ``mean_prob``, ``observed``,
            ``ci_low``, ``ci_high``; optional ``model``.
        title: Title; default ``"Reliability diagram"``.

    Returns:
        The figure: reliability axes above, histogram axes below (shared x).

    Raises:
        ValueError: If a column is missing or the table is empty.
    """
    require_columns(bins, ["bin_low", "bin_high", "count", "mean_prob", "observed",
                            "ci_low", "ci_high"], "bins")
    if bins.empty:
        raise InputError("bins is empty")
    groups = _model_groups(bins)
    fig = _new_figure((6.0, 7.0))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    palette = sns.color_palette("colorblind")
    top.plot([0, 1], [0, 1], ls="--", lw=1, color="0.55", label="perfect calibration")
    for k, (name, rows) in enumerate(groups):
        color = palette[k % len(palette)]
        count = rows["count"].to_numpy(dtype=float)
        filled = count > 0
        ece = float(np.nansum(count * np.abs(rows["observed"] - rows["mean_prob"]))
                    / count.sum()) if count.sum() else float("nan")
        obs = rows["observed"].to_numpy(dtype=float)[filled]
        yerr = np.vstack([obs - rows["ci_low"].to_numpy(dtype=float)[filled],
                          rows["ci_high"].to_numpy(dtype=float)[filled] - obs])
        top.errorbar(rows["mean_prob"].to_numpy(dtype=float)[filled], obs, yerr=yerr,
                     fmt="-o", ms=4, lw=1.5, capsize=2, color=color,
                     label=f"{name} (ECE {ece:.3f})")
        low = rows["bin_low"].to_numpy(dtype=float)
        width = (rows["bin_high"].to_numpy(dtype=float) - low) / len(groups)
        bottom.bar(low + k * width, count, width=width, align="edge", color=color,
                   alpha=0.8, label=name)
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("observed fraction of tumour")
    top.set_title(title or "Reliability diagram")
    top.legend(loc="upper left")
    bottom.set_yscale("log")
    bottom.set_ylim(bottom=0.8)  # bars grow from one patch, so a bin of 1 is visible
    bottom.set_xlabel("predicted probability of tumour")
    bottom.set_ylabel("patches")
    return fig


@_styled
def operating_points_figure(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Sensitivity at fixed specificity and specificity at fixed sensitivity, per model.

    Drawn from :func:`pcamlib.analysis.operating_point_table` (or one model's
    :func:`pcamlib.metrics.operating_points`): one panel per fixed metric, one row per
    target, a point with its bootstrap interval per model, labelled with the threshold.

    Args:
        table: Columns ``fixed``, ``target``, ``estimated``, ``threshold``, ``value``,
            ``ci_low``, ``ci_high``; optional ``model``.
        title: Figure title; default ``"Operating points"``.

    Returns:
        The figure, one axes per fixed metric present.

    Raises:
        ValueError: If a column is missing or the table is empty.
    """
    require_columns(table, ["fixed", "target", "estimated", "threshold", "value",
                             "ci_low", "ci_high"], "table")
    if table.empty:
        raise InputError("table is empty")
    fixed_metrics = [f for f in ("specificity", "sensitivity") if f in set(table["fixed"])]
    groups = _model_groups(table)
    palette = sns.color_palette("colorblind")
    fig = _new_figure((9.0, 1.6 + 0.55 * len(groups) * table["target"].nunique()))
    axes = fig.subplots(1, len(fixed_metrics), squeeze=False)[0]
    for ax, fixed in zip(axes, fixed_metrics, strict=True):
        targets = sorted(set(table.loc[table["fixed"] == fixed, "target"]))
        estimated = table.loc[table["fixed"] == fixed, "estimated"].iloc[0]
        for k, (name, rows) in enumerate(groups):
            rows = rows[rows["fixed"] == fixed]
            for j, target in enumerate(targets):
                row = rows[rows["target"] == target]
                if row.empty:
                    continue
                r = row.iloc[0]
                y = j + (k - (len(groups) - 1) / 2) * 0.8 / max(len(groups), 1)
                ax.errorbar([r["value"]], [y],
                            xerr=[[r["value"] - r["ci_low"]], [r["ci_high"] - r["value"]]],
                            fmt="o", ms=6, capsize=3, color=palette[k % len(palette)],
                            label=name if j == 0 else None)
                ax.annotate(f"t={r['threshold']:.3g}", (r["value"], y), xytext=(6, 4),
                            textcoords="offset points", fontsize=8)
        ax.set_yticks(range(len(targets)), [f"{fixed} \u2265 {t:.0%}" for t in targets])
        ax.set_ylim(len(targets) - 0.5, -0.5)
        low = float(np.nanmin(table.loc[table["fixed"] == fixed, ["ci_low", "value"]]))
        ax.set_xlim(max(0.0, low - 0.05), 1.02)  # rates end at 1; room for the labels
        ax.set_xlabel(estimated)
        ax.set_title(f"{estimated} at fixed {fixed}")
        ax.grid(axis="y", visible=False)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(title or "Operating points (95% bootstrap intervals; t = threshold)")
    return fig


def _outcome_rows(table: pd.DataFrame, column: str) -> list[tuple[str, pd.DataFrame]]:
    """Rows of ``table`` grouped by ``column``, known outcomes first in display order."""
    present = list(dict.fromkeys(table[column].astype(str)))
    order = [o for o in OUTCOME_ORDER if o in present] + [o for o in present
                                                          if o not in OUTCOME_ORDER]
    return [(o, table[table[column].astype(str) == o]) for o in order]


@_styled
def top_errors_figure(images: ArrayLike, table: pd.DataFrame, *,
                      title: str | None = None) -> Figure:
    """The most confident errors: one row of patches per kind, the centre box marked.

    Drawn from :func:`pcamlib.analysis.top_errors` and the patches of its rows. Each
    patch is titled with its predicted probability of tumour, its loss and its row.

    Args:
        images: ``N x H x W x 3`` patches, one per table row, in table order.
        table: Columns ``kind`` (e.g. ``"false positive"``), ``row``, ``prob``, ``loss``.
        title: Figure title; default ``"Most confident errors (highest loss)"``.

    Returns:
        The figure, one axes per patch.

    Raises:
        ValueError: If a column is missing, the table is empty or ``images`` does not
            hold one patch per table row.
    """
    require_columns(table, ["kind", "row", "prob", "loss"], "table")
    patches = _as_patches(images)
    if table.empty:
        raise InputError("table is empty: there are no errors to show")
    if len(patches) != len(table):
        raise InputError(f"images must hold one patch per table row: expected {len(table)}, "
                         f"found {len(patches)}")
    table = table.reset_index(drop=True)
    groups = _outcome_rows(table, "kind")
    ncols = max(len(rows) for _, rows in groups)
    cell = min(_NATIVE_CELL, 9.0 / ncols)
    fig = _new_figure((max(cell * ncols + 1.2, 5.0), (cell + 0.55) * len(groups) + 0.7),
                      photographic=True)
    grid = fig.subplots(len(groups), ncols, squeeze=False)
    for r, (kind, rows) in enumerate(groups):
        for c in range(ncols):
            ax = grid[r, c]
            if c >= len(rows):
                fig.delaxes(ax)
                continue
            i = rows.index[c]
            _show_patch(ax, patches[i], True)
            rec = table.loc[i]
            ax.set_title(f"p {rec['prob']:.3f}, loss {rec['loss']:.2f}\nrow {int(rec['row'])}",
                         fontsize=8)
            if c == 0:
                ax.set_ylabel(kind, fontsize=10, fontweight="bold")
    fig.suptitle(title or "Most confident errors\n(highest loss; p = probability of tumour)")
    return fig


@_styled
def gradcam_figure(images: ArrayLike, maps: ArrayLike, table: pd.DataFrame, *,
                   title: str | None = None, alpha: float = 0.5) -> Figure:
    """Grad-CAM maps beside their patches, one row per outcome, the centre box marked.

    Drawn from :func:`pcamlib.analysis.gradcam_examples`: for each example the patch,
    then the patch with its class activation map overlaid (colour map :data:`CAM_CMAP`,
    0 to 1).

    Args:
        images: ``N x H x W x 3`` patches, one per table row, in table order.
        maps: ``N x H x W`` activation maps in [0, 1], aligned with ``images``.
        table: Columns ``outcome``, ``row``, ``prob``; optional ``centre_mass`` (share
            of the map inside the centre box, shown in the title), ``model``, ``target``
            and ``layer`` (shown in the figure title).
        title: Figure title; default built from ``model``, ``target`` and ``layer``.
        alpha: Opacity of the overlay.

    Returns:
        The figure, two axes per example.

    Raises:
        ValueError: If a column is missing, the table is empty or the arrays do not
            match the table and each other.
    """
    require_columns(table, ["outcome", "row", "prob"], "table")
    patches = _as_patches(images)
    cams = np.asarray(maps, dtype=float)
    if table.empty:
        raise InputError("table is empty")
    if len(patches) != len(table) or cams.shape != patches.shape[:3]:
        raise InputError(
            f"images and maps must hold one {patches.shape[1:3]} patch and map per table row: "
            f"expected {len(table)} of each, found images {patches.shape} and maps {cams.shape}"
        )
    table = table.reset_index(drop=True)
    groups = _outcome_rows(table, "outcome")
    per_row = max(len(rows) for _, rows in groups)
    ncols = 2 * per_row
    cell = min(_NATIVE_CELL, 10.0 / ncols)
    fig = _new_figure((cell * ncols + 1.2, (cell + 0.55) * len(groups) + 0.5), photographic=True)
    grid = fig.subplots(len(groups), ncols, squeeze=False)
    for r, (outcome, rows) in enumerate(groups):
        for c in range(per_row):
            ax_patch, ax_cam = grid[r, 2 * c], grid[r, 2 * c + 1]
            if c >= len(rows):
                fig.delaxes(ax_patch)
                fig.delaxes(ax_cam)
                continue
            i = rows.index[c]
            rec = table.loc[i]
            _show_patch(ax_patch, patches[i], True)
            ax_patch.set_title(f"row {int(rec['row'])}\np {rec['prob']:.3f}", fontsize=8)
            # The box (a patch artist, zorder 1) stays above the overlay (an image, 0).
            _show_patch(ax_cam, patches[i], True)
            ax_cam.imshow(cams[i], cmap=CAM_CMAP, vmin=0.0, vmax=1.0, alpha=alpha,
                          interpolation="bilinear")
            if "centre_mass" in table.columns:
                # an all-zero map: no region raised the score (NaN share)
                share = ("map all zero" if pd.isna(rec["centre_mass"])
                         else f"{rec['centre_mass']:.0%} in centre")
                ax_cam.set_title(f"Grad-CAM\n{share}", fontsize=8)
            if c == 0:
                ax_patch.set_ylabel(outcome, fontsize=10, fontweight="bold")
    if title is None:
        parts = [str(table[col].iloc[0]) for col in ("model",) if col in table.columns]
        if "target" in table.columns:
            parts.append(f"evidence for {table['target'].iloc[0]}")
        if "layer" in table.columns:
            parts.append(f"layer {table['layer'].iloc[0]}")
        title = "Grad-CAM" + (f": {', '.join(parts)}" if parts else "")
    fig.suptitle(title)
    return fig


@_styled
def per_slide_figure(table: pd.DataFrame, *, max_slides: int = 30,
                     title: str | None = None) -> Figure:
    """Accuracy per slide (whole-slide image), one colour per model.

    Drawn from :func:`pcamlib.analysis.per_slide_table`. Slides are sorted by their
    mean accuracy over the models, the worst at the top; with more than ``max_slides``
    slides only the worst ``max_slides`` are drawn (the title says so). Each slide's
    label gives its patch count and positives.

    Args:
        table: Columns ``wsi``, ``n``, ``positives``, ``accuracy``; optional ``model``.
        max_slides: Most slides drawn.
        title: Title; default ``"Accuracy per slide"``.

    Returns:
        The figure, one axes.

    Raises:
        ValueError: If a column is missing, the table is empty or ``max_slides < 1``.
    """
    require_columns(table, ["wsi", "n", "positives", "accuracy"], "table")
    if table.empty:
        raise InputError("table is empty")
    if max_slides < 1:
        raise InputError(f"max_slides must be >= 1; got {max_slides}")
    mean_acc = table.groupby("wsi", sort=False)["accuracy"].mean().sort_values(kind="stable")
    shown = list(mean_acc.index[:max_slides])
    sizes = table.drop_duplicates("wsi").set_index("wsi")
    groups = _model_groups(table)
    palette = sns.color_palette("colorblind")
    fig = _new_figure((7.0, 1.4 + 0.28 * len(shown)))
    ax = fig.subplots()
    position = {wsi: j for j, wsi in enumerate(shown)}
    for k, (name, rows) in enumerate(groups):
        rows = rows[rows["wsi"].isin(position)]
        ax.plot(rows["accuracy"], rows["wsi"].map(position), "o", ms=6,
                color=palette[k % len(palette)], label=name, alpha=0.9)
    ax.set_yticks(range(len(shown)), [
        f"{wsi} (n={int(sizes.loc[wsi, 'n'])}, {int(sizes.loc[wsi, 'positives'])} tumour)"
        for wsi in shown])
    ax.set_ylim(len(shown) - 0.5, -0.5)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("accuracy (threshold 0.5)")
    heading = title or "Accuracy per slide"
    if len(mean_acc) > len(shown):
        heading += f" (worst {len(shown)} of {len(mean_acc)} slides)"
    ax.set_title(heading)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig
