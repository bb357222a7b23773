"""Use a trained model outside ``runs/``: export it, load it, predict patches.

A finished run (``runs/<profile>/<arch>/``) is exported into a self-contained *model
folder*:

- ``model.safetensors``: the weights (the run's ``best.pth`` state_dict); loading them
  never unpickles anything;
- ``model.json``: what is needed to use them (architecture, input size, centre crop,
  normalisation, class names, threshold), where they come from (versions, data, source
  run, metrics) and the file's own format version;
- ``model.onnx`` (optional): the whole patch classifier as one ONNX graph, uint8 patches
  in, class probabilities out, checked against PyTorch with onnxruntime at export.

:func:`load_model` rebuilds the network with fastai's ``create_vision_model`` (exactly
the body and head a Learner trains, without a Learner or a dataset) and
:meth:`PatchClassifier.predict` runs the evaluation pipeline
(:func:`pcamlib.data.batch_pipeline` with ``train=False``; TTA averages the softmax over
the 8 dihedral views like :func:`pcamlib.evaluate.predict_probs`). :func:`predict_to_csv`
predicts image files, image folders, PCam-format HDF5 files or directories, batched,
into one CSV written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import os
import platform
import queue
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from pcamlib.data import batch_pipeline, check_centre_crop, dihedral
from pcamlib.errors import InputError, MissingInputError, OutputExistsError
from pcamlib.importer import IMAGE_SUFFIXES, SkippedFile, _BadImage, _decode
from pcamlib.pcam import IMAGE_SHAPE, SPLITS, file_name

MODEL_FORMAT = "pcamlib-model"
"""Value of ``format`` in ``model.json``."""

MODEL_FORMAT_VERSION = 1
"""Version of the model folder layout this pcamlib writes and reads."""

MODEL_JSON = "model.json"
"""The model folder's description file."""

WEIGHTS_FILE = "model.safetensors"
"""The model folder's weights file."""

ONNX_FILE = "model.onnx"
"""The model folder's optional ONNX graph."""

CLASS_NAMES: tuple[str, str] = ("normal", "tumour")
"""Class names by output index (label 1 = tumour in the centre 32x32)."""

ONNX_TOLERANCE = 1e-4
"""Largest allowed |ONNX - PyTorch| probability difference at export."""

ONNX_OPSET = 18
"""ONNX opset of the exported graph."""

PREDICTION_COLUMNS: tuple[str, ...] = ("path", "row", "prob_tumour", "pred")
"""Columns of the CSV :func:`predict_to_csv` writes."""

DEFAULT_BATCH_SIZE = 128
"""Patches per forward pass when predicting."""


class RunDirError(MissingInputError):
    """A run directory lacks a file that export needs (the message names the command)."""


class ModelFileNotFoundError(MissingInputError):
    """A model folder, or a file it must hold, does not exist."""


class ModelFormatError(InputError):
    """A model folder's file is not what this pcamlib writes and reads."""


class PredictInputError(InputError):
    """An input to predict is not a 96x96 RGB image, a PCam HDF5 file or a folder of them."""


# ------------------------------------------------------------------------ run directories


@dataclass(frozen=True)
class RunFiles:
    """What export needs from a finished run directory.

    Attributes:
        run_dir: The run directory.
        arch: torchvision architecture name.
        normalisation: ``{"source", "mean", "std"}`` ([0, 1] units) used in training.
        centre_crop: Centre crop fed to the model (None: the whole 96x96 patch).
        state_dict: The best weights, loaded without unpickling arbitrary objects.
        data: Data the run was trained on (``data_dir``, ``train_rows``, ``identity``
            when the run recorded one).
        training: Outcome facts (best epoch, pretrained, epochs run, LR, profile...).
        metrics: Evaluation metrics rows (``metrics.csv``), or None before
            ``pcamlib evaluate``.
    """

    run_dir: Path
    arch: str
    normalisation: dict
    centre_crop: int | None
    state_dict: dict[str, torch.Tensor]
    data: dict
    training: dict
    metrics: list[dict] | None


def _read_json(path: Path, error: type[Exception], what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err}); expected {what}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object ({what}), found {type(value).__name__}")
    return value


def _read_run_dir(run_dir: str | os.PathLike) -> RunFiles:
    """Read everything export needs from a finished run directory.

    The layout and the identity of a run belong to :mod:`pcamlib.runs`; this reads
    through it and checks that the run finished.

    Raises:
        RunDirError: a missing directory or file, naming it and the command that makes it.
        InputError: a file that does not hold what training writes.
    """
    from pcamlib import runs

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(
            f"{run_dir}: run directory not found (expected runs/<profile>/<arch>, made by "
            "`pcamlib train`)"
        )
    params_path, outcome_path, best_path = (run_dir / "params.json", run_dir / "run.json",
                                            run_dir / "best.pth")
    if not params_path.is_file():
        raise RunDirError(
            f"{params_path}: not found; `pcamlib train --profile PROFILE --archs ARCH` writes "
            "it (is this a run directory, runs/<profile>/<arch>?)"
        )
    params = runs.read_params(run_dir)
    if "identity" not in params or "resolved" not in params:
        raise InputError(
            f"{params_path}: no run identity (found keys {sorted(params)}); it was written by "
            "an older pcamlib: train the run again with this version"
        )
    identity, resolved = params["identity"], params["resolved"]
    if not outcome_path.is_file():
        raise RunDirError(
            f"{outcome_path}: not found: the run has not finished; rerun the same "
            "`pcamlib train` command (it resumes) and export when it is done"
        )
    outcome = _read_json(outcome_path, InputError, "the run's outcome")
    if outcome.get("complete") is not True:
        raise InputError(
            f"{outcome_path}: complete is {outcome.get('complete')!r}, expected true: finish "
            "the run with `pcamlib train` before exporting"
        )
    if not best_path.is_file():
        raise RunDirError(
            f"{best_path}: not found; `pcamlib train` writes the best epoch's weights there"
        )
    for key, where in (("arch", identity), ("normalisation", resolved)):
        if key not in where:
            raise InputError(f"{params_path}: no {key!r} entry (found {sorted(where)})")
    norm = resolved["normalisation"]
    _check_stats(norm, params_path)
    state_dict = runs.load_checkpoint(best_path, map_location="cpu")
    if not isinstance(state_dict, dict) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise InputError(f"{best_path}: expected a state_dict (name -> tensor), found "
                         f"{type(state_dict).__name__}")
    metrics_path = run_dir / "metrics.csv"
    metrics = None
    if metrics_path.is_file():
        table = pd.read_csv(metrics_path)
        columns = [c for c in ("split", "variant", "metric", "value", "ci_low", "ci_high")
                   if c in table.columns]
        metrics = json.loads(table[columns].to_json(orient="records"))
    data = {"data_dir": params.get("data_dir"), "train_rows": identity.get("train_rows"),
            "identity": identity.get("data")}
    training = {"profile": params.get("profile"), "best_epoch": outcome.get("best_epoch"),
                "epochs_run": outcome.get("epochs_run"), "pretrained": outcome.get("pretrained"),
                "lr": outcome.get("lr"), "device": outcome.get("device"),
                "precision": outcome.get("precision")}
    return RunFiles(run_dir=run_dir, arch=str(identity["arch"]),
                    normalisation={"source": norm.get("source"),
                                   "mean": [float(v) for v in norm["mean"]],
                                   "std": [float(v) for v in norm["std"]]},
                    centre_crop=identity.get("centre_crop"), state_dict=state_dict, data=data,
                    training=training, metrics=metrics)


def _check_stats(norm, where: Path) -> None:
    ok = isinstance(norm, dict) and all(
        isinstance(norm.get(k), list) and len(norm[k]) == 3
        and all(isinstance(v, int | float) for v in norm[k]) for k in ("mean", "std"))
    if not ok or any(v <= 0 for v in norm["std"]):
        raise InputError(
            f"{where}: normalisation must hold 'mean' and 'std', 3 numbers each (std > 0); "
            f"found {norm!r}"
        )


# ------------------------------------------------------------------------------ model


def build_model(arch: str) -> torch.nn.Module:
    """The network a Learner of ``arch`` trains, with random weights, in NHWC layout.

    Built by fastai's ``create_vision_model`` (torchvision body, fastai head, two
    outputs), as ``vision_learner`` builds it, so its state_dict keys are those of a
    run's ``best.pth``.

    Raises:
        ModelFormatError: ``arch`` is not a torchvision model builder.
    """
    import torchvision
    from fastai.vision.learner import create_vision_model

    builder = getattr(torchvision.models, arch, None) if isinstance(arch, str) else None
    if not callable(builder) or arch.startswith("_"):
        raise ModelFormatError(
            f"architecture {arch!r} is not a torchvision model (expected e.g. resnet18, "
            "densenet121)"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        model = create_vision_model(builder, n_out=len(CLASS_NAMES), pretrained=False)
    # The training layout: oneDNN and CUDA both run NHWC convolutions faster.
    return model.to(memory_format=torch.channels_last).eval()


def _load_weights(model: torch.nn.Module, state_dict: dict, source: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k, found, want = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: {found}, expected {want})")
        raise ModelFormatError(
            f"{source}: weights do not fit the architecture: {'; '.join(parts)}"
        )
    model.load_state_dict(state_dict)


@dataclass(frozen=True)
class ModelSpec:
    """The validated content of a model folder's ``model.json``.

    Attributes:
        architecture: torchvision architecture name.
        mean: Normalisation mean per RGB channel, [0, 1] units.
        std: Normalisation std per RGB channel, [0, 1] units.
        centre_crop: Centre crop fed to the network (None: the whole 96x96 patch).
        class_names: Class names by output index.
        threshold: ``prob_tumour >= threshold`` predicts tumour.
        raw: The whole JSON object (provenance, metrics, versions).
    """

    architecture: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    centre_crop: int | None
    class_names: tuple[str, ...]
    threshold: float
    raw: dict = field(repr=False, compare=False)


def read_model_spec(model_dir: str | os.PathLike) -> ModelSpec:
    """Read and validate ``model_dir/model.json``.

    Raises:
        ModelFileNotFoundError: the folder or ``model.json`` is missing.
        ModelFormatError: not a pcamlib model description, an unknown format version,
            or a missing or malformed entry; the message names the file, what was
            expected and what was found.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFileNotFoundError(
            f"{model_dir}: model folder not found (`pcamlib export RUN_DIR --out "
            f"{model_dir}` makes one)"
        )
    path = model_dir / MODEL_JSON
    if not path.is_file():
        raise ModelFileNotFoundError(
            f"{path}: not found; a model folder holds {MODEL_JSON} and {WEIGHTS_FILE}, "
            "written by `pcamlib export`"
        )
    raw = _read_json(path, ModelFormatError, "a pcamlib model description")
    if raw.get("format") != MODEL_FORMAT:
        raise ModelFormatError(
            f"{path}: format is {raw.get('format')!r}, expected {MODEL_FORMAT!r} (not a "
            "pcamlib model description)"
        )
    version = raw.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        newer = isinstance(version, int) and version > MODEL_FORMAT_VERSION
        raise ModelFormatError(
            f"{path}: format_version is {version!r}; this pcamlib reads format version "
            f"{MODEL_FORMAT_VERSION} only (exported by {'a newer' if newer else 'another'} "
            "pcamlib? upgrade pcamlib, or export the run again with this one)"
        )

    def need(key: str, kind, what: str):
        value = raw.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ModelFormatError(f"{path}: {key!r} must be {what}; found {value!r}")
        return value

    arch = need("architecture", str, "a torchvision architecture name")
    norm = need("normalisation", dict, "an object with mean and std")
    try:
        _check_stats(norm, path)
    except ValueError as err:
        raise ModelFormatError(str(err)) from None
    crop = raw.get("centre_crop")
    try:
        check_centre_crop(crop)
    except ValueError as err:
        raise ModelFormatError(f"{path}: {err}") from None
    image = need("input", dict, "an object describing the input patches")
    want_input = {"height": IMAGE_SHAPE[0], "width": IMAGE_SHAPE[1],
                  "channels": IMAGE_SHAPE[2]}
    found_input = {k: image.get(k) for k in want_input}
    if found_input != want_input:
        raise ModelFormatError(
            f"{path}: input must be {want_input} (96x96 RGB patches); found {found_input}"
        )
    names = need("class_names", list, f"a list of {len(CLASS_NAMES)} class names")
    if len(names) != len(CLASS_NAMES):
        raise ModelFormatError(
            f"{path}: class_names must list {len(CLASS_NAMES)} classes (the network has "
            f"{len(CLASS_NAMES)} outputs); found {names!r}"
        )
    threshold = need("threshold", int | float, "a number in (0, 1)")
    if not 0 < threshold < 1:
        raise ModelFormatError(f"{path}: threshold must be in (0, 1); found {threshold!r}")
    weights = need("weights", dict, f"an object naming {WEIGHTS_FILE} and its sha256")
    if weights.get("file") != WEIGHTS_FILE or not isinstance(weights.get("sha256"), str):
        raise ModelFormatError(
            f"{path}: weights must be {{'file': {WEIGHTS_FILE!r}, 'sha256': ...}}; "
            f"found {weights!r}"
        )
    return ModelSpec(architecture=arch, mean=tuple(float(v) for v in norm["mean"]),
                     std=tuple(float(v) for v in norm["std"]), centre_crop=crop,
                     class_names=tuple(str(n) for n in names), threshold=float(threshold),
                     raw=raw)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


class PatchClassifier:
    """A loaded model: the network plus the evaluation pipeline of its run.

    Args:
        spec: The model description.
        model: The network with its weights (any device).
        model_dir: The model folder it was loaded from, if any.
    """

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, model_dir: Path | None = None):
        self.spec = spec
        self.model_dir = model_dir
        self.model = model.eval()
        self.device = next(model.parameters()).device
        # The deterministic pipeline evaluation uses: to float NHWC, normalise, crop.
        self.pipeline = batch_pipeline(spec.mean, spec.std, train=False, augment=None,
                                       channels_last=True, centre_crop=spec.centre_crop)

    @property
    def threshold(self) -> float:
        """Decision threshold on the tumour probability."""
        return self.spec.threshold

    def to_device(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Move a uint8 N x 96 x 96 x 3 batch to the model's device (pinned on CUDA)."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise InputError(
                f"images must be a uint8 N x 96 x 96 x 3 batch; got {tuple(x.shape)} {x.dtype}"
            )
        if self.device.type == "cuda" and x.device.type == "cpu":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def predict(self, images: np.ndarray | torch.Tensor, *, tta: bool = False) -> np.ndarray:
        """Tumour probability of every patch of a uint8 N x 96 x 96 x 3 RGB batch.

        Args:
            images: The batch (numpy or torch, any device).
            tta: Average the softmax over the 8 dihedral views of each patch.

        Returns:
            ``N`` float64 probabilities of class 1 (tumour).
        """
        from fastai.torch_core import TensorImage

        x = self.to_device(images)
        views = range(8) if tta else range(1)
        with torch.inference_mode():
            xb = torch.Tensor(self.pipeline(TensorImage(x)))
            probs = torch.stack(
                [torch.softmax(self.model(dihedral(xb, k)).float(), dim=1)[:, 1]
                 for k in views]
            ).mean(0)
        return probs.cpu().numpy().astype(np.float64)


def load_model(model_dir: str | os.PathLike, *, device: torch.device | str | None = None,
               ) -> PatchClassifier:
    """Load a model folder written by :func:`export_model`, without unpickling anything.

    Args:
        model_dir: The model folder.
        device: Where the network runs (default: the first GPU when present, else CPU).

    Returns:
        The classifier.

    Raises:
        ModelFileNotFoundError: the folder, ``model.json`` or the weights are missing.
        ModelFormatError: see :func:`read_model_spec`; also weights that do not match
            their checksum or the architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pcamlib.data import default_device

    model_dir = Path(model_dir)
    spec = read_model_spec(model_dir)
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelFileNotFoundError(
            f"{weights_path}: not found; {model_dir / MODEL_JSON} names it as the weights file "
            "(copy the whole model folder, or export again)"
        )
    expected_sha = spec.raw["weights"]["sha256"]
    found_sha = _sha256(weights_path)
    if found_sha != expected_sha:
        raise ModelFormatError(
            f"{weights_path}: sha256 is {found_sha}, but {MODEL_JSON} expects {expected_sha} "
            "(weights changed or truncated after export)"
        )
    try:
        state_dict = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFormatError(
            f"{weights_path}: not a readable safetensors file: {err}"
        ) from None
    model = build_model(spec.architecture)
    _load_weights(model, state_dict, weights_path)
    device = torch.device(device) if device is not None else default_device()
    return PatchClassifier(spec, model.to(device), model_dir)


# ----------------------------------------------------------------------------- export


class _ProbabilityGraph(torch.nn.Module):
    """uint8 N x 96 x 96 x 3 RGB patches in, softmax probabilities N x 2 out (for ONNX).

    The same arithmetic as the evaluation pipeline (divide by 255, normalise, centre
    crop) followed by the network and a softmax, so an ONNX user needs nothing else.
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        crop = spec.centre_crop or IMAGE_SHAPE[0]
        self.top = (IMAGE_SHAPE[0] - crop) // 2
        self.size = crop

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean) / self.std
        x = x[..., self.top:self.top + self.size, self.top:self.top + self.size]
        return torch.softmax(self.model(x), dim=1)


def _onnx_check_batch(n: int = 16, seed: int = 0) -> np.ndarray:
    """Patches for the ONNX check: noise plus smooth H&E-like colours, both extremes."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (n // 2, *IMAGE_SHAPE), dtype=np.uint8)
    base = rng.integers(120, 240, (n - n // 2, 1, 1, 3))
    ramp = np.linspace(-60, 10, IMAGE_SHAPE[0])[None, :, None, None]
    smooth = np.clip(base + ramp + rng.normal(0, 8, (n - n // 2, *IMAGE_SHAPE)), 0, 255)
    return np.concatenate([noise, smooth.astype(np.uint8)])


def _export_onnx(model: torch.nn.Module, spec: ModelSpec, path: Path) -> dict:
    """Write the ONNX graph and check it against PyTorch; return its JSON entry."""
    import onnxruntime

    graph = _ProbabilityGraph(model.cpu().float().eval(), spec).eval()
    example = torch.from_numpy(_onnx_check_batch(4))
    # The exporter prints its progress on stdout and warns about fastai's layers; the
    # check below is what tells whether the graph is right.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (example,), str(path), input_names=["images"],
            output_names=["probabilities"], opset_version=ONNX_OPSET, dynamo=True,
            external_data=False,
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = _onnx_check_batch()
    onnx_probs = session.run(None, {"images": check})[0]
    with torch.inference_mode():
        torch_probs = graph(torch.from_numpy(check)).numpy()
    max_diff = float(np.abs(onnx_probs - torch_probs).max())
    if not max_diff <= ONNX_TOLERANCE:
        raise ModelFormatError(
            f"{path}: ONNX probabilities differ from PyTorch by up to {max_diff:.2e}, expected "
            f"at most {ONNX_TOLERANCE:.0e} (onnxruntime {onnxruntime.__version__}); not "
            "exported"
        )
    return {"file": ONNX_FILE, "sha256": _sha256(path), "opset": ONNX_OPSET,
            "input": {"name": "images", "dtype": "uint8", "shape": ["N", *IMAGE_SHAPE],
                      "layout": "NHWC", "channel_order": "RGB"},
            "output": {"name": "probabilities", "dtype": "float32", "shape": ["N", 2]},
            "checked_patches": len(check), "max_abs_diff_vs_torch": max_diff,
            "onnxruntime": onnxruntime.__version__}


def _versions() -> dict:
    import fastai
    import safetensors
    import torchvision

    import pcamlib

    return {"pcamlib": pcamlib.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "fastai": fastai.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def scratch_beside(target: Path) -> Path:
    """A new empty folder beside ``target`` (same file system, so renaming is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    scratch.mkdir()
    return scratch


def check_output_folder(path: Path, overwrite: bool, what: str) -> None:
    """Refuse to replace an existing non-empty folder unless ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path}: exists and is not a folder; expected a folder for {what}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{path}: folder exists and is not empty; choose another --out or pass "
            "--overwrite to replace it"
        )


def move_into_place(scratch: Path, target: Path) -> None:
    """Rename the finished ``scratch`` folder to ``target``, replacing an old one."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    scratch.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class ExportResult:
    """Outcome of :func:`export_model`.

    Attributes:
        model_dir: The model folder written.
        spec: Its validated description.
        onnx_max_abs_diff: Largest ONNX - PyTorch probability difference (None: no ONNX).
        notes: Things the user should know (e.g. no metrics yet).
    """

    model_dir: Path
    spec: ModelSpec
    onnx_max_abs_diff: float | None
    notes: list[str]

    def summary(self) -> str:
        """Human-readable report."""
        spec = self.spec
        lines = [f"exported {spec.raw['source_run']} -> {self.model_dir}",
                 f"  {spec.architecture}, centre crop {spec.centre_crop or 'none'}, "
                 f"normalisation {spec.raw['normalisation'].get('source')}, "
                 f"threshold {spec.threshold}"]
        if self.onnx_max_abs_diff is not None:
            lines.append(f"  {ONNX_FILE}: max |onnxruntime - torch| = "
                         f"{self.onnx_max_abs_diff:.2e} (<= {ONNX_TOLERANCE:.0e})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def export_model(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, onnx: bool = False,
    threshold: float = 0.5, overwrite: bool = False,
) -> ExportResult:
    """Export a finished run into a self-contained model folder.

    The folder is built beside ``out_dir`` and renamed into place only when complete
    (and, with ``onnx``, checked), so an interrupted or failed export leaves nothing
    behind and never half-replaces an existing folder.

    Args:
        run_dir: ``runs/<profile>/<arch>`` of a finished run.
        out_dir: The model folder to write.
        onnx: Also write ``model.onnx``, checked with onnxruntime against PyTorch
            (probabilities within :data:`ONNX_TOLERANCE`).
        threshold: Decision threshold on the tumour probability recorded in the model
            (evaluation's confusion matrices use 0.5).
        overwrite: Replace an existing non-empty ``out_dir``.

    Returns:
        What was written.

    Raises:
        RunDirError: the run directory or one of its files is missing.
        ModelFormatError: the weights do not fit the architecture, or the ONNX check failed.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
        ValueError: a bad threshold or malformed run files.
    """
    from safetensors.torch import save_file

    if not 0 < threshold < 1:
        raise InputError(f"threshold must be in (0, 1); got {threshold}")
    out_dir = Path(out_dir)
    run = _read_run_dir(run_dir)
    check_output_folder(out_dir, overwrite, "the model")
    model = build_model(run.arch)
    _load_weights(model, run.state_dict, run.run_dir / "best.pth")
    notes = []
    if run.metrics is None:
        notes.append(f"{run.run_dir / 'metrics.csv'} not found: no metrics recorded "
                     "(run `pcamlib evaluate` first to include them)")
    scratch = scratch_beside(out_dir)
    try:
        weights_path = scratch / WEIGHTS_FILE
        # safetensors stores plain contiguous tensors; NHWC conv weights are made
        # contiguous here and become NHWC again when loaded into an NHWC model.
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(weights_path), metadata={"format": MODEL_FORMAT,
                                               "architecture": run.arch})
        description = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "architecture": run.arch,
            "input": {"height": IMAGE_SHAPE[0], "width": IMAGE_SHAPE[1],
                      "channels": IMAGE_SHAPE[2], "channel_order": "RGB", "dtype": "uint8",
                      "label_region": "centre 32x32"},
            "centre_crop": run.centre_crop,
            "normalisation": {**run.normalisation,
                              "applied_as": "(pixel / 255 - mean) / std per RGB channel"},
            "class_names": list(CLASS_NAMES),
            "positive_class": CLASS_NAMES.index("tumour"),
            "threshold": float(threshold),
            "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(weights_path),
                        "tensors": len(run.state_dict)},
            "onnx": None,
            "versions": _versions(),
            "data": run.data,
            "training": run.training,
            "metrics": run.metrics,
            "source_run": str(run.run_dir.resolve()),
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        spec_json = scratch / MODEL_JSON
        spec_json.write_text(json.dumps(description, indent=1))
        onnx_diff = None
        if onnx:
            spec = read_model_spec(scratch)
            description["onnx"] = _export_onnx(model, spec, scratch / ONNX_FILE)
            onnx_diff = description["onnx"]["max_abs_diff_vs_torch"]
            spec_json.write_text(json.dumps(description, indent=1))
        spec = read_model_spec(scratch)
        move_into_place(scratch, out_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return ExportResult(out_dir, spec, onnx_diff, notes)


# ---------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ImageInput:
    """One image file to predict.

    Attributes:
        path: The file.
        text: The path as written in the CSV (as given, or folder as given + found name).
    """

    path: Path
    text: str


@dataclass(frozen=True)
class HDF5Input:
    """One PCam-format ``_x.h5`` file (every row is predicted).

    Attributes:
        path: The file.
        text: The path as written in the CSV.
        rows: Number of rows.
    """

    path: Path
    text: str
    rows: int


def _open_images_h5(path: Path) -> int:
    """Rows of a PCam-format image file; raise :class:`PredictInputError` otherwise."""
    try:
        with h5py.File(path, "r") as fh:
            if "x" not in fh:
                raise PredictInputError(
                    f"{path}: no dataset 'x'; expected a PCam image file (dataset 'x' of "
                    f"shape (N, 96, 96, 3) uint8); found {sorted(fh.keys())}"
                )
            x = fh["x"]
            if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE or x.dtype != np.uint8:
                raise PredictInputError(
                    f"{path}: dataset 'x' is {x.shape} {x.dtype}; expected (N, 96, 96, 3) uint8"
                )
            return len(x)
    except OSError as err:
        raise PredictInputError(
            f"{path}: not a readable HDF5 file (expected a PCam _x.h5 file): {err}"
        ) from None


def _image_files(folder: Path) -> Iterator[Path]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted by path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return iter(sorted(found))


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[ImageInput | HDF5Input]:
    """Resolve command-line inputs into image files and HDF5 files, in a fixed order.

    Each input is an image file (``.jpg``, ``.jpeg``, ``.png``, ``.tif``, ``.tiff``), a
    PCam-format ``_x.h5`` file, a PCam-format directory (its ``*_x.h5`` files, splits in
    train/valid/test order) or any other folder, searched recursively for image files
    (e.g. a Kaggle ``train/`` folder or ``{split}/{0,1}/`` image folders), sorted by path.

    Raises:
        FileNotFoundError: an input does not exist.
        PredictInputError: an input of another kind, a bad HDF5 file, or a folder
            without images.
    """
    if not inputs:
        raise PredictInputError("no inputs given: name image files, folders or _x.h5 files")
    sources: list[ImageInput | HDF5Input] = []
    for given in inputs:
        text = os.fspath(given)
        path = Path(text)
        if not path.exists():
            raise MissingInputError(
                f"{text}: input not found (expected an image file, a folder, a PCam-format "
                "directory or an _x.h5 file)"
            )
        if path.is_file():
            if path.name.lower().endswith(IMAGE_SUFFIXES):
                sources.append(ImageInput(path, text))
            elif path.suffix.lower() == ".h5":
                sources.append(HDF5Input(path, text, _open_images_h5(path)))
            else:
                raise PredictInputError(
                    f"{text}: not a supported input: expected an image file "
                    f"({', '.join(IMAGE_SUFFIXES)}) or a PCam _x.h5 file; found a "
                    f"{path.suffix or 'suffix-less'} file"
                )
            continue
        official = [path / file_name(s, "x") for s in SPLITS]
        h5_files = [p for p in official if p.is_file()]
        h5_files += sorted(p for p in path.glob("*_x.h5") if p not in official)
        if h5_files:
            sources += [HDF5Input(p, os.path.join(text, p.name), _open_images_h5(p))
                        for p in h5_files]
            continue
        images = [ImageInput(p, os.path.join(text, os.path.relpath(p, path)))
                  for p in _image_files(path)]
        if not images:
            raise PredictInputError(
                f"{text}: folder holds no images ({', '.join(IMAGE_SUFFIXES)}, searched "
                "recursively) and no PCam _x.h5 files"
            )
        sources += images
    return sources


@dataclass
class _Batch:
    """Patches read for one forward pass and where they came from."""

    paths: list[str]
    rows: list[int | None]
    images: np.ndarray


def _batches(sources: Sequence[ImageInput | HDF5Input], batch_size: int, skip_bad: bool,
             skipped: list[SkippedFile]) -> Iterator[_Batch]:
    """Read ``sources`` in order as batches of ``batch_size`` patches."""
    paths: list[str] = []
    rows: list[int | None] = []
    buffer = np.empty((batch_size, *IMAGE_SHAPE), dtype=np.uint8)

    def flush() -> _Batch:
        nonlocal paths, rows, buffer
        batch = _Batch(paths, rows, buffer[:len(paths)])
        paths, rows = [], []
        buffer = np.empty((batch_size, *IMAGE_SHAPE), dtype=np.uint8)
        return batch

    for source in sources:
        if isinstance(source, ImageInput):
            try:
                # The importer's decoder: predict accepts exactly the images import accepts.
                buffer[len(paths)] = _decode(source.path)
            except _BadImage as err:
                reason = str(err)
                if "expected" not in reason:
                    reason += "; expected a 96x96 RGB image (JPEG, PNG or TIFF)"
                if not skip_bad:
                    raise PredictInputError(
                        f"{source.text}: {reason} (--skip-bad / skip_bad=True leaves bad "
                        "images out and lists them)"
                    ) from None
                skipped.append(SkippedFile(source.path, reason))
                continue
            paths.append(source.text)
            rows.append(None)
            if len(paths) == batch_size:
                yield flush()
            continue
        with h5py.File(source.path, "r") as fh:
            x = fh["x"]
            start = 0
            while start < source.rows:
                n = min(batch_size - len(paths), source.rows - start)
                x.read_direct(buffer, np.s_[start:start + n], np.s_[len(paths):len(paths) + n])
                paths += [source.text] * n
                rows += range(start, start + n)
                start += n
                if len(paths) == batch_size:
                    yield flush()
    if paths:
        yield flush()


_DONE = object()


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead.

    Decoding (PIL, h5py, TIFF tiles) releases the GIL, so the next batch is read while
    the model works on this one. An exception in the reader is raised here; leaving the
    loop early stops the reader.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put((None, err))

    reader = threading.Thread(target=work, name="pcamlib-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            item, err = slots.get()
            if err is not None:
                raise err
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        reader.join(timeout=10)


@dataclass
class PredictResult:
    """Outcome of :func:`predict_to_csv`.

    Attributes:
        out: The CSV written.
        rows: Patches predicted.
        positives: Patches with ``pred == 1``.
        skipped: Bad images left out (only with ``skip_bad``).
        seconds: Wall time.
    """

    out: Path
    rows: int
    positives: int
    skipped: list[SkippedFile]
    seconds: float

    def summary(self) -> str:
        """Human-readable report: counts, then every skipped file."""
        lines = [f"predicted {self.rows:,} patches ({self.positives:,} tumour) -> {self.out} "
                 f"in {self.seconds:.1f} s"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped):,} bad images:")
            lines += [f"  {s}" for s in self.skipped]
        return "\n".join(lines)


def _format_prob(value: float) -> str:
    return repr(float(value))  # shortest text that reads back as the same float


def predict_to_csv(
    model: PatchClassifier | str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    tta: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    skip_bad: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> PredictResult:
    """Predict every patch of ``inputs`` into a CSV ``path,row,prob_tumour,pred``.

    ``path`` is the input as given (for a folder: the folder as given joined with the
    file found in it, or the ``_x.h5`` file found in it); ``row`` is the HDF5 row (empty
    for image files); ``pred`` is 1 when ``prob_tumour >= threshold`` of the model. The
    CSV is written to a temporary file beside ``out`` and renamed at the end, so an
    interrupted or failed run leaves no partial CSV (and an older ``out`` untouched).

    Args:
        model: A loaded classifier or a model folder.
        inputs: Image files, folders, PCam-format directories or ``_x.h5`` files
            (see :func:`collect_inputs`).
        out: The CSV to write.
        tta: Average over the 8 dihedral views (8 forward passes per patch).
        batch_size: Patches per forward pass.
        skip_bad: Leave unreadable or non-96x96-RGB images out and list them, instead of
            failing on the first.
        progress: Show a progress bar.
        device: Device when ``model`` is a folder (default: GPU when present).
        on_batch: Called with the size of each predicted batch (benchmarks use it).

    Returns:
        Counts, skipped files and time.

    Raises:
        PredictInputError: a bad input (see :func:`collect_inputs`) or, without
            ``skip_bad``, a bad image, naming the file, what was expected and found.
        FileNotFoundError: an input or the model folder does not exist.
        ModelFormatError: see :func:`load_model`.
    """
    import time

    from tqdm import tqdm

    t0 = time.perf_counter()
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}")
    out = Path(out)
    classifier = model if isinstance(model, PatchClassifier) else load_model(model, device=device)
    sources = collect_inputs(inputs)
    total = sum(s.rows if isinstance(s, HDF5Input) else 1 for s in sources)
    skipped: list[SkippedFile] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    rows_written = positives = 0
    try:
        with partial.open("w", newline="") as fh, tqdm(
                total=total, desc="predict", unit="patch", disable=not progress) as bar:
            writer = csv.writer(fh)
            writer.writerow(PREDICTION_COLUMNS)
            for batch in prefetch(_batches(sources, batch_size, skip_bad, skipped)):
                probs = classifier.predict(batch.images, tta=tta)
                preds = probs >= classifier.threshold
                writer.writerows(
                    (path, "" if row is None else row, _format_prob(p), int(y))
                    for path, row, p, y in zip(batch.paths, batch.rows, probs, preds,
                                               strict=True))
                rows_written += len(probs)
                positives += int(preds.sum())
                bar.update(len(probs))
                if on_batch is not None:
                    on_batch(len(probs))
            bar.update(total - bar.n)  # skipped images count as done
        if rows_written == 0:
            raise PredictInputError(
                f"no patch could be predicted: all {len(skipped):,} images were bad "
                f"(first: {skipped[0] if skipped else 'none'})"
            )
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return PredictResult(out, rows_written, positives, skipped, time.perf_counter() - t0)
