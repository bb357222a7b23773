"""The study's fastai recipe as a resumable run: lr_find, then training.

A run lives in ``runs/<profile>/<arch>/`` (see :mod:`pcamlib.runs` for its files and
for how a run is matched to its settings). Re-running the same command after a kill
continues after the last finished epoch: nothing finished is lost or redone.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.schedule import minimum, slide, steep, valley
from fastai.learner import Learner

from pcamlib import distributed
from pcamlib.distributed import SINGLE, Processes, single_process_view, unwrap
from pcamlib.errors import StepError
from pcamlib.learner import (
    build_learner,
    check_arch,
    choose_pretrained,
    normalisation,
    optimizer_description,
    precision_for,
)
from pcamlib.profiles import Profile
from pcamlib.runs import (
    HISTORY_COLUMNS,
    LRFindResult,
    atomic_write_text,
    check_run,
    expected_identity,
    load_checkpoint,
    plain_optimizer_state,
    rank_rng_state,
    read_lr_find,
    restore_rng,
    rng_state,
    run_dir_for,
    save_checkpoint,
    set_aside,
    write_history,
    write_lr_find,
    write_params,
)


def _prepare(profile: Profile, arch: str, runs_root, progress: bool, device=None):
    check_arch(arch)
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
    return lr_find_with_learner(profile, arch, runs_root=runs_root, progress=progress,
                                device=device)[0]


def lr_find_with_learner(
    profile: Profile, arch: str, *, runs_root=None, progress: bool = True, device=None,
) -> tuple[LRFindResult, Learner]:
    """:func:`run_lr_find`, also returning the fastai Learner it ran on.

    The Learner's ``recorder`` holds the finder's curve, so ``learn.recorder.plot_lr_find()``
    draws fastai's own plot (its weights are back at their initial values).
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
        raise StepError(
            f"lr_find for {arch}: the {profile.lr_suggestion!r} suggestion could not be computed "
            f"from {len(lrs)} points (loss diverged early?); raise lr_find_iters or pick another"
        )
    if profile.lr_policy == "find":
        chosen = suggestions[profile.lr_suggestion]
    else:
        chosen = profile.lr_for(arch)
    result = LRFindResult(arch, lrs, losses, suggestions, chosen, profile.lr_policy)
    write_lr_find(run_dir, result)
    shutil.rmtree(run_dir / "models", ignore_errors=True)
    return result, learn


def chosen_lr(profile: Profile, arch: str, runs_root=None, progress: bool = True,
              procs: Processes = SINGLE, device=None) -> float:
    """The LR a run of ``arch`` uses: the profile's, or the LR finder's (run if needed).

    With several processes the LR finder runs once, in rank 0 alone and exactly as in
    one process (``bs`` is the global batch either way), while the other ranks wait and
    then read its ``lr_find.json``.
    """
    if profile.lr_policy == "fixed":
        return profile.lr_for(arch)
    found = read_lr_find(profile, arch, runs_root)
    needed = found is None or found.policy != "find"
    if needed and procs.is_main:
        with single_process_view() if procs.distributed else nullcontext():
            run_lr_find(profile, arch, runs_root=runs_root, progress=progress, device=device)
    procs.barrier()
    found = read_lr_find(profile, arch, runs_root)
    if found is None or found.policy != "find":
        raise StepError(f"lr_find for {arch}: rank 0 recorded no LR in "
                        f"{run_dir_for(profile, arch, runs_root) / 'lr_find.json'}")
    return found.chosen


@dataclass
class _Phase:
    name: str
    epochs: int
    first_epoch: int  # global index of the phase's first epoch


class _RunKeeper(Callback):
    """Records each finished epoch, keeps the best model, checkpoints, stops early.

    Early stopping follows fastai's ``EarlyStoppingCallback`` (``reset_on_fit=True``): its
    best valid loss and patience counter start afresh with every fit, i.e. every phase
    (frozen, then unfrozen). The model kept (``best.pth``) is the lowest valid loss over
    the whole run.
    """

    order = 80  # after the Recorder has the epoch's metrics

    def __init__(self, run_dir: Path, phase: _Phase, start_phase_epoch: int, state: dict,
                 patience: int, smooth_loss: dict | None = None, procs: Processes = SINGLE):
        self.run_dir, self.phase, self.start = run_dir, phase, start_phase_epoch
        self.state, self.patience = state, patience
        self.smooth_loss = smooth_loss
        self.procs = procs
        self.t0 = time.time()

    def before_fit(self):
        if self.start == 0:  # a new phase (not a resumed one): fastai's reset_on_fit
            self.state.update(phase_best_loss=float("inf"), wait=0)
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
        # Every rank keeps the same state (the metrics were gathered, see
        # GatheredValidation), so all stop together; only rank 0 writes.
        st, main = self.state, self.procs.is_main
        model = unwrap(self.learn.model)
        st["history"].append(row)
        if valid_loss < st["best_loss"]:
            st.update(best_loss=valid_loss, best_epoch=row["epoch"])
            if main:
                save_checkpoint(model.state_dict(), self.run_dir / "best.pth")
        if valid_loss < st["phase_best_loss"]:
            st.update(phase_best_loss=valid_loss, wait=0)
        else:
            st["wait"] += 1
        stop = self.patience > 0 and st["wait"] >= self.patience
        st["stopped_early"] = stop
        st["next"] = [self.phase.name, self.epoch + 1]
        rng = rng_state(self.learn.dls.train.rng)
        if self.procs.distributed:  # one entry per rank, gathered on rank 0
            rng = self.procs.gather_to_main(rng)
        if main:
            # Checkpoint first, history second: the checkpoint (which embeds the history)
            # is authoritative, so a kill between the two writes loses nothing.
            save_checkpoint(
                {"model": model.state_dict(),
                 "opt": plain_optimizer_state(self.learn.opt.state_dict()),
                 "rng": rng, "state": st,
                 "smooth_loss": {"val": self.recorder.smooth_loss.val.detach().cpu().clone(),
                                 "count": self.recorder.smooth_loss.count}},
                self.run_dir / "checkpoint.pth",
            )
            write_history(self.run_dir, st["history"])
        return_freed_memory()
        if stop:
            raise CancelFitException()


def return_freed_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``).

    Every training step allocates and frees batches and activations of a few MB. glibc
    serves them from its heap once its adaptive mmap threshold has grown, and the freed
    chunks fragment it: a process held ~1 MB more per step, 14 GB after 14 real-subset
    epochs of resnet18, although no tensor was kept. Trimming after each epoch keeps the
    process flat (measured: 1,041-1,045 MB over 4 epochs, against 1,384 -> 1,470 MB without).

    Returns:
        Whether the C library could trim (False off glibc: nothing to do there).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


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


def _phases(freeze_epochs: int, epochs: int) -> list[_Phase]:
    phases = []
    if freeze_epochs:
        phases.append(_Phase("frozen", freeze_epochs, 0))
    phases.append(_Phase("unfrozen" if freeze_epochs else "scratch", epochs, freeze_epochs))
    return phases


def recipe_record(profile: Profile, lr: float, phases: Sequence[_Phase]) -> dict:
    """What the optimiser and the schedules of a run are, for ``run.json`` and the report."""
    schedules = []
    for phase in phases:
        if phase.name == "frozen":
            lr_text = (f"one-cycle to {lr:g} (head only; body frozen except norm layers), "
                       "pct_start 0.99")
        elif phase.name == "unfrozen":
            lr_text = (f"one-cycle to {lr / 2 / profile.lr_mult:g}..{lr / 2:g} (discriminative "
                       "over layer groups), pct_start 0.3, div 5")
        else:
            lr_text = f"one-cycle to {lr:g}, pct_start 0.25, div 25"
        schedules.append({"phase": phase.name, "epochs": phase.epochs, "lr": lr_text})
    start, middle, end = profile.moms
    return {
        "optimizer": optimizer_description(profile),
        "momentum": (f"one-cycle cosine {start:g} -> {middle:g} -> {end:g} at every batch "
                     f"(profile field moms); {profile.mom:g} where no schedule runs (lr_find)"),
        "moms": list(profile.moms),
        "weight_decay": profile.wd,
        "batch_size": profile.bs,
        "phases": schedules,
        "early_stopping": (f"valid loss, patience {profile.patience}, reset at each phase "
                           "(fastai EarlyStoppingCallback)" if profile.patience else "off"),
        "model_kept": "lowest valid loss over the whole run (best.pth)",
    }


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
    or a single one-cycle ``fit_one_cycle(epochs, lr)`` from scratch; the momentum
    follows ``profile.moms`` and each phase has its own early stopping on valid loss
    after ``patience`` epochs without improvement.

    Launched by ``torchrun`` or ``accelerate launch`` with N processes, every process
    calls this with the same arguments: they join one process group
    (:func:`pcamlib.distributed.join`), each trains on its shard of every epoch with
    ``profile.bs / N`` rows per step (``bs`` is the global batch, the LR is not scaled),
    validation metrics are computed over all ranks' predictions, and rank 0 alone writes
    the run directory. Each rank's RNG states go into the checkpoint, so a killed
    multi-process run resumes as exactly as a one-process one; the process count is part
    of the run identity, so it resumes only with the same count.

    Args:
        profile: Parameters.
        arch: Architecture.
        runs_root: Root of run directories (default :data:`config.RUNS_DIR`).
        progress: Show progress bars and the epoch table (rank 0 only).
        restart: Set an existing run directory aside and start over.
        device: Training device (default: GPU when present; with several processes,
            this rank's GPU).
        extra_cbs: More fastai callbacks (tests use one to simulate a kill).

    Returns:
        The finished run (on every rank).

    Raises:
        RunMismatchError: the run directory holds a run made with other settings or
            data, or by another number of processes (nothing in it is touched).
        CheckpointError: its checkpoint is unreadable or holds pickled objects.
        InputError: ``profile.bs`` does not split evenly over the processes.
    """
    check_arch(arch)  # before anything is created or an LR is looked up
    procs, device = distributed.join(device)
    run_dir = run_dir_for(profile, arch, runs_root)
    if procs.is_main:
        if restart:
            set_aside(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    procs.barrier()  # the directory is in place before any rank reads it
    lr = chosen_lr(profile, arch, runs_root, progress, procs=procs, device=device)
    choice = choose_pretrained(arch, profile.pretrained)
    freeze_epochs = profile.freeze_epochs
    if freeze_epochs is None:
        freeze_epochs = 1 if choice.used else 0
    norm = normalisation(profile, choice.used)
    sync_bn = distributed.sync_batchnorm(procs, device)
    identity = expected_identity(profile, arch, lr, procs.identity(profile.bs, sync_bn))
    resolved = {"pretrained_used": choice.used, "normalisation": norm,
                "freeze_epochs": freeze_epochs, "precision": precision_for(profile, device)}
    check_run(run_dir, identity, resolved)
    phases = _phases(freeze_epochs, profile.epochs)

    ckpt_path = run_dir / "checkpoint.pth"
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    state = ckpt["state"] if ckpt else {
        "history": [], "best_loss": float("inf"), "best_epoch": -1, "wait": 0,
        "phase_best_loss": float("inf"), "stopped_early": False, "next": [phases[0].name, 0],
    }
    resumed_from = len(state["history"])
    procs.barrier()  # every rank has read params.json and the checkpoint: rank 0 may write
    if procs.is_main:
        write_params(run_dir, identity, resolved, profile)
        write_history(run_dir, state["history"])

    learn = build_learner(profile, arch, run_dir=run_dir, pretrained=choice, norm=norm,
                          device=device, progress=progress and procs.is_main, procs=procs)
    learn.create_opt()
    rank_seed = distributed.seed_rank(profile.seed, procs)
    names = [p.name for p in phases]
    next_phase, next_epoch = state["next"]
    start_index = names.index(next_phase)
    if next_epoch >= phases[start_index].epochs:  # the phase had finished
        start_index, next_epoch = start_index + 1, 0
    if ckpt:
        if next_epoch > 0:
            # Freezing or unfreezing clears the optimiser's momentum (fastai's freeze_to),
            # so a phase resumed mid-way is set up before its saved momentum is loaded.
            _set_trainable(learn, phases[start_index])
        learn.model.load_state_dict(ckpt["model"])
        learn.opt.load_state_dict(ckpt["opt"])
        restore_rng(learn.dls.train.rng,
                    rank_rng_state(ckpt["rng"], procs.rank, procs.world_size, ckpt_path))
    for index in range(start_index, len(phases)):
        if state["stopped_early"]:
            break
        phase = phases[index]
        start = next_epoch if index == start_index else 0
        smooth = ckpt.get("smooth_loss") if ckpt and index == start_index else None
        keeper = _RunKeeper(run_dir, phase, start, state, profile.patience, smooth, procs)
        cbs = [keeper, *extra_cbs]
        with distributed.distrib_ctx(learn, procs):
            _fit_phase(learn, phase, lr, profile, cbs, start)

    history = pd.DataFrame(state["history"], columns=HISTORY_COLUMNS)
    outcome = {
        "arch": arch, "complete": True, "epochs_run": len(history),
        "best_epoch": state["best_epoch"], "best_valid_loss": state["best_loss"],
        "stopped_early": state["stopped_early"], "pretrained": choice.used,
        "pretrained_message": choice.message, "lr": lr, "device": str(device),
        "precision": resolved["precision"], "resumed_from": resumed_from,
        "train_seconds": float(history["seconds"].sum()) if len(history) else 0.0,
        "recipe": recipe_record(profile, lr, phases),
        "processes": processes_record(profile, procs, sync_bn, procs.gather_to_main(
            {"rank": procs.rank, "device": str(device), "seed": rank_seed})),
    }
    if procs.is_main:
        atomic_write_text(run_dir / "run.json", json.dumps(outcome, indent=1))
    procs.barrier()  # when train returns, on any rank, run.json is there
    return TrainResult(
        arch=arch, run_dir=run_dir, history=history, best_epoch=state["best_epoch"],
        stopped_early=state["stopped_early"], pretrained=choice.used, lr=lr,
        seconds=outcome["train_seconds"], resumed_from=resumed_from,
    )


def processes_record(profile: Profile, procs: Processes, sync_bn: bool,
                     ranks: list | None) -> dict:
    """How many processes trained the run and what that means, for ``run.json``.

    Args:
        profile: Parameters.
        procs: The processes.
        sync_bn: Batch norm synchronised across ranks.
        ranks: Each rank's device and seed (rank 0's view; None on other ranks).
    """
    per_process = procs.check_batch(profile.bs)
    return {
        "world_size": procs.world_size, "backend": procs.backend, "launcher": procs.launcher,
        "batch_size": profile.bs, "batch_per_process": per_process,
        "batch_semantics": (f"global: bs={profile.bs} rows per optimiser step over all "
                            f"{procs.world_size} process(es), {per_process} per process; "
                            "an epoch's steps are one process's batches, split between "
                            "the processes"),
        "lr_scaling": distributed.LR_SCALING,
        "sync_batchnorm": sync_bn,
        "ranks": ranks,
        "writer": "rank 0 alone writes every file",
    }


def _set_trainable(learn: Learner, phase: _Phase) -> None:
    """Freeze the body for the frozen phase, unfreeze it for the unfrozen one."""
    if phase.name == "frozen":
        learn.freeze()
    elif phase.name == "unfrozen":
        learn.unfreeze()


def _fit_phase(learn: Learner, phase: _Phase, lr: float, profile: Profile, cbs, start: int):
    """One phase of fastai's ``fine_tune`` (frozen, unfrozen) or the from-scratch cycle.

    A phase resumed mid-way (``start > 0``) was already set up by :func:`train`.
    """
    moms = tuple(profile.moms)
    if start == 0:
        _set_trainable(learn, phase)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        if phase.name == "frozen":
            learn.fit_one_cycle(phase.epochs, slice(lr), pct_start=0.99, moms=moms, cbs=cbs,
                                start_epoch=start)
        elif phase.name == "unfrozen":
            base = lr / 2
            learn.fit_one_cycle(phase.epochs, slice(base / profile.lr_mult, base),
                                pct_start=0.3, div=5.0, moms=moms, cbs=cbs, start_epoch=start)
        else:
            learn.fit_one_cycle(phase.epochs, lr, moms=moms, cbs=cbs, start_epoch=start)
