"""Optimiser speed: ForeachSGD vs fastai's SGD (the same update), per step and per training step.

For each architecture (``--archs``; fastai's ``create_vision_model``, 2 outputs, NHWC) the
parameters get fixed random gradients and each optimiser runs ``--steps`` timed updates
after ``--warmup``, as fastai's Learner sets it up: two parameter groups (body, head),
``do_wd=False`` on norm and bias parameters, momentum 0.9, decoupled weight decay 0.01.
Rows:

- ``step``: the optimiser step alone (milliseconds per step);
- ``train_step``: forward, backward, step and zero_grad on one batch of ``--bs`` random
  96 x 96 patches (what the step costs inside training).

``ratio_vs_fastai`` = fastai's SGD time / this optimiser's time (> 1: faster). The sides
alternate over ``--rounds`` rounds and each keeps its best round, so other load hits both
alike. ``torch_sgd_foreach`` (torch.optim.SGD, a different update: L2 decay on every
parameter) is shown for reference only. Runs on ``--device`` (cpu, cuda).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402 - sets sys.path for pcamlib
import torch  # noqa: E402

FULL = {"archs": "resnet18,densenet121", "steps": 20, "warmup": 3, "rounds": 3, "bs": 64}
QUICK = {"archs": "resnet18", "steps": 3, "warmup": 1, "rounds": 1, "bs": 8}
LR, MOM, WD = 1e-3, 0.9, 0.01


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(arch: str, device: torch.device) -> torch.nn.Module:
    import torchvision
    from fastai.vision.learner import create_vision_model

    torch.manual_seed(0)
    model = create_vision_model(getattr(torchvision.models, arch), n_out=2, pretrained=False)
    return model.to(device).to(memory_format=torch.channels_last)


def _fastai_optimizer(kind: str, model: torch.nn.Module):
    """The optimiser as fastai's Learner creates it (groups, do_wd=False on norm/bias)."""
    from fastai.optimizer import SGD
    from fastai.torch_core import norm_bias_params

    from pcamlib.optim import ForeachSGD

    groups = [list(model[0].parameters()), list(model[1].parameters())]
    if kind == "torch_sgd_foreach":
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM, weight_decay=WD,
                               foreach=True)
    opt_func = partial(SGD, mom=MOM) if kind == "fastai_sgd" else partial(ForeachSGD, mom=MOM)
    opt = opt_func(groups, lr=LR)
    opt.set_hypers(wd=WD)
    for p in norm_bias_params(model, True):
        opt.state[p]["do_wd"] = False
    return opt


def time_steps(kind: str, model, device, steps: int, warmup: int) -> float:
    opt = _fastai_optimizer(kind, model)
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # the parameter's layout (NHWC convolutions)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        opt.step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def time_train_steps(kind: str, model, device, steps: int, warmup: int, bs: int) -> float:
    opt = _fastai_optimizer(kind, model)
    x = torch.randn(bs, 3, 96, 96, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs,), device=device)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=benchlib.REPORTS_DIR / "optim.csv")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on the CPU (default: torch's)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    archs = (args.archs or size["archs"]).split(",")
    device = torch.device(args.device)
    benchlib.set_threads(args.threads or 0)
    kinds = ("fastai_sgd", "fastai_foreach_sgd", "torch_sgd_foreach")
    rows = []
    for arch in archs:
        model = _model(arch, device)
        n_params = sum(1 for _ in model.parameters())
        for measure, timer in (("step", time_steps), ("train_step", time_train_steps)):
            best = {k: float("inf") for k in kinds}
            for _ in range(size["rounds"]):
                for kind in kinds:
                    extra = (size["bs"],) if measure == "train_step" else ()
                    best[kind] = min(best[kind], timer(kind, model, device, size["steps"],
                                                       size["warmup"], *extra))
            for kind in kinds:
                rows.append({"arch": arch, "device": str(device), "parameters": n_params,
                             "measure": measure, "optimizer": kind,
                             "ms_per_step": round(best[kind] * 1000, 3),
                             "ratio_vs_fastai": round(best["fastai_sgd"] / best[kind], 3),
                             "batch_size": size["bs"] if measure == "train_step" else None})
                print(rows[-1], flush=True)
    benchlib.write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
