"""Run directories: where a run lives, what identifies it, when it is complete, loading it.

A run of architecture ``arch`` under profile ``p`` lives in ``<runs_root>/<p.name>/<arch>/``:

- ``params.json``: the run's **identity** (every setting that changes what training
  computes, the learning rate it resolved to, and the content digests of the train and
  valid data), the values **resolved** when it started (ImageNet weights used or not,
  normalisation, frozen epochs, precision) and, for information, where the data was;
- ``history.csv``: one row per finished epoch;
- ``checkpoint.pth``: model, optimiser, RNG states and progress after the last finished
  epoch; ``best.pth``: weights of the epoch with the lowest valid loss (the model kept);
- ``lr_find.json``: the LR finder's curve and choice, when it ran;
- ``run.json``: the outcome (complete, best epoch, stopped early, what optimiser and
  schedules ran, times);
- after evaluation: ``predictions.csv``, ``metrics.csv`` and ``evaluation.json``.

This module alone decides whether a run matches a profile (:func:`expected_identity`,
:func:`check_run`): training checks before it resumes, evaluation before it loads weights
or reuses cached predictions. A run trained by several processes (see
:mod:`pcamlib.distributed`) has a ``distributed`` entry in its identity, so it resumes only
with the same process count; rank 0 alone writes its files, and its checkpoint holds the
RNG states of every rank. Every checkpoint is read with ``weights_only=True``, so a
tampered ``runs/`` folder cannot make pcamlib run code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pcamlib import config
from pcamlib.errors import InputError, MissingInputError
from pcamlib.pcam import PCamSplit, content_digest
from pcamlib.profiles import Profile

IDENTITY_VERSION = 2
"""Format of the identity in ``params.json`` (runs without one predate it)."""

IDENTITY_FIELDS: tuple[str, ...] = (
    "epochs", "freeze_epochs", "lr_mult", "bs", "wd", "moms", "optimizer", "patience",
    "seed", "pretrained", "augment", "label_smoothing", "mixup", "train_rows", "centre_crop",
    "mixed_precision", "compile",
)
"""Profile fields that change what training computes. The LR settings (``lr_policy``,
``lrs``, ``lr_suggestion``, ``lr_find_iters``) enter as the LR they resolve to, and ``mom``
only acts in ``lr_find``; the rest (``eval_splits``, ``tta``, ``tta_splits``, ``n_boot``,
``num_workers``, ``name``, ...) does not change the trained weights."""

HISTORY_COLUMNS = [
    "epoch", "phase", "phase_epoch", "train_loss", "valid_loss", "accuracy", "auc", "seconds",
]
"""Columns of ``history.csv``; ``epoch`` counts from 0 over all phases."""


class RunMismatchError(InputError):
    """A run directory holds a run made with other settings or other data.

    Attributes:
        differences: One ``"field: run X, requested Y"`` line per differing field.
    """

    def __init__(self, message: str, differences: Sequence[str] = ()):
        super().__init__(message)
        self.differences = list(differences)


class MissingRunError(MissingInputError):
    """No finished run exists where one is needed."""


class CheckpointError(InputError):
    """A checkpoint file is unreadable, or holds more than tensors and plain data."""


# --------------------------------------------------------------------------- files


def run_dir_for(profile: Profile, arch: str, runs_root: str | os.PathLike | None = None) -> Path:
    """``<runs_root>/<profile>/<arch>``; ``runs_root`` defaults to :data:`config.RUNS_DIR`."""
    return Path(runs_root or config.RUNS_DIR) / profile.name / arch


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plain_tensors(obj: Any) -> Any:
    """``obj`` with tensor subclasses (fastai's TensorBase, ...) turned into plain tensors.

    ``weights_only`` loading accepts plain tensors only; fastai's tensor types reach
    losses, gradients and so momentum buffers.
    """
    if isinstance(obj, torch.Tensor):
        return obj.as_subclass(torch.Tensor) if type(obj) is not torch.Tensor else obj
    if isinstance(obj, Mapping):
        return type(obj)((k, _plain_tensors(v)) for k, v in obj.items()) \
            if isinstance(obj, dict) else {k: _plain_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain_tensors(v) for v in obj)
    return obj


def save_checkpoint(obj: Any, path: Path) -> None:
    """``torch.save`` of tensors and plain data, through a temporary file.

    A kill mid-write keeps the old file; tensor subclasses are saved as plain tensors so
    that :func:`load_checkpoint` can read them without unpickling objects.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(_plain_tensors(obj), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location=None) -> Any:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only=True``).

    Raises:
        MissingRunError: when the file does not exist.
        CheckpointError: when it is unreadable or holds anything but tensors and plain
            data (a pickled object in it is refused and never runs).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingRunError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL [\w.]+|Unsupported operand \d+", str(err))
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects, not only tensors and plain "
            f"data, so loading it could run code (a tampered file, or one written by an "
            f"older pcamlib): {found.group(0) if found else 'not plain data'}. Delete it, "
            "or set the run aside with --restart."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {err}") from None


def set_aside(run_dir: Path) -> Path | None:
    """Rename an existing run directory to ``<arch>.replaced-<time>``; returns the new path."""
    if not run_dir.exists():
        return None
    target = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(target)
    return target


def write_history(run_dir: Path, rows: Sequence[dict]) -> None:
    """Write ``history.csv`` atomically."""
    tmp = run_dir / ".history.csv.tmp"
    pd.DataFrame(list(rows), columns=HISTORY_COLUMNS).to_csv(tmp, index=False)
    os.replace(tmp, run_dir / "history.csv")


def read_history(run_dir: str | os.PathLike) -> pd.DataFrame:
    """A run's ``history.csv`` (empty frame with the right columns when absent)."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    return pd.read_csv(path)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err}); delete the run or use --restart") \
            from None


# --------------------------------------------------------------------------- lr_find


@dataclass
class LRFindResult:
    """What the LR finder saw.

    Attributes:
        arch: Architecture.
        lrs: Learning rates tried.
        losses: Smoothed losses at those rates.
        suggestions: fastai's suggestions by name.
        chosen: The LR the run uses.
        policy: ``fixed`` (chosen = profile LR) or ``find`` (chosen = a suggestion).
    """

    arch: str
    lrs: list[float]
    losses: list[float]
    suggestions: dict[str, float]
    chosen: float
    policy: str

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return dict(self.__dict__)


def write_lr_find(run_dir: Path, result: LRFindResult) -> None:
    """Record the LR finder's result as ``lr_find.json``."""
    atomic_write_text(run_dir / "lr_find.json", json.dumps(result.to_dict(), indent=1))


def read_lr_find(profile: Profile, arch: str, runs_root=None) -> LRFindResult | None:
    """The recorded LR finder result of ``arch``, or None."""
    saved = _read_json(run_dir_for(profile, arch, runs_root) / "lr_find.json")
    return None if saved is None else LRFindResult(**saved)


def resolved_lr(profile: Profile, arch: str, runs_root=None) -> float | None:
    """The LR a run of ``arch`` uses: the profile's, or the LR finder's recorded choice.

    Returns None when the profile asks for ``lr_find`` and it has not run yet.
    """
    if profile.lr_policy == "fixed":
        return profile.lr_for(arch)
    found = read_lr_find(profile, arch, runs_root)
    return found.chosen if found is not None and found.policy == "find" else None


# --------------------------------------------------------------------------- identity


def data_identity(profile: Profile) -> dict:
    """Content digests of the data training sees: the train rows used, and valid."""
    return {
        "train": content_digest(PCamSplit(profile.data_dir, "train", rows=profile.train_rows)),
        "valid": content_digest(PCamSplit(profile.data_dir, "valid")),
    }


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples become lists, dataclasses dicts)."""
    return json.loads(json.dumps(value, default=lambda o: o.to_dict()))


def expected_identity(profile: Profile, arch: str, lr: float,
                      distributed: Mapping | None = None) -> dict:
    """The identity a run of ``arch`` under ``profile`` at learning rate ``lr`` must have.

    Args:
        profile: Parameters.
        arch: Architecture.
        lr: The learning rate the run resolved to.
        distributed: For a run trained by several processes, what that changes
            (:meth:`pcamlib.distributed.Processes.identity`: process count, rows per
            process, synchronised batch norm). One-process runs have no such entry, so
            one is never resumed as the other.
    """
    fields = profile.to_dict()
    identity = {"version": IDENTITY_VERSION, "arch": arch, "lr": float(lr)}
    identity.update({name: fields[name] for name in IDENTITY_FIELDS})
    identity["data"] = data_identity(profile)
    if distributed:
        identity["distributed"] = dict(distributed)
    return _plain(identity)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _identity_defaults() -> dict[str, Any]:
    """Flattened defaults of the identity's profile fields."""
    import dataclasses

    defaults = {}
    for f in dataclasses.fields(Profile):
        if f.name not in IDENTITY_FIELDS:
            continue
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        defaults.update(_flatten(_plain({f.name: value})))
    return defaults


def differences(recorded: Mapping, expected: Mapping) -> list[str]:
    """``"field: run X, requested Y"`` for every (dotted) field that differs.

    A setting added to pcamlib after a run was made is absent from its identity; it
    counts as that setting's default, which is what the run used.
    """
    old, new = _flatten(recorded), _flatten(expected)
    defaults = _identity_defaults()
    for key in new:
        if key not in old and key in defaults:
            old[key] = defaults[key]
    return [f"{key}: run {old.get(key, '(absent)')!r}, requested {new.get(key, '(absent)')!r}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def write_params(run_dir: Path, identity: dict, resolved: dict, profile: Profile) -> None:
    """Write ``params.json``: identity, resolved values, and where the data was."""
    params = {"identity": identity, "resolved": _plain(resolved), "profile": profile.name,
              "data_dir": str(Path(profile.data_dir).resolve())}
    atomic_write_text(run_dir / "params.json", json.dumps(params, indent=1))


def read_params(run_dir: Path) -> dict | None:
    """``params.json`` of a run directory, or None when there is none."""
    return _read_json(Path(run_dir) / "params.json")


def check_run(run_dir: Path, identity: dict, resolved: dict | None = None) -> dict | None:
    """Refuse a run directory whose run was made with other settings or data.

    Args:
        run_dir: The run directory.
        identity: What the run must be (:func:`expected_identity`).
        resolved: Also compare the values resolved at the start (training resumes only
            when ImageNet weights, normalisation and precision are the same as before).

    Returns:
        The directory's ``params.json``, or None when it holds no run yet.

    Raises:
        RunMismatchError: listing every differing field.
    """
    params = read_params(run_dir)
    if params is None:
        return None
    hint = ("Use another --runs-dir, the run's own settings, or --restart to set it aside "
            "and train again.")
    if "identity" not in params:
        raise RunMismatchError(
            f"{run_dir}: made by an older pcamlib that did not record a run identity, so it "
            f"cannot be matched to these settings. {hint}", ["identity: (absent)"])
    diffs = differences(params["identity"], identity)
    if resolved is not None:
        diffs += [f"resolved {d}" for d in differences(params.get("resolved", {}),
                                                       _plain(resolved))]
    if diffs:
        raise RunMismatchError(
            f"{run_dir} holds a run made with other settings or data ({'; '.join(diffs)}). "
            f"{hint}", diffs)
    return params


# --------------------------------------------------------------------------- finished runs


@dataclass(frozen=True)
class RunRecord:
    """A finished run that matches the requested settings.

    Attributes:
        run_dir: Its directory.
        params: ``params.json`` (identity, resolved values, data_dir).
        outcome: ``run.json``.
    """

    run_dir: Path
    params: dict
    outcome: dict

    @property
    def identity(self) -> dict:
        """Settings and data digests the run was made with."""
        return self.params["identity"]

    @property
    def resolved(self) -> dict:
        """ImageNet weights used, normalisation, frozen epochs and precision of the run."""
        return self.params["resolved"]

    @property
    def best_weights(self) -> Path:
        """``best.pth``: the weights kept."""
        return self.run_dir / "best.pth"


def finished_run(profile: Profile, arch: str, runs_root=None) -> RunRecord:
    """The finished run of ``arch`` that matches ``profile`` exactly.

    Raises:
        MissingRunError: no finished run (names the command that makes one).
        RunMismatchError: the run was made with other settings or data (lists them).
    """
    run_dir = run_dir_for(profile, arch, runs_root)
    outcome = _read_json(run_dir / "run.json")
    train_command = (f"pcamlib train --profile {profile.name} --archs {arch}"
                     + (f" --runs-dir {runs_root}" if runs_root else ""))
    if outcome is None or not outcome.get("complete") or not (run_dir / "best.pth").is_file():
        raise MissingRunError(
            f"{run_dir}: no finished run of {arch} (run.json or best.pth missing); train it "
            f"first with `{train_command}` (with the same --set/--data-dir options)")
    lr = resolved_lr(profile, arch, runs_root)
    if lr is None:
        raise MissingRunError(f"{run_dir}: lr_policy='find' but lr_find.json is missing; "
                              f"train it with `{train_command}`")
    # However many processes trained the run, its weights are evaluated alike: the
    # recorded process count is taken as it is (training checks it before resuming).
    recorded = (read_params(run_dir) or {}).get("identity", {})
    params = check_run(run_dir, expected_identity(profile, arch, lr,
                                                  recorded.get("distributed")))
    return RunRecord(run_dir, params, outcome)


def run_is_complete(profile: Profile, arch: str, runs_root=None) -> bool:
    """Whether ``arch`` has a finished run that matches ``profile`` (settings and data)."""
    try:
        finished_run(profile, arch, runs_root)
    except (MissingRunError, RunMismatchError):
        return False
    return True


def load_best_learner(profile: Profile, arch: str, *, runs_root=None, progress: bool = False,
                      device=None, procs=None):
    """Rebuild a finished run's Learner with its best weights loaded.

    Args:
        profile: Parameters.
        arch: Architecture.
        runs_root: Root of run directories.
        progress: Show progress bars.
        device: Device (default: GPU when present).
        procs: Processes sharing the evaluation (default: one); each rank's loaders read
            its shard (:func:`pcamlib.learner.build_learner`).

    Returns:
        ``(learner, record)``: the Learner on the profile's data, and the run's
        :class:`RunRecord`.

    Raises:
        MissingRunError, RunMismatchError: see :func:`finished_run`.
        CheckpointError: ``best.pth`` is unreadable or holds more than tensors.
    """
    from pcamlib.learner import PretrainedChoice, build_learner

    record = finished_run(profile, arch, runs_root)
    choice = PretrainedChoice(False, "", "weights loaded from best.pth")
    learn = build_learner(profile, arch, run_dir=record.run_dir, pretrained=choice,
                          norm=record.resolved["normalisation"], device=device,
                          progress=progress, **({"procs": procs} if procs else {}))
    learn.model.load_state_dict(load_checkpoint(record.best_weights,
                                                map_location=learn.dls.device))
    return learn, record


# --------------------------------------------------------------------------- RNG states


def _numpy_state_to_plain(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_from_plain(state: dict) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
            state["has_gauss"], state["cached_gaussian"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_plain(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def rng_state(train_rng: random.Random) -> dict:
    """Every RNG state a resumed run needs, as tensors and plain data (weights_only-safe)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _python_state_to_plain(random.getstate()),
        "train_dl": _python_state_to_plain(train_rng.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_rng_state(recorded: dict | list, rank: int, world_size: int, path: Path) -> dict:
    """Rank ``rank``'s RNG states out of a checkpoint's ``rng`` entry.

    A one-process checkpoint holds one :func:`rng_state` dict; a run of N processes holds
    a list of N, one per rank (rank 0 gathers them).

    Raises:
        CheckpointError: the checkpoint was written by another number of processes.
    """
    states = recorded if isinstance(recorded, list) else [recorded]
    if len(states) != world_size:
        raise CheckpointError(
            f"{path}: holds the RNG states of {len(states)} process(es), but {world_size} "
            "are resuming it; resume with the process count that started the run, or use "
            "--restart")
    return states[rank]


def restore_rng(train_rng: random.Random, state: dict) -> None:
    """Restore what :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    random.setstate(_python_state_from_plain(state["python"]))
    train_rng.setstate(_python_state_from_plain(state["train_dl"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain_optimizer_state(state: dict) -> dict:
    """A fastai optimiser ``state_dict`` without fastcore or numpy objects in it."""

    def plain(value):
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {"state": [plain(s) for s in state["state"]],
            "hypers": [plain(h) for h in state["hypers"]]}
