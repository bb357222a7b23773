"""The steps of the report, one per notebook, writing figures and tables to ``reports/``.

Each notebook makes a :class:`ReportContext` from its ``parameters`` cell and calls one
step here. A step returns a :class:`StepOutput` whose figures and tables the notebook
displays; the step has already written them (PNG + SVG, CSV + Markdown) under the
report directory. Results are data before they are pictures: every figure is drawn from
a table that is written too.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from pcamlib import analysis as A
from pcamlib import config
from pcamlib import figures as F
from pcamlib import metrics as M
from pcamlib.data import AugmentConfig, PCamAugment
from pcamlib.errors import MissingInputError
from pcamlib.evaluate import Comparison, compare_runs
from pcamlib.pcam import SPLITS, PCamSplit, available_splits, channel_stats, validate_split
from pcamlib.profiles import Profile, get_profile
from pcamlib.runs import load_best_learner, run_is_complete
from pcamlib.selection import read_trials
from pcamlib.train import TrainResult, lr_find_with_learner, train


@dataclass
class ReportContext:
    """Where a report's inputs and outputs live.

    Attributes:
        profile: The parameters.
        report_dir: ``reports/<profile>`` (or a temporary folder during ``reproduce``).
        runs_root: Root of the run directories.
        progress: Show progress bars.
    """

    profile: Profile
    report_dir: Path
    runs_root: Path
    progress: bool = True

    @property
    def figures_dir(self) -> Path:
        """``<report_dir>/figures``."""
        return self.report_dir / "figures"

    @property
    def tables_dir(self) -> Path:
        """``<report_dir>/tables``."""
        return self.report_dir / "tables"


@dataclass
class StepOutput:
    """What a step produced (already written to disk).

    Attributes:
        figures: Name to figure.
        tables: Name to table.
        text: Name to generated text (e.g. the verdict).
        data: Other results (e.g. the training result).
    """

    figures: dict[str, Figure] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


def _figure(ctx: ReportContext, out: StepOutput, name: str, fig: Figure) -> None:
    F.save_figure(fig, ctx.figures_dir, name)
    out.figures[name] = fig


def _table(ctx: ReportContext, out: StepOutput, name: str, df: pd.DataFrame) -> None:
    F.save_table(df, ctx.tables_dir, name)
    out.tables[name] = df


def ensure_data(profile: Profile, progress: bool = True) -> Path:
    """Make sure the profile's data exists: generate the embedded sample, else explain.

    Returns:
        The data directory.

    Raises:
        FileNotFoundError: with the commands that get the data, when it is missing.
    """
    data_dir = Path(profile.data_dir)
    missing = [s for s in SPLITS if s not in available_splits(data_dir)]
    if not missing:
        return data_dir
    if profile.name == "sample" and Path(data_dir) == Path(config.SAMPLE_DATA_DIR):
        from pcamlib.sample import write_sample

        write_sample(data_dir, progress=progress)
        return data_dir
    raise MissingInputError(
        f"{data_dir}: no PCam-format files for split(s) {', '.join(missing)}. Get the data "
        f"with `pcamlib download --dest {data_dir}` (official PCam) or `pcamlib import "
        f"folders SRC --dest {data_dir}` (image folders), or pass --data-dir."
    )


def report_context(
    profile: str = "sample",
    *,
    data_dir: str | os.PathLike | None = "",
    report_dir: str | os.PathLike | None = "",
    runs_dir: str | os.PathLike | None = "",
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> ReportContext:
    """Build the context of a notebook from its parameters (empty string = default).

    Args:
        profile: Profile name.
        data_dir: Data directory (default: the profile's).
        report_dir: Output directory (default: ``reports/<profile>``).
        runs_dir: Runs root (default: :data:`config.RUNS_DIR`).
        overrides: Profile fields to override.
        progress: Show progress bars.

    Returns:
        The context; the data exists (the sample is generated when needed).
    """
    prof = get_profile(profile, data_dir=data_dir or None, **(overrides or {}))
    # Generating the sample takes seconds; a progress bar here would only make the
    # notebook's first run print differently from later ones.
    ensure_data(prof, progress=False)
    report = Path(report_dir) if report_dir else config.REPORTS_DIR / prof.name
    runs = Path(runs_dir) if runs_dir else config.RUNS_DIR
    report.mkdir(parents=True, exist_ok=True)
    return ReportContext(prof, report.resolve(), runs.resolve(), progress)


def _random_rows(labels: np.ndarray, label: int, n: int, seed: int) -> np.ndarray:
    rows = np.flatnonzero(labels == label)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=min(n, rows.size), replace=False))


def explore_data(
    ctx: ReportContext, *, n_per_class: int = 3, sample_rows: int = 2000
) -> StepOutput:
    """Notebook 01: split sizes, class balance, Figure 1, channel statistics, intensities, WSIs.

    Args:
        ctx: Report context.
        n_per_class: Patches per class in Figure 1 (the study showed 3 and 3).
        sample_rows: Training rows sampled (seeded) for the intensity distributions.

    Returns:
        Tables ``split_sizes``, ``channel_stats``, optional ``wsi_counts``; figures
        ``figure1_samples``, ``class_balance``, ``intensity_distributions``.
    """
    out, seed, data_dir = StepOutput(), ctx.profile.seed, ctx.profile.data_dir
    sizes, counts, stats = [], [], {}
    splits = {s: PCamSplit(data_dir, s) for s in SPLITS}
    for name, split in splits.items():
        info = validate_split(data_dir, name)
        sizes.append({"split": name, "rows": info.length, "positives": info.positives,
                      "negatives": info.length - info.positives,
                      "positive_fraction": round(info.positives / info.length, 4),
                      "official_rows": info.is_official_size,
                      "meta_csv": info.meta_path is not None})
        counts += [{"split": name, "label": 0, "count": info.length - info.positives},
                   {"split": name, "label": 1, "count": info.positives}]
        stats[name] = channel_stats(split)
    _table(ctx, out, "split_sizes", pd.DataFrame(sizes))
    _figure(ctx, out, "class_balance", F.split_balance_figure(pd.DataFrame(counts)))
    train = splits["train"]
    rows = np.concatenate([_random_rows(train.labels, 0, n_per_class, seed),
                           _random_rows(train.labels, 1, n_per_class, seed)])
    _figure(ctx, out, "figure1_samples", F.patch_grid_figure(
        train.read_images(rows), train.labels[rows], ncols=n_per_class,
        suptitle="Figure 1: random training patches"))
    stats_table = F.channel_stats_table(stats)
    _table(ctx, out, "channel_stats", stats_table.round(6))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(train), size=min(sample_rows, len(train)), replace=False))
    _figure(ctx, out, "intensity_distributions",
            F.intensity_distribution_figure(train.read_images(pick), train.labels[pick], seed=seed))
    wsi_rows = []
    for name, split in splits.items():
        meta = split.meta()
        if meta is not None and "wsi" in meta.columns:
            wsi_rows.append({"split": name, "wsis": int(meta["wsi"].nunique()),
                             "rows": len(meta)})
    if wsi_rows:
        wsi = pd.DataFrame(wsi_rows)
        shared = _shared_wsis(splits)
        wsi["wsis_shared_with_other_splits"] = wsi["split"].map(shared)
        _table(ctx, out, "wsi_counts", wsi)
    return out


def _shared_wsis(splits: dict[str, PCamSplit]) -> dict[str, int]:
    ids = {}
    for name, split in splits.items():
        meta = split.meta()
        ids[name] = set(meta["wsi"]) if meta is not None and "wsi" in meta.columns else set()
    return {n: len(ids[n] & set().union(*(ids[m] for m in ids if m != n))) for n in ids}


def augmentation_preview(ctx: ReportContext, *, n: int = 4) -> StepOutput:
    """Notebook 02: each augmentation alone and all together on the same training patches.

    Args:
        ctx: Report context.
        n: Patches per row.

    Returns:
        Figure ``augmentations`` and table ``augmentation_settings``.
    """
    out, cfg = StepOutput(), ctx.profile.augment
    train = PCamSplit(ctx.profile.data_dir, "train")
    rows = np.concatenate([_random_rows(train.labels, 0, n // 2, ctx.profile.seed + 1),
                           _random_rows(train.labels, 1, n - n // 2, ctx.profile.seed + 1)])
    images = train.read_images(rows)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    off = dict(flip=False, max_rotate=0.0, max_zoom=1.0, max_translate=0.0,
               max_brightness=0.0, max_contrast=0.0, stain_jitter=0.0)
    variants = {
        "flip / 90° turns": dict(flip=True),
        f"rotation ±{cfg.max_rotate:g}°": dict(max_rotate=cfg.max_rotate, p_affine=1.0),
        f"crop (zoom ≤{cfg.max_zoom:g}, shift ≤{cfg.max_translate:g})":
            dict(max_zoom=cfg.max_zoom, max_translate=cfg.max_translate, p_affine=1.0),
        f"lighting (±{cfg.max_brightness:g} brightness, ±{cfg.max_contrast:g} contrast)":
            dict(max_brightness=cfg.max_brightness, max_contrast=cfg.max_contrast,
                 p_lighting=1.0),
        "stain jitter (H&E, 0.05)": dict(stain_jitter=max(cfg.stain_jitter, 0.05)),
        "all together (profile)": None,
    }
    grid = {"original": images}
    for name, settings in variants.items():
        config_ = cfg if settings is None else AugmentConfig(**{**off, **settings})
        torch.manual_seed(ctx.profile.seed)
        aug = PCamAugment(config_).augment(x.clone())
        grid[name] = (aug.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    _figure(ctx, out, "augmentations", F.augmentation_grid_figure(grid))
    settings = pd.DataFrame([{"parameter": k, "value": v} for k, v in cfg.to_dict().items()])
    _table(ctx, out, "augmentation_settings", settings)
    out.data["dls"] = training_dataloaders(ctx)
    return out


def training_dataloaders(ctx: ReportContext):
    """The fastai DataLoaders training uses (augmented train, plain valid), for exploring.

    Normalised as the profile's first architecture trains (ImageNet statistics with
    ImageNet weights, else the train split's); ``dls.show_batch()`` decodes the batches
    back to patches and class names.
    """
    from pcamlib.data import pcam_dataloaders
    from pcamlib.learner import choose_pretrained, normalisation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing ImageNet file was reported by training
        choice = choose_pretrained(ctx.profile.archs[0], ctx.profile.pretrained)
    norm = normalisation(ctx.profile, choice.used)
    prof = ctx.profile
    return pcam_dataloaders(prof.data_dir, mean=norm["mean"], std=norm["std"], bs=prof.bs,
                            augment=prof.augment, num_workers=0, device=torch.device("cpu"),
                            seed=prof.seed, train_rows=prof.train_rows,
                            centre_crop=prof.centre_crop)


def lr_find_step(
    ctx: ReportContext, archs: list[str] | tuple[str, ...] | None = None
) -> StepOutput:
    """Notebook 03: run lr_find per architecture, plot it, write the LR table training reads.

    Returns:
        Figures ``lr_find_<arch>``, table ``learning_rates`` and data ``learners`` (the
        fastai Learner of each architecture, whose recorder holds the finder's curve).
    """
    out, rows = StepOutput(), []
    for arch in archs or ctx.profile.archs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found, learn = lr_find_with_learner(ctx.profile, arch, runs_root=ctx.runs_root,
                                                progress=ctx.progress)
        out.data.setdefault("learners", {})[arch] = learn
        _figure(ctx, out, f"lr_find_{arch}", F.lr_find_figure(
            found.lrs, found.losses, suggestions=found.suggestions, chosen=found.chosen,
            title=f"lr_find: {arch}"))
        rows.append({"arch": arch, "policy": found.policy, "chosen_lr": found.chosen,
                     **{f"suggested_{k}": v for k, v in found.suggestions.items()}})
    _table(ctx, out, "learning_rates", pd.DataFrame(rows))
    return out


def train_step(ctx: ReportContext, arch: str, *, restart: bool = False) -> StepOutput:
    """Notebook 04: train one architecture (resuming if interrupted) and plot its history.

    Returns:
        Figure ``loss_curves_<arch>``, table ``history_<arch>``, data ``result``
        (:class:`TrainResult`).
    """
    out = StepOutput()
    result: TrainResult = train(ctx.profile, arch, runs_root=ctx.runs_root,
                                progress=ctx.progress, restart=restart)
    _table(ctx, out, f"history_{arch}", result.history.round(6))
    _figure(ctx, out, f"loss_curves_{arch}", F.loss_curves_figure({arch: result.history}))
    run = json.loads((result.run_dir / "run.json").read_text())
    _table(ctx, out, f"run_{arch}", pd.DataFrame([{
        "arch": arch, "epochs_run": run["epochs_run"], "best_epoch": run["best_epoch"],
        "stopped_early": run["stopped_early"], "lr": run["lr"], "pretrained": run["pretrained"],
        "precision": run["precision"], "train_minutes": round(run["train_seconds"] / 60, 2)}]))
    out.text["pretrained"] = run["pretrained_message"]
    out.data["result"] = result
    return out


def evaluate_step(
    ctx: ReportContext, archs: list[str] | tuple[str, ...] | None = None, *,
    train_missing: bool = False,
) -> StepOutput:
    """Notebook 05: compare the runs: Table 1, Figures 2-4, confusion matrices, TTA, tests.

    Args:
        ctx: Report context.
        archs: Architectures (default: the profile's).
        train_missing: Train runs that are missing or unfinished first (which can take
            hours). Off by default: a missing run is an error naming the command that
            trains it.

    Returns:
        Tables ``table1``, ``table1_vs_study``, ``paired_tests``, ``metrics``; figures
        ``figure2_loss_curves``, ``figure3_roc_test``, ``figure4_roc_valid``,
        ``confusion_matrices``; text ``verdict``.
    """
    out = StepOutput()
    archs = list(archs or ctx.profile.archs)
    if train_missing:
        for arch in archs:
            if not run_is_complete(ctx.profile, arch, ctx.runs_root):
                train(ctx.profile, arch, runs_root=ctx.runs_root, progress=ctx.progress)
    comp: Comparison = compare_runs(ctx.profile, archs, runs_root=ctx.runs_root,
                                    progress=ctx.progress)
    _table(ctx, out, "table1", comp.table1.round(4))
    _table(ctx, out, "table1_vs_study", comp.study_comparison.round(4))
    _table(ctx, out, "paired_tests", comp.paired.round(6))
    all_metrics = pd.concat([ev.metrics for ev in comp.evaluations.values()], ignore_index=True)
    _table(ctx, out, "metrics", all_metrics.round(6))
    _figure(ctx, out, "figure2_loss_curves", F.loss_curves_figure(comp.histories))
    from sklearn.metrics import roc_curve

    for name, split in (("figure3_roc_test", "test"), ("figure4_roc_valid", "valid")):
        if split not in ctx.profile.eval_splits:
            continue
        curves = {a: roc_curve(y, p)[:2] for a, (y, p) in comp.roc_data(split).items()}
        _figure(ctx, out, name, F.roc_curve_figure(
            curves, auc_ci=comp.auc_intervals(split), title=f"ROC, {split} split"))
    if "test" in ctx.profile.eval_splits:
        _figure(ctx, out, "confusion_matrices",
                F.confusion_matrix_figure(comp.confusion_matrices("test")))
    out.text["verdict"] = comp.verdict
    (ctx.tables_dir / "verdict.md").write_text(comp.verdict + "\n")
    _table(ctx, out, "differences_from_study", study_differences(ctx.profile, comp))
    claims = _claims(ctx.profile, comp)
    if claims is not None:
        _table(ctx, out, "study_claims", claims.round(4))
    trials = read_trials(ctx.profile.name)
    if trials is not None:
        _table(ctx, out, "selection_trials", trials.drop(columns=["command"]))
    out.text["protocol"] = protocol_text(ctx.profile, trials)
    (ctx.tables_dir / "protocol.md").write_text(out.text["protocol"] + "\n")
    out.data["comparison"] = comp
    return out


def _family_runs(archs) -> dict[str, str]:
    """The first DenseNet and the first ResNet among ``archs`` (by study family)."""
    found: dict[str, str] = {}
    for arch in archs:
        try:
            found.setdefault(M.study_family(arch), arch)
        except ValueError:
            continue
    return found


def _claims(profile: Profile, comp: Comparison) -> pd.DataFrame | None:
    """The study's claims against this report's DenseNet and ResNet (test split)."""
    families = _family_runs(comp.evaluations)
    if "test" not in profile.eval_splits or set(families) != {"DenseNet", "ResNet"}:
        return None
    data = comp.roc_data("test")
    y, prob_dense = data[families["DenseNet"]]
    prob_res = data[families["ResNet"]][1]
    table = M.study_claims(y, prob_dense, prob_res, n_boot=max(profile.n_boot, 200),
                           seed=profile.seed)
    table.insert(1, "models", f"{families['DenseNet']} vs {families['ResNet']}")
    return table


def _precision_words(run: dict) -> str:
    """A run's arithmetic in words: on a CPU, bf16 covers the training steps only."""
    if run["precision"] == "bf16" and not str(run["device"]).startswith("cuda"):
        return "bf16 training steps, fp32 validation and evaluation"
    return run["precision"]


def study_differences(profile: Profile, comp: Comparison) -> pd.DataFrame:
    """What differs between the study's setting and this report's, aspect by aspect."""
    sizes = {split: len(PCamSplit(profile.data_dir, split)) for split in SPLITS
             if split in available_splits(profile.data_dir)}
    runs = {arch: json.loads((ev.run_dir / "run.json").read_text())
            for arch, ev in comp.evaluations.items()}
    weights = "; ".join(f"{a}: {'ImageNet fine_tune' if r['pretrained'] else 'from scratch'}"
                        for a, r in runs.items())
    epochs = "; ".join(f"{a}: {r['epochs_run']} run, best {r['best_epoch']}"
                       for a, r in runs.items())
    lrs = "; ".join(f"{a}: {r['lr']:g}" for a, r in runs.items())
    devices = "; ".join(sorted({f"{r['device']} ({_precision_words(r)})" for r in runs.values()}))
    rows = [
        ("data", "official PCam HDF5",
         profile.data_note or f"PCam-format data in {Path(profile.data_dir).name}"),
        ("split sizes (train / valid / test)", "262,144 / 32,768 / 32,768",
         " / ".join(f"{sizes.get(s, 0):,}" for s in SPLITS)),
        ("models", "DenseNet, ResNet (depths not given)", ", ".join(comp.evaluations)),
        ("weights", "ImageNet, fastai fine_tune", weights),
        ("epochs", "up to 10, early stopping on valid loss (patience 3)", epochs),
        ("learning rate", "lr_find: DenseNet 0.0057, ResNet 0.0012", lrs),
        ("momentum", "quoted as 0.9; fastai's one-cycle runs 0.95 -> 0.85 -> 0.95",
         " -> ".join(f"{m:g}" for m in profile.moms)),
        ("batch size", "64 (32 in one place)", str(profile.bs)),
        ("hardware", "not stated", devices),
    ]
    return pd.DataFrame(rows, columns=["aspect", "study", "this report"])


def protocol_text(profile: Profile, trials: pd.DataFrame | None) -> str:
    """How this report's settings were chosen and when the test split was scored."""
    if trials is None:
        return (f"Settings: the `{profile.name}` profile as defined in `pcamlib/profiles.py`. "
                "No selection trials are recorded for it; its test split is scored once, "
                "in this report.")
    return (
        f"Protocol. Every setting of the `{profile.name}` recipe (epochs, learning rate, "
        "augmentation, early stopping, crop) was chosen by comparing trial runs on the "
        f"validation split only: {len(trials)} trials, listed in `selection_trials` with "
        "their settings and valid metrics (the table has no test column), recorded in "
        f"`reports/selection/{profile.name.replace('-', '_')}_trials.csv` with the command "
        "that repeats each. The test split was scored once, for the final recipe, in this "
        "report. Recipes are also scored on held-out real patches that nobody working on "
        "the project sees, so fitting the shared test split would gain nothing."
    )


def analysis_step(ctx: ReportContext, comparison: Comparison, *, split: str = "test",
                  k: int = 3) -> StepOutput:
    """Notebook 05, second part: what a reviewer or pathologist asks next.

    Calibration (reliability diagram, ECE beside NLL), sensitivity at fixed specificity
    and specificity at fixed sensitivity, the most confident errors through fastai's
    ``ClassificationInterpretation``, Grad-CAM maps of true/false positives/negatives, and a
    per-slide breakdown when the meta CSV has slide ids.

    Args:
        ctx: Report context.
        comparison: :func:`evaluate_step`'s comparison (its predictions are reused).
        split: The split analysed.
        k: Patches per kind of error / outcome.

    Returns:
        Tables ``calibration``, ``reliability``, ``operating_points``, ``top_errors_<arch>``,
        ``gradcam_<arch>``, optional ``per_slide``; figures ``reliability``,
        ``operating_points``, ``top_errors_<arch>``, ``gradcam_<arch>``, optional
        ``per_slide``; data ``interpretations`` and ``learners`` (by architecture).
    """
    out = StepOutput()
    if split not in ctx.profile.eval_splits:
        return out
    predictions = {a: ev.predictions for a, ev in comparison.evaluations.items()}
    n_boot, seed = max(ctx.profile.n_boot, 200), ctx.profile.seed
    _table(ctx, out, "calibration", A.calibration_table(
        predictions, split=split, n_boot=n_boot, seed=seed).round(4))
    bins = A.reliability_bins(predictions, split=split)
    _table(ctx, out, "reliability", bins.round(4))
    _figure(ctx, out, "reliability", F.reliability_figure(bins))
    points = A.operating_point_table(predictions, split=split, n_boot=n_boot, seed=seed)
    _table(ctx, out, "operating_points", points.round(4))
    _figure(ctx, out, "operating_points", F.operating_points_figure(points))
    data = PCamSplit(ctx.profile.data_dir, split)
    out.data["interpretations"], out.data["learners"] = {}, {}
    for arch in comparison.evaluations:
        learn, _ = load_best_learner(ctx.profile, arch, runs_root=ctx.runs_root)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interp = A.interpretation(learn, data)
        errors = A.top_errors(interp, k=k)
        _table(ctx, out, f"top_errors_{arch}", errors.round(4))
        if len(errors):
            _figure(ctx, out, f"top_errors_{arch}", F.top_errors_figure(
                data.read_images(errors.row.to_numpy()), errors,
                title=f"Most confident errors, {arch} ({split})"))
        cams = A.gradcam_examples(learn, data, predictions[arch], model=arch, k=max(1, k - 1))
        _table(ctx, out, f"gradcam_{arch}", cams.table.round(4))
        _figure(ctx, out, f"gradcam_{arch}", F.gradcam_figure(
            cams.images, cams.maps, cams.table, title=f"Grad-CAM, {arch} ({split})"))
        out.data["interpretations"][arch], out.data["learners"][arch] = interp, learn
    slides = A.per_slide_table(predictions, data.meta(), split=split)
    if slides is not None:
        _table(ctx, out, "per_slide", slides.round(4))
        _figure(ctx, out, "per_slide", F.per_slide_figure(slides))
    return out
