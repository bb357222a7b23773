"""The fine_tune path with ImageNet weights present: phases, per-phase early stopping, resume.

A resnet18 weights file (random weights, seeded) is placed in a temporary torch hub
cache, so training takes fastai's ``fine_tune`` route: one frozen epoch, then unfrozen.
The valid losses are scripted, so the early-stopping decisions are known in advance.
"""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
import torch
import torchvision
from fastai.callback.core import Callback
from fastai.learner import SkipToEpoch
from test_train import ARCH, COMPARED, SimulatedKill, make_profile, write_toy_pcam

import pcamlib.learner as L
import pcamlib.train as T

# Frozen epoch 0.1, then the unfrozen phase: fastai's EarlyStoppingCallback (reset at
# each fit) sees 0.5 best, 0.4 best, 0.45 worse (wait 1), 0.3 best: no stop with
# patience 2. Carrying the frozen 0.1 over would stop after two unfrozen epochs.
SCRIPTED_VALID_LOSS = [0.1, 0.5, 0.4, 0.45, 0.3]


class ScriptedValidLoss(Callback):
    """Replaces each epoch's recorded valid loss (after the Recorder, before the keeper)."""

    order = 70

    def before_fit(self):
        self.phase_offset = 0 if self.learn.opt.frozen_idx else 1
        skip = [c for c in self.learn.cbs if isinstance(c, SkipToEpoch)]
        self.first_run_epoch = skip[0]._skip_to if skip else 0  # resumed mid-phase

    def after_epoch(self):
        if self.epoch < self.first_run_epoch:  # skipped on resume: nothing was recorded
            return
        epoch = self.phase_offset + self.epoch
        self.recorder.values[-1][1] = SCRIPTED_VALID_LOSS[epoch]


class KillAfterUnfrozenEpoch(Callback):
    order = 90

    def after_epoch(self):
        if not self.learn.opt.frozen_idx and self.epoch == 1:
            raise SimulatedKill("killed after the second unfrozen epoch")


@pytest.fixture(scope="module")
def imagenet_weights_cache(tmp_path_factory):
    """A torch hub cache holding a (random, seeded) resnet18 weights file."""
    hub = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "get_dir", lambda: str(hub))
        path = L.pretrained_weights_file(ARCH)
        path.parent.mkdir(parents=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), path)
        yield path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_toy_pcam(tmp_path_factory.mktemp("toy-ft") / "pcam")


def fine_tune(data_dir, runs, extra=()):
    profile = make_profile(data_dir, pretrained="yes", epochs=4, patience=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.train(profile, ARCH, runs_root=runs, progress=False,
                       extra_cbs=[ScriptedValidLoss(), *extra])


@pytest.mark.slow
def test_early_stopping_resets_at_each_phase_like_fastai(imagenet_weights_cache, data_dir,
                                                         tmp_path):
    result = fine_tune(data_dir, tmp_path / "runs")
    history = result.history
    assert history["phase"].tolist() == ["frozen"] + ["unfrozen"] * 4
    assert history["valid_loss"].tolist() == pytest.approx(SCRIPTED_VALID_LOSS)
    assert not result.stopped_early, "patience counts within the unfrozen phase only"
    assert result.pretrained
    # The model kept is still the lowest valid loss over the whole run: the frozen epoch.
    assert result.best_epoch == 0
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["recipe"]["phases"][0]["phase"] == "frozen"
    assert "reset at each phase" in run["recipe"]["early_stopping"]


@pytest.mark.slow
def test_early_stopping_still_stops_within_a_phase(imagenet_weights_cache, data_dir, tmp_path):
    profile = make_profile(data_dir, pretrained="yes", epochs=4, patience=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = T.train(profile, ARCH, runs_root=tmp_path, progress=False,
                         extra_cbs=[ScriptedValidLoss()])
    # 0.5 best, 0.4 best, 0.45 worse: patience 1 stops after the third unfrozen epoch.
    assert result.stopped_early
    assert result.history["valid_loss"].tolist() == pytest.approx(SCRIPTED_VALID_LOSS[:4])


@pytest.mark.slow
def test_resume_inside_the_unfrozen_phase_keeps_its_patience(imagenet_weights_cache,
                                                              data_dir, tmp_path):
    whole = fine_tune(data_dir, tmp_path / "whole")
    with pytest.raises(SimulatedKill):
        fine_tune(data_dir, tmp_path / "killed", extra=[KillAfterUnfrozenEpoch()])
    resumed = fine_tune(data_dir, tmp_path / "killed")
    assert resumed.resumed_from == 3
    pd.testing.assert_frame_equal(resumed.history[COMPARED], whole.history[COMPARED],
                                  check_exact=True)
    assert resumed.stopped_early == whole.stopped_early
