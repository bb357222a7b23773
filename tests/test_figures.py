from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from pcamlib import figures as F  # noqa: E402
from pcamlib.pcam import CENTRE_BOX  # noqa: E402

RNG_SEED = 1234


@pytest.fixture(autouse=True)
def _no_pyplot_leaks():
    before = set(plt.get_fignums())
    yield
    leaked = set(plt.get_fignums()) - before
    plt.close("all")
    assert not leaked, "figure functions must not register figures with pyplot"


@pytest.fixture
def figs():
    """Collect figures built in a test and close them afterwards."""
    made: list[Figure] = []
    yield made
    for fig in made:
        plt.close(fig)
        fig.clear()


def patches(n: int, seed: int = RNG_SEED) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)


def history(n: int, frozen: int) -> pd.DataFrame:
    epoch = np.arange(n)
    return pd.DataFrame(
        {
            "epoch": epoch,
            "phase": ["frozen"] * frozen + ["unfrozen"] * (n - frozen),
            "train_loss": 0.6 * np.exp(-epoch / 3) + 0.1,
            "valid_loss": 0.5 * np.exp(-epoch / 4) + 0.15,
            "accuracy": 0.9,
            "auc": 0.95,
            "seconds": 12.5,
        }
    )


def texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text)]


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    return [t.get_text() for t in legend.get_texts()]


def small_figure() -> Figure:
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.plot([0, 1, 2], [1, 0, 1], label="line")
    ax.legend()
    return fig


# ----------------------------------------------------------------------------- saving


def test_save_figure_writes_png_and_svg(tmp_path, figs):
    fig = F.patch_grid_figure(patches(6), [0, 0, 0, 1, 1, 1])
    figs.append(fig)
    out = tmp_path / "nested" / "figures"
    paths = F.save_figure(fig, out, "fig1_patches")
    assert paths == [out / "fig1_patches.png", out / "fig1_patches.svg"]
    png, svg = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert 1000 < len(png) < 300_000
    assert b"<svg" in svg[:2000] and svg.rstrip().endswith(b"</svg>")
    assert b"Software" not in png and b"matplotlib" not in png
    assert b"<dc:date>" not in svg
    assert sorted(p.name for p in out.iterdir()) == ["fig1_patches.png", "fig1_patches.svg"]


def test_save_figure_is_byte_stable(tmp_path, figs):
    fig = small_figure()
    figs.append(fig)
    first = [p.read_bytes() for p in F.save_figure(fig, tmp_path / "a", "same")]
    second = [p.read_bytes() for p in F.save_figure(fig, tmp_path / "b", "same")]
    assert first == second


def test_save_figure_overwrites_and_respects_dpi(tmp_path, figs):
    from PIL import Image

    fig = small_figure()
    figs.append(fig)
    F.save_figure(fig, tmp_path, "plot", dpi=40)
    with Image.open(tmp_path / "plot.png") as image:
        assert image.size == (160, 120)
    F.save_figure(fig, tmp_path, "plot")
    with Image.open(tmp_path / "plot.png") as image:
        assert image.size == (320, 240)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "plot.svg"]


def test_saved_files_follow_the_umask_not_mkstemps_private_mode(tmp_path, figs):
    import os

    fig = small_figure()
    figs.append(fig)
    old = os.umask(0o022)
    try:
        paths = F.save_figure(fig, tmp_path, "shared")
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in paths] == [oct(0o644)] * 2


def _shown(obj) -> dict:
    """The mime bundle(s) IPython publishes when ``obj`` is a cell's value."""
    from IPython.core.formatters import DisplayFormatter
    from IPython.core.interactiveshell import InteractiveShell
    from matplotlib_inline.backend_inline import configure_inline_support

    shell = InteractiveShell.instance()
    # what a kernel with fastai imported has: the inline backend's PNG printer for Figures
    configure_inline_support(shell, "module://matplotlib_inline.backend_inline")
    published: list[dict] = []
    original = shell.display_pub.publish
    shell.display_pub.publish = lambda data, metadata=None, **kw: published.append(data)
    try:
        data, _ = shell.display_formatter.format(obj)
    finally:
        shell.display_pub.publish = original
    assert isinstance(shell.display_formatter, DisplayFormatter)
    return {**data, **{k: v for d in published for k, v in d.items()}}


def test_patch_figures_show_as_jpeg_only_and_charts_as_png(figs):
    import base64

    patch_fig = F.patch_grid_figure(patches(6), [0, 0, 0, 1, 1, 1])
    chart = F.loss_curves_figure({"m": history(4, 1)})
    figs += [patch_fig, chart]
    assert isinstance(patch_fig, F.PhotographicFigure)
    shown = _shown(patch_fig)
    assert "image/png" not in shown
    jpeg = base64.b64decode(shown["image/jpeg"])
    assert jpeg.startswith(b"\xff\xd8")
    png_size = len(F.ReportFigure._repr_png_(patch_fig))
    assert len(jpeg) * 3 < png_size, (len(jpeg), png_size)
    assert "image/png" in _shown(chart) and "image/jpeg" not in _shown(chart)


def test_photographic_image_closes_the_pyplot_figure_and_names_bad_input():
    fig = plt.figure(figsize=(2, 2))
    fig.add_subplot().imshow(patches(1)[0])
    image = F.photographic_image()
    assert image.format == "jpeg" and image.data.startswith(b"\xff\xd8")
    assert plt.fignum_exists(fig.number) is False
    with pytest.raises(ValueError, match="no figure to show"):
        F.photographic_image()
    with pytest.raises(ValueError, match="quality must be an integer from 1 to 95; got 0"):
        F.photographic_image(small_figure(), quality=0)


@pytest.mark.parametrize("name", ["", "a/b", "../escape", "fig.png", "with space", "é", "a\nb"])
def test_save_figure_rejects_bad_names(tmp_path, figs, name):
    fig = small_figure()
    figs.append(fig)
    with pytest.raises(ValueError, match="name") as err:
        F.save_figure(fig, tmp_path, name)
    assert repr(name) in str(err.value)
    assert not any(tmp_path.iterdir())


def test_save_figure_failure_leaves_nothing(tmp_path, figs, monkeypatch):
    fig = small_figure()
    figs.append(fig)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(RuntimeError):
        F.save_figure(fig, tmp_path, "broken")
    assert not any(tmp_path.iterdir())


def test_save_table_writes_csv_and_md(tmp_path):
    df = pd.DataFrame(
        {"model": ["densenet121", "resnet50"], "auc": [0.951234567, 0.94], "epochs": [10, 8]}
    )
    paths = F.save_table(df, tmp_path / "tables", "table1_metrics", floatfmt=".3f")
    csv, md = paths
    assert [p.name for p in paths] == ["table1_metrics.csv", "table1_metrics.md"]
    assert csv.read_text().splitlines()[0] == "model,auc,epochs"
    pd.testing.assert_frame_equal(pd.read_csv(csv), df)
    lines = md.read_text().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["model", "auc", "epochs"]
    assert set(lines[1]) <= set("|:- ")
    assert "0.951" in lines[2] and "0.9512" not in lines[2]
    assert len(lines) == 4
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [
        "table1_metrics.csv",
        "table1_metrics.md",
    ]


def test_save_table_rejects_bad_name(tmp_path):
    with pytest.raises(ValueError, match="x.csv"):
        F.save_table(pd.DataFrame({"a": [1]}), tmp_path, "x.csv")


# ----------------------------------------------------------------------------- data helpers


def test_channel_stats_table():
    stats = {
        "train": {"mean": [0.70, 0.54, 0.69], "std": [0.24, 0.28, 0.21], "rows": 100},
        "valid": {"mean": [0.71, 0.55, 0.70], "std": [0.23, 0.27, 0.20], "rows": 10},
    }
    table = F.channel_stats_table(stats)
    assert table.shape == (6, 4)
    assert list(table.columns) == ["split", "channel", "mean", "std"]
    assert list(table["split"]) == ["train"] * 3 + ["valid"] * 3
    assert list(table["channel"]) == ["red", "green", "blue"] * 2
    assert table.loc[4, "mean"] == pytest.approx(0.55)
    assert table.loc[2, "std"] == pytest.approx(0.21)


def test_channel_stats_table_rejects_wrong_length():
    with pytest.raises(ValueError, match="train"):
        F.channel_stats_table({"train": {"mean": [0.5, 0.5], "std": [0.1, 0.1, 0.1], "rows": 1}})


# ----------------------------------------------------------------------------- patches


def test_patch_grid_titles_and_centre_box(figs):
    fig = F.patch_grid_figure(patches(6), [0, 0, 0, 1, 1, 1], suptitle="Figure 1")
    figs.append(fig)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6
    assert [ax.get_title() for ax in fig.axes] == ["normal (0)"] * 3 + ["tumour (1)"] * 3
    assert fig.get_suptitle() == "Figure 1"
    top, left, bottom, right = CENTRE_BOX
    for ax in fig.axes:
        boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert len(boxes) == 1
        assert boxes[0].get_xy() == (left - 0.5, top - 0.5)
        assert (boxes[0].get_width(), boxes[0].get_height()) == (right - left, bottom - top)
        assert len(ax.images) == 1


def test_patch_grid_without_centre_with_titles_and_wrapping(figs):
    fig = F.patch_grid_figure(patches(5), None, titles=list("abcde"), ncols=3, show_centre=False)
    figs.append(fig)
    assert len(fig.axes) == 5
    assert [ax.get_title() for ax in fig.axes] == list("abcde")
    assert all(not ax.patches for ax in fig.axes)


def test_patch_grid_validates(figs):
    with pytest.raises(ValueError, match="labels"):
        F.patch_grid_figure(patches(3), [0, 1])
    with pytest.raises(ValueError, match="shape"):
        F.patch_grid_figure(np.zeros((2, 96, 96), np.uint8), [0, 1])


def test_augmentation_grid_rows(figs):
    base = patches(4)
    rows = {
        "original": base,
        "flip": base[:, :, ::-1],
        "rotate90": np.rot90(base, axes=(1, 2)),
    }
    fig = F.augmentation_grid_figure(rows)
    figs.append(fig)
    assert len(fig.axes) == 12
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["original", "flip", "rotate90"]
    assert all(len(ax.patches) == 1 for ax in fig.axes)


def test_augmentation_grid_uneven_rows_without_centre(figs):
    fig = F.augmentation_grid_figure(
        {"original": patches(3), "crop": patches(2, seed=5)}, show_centre=False
    )
    figs.append(fig)
    assert len(fig.axes) == 5
    assert all(not ax.patches for ax in fig.axes)


# ----------------------------------------------------------------------------- exploration


def test_intensity_distribution(figs):
    images = patches(8)
    labels = np.array([0, 1] * 4)
    fig = F.intensity_distribution_figure(images, labels, max_pixels=5000)
    figs.append(fig)
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == ["red channel", "green channel", "blue channel"]
    for ax in fig.axes:
        assert len(ax.get_lines()) == 2
    assert legend_texts(fig.axes[0]) == ["normal (0), 4 patches", "tumour (1), 4 patches"]
    again = F.intensity_distribution_figure(images, labels, max_pixels=5000)
    figs.append(again)
    for a, b in zip(fig.axes[0].get_lines(), again.axes[0].get_lines(), strict=True):
        np.testing.assert_array_equal(a.get_ydata(), b.get_ydata())


def test_intensity_distribution_single_class(figs):
    fig = F.intensity_distribution_figure(np.full((2, 96, 96, 3), 255, np.uint8), [1, 1])
    figs.append(fig)
    assert all(len(ax.get_lines()) == 1 for ax in fig.axes)


def test_split_balance(figs):
    counts = pd.DataFrame(
        {
            "split": ["test", "test", "train", "train", "valid", "valid"],
            "label": [0, 1, 0, 1, 0, 1],
            "count": [16391, 16377, 131072, 131072, 16399, 16369],
        }
    )
    fig = F.split_balance_figure(counts)
    figs.append(fig)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["train", "valid", "test"]
    assert len(ax.patches) == 6
    assert legend_texts(ax) == ["normal (0)", "tumour (1)"]
    assert "131,072\n50.0%" in texts(fig)


def test_split_balance_missing_column():
    with pytest.raises(ValueError, match="count"):
        F.split_balance_figure(pd.DataFrame({"split": ["train"], "label": [0]}))


# ----------------------------------------------------------------------------- training


def test_lr_find(figs):
    lrs = np.logspace(-7, 0, 50)
    losses = 0.7 - 0.3 * np.tanh(np.log10(lrs) + 4) + np.where(lrs > 0.1, 5.0, 0.0)
    fig = F.lr_find_figure(
        lrs, losses, suggestions={"valley": 1.2e-3, "slide": 3e-3}, chosen=2e-3, title="densenet"
    )
    figs.append(fig)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_title() == "densenet"
    assert legend_texts(ax) == ["loss", "valley: 1.2e-03", "slide: 3.0e-03", "chosen: 2.0e-03"]
    assert ax.get_ylim()[1] < 2.0  # the diverging tail does not squash the curve


def test_lr_find_without_extras_and_mismatch(figs):
    fig = F.lr_find_figure([1e-5, 1e-4, 1e-3], [1.0, 0.8, 0.9])
    figs.append(fig)
    assert fig.axes[0].get_title() == "Learning-rate finder"
    with pytest.raises(ValueError, match="losses"):
        F.lr_find_figure([1e-5, 1e-4], [1.0])


def test_loss_curves(figs):
    fig = F.loss_curves_figure({"densenet121": history(6, 2), "resnet50": history(5, 0)})
    figs.append(fig)
    assert len(fig.axes) == 2
    dense, res = fig.axes
    assert [dense.get_title(), res.get_title()] == ["densenet121", "resnet50"]
    assert legend_texts(dense) == ["frozen backbone", "train loss", "valid loss"]
    assert legend_texts(res) == ["train loss", "valid loss"]
    assert len(dense.patches) == 1  # shaded frozen epochs
    assert len(res.patches) == 0
    np.testing.assert_array_equal(dense.get_lines()[0].get_xdata(), np.arange(6))
    assert dense.get_ylabel() == "loss"


def test_loss_curves_without_phase_and_many_models(figs):
    hists = {f"m{i}": history(3, 0).drop(columns="phase") for i in range(4)}
    fig = F.loss_curves_figure(hists)
    figs.append(fig)
    assert len(fig.axes) == 4
    with pytest.raises(ValueError, match="valid_loss"):
        F.loss_curves_figure({"bad": history(3, 0).drop(columns="valid_loss")})


# ----------------------------------------------------------------------------- evaluation


def test_roc_curve_legend(figs):
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(RNG_SEED)
    y = rng.integers(0, 2, 400)
    scores = {"densenet121": y * 2.0 + rng.normal(size=400), "resnet50": y + rng.normal(size=400)}
    curves = {name: roc_curve(y, s) for name, s in scores.items()}
    fig = F.roc_curve_figure(curves, auc_ci={"densenet121": (0.9412, 0.9634)}, title="Test")
    figs.append(fig)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    labels = legend_texts(ax)
    dense_auc = roc_auc_score(y, scores["densenet121"])
    res_auc = roc_auc_score(y, scores["resnet50"])
    assert labels[1] == f"densenet121 (AUC {dense_auc:.3f}, 95% CI 0.941-0.963)"
    assert labels[2] == f"resnet50 (AUC {res_auc:.3f})"
    assert labels[0].startswith("chance")
    assert ax.get_aspect() == 1.0
    assert ax.get_title() == "Test"


def test_roc_curve_rejects_mismatch():
    with pytest.raises(ValueError, match="m"):
        F.roc_curve_figure({"m": (np.array([0, 1]), np.array([0, 0.5, 1]))})


def test_confusion_matrices(figs):
    fig = F.confusion_matrix_figure(
        {"densenet121": np.array([[90, 10], [5, 95]]), "resnet50": np.array([[80, 20], [0, 0]])}
    )
    figs.append(fig)
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["normal", "tumour"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["normal", "tumour"]
    cells = [t.get_text() for t in ax.texts]
    assert cells == ["90\n(90.0%)", "10\n(10.0%)", "5\n(5.0%)", "95\n(95.0%)"]
    assert "densenet121" in ax.get_title() and "92.5%" in ax.get_title()
    assert [t.get_text() for t in fig.axes[1].texts][2:] == ["0", "0"]  # empty true class


def test_confusion_matrix_rejects_bad_shape():
    with pytest.raises(ValueError, match="2x2"):
        F.confusion_matrix_figure({"m": np.ones((3, 3))})


# ----------------------------------------------------------------------------- all figures


def all_figures() -> dict[str, Figure]:
    rng = np.random.default_rng(RNG_SEED)
    fpr = np.linspace(0, 1, 20)
    return {
        "patch_grid": F.patch_grid_figure(patches(6), [0, 0, 0, 1, 1, 1]),
        "intensity": F.intensity_distribution_figure(patches(4), [0, 0, 1, 1], max_pixels=2000),
        "augmentation": F.augmentation_grid_figure({"original": patches(3), "flip": patches(3)}),
        "lr_find": F.lr_find_figure(np.logspace(-6, -1, 30), rng.random(30), chosen=1e-3),
        "loss_curves": F.loss_curves_figure({"a": history(4, 1)}),
        "roc": F.roc_curve_figure({"a": (fpr, np.sqrt(fpr))}),
        "confusion": F.confusion_matrix_figure({"a": np.array([[5, 1], [2, 7]])}),
        "balance": F.split_balance_figure(
            pd.DataFrame({"split": ["train", "train"], "label": [0, 1], "count": [3, 4]})
        ),
    }


def test_every_figure_saves_small(tmp_path, figs):
    built = all_figures()
    figs.extend(built.values())
    for name, fig in built.items():
        assert isinstance(fig, Figure), name
        width, height = fig.get_size_inches()
        assert 3 <= width <= 10 and 1.5 <= height <= 6.5, (name, width, height)
        png, svg = F.save_figure(fig, tmp_path, name)
        assert 0 < png.stat().st_size < 300_000, name
        assert svg.stat().st_size > 0, name


def test_figures_leave_global_style_alone(figs):
    before = dict(matplotlib.rcParams)
    figs.extend(all_figures().values())
    after = dict(matplotlib.rcParams)
    assert {k for k in before if before[k] != after[k]} == set()


def test_figures_display_as_png_in_notebooks(figs):
    fig = F.roc_curve_figure({"a": (np.linspace(0, 1, 5), np.linspace(0, 1, 5) ** 0.5)})
    figs.append(fig)
    assert isinstance(fig, F.ReportFigure)
    assert fig._repr_png_().startswith(b"\x89PNG")


def test_gradcam_figure_names_an_all_zero_map_instead_of_a_nan_share(figs):
    table = pd.DataFrame({"outcome": ["true positive", "true negative"], "row": [3, 7],
                          "prob": [0.99, 0.01], "centre_mass": [0.25, np.nan]})
    maps = np.zeros((2, 96, 96))
    maps[0, 40:56, 40:56] = 1.0
    fig = F.gradcam_figure(patches(2), maps, table)
    figs.append(fig)
    shown = texts(fig)
    assert "Grad-CAM\n25% in centre" in shown and "Grad-CAM\nmap all zero" in shown
    assert not any("nan" in t for t in shown)
