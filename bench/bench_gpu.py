"""GPU training and evaluation throughput of the project's pipeline vs the bare model.

Run on one GPU machine through ``bench/gpu.sh`` (which installs fastai from ``.whl/``
when it is missing), or on any machine with ``--small`` (tiny sizes, seconds on a CPU).

What it does, end to end:

1. Generates a PCam-format ``train`` split (262,144 rows, 7.2 GB, the official size) and
   a ``valid`` split (32,768 rows) on local disk (``--data-dir``; reused when present).
2. For each architecture (default densenet169 and resnet50), all at batch size 64:

   a. ``loader_only``: the training loader alone (batch reads by the loader workers,
      pinned copy to the GPU, GPU augmentation and normalisation), no model.
   b. ``pipeline_train``: the project's full pipeline, ``build_learner`` from the
      ``paper`` profile (bf16 mixed precision and channels_last on CUDA, GPU-side
      augmentation, loader workers sized from the machine), ``fit_one_cycle`` on the
      train split; a callback times ``--batches`` batches after ``--warmup`` warm-up
      batches and then cancels the fit.
   c. ``bare_train``: the same model object (same fastai head, channels_last) in a
      plain PyTorch loop on random GPU tensors of the same shape (64 x 3 x 96 x 96),
      bf16 autocast, ``torch.optim.SGD`` (momentum 0.9, weight decay 0.01), the same
      number of steps: the ceiling no pipeline can beat.
   d. ``bare_train_fastai_opt``: (c) stepping the Learner's own fastai SGD optimiser
      instead, to tell optimiser cost from loader/callback cost when (b) < (c).
   e. CUDA only (skip with ``--no-autotune``): ``bare_train_cudnn_autotune`` and
      ``pipeline_train_cudnn_autotune``, (c) and (b) again with cuDNN autotuning on and
      determinism off. ``build_learner`` seeds with ``reproducible=True``, which turns
      autotuning off; these rows show what that costs.
   f. ``eval_plain`` / ``eval_tta``: ``predict_probs`` on ``--eval-rows`` valid rows,
      without and with 8-way dihedral TTA.
   g. First architecture only (skip with ``--no-processes``): ``train_1_process`` and
      ``train_2_processes_one_device``, training through ``pcamlib.distributed`` launched
      by torchrun with 1 and with 2 processes sharing this one device, same global batch
      (``bench_distributed.py``; two ranks on one GPU use gloo, NCCL refuses them). Its
      ratio is 2 processes / 1 process. Needs ``accelerate`` (skipped with a message
      when it is not importable).

3. Prints an estimate of the ``paper`` profile's wall time on this machine.

How to read the CSV (``arch, measure, images_per_s, ratio``): for training rows
``ratio`` is images/s over ``bare_train`` of the same cuDNN setting, so the key row,
``pipeline_train``, is pipeline / bare (target >= 0.8: loader, augmentation and fastai's
training loop cost at most 20% of the bare model's speed); ``loader_only``'s ratio says
how many times faster than the bare model the loader alone is (>> 1 means it is not the
bottleneck); ``eval_tta``'s ratio is TTA / plain (about 1/8 expected: eight forward
passes). The estimate of the paper profile (2 archs x 10 epochs x 262,144 rows at the
pipeline rate, lr_find, per-epoch validation and the final evaluation at the eval
rates) is written to ``gpu_estimate.csv`` beside it (target <= 30 min on one H100; the
``cudnn_autotune`` variant is information only). Both files go to ``$OUT`` when that is
set (the device machine's output folder), else to ``reports/bench/``.

All rows run in one process, one after the other, on the same model object.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402 - sets sys.path for pcamlib
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PAPER_TRAIN_ROWS = 262_144  # official PCam train split
PAPER_VALID_ROWS = 32_768  # official valid split (the test split has as many rows)
PIPELINE_TARGET = 0.8  # pipeline must reach 80% of the bare model's images/s
ESTIMATE_TARGET_MIN = 30.0  # paper profile on one H100, minutes
BATCH_SIZE = 64  # the study's batch size (the paper profile's bs; --bs changes the runs only)

# --small: a CPU-sized run that exercises every step in seconds.
SMALL = {"train_rows": 512, "valid_rows": 128, "archs": "resnet18", "batches": 2,
         "warmup": 1, "eval_rows": 32, "bs": 16, "process_steps": 2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _learner(data_dir: Path, arch: str, device: torch.device, run_dir: Path,
             num_workers: int | None, bs: int):
    from pcamlib.data import IMAGENET_STATS
    from pcamlib.learner import PretrainedChoice, build_learner
    from pcamlib.profiles import get_profile

    profile = get_profile(
        "paper", data_dir=data_dir, archs=[arch], pretrained="no", num_workers=num_workers, bs=bs,
        mixed_precision="bf16" if device.type == "cuda" else "auto",
    )
    mean, std = IMAGENET_STATS  # content is random: any statistics time the same
    choice = PretrainedChoice(False, "", "benchmark: random initial weights")
    learn = build_learner(profile, arch, run_dir=run_dir, pretrained=choice,
                          norm={"mean": list(mean), "std": list(std)}, device=device,
                          progress=False)
    return profile, learn


def pipeline_train(learn, lr: float, warmup: int, batches: int, device) -> float:
    """Images/s of ``learn.fit_one_cycle`` over ``batches`` batches after ``warmup``."""
    from fastai.callback.core import Callback, CancelFitException

    class _Timer(Callback):
        order = 100  # after every other callback of the batch (recorder, mixed precision)

        def __init__(self):
            self.done = self.images = 0
            self.t0 = self.seconds = 0.0

        def before_batch(self):
            if self.training and self.done == warmup:
                _sync(device)
                self.t0 = time.perf_counter()

        def after_batch(self):
            if not self.training:
                return
            if self.done >= warmup:
                self.images += len(self.xb[0])
            self.done += 1
            if self.done == warmup + batches:
                _sync(device)
                self.seconds = time.perf_counter() - self.t0
                raise CancelFitException()

    if len(learn.dls.train) < warmup + batches:
        raise SystemExit(f"train split has {len(learn.dls.train)} batches; need "
                         f"--warmup + --batches = {warmup + batches}: generate more rows")
    timer = _Timer()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        learn.fit_one_cycle(1, lr, cbs=[timer])
    return timer.images / timer.seconds


def bare_train(model: torch.nn.Module, device, warmup: int, batches: int, bs: int,
               opt) -> float:
    """Images/s of a plain PyTorch training loop on random tensors already on the device.

    Args:
        model: The model (trained in place).
        device: Its device.
        warmup: Untimed steps first.
        batches: Timed steps.
        bs: Batch size.
        opt: The optimiser (anything with ``step`` and ``zero_grad``).
    """
    model.train()
    x = torch.randn(bs, 3, 96, 96, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    _sync(device)
    return batches * bs / (time.perf_counter() - t0)


def loader_only(learn, warmup: int, batches: int, device) -> float:
    """Images/s of the training loader alone: read, copy to the device, augment, normalise."""
    _, images, seconds = benchlib.timed_batches(
        learn.dls.train, max_batches=batches, budget_s=float("inf"), warmup=warmup,
        sync=lambda: _sync(device))
    return images / seconds


class _CudnnAutotune:
    """Context: cuDNN autotuning on and determinism off (what ``reproducible=True`` undoes)."""

    def __enter__(self):
        self.saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False

    def __exit__(self, *exc):
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = self.saved


def eval_rates(learn, data_dir: Path, rows: int) -> tuple[float, float]:
    """Images/s of ``predict_probs`` without and with TTA on the first ``rows`` valid rows."""
    from pcamlib.evaluate import predict_probs
    from pcamlib.pcam import PCamSplit

    warm = PCamSplit(data_dir, "valid", rows=min(rows, 2 * learn.dls.valid.bs))
    predict_probs(learn, warm)  # cuDNN/kernels for the eval batch shape, outside the timing
    predict_probs(learn, warm, tta=True)
    data = PCamSplit(data_dir, "valid", rows=rows)
    rates = []
    for tta in (False, True):
        t0 = time.perf_counter()
        predict_probs(learn, data, tta=tta)  # returns numpy on the host: already synchronised
        rates.append(rows / (time.perf_counter() - t0))
    return rates[0], rates[1]


def estimate_minutes(rates: dict, epochs: int, lr_find_iters: int) -> dict[str, float]:
    """Minutes of the paper profile's steps for one architecture from measured rates.

    Training epochs use the pipeline rate; the per-epoch validation pass, the final
    evaluation (train plain, valid and test plain + TTA) use the eval rates.
    """
    pipe, plain, tta = rates["pipeline_train"], rates["eval_plain"], rates["eval_tta"]
    return {
        "train_epochs": epochs * PAPER_TRAIN_ROWS / pipe / 60,
        "epoch_validation": epochs * PAPER_VALID_ROWS / plain / 60,
        "lr_find": lr_find_iters * BATCH_SIZE / pipe / 60,
        "evaluation": (PAPER_TRAIN_ROWS / plain + 2 * PAPER_VALID_ROWS / plain
                       + 2 * PAPER_VALID_ROWS / tta) / 60,
    }


def process_rows(args, data_dir: Path, device: torch.device) -> list[dict]:
    """1 vs 2 training processes on this one device (``bench_distributed.py``), first arch.

    Both processes share the device; NCCL refuses two ranks on one GPU, so pcamlib uses
    gloo there (pcamlib.distributed.join). Global batch ``--bs`` on both sides.
    """
    import bench_distributed

    reason = bench_distributed.unavailable()
    if reason:
        print(f"1 vs 2 processes: skipped, {reason}", flush=True)
        return []
    arch = [a.strip() for a in args.archs.split(",") if a.strip()][0]
    print(f"{arch}: 1 vs 2 processes on one {device.type} device, global bs {args.bs}",
          flush=True)
    best = bench_distributed.compare(
        data_dir=data_dir, arch=arch, bs=args.bs, steps=args.process_steps,
        warmup=args.warmup, rounds=1, device=device.type,
        threads=1 if device.type == "cpu" else 0)
    one, two = best[1]["images_per_s"], best[2]["images_per_s"]
    return [{"arch": arch, "measure": "train_1_process", "images_per_s": round(one, 1),
             "ratio": 1.0},
            {"arch": arch, "measure": "train_2_processes_one_device",
             "images_per_s": round(two, 1), "ratio": round(two / one, 4)}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Targets: pipeline_train ratio >= 0.8; paper profile estimate <= 30 min.")
    parser.add_argument("--small", action="store_true",
                        help=f"tiny CPU-sized run (seconds): {SMALL}")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the generated splits live (default /tmp/pcam-gpu-bench; "
                             "a temporary folder with --small)")
    parser.add_argument("--train-rows", type=int, default=PAPER_TRAIN_ROWS)
    parser.add_argument("--valid-rows", type=int, default=PAPER_VALID_ROWS)
    parser.add_argument("--archs", default="densenet169,resnet50",
                        help="comma-separated torchvision architectures")
    parser.add_argument("--batches", type=int, default=300, help="timed training batches")
    parser.add_argument("--warmup", type=int, default=30,
                        help="untimed batches first (worker start, cuDNN, allocator)")
    parser.add_argument("--eval-rows", type=int, default=8192,
                        help="valid rows predicted per eval measurement")
    parser.add_argument("--bs", type=int, default=BATCH_SIZE, help="training batch size")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="loader workers (default: sized from the machine, as in training)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per arch in the estimate")
    parser.add_argument("--lr-find-iters", type=int, default=100,
                        help="lr_find iterations per arch in the estimate")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 on CPU, torch's default on "
                             "CUDA). " + benchlib.THREADS_HELP.split(". ", 1)[1])
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV path (default: $OUT/gpu.csv if $OUT is set, else "
                             "reports/bench/gpu.csv)")
    parser.add_argument("--no-autotune", action="store_true",
                        help="skip the cuDNN-autotuning variants (CUDA only)")
    parser.add_argument("--process-steps", type=int, default=100,
                        help="timed steps of the 1 vs 2 processes measurement (first arch)")
    parser.add_argument("--no-processes", action="store_true",
                        help="skip the 1 vs 2 processes measurement")
    parser.add_argument("--keep-data", action="store_true",
                        help="keep the temporary data folder of --small")
    args = parser.parse_args(argv)
    if args.small:
        for key, value in SMALL.items():
            if parser.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    out = args.out or (Path(os.environ["OUT"]) / "gpu.csv" if os.environ.get("OUT")
                       else benchlib.REPORTS_DIR / "gpu.csv")
    device = _device(args.device)
    benchlib.set_threads(args.threads if args.threads is not None
                         else 1 if device.type == "cpu" else 0)
    info = benchlib.machine_info()
    print(f"bench_gpu: {info}", flush=True)

    temp = None
    data_dir = args.data_dir
    if data_dir is None:
        if args.small:
            temp = tempfile.mkdtemp(prefix="bench-gpu-")
            data_dir = Path(temp)
        else:
            data_dir = Path("/tmp/pcam-gpu-bench")
    t0 = time.perf_counter()
    for split, rows in (("train", args.train_rows), ("valid", args.valid_rows)):
        _, made = benchlib.ensure_split(data_dir, split, rows, seed=1 if split == "valid" else 0,
                                        progress=not args.small)
        print(f"data: {split} {rows:,} rows in {data_dir} "
              f"({'generated' if made else 'reused'}, {time.perf_counter() - t0:.1f} s)",
              flush=True)

    def say(arch: str, measure: str, rates: dict) -> None:
        print(f"  {arch} {measure}: {rates[measure]:,.0f} img/s", flush=True)

    rows, estimates = [], []
    run_dir = Path(tempfile.mkdtemp(prefix="bench-gpu-run-"))
    try:
        for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
            t_arch = time.perf_counter()
            profile, learn = _learner(data_dir, arch, device, run_dir, args.num_workers, args.bs)
            lr = profile.lr_for(arch)
            print(f"{arch}: workers={learn.dls.train.fake_l.num_workers} bs={learn.dls.train.bs} "
                  f"precision={'bf16' if device.type == 'cuda' else 'fp32'} "
                  f"cudnn.benchmark={torch.backends.cudnn.benchmark}", flush=True)
            w, n = args.warmup, args.batches
            rates = {"loader_only": loader_only(learn, w, n, device)}
            say(arch, "loader_only", rates)
            rates["pipeline_train"] = pipeline_train(learn, lr, w, n, device)
            say(arch, "pipeline_train", rates)
            model = learn.model  # the very model fastai trains: same head, same layout
            torch_sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=profile.mom,
                                        weight_decay=profile.wd)
            rates["bare_train"] = bare_train(model, device, w, n, args.bs, torch_sgd)
            say(arch, "bare_train", rates)
            # The Learner's own optimiser (fastai SGD, no weight decay on norm/bias).
            rates["bare_train_fastai_opt"] = bare_train(model, device, w, n, args.bs, learn.opt)
            say(arch, "bare_train_fastai_opt", rates)
            ratios = {
                "loader_only": rates["loader_only"] / rates["bare_train"],
                "pipeline_train": rates["pipeline_train"] / rates["bare_train"],
                "bare_train": 1.0,
                "bare_train_fastai_opt": rates["bare_train_fastai_opt"] / rates["bare_train"],
            }
            if device.type == "cuda" and not args.no_autotune:
                with _CudnnAutotune():
                    rates["bare_train_cudnn_autotune"] = bare_train(model, device, w, n, args.bs,
                                                                    torch_sgd)
                    say(arch, "bare_train_cudnn_autotune", rates)
                    rates["pipeline_train_cudnn_autotune"] = pipeline_train(learn, lr, w, n,
                                                                            device)
                    say(arch, "pipeline_train_cudnn_autotune", rates)
                ratios["bare_train_cudnn_autotune"] = (rates["bare_train_cudnn_autotune"]
                                                       / rates["bare_train"])
                ratios["pipeline_train_cudnn_autotune"] = (
                    rates["pipeline_train_cudnn_autotune"] / rates["bare_train_cudnn_autotune"])
            del model, torch_sgd
            rates["eval_plain"], rates["eval_tta"] = eval_rates(learn, data_dir, args.eval_rows)
            say(arch, "eval_plain", rates)
            say(arch, "eval_tta", rates)
            ratios.update(eval_plain=1.0, eval_tta=rates["eval_tta"] / rates["eval_plain"])
            for measure, rate in rates.items():
                rows.append({"arch": arch, "measure": measure,
                             "images_per_s": round(rate, 1), "ratio": round(ratios[measure], 4)})
            variants = {"as_is": rates["pipeline_train"]}
            if "pipeline_train_cudnn_autotune" in rates:
                variants["cudnn_autotune"] = rates["pipeline_train_cudnn_autotune"]
            for variant, pipe in variants.items():
                for component, minutes in estimate_minutes(
                        {**rates, "pipeline_train": pipe}, args.epochs,
                        args.lr_find_iters).items():
                    estimates.append({"arch": arch, "variant": variant, "component": component,
                                      "minutes": round(minutes, 3)})
            print(f"  {arch} done in {time.perf_counter() - t_arch:.0f} s", flush=True)
            del learn
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not args.no_processes:
            rows += process_rows(args, data_dir, device)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if temp and not args.keep_data:
            shutil.rmtree(temp, ignore_errors=True)

    frame = benchlib.write_csv(rows, out)
    est = benchlib.write_csv(estimates, out.with_name(out.stem + "_estimate.csv"))
    for arch in frame.arch.unique():
        r = frame[(frame.arch == arch) & (frame.measure == "pipeline_train")].ratio.iloc[0]
        print(f"pipeline/bare {arch}: {r:.2f} (target >= {PIPELINE_TARGET}): "
              f"{'PASS' if r >= PIPELINE_TARGET else 'FAIL'}")
    archs = list(frame.arch.unique())
    for variant, part in est.groupby("variant", sort=False):
        total = float(part.minutes.sum())
        label = ("estimate" if variant == "as_is"
                 else f"estimate with {variant} (information only)")
        verdict = "PASS" if total <= ESTIMATE_TARGET_MIN else "FAIL"
        print(f"{label}: paper profile ({len(archs)} archs [{', '.join(archs)}] x {args.epochs} "
              f"epochs x {PAPER_TRAIN_ROWS:,} rows + lr_find {args.lr_find_iters} iters + "
              f"evaluation) = {total:.1f} min on {info['device']} "
              f"(target <= {ESTIMATE_TARGET_MIN:.0f} min on one H100): {verdict}")
        for component, minutes in part.groupby("component", sort=False).minutes.sum().items():
            print(f"  {component}: {minutes:.1f} min")
    print(f"bench_gpu: total {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
