"""The analyses a reviewer or pathologist asks for beyond Table 1.

Calibration, operating points, the most confident errors, class activation maps and a
per-slide breakdown. Each function takes plain inputs (prediction tables as written by
:mod:`pcamlib.evaluate`, a :class:`~pcamlib.pcam.PCamSplit`, a fastai ``Learner``) and
returns a tidy DataFrame; the matching figure function in :mod:`pcamlib.figures` draws
a picture from that table:

==========================  =====================================
table                       figure
==========================  =====================================
:func:`calibration_table`   (one row per model: ECE and NLL)
:func:`reliability_bins`    :func:`~pcamlib.figures.reliability_figure`
:func:`operating_point_table`  :func:`~pcamlib.figures.operating_points_figure`
:func:`top_errors`          :func:`~pcamlib.figures.top_errors_figure`
:func:`gradcam_examples`    :func:`~pcamlib.figures.gradcam_figure`
:func:`per_slide_table`     :func:`~pcamlib.figures.per_slide_figure`
==========================  =====================================

Prediction tables have the columns ``split``, ``row``, ``label``, ``prob`` and
``prob_tta`` (see :func:`pcamlib.evaluate.evaluate_run`); functions comparing models take
a mapping of model name to such a table. Array-level computations live in
:mod:`pcamlib.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from sklearn.metrics import roc_auc_score
from torch import nn
from torchvision.models.densenet import _DenseBlock
from torchvision.models.resnet import BasicBlock, Bottleneck

from pcamlib import metrics as M
from pcamlib.data import CentreCrop, PCamRows, split_dataloader
from pcamlib.errors import InputError, require_columns
from pcamlib.pcam import CENTRE_BOX, CLASS_NAMES, IMAGE_SHAPE, PCamSplit, check_split

PREDICTION_COLUMNS: tuple[str, ...] = ("split", "row", "label", "prob")
"""Columns every prediction table needs (``prob_tta`` too for ``variant='tta'``)."""

VARIANTS: dict[str, str] = {"plain": "prob", "tta": "prob_tta"}
"""Prediction variant to the column holding its probabilities."""


# --------------------------------------------------------------------------- inputs


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise InputError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    return VARIANTS[variant]


def _check_models(predictions: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    if isinstance(predictions, pd.DataFrame) or not isinstance(predictions, Mapping):
        raise InputError(
            "predictions must map model names to prediction tables, e.g. "
            f"{{'resnet18': table}}; got {type(predictions).__name__}"
        )
    if not predictions:
        raise InputError("predictions is empty: expected at least one model")
    return dict(predictions)


def _split_predictions(table: pd.DataFrame, split: str, variant: str,
                       what: str = "predictions") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, labels, probabilities)`` of one split and variant of a prediction table."""
    check_split(split)
    column = _check_variant(variant)
    require_columns(table, list(dict.fromkeys([*PREDICTION_COLUMNS, column])), what)
    present = sorted(map(str, table["split"].unique()))
    part = table[table["split"] == split]
    if part.empty:
        raise InputError(f"{what} has no rows for split {split!r}; found splits {present}")
    prob = part[column].to_numpy(dtype=float)
    if np.isnan(prob).all():
        raise InputError(
            f"{what} has no {variant} probabilities ({column} is empty) for split {split!r}; "
            "use variant='plain'"
        )
    return part["row"].to_numpy(dtype=np.int64), part["label"].to_numpy(), prob


def _per_model(predictions, split: str, variant: str):
    for model, table in _check_models(predictions).items():
        rows, y, prob = _split_predictions(table, split, variant, f"predictions of {model!r}")
        yield model, rows, y, prob


@contextmanager
def _naming(model: str, split: str):
    """Re-raise a ValueError naming the model and split (metrics only know y and prob)."""
    try:
        yield
    except ValueError as err:
        raise InputError(f"predictions of {model!r}, split {split!r}: {err}") from err


# --------------------------------------------------------------------------- calibration


def calibration_table(
    predictions: Mapping[str, pd.DataFrame], *, split: str = "test", variant: str = "plain",
    n_bins: int = 10, n_boot: int = 1000, seed: int = 0,
) -> pd.DataFrame:
    """ECE and NLL with 95% bootstrap intervals, and the Brier score, one row per model.

    ECE uses ``n_bins`` equal-width bins ``(k/M, (k+1)/M]`` of the predicted probability
    of tumour (see :func:`pcamlib.metrics.expected_calibration_error`); NLL is the log
    loss of :func:`pcamlib.metrics.binary_metrics`. Both come from the same bootstrap
    resamples (:func:`pcamlib.metrics.calibration_metrics`). ``veeling_nll`` is the NLL
    Veeling et al. (2018) report on the PCam test split (0.260), filled on test rows only.

    Args:
        predictions: Model name to prediction table.
        split: Split to analyse.
        variant: ``plain`` or ``tta`` (8-way dihedral test-time augmentation).
        n_bins: ECE bins.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        Columns ``model``, ``split``, ``variant``, ``n``, ``n_bins``, ``ece``,
        ``ece_ci_low``, ``ece_ci_high``, ``nll``, ``nll_ci_low``, ``nll_ci_high``,
        ``veeling_nll``, ``brier``.

    Raises:
        ValueError: On a bad prediction table, split or variant, or labels of one class.
    """
    rows = []
    for model, _, y, prob in _per_model(predictions, split, variant):
        with _naming(model, split):
            cal = M.calibration_metrics(y, prob, n_bins=n_bins, n_boot=n_boot, seed=seed)
        veeling = M.VEELING_2018["test_nll"] if split == "test" else float("nan")
        rows.append({"model": model, "split": split, "variant": variant, **cal,
                     "veeling_nll": veeling})
    columns = ["model", "split", "variant", "n", "n_bins", "ece", "ece_ci_low", "ece_ci_high",
               "nll", "nll_ci_low", "nll_ci_high", "veeling_nll", "brier"]
    return pd.DataFrame(rows)[columns]


def reliability_bins(
    predictions: Mapping[str, pd.DataFrame], *, split: str = "test", variant: str = "plain",
    n_bins: int = 10, alpha: float = 0.05,
) -> pd.DataFrame:
    """Reliability table of every model (long format), for the reliability diagram.

    Args:
        predictions: Model name to prediction table.
        split: Split to analyse.
        variant: ``plain`` or ``tta``.
        n_bins: Equal-width bins (as the ECE of :func:`calibration_table`).
        alpha: Two-sided level of the bins' Wilson intervals.

    Returns:
        ``model``, ``split``, ``variant`` and the columns of
        :func:`pcamlib.metrics.reliability_table`, one row per model and bin.

    Raises:
        ValueError: On a bad prediction table, split or variant.
    """
    parts = []
    for model, _, y, prob in _per_model(predictions, split, variant):
        with _naming(model, split):
            table = M.reliability_table(y, prob, n_bins=n_bins, alpha=alpha)
        parts.append(table.assign(model=model, split=split, variant=variant))
    table = pd.concat(parts, ignore_index=True)
    return table[["model", "split", "variant", *M.RELIABILITY_COLUMNS]]


# --------------------------------------------------------------------------- operating points


def operating_point_table(
    predictions: Mapping[str, pd.DataFrame], *, split: str = "test", variant: str = "plain",
    targets: Sequence[tuple[str, float]] = M.OPERATING_TARGETS, n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Sensitivity at fixed specificity and specificity at fixed sensitivity, per model.

    See :func:`pcamlib.metrics.operating_points` for how the threshold is picked from
    the ROC curve and how the bootstrap intervals are made.

    Args:
        predictions: Model name to prediction table.
        split: Split to analyse.
        variant: ``plain`` or ``tta``.
        targets: ``(fixed metric, target)`` pairs (default 90% and 95% of each).
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        ``model``, ``split``, ``variant`` and the columns of
        :func:`pcamlib.metrics.operating_points`, one row per model and target.

    Raises:
        ValueError: On a bad prediction table, split, variant or target, or labels of one
            class.
    """
    parts = []
    for model, _, y, prob in _per_model(predictions, split, variant):
        with _naming(model, split):
            table = M.operating_points(y, prob, targets=targets, n_boot=n_boot, seed=seed)
        parts.append(table.assign(model=model, split=split, variant=variant))
    table = pd.concat(parts, ignore_index=True)
    return table[["model", "split", "variant", *M.OPERATING_COLUMNS]]


# --------------------------------------------------------------------------- errors


def interpretation(learn: Learner, data: PCamSplit | None = None) -> ClassificationInterpretation:
    """The fastai ``ClassificationInterpretation`` of ``learn`` on a split.

    Predictions go through the validation pipeline (:func:`pcamlib.data.split_dataloader`),
    so the losses are those of :func:`pcamlib.evaluate.predict_probs`'s probabilities.
    The result supports fastai's own ``top_losses``, ``plot_top_losses``,
    ``confusion_matrix`` and ``plot_confusion_matrix``.

    Args:
        learn: A Learner built by :func:`pcamlib.train.build_learner`.
        data: The split to interpret (default: the learner's validation split).

    Returns:
        The interpretation (one prediction pass over the split).
    """
    if data is None:
        dl = learn.dls.valid.new(shuffle=False, drop_last=False)
    else:
        dl = split_dataloader(learn.dls, data)
    return ClassificationInterpretation.from_learner(learn, dl=dl)


def top_errors(interp: ClassificationInterpretation, k: int = 6) -> pd.DataFrame:
    """The ``k`` most confident false positives and false negatives (highest loss).

    Losses come from ``interp.top_losses()`` (cross-entropy of each patch). A patch is an
    error when its predicted probability of tumour, ``exp(-loss)`` for a tumour patch and
    ``1 - exp(-loss)`` for a normal one, is on the wrong side of 0.5 (class 1 where
    ``prob >= 0.5``, as in :mod:`pcamlib.metrics`).

    Args:
        interp: From :func:`interpretation`.
        k: Most errors of each kind.

    Returns:
        Columns ``kind`` (``false positive``/``false negative``), ``rank`` (1 = highest
        loss), ``split``, ``row`` (row of the split), ``label``, ``prob`` (of tumour) and
        ``loss``; false positives first, each kind by decreasing loss. Fewer than ``k``
        rows of a kind when the model made fewer such errors.

    Raises:
        ValueError: If ``k < 1``.
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise InputError(f"k must be a positive integer; got {k!r}")
    losses, idx = interp.top_losses()
    losses, idx = losses.float().cpu().numpy(), idx.cpu().numpy()
    items = interp.dl.items
    labels = items.labels[idx]
    p_true = np.exp(-losses.astype(np.float64))
    prob = np.where(labels == 1, p_true, 1.0 - p_true)
    predicted = (prob >= 0.5).astype(np.int64)
    parts = []
    for kind, label in (("false positive", 0), ("false negative", 1)):
        chosen = np.flatnonzero((labels == label) & (predicted != label))[:k]
        parts.append(pd.DataFrame({
            "kind": kind, "rank": np.arange(1, chosen.size + 1),
            "split": getattr(items.data, "split", ""), "row": items.rows[idx[chosen]],
            "label": labels[chosen], "prob": prob[chosen], "loss": losses[chosen],
        }))
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- Grad-CAM


OUTCOMES: dict[str, tuple[int, bool]] = {
    "true positive": (1, True),
    "false positive": (0, True),
    "false negative": (1, False),
    "true negative": (0, False),
}
"""Outcome name to (true label, predicted tumour)."""


def confident_examples(
    predictions: pd.DataFrame, *, split: str = "test", k: int = 2, variant: str = "plain",
    threshold: float = 0.5,
) -> pd.DataFrame:
    """The ``k`` most confident true/false positives/negatives of one model.

    Predicted tumour means ``prob >= threshold``. Positives are ranked by decreasing
    probability of tumour, negatives by increasing probability (ties by row), so a
    "most confident false negative" is the tumour patch the model found least tumorous.

    Args:
        predictions: One model's prediction table.
        split: Split to choose from.
        k: Most examples per outcome.
        variant: ``plain`` or ``tta`` probabilities.
        threshold: Decision threshold.

    Returns:
        Columns ``outcome``, ``rank`` (1 = most confident), ``row``, ``label``, ``prob``;
        outcomes in the order of :data:`OUTCOMES`, fewer than ``k`` rows of an outcome
        that has fewer patches.

    Raises:
        ValueError: On a bad prediction table, split or variant, ``k < 1`` or a threshold
            outside [0, 1].
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise InputError(f"k must be a positive integer; got {k!r}")
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be in [0, 1]; got {threshold}")
    rows, y, prob = _split_predictions(predictions, split, variant)
    if not np.isin(y, (0, 1)).all():
        raise InputError(f"predictions: label must hold 0 and 1 only; found {sorted(set(y))}")
    y = y.astype(np.int64)
    parts = []
    for outcome, (label, positive) in OUTCOMES.items():
        mask = (y == label) & ((prob >= threshold) == positive)
        order = np.lexsort((rows[mask], -prob[mask] if positive else prob[mask]))[:k]
        parts.append(pd.DataFrame({
            "outcome": outcome, "rank": np.arange(1, order.size + 1),
            "row": rows[mask][order], "label": y[mask][order], "prob": prob[mask][order],
        }))
    return pd.concat(parts, ignore_index=True)


def gradcam_target_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The layer whose activations Grad-CAM weighs, chosen from the model's structure.

    Grad-CAM (Selvaraju et al. 2017) needs the last feature map that still has spatial
    extent: the most class-specific one the head pools. In a fastai vision model
    (``Sequential(body, head)``) that is

    - ResNet: the last residual block (``layer4[-1]``, after its ReLU);
    - DenseNet: ``features.norm5``, the BatchNorm over the concatenated output of
      ``denseblock4`` and the last module of the body (fastai's head pools it directly).

    Both are 1/32 of the input, so 3x3 for a 96 px patch: each cell covers 32x32 px
    and the centre cell is exactly the label's centre box.

    Args:
        model: The Learner's model (or any module holding torchvision ResNet or DenseNet
            blocks).

    Returns:
        ``(qualified module name, module)``.

    Raises:
        ValueError: If the model has neither ResNet nor DenseNet blocks.
    """
    modules = dict(model.named_modules())
    dense = [name for name, m in modules.items() if isinstance(m, _DenseBlock)]
    if dense:
        parent = dense[-1].rpartition(".")[0]
        child, layer = list(modules[parent].named_children())[-1]
        return (f"{parent}.{child}" if parent else child), layer
    blocks = [name for name, m in modules.items() if isinstance(m, BasicBlock | Bottleneck)]
    if blocks:
        return blocks[-1], modules[blocks[-1]]
    raise InputError(
        f"model: expected a torchvision ResNet or DenseNet body to choose a Grad-CAM layer; "
        f"found neither in {type(model).__name__}; pass layer=(name, module)"
    )


def _check_rows(rows, data: PCamSplit) -> np.ndarray:
    arr = np.asarray(rows).reshape(-1)
    if arr.size == 0:
        raise InputError("rows is empty: expected at least one row")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"rows must be integer row numbers; got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= len(data):
        raise InputError(f"rows must be in 0..{len(data) - 1} for {data!r}; found "
                         f"{int(arr.min())}..{int(arr.max())}")
    return arr.astype(np.int64)


def gradcam_maps(
    learn: Learner, data: PCamSplit, rows, *, target_class: int | None = 1,
    layer: tuple[str, nn.Module] | None = None,
) -> np.ndarray:
    """Grad-CAM maps (``pytorch_grad_cam.GradCAM``) of chosen rows, at the patch's size.

    Patches go through the validation pipeline (:func:`pcamlib.data.split_dataloader`:
    normalisation, channels_last, the optional centre crop), so the model sees what it
    saw in evaluation. Each map is the library's: ReLU of the gradient-weighted sum of
    the layer's activations for the target logit, resized to the model input and scaled
    to [0, 1] per patch (all zeros where the layer holds no evidence for the class). With
    a centre crop the map covers the crop, placed in the middle of a zero 96x96 map: the
    model never saw the border.

    Args:
        learn: A Learner built by :func:`pcamlib.train.build_learner`.
        data: The split the rows belong to.
        rows: Row numbers of ``data``.
        target_class: Class whose logit is explained: 1 (tumour, the default: where the
            model sees tumour), 0 (normal) or None (each patch's predicted class).
        layer: ``(name, module)`` to use instead of :func:`gradcam_target_layer`'s.

    Returns:
        float32 array ``len(rows) x 96 x 96``.

    Raises:
        ValueError: On bad rows or target class, or a model without a known layer.
    """
    if target_class not in (0, 1, None):
        raise InputError(f"target_class must be 0, 1 or None; got {target_class!r}")
    rows = _check_rows(rows, data)
    _, module = layer or gradcam_target_layer(learn.model)
    model = learn.model
    was_training = model.training
    dl = split_dataloader(learn.dls, PCamRows(data, rows))
    height, width = IMAGE_SHAPE[:2]
    out = np.zeros((rows.size, height, width), dtype=np.float32)
    # Not used as a context manager: GradCAM.__exit__ swallows IndexErrors.
    cam = GradCAM(model=model, target_layers=[module])
    try:
        start = 0
        with torch.enable_grad():
            for xb, _ in dl:
                # An input that requires grad makes the layer's output require grad (so
                # the library can hook its gradient) even when the body is frozen.
                xb = xb.as_subclass(torch.Tensor).detach().requires_grad_(True)
                targets = None if target_class is None else \
                    [ClassifierOutputTarget(target_class)] * len(xb)
                maps = cam(input_tensor=xb, targets=targets)
                h, w = maps.shape[1:]
                top, left = (height - h) // 2, (width - w) // 2
                out[start:start + len(xb), top:top + h, left:left + w] = maps
                start += len(xb)
    finally:
        cam.activations_and_grads.release()
        model.train(was_training)
    return out


def centre_mass(maps: np.ndarray) -> np.ndarray:
    """Share of each map's total inside the centre 32x32 box (NaN for an all-zero map)."""
    top, left, bottom, right = CENTRE_BOX
    maps = np.asarray(maps, dtype=np.float64)
    total = maps.sum(axis=(1, 2))
    inside = maps[:, top:bottom, left:right].sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


@dataclass
class GradCamExamples:
    """Grad-CAM of a model's most confident true/false positives/negatives.

    Attributes:
        table: Which rows were shown: ``model``, ``outcome``, ``rank``, ``split``,
            ``row``, ``label``, ``prob``, ``target`` (class explained), ``layer``,
            ``input_size`` (model input side, px) and ``centre_mass`` (share of the map
            inside the centre box).
        images: The patches, ``N x 96 x 96 x 3`` uint8, in table order.
        maps: Their maps, ``N x 96 x 96`` in [0, 1], in table order.
    """

    table: pd.DataFrame
    images: np.ndarray
    maps: np.ndarray


def gradcam_examples(
    learn: Learner, data: PCamSplit, predictions: pd.DataFrame, *, model: str = "",
    k: int = 2, variant: str = "plain", target_class: int | None = 1,
    layer: tuple[str, nn.Module] | None = None,
) -> GradCamExamples:
    """Grad-CAM of the ``k`` most confident true/false positives/negatives of ``data``.

    Rows are chosen by :func:`confident_examples` from the learner's own predictions on
    ``data``'s split; maps come from :func:`gradcam_maps`.

    Args:
        learn: A Learner built by :func:`pcamlib.train.build_learner`.
        data: The split (its name selects the prediction rows).
        predictions: The same model's prediction table.
        model: Model name for the table (e.g. the architecture).
        k: Examples per outcome.
        variant: Probabilities used to choose the rows: ``plain`` or ``tta``.
        target_class: Class explained (see :func:`gradcam_maps`).
        layer: Layer override (see :func:`gradcam_maps`).

    Returns:
        The table, patches and maps.

    Raises:
        ValueError: On a bad prediction table or variant, or predictions whose labels
            differ from ``data``'s (predictions of other data).
    """
    table = confident_examples(predictions, split=data.split, k=k, variant=variant)
    rows = table["row"].to_numpy()
    _check_rows(rows, data)
    expected = data.labels[rows]
    if not np.array_equal(table["label"].to_numpy(), expected):
        bad = int(np.flatnonzero(table["label"].to_numpy() != expected)[0])
        raise InputError(
            f"predictions: label of {data.split} row {rows[bad]} is "
            f"{table['label'].iloc[bad]} but {data!r} has {expected[bad]}; predictions of "
            "other data?"
        )
    name, module = layer or gradcam_target_layer(learn.model)
    maps = gradcam_maps(learn, data, rows, target_class=target_class, layer=(name, module))
    crops = [f.size for f in learn.dls.valid.after_batch.fs if isinstance(f, CentreCrop)]
    input_size = min([IMAGE_SHAPE[0], *crops])
    target = "predicted" if target_class is None else CLASS_NAMES[target_class]
    table = table.assign(model=model, split=data.split, target=target, layer=name,
                         input_size=int(input_size), centre_mass=centre_mass(maps))
    columns = ["model", "outcome", "rank", "split", "row", "label", "prob", "target", "layer",
               "input_size", "centre_mass"]
    return GradCamExamples(table[columns], data.read_images(rows), maps)


# --------------------------------------------------------------------------- slides


def per_slide_table(
    predictions: Mapping[str, pd.DataFrame], meta: pd.DataFrame | None, *,
    split: str = "test", variant: str = "plain", threshold: float = 0.5,
) -> pd.DataFrame | None:
    """Per-slide patch counts, accuracy and AUC, when slide ids are known.

    Args:
        predictions: Model name to prediction table.
        meta: The split's meta table (``PCamSplit.meta()``), row ``r`` describing split
            row ``r``; slide ids in column ``wsi``. None or without ``wsi`` (imported
            data): no breakdown.
        split: Split to analyse (``meta`` must be that split's).
        variant: ``plain`` or ``tta``.
        threshold: Class 1 where ``prob >= threshold`` (for accuracy).

    Returns:
        None without slide ids; else columns ``model``, ``split``, ``variant``, ``wsi``,
        ``n``, ``positives``, ``accuracy`` and ``auc`` (NaN for a slide with one class),
        one row per model and slide, slides sorted by id.

    Raises:
        ValueError: On a bad prediction table, split or variant, or a meta table that
            does not match the predictions (too short, or other labels).
    """
    if meta is None or "wsi" not in meta.columns:
        return None
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be in [0, 1]; got {threshold}")
    parts = []
    for model, rows, y, prob in _per_model(predictions, split, variant):
        if rows.max() >= len(meta):
            raise InputError(
                f"meta has {len(meta)} rows but predictions of {model!r} reach {split} row "
                f"{rows.max()}: expected the meta table of split {split!r}"
            )
        part = meta.iloc[rows]
        if "center_tumor_patch" in meta.columns:
            found = part["center_tumor_patch"].astype(int).to_numpy()
            if not np.array_equal(found, y):
                raise InputError(
                    f"meta's center_tumor_patch disagrees with the labels of predictions of "
                    f"{model!r} on {int((found != y).sum())} rows: expected the meta table of "
                    f"split {split!r}"
                )
        frame = pd.DataFrame({"wsi": part["wsi"].astype(str).to_numpy(), "y": y,
                              "prob": prob, "correct": (prob >= threshold) == (y == 1)})
        for wsi, group in frame.groupby("wsi", sort=True):
            both = group["y"].nunique() == 2
            parts.append({
                "model": model, "split": split, "variant": variant, "wsi": wsi,
                "n": len(group), "positives": int(group["y"].sum()),
                "accuracy": float(group["correct"].mean()),
                "auc": float(roc_auc_score(group["y"], group["prob"])) if both else np.nan,
            })
    return pd.DataFrame(parts)
