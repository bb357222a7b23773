"""fastai DataLoaders over PCam HDF5: whole-batch reads, device-side transforms.

Items leave the loader as uint8 batches (N x 96 x 96 x 3). Conversion to float,
augmentation and normalisation run per batch on the training device (the GPU when
present) as fastai batch transforms, never per image in PIL.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.load import DataLoader
from fastai.data.transforms import Category, CategoryMap
from fastai.torch_core import TensorCategory, TensorImage, to_detach, to_device
from fasttransform import Pipeline, Transform
from torch.utils.data import get_worker_info
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from pcamlib.errors import InputError
from pcamlib.pcam import CENTRE_BOX, CLASS_NAMES, IMAGE_SHAPE, PCamSplit

IMAGENET_STATS: tuple[tuple[float, ...], tuple[float, ...]] = (
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
)
"""Normalisation statistics of ImageNet-pretrained torchvision weights."""


def default_device() -> torch.device:
    """The training device: the first CUDA GPU when present, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_num_workers(device: torch.device) -> int:
    """Loader workers sized from the machine.

    Batch reads cost microseconds per image, so on a CPU-only machine extra processes
    would only compete with the model for cores; with a GPU a few workers keep reads
    and pinned-memory copies off the training thread. Several training processes on one
    machine (``LOCAL_WORLD_SIZE``, set by torchrun) share its cores.
    """
    if device.type != "cuda":
        return 0
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(8, ((os.cpu_count() or 1) - 2) // local_processes))


class PCamRows:
    """Chosen rows of a :class:`PCamSplit`, readable like the split itself.

    These are a :class:`PCamDataLoader`'s ``items``. fastai's interpretation code selects
    rows with ``dl.items.iloc[idxs]`` and builds a loader over the selection with
    ``dls.test_dl(selection)``, which for a dataset that is not a fastai ``Datasets`` is
    ``dls.valid.new(selection)``: so a selection must itself be a dataset the loader can
    read in whole batches.

    Args:
        data: The split (or a selection of one).
        rows: Row numbers of ``data`` to keep, in order (None = all).
    """

    def __init__(self, data: PCamSplit | PCamRows, rows=None):
        base = np.arange(len(data)) if rows is None else np.asarray(rows, dtype=np.int64)
        base = base.reshape(-1)
        if base.size and (base.min() < -len(data) or base.max() >= len(data)):
            raise IndexError(f"rows out of range 0..{len(data) - 1} for {data!r}")
        base = base % max(len(data), 1)
        if isinstance(data, PCamRows):
            data, base = data.data, data.rows[base]
        self.data, self.rows = data, base
        self.labels = data.labels[base]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"PCamRows({self.data!r}, {len(self)} rows)"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[int(self.rows[index])]

    @property
    def iloc(self) -> _RowSelector:
        """``iloc[idxs]``: the selection of positions ``idxs`` (pandas-style, as fastai uses)."""
        return _RowSelector(self)

    def read_images(self, indices, out: np.ndarray | None = None) -> np.ndarray:
        """Images of positions ``indices`` (see :meth:`PCamSplit.read_images`)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return self.data.read_images(self.rows[idx], out=out)

    def read_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of positions ``indices`` (see :meth:`PCamSplit.read_batch`)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return self.data.read_batch(self.rows[idx])


class _RowSelector:
    def __init__(self, rows: PCamRows):
        self.rows = rows

    def __getitem__(self, idxs) -> PCamRows:
        if isinstance(idxs, torch.Tensor):
            idxs = idxs.cpu().numpy()
        return PCamRows(self.rows, np.atleast_1d(np.asarray(idxs, dtype=np.int64)))


class ClassNames(Transform):
    """Decodes a label to its class name, for fastai's show methods (an ``after_item``).

    Encoding leaves everything as it is; only decoding a :class:`TensorCategory` does
    anything. (fastai's own ``Categorize`` decodes every element of an item, the image
    too, because in a fastai ``Datasets`` it only ever sees the label.)
    """

    def __init__(self, names=CLASS_NAMES):
        super().__init__()
        self.vocab = CategoryMap(list(names), sort=False)

    def decodes(self, y: TensorCategory) -> Category:  # noqa: D102
        return Category(self.vocab[int(y)])


class PCamDataLoader(TfmdDL):
    """A fastai DataLoader that reads whole batches from a :class:`PCamSplit`.

    fastai's default path fetches and collates items one by one; here each batch of
    indices is read in one sorted pass (see :meth:`PCamSplit.read_batch`), which is what
    makes the loader fast. With ``num_workers > 0`` every worker opens its own file handle
    and reads runs of ``batches_per_transfer`` consecutive batches straight into a slot of
    a :class:`TransferRing`, shared memory allocated once per epoch; only the slot number
    crosses the process boundary, and the main process copies the slot out, frees it and
    splits it into batches in the original order. (Handing torch a fresh shared-memory
    tensor per batch instead costs a file descriptor passed over a socket and ~430 fresh
    pages per batch; on 2 cores that capped the loader at ~37,000 images/s.)

    It is a fastai ``TfmdDL`` so that fastai's show and interpretation machinery works on
    it: ``show_batch``, ``show_results``, ``ClassificationInterpretation`` (its
    ``plot_top_losses`` and ``plot_confusion_matrix``). Batches are decoded through the
    ``after_batch`` transforms' ``decodes`` (back to uint8 patches), labels through
    :class:`ClassNames` (``normal``/``tumour``, also the loader's ``vocab``), and rows are
    selected through ``items`` (a :class:`PCamRows`).
    """

    transfer_bytes: int = 4 * 2**20
    """Target size of one ring slot (whole batches of uint8 images)."""

    def __init__(self, dataset=None, *args, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, **kwargs):
        if not 0 <= rank < world_size:
            raise InputError(f"loader rank must be in 0..{world_size - 1} for world_size "
                             f"{world_size}; got {rank}")
        self.rank, self.world_size = rank, world_size
        kwargs.setdefault("after_item", ClassNames())
        # TfmdDL wraps each transform stage in a new Pipeline, which forgets the split
        # the batch pipeline was built for (see batch_pipeline); keep it.
        split_idx = getattr(kwargs.get("after_batch"), "split_idx", None)
        super().__init__(dataset, *args, num_workers=num_workers, **kwargs)
        self.after_batch.split_idx = split_idx
        # Batches are always (TensorImage, TensorCategory). TfmdDL would find that out by
        # running one item through the transforms (_one_pass), which reads through
        # __getitem__ and draws random augmentation numbers that shift training.
        self._n_inp, self._types = 1, {tuple: [TensorImage, TensorCategory]}
        # Each worker works on one slot at a time; more tasks in flight would only wait
        # for free slots.
        self.fake_l.prefetch_factor = 1 if self.fake_l.num_workers > 0 else 2
        self._ring: TransferRing | None = None

    def new(self, dataset=None, cls=None, **kwargs):  # noqa: D102 - fastai method
        # A loader made from this one (another split, a selection) reads the same shard.
        kwargs.setdefault("rank", self.rank)
        kwargs.setdefault("world_size", self.world_size)
        return super().new(dataset, cls, **kwargs)

    def epoch_batches(self, n: int | None = None) -> int:
        """Batches in an epoch of ``n`` rows (default: the loader's) over all ranks.

        With ``drop_last`` (training) the rows after the last whole step are left out, as
        in one process: a step is ``bs`` rows on each of ``world_size`` ranks (the global
        batch). Without it (validation, prediction) the last batch may be short.
        """
        n = self.n if n is None else n
        bs = self.bs or 1
        if self.drop_last:
            return n // (bs * self.world_size) * self.world_size
        return -(-n // bs)

    def batch_numbers(self, n: int | None = None) -> range:
        """Numbers of this rank's batches among :meth:`epoch_batches`.

        Batch ``j`` of the epoch (rows ``j*bs .. (j+1)*bs - 1`` of the epoch's order) is
        read by rank ``j % world_size``: the ranks' ``k``-th batches together are step
        ``k`` of a one-process run with batch ``bs * world_size``. Nothing is padded or
        read twice; in training every rank has the same number of batches, in
        validation they may differ by one.
        """
        return range(self.rank, self.epoch_batches(n), self.world_size)

    def __len__(self) -> int:
        if self.world_size == 1:
            return super().__len__()
        return len(self.batch_numbers())

    def get_idxs(self):  # noqa: D102 - fastai hook
        # The epoch's order (shuffled by the loader's RNG: the same permutation on every
        # rank, which all start from the same seed), then this rank's batches of it.
        idxs = super().get_idxs()
        if self.world_size == 1:
            return idxs
        bs = self.bs or 1
        return [i for j in self.batch_numbers(len(idxs)) for i in idxs[j * bs:(j + 1) * bs]]

    def to_detach(self, b, cpu: bool = True, gather: bool = True):
        """Detach a batch as fastai does, but never gather a sharded loader's batches one by one.

        fastai gathers every batch from every rank when ``WORLD_SIZE`` is set, which needs
        equal shards; validation shards may differ by a batch and are gathered once per
        epoch instead (:class:`pcamlib.distributed.GatheredValidation`).
        """
        return to_detach(b, cpu, gather and self.world_size == 1)

    def _one_pass(self):  # noqa: D102 - fastai hook; types are fixed (see __init__)
        self._n_inp, self._types = 1, {tuple: [TensorImage, TensorCategory]}

    def before_iter(self):  # noqa: D102 - fastai hook
        # TfmdDL sets every stage's split_idx from ``dataset.split_idx`` (fastai's
        # Datasets carry one); a PCamSplit has none, and the batch pipeline already
        # knows whether it is the training one.
        DataLoader.before_iter(self)

    @property
    def vocab(self) -> CategoryMap:
        """Class names by label (``normal``, ``tumour``), as fastai's interpretation reads them."""
        names = next((f for f in self.after_item.fs if isinstance(f, ClassNames)), None)
        return (names or ClassNames()).vocab

    @property
    def items(self) -> PCamRows:
        """The rows this loader reads, selectable with ``items.iloc[idxs]``."""
        data = self.dataset
        return data if isinstance(data, PCamRows) else PCamRows(data)

    @property
    def batches_per_transfer(self) -> int:
        """Batches per ring slot: as many as fit in ``transfer_bytes`` (at least one)."""
        batch_bytes = (self.bs or 1) * math.prod(IMAGE_SHAPE)
        return max(1, self.transfer_bytes // batch_bytes)

    def shuffle_fn(self, idxs):  # noqa: D102 - fastai hook
        # numpy's permutation is ~20x faster than random.sample on 262,144 indices; the
        # seed still comes from fastai's per-epoch RNG, so runs stay reproducible.
        rng = np.random.default_rng(self.rng.getrandbits(64))
        return rng.permutation(np.asarray(idxs)).tolist()

    def sample(self):  # noqa: D102 - fastai hook
        # fastai deals batches to workers round-robin; deal runs of batches_per_transfer
        # instead, so each worker's group is consecutive and torch's round-robin over the
        # workers yields the groups in epoch order.
        idxs = self._DataLoader__idxs
        if self.num_workers <= 1:
            return iter(idxs)
        span = (self.bs or 1) * self.batches_per_transfer
        return (b for i, b in enumerate(idxs) if i // span % self.num_workers == self.offs)

    def _groups(self, samps, group: int):
        """Lists of indices of ``group`` whole batches (the last may be shorter)."""
        pending: list[int] = []
        for index in samps:
            pending.append(index)
            if len(pending) == self.bs * group:
                yield pending
                pending = []
        if pending and self.drop_last:
            pending = pending[: len(pending) // self.bs * self.bs]
        if pending:
            yield pending

    def create_batches(self, samps):  # noqa: D102 - fastai hook
        info = get_worker_info()
        if info is None or self._ring is None:
            for indices in self._groups(samps, 1):
                yield self._read(indices)
            return
        for k, indices in enumerate(self._groups(samps, self.batches_per_transfer)):
            # This worker's k-th group is the epoch's (k * workers + id)-th (see sample).
            yield self._ring.put(k * info.num_workers + info.id, indices, self.dataset)

    def __iter__(self):
        if self.fake_l.num_workers == 0:
            yield from super().__iter__()
            return
        # fastai's DataLoader.__iter__, except that workers answer with ring slots: each
        # group is copied out (into pinned memory for CUDA), moved to the device in one
        # copy, then split into batches for after_batch.
        self.randomize()
        self.before_iter()
        self._DataLoader__idxs = self.get_idxs()
        ring = TransferRing(self.fake_l.num_workers + 2, self.bs * self.batches_per_transfer)
        self._ring = ring
        try:
            # Workers start (fork, or pickle for spawn) inside this constructor, taking
            # the ring with them.
            workers = _MultiProcessingDataLoaderIter(self.fake_l)
        finally:
            self._ring = None
        for ticket in workers:
            x, y = ring.take(ticket, pin=self.pin_memory)
            if self.device is not None:
                x, y = to_device((x, y), self.device)
            for xb, yb in zip(x.split(self.bs), y.split(self.bs), strict=True):
                yield self.after_batch((TensorImage(xb), TensorCategory(yb)))
        self.after_iter()
        if hasattr(self, "it"):
            del self.it

    def _read(self, indices: list[int]) -> tuple[TensorImage, TensorCategory]:
        x, y = self.dataset.read_batch(indices)
        return TensorImage(x), TensorCategory(y)


class TransferRing:
    """Shared-memory slots through which loader workers hand groups of batches over.

    Group ``g`` of an epoch goes to slot ``g % slots``. A worker waits until the main
    process has copied out group ``g - slots`` (``free_for[slot] >= g``), reads the rows
    straight into the slot and sends only ``(g, slot, rows)``. Groups are consumed in
    order and each worker makes its groups in order, so the wait always ends.
    """

    POLL_SECONDS = 5e-5

    def __init__(self, slots: int, rows: int):
        self.slots = slots
        self.images = torch.empty((slots, rows, *IMAGE_SHAPE), dtype=torch.uint8)
        self.labels = torch.empty((slots, rows), dtype=torch.int64)
        self.images.share_memory_()
        self.labels.share_memory_()
        # The lock gives the main process's "slot copied out" store ordering against the
        # worker's later writes into that slot.
        self.free_for = torch.multiprocessing.Array("q", range(slots))

    def _free_for(self, slot: int) -> int:
        with self.free_for.get_lock():
            return self.free_for[slot]

    def put(self, group: int, indices: list[int], data: PCamSplit) -> tuple[int, int, int]:
        """Worker side: read ``indices`` of ``data`` into group ``group``'s slot."""
        slot = group % self.slots
        parent = os.getppid()
        while self._free_for(slot) < group:
            if os.getppid() != parent:
                raise RuntimeError("loader worker: the main process is gone")
            time.sleep(self.POLL_SECONDS)
        n = len(indices)
        idx = np.asarray(indices, dtype=np.int64)
        data.read_images(idx, out=self.images[slot, :n].numpy())
        self.labels[slot, :n] = torch.from_numpy(data.labels[idx])
        return group, slot, n

    def take(self, ticket: tuple[int, int, int], pin: bool = False):
        """Main side: copy a group out of its slot and free the slot for group + slots."""
        group, slot, n = ticket
        x = torch.empty((n, *IMAGE_SHAPE), dtype=torch.uint8, pin_memory=pin)
        x.copy_(self.images[slot, :n])
        y = self.labels[slot, :n].clone()
        with self.free_for.get_lock():
            self.free_for[slot] = group + self.slots
        return x, y


class ToFloatImage(Transform):
    """uint8 N x H x W x C batch to float N x C x H x W in [0, 1].

    The permute keeps the NHWC memory layout, so the result is already channels_last.
    """

    order = 0

    def __init__(self, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last

    def encodes(self, x: TensorImage) -> TensorImage:  # noqa: D102
        if x.dtype != torch.uint8:
            return x
        out = x.permute(0, 3, 1, 2).float().div_(255.0)
        if not self.channels_last:
            out = out.contiguous()
        return TensorImage(out)

    def decodes(self, x: TensorImage) -> TensorImage:  # noqa: D102
        return TensorImage((x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1))


class NormalizeImage(Transform):
    """Per-channel normalisation of a float batch (mean and std in [0, 1] units)."""

    order = 99

    def __init__(self, mean, std):
        super().__init__()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def encodes(self, x: TensorImage) -> TensorImage:  # noqa: D102
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return TensorImage((x - mean) / std)

    def decodes(self, x: TensorImage) -> TensorImage:  # noqa: D102
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return TensorImage(x * std + mean)


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation of training batches, label-preserving for PCam.

    Rotation, zoom (a centred crop) and translation are kept small enough that the
    centre 32x32 region of the output comes from the centre of the original: every
    pixel of the output's inner 16x16 and at least 80% of its centre 32x32 do (checked
    by a test). Flips and 90-degree turns (the dihedral group) move nothing out of the
    centre.

    Attributes:
        flip: Random horizontal/vertical flips and 90-degree rotations.
        max_rotate: Largest extra rotation, degrees.
        max_zoom: Largest zoom factor (1.0 = none); zooming in is a centred crop.
        max_translate: Largest shift, as a fraction of the patch size.
        max_brightness: Largest brightness change (added, [0, 1] units).
        max_contrast: Largest relative contrast change.
        stain_jitter: Largest H&E stain perturbation (0 = off); Tellez et al. 2018 style.
        p_affine: Probability of applying rotate/zoom/translate to an image.
        p_lighting: Probability of applying brightness/contrast to an image.
    """

    flip: bool = True
    max_rotate: float = 15.0
    max_zoom: float = 1.1
    max_translate: float = 0.02
    max_brightness: float = 0.1
    max_contrast: float = 0.1
    stain_jitter: float = 0.0
    p_affine: float = 0.75
    p_lighting: float = 0.75

    def __post_init__(self):
        limits = {
            "max_rotate": (0.0, 30.0),
            "max_zoom": (1.0, 1.2),
            # 0.025 of 96 px = 2.4 px; with a 30 degree turn the centre 32x32 keeps > 80%.
            "max_translate": (0.0, 0.025),
            "max_brightness": (0.0, 0.5),
            "max_contrast": (0.0, 0.5),
            "stain_jitter": (0.0, 0.2),
            "p_affine": (0.0, 1.0),
            "p_lighting": (0.0, 1.0),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise InputError(
                    f"augmentation parameter {name} must be in [{low}, {high}] "
                    f"(larger values could move tumour out of the centre 32x32); got {value}"
                )

    def to_dict(self) -> dict:
        """Plain dict, for run records."""
        return asdict(self)


# Ruifrok & Johnston optical-density vectors for haematoxylin, eosin and DAB.
_HED_FROM_RGB = torch.linalg.inv(
    torch.tensor(
        [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
    )
)
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0-7) dihedral transform of an N x C x H x W batch."""
    if not 0 <= k < 8:
        raise InputError(f"dihedral index must be in 0..7, got {k}")
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


class PCamAugment(Transform):
    """Random batch augmentation on the batch's device (training split only)."""

    split_idx = 0
    order = 10

    def __init__(self, config: AugmentConfig | None = None):
        super().__init__()
        self.config = config or AugmentConfig()

    def _rand(self, n: int, device) -> torch.Tensor:
        return torch.rand(n, device=device)

    def encodes(self, x: TensorImage) -> TensorImage:  # noqa: D102
        # where/grid_sample/einsum pick their own output layout; keep the batch's.
        return TensorImage(_same_layout(self.augment(torch.Tensor(x)), x))

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a float N x 3 x H x W batch in [0, 1]."""
        c, n, dev = self.config, x.shape[0], x.device
        if c.flip:
            flip_h = self._rand(n, dev) < 0.5
            flip_v = self._rand(n, dev) < 0.5
            transpose = self._rand(n, dev) < 0.5
            x = torch.where(flip_h.view(-1, 1, 1, 1), x.flip(-1), x)
            x = torch.where(flip_v.view(-1, 1, 1, 1), x.flip(-2), x)
            x = torch.where(transpose.view(-1, 1, 1, 1), x.transpose(-2, -1), x)
        if c.p_affine > 0 and (c.max_rotate > 0 or c.max_zoom > 1 or c.max_translate > 0):
            x = self._affine(x)
        if c.stain_jitter > 0:
            x = self._stain(x)
        if c.p_lighting > 0 and (c.max_brightness > 0 or c.max_contrast > 0):
            apply = (self._rand(n, dev) < c.p_lighting).float().view(-1, 1, 1, 1)
            bright = (self._rand(n, dev) * 2 - 1).view(-1, 1, 1, 1) * c.max_brightness
            contrast = 1 + (self._rand(n, dev) * 2 - 1).view(-1, 1, 1, 1) * c.max_contrast
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            lit = (x - mean) * contrast + mean + bright
            x = (apply * lit + (1 - apply) * x).clamp_(0, 1)
        return x

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        c, n, dev = self.config, x.shape[0], x.device
        apply = (self._rand(n, dev) < c.p_affine).float()
        angle = (self._rand(n, dev) * 2 - 1) * math.radians(c.max_rotate) * apply
        zoom = 1 + self._rand(n, dev) * (c.max_zoom - 1) * apply
        shift = (torch.rand(n, 2, device=dev) * 2 - 1) * c.max_translate * 2 * apply[:, None]
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        )
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)

    def _stain(self, x: torch.Tensor) -> torch.Tensor:
        n, dev, sigma = x.shape[0], x.device, self.config.stain_jitter
        od = -torch.log(x.clamp(min=1 / 255))
        hed = torch.einsum("nchw,cd->ndhw", od, _HED_FROM_RGB.to(dev, x.dtype))
        alpha = 1 + (torch.rand(n, 3, 1, 1, device=dev) * 2 - 1) * sigma
        beta = (torch.rand(n, 3, 1, 1, device=dev) * 2 - 1) * sigma
        hed = hed * alpha + beta
        od = torch.einsum("ndhw,dc->nchw", hed, _RGB_FROM_HED.to(dev, x.dtype))
        return torch.exp(-od).clamp(0, 1)


class CentreCrop(Transform):
    """Keep the centre ``size`` x ``size`` pixels of every image (all splits).

    Runs after augmentation, so rotated and shifted content near the border comes from
    real tissue rather than from reflection padding. The label region (centre 32x32) is
    always kept; the crop only drops outer context, which cuts the model's compute by
    (96 / size) squared.
    """

    order = 20

    def __init__(self, size: int):
        super().__init__()
        check_centre_crop(size)
        self.size = size

    def encodes(self, x: TensorImage) -> TensorImage:  # noqa: D102
        height, width = x.shape[-2:]
        if height < self.size or width < self.size:
            raise InputError(
                f"centre crop of {self.size} px needs images at least that large; "
                f"got {height}x{width}"
            )
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return TensorImage(_same_layout(x[..., top:top + self.size, left:left + self.size], x))


def _same_layout(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` made contiguous in ``like``'s memory format (NHWC or NCHW)."""
    nhwc = like.is_contiguous(memory_format=torch.channels_last)
    return out.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def check_centre_crop(size: int | None) -> None:
    """Raise ValueError unless ``size`` is None or an even pixel count in [32, 96]."""
    if size is None:
        return
    if not isinstance(size, int) or isinstance(size, bool) or not 32 <= size <= 96 \
            or size % 2:
        raise InputError(
            "centre_crop must be None or an even number of pixels in [32, 96] "
            f"(it must keep the centre 32x32 label region, centred); got {size!r}"
        )


def centre_mask_fraction(marked: torch.Tensor) -> tuple[float, float]:
    """How much of an output's centre comes from a marked region (used by tests and docs).

    Args:
        marked: N x H x W boolean map of pixels that came from the original centre.

    Returns:
        (fraction of the inner 16x16 that is marked, worst over the batch;
        fraction of the centre 32x32 that is marked, worst over the batch).
    """
    top, left, bottom, right = CENTRE_BOX
    inner = marked[:, top + 8:bottom - 8, left + 8:right - 8].float().mean(dim=(1, 2))
    centre = marked[:, top:bottom, left:right].float().mean(dim=(1, 2))
    return float(inner.min()), float(centre.min())


def batch_pipeline(
    mean, std, *, train: bool, augment: AugmentConfig | None, channels_last: bool = False,
    centre_crop: int | None = None,
) -> Pipeline:
    """The batch transforms of one split.

    To float, normalise, augmentation (train only), then the optional centre crop (every
    split).
    """
    tfms: list[Transform] = [ToFloatImage(channels_last), NormalizeImage(mean, std)]
    if augment is not None:
        tfms.append(PCamAugment(augment))
    if centre_crop is not None and centre_crop < 96:
        tfms.append(CentreCrop(centre_crop))
    return Pipeline(tfms, split_idx=0 if train else 1)


def pcam_dataloaders(
    data_dir: str | os.PathLike,
    *,
    mean,
    std,
    bs: int = 64,
    val_bs: int | None = None,
    augment: AugmentConfig | None = None,
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    channels_last: bool = True,
    seed: int | None = None,
    train_rows: int | None = None,
    train_split: str = "train",
    valid_split: str = "valid",
    centre_crop: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoaders:
    """Fastai DataLoaders for a PCam-format directory.

    Args:
        data_dir: Directory with PCam-format files.
        mean: Per-channel normalisation mean, [0, 1] units.
        std: Per-channel normalisation std, [0, 1] units.
        bs: Training batch size.
        val_bs: Validation batch size (default: 2 x bs).
        augment: Training augmentation, or None for none.
        num_workers: Loader processes (default: sized from the machine).
        device: Where batches go (default: GPU when present).
        channels_last: NHWC memory layout (the model's layout on every device; see
            :func:`pcamlib.train.build_learner`).
        seed: Seed of the shuffling RNG (reproducible epoch order).
        train_rows: Use only the first N training rows (None = all).
        train_split: Split used for training.
        valid_split: Split used for validation.
        centre_crop: Feed the model only the centre N x N pixels of every split (None:
            the whole patch); see :class:`CentreCrop`.
        rank: This process's rank among ``world_size`` (see
            :meth:`PCamDataLoader.batch_numbers`).
        world_size: Processes sharing every epoch; ``bs`` is then each process's share of
            a step and ``val_bs`` each process's validation batch.

    Returns:
        DataLoaders with ``train`` (shuffled, drop_last) and ``valid``.
    """
    if not isinstance(bs, int) or bs <= 0:
        raise InputError(f"batch size bs must be a positive integer, got {bs!r}")
    device = torch.device(device) if device is not None else default_device()
    check_centre_crop(centre_crop)
    if num_workers is None:
        num_workers = default_num_workers(device)
    pin = device.type == "cuda"
    data_dir = Path(data_dir)
    train_ds = PCamSplit(data_dir, train_split, rows=train_rows)
    valid_ds = PCamSplit(data_dir, valid_split)
    common = dict(num_workers=num_workers, pin_memory=pin, device=device,
                  persistent_workers=num_workers > 0, rank=rank, world_size=world_size)
    if world_size > 1 and len(train_ds) < bs * world_size:
        raise InputError(
            f"{train_ds!r} has {len(train_ds)} rows, fewer than one step of {bs} rows on "
            f"each of {world_size} processes; use a smaller bs or more train_rows")
    train_dl = PCamDataLoader(
        train_ds, bs=bs, shuffle=True, drop_last=len(train_ds) > bs or world_size > 1,
        after_batch=batch_pipeline(mean, std, train=True, augment=augment,
                                   channels_last=channels_last, centre_crop=centre_crop),
        **common,
    )
    if seed is not None:
        train_dl.rng.seed(seed)
    valid_dl = PCamDataLoader(
        valid_ds, bs=val_bs or 2 * bs, shuffle=False, drop_last=False,
        after_batch=batch_pipeline(mean, std, train=False, augment=None,
                                   channels_last=channels_last, centre_crop=centre_crop),
        **common,
    )
    return DataLoaders(train_dl, valid_dl, device=device)


def split_dataloader(dls: DataLoaders, data: PCamSplit) -> DataLoader:
    """A loader for ``data`` through exactly the validation pipeline (no augmentation)."""
    return dls.valid.new(dataset=data, shuffle=False, drop_last=False)
