"""Regenerate a profile's report by running the notebooks headless with papermill.

The report is built in a temporary folder beside ``reports/<profile>`` and swapped in only
when every notebook succeeded, so a failure never leaves a half-written report: the
previous complete one stays, and the failed attempt is kept in
``reports/.failed-<profile>/`` for inspection.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import nbformat
import papermill as pm

from pcamlib import config
from pcamlib.errors import InputError, StepError
from pcamlib.pcam import SPLITS, file_name
from pcamlib.profiles import get_profile

NOTEBOOKS: tuple[str, ...] = (
    "01_data_exploration", "02_augmentation_preview", "03_lr_find", "04_train", "05_evaluate",
)
"""The notebooks in order; ``04_train`` runs once per architecture."""

PACKAGES = ("pcamlib", "torch", "torchvision", "fastai", "fastcore", "h5py", "numpy", "pandas",
            "scikit-learn", "scipy", "matplotlib", "seaborn", "papermill", "nbval")
"""Packages whose versions the manifest records."""


class ReproduceError(StepError):
    """A notebook failed; the message names it and the failing cell."""


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The names and defaults of a notebook's ``parameters`` cell (via papermill)."""
    return {name: info["default"] for name, info in pm.inspect_notebook(str(path)).items()}


def check_parameters(path: Path, params: dict[str, Any]) -> None:
    """Fail on a parameter the notebook does not declare (papermill only warns).

    Raises:
        ValueError: naming the notebook, the unknown names and the declared ones.
    """
    declared = notebook_parameters(path)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise InputError(
            f"{path.name}: unknown parameter(s) {unknown}; it declares {sorted(declared)}"
        )


def strip_timing(nb_path: Path) -> None:
    """Remove papermill's timing metadata and execution timestamps (noise in diffs)."""
    nb = nbformat.read(nb_path, as_version=4)
    pm_meta = nb.metadata.get("papermill", {})
    for key in ("start_time", "end_time", "duration", "exception"):
        pm_meta.pop(key, None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cpm = cell.metadata.get("papermill", {})
        for key in ("start_time", "end_time", "duration", "exception", "status"):
            cpm.pop(key, None)
        if not cpm:
            cell.metadata.pop("papermill", None)
    nbformat.write(nb, nb_path)


def _failed_cell(nb_path: Path) -> str:
    try:
        nb = nbformat.read(nb_path, as_version=4)
    except Exception:  # noqa: BLE001 - the notebook may not have been written at all
        return "unknown cell"
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                return f"cell {index} ({first!r})"
    return "unknown cell"


@dataclass
class NotebookRun:
    """One executed notebook: name, output path, parameters, seconds."""

    name: str
    output: Path
    parameters: dict[str, Any]
    seconds: float


def run_notebook(name: str, output: Path, params: dict[str, Any], *, kernel: str = "python3",
                 progress: bool = True) -> NotebookRun:
    """Execute ``notebooks/<name>.ipynb`` into ``output`` with ``params``.

    Raises:
        ReproduceError: naming the notebook and the failing cell.
    """
    source = config.NOTEBOOKS_DIR / f"{name}.ipynb"
    check_parameters(source, params)
    start = time.time()
    try:
        pm.execute_notebook(str(source), str(output), parameters=params, kernel_name=kernel,
                            cwd=str(config.NOTEBOOKS_DIR), progress_bar=progress,
                            log_output=False)
    except pm.PapermillExecutionError as err:
        raise ReproduceError(
            f"notebook {name} failed in {_failed_cell(output)} (execution count "
            f"{err.exec_count}): {err.ename}: {err.evalue}. Executed copy: {output}"
        ) from err
    strip_timing(output)
    return NotebookRun(name, output, params, round(time.time() - start, 1))


def _md5(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.md5()  # noqa: S324 - a checksum, not security
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_digest(package_dir: Path | None = None) -> str:
    """SHA-256 of ``pcamlib/``'s Python sources (paths and contents, in sorted order).

    The manifest records it, so a test can tell whether a committed report was made by
    the code beside it, with or without git.
    """
    package_dir = Path(package_dir or config.REPO_ROOT / "pcamlib")
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(path.relative_to(package_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def displayed_paths(text: str) -> str:
    """``text`` with the project's and the home folder's absolute paths shortened.

    Reports are committed and shared; the absolute paths of the machine that made them
    say nothing to a reader and differ on every machine. A path inside the project
    becomes project-relative (the project itself ``.``), one in the home folder starts
    with ``~``. A folder whose name only starts like the project's (``main-old`` beside
    ``main``) is left alone.
    """
    for root, inside, itself in ((config.REPO_ROOT, "", "."), (Path.home(), "~/", "~")):
        shown = str(root.resolve())
        if shown == os.sep:
            continue
        text = re.sub(re.escape(shown + os.sep), inside, text)
        text = re.sub(re.escape(shown) + r"(?![\w.-])", itself, text)
    return text


def display_path(path: str | os.PathLike) -> str:
    """A path as a report shows it: relative to the project, else under ``~``, else as is."""
    return displayed_paths(str(Path(path).expanduser().resolve()))


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=config.REPO_ROOT,
                             capture_output=True, text=True, check=True)
        # Only what makes a report counts: a report folder awaiting its commit does not.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "pcamlib", "notebooks", "pyproject.toml"],
                               cwd=config.REPO_ROOT, capture_output=True, text=True).stdout
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numeric_platform() -> dict[str, Any]:
    """What decides the exact floating-point results of a CPU run on this machine.

    The same values here give bit-identical sample runs; other CPUs, kernel sets (AVX2 vs
    AVX-512) or thread counts reorder reductions and move the metrics slightly.
    """
    import torch

    return {"cpu_model": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "torch": torch.__version__}


def _hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                            **numeric_platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def build_manifest(profile, runs_root: Path, runs: list[NotebookRun], seconds: float) -> dict:
    """Everything needed to repeat the report: versions, commit, data checksums, seeds, runs."""
    data_dir = Path(profile.data_dir)
    checksums = {}
    for split in SPLITS:
        for kind in ("x", "y", "meta"):
            path = data_dir / file_name(split, kind)
            if path.is_file():
                checksums[path.name] = {"md5": _md5(path), "bytes": path.stat().st_size}
    run_info = {}
    for arch in profile.archs:
        path = runs_root / profile.name / arch / "run.json"
        if path.is_file():
            run_info[arch] = json.loads(displayed_paths(path.read_text()))
    prof = profile.to_dict()
    prof["data_dir"] = display_path(prof["data_dir"])
    return {
        "profile": prof,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "duration_seconds": round(seconds, 1),
        "git_commit": _git_commit(),
        "pcamlib_sha256": source_digest(),
        "versions": _versions(),
        "hardware": _hardware(),
        "data_checksums": checksums,
        "seed": profile.seed,
        "runs": run_info,
        "notebooks": [{"name": r.output.name, "seconds": r.seconds} for r in runs],
    }


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


_FIGURE_TITLES = {
    "class_balance": "Class balance per split",
    "figure1_samples": "Figure 1: random training patches",
    "intensity_distributions": "Intensity distributions by class",
    "augmentations": "Augmentations, alone and together",
    "figure2_loss_curves": "Figure 2: training and validation loss",
    "figure3_roc_test": "Figure 3: ROC curves, test split",
    "figure4_roc_valid": "Figure 4: ROC curves, valid split",
    "confusion_matrices": "Confusion matrices, test split",
    "reliability": "Calibration: reliability diagram and predicted probabilities",
    "operating_points": "Sensitivity at fixed specificity, specificity at fixed sensitivity",
    "per_slide": "Accuracy per slide",
}

# Figures drawn once per architecture: file ``<prefix>_<arch>.png``.
_ARCH_FIGURE_TITLES = {
    "gradcam": "Grad-CAM, {arch}: true and false positives and negatives (centre 32x32 marked)",
    "top_errors": "Most confident errors, {arch} (centre 32x32 marked)",
    "loss_curves": "Training and validation loss, {arch}",
    "lr_find": "lr_find, {arch}",
}


def figure_title(stem: str) -> str:
    """The heading a report figure gets in ``REPORT.md``, from its file name."""
    if stem in _FIGURE_TITLES:
        return _FIGURE_TITLES[stem]
    for prefix, title in _ARCH_FIGURE_TITLES.items():
        if stem.startswith(prefix + "_"):
            return title.format(arch=stem[len(prefix) + 1:])
    return stem.replace("_", " ")

_TABLE_ORDER = ("table1", "study_claims", "differences_from_study", "table1_vs_study",
                "paired_tests", "selection_trials", "calibration", "operating_points",
                "split_sizes", "channel_stats", "wsi_counts", "learning_rates",
                "augmentation_settings")


def _recipe_section(manifest: dict) -> list[str]:
    """What ran: models and why, optimiser, momentum and LR schedules, early stopping."""
    prof = manifest["profile"]
    lines = ["## Recipe: what ran", ""]
    if prof.get("arch_note"):
        lines += [f"**Models.** {prof['arch_note']}", ""]
    recipes = {a: r["recipe"] for a, r in manifest["runs"].items() if "recipe" in r}
    if not recipes:
        return lines
    first = next(iter(recipes.values()))
    default = tuple(first["moms"]) == (0.95, 0.85, 0.95)
    source = ("fastai's default, as the study ran" if default
              else "changed from fastai's default with --set moms=...")
    lines += [f"**Optimiser.** {first['optimizer']}; batch size {first['batch_size']}, "
              "cross-entropy loss.", "",
              f"**Momentum.** The study quotes \"SGD, momentum 0.9\" and trained with fastai's "
              "`lr_find` and `fine_tune`, whose one-cycle schedule sets the momentum at every "
              "batch (0.95 -> 0.85 -> 0.95 by default), so 0.9 is only the optimiser's value "
              "outside the schedule. Here: "
              f"{first['momentum']} ({source}).",
              ""]
    rows = []
    for arch, recipe in recipes.items():
        for phase in recipe["phases"]:
            rows.append({"arch": arch, "phase": phase["phase"], "epochs": phase["epochs"],
                         "learning rate": phase["lr"], "early stopping": recipe["early_stopping"],
                         "model kept": recipe["model_kept"]})
    lines += [_md_table(rows), ""]
    return lines


def write_report_md(report_dir: Path, manifest: dict) -> Path:
    """Write ``REPORT.md``: verdict, every table and figure, and the run manifest."""
    prof = manifest["profile"]
    tables_dir, figures_dir = report_dir / "tables", report_dir / "figures"
    lines = [f"# PCam reproduction report: profile `{prof['name']}`", ""]
    lines += [f"Generated {manifest['generated']} in {manifest['duration_seconds'] / 60:.1f} "
              f"minutes from commit `{manifest['git_commit']}`; data `{prof['data_dir']}`; "
              f"pcamlib sources sha256 `{manifest.get('pcamlib_sha256', 'unknown')[:16]}`.", ""]
    pretrained = {a: r.get("pretrained_message", "") for a, r in manifest["runs"].items()}
    if pretrained:
        lines += ["**Weights:** " + " ".join(pretrained.values()), ""]
    if prof["name"] == "sample":
        lines += ["> This report runs on the embedded, generated sample data (not PCam). It "
                  "shows the pipeline end to end; its numbers say nothing about the study's "
                  "claims. Use `--profile real-subset` or `paper` for real data.", ""]
    verdict = tables_dir / "verdict.md"
    if verdict.is_file():
        lines += ["## Verdict", "", verdict.read_text().strip(), ""]
    protocol = tables_dir / "protocol.md"
    if protocol.is_file():
        lines += ["## Protocol", "", protocol.read_text().strip(), ""]
    lines += _recipe_section(manifest)
    names = sorted(p.stem for p in tables_dir.glob("*.md") if p.stem not in ("verdict",
                                                                             "protocol"))
    ordered = [n for n in _TABLE_ORDER if n in names] + [n for n in names if n not in _TABLE_ORDER]
    lines += ["## Tables", ""]
    for name in ordered:
        lines += [f"### {name}", "", (tables_dir / f"{name}.md").read_text().strip(), "",
                  f"[CSV](tables/{name}.csv)", ""]
    if "per_slide" not in names:
        # A reviewer looks for it (patches of one slide are not independent): say why not.
        lines += ["### per_slide", "", "No per-slide breakdown: this data's meta CSV has no "
                  "slide ids (`wsi` column), so patches cannot be grouped by slide.", ""]
    lines += ["## Figures", ""]
    for png in sorted(figures_dir.glob("*.png")):
        title = figure_title(png.stem)
        lines += [f"### {title}", "", f"![{title}](figures/{png.name})", ""]
    lines += ["## Run manifest", "", "### Runs", ""]
    lines += [_md_table([{"arch": a, "epochs": r["epochs_run"], "best epoch": r["best_epoch"],
                          "stopped early": r["stopped_early"], "lr": r["lr"],
                          "pretrained": r["pretrained"], "device": r["device"],
                          "precision": r["precision"],
                          "train minutes": round(r["train_seconds"] / 60, 2)}
                         for a, r in manifest["runs"].items()]), ""]
    lines += ["### Notebooks", "", _md_table([{"notebook": f"[{n['name']}](notebooks/{n['name']})",
                                                "seconds": n["seconds"]}
                                               for n in manifest["notebooks"]]), ""]
    lines += ["### Versions", "", _md_table([{"package": k, "version": v}
                                               for k, v in manifest["versions"].items()]), ""]
    lines += ["### Hardware", "", _md_table([{"item": k, "value": v}
                                               for k, v in manifest["hardware"].items()]), ""]
    lines += ["### Data checksums (md5)", "",
              _md_table([{"file": k, "md5": v["md5"], "bytes": v["bytes"]}
                         for k, v in manifest["data_checksums"].items()]), ""]
    lines += ["Full manifest: [manifest.json](manifest.json). Seeds: "
              f"{manifest['seed']} (all RNGs).", ""]
    path = report_dir / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def reproduce(
    profile: str = "sample",
    *,
    data_dir: str | os.PathLike | None = None,
    archs: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    reports_root: str | os.PathLike | None = None,
    runs_root: str | os.PathLike | None = None,
    kernel: str = "python3",
    fresh: bool = False,
    progress: bool = True,
) -> Path:
    """Run the notebooks in order and swap the finished report into ``reports/<profile>``.

    Args:
        profile: Profile name.
        data_dir: Data directory (default: the profile's; the sample is generated).
        archs: Architectures (default: the profile's).
        overrides: Profile fields to override.
        reports_root: Root of reports (default ``reports/``).
        runs_root: Root of runs (default ``runs/``).
        kernel: Jupyter kernel name.
        fresh: Set existing runs aside and train again (default: reuse finished runs,
            resume interrupted ones).
        progress: Show progress.

    Returns:
        The report directory.

    Raises:
        ReproduceError: when a notebook fails (the previous report stays intact).
    """
    start = time.time()
    overrides = dict(overrides or {})
    if archs:
        overrides["archs"] = list(archs)
    prof = get_profile(profile, data_dir=data_dir or None, **overrides)
    reports = Path(reports_root or config.REPORTS_DIR).resolve()
    runs = Path(runs_root or config.RUNS_DIR).resolve()
    final, tmp = reports / prof.name, reports / f".tmp-{prof.name}-{os.getpid()}"
    failed = reports / f".failed-{prof.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "notebooks").mkdir(parents=True)
    if fresh:
        from pcamlib.runs import run_dir_for, set_aside

        for arch in prof.archs:
            set_aside(run_dir_for(prof, arch, runs))
    # Overrides travel as the profile fields they are; archs is a notebook parameter.
    nb_overrides = {k: v for k, v in overrides.items() if k != "archs"}
    base = {"PROFILE": prof.name, "DATA_DIR": str(data_dir or ""), "REPORT_DIR": str(tmp),
            "RUNS_DIR": str(runs), "OVERRIDES": nb_overrides, "PROGRESS": progress}
    plan: list[tuple[str, str, dict]] = []
    for name in NOTEBOOKS:
        if name == "04_train":
            plan += [(name, f"04_train_{a}.ipynb", {**base, "ARCH": a}) for a in prof.archs]
        elif name == "03_lr_find":
            plan.append((name, f"{name}.ipynb", {**base, "ARCHS": list(prof.archs)}))
        elif name == "05_evaluate":
            # 04 has trained every run; a missing one here is an error, not hours of training.
            plan.append((name, f"{name}.ipynb",
                         {**base, "ARCHS": list(prof.archs), "TRAIN_MISSING": False}))
        else:
            plan.append((name, f"{name}.ipynb", base))
    for name, _, params in plan:  # every parameter checked before anything runs
        check_parameters(config.NOTEBOOKS_DIR / f"{name}.ipynb", params)
    if progress and prof.max_minutes_hint:
        print(f"[reproduce] profile {prof.name}: about {prof.max_minutes_hint:g} min for "
              f"{', '.join(prof.archs)} on 2 CPU cores when no run is finished yet; finished "
              f"runs are reused", flush=True)
    done: list[NotebookRun] = []
    try:
        for name, out_name, params in plan:
            if progress:
                print(f"[reproduce] {out_name} ...", flush=True)
            done.append(run_notebook(name, tmp / "notebooks" / out_name, params, kernel=kernel,
                                     progress=progress))
        # The executed notebooks are committed too: they name the final folder, not the
        # temporary one, and no path of the machine that ran them.
        for run in done:
            text = run.output.read_text().replace(str(tmp), str(final))
            run.output.write_text(displayed_paths(text))
        manifest = build_manifest(prof, runs, done, time.time() - start)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        write_report_md(tmp, manifest)
    except BaseException:
        shutil.rmtree(failed, ignore_errors=True)
        tmp.rename(failed)
        raise
    old = reports / f".old-{prof.name}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(failed, ignore_errors=True)
    if progress:
        print(f"[reproduce] report written to {final} in {(time.time() - start) / 60:.1f} min")
    return final


def refresh_notebooks(progress: bool = True, kernel: str = "python3") -> list[Path]:
    """Re-execute ``notebooks/*.ipynb`` in place with their defaults (the ``sample`` profile).

    This refreshes the outputs committed with the notebooks (what nbval compares against).
    Each notebook is executed to a temporary file first, so a failure leaves it untouched.
    """
    done = []
    for name in NOTEBOOKS:
        path = config.NOTEBOOKS_DIR / f"{name}.ipynb"
        tmp = path.with_name(f".{name}.running.ipynb")
        try:
            if progress:
                print(f"[notebooks] {name} ...", flush=True)
            run_notebook(name, tmp, {}, kernel=kernel, progress=progress)
            nb = nbformat.read(tmp, as_version=4)
            nb.metadata.pop("papermill", None)
            for cell in nb.cells:
                cell.metadata.pop("papermill", None)
            # warnings print the absolute path of the file that raised them
            nbformat.write(nbformat.reads(displayed_paths(nbformat.writes(nb)), as_version=4), tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        done.append(path)
    return done
