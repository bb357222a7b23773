"""The study's fastai recipe as a resumable run: learners, lr_find, training.

A run lives in ``runs/<profile>/<arch>/``:

- ``params.json``: every parameter that shapes the run (checked on resume);
- ``history.csv``: one row per finished epoch (losses, accuracy, AUC, seconds);
- ``checkpoint.pth``: model, optimiser and RNG states after the last finished epoch;
- ``best.pth``: weights of the epoch with the lowest valid loss (the model kept);
- ``lr_find.json``: the LR finder's curve and suggestions, when it ran;
- ``run.json``: outcome (complete, stopped early, best epoch, pretrained or not, time).

Re-running the same command after a kill continues after the last finished epoch:
nothing finished is lost or redone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import minimum, slide, steep, valley
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import RocAucBinary, accuracy
from fastai.optimizer import SGD, OptimWrapper
from fastai.torch_core import set_seed
from fastai.vision.learner import vision_learner

from pcamlib import config
from pcamlib.data import IMAGENET_STATS, default_device, pcam_dataloaders
from pcamlib.pcam import PCamSplit, channel_stats
from pcamlib.profiles import ARCHITECTURES, Profile

HISTORY_COLUMNS = [
    "epoch", "phase", "phase_epoch", "train_loss", "valid_loss", "accuracy", "auc", "seconds",
]
"""Columns of ``history.csv``; ``epoch`` counts from 0 over all phases."""

# Fields of a profile that do not change what a run computes (so may differ on resume).
_NON_RUN_FIELDS = {"archs", "eval_splits", "tta", "n_boot", "num_workers", "max_minutes_hint",
                   "name", "lr_find_iters", "lr_suggestion"}


class RunParameterError(ValueError):
    """A run directory holds a run made with other parameters."""


def run_dir_for(profile: Profile, arch: str, runs_root: str | os.PathLike | None = None) -> Path:
    """``<runs_root>/<profile>/<arch>``; ``runs_root`` defaults to :data:`config.RUNS_DIR`."""
    return Path(runs_root or config.RUNS_DIR) / profile.name / arch


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _weights_enum(arch: str):
    return torchvision.models.get_model_weights(arch).DEFAULT


def pretrained_weights_file(arch: str) -> Path:
    """Where torchvision looks for ``arch``'s ImageNet weights (the torch hub cache)."""
    url = _weights_enum(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class PretrainedChoice:
    """Whether a run starts from ImageNet weights, and why.

    Attributes:
        used: ImageNet weights were loaded.
        weights_file: Where they were looked for.
        message: A sentence for logs and the report.
    """

    used: bool
    weights_file: str
    message: str


def choose_pretrained(arch: str, mode: str) -> PretrainedChoice:
    """Decide on ImageNet weights without touching the network.

    Args:
        arch: Architecture name.
        mode: ``auto``, ``yes`` or ``no`` (see :class:`Profile`).

    Returns:
        The decision with a human-readable reason.

    Raises:
        FileNotFoundError: when ``mode='yes'`` and the weights are not in the cache.
    """
    path = pretrained_weights_file(arch)
    if mode == "no":
        return PretrainedChoice(False, str(path), f"{arch}: trained from scratch (pretrained='no')")
    if path.is_file():
        return PretrainedChoice(True, str(path), f"{arch}: ImageNet weights from {path}")
    message = (
        f"{arch}: ImageNet weights not found at {path} (no download is attempted); "
        "training from scratch. Put the torchvision weights file there to fine-tune."
    )
    if mode == "yes":
        raise FileNotFoundError(message.replace("training from scratch.", "pretrained='yes'."))
    warnings.warn(message, stacklevel=2)
    return PretrainedChoice(False, str(path), message)


def normalisation(profile: Profile, pretrained: bool) -> dict:
    """Normalisation statistics: ImageNet's with pretrained weights, else the train split's."""
    if pretrained:
        mean, std = IMAGENET_STATS
        return {"source": "imagenet", "mean": list(mean), "std": list(std)}
    stats = channel_stats(PCamSplit(profile.data_dir, "train", rows=profile.train_rows))
    return {"source": "train split", "mean": stats["mean"], "std": stats["std"]}


def _mixed_precision(profile: Profile, device: torch.device) -> str:
    if device.type != "cuda" or profile.mixed_precision == "no":
        return "fp32"
    if profile.mixed_precision in ("bf16", "fp16"):
        return profile.mixed_precision
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}"
        )


def optimizer_func(profile: Profile):
    """The fastai ``opt_func`` of the profile's SGD (see ``Profile.optimizer``)."""
    if profile.optimizer == "fastai":
        return partial(SGD, mom=profile.mom)
    return partial(OptimWrapper, opt=torch.optim.SGD, momentum=profile.mom,
                   weight_decay=profile.wd, foreach=True)


def build_learner(
    profile: Profile,
    arch: str,
    *,
    run_dir: Path,
    pretrained: PretrainedChoice,
    norm: dict,
    device: torch.device | None = None,
    progress: bool = True,
) -> Learner:
    """A fastai Learner for ``arch`` on the profile's data, set up per the study's recipe.

    SGD (momentum ``profile.mom``), weight decay ``profile.wd``, cross-entropy over two
    classes, accuracy and AUC metrics; channels_last (NHWC) memory layout on every device;
    bf16/fp16 mixed precision on CUDA only (CPU stays fp32).

    Args:
        profile: Parameters.
        arch: One of :data:`ARCHITECTURES`.
        run_dir: Where fastai may write temporary files (lr_find).
        pretrained: Whether to load ImageNet weights.
        norm: Normalisation statistics (see :func:`normalisation`).
        device: Training device (default: GPU when present).
        progress: Show progress bars.

    Returns:
        The Learner.
    """
    _check_arch(arch)
    device = device or default_device()
    set_seed(profile.seed, reproducible=True)
    dls = pcam_dataloaders(
        profile.data_dir, mean=norm["mean"], std=norm["std"], bs=profile.bs,
        augment=profile.augment, num_workers=profile.num_workers, device=device,
        seed=profile.seed, train_rows=profile.train_rows, centre_crop=profile.centre_crop,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        learn = vision_learner(
            dls, getattr(torchvision.models, arch), n_out=2, pretrained=pretrained.used,
            normalize=False, loss_func=CrossEntropyLossFlat(),
            opt_func=optimizer_func(profile), wd=profile.wd,
            metrics=[accuracy, RocAucBinary()], path=run_dir, model_dir="models",
        )
    # NHWC convolutions are faster on CUDA tensor cores and in oneDNN on a CPU too (the
    # batch pipeline already yields NHWC tensors, so the model should match).
    learn.model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        precision = _mixed_precision(profile, device)
        if precision == "bf16":
            learn.to_bf16()
        elif precision == "fp16":
            learn.to_fp16()
        if profile.compile:
            learn.model.compile()
    if not progress:
        learn.remove_cb(ProgressCallback)
        learn.logger = lambda *args, **kwargs: None
    return learn


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


def _prepare(profile: Profile, arch: str, runs_root, progress: bool, device=None):
    _check_arch(arch)
    run_dir = run_dir_for(profile, arch, runs_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    choice = choose_pretrained(arch, profile.pretrained)
    norm = normalisation(profile, choice.used)
    learn = build_learner(profile, arch, run_dir=run_dir, pretrained=choice, norm=norm,
                          device=device, progress=progress)
    return run_dir, choice, norm, learn


def run_lr_find(
    profile: Profile, arch: str, *, runs_root=None, progress: bool = True, device=None,
) -> LRFindResult:
    """Run fastai's ``lr_find`` for ``arch`` and record the curve and the chosen LR.

    With ``lr_policy='fixed'`` the chosen LR is the profile's (e.g. the study's 0.0057
    for DenseNet and 0.0012 for ResNet) and the finder is shown for comparison; with
    ``find`` it is the ``lr_suggestion`` suggestion. Writes ``lr_find.json`` in the run
    directory, which :func:`train` reads.
    """
    run_dir, choice, _, learn = _prepare(profile, arch, runs_root, progress, device)
    if choice.used and (profile.freeze_epochs is None or profile.freeze_epochs > 0):
        learn.freeze()
    num_it = profile.lr_find_iters
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        learn.lr_find(num_it=num_it, suggest_funcs=None, show_plot=False)
    lrs = [float(v) for v in learn.recorder.lrs]
    losses = [float(v) for v in learn.recorder.losses]
    # The same trimming fastai applies before suggesting; each suggestion is computed on
    # its own because some (slide) fail on short curves that stopped at divergence.
    trimmed_lrs = torch.tensor(lrs[num_it // 10:-5] or lrs)
    trimmed_losses = torch.tensor(losses[num_it // 10:-5] or losses)
    finite = torch.isfinite(trimmed_losses)
    trimmed_lrs, trimmed_losses = trimmed_lrs[finite], trimmed_losses[finite]
    suggestions: dict[str, float] = {}
    for func in (minimum, steep, valley, slide):
        try:
            suggestions[func.__name__] = float(func(trimmed_lrs, trimmed_losses, num_it)[0])
        except (IndexError, RuntimeError, ValueError):
            continue
    if profile.lr_policy == "find" and profile.lr_suggestion not in suggestions:
        raise RuntimeError(
            f"lr_find for {arch}: the {profile.lr_suggestion!r} suggestion could not be computed "
            f"from {len(lrs)} points (loss diverged early?); raise lr_find_iters or pick another"
        )
    if profile.lr_policy == "find":
        chosen = suggestions[profile.lr_suggestion]
    else:
        chosen = profile.lr_for(arch)
    result = LRFindResult(arch, lrs, losses, suggestions, chosen, profile.lr_policy)
    _atomic_write_text(run_dir / "lr_find.json", json.dumps(result.to_dict(), indent=1))
    shutil.rmtree(run_dir / "models", ignore_errors=True)
    return result


def read_lr_find(profile: Profile, arch: str, runs_root=None) -> LRFindResult | None:
    """The recorded LR finder result of ``arch``, or None."""
    path = run_dir_for(profile, arch, runs_root) / "lr_find.json"
    if not path.is_file():
        return None
    return LRFindResult(**json.loads(path.read_text()))


def chosen_lr(profile: Profile, arch: str, runs_root=None, progress: bool = True) -> float:
    """The LR a run of ``arch`` uses: the profile's, or the LR finder's (run if needed)."""
    if profile.lr_policy == "fixed":
        return profile.lr_for(arch)
    found = read_lr_find(profile, arch, runs_root)
    if found is None or found.policy != "find":
        found = run_lr_find(profile, arch, runs_root=runs_root, progress=progress)
    return found.chosen


def _rng_state(learn: Learner) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "train_dl": learn.dls.train.rng.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(learn: Learner, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    learn.dls.train.rng.setstate(state["train_dl"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Phase:
    name: str
    epochs: int
    first_epoch: int  # global index of the phase's first epoch


class _RunKeeper(Callback):
    """Records each finished epoch, keeps the best model, checkpoints, stops early."""

    order = 80  # after the Recorder has the epoch's metrics

    def __init__(self, run_dir: Path, phase: _Phase, start_phase_epoch: int, state: dict,
                 patience: int, smooth_loss: dict | None = None):
        self.run_dir, self.phase, self.start = run_dir, phase, start_phase_epoch
        self.state, self.patience = state, patience
        self.smooth_loss = smooth_loss
        self.t0 = time.time()

    def before_fit(self):
        # The Recorder resets its smoothed train loss at every fit; resuming mid-phase
        # continues it, so the resumed train_loss equals an uninterrupted run's.
        if self.start > 0 and self.smooth_loss is not None:
            self.recorder.smooth_loss.val = self.smooth_loss["val"].clone()
            self.recorder.smooth_loss.count = self.smooth_loss["count"]

    def before_epoch(self):
        self.t0 = time.time()

    def after_epoch(self):
        if self.epoch < self.start:  # fastai's SkipToEpoch still fires after_epoch
            return
        train_loss, valid_loss, acc, auc = (float(v) for v in self.recorder.values[-1])
        row = {
            "epoch": self.phase.first_epoch + self.epoch, "phase": self.phase.name,
            "phase_epoch": self.epoch, "train_loss": train_loss, "valid_loss": valid_loss,
            "accuracy": acc, "auc": auc, "seconds": round(time.time() - self.t0, 3),
        }
        st = self.state
        st["history"].append(row)
        if valid_loss < st["best_loss"]:
            st.update(best_loss=valid_loss, best_epoch=row["epoch"], wait=0)
            _atomic_torch_save(self.learn.model.state_dict(), self.run_dir / "best.pth")
        else:
            st["wait"] += 1
        stop = self.patience > 0 and st["wait"] >= self.patience
        st["stopped_early"] = stop
        st["next"] = (self.phase.name, self.epoch + 1)
        # Checkpoint first, history second: the checkpoint (which embeds the history) is
        # authoritative, so a kill between the two writes loses nothing.
        _atomic_torch_save(
            {"model": self.learn.model.state_dict(), "opt": self.learn.opt.state_dict(),
             "rng": _rng_state(self.learn), "state": st,
             "smooth_loss": {"val": self.recorder.smooth_loss.val.detach().cpu().clone(),
                             "count": self.recorder.smooth_loss.count}},
            self.run_dir / "checkpoint.pth",
        )
        write_history(self.run_dir, st["history"])
        if stop:
            raise CancelFitException()


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


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        arch: Architecture.
        run_dir: Run directory.
        history: One row per finished epoch.
        best_epoch: Epoch whose weights were kept.
        stopped_early: Early stopping ended the run.
        pretrained: ImageNet weights were used.
        lr: Learning rate.
        seconds: Training wall time summed over epochs (all sessions).
        resumed_from: Epochs already finished when this call started.
    """

    arch: str
    run_dir: Path
    history: pd.DataFrame
    best_epoch: int
    stopped_early: bool
    pretrained: bool
    lr: float
    seconds: float
    resumed_from: int


def _run_params(profile: Profile, arch: str, lr: float, choice: PretrainedChoice,
                norm: dict, freeze_epochs: int) -> dict:
    params = {k: v for k, v in profile.to_dict().items() if k not in _NON_RUN_FIELDS}
    params.update(arch=arch, lr=lr, pretrained_used=choice.used, normalisation=norm,
                  freeze_epochs=freeze_epochs, profile=profile.name)
    params["data_dir"] = str(Path(profile.data_dir).resolve())
    return json.loads(json.dumps(params))


def _check_params(run_dir: Path, params: dict) -> None:
    path = run_dir / "params.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    defaults = json.loads(json.dumps(
        {f.name: f.default for f in dataclasses.fields(Profile)
         if f.default is not dataclasses.MISSING}))
    # A field added to Profile after the run was made counts as its default then.
    diffs = [k for k in sorted(set(old) | set(params))
             if old.get(k, defaults.get(k)) != params.get(k)]
    if diffs:
        details = "; ".join(f"{k}: was {old.get(k)!r}, now {params.get(k)!r}" for k in diffs[:5])
        raise RunParameterError(
            f"{run_dir} holds a run made with other parameters ({details}). "
            "Use another runs directory, or restart=True (--restart) to set it aside."
        )


def _set_aside(run_dir: Path) -> None:
    if run_dir.exists():
        target = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(target)


def train(
    profile: Profile,
    arch: str,
    *,
    runs_root: str | os.PathLike | None = None,
    progress: bool = True,
    restart: bool = False,
    device: torch.device | str | None = None,
    extra_cbs: Sequence[Callback] = (),
) -> TrainResult:
    """Train ``arch`` per the profile, resuming a killed run, and keep the best model.

    The recipe is fastai's ``fine_tune`` with pretrained weights (frozen body for
    ``freeze_epochs``, then unfrozen with discriminative LRs ``lr/2/lr_mult .. lr/2``),
    or a single one-cycle ``fit_one_cycle(epochs, lr)`` from scratch; in both cases up
    to ``epochs`` epochs with early stopping on valid loss after ``patience`` epochs
    without improvement.

    Args:
        profile: Parameters.
        arch: Architecture.
        runs_root: Root of run directories (default :data:`config.RUNS_DIR`).
        progress: Show progress bars and the epoch table.
        restart: Set an existing run directory aside and start over.
        device: Training device (default: GPU when present).
        extra_cbs: More fastai callbacks (tests use one to simulate a kill).

    Returns:
        The finished run.
    """
    _check_arch(arch)  # before anything is created or an LR is looked up
    device = torch.device(device) if device is not None else default_device()
    run_dir = run_dir_for(profile, arch, runs_root)
    if restart:
        _set_aside(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lr = chosen_lr(profile, arch, runs_root, progress)
    choice = choose_pretrained(arch, profile.pretrained)
    freeze_epochs = profile.freeze_epochs
    if freeze_epochs is None:
        freeze_epochs = 1 if choice.used else 0
    norm = normalisation(profile, choice.used)
    params = _run_params(profile, arch, lr, choice, norm, freeze_epochs)
    _check_params(run_dir, params)
    _atomic_write_text(run_dir / "params.json", json.dumps(params, indent=1))

    phases = []
    if freeze_epochs:
        phases.append(_Phase("frozen", freeze_epochs, 0))
    phases.append(_Phase("unfrozen" if freeze_epochs else "scratch", profile.epochs, freeze_epochs))

    ckpt_path = run_dir / "checkpoint.pth"
    ckpt = torch.load(ckpt_path, weights_only=False) if ckpt_path.is_file() else None
    state = ckpt["state"] if ckpt else {
        "history": [], "best_loss": float("inf"), "best_epoch": -1, "wait": 0,
        "stopped_early": False, "next": (phases[0].name, 0),
    }
    resumed_from = len(state["history"])
    write_history(run_dir, state["history"])

    learn = build_learner(profile, arch, run_dir=run_dir, pretrained=choice, norm=norm,
                          device=device, progress=progress)
    learn.create_opt()
    if ckpt:
        learn.model.load_state_dict(ckpt["model"])
        learn.opt.load_state_dict(ckpt["opt"])
        _restore_rng(learn, ckpt["rng"])

    names = [p.name for p in phases]
    next_phase, next_epoch = state["next"]
    start_index = names.index(next_phase)
    if next_epoch >= phases[start_index].epochs:  # the phase had finished
        start_index, next_epoch = start_index + 1, 0
    for index in range(start_index, len(phases)):
        if state["stopped_early"]:
            break
        phase = phases[index]
        start = next_epoch if index == start_index else 0
        smooth = ckpt.get("smooth_loss") if ckpt and index == start_index else None
        keeper = _RunKeeper(run_dir, phase, start, state, profile.patience, smooth)
        cbs = [keeper, *extra_cbs]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            if phase.name == "frozen":
                learn.freeze()
                learn.fit_one_cycle(phase.epochs, slice(lr), pct_start=0.99, cbs=cbs,
                                    start_epoch=start)
            elif phase.name == "unfrozen":
                learn.unfreeze()
                base = lr / 2
                learn.fit_one_cycle(phase.epochs, slice(base / profile.lr_mult, base),
                                    pct_start=0.3, div=5.0, cbs=cbs, start_epoch=start)
            else:
                learn.fit_one_cycle(phase.epochs, lr, cbs=cbs, start_epoch=start)

    history = pd.DataFrame(state["history"], columns=HISTORY_COLUMNS)
    outcome = {
        "arch": arch, "complete": True, "epochs_run": len(history),
        "best_epoch": state["best_epoch"], "best_valid_loss": state["best_loss"],
        "stopped_early": state["stopped_early"], "pretrained": choice.used,
        "pretrained_message": choice.message, "lr": lr, "device": str(device),
        "precision": _mixed_precision(profile, device), "resumed_from": resumed_from,
        "train_seconds": float(history["seconds"].sum()) if len(history) else 0.0,
    }
    _atomic_write_text(run_dir / "run.json", json.dumps(outcome, indent=1))
    return TrainResult(
        arch=arch, run_dir=run_dir, history=history, best_epoch=state["best_epoch"],
        stopped_early=state["stopped_early"], pretrained=choice.used, lr=lr,
        seconds=outcome["train_seconds"], resumed_from=resumed_from,
    )


def run_is_complete(profile: Profile, arch: str, runs_root=None) -> bool:
    """Whether ``arch`` has a finished run under this profile's parameters."""
    run_dir = run_dir_for(profile, arch, runs_root)
    path = run_dir / "run.json"
    return path.is_file() and json.loads(path.read_text()).get("complete", False)


def load_best_learner(profile: Profile, arch: str, *, runs_root=None, progress: bool = False,
                      device=None) -> tuple[Learner, dict]:
    """Rebuild a finished run's Learner with its best weights loaded.

    Returns:
        The Learner and the run's ``params.json``.
    """
    run_dir = run_dir_for(profile, arch, runs_root)
    params_path, best = run_dir / "params.json", run_dir / "best.pth"
    if not params_path.is_file() or not best.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no finished run (missing params.json or best.pth); train {arch} first"
        )
    params = json.loads(params_path.read_text())
    choice = PretrainedChoice(False, "", "weights loaded from best.pth")
    learn = build_learner(profile, arch, run_dir=run_dir, pretrained=choice,
                          norm=params["normalisation"], device=device, progress=progress)
    learn.model.load_state_dict(torch.load(best, map_location=learn.dls.device))
    return learn, params
