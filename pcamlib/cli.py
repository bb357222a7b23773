"""The ``pcamlib`` command line: get data, train, evaluate, reproduce the report.

Examples::

    pcamlib sample --dest data/sample
    pcamlib download --dest data/pcam
    pcamlib import folders ../shared/data/pcam-real-subset --dest data/real-subset
    pcamlib validate data/real-subset
    pcamlib train --profile real-subset --archs resnet18
    pcamlib evaluate --profile real-subset --archs resnet18
    pcamlib reproduce --profile sample

    torchrun --nproc_per_node 2 -m pcamlib train --profile sample      # 2 processes
    accelerate launch --multi_gpu --num_processes 2 -m pcamlib evaluate --profile sample

Expected failures (bad input, missing files, runs made with other settings) print one
line starting with ``error:`` and exit with status 1; anything else is a bug and shows
its traceback. ``python -m pcamlib`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from pcamlib import config
from pcamlib.errors import InputError, PcamlibError


def _overrides(pairs: list[str] | None) -> dict:
    """Parse ``--set key=value`` pairs; values are JSON when they parse, else strings."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InputError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _cmd_download(args) -> int:
    from pcamlib.download import download_pcam

    paths = download_pcam(args.dest, splits=args.splits, progress=not args.quiet)
    print(f"{len(paths)} files ready in {args.dest}")
    return 0


def _cmd_import(args) -> int:
    from pcamlib.importer import import_image_folders, import_kaggle

    on_bad = "skip" if args.skip_bad else "error"
    if args.layout == "folders":
        result = import_image_folders(args.src, args.dest, splits=args.splits, on_bad=on_bad,
                                      progress=not args.quiet)
    else:
        result = import_kaggle(args.src, args.dest, valid_fraction=args.valid_fraction,
                               test_fraction=args.test_fraction, seed=args.seed, on_bad=on_bad,
                               progress=not args.quiet)
    print(result.summary())
    return 0


def _cmd_sample(args) -> int:
    from pcamlib.sample import DEFAULT_SIZES, write_sample

    sizes = dict(DEFAULT_SIZES)
    for split in ("train", "valid", "test"):
        value = getattr(args, split)
        if value is not None:
            sizes[split] = value
    infos = write_sample(args.dest, sizes=None if args.full_size else sizes, seed=args.seed,
                         fast=args.fast, progress=not args.quiet,
                         **({"full_size": True} if args.full_size else {}))
    for split, info in infos.items():
        print(f"{split}: {info.length:,} rows, {info.positives:,} positives -> {info.x_path}")
    return 0


def _cmd_validate(args) -> int:
    from pcamlib.pcam import SPLITS, validate_split

    for split in args.splits or SPLITS:
        info = validate_split(args.data_dir, split, full_size=args.full_size)
        meta = "meta CSV" if info.meta_path else "no meta CSV"
        print(f"{split}: {info.length:,} rows, {info.positives:,} positives, {meta}: ok")
    return 0


def _profile_overrides(args) -> dict:
    """``--set`` values with ``--data-dir`` and ``--archs`` folded in (one place each)."""
    overrides = _overrides(args.set)
    if args.data_dir is not None:
        if "data_dir" in overrides and Path(str(overrides["data_dir"])) != args.data_dir:
            raise InputError(
                f"--data-dir {args.data_dir} and --set data_dir={overrides['data_dir']} "
                "disagree; give the data directory once")
        overrides["data_dir"] = args.data_dir
    if getattr(args, "archs", None):
        overrides["archs"] = args.archs
    return overrides


def _profile(args):
    from pcamlib.profiles import get_profile

    return get_profile(args.profile, **_profile_overrides(args))


def _launched_rank() -> int:
    """This process's rank under ``torchrun`` / ``accelerate launch`` (0 when not launched)."""
    return int(os.environ.get("RANK", "0") or 0)


def _cmd_train(args) -> int:
    from pcamlib.train import train

    profile = _profile(args)
    for arch in profile.archs:
        result = train(profile, arch, runs_root=args.runs_dir, progress=not args.quiet,
                       restart=args.restart)
        if _launched_rank() == 0:
            print(result.history.to_string(index=False))
            print(f"{arch}: best epoch {result.best_epoch}, {result.seconds / 60:.1f} min, "
                  f"pretrained={result.pretrained}, run in {result.run_dir}")
    return 0


def _cmd_evaluate(args) -> int:
    from pcamlib.evaluate import compare_runs

    profile = _profile(args)
    # Under a launcher every rank evaluates (each predicts its shard; rank 0 writes).
    comp = compare_runs(profile, runs_root=args.runs_dir, progress=not args.quiet)
    if _launched_rank() == 0:
        print(comp.table1.to_string(index=False))
        print(comp.verdict)
    return 0


def _cmd_record_trial(args) -> int:
    from pcamlib.selection import record_trial, trial_row

    row = trial_row(args.run_dir, args.trial, source=args.source, command=args.command,
                    other=args.other)
    path = record_trial(args.profile, row)
    print(f"{args.trial}: valid AUC {row['valid_auc']}, accuracy {row['valid_accuracy']} -> "
          f"{path}")
    return 0


def _cmd_reproduce(args) -> int:
    from pcamlib.reproduce import reproduce

    overrides = _profile_overrides(args)
    data_dir = overrides.pop("data_dir", None)
    archs = overrides.pop("archs", None)
    reproduce(args.profile, data_dir=data_dir, archs=archs, overrides=overrides,
              runs_root=args.runs_dir, kernel=args.kernel, fresh=args.fresh,
              progress=not args.quiet)
    return 0


def _cmd_refresh_notebooks(args) -> int:
    from pcamlib.reproduce import refresh_notebooks

    for path in refresh_notebooks(progress=not args.quiet):
        print(f"refreshed {path}")
    return 0


# ------------------------------------------------------- using a trained model (issue 13)


def _cmd_export(args) -> int:
    from pcamlib.deploy import export_model

    result = export_model(args.run_dir, args.out, onnx=args.onnx, threshold=args.threshold,
                          overwrite=args.overwrite)
    print(result.summary())
    return 0


def _cmd_predict(args) -> int:
    from pcamlib.deploy import predict_to_csv

    result = predict_to_csv(args.model_dir, args.inputs, args.out, tta=args.tta,
                            batch_size=args.batch_size, skip_bad=args.skip_bad,
                            progress=not args.quiet, device=args.device)
    print(result.summary())
    return 0


def _cmd_slide(args) -> int:
    from pcamlib.slide import predict_slide

    result = predict_slide(args.model_dir, args.slide, args.out, level=args.level,
                           stride=args.stride, tta=args.tta, min_tissue=args.min_tissue,
                           batch_size=args.batch_size, thumbnail_side=args.thumbnail_size,
                           overwrite=args.overwrite, progress=not args.quiet,
                           device=args.device, backend=args.backend)
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pcamlib`` command."""
    from pcamlib.pcam import SPLITS
    from pcamlib.profiles import ARCHITECTURES, PROFILES

    parser = argparse.ArgumentParser(prog="pcamlib", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        # No abbreviations: with them --arch silently meant --archs.
        return sub.add_parser(name, help=text, allow_abbrev=False)

    def quiet(p):
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("download", "download the official PCam files (Zenodo 2546921)")
    p.add_argument("--dest", type=Path, default=config.PCAM_DATA_DIR)
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    quiet(p)
    p.set_defaults(func=_cmd_download)

    p = command("import", "build PCam-format HDF5 from image folders or Kaggle")
    p.add_argument("layout", choices=["folders", "kaggle"],
                   help="folders: SRC/{split}/{0,1}/*.jpg|png|tif; kaggle: SRC/train/<id>.tif "
                        "+ SRC/train_labels.csv")
    p.add_argument("src", type=Path)
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--splits", nargs="+", choices=SPLITS, help="folders: splits to import")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and list) unreadable or non-96x96 images instead of failing")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="kaggle: valid share")
    p.add_argument("--test-fraction", type=float, default=0.1, help="kaggle: test share")
    p.add_argument("--seed", type=int, default=0, help="kaggle: split seed")
    quiet(p)
    p.set_defaults(func=_cmd_import)

    p = command("sample", "write the embedded generated PCam-format dataset")
    p.add_argument("--dest", type=Path, default=config.SAMPLE_DATA_DIR)
    p.add_argument("--seed", type=int, default=0)
    for split in SPLITS:
        p.add_argument(f"--{split}", type=int, help=f"rows in {split}")
    p.add_argument("--full-size", action="store_true", help="official sizes (262,144 train)")
    p.add_argument("--fast", action="store_true",
                   help="tile a small pool of patches (for throughput benchmarks)")
    quiet(p)
    p.set_defaults(func=_cmd_sample)

    p = command("validate", "check a PCam-format directory")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--splits", nargs="+", choices=SPLITS)
    p.add_argument("--full-size", action="store_true", help="require the official lengths")
    p.set_defaults(func=_cmd_validate)

    for name, func, text in (("train", _cmd_train, "train architectures (resumable)"),
                             ("evaluate", _cmd_evaluate, "evaluate and compare finished runs"),
                             ("reproduce", _cmd_reproduce, "run the notebooks into reports/")):
        p = command(name, text)
        p.add_argument("--profile", choices=list(PROFILES), default="sample")
        p.add_argument("--data-dir", type=Path, help="PCam-format data (default: profile's)")
        p.add_argument("--archs", nargs="+", choices=ARCHITECTURES,
                       help="architectures (default: the profile's)")
        p.add_argument("--runs-dir", type=Path, help="runs root (default: runs/)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a profile field, e.g. --set epochs=3 (repeatable)")
        quiet(p)
        p.set_defaults(func=func)
        if name == "train":
            p.add_argument("--restart", action="store_true",
                           help="set an existing run aside and start over")
        if name == "reproduce":
            p.add_argument("--kernel", default="python3", help="Jupyter kernel")
            p.add_argument("--fresh", action="store_true",
                           help="train again instead of reusing finished runs")
    p = command("record-trial", "add a selection trial (evaluated on valid only) to "
                "reports/selection/<profile>_trials.csv")
    p.add_argument("run_dir", type=Path, help="runs/<profile>/<arch> of the trial")
    p.add_argument("--trial", required=True, help="the trial's name")
    p.add_argument("--profile", choices=list(PROFILES), default="real-subset",
                   help="whose recipe the trial informs")
    p.add_argument("--source", required=True, help="where it ran, e.g. the commit")
    p.add_argument("--command", required=True, help="the command that repeats it")
    p.add_argument("--other", default="", help="settings the other columns do not show")
    p.set_defaults(func=_cmd_record_trial)

    p = command("refresh-notebooks",
                "re-execute notebooks/ in place with their defaults (sample)")
    quiet(p)
    p.set_defaults(func=_cmd_refresh_notebooks)

    # ---- using a trained model (issue 13): pcamlib/deploy.py and pcamlib/slide.py
    p = sub.add_parser("export", help="write a finished run as a model folder (safetensors + "
                                      "JSON, optional ONNX)")
    p.add_argument("run_dir", type=Path, help="runs/<profile>/<arch> of a finished run")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (uint8 patches in, probabilities out), checked "
                        "against PyTorch with onnxruntime")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="tumour probability at or above which pred is 1 (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("predict", help="predict 96x96 patches: image files or folders, PCam "
                                       "HDF5 files or directories, Kaggle train/")
    p.add_argument("model_dir", type=Path, help="model folder made by `pcamlib export`")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file (jpg/png/tif), folder (searched recursively), PCam-format "
                        "directory or _x.h5 file")
    p.add_argument("--out", type=Path, required=True,
                   help="CSV to write: path,row,prob_tumour,pred")
    p.add_argument("--tta", action="store_true", help="average the 8 dihedral views")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and list) unreadable or non-96x96 images instead of failing")
    p.add_argument("--batch-size", type=int, default=128, help="patches per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: GPU if any)")
    quiet(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("slide", help="tile a whole-slide image, predict every tissue tile, "
                                     "write tiles.csv, a heatmap and the probability grid")
    p.add_argument("model_dir", type=Path, help="model folder made by `pcamlib export`")
    p.add_argument("slide", type=Path, help="TIFF/OME-TIFF (tifffile) or any OpenSlide format")
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.add_argument("--level", type=int, default=0,
                   help="pyramid level the 96 px tiles are cut from (default 0; PCam is 10x, "
                        "level 2 of a 40x Camelyon16 scan)")
    p.add_argument("--stride", type=int, default=96,
                   help="step between tiles, pixels of --level (default 96: adjacent)")
    p.add_argument("--tta", action="store_true", help="average the 8 dihedral views")
    p.add_argument("--min-tissue", type=float, default=0.5,
                   help="smallest tissue fraction of a tile (Otsu mask) to predict it; "
                        "0 predicts every tile (default 0.5)")
    p.add_argument("--thumbnail-size", type=int, default=2048,
                   help="longer side of the thumbnail for the mask and heatmap (default 2048)")
    p.add_argument("--batch-size", type=int, default=128, help="tiles per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: GPU if any)")
    p.add_argument("--backend", choices=["auto", "tifffile", "openslide"], default="auto",
                   help="slide reader (default auto: tifffile for TIFF files it decodes, "
                        "else OpenSlide)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    quiet(p)
    p.set_defaults(func=_cmd_slide)
    return parser


MULTI_PROCESS_COMMANDS = ("train", "evaluate")
"""Commands that run under ``torchrun`` / ``accelerate launch`` with several processes."""


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)  # set by torchrun / accelerate
    # Under a launcher every process prints its own errors: say which one it is.
    where = f"[rank {_launched_rank()} of {world}] " if world > 1 else ""
    try:
        if world > 1 and args.command not in MULTI_PROCESS_COMMANDS:
            raise InputError(
                f"pcamlib {args.command} was launched as {world} processes (WORLD_SIZE="
                f"{world}); only {' and '.join(MULTI_PROCESS_COMMANDS)} run in several "
                "processes. Run it as one process")
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except PcamlibError as err:
        # Expected failures carry a message that says what to fix; anything else is a
        # bug, and its traceback is what a bug report needs.
        print(f"error: {where}{err}", file=sys.stderr)
        return 1
    finally:
        if world > 1:
            from pcamlib.distributed import finish

            finish()


if __name__ == "__main__":
    sys.exit(main())
