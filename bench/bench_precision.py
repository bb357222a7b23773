"""CPU training step in bf16 (``mixed_precision="bf16"``) vs fp32, side by side.

For each architecture (``--archs``; fastai's ``create_vision_model``, 2 outputs, NHWC, the
pcamlib optimiser) one training step on a batch of ``--bs`` random 96 x 96 patches is
timed as :class:`pcamlib.learner.CpuBf16Training` runs it: forward and loss under
``torch.autocast("cpu", torch.bfloat16)``, prediction cast back to fp32, backward and
optimiser step outside, or all of it in fp32. The two sides alternate over ``--rounds``
rounds and each keeps its best round, so other load hits both alike.

``ratio_vs_fp32`` = fp32 time / bf16 time (> 1: bf16 faster). It depends on the CPU:
oneDNN has bf16 kernels on CPUs with AMX or AVX512-BF16 (the ``cpu_bf16_units`` column
lists what this one has). A CPU without them can be imitated on one that has them by capping
oneDNN's instruction set, e.g. ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI`` or ``AVX2`` (the
``onednn_max_isa`` column records the cap).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402 - sets sys.path for pcamlib
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pcamlib.learner import cpu_bf16_units  # noqa: E402

FULL = {"archs": "resnet18,densenet121", "steps": 8, "warmup": 2, "rounds": 3, "bs": 64}
QUICK = {"archs": "resnet18", "steps": 2, "warmup": 1, "rounds": 1, "bs": 8}


def _model(arch: str) -> torch.nn.Module:
    import torchvision
    from fastai.vision.learner import create_vision_model

    torch.manual_seed(0)
    model = create_vision_model(getattr(torchvision.models, arch), n_out=2, pretrained=False)
    return model.to(memory_format=torch.channels_last).train()


def time_train_steps(model, precision: str, steps: int, warmup: int, bs: int) -> float:
    from pcamlib.optim import ForeachSGD

    opt = ForeachSGD(list(model.parameters()), lr=1e-3, mom=0.9)
    x = torch.randn(bs, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs,))
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            pred = model(x).float()
            loss = torch.nn.functional.cross_entropy(pred, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - t0) / steps


def measure(archs: list[str], size: dict) -> list[dict]:
    """fp32 and bf16 rows for each architecture, in this process."""
    units = cpu_bf16_units()
    rows = []
    for arch in archs:
        model = _model(arch)
        best = {"fp32": float("inf"), "bf16": float("inf")}
        for _ in range(size["rounds"]):
            for precision in best:
                best[precision] = min(best[precision], time_train_steps(
                    model, precision, size["steps"], size["warmup"], size["bs"]))
        for precision, seconds in best.items():
            rows.append({"arch": arch, "device": "cpu", "precision": precision,
                         "batch_size": size["bs"], "threads": torch.get_num_threads(),
                         "ms_per_step": round(seconds * 1000, 2),
                         "ratio_vs_fp32": round(best["fp32"] / seconds, 3),
                         "cpu_bf16_units": units,
                         "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=benchlib.REPORTS_DIR / "precision.csv")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--archs", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's)")
    parser.add_argument("--isa-caps", default=None,
                        help="comma-separated oneDNN instruction-set caps to measure besides "
                             "this CPU's own ('' = uncapped), each in its own process; "
                             "default AVX512_CORE_VNNI (no bf16 units), none with --quick")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    benchlib.set_threads(args.threads or 0)
    archs = (args.archs or size["archs"]).split(",")
    rows = measure(archs, size)
    caps = args.isa_caps if args.isa_caps is not None else ("" if args.quick
                                                            else "AVX512_CORE_VNNI")
    for cap in filter(None, [] if args.child else caps.split(",")):
        # oneDNN reads the cap once, when it first dispatches: only a new process obeys it
        part = args.out.with_name(f".{args.out.stem}.{cap}.csv")
        cmd = [sys.executable, __file__, "--child", "--out", str(part), "--archs", ",".join(archs),
               *(["--quick"] if args.quick else []),
               *(["--threads", str(args.threads)] if args.threads else [])]
        subprocess.run(cmd, check=True, env={**os.environ, "ONEDNN_MAX_CPU_ISA": cap})
        rows += pd.read_csv(part, keep_default_na=False).to_dict("records")
        part.unlink()
    benchlib.write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
