"""Training engine: parameter validation, resume after a kill, early stopping, lr_find.

Training runs on tiny learnable toy data (128/64/64 rows, resnet18, bs 32) on the CPU.
The module fixtures train once and are shared by several tests; tests that change a run
work on a copy.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

import pcamlib.learner as L
import pcamlib.runs as R
import pcamlib.train as T
from pcamlib.pcam import PCamWriter
from pcamlib.profiles import get_profile

ARCH = "resnet18"
SIZES = {"train": 128, "valid": 64, "test": 64}
COMPARED = ["epoch", "phase", "phase_epoch", "train_loss", "valid_loss", "accuracy", "auc"]


def write_toy_pcam(root: Path, sizes=SIZES, seed: int = 0) -> Path:
    """Learnable toy PCam: noisy background, label 1 = dark blue centre 32x32."""
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        x = rng.integers(100, 200, (n, 96, 96, 3), dtype=np.uint8)
        y = (np.arange(n) % 2).astype(np.uint8)
        x[y == 1, 32:64, 32:64, 2] = 40
        with PCamWriter(root, split, n) as writer:
            writer.write(x, y)
    return root


def make_profile(data_dir: Path, **overrides):
    params = dict(data_dir=data_dir, archs=[ARCH], epochs=3, bs=32, n_boot=50,
                  lr_find_iters=10, pretrained="no")
    params.update(overrides)
    return get_profile("sample", **params)


class SimulatedKill(Exception):
    """Stands for the process being killed."""


class KillAfterFirstEpoch(Callback):
    """Raise once epoch 0 is over; runs after _RunKeeper (order 80) has saved it."""

    order = 90

    def after_epoch(self):
        if self.epoch == 0:
            raise SimulatedKill("simulated kill after epoch 0")


class CountTraining(Callback):
    """Counts fits, trained epochs and training batches."""

    def __init__(self):
        self.fits = self.epochs = self.batches = 0

    def before_fit(self):
        self.fits += 1

    def before_train(self):
        self.epochs += 1

    def after_batch(self):
        if self.training:
            self.batches += 1


pytestmark = pytest.mark.usefixtures("empty_weights_cache")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_toy_pcam(tmp_path_factory.mktemp("toy") / "pcam")


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """Run A: 3 epochs without interruption (pretrained='auto', no weights cached)."""
    runs = tmp_path_factory.mktemp("runs_a")
    profile = make_profile(data_dir, pretrained="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = T.train(profile, ARCH, runs_root=runs, progress=False)
    return {"profile": profile, "runs": runs, "result": result, "warnings": list(caught),
            "run_json": json.loads((result.run_dir / "run.json").read_text())}


@pytest.fixture(scope="module")
def resumed(data_dir, tmp_path_factory, uninterrupted):
    """Run B: the same parameters, killed after epoch 0, then trained again."""
    runs = tmp_path_factory.mktemp("runs_b")
    profile = make_profile(data_dir, pretrained="auto")
    run_dir = R.run_dir_for(profile, ARCH, runs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SimulatedKill):
            T.train(profile, ARCH, runs_root=runs, progress=False,
                    extra_cbs=[KillAfterFirstEpoch()])
        after_kill = {
            "history": R.read_history(run_dir),
            "checkpoint": (run_dir / "checkpoint.pth").is_file(),
            "run_json": (run_dir / "run.json").is_file(),
        }
        result = T.train(profile, ARCH, runs_root=runs, progress=False)
    return {"profile": profile, "runs": runs, "after_kill": after_kill, "result": result,
            "run_json": json.loads((run_dir / "run.json").read_text())}


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"archs": ["vgg16"]}, ["architecture", "vgg16"]),
        ({"lrs": {"resnet": -0.1}}, ["learning rate", "'resnet'", "-0.1"]),
        ({"lrs": {"resnet": 0}}, ["learning rate", "'resnet'"]),
        ({"lrs": {"densenet": 0.0}}, ["learning rate", "'densenet'"]),
        ({"patience": -1}, ["patience"]),
        ({"bs": 0}, ["bs", "batch size"]),
        ({"epochs": 0}, ["epochs"]),
        ({"epoch": 3}, ["'epoch'"]),
        ({"lr_policy": "guess"}, ["lr_policy"]),
        ({"pretrained": "maybe"}, ["pretrained"]),
        ({"centre_crop": 30}, ["centre_crop", "[32, 96]", "30"]),
        ({"centre_crop": 65}, ["centre_crop", "even", "65"]),
        ({"centre_crop": 128}, ["centre_crop", "128"]),
    ],
)
def test_bad_profile_parameter_is_named(tmp_path, overrides, words):
    with pytest.raises(ValueError) as err:
        get_profile("sample", data_dir=tmp_path, **overrides)
    for word in words:
        assert word in str(err.value)


def test_unknown_profile_name_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown profile 'nope'.*sample"):
        get_profile("nope", data_dir=tmp_path)


def test_train_rejects_unknown_architecture_before_creating_anything(data_dir, tmp_path):
    profile = make_profile(data_dir)
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'.*resnet18"):
        T.train(profile, "vgg16", runs_root=tmp_path / "runs", progress=False)
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'"):
        T.run_lr_find(profile, "vgg16", runs_root=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


def test_study_learning_rates_with_fixed_policy():
    paper = get_profile("paper")
    assert paper.lr_policy == "fixed"
    assert T.chosen_lr(paper, "densenet121") == 0.0057
    assert T.chosen_lr(paper, "resnet50") == 0.0012


# --------------------------------------------------------------------------- pretrained


def test_pretrained_yes_without_weights_raises(data_dir, tmp_path, empty_weights_cache):
    profile = make_profile(data_dir, pretrained="yes")
    expected = L.pretrained_weights_file(ARCH)
    assert expected.parent.parent == empty_weights_cache
    with pytest.raises(FileNotFoundError) as err:
        T.train(profile, ARCH, runs_root=tmp_path, progress=False)
    assert str(expected) in str(err.value)
    assert "pretrained='yes'" in str(err.value)
    assert not (R.run_dir_for(profile, ARCH, tmp_path) / "run.json").exists()


@pytest.mark.slow
def test_pretrained_auto_warns_and_records_scratch(uninterrupted):
    expected = str(L.pretrained_weights_file(ARCH))
    messages = [str(w.message) for w in uninterrupted["warnings"]]
    assert any(expected in m and "from scratch" in m for m in messages), messages
    run = uninterrupted["run_json"]
    assert run["pretrained"] is False
    assert expected in run["pretrained_message"]
    assert run["pretrained_message"] in messages
    params = json.loads((uninterrupted["result"].run_dir / "params.json").read_text())
    assert params["identity"]["pretrained"] == "auto"
    assert params["resolved"]["pretrained_used"] is False
    assert params["resolved"]["normalisation"]["source"] == "train split"


# --------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_killed_run_keeps_finished_epoch(resumed):
    after = resumed["after_kill"]
    assert after["checkpoint"]
    assert not after["run_json"], "a killed run must not look complete"
    assert after["history"]["epoch"].tolist() == [0]


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(uninterrupted, resumed):
    a, b = uninterrupted["result"], resumed["result"]
    assert b.resumed_from == 1
    assert a.resumed_from == 0
    assert list(a.history.columns) == R.HISTORY_COLUMNS
    assert a.history["epoch"].tolist() == [0, 1, 2]
    assert a.history["phase"].tolist() == ["scratch"] * 3
    # Exact: weights, optimiser, RNG streams and the smoothed train loss are restored.
    pd.testing.assert_frame_equal(b.history[COMPARED], a.history[COMPARED], check_exact=True)
    on_disk = R.read_history(b.run_dir)
    pd.testing.assert_frame_equal(on_disk[COMPARED], a.history[COMPARED], check_exact=False,
                                  rtol=1e-12)
    assert (b.run_dir / "best.pth").is_file()
    assert b.best_epoch == a.best_epoch
    best_a = torch.load(a.run_dir / "best.pth")
    best_b = torch.load(b.run_dir / "best.pth")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    run = resumed["run_json"]
    assert run["complete"] is True
    assert run["epochs_run"] == 3
    assert run["resumed_from"] == 1
    assert run["best_epoch"] == a.best_epoch
    assert run["stopped_early"] is False
    assert run["lr"] == pytest.approx(0.01)


@pytest.mark.slow
def test_finished_run_is_not_redone(resumed):
    profile, runs = resumed["profile"], resumed["runs"]
    before = R.read_history(R.run_dir_for(profile, ARCH, runs))
    counter = CountTraining()
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = T.train(profile, ARCH, runs_root=runs, progress=False, extra_cbs=[counter])
    assert (counter.fits, counter.epochs, counter.batches) == (0, 0, 0)
    assert again.resumed_from == 3
    assert time.time() - t0 < 60
    pd.testing.assert_frame_equal(again.history, resumed["result"].history)
    pd.testing.assert_frame_equal(R.read_history(again.run_dir), before)
    assert again.best_epoch == resumed["result"].best_epoch


@pytest.mark.slow
def test_changed_parameter_raises_and_restart_sets_run_aside(uninterrupted, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(uninterrupted["runs"], runs)
    changed = make_profile(uninterrupted["profile"].data_dir, pretrained="auto", epochs=1)
    run_dir = R.run_dir_for(changed, ARCH, runs)
    with warnings.catch_warnings(), pytest.raises(R.RunMismatchError,
                                                  match=r"epochs: run 3, requested 1"):
        warnings.simplefilter("ignore")
        T.train(changed, ARCH, runs_root=runs, progress=False)
    assert len(R.read_history(run_dir)) == 3, "a refused run must be left alone"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = T.train(changed, ARCH, runs_root=runs, progress=False, restart=True)
    aside = [p for p in run_dir.parent.iterdir() if p.name.startswith(f"{ARCH}.replaced-")]
    assert len(aside) == 1
    assert len(R.read_history(aside[0])) == 3
    assert json.loads((aside[0] / "params.json").read_text())["identity"]["epochs"] == 3
    assert result.resumed_from == 0
    assert result.history["epoch"].tolist() == [0]
    assert json.loads((run_dir / "params.json").read_text())["identity"]["epochs"] == 1
    assert json.loads((run_dir / "run.json").read_text())["complete"] is True


# --------------------------------------------------------------------------- early stopping


class RisingValidLoss(Callback):
    """Records valid losses 0.5, 0.4, 0.6, 0.7 (after the Recorder, before the keeper).

    Scripted rather than provoked with a huge LR, which can diverge to NaN, where the
    AUC metric itself fails.
    """

    order = 70
    losses = (0.5, 0.4, 0.6, 0.7)

    def after_epoch(self):
        self.recorder.values[-1][1] = self.losses[self.epoch]


@pytest.mark.slow
def test_early_stopping_on_rising_valid_loss(data_dir, tmp_path):
    profile = make_profile(data_dir, epochs=4, patience=1)
    result = T.train(profile, ARCH, runs_root=tmp_path, progress=False,
                     extra_cbs=[RisingValidLoss()])
    history = result.history
    assert result.stopped_early
    assert history["valid_loss"].tolist() == pytest.approx([0.5, 0.4, 0.6])
    assert result.best_epoch == 1
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["stopped_early"] is True and run["complete"] is True
    assert run["epochs_run"] == 3
    assert run["best_epoch"] == 1
    assert (result.run_dir / "best.pth").is_file()


# --------------------------------------------------------------------------- lr_find


@pytest.mark.slow
def test_lr_find_suggestions_and_chosen_lr(data_dir, tmp_path, monkeypatch):
    profile = make_profile(data_dir, lr_policy="find", lr_suggestion="valley")
    found = T.run_lr_find(profile, ARCH, runs_root=tmp_path, progress=False)
    assert 0 < len(found.lrs) <= profile.lr_find_iters
    assert len(found.lrs) == len(found.losses)
    assert np.all(np.diff(found.lrs) > 0)
    assert "valley" in found.suggestions
    assert set(found.suggestions) <= {"valley", "minimum", "steep", "slide"}
    assert all(min(found.lrs) <= v <= max(found.lrs) for v in found.suggestions.values())
    assert found.chosen == found.suggestions["valley"]
    assert found.policy == "find"

    run_dir = R.run_dir_for(profile, ARCH, tmp_path)
    saved = json.loads((run_dir / "lr_find.json").read_text())
    assert saved["suggestions"] == found.suggestions
    assert saved["chosen"] == found.chosen
    assert not (run_dir / "models").exists(), "lr_find's temporary weights are removed"
    assert R.read_lr_find(profile, ARCH, tmp_path) == found

    def no_rerun(*args, **kwargs):
        raise AssertionError("lr_find must be reused, not run again")

    monkeypatch.setattr(T, "run_lr_find", no_rerun)
    assert T.chosen_lr(profile, ARCH, tmp_path, progress=False) == found.chosen
    fixed = make_profile(data_dir, lr_policy="fixed", lrs={"resnet": 0.0042})
    assert T.chosen_lr(fixed, ARCH, tmp_path, progress=False) == 0.0042


@pytest.mark.slow
def test_foreach_optimizer_trains_exactly_like_fastai_sgd_and_resumes(data_dir, tmp_path):
    """optimizer='fastai-foreach' is fastai's SGD: same history, same weights, exact resume."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = {}
        for optimizer in ("fastai", "fastai-foreach"):
            profile = make_profile(data_dir, optimizer=optimizer, epochs=2)
            runs[optimizer] = T.train(profile, ARCH, runs_root=tmp_path / optimizer,
                                      progress=False)
        fast = make_profile(data_dir, optimizer="fastai-foreach", epochs=2)
        with pytest.raises(SimulatedKill):
            T.train(fast, ARCH, runs_root=tmp_path / "killed", progress=False,
                    extra_cbs=[KillAfterFirstEpoch()])
        resumed = T.train(fast, ARCH, runs_root=tmp_path / "killed", progress=False)
    reference, foreach = runs["fastai"], runs["fastai-foreach"]
    pd.testing.assert_frame_equal(foreach.history[COMPARED], reference.history[COMPARED],
                                  check_exact=False, rtol=0, atol=1e-6)
    best_ref = R.load_checkpoint(reference.run_dir / "best.pth")
    best_fast = R.load_checkpoint(foreach.run_dir / "best.pth")
    for name, value in best_ref.items():
        torch.testing.assert_close(best_fast[name], value, rtol=0, atol=1e-6, msg=name)
    assert resumed.resumed_from == 1
    pd.testing.assert_frame_equal(resumed.history[COMPARED], foreach.history[COMPARED],
                                  check_exact=True)
    recipe = json.loads((foreach.run_dir / "run.json").read_text())["recipe"]
    assert "decoupled weight decay" in recipe["optimizer"] and "foreach" in recipe["optimizer"]


def test_unknown_optimizer_is_named(tmp_path):
    with pytest.raises(ValueError, match="optimizer must be 'fastai' or 'fastai-foreach'"):
        get_profile("sample", data_dir=tmp_path, optimizer="torch")


@pytest.mark.parametrize("moms", [[0.9, 0.9], [0.95, 1.2, 0.95], ["a", 0.85, 0.95]])
def test_bad_momentum_schedule_is_named(tmp_path, moms):
    with pytest.raises(ValueError, match="moms must be three momentum values"):
        get_profile("sample", data_dir=tmp_path, moms=moms)


class MomentumLog(Callback):
    """Records the optimiser's momentum at every training batch."""

    order = 70

    def __init__(self):
        self.moms = []

    def after_batch(self):
        if self.training:
            self.moms.append(float(self.opt.hypers[-1]["mom"]))


@pytest.mark.slow
@pytest.mark.parametrize("moms", [(0.95, 0.85, 0.95), (0.9, 0.9, 0.9)], ids=["cycle", "fixed"])
def test_momentum_schedule_is_the_profile_field_and_recorded(data_dir, tmp_path, moms):
    profile = make_profile(data_dir, epochs=1, moms=list(moms))
    log = MomentumLog()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = T.train(profile, ARCH, runs_root=tmp_path, progress=False, extra_cbs=[log])
    assert log.moms[0] == pytest.approx(moms[0], abs=1e-3)
    assert min(log.moms) == pytest.approx(moms[1], abs=1e-2)
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["recipe"]["moms"] == list(moms)
    assert f"{moms[0]:g} -> {moms[1]:g} -> {moms[2]:g}" in run["recipe"]["momentum"]
    params = json.loads((result.run_dir / "params.json").read_text())
    assert params["identity"]["moms"] == list(moms)


def test_cpu_learner_is_channels_last_end_to_end(data_dir, tmp_path):
    """Model weights and every split's batches share the NHWC layout on a CPU too."""
    profile = make_profile(data_dir, pretrained="no")
    choice = L.choose_pretrained(ARCH, "no")
    learn = L.build_learner(profile, ARCH, run_dir=tmp_path, pretrained=choice,
                            norm=L.normalisation(profile, False),
                            device=torch.device("cpu"), progress=False)
    convs = [m for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last)
                         for c in convs if c.weight.shape[-1] > 1)
    for dl in (learn.dls.train, learn.dls.valid):
        xb, _ = dl.one_batch()
        assert xb.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("label_smoothing", 0.5, "label_smoothing must be a number in [0, 0.5)"),
    ("mixup", -1, "mixup must be a number in [0, 10]"),
])
def test_bad_regularisation_is_named(tmp_path, field, value, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        get_profile("sample", data_dir=tmp_path, **{field: value})


def test_label_smoothing_and_mixup_reach_the_learner(data_dir, tmp_path):
    from fastai.callback.mixup import MixUp
    from fastai.losses import LabelSmoothingCrossEntropyFlat

    profile = make_profile(data_dir, label_smoothing=0.1, mixup=0.4)
    learn = L.build_learner(profile, ARCH, run_dir=tmp_path, pretrained=L.choose_pretrained(
        ARCH, "no"), norm=L.normalisation(profile, False), device=torch.device("cpu"),
        progress=False)
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropyFlat)
    assert learn.loss_func.eps == pytest.approx(0.1)
    assert any(isinstance(cb, MixUp) for cb in learn.cbs)
    plain = L.build_learner(make_profile(data_dir), ARCH, run_dir=tmp_path,
                            pretrained=L.choose_pretrained(ARCH, "no"),
                            norm=L.normalisation(profile, False), device=torch.device("cpu"),
                            progress=False)
    assert not any(isinstance(cb, MixUp) for cb in plain.cbs)


def test_paper_profile_requires_imagenet_weights(tmp_path, empty_weights_cache):
    paper = get_profile("paper", data_dir=tmp_path)
    assert paper.pretrained == "yes"
    assert "depths" in paper.arch_note and "densenet121" in paper.arch_note
    with pytest.raises(FileNotFoundError) as err:
        T.train(paper, "resnet50", runs_root=tmp_path / "runs", progress=False)
    message = str(err.value)
    assert str(L.pretrained_weights_file("resnet50")) in message
    assert "--set pretrained=no" in message and "download.pytorch.org" in message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("run.json"))


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="glibc's malloc_trim is Linux-only")
def test_freed_memory_goes_back_to_the_system_after_each_epoch(monkeypatch, data_dir, tmp_path):
    calls = []
    real = T.return_freed_memory
    monkeypatch.setattr(T, "return_freed_memory", lambda: calls.append(real()) or True)
    profile = make_profile(data_dir, epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T.train(profile, ARCH, runs_root=tmp_path, progress=False)
    assert calls == [True, True]


class ForwardDtypes(Callback):
    """Records the dtype of the model's output, training and validation batches apart."""

    order = 60  # after CpuBf16Training's after_pred, which casts the prediction back

    def __init__(self):
        self.seen = {"train": set(), "valid": set()}
        self.handle = None

    def before_fit(self):
        def hook(module, args, output):
            self.seen["train" if self.learn.training else "valid"].add(output.dtype)
        self.handle = self.learn.model.register_forward_hook(hook)

    def after_pred(self):
        assert self.learn.pred.dtype == torch.float32  # metrics and loss see fp32

    def after_fit(self):
        self.handle.remove()


def test_precision_on_a_cpu_is_fp32_unless_bf16_is_asked(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for asked, on_cpu in (("auto", "fp32"), ("no", "fp32"), ("fp16", "fp32"), ("bf16", "bf16")):
        assert L.precision_for(get_profile("sample", data_dir=tmp_path, mixed_precision=asked),
                               cpu) == on_cpu, asked
    assert L.precision_for(get_profile("sample", data_dir=tmp_path, mixed_precision="bf16"),
                           cuda) == "bf16"


def test_bf16_on_a_cpu_without_bf16_units_warns_naming_the_setting(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(L, "cpu_bf16_units", lambda: "")
    with pytest.warns(UserWarning, match="mixed_precision='bf16'.*2.5x slower"):
        L.warn_if_cpu_bf16_is_slow("bf16", cpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.warn_if_cpu_bf16_is_slow("fp32", cpu)
        L.warn_if_cpu_bf16_is_slow("bf16", cuda)
        monkeypatch.setattr(L, "cpu_bf16_units", lambda: "amx_bf16 avx512_bf16")
        L.warn_if_cpu_bf16_is_slow("bf16", cpu)


def test_cpu_bf16_units_reads_proc_cpuinfo_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    real_path = L.Path
    monkeypatch.setattr(L, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    cpuinfo.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16 amx_tile\n")
    assert L.cpu_bf16_units() == "avx512_bf16"
    cpuinfo.write_text("processor : 0\nflags : fpu sse avx2\n")
    assert L.cpu_bf16_units() == ""
    cpuinfo.unlink()
    assert L.cpu_bf16_units() == "unknown"


@pytest.mark.slow
def test_bf16_on_a_cpu_autocasts_training_steps_only_and_is_recorded(data_dir, tmp_path):
    dtypes = ForwardDtypes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        profile = make_profile(data_dir, mixed_precision="bf16", epochs=1)
        result = T.train(profile, ARCH, runs_root=tmp_path, progress=False,
                         device=torch.device("cpu"), extra_cbs=[dtypes])
    assert dtypes.seen == {"train": {torch.bfloat16}, "valid": {torch.float32}}
    assert np.isfinite(result.history["valid_loss"]).all()
    assert json.loads((result.run_dir / "run.json").read_text())["precision"] == "bf16"
    fp32 = make_profile(data_dir, mixed_precision="no", epochs=1)
    with pytest.raises(Exception, match="mixed_precision"):
        T.train(fp32, ARCH, runs_root=tmp_path, progress=False, device=torch.device("cpu"))
