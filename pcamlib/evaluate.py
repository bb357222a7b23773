"""Evaluation of finished runs: predictions, metrics with intervals, TTA, model comparison.

Predictions on every split go through exactly the validation pipeline (no random
augmentation, no crop), so train, valid and test numbers are comparable with the
Learner's own validation metrics. Results are tidy CSV/JSON in the run directory:

- ``predictions.csv``: split, row, label, prob (plain), prob_tta (8-way dihedral TTA);
- ``metrics.csv``: arch, split, variant (plain/tta), metric, value, ci_low, ci_high;
- ``evaluation.json``: the same in nested form plus fastai's own ``validate()`` numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner

from pcamlib import distributed
from pcamlib import metrics as M
from pcamlib.data import dihedral, split_dataloader
from pcamlib.distributed import gather_batches, unwrap
from pcamlib.errors import InputError, StepError
from pcamlib.pcam import PCamSplit, content_digest
from pcamlib.profiles import Profile
from pcamlib.runs import (
    RunRecord,
    atomic_write_text,
    finished_run,
    load_best_learner,
    read_history,
    run_dir_for,
)

EVAL_METRICS = ("accuracy", "balanced_accuracy", "auc", "nll", "sensitivity", "specificity")
"""Metrics reported per split and variant."""

CI_METRICS = ("accuracy", "auc", "nll")
"""Metrics given 95% bootstrap intervals."""


def _autocast(learn: Learner):
    device = learn.dls.device
    if device.type != "cuda":
        return nullcontext()
    from fastai.callback.fp16 import MixedPrecision

    cb = next((c for c in learn.cbs if isinstance(c, MixedPrecision)), None)
    if cb is None:
        return nullcontext()
    dtype = torch.bfloat16 if "bf16" in str(getattr(cb, "amp_mode", "")).lower() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def predict_probs(learn: Learner, data: PCamSplit, *, tta: bool = False,
                  progress: bool = False) -> np.ndarray:
    """Probability of class 1 for every row of ``data``, in row order.

    With a Learner built for several processes (its loaders read one rank's shard, see
    :func:`pcamlib.learner.build_learner`) every rank predicts its own whole batches, the
    batches one process would read, and all ranks get every probability back in row
    order (:func:`pcamlib.distributed.gather_batches`); every rank must call this.

    Args:
        learn: A Learner whose ``dls.valid`` pipeline is the deterministic one.
        data: The split to predict.
        tta: Average the softmax over the 8 dihedral transforms of each patch.
        progress: Show a progress bar.

    Returns:
        Array of ``len(data)`` probabilities.
    """
    dl = split_dataloader(learn.dls, data)
    model = unwrap(learn.model).eval()
    views = range(8) if tta else range(1)
    out = []
    batches = dl
    if progress:
        from fastprogress.fastprogress import progress_bar

        batches = progress_bar(dl, total=len(dl))
    with torch.inference_mode(), _autocast(learn):
        for xb, _ in batches:
            xb = torch.Tensor(xb)
            probs = torch.stack(
                [torch.softmax(model(dihedral(xb, k)).float(), dim=1)[:, 1] for k in views]
            ).mean(0)
            out.append(probs if dl.world_size > 1 else probs.cpu())
    if dl.world_size > 1:
        out = gather_batches(out, dl.batch_numbers(), dl.epoch_batches(), learn.dls.device)
    if not out:
        return np.zeros(0)
    return torch.cat(out).cpu().numpy().astype(np.float64)


@dataclass
class Evaluation:
    """A run's evaluation.

    Attributes:
        arch: Architecture.
        run_dir: Run directory.
        predictions: Tidy predictions (split, row, label, prob, prob_tta).
        metrics: Tidy metrics (arch, split, variant, metric, value, ci_low, ci_high).
        fastai_validate: The Learner's own ``validate()`` on the valid split
            (valid_loss, accuracy, auc).
    """

    arch: str
    run_dir: Path
    predictions: pd.DataFrame
    metrics: pd.DataFrame
    fastai_validate: dict[str, float]

    def value(self, split: str, metric: str, variant: str = "plain") -> float:
        """One metric value."""
        m = self.metrics
        sel = m[(m.split == split) & (m.variant == variant) & (m.metric == metric)]
        if sel.empty:
            raise KeyError(f"no {metric} for split {split!r} ({variant}) in {self.run_dir}")
        return float(sel.value.iloc[0])


def _metric_rows(arch: str, split: str, variant: str, y: np.ndarray, prob: np.ndarray,
                 n_boot: int, seed: int) -> list[dict]:
    values = M.binary_metrics(y, prob)
    cis = (M.bootstrap_ci(y, prob, metrics=CI_METRICS, n_boot=n_boot, seed=seed)
           .set_index("metric") if n_boot else None)
    rows = []
    for name in (*EVAL_METRICS, "tn", "fp", "fn", "tp", "n"):
        low = high = np.nan
        if cis is not None and name in cis.index:
            low, high = cis.loc[name, "ci_low"], cis.loc[name, "ci_high"]
        rows.append({"arch": arch, "split": split, "variant": variant, "metric": name,
                     "value": float(values[name]), "ci_low": float(low), "ci_high": float(high)})
    return rows


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def evaluation_key(profile: Profile, record: RunRecord) -> dict:
    """What cached predictions depend on (the key of ``evaluation.json``).

    The run's full identity and resolved values, the exact weights (SHA-256 of
    ``best.pth``), the evaluation settings and the content of every split evaluated.
    """
    data = {}
    for split in profile.eval_splits:
        rows = profile.train_rows if split == "train" else None
        data[split] = content_digest(PCamSplit(profile.data_dir, split, rows=rows))
    return json.loads(json.dumps({
        "identity": record.identity, "resolved": record.resolved,
        "best_sha256": _sha256(record.best_weights),
        "evaluation": {"splits": list(profile.eval_splits), "tta": profile.tta,
                       "tta_splits": list(profile.tta_splits),
                       "n_boot": profile.n_boot, "seed": profile.seed},
        "data": data,
    }))


def evaluate_run(
    profile: Profile, arch: str, *, runs_root: str | os.PathLike | None = None,
    progress: bool = True, device=None, reuse: bool = True,
) -> Evaluation:
    """Predict every evaluation split with the run's best model and compute its metrics.

    TTA is computed on valid and test (on train it would cost 8 passes over the largest
    split and says nothing the plain number does not). The run must match the profile
    (settings and train/valid data, see :func:`pcamlib.runs.finished_run`); results on
    disk are reused only when :func:`evaluation_key` is unchanged.

    Args:
        profile: Parameters (evaluation splits, TTA, bootstrap size, seed).
        arch: Architecture of a finished run.
        runs_root: Root of run directories.
        progress: Show progress bars.
        device: Evaluation device (default: GPU when present; with several processes,
            this rank's GPU).
        reuse: Reuse an up-to-date evaluation on disk.

    Launched with several processes (``torchrun``, ``accelerate launch``), every rank
    predicts its shard of each split; the predictions are gathered, and rank 0 alone
    computes the metrics and writes the files, which the other ranks then read. The
    numbers are those of one process: the same batches, gathered without padding.

    Returns:
        The evaluation (also written to the run directory).
    """
    procs, device = distributed.join(device)
    record = finished_run(profile, arch, runs_root)  # refuses a run of other settings
    run_dir = record.run_dir
    key = evaluation_key(profile, record)
    eval_json = run_dir / "evaluation.json"
    # Rank 0 decides, so that no rank predicts while another returns the cached result.
    if procs.broadcast(reuse and _saved_evaluation(eval_json, key) is not None):
        return _read_evaluation(arch, run_dir, key)
    learn, _ = load_best_learner(profile, arch, runs_root=runs_root, progress=False,
                                 device=device, procs=procs)
    preds, rows = [], []
    for split in profile.eval_splits:
        rows_limit = profile.train_rows if split == "train" else None
        data = PCamSplit(profile.data_dir, split, rows=rows_limit)
        y = data.labels
        show = progress and procs.is_main
        prob = predict_probs(learn, data, progress=show)
        prob_tta = (predict_probs(learn, data, tta=True, progress=show)
                    if profile.tta and split in profile.tta_splits else np.full(len(y), np.nan))
        preds.append(pd.DataFrame({"split": split, "row": np.arange(len(y)), "label": y,
                                   "prob": prob, "prob_tta": prob_tta}))
        if not procs.is_main:
            continue  # rank 0 computes the metrics (bootstrap intervals cost time)
        rows += _metric_rows(arch, split, "plain", y, prob, profile.n_boot, profile.seed)
        if not np.isnan(prob_tta).all():
            rows += _metric_rows(arch, split, "tta", y, prob_tta, profile.n_boot, profile.seed)
    with distributed.distrib_ctx(learn, procs):  # metrics over every rank's predictions
        valid_loss, acc, auc = (float(v) for v in learn.validate())
    fastai_validate = {"valid_loss": valid_loss, "accuracy": acc, "auc": auc}
    if procs.is_main:
        predictions, table = pd.concat(preds, ignore_index=True), pd.DataFrame(rows)
        predictions.to_csv(run_dir / ".predictions.csv.tmp", index=False)
        os.replace(run_dir / ".predictions.csv.tmp", run_dir / "predictions.csv")
        table.to_csv(run_dir / ".metrics.csv.tmp", index=False)
        os.replace(run_dir / ".metrics.csv.tmp", run_dir / "metrics.csv")
        atomic_write_text(eval_json, json.dumps({"key": key, "fastai_validate": fastai_validate},
                                                indent=1))
    procs.barrier()  # the other ranks read what rank 0 wrote
    if not procs.is_main:
        return _read_evaluation(arch, run_dir, key)
    return Evaluation(arch, run_dir, predictions, table, fastai_validate)


def _saved_evaluation(eval_json: Path, key: dict) -> dict | None:
    """``evaluation.json`` when it holds an evaluation made under ``key``, else None."""
    if not eval_json.is_file():
        return None
    try:
        saved = json.loads(eval_json.read_text())
    except json.JSONDecodeError:
        return None
    return saved if saved.get("key") == key else None


def _read_evaluation(arch: str, run_dir: Path, key: dict) -> Evaluation:
    saved = _saved_evaluation(run_dir / "evaluation.json", key)
    if saved is None:
        raise StepError(f"{run_dir / 'evaluation.json'}: no evaluation for these settings "
                        "after rank 0 wrote it (was the run directory changed meanwhile?)")
    return Evaluation(arch, run_dir, pd.read_csv(run_dir / "predictions.csv"),
                      pd.read_csv(run_dir / "metrics.csv"), saved["fastai_validate"])


@dataclass
class Comparison:
    """Two or more evaluated runs side by side.

    Attributes:
        evaluations: Per architecture.
        table1: Train/valid/test accuracy and test AUC per run (wide, like the study's
            Table 1), with TTA columns.
        study_comparison: Long table of measured vs study/reference values with deltas.
        paired: Paired tests on the test split between the first two runs.
        verdict: A generated sentence on which model is better.
        histories: Training histories per architecture.
    """

    evaluations: dict[str, Evaluation]
    table1: pd.DataFrame
    study_comparison: pd.DataFrame
    paired: pd.DataFrame
    verdict: str
    histories: dict[str, pd.DataFrame]

    def roc_data(self, split: str = "test", variant: str = "plain"):
        """``{arch: (labels, probs)}`` for ROC curves."""
        col = "prob" if variant == "plain" else "prob_tta"
        out = {}
        for arch, ev in self.evaluations.items():
            p = ev.predictions[ev.predictions.split == split]
            out[arch] = (p.label.to_numpy(), p[col].to_numpy())
        return out

    def auc_intervals(self, split: str = "test", variant: str = "plain"):
        """``{arch: (ci_low, ci_high)}`` of AUC."""
        out = {}
        for arch, ev in self.evaluations.items():
            m = ev.metrics
            row = m[(m.split == split) & (m.variant == variant) & (m.metric == "auc")].iloc[0]
            out[arch] = (float(row.ci_low), float(row.ci_high))
        return out

    def confusion_matrices(self, split: str = "test") -> dict[str, np.ndarray]:
        """2x2 confusion matrices (rows: true normal/tumour) at threshold 0.5."""
        out = {}
        for arch, ev in self.evaluations.items():
            cells = [[int(ev.value(split, name)) for name in pair]
                     for pair in (("tn", "fp"), ("fn", "tp"))]
            out[arch] = np.array(cells)
        return out


def _value_or_nan(ev: Evaluation, split: str, metric: str, variant: str = "plain") -> float:
    try:
        return ev.value(split, metric, variant)
    except KeyError:
        return float("nan")


def compare_runs(
    profile: Profile, archs: list[str] | tuple[str, ...] | None = None, *,
    runs_root: str | os.PathLike | None = None, progress: bool = True, device=None,
) -> Comparison:
    """Evaluate (or reuse) each run and compare them with each other and with the study.

    Args:
        profile: Parameters.
        archs: Architectures (default: the profile's).
        runs_root: Root of run directories.
        progress: Show progress bars.
        device: Evaluation device.

    Returns:
        The comparison.
    """
    archs = list(archs or profile.archs)
    evals = {a: evaluate_run(profile, a, runs_root=runs_root, progress=progress, device=device)
             for a in archs}
    rows = []
    for arch, ev in evals.items():
        row = {"arch": arch}
        for split in ("train", "valid", "test"):
            row[f"{split}_accuracy"] = _value_or_nan(ev, split, "accuracy")
        row["test_auc"] = _value_or_nan(ev, "test", "auc")
        m = ev.metrics
        ci = m[(m.split == "test") & (m.variant == "plain") & (m.metric == "auc")]
        row["test_auc_ci_low"] = float(ci.ci_low.iloc[0]) if len(ci) else np.nan
        row["test_auc_ci_high"] = float(ci.ci_high.iloc[0]) if len(ci) else np.nan
        row["test_nll"] = _value_or_nan(ev, "test", "nll")
        row["test_accuracy_tta"] = _value_or_nan(ev, "test", "accuracy", "tta")
        row["test_auc_tta"] = _value_or_nan(ev, "test", "auc", "tta")
        rows.append(row)
    table1 = pd.DataFrame(rows)
    study = M.comparison_table(table1)
    paired_rows, verdict = [], "Only one model was evaluated; nothing to compare."
    if len(archs) >= 2 and "test" in profile.eval_splits:
        a, b = archs[0], archs[1]
        pa = evals[a].predictions.query("split == 'test'")
        pb = evals[b].predictions.query("split == 'test'")
        y = pa.label.to_numpy()
        if not np.array_equal(y, pb.label.to_numpy()):
            raise InputError(f"runs {a} and {b} were evaluated on different test labels")
        for variant, col in (("plain", "prob"), ("tta", "prob_tta")):
            if pa[col].isna().all():
                continue
            p_a, p_b = pa[col].to_numpy(), pb[col].to_numpy()
            dl = M.delong_test(y, p_a, p_b)
            boot = M.paired_bootstrap_auc(y, p_a, p_b, n_boot=max(profile.n_boot, 200),
                                          seed=profile.seed)
            mc = M.mcnemar_test(y, (p_a >= 0.5).astype(int), (p_b >= 0.5).astype(int))
            paired_rows += [
                {"variant": variant, "test": "DeLong AUC", "model_a": a, "model_b": b,
                 "estimate": dl["delta"], "ci_low": dl["ci_low"], "ci_high": dl["ci_high"],
                 "p_value": dl["p_value"]},
                {"variant": variant, "test": "paired bootstrap AUC", "model_a": a,
                 "model_b": b, "estimate": boot["delta"], "ci_low": boot["ci_low"],
                 "ci_high": boot["ci_high"], "p_value": boot["p_value"]},
                {"variant": variant, "test": "McNemar accuracy", "model_a": a, "model_b": b,
                 "estimate": mc["statistic"], "ci_low": np.nan, "ci_high": np.nan,
                 "p_value": mc["p_value"]},
            ]
        verdict = M.verdict(a, b, y, pa.prob.to_numpy(), pb.prob.to_numpy(),
                            n_boot=max(profile.n_boot, 200), seed=profile.seed)
    histories = {a: read_history(run_dir_for(profile, a, runs_root)) for a in archs}
    paired = pd.DataFrame(paired_rows, columns=["variant", "test", "model_a", "model_b",
                                                "estimate", "ci_low", "ci_high", "p_value"])
    return Comparison(evals, table1, study, paired, verdict, histories)
