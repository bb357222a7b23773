"""Training speed: fastai's Learner vs a bare PyTorch loop on the same model and data.

Both sides train the same torchvision model (``--archs``, default resnet18 and
densenet121, 2 classes, random initial weights copied from one instance) on the same
in-memory data: ``--items`` random uint8 patches (default 1,024) converted once to
normalised float N x 3 x 96 x 96, no augmentation. Batches (64) come in the same order
on both sides; both use SGD with momentum 0.9 and weight decay 0.01 and cross-entropy.

- ``bare``: ``for xb, yb in batches: loss = F.cross_entropy(model(xb), yb);
  loss.backward(); opt.step(); opt.zero_grad()`` with ``torch.optim.SGD``.
- ``fastai``: ``Learner(DataLoaders(...), model, loss_func=CrossEntropyLossFlat(),
  opt_func=SGD (fastai's, mom 0.9), wd=0.01)`` and ``learn.fit``, progress bar and
  logging off, fed by a minimal in-memory fastai ``DataLoader`` that slices whole
  batches out of the tensors (like the project's loader does).

Each side runs ``--warmup`` untimed steps, then ``--steps`` timed steps (a callback times
fastai's batches and cancels the fit). torch runs with ``--threads`` intra-op threads
(default 1, see ``--help``). The sides alternate over ``--rounds`` rounds so
load from other processes hits both alike; each side's best round is reported.
``ratio_fastai_vs_bare`` = fastai images/s / bare images/s: target >= 0.9 (fastai's
loop, callbacks and optimiser cost at most 10% of the training step).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402 - sets sys.path for pcamlib
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGET_RATIO = 0.9  # fastai >= 90% of the bare loop's images/s
LR = 1e-3  # any small learning rate: speed does not depend on it
MOMENTUM, WEIGHT_DECAY = 0.9, 0.01  # the study's SGD settings
FULL = {"archs": "resnet18,densenet121", "items": 1024, "bs": 64, "steps": 6, "warmup": 2,
        "rounds": 2}
QUICK = {"archs": "resnet18", "items": 64, "bs": 16, "steps": 2, "warmup": 1, "rounds": 1}


def _data(items: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from pcamlib.data import IMAGENET_STATS

    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (items, 96, 96, 3), dtype=torch.uint8, generator=gen)
    mean = torch.tensor(IMAGENET_STATS[0]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STATS[1]).view(1, 3, 1, 1)
    x = ((raw.permute(0, 3, 1, 2).float() / 255 - mean) / std).contiguous()
    y = torch.randint(0, 2, (items,), generator=gen)
    return x, y


def _order(items: int, bs: int, n_batches: int, seed: int = 0) -> list[np.ndarray]:
    """``n_batches`` index batches cycling through shuffled passes over ``items`` rows."""
    rng = np.random.default_rng(seed)
    flat = np.concatenate([rng.permutation(items)
                           for _ in range(-(-n_batches * bs // items))])
    return [flat[i * bs:(i + 1) * bs] for i in range(n_batches)]


def bare(model, x, y, batches, warmup: int) -> tuple[int, float]:
    """(timed images, seconds) of a plain PyTorch loop over ``batches``."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    images, t0 = 0, 0.0
    for i, idx in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        xb, yb = x[idx], y[idx]
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= warmup:
            images += len(idx)
    return images, time.perf_counter() - t0


def fastai_fit(model, x, y, batches, warmup: int) -> tuple[int, float]:
    """(timed images, seconds) of ``Learner.fit`` over ``batches``."""
    from fastai.callback.core import Callback, CancelFitException
    from fastai.callback.progress import ProgressCallback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.optimizer import SGD

    class MemoryLoader(DataLoader):
        """Whole batches sliced from in-memory tensors, in a fixed order."""

        def __init__(self, order, **kwargs):
            self.order = order
            super().__init__(dataset=range(sum(len(b) for b in order)), bs=len(order[0]),
                             shuffle=False, drop_last=False, num_workers=0, device="cpu",
                             **kwargs)

        def __len__(self):
            return len(self.order)

        def __iter__(self):
            self.before_iter()
            for idx in self.order:
                yield self.after_batch((x[idx], y[idx]))
            self.after_iter()

    class Timer(Callback):
        order = 100  # last: after the optimiser step and every other callback

        def __init__(self):
            self.done = self.images = 0
            self.t0 = self.seconds = 0.0

        def before_batch(self):
            if self.training and self.done == warmup:
                self.t0 = time.perf_counter()

        def after_batch(self):
            if not self.training:
                return
            if self.done >= warmup:
                self.images += len(self.xb[0])
            self.done += 1
            if self.done == len(batches):
                self.seconds = time.perf_counter() - self.t0
                raise CancelFitException()

    dls = DataLoaders(MemoryLoader(batches), MemoryLoader(batches[:1]), device="cpu")
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(),
                    opt_func=partial(SGD, mom=MOMENTUM), wd=WEIGHT_DECAY, lr=LR)
    if any(isinstance(cb, ProgressCallback) for cb in learn.cbs):
        learn.remove_cb(ProgressCallback)
    learn.logger = lambda *args, **kwargs: None
    timer = Timer()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        learn.fit(1, LR, cbs=[timer])
    return timer.images, timer.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--archs", default=None,
                        help=f"comma-separated torchvision architectures (default {FULL['archs']})")
    parser.add_argument("--items", type=int, default=None,
                        help=f"in-memory patches (default {FULL['items']:,})")
    parser.add_argument("--bs", type=int, default=None, help=f"batch size (default {FULL['bs']})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps per side and round (default {FULL['steps']})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps first (default {FULL['warmup']})")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"alternating rounds, best reported (default {FULL['rounds']})")
    parser.add_argument("--threads", type=int, default=1, help=benchlib.THREADS_HELP)
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes: {QUICK}")
    parser.add_argument("--out", type=Path, default=benchlib.REPORTS_DIR / "train.csv",
                        help="CSV path (default: %(default)s)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    import torchvision

    threads = benchlib.set_threads(args.threads)
    x, y = _data(args.items)
    batches = _order(args.items, args.bs, args.warmup + args.steps)
    print(f"bench_train: {args.items:,} items, bs={args.bs}, {args.warmup}+{args.steps} steps, "
          f"{args.rounds} rounds, torch threads={threads}", flush=True)
    rows = []
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        torch.manual_seed(0)
        initial = getattr(torchvision.models, arch)(num_classes=2)
        best = {"bare": (0, 1.0, 0.0), "fastai": (0, 1.0, 0.0)}
        for round_ in range(args.rounds):
            for loop, fn in (("bare", bare), ("fastai", fastai_fit)):
                images, seconds = fn(copy.deepcopy(initial), x, y, batches, args.warmup)
                rate = images / seconds
                print(f"  {arch} round {round_ + 1} {loop:6s}: {rate:8.1f} img/s", flush=True)
                if rate > best[loop][2]:
                    best[loop] = (images, seconds, rate)
        for loop in ("bare", "fastai"):
            images, seconds, rate = best[loop]
            rows.append({"arch": arch, "loop": loop, "batch_size": args.bs, "steps": args.steps,
                         "images": images, "seconds": round(seconds, 3),
                         "images_per_s": round(rate, 2), "torch_threads": threads,
                         "ratio_fastai_vs_bare": round(rate / best["bare"][2], 4)})
    benchlib.write_csv(rows, args.out)
    for row in rows:
        if row["loop"] == "fastai":
            r = row["ratio_fastai_vs_bare"]
            print(f"fastai/bare {row['arch']}: {r:.2f} (target >= {TARGET_RATIO}): "
                  f"{'PASS' if r >= TARGET_RATIO else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
