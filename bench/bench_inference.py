"""Evaluation speed: ``predict_probs`` with and without 8-way dihedral TTA.

A Learner is built exactly as training builds it (``build_learner`` on the ``sample``
profile, random initial weights, the validation pipeline: uint8 batches to normalised
float, no augmentation) over a small generated PCam-format folder, and
``pcamlib.evaluate.predict_probs`` predicts its ``valid`` split (``--rows`` rows,
default 1,024), plain and with TTA (the model sees each batch under all 8 flips and
90-degree rotations and the softmax outputs are averaged). After one untimed warm-up
call of each kind the two take turns over ``--rounds`` rounds; the best of each is
reported.

How to read it: ``images_per_s`` counts patches predicted; ``ratio_vs_plain`` of the
``tta`` row is TTA / plain, about 1/8 (0.125) when the model dominates the cost. A
ratio well below 0.1 would mean TTA adds work beyond its eight forward passes; well
above 0.125, that loading and transfers weigh more than the model (typical on a GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402 - sets sys.path for pcamlib

EXPECTED_RATIO = 1 / 8  # eight forward passes per patch
MIN_RATIO = 0.10  # PASS: TTA costs at most ten plain passes
FULL = {"rows": 1024, "rounds": 2}
QUICK = {"rows": 128, "rounds": 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--arch", default="resnet18", help="torchvision architecture")
    parser.add_argument("--rows", type=int, default=None,
                        help=f"valid rows predicted (default {FULL['rows']:,})")
    parser.add_argument("--bs", type=int, default=64,
                        help="training batch size; prediction uses 2 x bs, as in training")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"alternating rounds, best reported (default {FULL['rounds']})")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: GPU if present)")
    parser.add_argument("--threads", type=int, default=1, help=benchlib.THREADS_HELP)
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes: {QUICK}")
    parser.add_argument("--out", type=Path, default=benchlib.REPORTS_DIR / "inference.csv",
                        help="CSV path (default: %(default)s)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    rows = args.rows or base["rows"]
    rounds = args.rounds or base["rounds"]
    threads = benchlib.set_threads(args.threads)

    import torch

    from pcamlib.data import IMAGENET_STATS, default_device
    from pcamlib.evaluate import predict_probs
    from pcamlib.learner import PretrainedChoice, build_learner
    from pcamlib.pcam import PCamSplit
    from pcamlib.profiles import get_profile

    device = torch.device(args.device) if args.device else default_device()
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        data_dir = Path(tmp) / "data"
        benchlib.write_split(data_dir, "train", 2 * args.bs, seed=0)  # needed by the Learner
        benchlib.write_split(data_dir, "valid", rows, seed=1)
        profile = get_profile("sample", data_dir=data_dir, archs=[args.arch], pretrained="no",
                              bs=args.bs)
        mean, std = IMAGENET_STATS
        learn = build_learner(profile, args.arch, run_dir=Path(tmp) / "run",
                              pretrained=PretrainedChoice(False, "", "benchmark"),
                              norm={"mean": list(mean), "std": list(std)}, device=device,
                              progress=False)
        data = PCamSplit(data_dir, "valid")
        warm = PCamSplit(data_dir, "valid", rows=min(rows, learn.dls.valid.bs))
        predict_probs(learn, warm)
        predict_probs(learn, warm, tta=True)
        print(f"bench_inference: {args.arch} on {device}, {rows:,} rows, "
              f"batch {learn.dls.valid.bs}, torch threads={threads}", flush=True)
        best: dict[str, tuple[float, float]] = {}
        for round_ in range(rounds):
            for variant in ("plain", "tta"):
                t0 = time.perf_counter()
                probs = predict_probs(learn, data, tta=variant == "tta")
                seconds = time.perf_counter() - t0
                assert len(probs) == rows
                rate = rows / seconds
                print(f"  round {round_ + 1} {variant:5s}: {rate:8.1f} img/s", flush=True)
                if variant not in best or rate > best[variant][1]:
                    best[variant] = (seconds, rate)
    table = [{"arch": args.arch, "variant": v, "device": str(device), "rows": rows,
              "seconds": round(best[v][0], 3), "images_per_s": round(best[v][1], 1),
              "ratio_vs_plain": round(best[v][1] / best["plain"][1], 4),
              "torch_threads": threads} for v in ("plain", "tta")]
    benchlib.write_csv(table, args.out)
    r = table[1]["ratio_vs_plain"]
    print(f"TTA/plain {args.arch}: {r:.3f} (expected about {EXPECTED_RATIO:.3f}; "
          f">= {MIN_RATIO}): {'PASS' if r >= MIN_RATIO else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
