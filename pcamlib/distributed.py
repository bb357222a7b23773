"""Several processes, one run: fastai's Accelerate integration with PCam loaders sharded by rank.

``torchrun --nproc_per_node N -m pcamlib train ...`` and ``accelerate launch --multi_gpu
--num_processes N -m pcamlib train ...`` (``evaluate`` too) start N copies of the command;
the launcher sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. :func:`join` turns those
into a process group through Accelerate (NCCL between GPUs, gloo on CPUs), and
:func:`distrib_ctx` is fastai's ``Learner.distrib_ctx`` for pcamlib's loaders:

- the model is wrapped by fastai's ``DistributedTrainer`` (``Accelerator.prepare``, i.e.
  ``DistributedDataParallel``; ``SyncBatchNorm`` on GPUs only, it needs CUDA);
- loaders are not wrapped in fastai's ``DistributedDL`` (its index broadcast calls
  ``.cuda()``, and it would bypass the PCam loader's whole-batch reads, workers and
  transfer ring): every :class:`~pcamlib.data.PCamDataLoader` is built for its rank and
  reads its own shard (see :meth:`PCamDataLoader.batch_numbers`);
- validation metrics are computed once per epoch over the predictions of all ranks
  (:class:`GatheredValidation`), batch by batch in one process's order, so they are the
  numbers one process gets from the same weights.

Batch size ``bs`` is the **global** batch: each of N processes trains on ``bs / N`` rows
per step, every optimiser step sees the same ``bs`` rows a one-process run would, and
the learning rate is used as it is (no scaling). Only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.distributed import DistributedTrainer
from fastai.torch_core import set_seed, to_detach

from pcamlib.errors import InputError, StepError

LR_SCALING = ("none: bs is the global batch (rows per optimiser step over all processes), so "
              "the LR applies to the same batch as in one process; raising bs to fill more "
              "devices calls for a new LR (the linear rule lr * new_bs / old_bs is the usual "
              "starting point), which the profile's lrs field sets")
"""The learning-rate scaling rule of multi-process runs (``run.json`` and the README)."""


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the processes of one run.

    Attributes:
        rank: This process's rank (0 writes every file).
        world_size: Number of processes (1: not distributed).
        local_rank: Rank on this machine (picks the GPU).
        backend: ``torch.distributed`` backend (``gloo``, ``nccl``), None in one process.
        launcher: ``torchrun``, ``accelerate launch`` or ``none``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    launcher: str = "none"

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (nothing in one process)."""
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather_to_main(self, value: Any) -> list | None:
        """Every rank's ``value`` (picklable), in rank order, on rank 0; None elsewhere."""
        if not self.distributed:
            return [value]
        out = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(value, out, dst=0)
        return out

    def check_batch(self, bs: int) -> int:
        """The per-process batch of global batch ``bs``.

        Raises:
            InputError: ``bs`` does not split evenly over the processes.
        """
        if bs % self.world_size:
            raise InputError(
                f"bs={bs} is the global batch (rows per optimiser step over all processes) "
                f"and must split evenly over the {self.world_size} processes; got "
                f"{bs / self.world_size:g} rows per process. Use a bs divisible by "
                f"{self.world_size}, or another process count")
        return bs // self.world_size

    def identity(self, bs: int, sync_batchnorm: bool) -> dict | None:
        """What a run of these processes adds to the run identity (None in one process).

        A one-process run's identity has no such entry, as before multi-process runs
        existed. With N processes every step still sees the global batch ``bs``, but
        batch-norm statistics come from ``bs / N`` rows (unless synchronised) and each
        process draws its own augmentation: a different computation, so a run of one
        count of processes is never resumed with another.
        """
        if not self.distributed:
            return None
        return {"world_size": self.world_size, "batch_per_process": self.check_batch(bs),
                "sync_batchnorm": sync_batchnorm}


SINGLE = Processes()
"""One process."""


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``; 1 when not launched by one)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _launcher() -> str:
    # accelerate launch exports its settings (ACCELERATE_MIXED_PRECISION, ...) to the
    # processes it starts; torchrun exports only the torch.distributed variables.
    return "accelerate launch" if any(k.startswith("ACCELERATE_") for k in os.environ) \
        else "torchrun"


def join(device: torch.device | str | None = None) -> tuple[Processes, torch.device]:
    """Join the process group a launcher set up; in one process, nothing happens.

    Accelerate initialises ``torch.distributed``: NCCL between GPUs, gloo on CPUs. With
    more processes on a machine than GPUs (a measurement, bench/gpu.sh) the backend is
    gloo, because NCCL refuses two ranks on one GPU.

    Args:
        device: The device asked for (None: a GPU when present, else the CPU).

    Returns:
        ``(processes, device)``: the device is this rank's (``cuda:<local rank>``).
    """
    from pcamlib.data import default_device

    device = torch.device(device) if device is not None else default_device()
    if launched_world_size() <= 1:
        return SINGLE, device
    from accelerate import PartialState

    cpu = device.type != "cuda"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", launched_world_size()))
    backend = None
    if not cpu and local_world > torch.cuda.device_count():
        backend = "gloo"
    state = PartialState(cpu=cpu, **({"backend": backend} if backend else {}))
    procs = Processes(rank=state.process_index, world_size=state.num_processes,
                      local_rank=state.local_process_index, backend=state.backend,
                      launcher=_launcher())
    # Accelerate names the CPU "cpu:0"; tensors saved from there are tagged so, and
    # torch.load cannot map that tag back. One CPU device is "cpu".
    return procs, torch.device("cpu") if state.device.type == "cpu" else state.device


def finish() -> None:
    """Leave the process group (at the end of a command)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextmanager
def single_process_view() -> Iterator[None]:
    """Hide the launcher's variables from fastai while one rank works alone.

    fastai decides whether to gather losses and wait at barriers from ``WORLD_SIZE`` and
    ``RANK``; a step that rank 0 runs alone (the LR finder) would wait forever for ranks
    that are not there.
    """
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ["WORLD_SIZE"], os.environ["RANK"] = "1", "0"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s global RNGs (augmentation, MixUp).

    Rank 0 keeps the run's seed; the others derive theirs from (seed, rank), so ranks do
    not draw the same augmentation for their different rows.
    """
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_rank(seed: int, procs: Processes) -> int:
    """Seed this rank's global RNGs with :func:`rank_seed`; returns the seed."""
    value = rank_seed(seed, procs.rank)
    if procs.distributed:
        set_seed(value, reproducible=True)
    return value


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (the model itself otherwise)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics).

    DDP broadcasts them at the start of each training step, so after the last step each
    rank holds rank 0's statistics updated by its own last batch; rank 0's are the ones
    saved, so they are the ones to validate.
    """
    for buffer in unwrap(model).buffers():
        torch.distributed.broadcast(buffer, src=0)


def _gather_rows(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's ``local`` rows, concatenated in rank order (row counts may differ)."""
    world = torch.distributed.get_world_size()
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    counts = [int(c) for c in counts]
    # all_gather needs one shape on every rank: pad to the longest, cut after.
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def gather_batches(batches: Sequence[torch.Tensor], numbers: Sequence[int], total: int,
                   device: torch.device) -> list[torch.Tensor]:
    """Batches spread over the ranks, gathered on every rank in epoch order.

    No row is added or doubled: a rank may hold fewer batches than another (or none),
    and every batch comes back exactly as its rank computed it (the transport pads each
    rank's rows to the longest and cuts the padding off again, by count).

    Args:
        batches: This rank's batches (first dimension: rows).
        numbers: Their numbers in the epoch (one process's batch order).
        total: Batches in the epoch over all ranks.
        device: Where the collectives run (the rank's device; NCCL needs CUDA tensors).

    Returns:
        ``total`` tensors, batch 0 first.

    Raises:
        StepError: the ranks' batches do not tile the epoch (a batch twice or never).
    """
    rank = torch.distributed.get_rank()
    if len(batches) != len(numbers):
        raise StepError(f"rank {rank} produced {len(batches)} batches but its shard of the "
                        f"epoch has {len(numbers)}")
    every_number = _all_objects(list(numbers))
    if sorted(every_number) != list(range(total)):
        raise StepError(f"the ranks' batches {sorted(every_number)} do not cover the epoch's "
                        f"{total} batches exactly once each")
    if total == 0:
        return []
    # A rank without batches still sends zero rows of the others' dtype and row shape.
    kinds = _all_objects([(str(b.dtype), tuple(b.shape[1:])) for b in batches[:1]])
    dtype, row_shape = getattr(torch, kinds[0][0].removeprefix("torch.")), kinds[0][1]
    rows = (torch.cat([b.to(device) for b in batches]) if batches
            else torch.empty((0, *row_shape), dtype=dtype, device=device))
    ids = torch.tensor([n for b, n in zip(batches, numbers, strict=True) for _ in range(len(b))],
                       dtype=torch.int64)
    all_ids = _gather_rows(ids, device).cpu()
    all_rows = _gather_rows(rows, device)
    # Each batch lives on one rank, whole and in order: a stable sort by batch number
    # puts every row back where one process would have it.
    order = torch.argsort(all_ids, stable=True)
    sizes = torch.bincount(all_ids, minlength=total).tolist()
    return list(all_rows[order.to(all_rows.device)].split(sizes))


def _all_objects(values: list) -> list:
    """Every rank's list of picklable ``values``, concatenated in rank order."""
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, values)
    return [v for part in out for v in part]


def sync_batchnorm(procs: Processes, device: torch.device) -> bool:
    """Whether batch norm is synchronised across ranks: between GPUs over NCCL only.

    ``SyncBatchNorm`` needs CUDA; on CPUs (gloo) each process normalises with the
    statistics of its own ``bs / N`` rows.
    """
    return procs.distributed and device.type == "cuda" and procs.backend == "nccl"


class _ReplayedBatch:
    """What fastai's metrics read from a Learner (pred, yb, y, loss), for one batch."""

    def __init__(self, pred: torch.Tensor, target: torch.Tensor, loss: torch.Tensor):
        self.pred, self.yb, self.y, self.loss = pred, (target,), target, loss

    @staticmethod
    def to_detach(b, cpu: bool = True, gather: bool = True):
        """Detach (and move to the CPU); already gathered, so never gather again."""
        return to_detach(b, cpu, gather=False)


class GatheredValidation(Callback):
    """Validation metrics over the predictions of every rank, computed once per epoch.

    Each rank predicts its shard of the validation loader (whole batches, no padding) with
    rank 0's weights; after the epoch every rank gathers all predictions and targets and
    replays them batch by batch, in one process's batch order, through the Recorder's
    loss and metrics (loss, accuracy, AUC). The Recorder then holds exactly what one
    process computes from the same predictions, on every rank, so early stopping and
    the best epoch agree everywhere. (Gathering per batch, as fastai's ``DistributedDL``
    does, needs padded shards whose duplicates must be cut out again: fastai#2636.)
    """

    order = 45  # after_validate runs before the Recorder's (50) reads the metrics

    def __init__(self, device: torch.device):
        self.device = device
        self.wrapped: torch.nn.Module | None = None
        self.preds: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def before_validate(self):  # noqa: D102 - fastai event
        self.preds, self.targets = [], []
        broadcast_buffers(self.learn.model)
        # The bare module: ranks may hold different numbers of validation batches, and a
        # DDP forward can start a collective that a rank without a batch never joins.
        self.wrapped = self.learn.model
        self.learn.model = unwrap(self.learn.model)

    def after_batch(self):  # noqa: D102 - fastai event
        if self.training or not len(self.learn.yb):
            return
        self.preds.append(self.learn.pred.detach())
        self.targets.append(self.learn.yb[0].detach())

    def _restore(self):
        if self.wrapped is not None:
            self.learn.model, self.wrapped = self.wrapped, None

    def after_cancel_validate(self):  # noqa: D102 - fastai event
        self._restore()

    def after_validate(self):  # noqa: D102 - fastai event
        self._restore()
        dl = self.learn.dl
        numbers, total = dl.batch_numbers(), dl.epoch_batches()
        preds = gather_batches(self.preds, numbers, total, self.device)
        targets = gather_batches(self.targets, numbers, total, self.device)
        metrics = self.learn.recorder._valid_mets
        for metric in metrics:
            metric.reset()
        with torch.no_grad():
            for pred, target in zip(preds, targets, strict=True):
                batch = _ReplayedBatch(pred, target, self.learn.loss_func(pred, target))
                for metric in metrics:
                    metric.accumulate(batch)
        self.preds, self.targets = [], []


class PCamDistributedTrainer(DistributedTrainer):
    """fastai's ``DistributedTrainer`` (Accelerate's DDP) for loaders already sharded by rank.

    The model is prepared by Accelerate as in fastai; a PCam loader built for this rank
    is used as it is instead of being wrapped in fastai's ``DistributedDL``.
    """

    def __init__(self, procs: Processes, device: torch.device):
        # Precision is the profile's (fastai's MixedPrecision callback), never accelerate
        # launch's --mixed_precision, which would autocast a second time.
        super().__init__(sync_bn=sync_batchnorm(procs, device), cpu=device.type != "cuda",
                         mixed_precision="no")
        self.procs = procs

    def _wrap_dl(self, dl):
        from pcamlib.data import PCamDataLoader

        if isinstance(dl, PCamDataLoader) and (dl.rank, dl.world_size) == \
                (self.procs.rank, self.procs.world_size):
            return dl
        found = (f"rank {dl.rank} of {dl.world_size}" if isinstance(dl, PCamDataLoader)
                 else type(dl).__name__)
        raise StepError(f"distributed training needs PCam loaders built for rank "
                        f"{self.procs.rank} of {self.procs.world_size}; found {found}")


@contextmanager
def distrib_ctx(learn, procs: Processes) -> Iterator:
    """The ``Learner.distrib_ctx`` of fastai for pcamlib's sharded loaders (nothing in one process).

    Adds :class:`PCamDistributedTrainer` and :class:`GatheredValidation` for the fits
    inside, and keeps progress bars on rank 0 only.
    """
    if not procs.distributed:
        yield learn
        return
    device = learn.dls.device
    cbs = [PCamDistributedTrainer(procs, device), GatheredValidation(device)]
    progress = [] if procs.is_main else [c for c in learn.cbs if isinstance(c, ProgressCallback)]
    learn.remove_cbs(progress)
    learn.add_cbs(cbs)
    try:
        yield learn
    finally:
        learn.remove_cbs(cbs)
        learn.add_cbs(progress)
