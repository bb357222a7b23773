"""Training with 2 processes vs 1: the cost of the multi-process machinery, side by side.

Both sides train the same architecture (``--arch``, default resnet18, random initial
weights) on the same generated PCam-format data (``--rows`` train rows) with the same
global batch (``--bs``): one process reads ``bs`` rows per step, two processes read
``bs / 2`` each and average their gradients (fastai's DistributedTrainer on Accelerate,
``DistributedDataParallel``; gloo on CPUs). Each side is launched with ``torchrun
--standalone --nproc_per_node P`` running this script with ``--child``: it builds the
project's Learner (``build_learner`` with the rank's sharded loaders, no augmentation),
fits inside ``pcamlib.distributed.distrib_ctx``, times ``--steps`` optimiser steps after
``--warmup`` steps on rank 0 (the steps are synchronous across ranks) and writes the rate.
Launch and import time is not counted. The sides alternate over ``--rounds`` rounds so
that load from other processes hits both alike; each side's best round is reported.

``ratio_vs_1_process`` = images/s with 2 processes / images/s with 1. Every process runs
``--threads`` torch threads (default 1), so 2 processes use twice the cores: 2.0 would be
perfect scaling, and what is missing is the overhead (gradient all-reduce, a loader per
process, two processes on shared cores). On a GPU machine ``bench/gpu.sh`` runs the same
measurement with both processes on one GPU (see ``bench_gpu.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from importlib.util import find_spec
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402 - sets sys.path for pcamlib

BENCH_DIR = Path(__file__).resolve().parent
FULL = {"rows": 1024, "bs": 64, "steps": 6, "warmup": 2, "rounds": 2}
QUICK = {"rows": 256, "bs": 32, "steps": 3, "warmup": 1, "rounds": 1}
TIMEOUT_S = 900


def child(args) -> int:
    """One rank of one side: train ``warmup + steps`` steps, rank 0 writes the rate."""
    import torch
    from fastai.callback.core import Callback, CancelFitException

    from pcamlib import distributed
    from pcamlib.data import IMAGENET_STATS
    from pcamlib.learner import PretrainedChoice, build_learner
    from pcamlib.profiles import get_profile

    benchlib.set_threads(args.threads)
    procs, device = distributed.join(args.device)
    profile = get_profile("sample", data_dir=args.data_dir, archs=[args.arch], bs=args.bs,
                          pretrained="no")
    mean, std = IMAGENET_STATS
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-dist-rank{procs.rank}-"))
    learn = build_learner(profile, args.arch, run_dir=run_dir,
                          pretrained=PretrainedChoice(False, "", "benchmark"),
                          norm={"mean": list(mean), "std": list(std)}, device=device,
                          progress=False, procs=procs)
    needed = args.warmup + args.steps
    if len(learn.dls.train) < needed:
        raise SystemExit(f"{len(learn.dls.train)} steps per epoch; need --warmup + --steps = "
                         f"{needed}: use more --rows")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class Timer(Callback):
        order = 100  # after every other callback of the batch

        def __init__(self):
            self.done, self.t0, self.seconds = 0, 0.0, 0.0

        def before_batch(self):
            if self.training and self.done == args.warmup:
                sync()
                self.t0 = time.perf_counter()

        def after_batch(self):
            if not self.training:
                return
            self.done += 1
            if self.done == needed:
                sync()
                self.seconds = time.perf_counter() - self.t0
                raise CancelFitException()

    timer = Timer()
    try:
        with warnings.catch_warnings(), distributed.distrib_ctx(learn, procs):
            warnings.filterwarnings("ignore", category=UserWarning)
            learn.fit(1, 1e-3, cbs=[timer])
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    images = args.steps * args.bs  # global batch per step
    if procs.is_main:
        Path(args.result).write_text(json.dumps({
            "processes": procs.world_size, "backend": procs.backend, "device": str(device),
            "images": images, "seconds": timer.seconds,
            "images_per_s": images / timer.seconds}))
    distributed.finish()
    return 0


def torchrun_command(processes: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node P`` of this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(processes)]


def measure(processes: int, *, data_dir: Path, arch: str, bs: int, steps: int, warmup: int,
            device: str, threads: int = 1) -> dict:
    """Launch one side (``processes`` processes) and return rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [*torchrun_command(processes), str(Path(__file__).resolve()), "--child",
               "--data-dir", str(data_dir), "--arch", arch, "--bs", str(bs),
               "--steps", str(steps), "--warmup", str(warmup), "--device", device,
               "--threads", str(threads), "--result", str(result)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR.parent),
                                                           os.environ.get("PYTHONPATH")]))}
        if threads > 0:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def unavailable() -> str | None:
    """Why the measurement cannot run here (Accelerate missing), or None."""
    if find_spec("accelerate") is None:
        return "accelerate is not importable (pcamlib's multi-process runs need it)"
    return None


def compare(*, data_dir: Path, arch: str, bs: int, steps: int, warmup: int, rounds: int,
            device: str, threads: int = 1, say=print) -> dict[int, dict]:
    """Best result of 1 and of 2 processes over alternating rounds, by process count."""
    best: dict[int, dict] = {}
    for round_ in range(rounds):
        for processes in (1, 2):
            result = measure(processes, data_dir=data_dir, arch=arch, bs=bs, steps=steps,
                             warmup=warmup, device=device, threads=threads)
            say(f"  {arch} round {round_ + 1}, {processes} process(es): "
                f"{result['images_per_s']:8.1f} img/s ({result['backend'] or 'no backend'})")
            if result["images_per_s"] > best.get(processes, {}).get("images_per_s", 0.0):
                best[processes] = result
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--arch", default="resnet18", help="torchvision architecture")
    parser.add_argument("--rows", type=int, default=None,
                        help=f"generated train rows (default {FULL['rows']:,})")
    parser.add_argument("--bs", type=int, default=None,
                        help=f"global batch size, even (default {FULL['bs']})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed optimiser steps per side and round (default {FULL['steps']})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps first (default {FULL['warmup']})")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"alternating rounds, best reported (default {FULL['rounds']})")
    parser.add_argument("--threads", type=int, default=1, help=benchlib.THREADS_HELP)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes: {QUICK}")
    parser.add_argument("--out", type=Path, default=benchlib.REPORTS_DIR / "distributed.csv",
                        help="CSV path (default: %(default)s)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child:
        return child(args)
    reason = unavailable()
    if reason:
        raise SystemExit(f"bench_distributed: {reason}")
    print(f"bench_distributed: {args.arch}, {args.rows:,} rows, global bs {args.bs}, "
          f"{args.warmup}+{args.steps} steps, {args.rounds} rounds, {args.threads} torch "
          f"thread(s) per process, device {args.device}", flush=True)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-dist-data-"))
    try:
        benchlib.ensure_split(data_dir, "train", args.rows)
        benchlib.ensure_split(data_dir, "valid", 2 * args.bs, seed=1)
        best = compare(data_dir=data_dir, arch=args.arch, bs=args.bs, steps=args.steps,
                       warmup=args.warmup, rounds=args.rounds, device=args.device,
                       threads=args.threads)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    one = best[1]["images_per_s"]
    rows = [{"arch": args.arch, "processes": p, "backend": r["backend"] or "none",
             "device": r["device"], "global_batch": args.bs, "batch_per_process": args.bs // p,
             "steps": args.steps, "images": r["images"], "seconds": round(r["seconds"], 3),
             "images_per_s": round(r["images_per_s"], 2), "torch_threads": args.threads,
             "ratio_vs_1_process": round(r["images_per_s"] / one, 4)}
            for p, r in sorted(best.items())]
    benchlib.write_csv(rows, args.out)
    ratio = rows[-1]["ratio_vs_1_process"]
    print(f"2 processes / 1 process, {args.arch}: {ratio:.2f} (2.0 = perfect scaling on twice "
          f"the cores; efficiency {ratio / 2:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
