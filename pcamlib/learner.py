"""The study's fastai Learner: architecture, ImageNet weights, normalisation, optimiser.

Everything that decides what model and optimiser a profile trains lives here; the
training loop is :mod:`pcamlib.train` and run directories are :mod:`pcamlib.runs`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import fastai.callback.schedule  # noqa: F401 - adds Learner.fit_one_cycle and lr_find
import torch
import torchvision
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.mixup import MixUp
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import RocAucBinary, accuracy
from fastai.optimizer import SGD
from fastai.torch_core import set_seed
from fastai.vision.learner import vision_learner

from pcamlib.data import IMAGENET_STATS, default_device, pcam_dataloaders
from pcamlib.distributed import SINGLE, Processes
from pcamlib.errors import InputError, MissingInputError
from pcamlib.optim import ForeachSGD
from pcamlib.pcam import PCamSplit, channel_stats
from pcamlib.profiles import ARCHITECTURES, Profile


def check_arch(arch: str) -> None:
    """Raise :class:`InputError` unless ``arch`` is one of :data:`ARCHITECTURES`."""
    if arch not in ARCHITECTURES:
        raise InputError(
            f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}"
        )


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
        mode: ``auto``, ``yes`` or ``no`` (see :class:`~pcamlib.profiles.Profile`).

    Returns:
        The decision with a human-readable reason.

    Raises:
        MissingInputError: when ``mode='yes'`` and the weights are not in the cache.
    """
    path = pretrained_weights_file(arch)
    if mode == "no":
        return PretrainedChoice(False, str(path), f"{arch}: trained from scratch (pretrained='no')")
    if path.is_file():
        return PretrainedChoice(True, str(path), f"{arch}: ImageNet weights from {path}")
    if mode == "yes":
        raise MissingInputError(
            f"{arch}: ImageNet weights not found at {path} (no download is attempted), and "
            f"the profile requires them (pretrained='yes'). Copy torchvision's file there "
            f"(it is {_weights_enum(arch).url}), or pass --set pretrained=no to train from "
            "scratch instead (a different recipe from the study's fine_tune)."
        )
    message = (
        f"{arch}: ImageNet weights not found at {path} (no download is attempted); "
        "training from scratch. Put the torchvision weights file there to fine-tune."
    )
    warnings.warn(message, stacklevel=2)
    return PretrainedChoice(False, str(path), message)


def normalisation(profile: Profile, pretrained: bool) -> dict:
    """Normalisation statistics: ImageNet's with pretrained weights, else the train split's."""
    if pretrained:
        mean, std = IMAGENET_STATS
        return {"source": "imagenet", "mean": list(mean), "std": list(std)}
    stats = channel_stats(PCamSplit(profile.data_dir, "train", rows=profile.train_rows))
    return {"source": "train split", "mean": stats["mean"], "std": stats["std"]}


def precision_for(profile: Profile, device: torch.device) -> str:
    """The arithmetic a run's training steps use.

    On CUDA: the profile's mixed precision (``auto``: bf16 where supported, else fp16).
    On a CPU: fp32, unless the profile asks for ``bf16`` explicitly (see
    :class:`CpuBf16Training`); fp16 has no fast CPU kernels and stays fp32.
    """
    if profile.mixed_precision == "no":
        return "fp32"
    if device.type != "cuda":
        return "bf16" if profile.mixed_precision == "bf16" else "fp32"
    if profile.mixed_precision in ("bf16", "fp16"):
        return profile.mixed_precision
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def cpu_bf16_units() -> str:
    """The CPU's bf16 instruction sets, from /proc/cpuinfo (empty when it has none).

    Returns:
        ``"amx_bf16 avx512_bf16"``, one of them, ``""``, or ``"unknown"`` where
        /proc/cpuinfo cannot be read (not Linux).
    """
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags)


def warn_if_cpu_bf16_is_slow(precision: str, device: torch.device) -> None:
    """Warn when bf16 training steps are asked of a CPU without bf16 units.

    There oneDNN emulates bf16 and a training step takes about 2.5x as long as in fp32
    (``bench/bench_precision.py``, capped rows), so the profile should stay on ``auto``.
    """
    if device.type == "cuda" or precision != "bf16" or cpu_bf16_units():
        return
    warnings.warn(
        "mixed_precision='bf16' on a CPU without bf16 units (no amx_bf16 or avx512_bf16 "
        "in /proc/cpuinfo): training steps will be about 2.5x slower than fp32. "
        "Set mixed_precision='auto' (fp32 on a CPU) unless you want bf16's rounding.",
        UserWarning, stacklevel=2)


class CpuBf16Training(Callback):
    """bf16 autocast for the training steps on a CPU; validation stays fp32.

    fastai's ``MixedPrecision`` autocasts on CUDA only. On CPUs with bf16 matrix units
    (AMX, AVX512-BF16) oneDNN runs a training step about twice as fast in bf16
    (``bench/bench_precision.py``). No gradient scaler is needed: bf16 has fp32's
    exponent range.
    Validation and prediction are left in fp32 so that the per-epoch valid loss (which
    picks the kept epoch) and the evaluated probabilities are not rounded to bf16's
    8-bit mantissa, where ties would blur the AUC.
    """

    order = MixedPrecision.order

    def before_batch(self) -> None:
        """Enter bf16 autocast for a training batch."""
        self._autocast = None
        if self.learn.training:
            self._autocast = torch.autocast("cpu", dtype=torch.bfloat16)
            self._autocast.__enter__()

    def after_pred(self) -> None:
        """Hand the loss and the metrics an fp32 prediction."""
        if self.learn.training:
            self.learn.pred = self.learn.pred.float()

    def after_loss(self) -> None:
        """Leave autocast before the backward pass, as torch recommends."""
        self._leave()

    def after_batch(self) -> None:
        """Leave autocast if the batch was cancelled before its loss."""
        self._leave()

    def _leave(self) -> None:
        if getattr(self, "_autocast", None) is not None:
            self._autocast.__exit__(None, None, None)
            self._autocast = None


def optimizer_func(profile: Profile):
    """The fastai ``opt_func`` of the profile's SGD (see ``Profile.optimizer``).

    Both are fastai's SGD with decoupled weight decay that spares norm and bias
    parameters; ``mom`` only matters where no schedule sets it (``lr_find``), since the
    one-cycle schedule sets the momentum at every batch (``Profile.moms``).
    """
    if profile.optimizer == "fastai":
        return partial(SGD, mom=profile.mom)
    return partial(ForeachSGD, mom=profile.mom)


def optimizer_description(profile: Profile) -> str:
    """One sentence on the optimiser a run uses, for ``run.json`` and the report."""
    impl = ("fastai's Python loop over parameters" if profile.optimizer == "fastai"
            else "the same update in torch foreach operations (pcamlib.optim.ForeachSGD)")
    return (f"fastai SGD: decoupled weight decay {profile.wd:g} (p *= 1 - lr*wd; norm and bias "
            f"parameters not decayed), momentum without dampening; {impl}")


def build_learner(
    profile: Profile,
    arch: str,
    *,
    run_dir: Path,
    pretrained: PretrainedChoice,
    norm: dict,
    device: torch.device | None = None,
    progress: bool = True,
    procs: Processes = SINGLE,
) -> Learner:
    """A fastai Learner for ``arch`` on the profile's data, set up per the study's recipe.

    fastai SGD (:func:`optimizer_func`), weight decay ``profile.wd``, cross-entropy over
    two classes (label-smoothed and MixUp when the profile asks), accuracy and AUC
    metrics; one-cycle momentum ``profile.moms``;
    channels_last (NHWC) memory layout on every device; bf16/fp16 mixed precision on
    CUDA, and on a CPU bf16 training steps only when the profile asks for ``bf16``.

    Args:
        profile: Parameters.
        arch: One of :data:`ARCHITECTURES`.
        run_dir: Where fastai may write temporary files (lr_find).
        pretrained: Whether to load ImageNet weights.
        norm: Normalisation statistics (see :func:`normalisation`).
        device: Training device (default: GPU when present).
        progress: Show progress bars.
        procs: The processes sharing the run (:func:`pcamlib.distributed.join`): each
            reads its shard of every epoch, ``profile.bs / world_size`` training rows per
            step (``bs`` stays the global batch) and whole validation batches of
            ``2 * bs`` rows, as one process would.

    Returns:
        The Learner.

    Raises:
        InputError: ``profile.bs`` does not split evenly over the processes.
    """
    check_arch(arch)
    device = device or default_device()
    set_seed(profile.seed, reproducible=True)
    dls = pcam_dataloaders(
        profile.data_dir, mean=norm["mean"], std=norm["std"], bs=procs.check_batch(profile.bs),
        val_bs=2 * profile.bs, augment=profile.augment, num_workers=profile.num_workers,
        device=device, seed=profile.seed, train_rows=profile.train_rows,
        centre_crop=profile.centre_crop, rank=procs.rank, world_size=procs.world_size,
    )
    loss = (LabelSmoothingCrossEntropyFlat(eps=profile.label_smoothing)
            if profile.label_smoothing else CrossEntropyLossFlat())
    cbs = [MixUp(alpha=profile.mixup)] if profile.mixup else []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        learn = vision_learner(
            dls, getattr(torchvision.models, arch), n_out=2, pretrained=pretrained.used,
            normalize=False, loss_func=loss, opt_func=optimizer_func(profile), wd=profile.wd,
            moms=tuple(profile.moms), metrics=[accuracy, RocAucBinary()], cbs=cbs,
            path=run_dir, model_dir="models",
        )
    # NHWC convolutions are faster on CUDA tensor cores and in oneDNN on a CPU too (the
    # batch pipeline already yields NHWC tensors, so the model should match).
    learn.model.to(memory_format=torch.channels_last)
    precision = precision_for(profile, device)
    if device.type != "cuda" and precision == "bf16":
        warn_if_cpu_bf16_is_slow(precision, device)
        learn.add_cb(CpuBf16Training())
    if device.type == "cuda":
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
