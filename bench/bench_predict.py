"""Inference with an exported model: ``pcamlib predict`` and ``pcamlib slide`` vs the bare model.

A model folder is exported from a hand-written run directory holding random weights
(``--arch``, default resnet18, whole 96x96 patches; speed does not depend on the weights),
then loaded once with ``pcamlib.deploy.load_model``.

Predict: ``--rows`` generated patches (default 1,024) are predicted end to end by
``predict_to_csv`` (input discovery, reading, the evaluation pipeline, forward, softmax,
CSV written atomically) from a PCam-format ``_x.h5`` file and from a folder of JPEG files
of the same patches, in batches of ``--bs``. The baseline, ``bare_forward``, is the
network alone on the same batches already normalised in memory (forward, softmax,
copy back). After one untimed warm-up of each, the three take turns over ``--rounds``
rounds and the best of each is reported; ``ratio_vs_bare`` is images/s over the bare
forward's (target >= 0.9: reading, decoding and writing cost at most a tenth).

Slide: synthetic slides (white glass with shaded tiles, three elliptical tissue areas
covering about 10% of the slide, textured with generated H&E-like patches) are written
as tiled TIFFs (256 px tiles, deflate) in a temporary folder, at two sizes (default
10,000 and 20,000 px square; ``--quick``: 4,096 and 8,192). Each is run through
``predict_slide`` (level 0, stride 96, tissue mask from a 2,048 px thumbnail) in a fresh
child process that records its peak RSS (``VmHWM``) after loading the model
(``baseline``) and after the slide. ``items_per_s`` is tiles predicted per second of the
inference pass (thumbnail and mask excluded; ``seconds`` is the whole run), and
``ratio_vs_bare`` that rate over the bare forward's measured in the same child just
before and after the slide (four batches of generated patches). The target is that
peak memory does not grow with the slide: the larger slide's peak may exceed the
smaller's by at most 100 MB (its area is 4x).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402 - sets sys.path for pcamlib
import numpy as np  # noqa: E402

MIN_RATIO = 0.9  # predict / bare forward
MAX_RSS_GROWTH_MB = 100.0  # larger slide's peak minus smaller slide's
FULL = {"rows": 1024, "rounds": 2, "slides": (10_000, 20_000)}
# Even the quick slides hold several full batches of tissue tiles: a slide with fewer
# tiles than one batch would need less activation memory and flatter the comparison.
QUICK = {"rows": 128, "rounds": 1, "slides": (4096, 8192)}
SLIDE_TILE = 256  # TIFF tile side
_ELLIPSES = ((0.3, 0.3, 0.12, 0.09), (0.7, 0.45, 0.10, 0.12), (0.4, 0.75, 0.13, 0.08))
MB = 1e6


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def make_model_folder(root: Path, arch: str) -> Path:
    """Export a model folder from a run directory written here with random weights."""
    import torch

    from pcamlib.data import IMAGENET_STATS
    from pcamlib.deploy import build_model, export_model

    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    mean, std = IMAGENET_STATS
    (run_dir / "params.json").write_text(json.dumps({
        "identity": {"arch": arch, "centre_crop": None, "train_rows": None},
        "resolved": {"normalisation": {"source": "imagenet", "mean": list(mean),
                                       "std": list(std)}},
        "data_dir": None}))
    (run_dir / "run.json").write_text(json.dumps({"complete": True, "best_epoch": 0}))
    torch.manual_seed(0)
    torch.save(build_model(arch).state_dict(), run_dir / "best.pth")
    export_model(run_dir, root / "model")
    return root / "model"


def write_synthetic_slide(path: Path, side: int, seed: int = 0) -> Path:
    """A ``side`` x ``side`` px tiled TIFF, generated tile by tile (bounded memory)."""
    import tifffile

    from pcamlib.sample import generate_patches

    pool = generate_patches(121, seed=seed).images
    texture = pool.reshape(11, 11, 96, 96, 3).transpose(0, 2, 1, 3, 4).reshape(1056, 1056, 3)
    shades = np.random.default_rng(seed).integers(238, 251, (64, 64), dtype=np.uint8)
    t = SLIDE_TILE

    def tiles():
        for top in range(0, side, t):
            ys = (np.arange(top, top + t) / side)[:, None]
            for left in range(0, side, t):
                xs = (np.arange(left, left + t) / side)[None, :]
                tile = np.full((t, t, 3), shades[top // t % 64, left // t % 64], np.uint8)
                inside = np.zeros((t, t), bool)
                for cx, cy, rx, ry in _ELLIPSES:
                    inside |= ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
                if inside.any():
                    rows = np.arange(top, top + t) % texture.shape[0]
                    cols = np.arange(left, left + t) % texture.shape[1]
                    tile[inside] = texture[np.ix_(rows, cols)][inside]
                yield tile

    tifffile.imwrite(path, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(t, t),
                     photometric="rgb", compression="zlib", compressionargs={"level": 1},
                     bigtiff=True)
    return path


def _bare_forward_rate(classifier, batches: list) -> float:
    """Images/s of the network alone on already normalised batches (forward, softmax, copy)."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        for xb in batches:
            torch.softmax(classifier.model(xb).float(), dim=1)[:, 1].cpu()
        seconds = time.perf_counter() - t0
    return sum(len(xb) for xb in batches) / seconds


def _normalised_batches(classifier, images: np.ndarray, bs: int) -> list:
    import torch
    from fastai.torch_core import TensorImage

    with torch.inference_mode():
        return [torch.Tensor(classifier.pipeline(TensorImage(
            torch.from_numpy(images[i:i + bs]).to(classifier.device))))
            for i in range(0, len(images), bs)]


def _child_slide(args) -> None:
    """Measure one slide in this (fresh) process; print one JSON line.

    The bare forward runs here too, just before and just after the slide, on four
    batches of generated patches, so the slide's ratio compares two things measured
    side by side (another process's load on shared cores changes over minutes).
    """
    import torch

    from pcamlib.deploy import load_model
    from pcamlib.slide import predict_slide

    benchlib.set_threads(args.threads)
    classifier = load_model(args.model, device=torch.device(args.device or "cpu"))
    rng = np.random.default_rng(0)
    ready = _normalised_batches(
        classifier, rng.integers(0, 256, (4 * args.bs, 96, 96, 3), dtype=np.uint8), args.bs)
    _bare_forward_rate(classifier, ready[:1])  # warm-up
    baseline = _peak_rss_mb()
    before = _bare_forward_rate(classifier, ready)
    with tempfile.TemporaryDirectory(prefix="bench-slide-out-") as tmp:
        result = predict_slide(classifier, args.child_slide, Path(tmp) / "out",
                               batch_size=args.bs, progress=False)
    after = _bare_forward_rate(classifier, ready)
    print(json.dumps({"baseline_mb": baseline, "peak_mb": _peak_rss_mb(),
                      "tiles": result.tiles, "grid": list(result.grid_shape),
                      "seconds": result.seconds, "tiles_per_s": result.tiles_per_s,
                      "bare_per_s": (before + after) / 2}))


def _measure_predict(classifier, h5_file: Path, jpeg_dir: Path, images: np.ndarray,
                     bs: int, rounds: int, out_csv: Path) -> dict[str, tuple[float, float]]:
    """Best (seconds, images/s) of bare forward, predict from HDF5, predict from JPEG."""
    from pcamlib.deploy import predict_to_csv

    ready = _normalised_batches(classifier, images, bs)
    runs = {
        "bare_forward": lambda: _bare_forward_rate(classifier, ready),
        "predict_hdf5": lambda: predict_to_csv(classifier, [h5_file], out_csv, batch_size=bs,
                                               progress=False),
        "predict_jpeg": lambda: predict_to_csv(classifier, [jpeg_dir], out_csv, batch_size=bs,
                                               progress=False),
    }
    for run in runs.values():  # warm-up: first calls allocate and pick kernels
        run()
    best: dict[str, tuple[float, float]] = {}
    for round_ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            seconds = time.perf_counter() - t0
            rate = len(images) / seconds
            print(f"  round {round_ + 1} {name:13s}: {rate:8.1f} img/s", flush=True)
            if name not in best or rate > best[name][1]:
                best[name] = (seconds, rate)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--arch", default="resnet18", help="torchvision architecture")
    parser.add_argument("--rows", type=int, default=None,
                        help=f"patches predicted (default {FULL['rows']:,})")
    parser.add_argument("--bs", type=int, default=128, help="patches per forward pass")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"alternating rounds, best reported (default {FULL['rounds']})")
    parser.add_argument("--slides", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                        help=f"slide sides in px (default {FULL['slides'][0]} "
                             f"{FULL['slides'][1]})")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: GPU if present)")
    parser.add_argument("--threads", type=int, default=1, help=benchlib.THREADS_HELP)
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes: {QUICK}")
    parser.add_argument("--out", type=Path, default=benchlib.REPORTS_DIR / "predict.csv",
                        help="CSV path (default: %(default)s)")
    parser.add_argument("--child-slide", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_slide:
        _child_slide(args)
        return 0
    base = QUICK if args.quick else FULL
    rows = args.rows or base["rows"]
    rounds = args.rounds or base["rounds"]
    slide_sides = tuple(args.slides or base["slides"])
    threads = benchlib.set_threads(args.threads)

    import torch
    from PIL import Image

    from pcamlib.data import default_device
    from pcamlib.deploy import load_model
    from pcamlib.pcam import PCamSplit, file_name

    device = torch.device(args.device) if args.device else default_device()
    table = []
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        model_dir = make_model_folder(tmp, args.arch)
        classifier = load_model(model_dir, device=device)
        benchlib.write_split(tmp / "data", "valid", rows, seed=1)
        images = PCamSplit(tmp / "data", "valid").read_images(np.arange(rows))
        jpeg_dir = tmp / "jpeg"
        jpeg_dir.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(jpeg_dir / f"patch{i:07d}.jpg", quality=90)
        print(f"bench_predict: {args.arch} on {device}, {rows:,} patches, batch {args.bs}, "
              f"torch threads={threads}", flush=True)
        best = _measure_predict(classifier, tmp / "data" / file_name("valid", "x"), jpeg_dir,
                                images, args.bs, rounds, tmp / "preds.csv")
        bare_rate = best["bare_forward"][1]
        common = {"arch": args.arch, "device": str(device), "batch_size": args.bs,
                  "torch_threads": threads}
        for name, (seconds, rate) in best.items():
            table.append({"measure": "predict", "input": name, **common, "items": rows,
                          "seconds": round(seconds, 3), "items_per_s": round(rate, 1),
                          "ratio_vs_bare": round(rate / bare_rate, 4)})
        del classifier, images

        for side in slide_sides:
            path = tmp / f"slide-{side}.tif"
            t0 = time.perf_counter()
            write_synthetic_slide(path, side)
            print(f"  slide {side:,} x {side:,} px written in {time.perf_counter() - t0:.0f} s "
                  f"({path.stat().st_size / MB:,.0f} MB)", flush=True)
            cmd = [sys.executable, __file__, "--child-slide", str(path), "--model",
                   str(model_dir), "--bs", str(args.bs), "--threads", str(args.threads),
                   *(["--device", str(device)] if args.device else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"slide child failed:\n{proc.stdout}\n{proc.stderr}")
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  slide {side:,} px: {got['tiles']:,} tiles, {got['tiles_per_s']:.1f} "
                  f"tiles/s, peak RSS {got['peak_mb']:,.0f} MB (baseline "
                  f"{got['baseline_mb']:,.0f} MB)", flush=True)
            table.append({"measure": "slide", "input": f"{side}x{side}", **common,
                          "items": got["tiles"], "seconds": round(got["seconds"], 3),
                          "items_per_s": round(got["tiles_per_s"], 1),
                          "ratio_vs_bare": round(got["tiles_per_s"] / got["bare_per_s"], 4),
                          "peak_rss_mb": round(got["peak_mb"], 1),
                          "baseline_rss_mb": round(got["baseline_mb"], 1)})
            path.unlink()
    frame = benchlib.write_csv(table, args.out)
    pred = frame[frame.measure == "predict"].set_index("input").ratio_vs_bare
    for name in ("predict_hdf5", "predict_jpeg"):
        verdict = "PASS" if pred[name] >= MIN_RATIO else "FAIL"
        print(f"{name}/bare_forward {args.arch}: {pred[name]:.3f} (target >= {MIN_RATIO}): "
              f"{verdict}")
    slides = frame[frame.measure == "slide"]
    growth = float(slides.peak_rss_mb.iloc[-1] - slides.peak_rss_mb.iloc[0])
    print(f"slide peak RSS growth {slides.input.iloc[0]} -> {slides.input.iloc[-1]}: "
          f"{growth:+.0f} MB (target <= {MAX_RSS_GROWTH_MB:.0f}): "
          f"{'PASS' if growth <= MAX_RSS_GROWTH_MB else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
