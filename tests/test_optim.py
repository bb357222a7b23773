"""ForeachSGD is fastai's SGD: same weights after one-cycle steps, norm/bias exempt from decay."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 - patches Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.optimizer import SGD
from torch import nn

from pcamlib.optim import ForeachSGD


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)),
    )


def two_groups(model: nn.Module):
    return [list(model[0].parameters()), list(model[1].parameters())]


def data(n: int = 96, bs: int = 16) -> DataLoaders:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 12, 12, generator=g)
    y = (x[:, 2].mean(dim=(1, 2)) > 0).long()
    items = list(zip(x, y, strict=True))
    return DataLoaders(DataLoader(items, bs=bs, shuffle=False),
                       DataLoader(items[:32], bs=bs, shuffle=False))


def trained(opt_func, *, unfreeze_slice: bool, epochs: int = 2, wd: float = 0.01):
    learn = Learner(data(), copy.deepcopy(MODEL), loss_func=nn.CrossEntropyLoss(),
                    opt_func=opt_func, wd=wd, splitter=two_groups)
    lr = slice(1e-3, 1e-1) if unfreeze_slice else 0.05
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr)
    return learn


MODEL = small_model()


@pytest.mark.parametrize("unfreeze_slice", [False, True], ids=["one-lr", "discriminative-lrs"])
def test_foreach_sgd_matches_fastai_sgd_under_one_cycle(unfreeze_slice):
    reference = trained(partial(SGD, mom=0.9), unfreeze_slice=unfreeze_slice)
    fast = trained(partial(ForeachSGD, mom=0.9), unfreeze_slice=unfreeze_slice)
    ref_state, fast_state = reference.model.state_dict(), fast.model.state_dict()
    moved = 0
    for name, value in ref_state.items():
        torch.testing.assert_close(fast_state[name], value, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(value, MODEL.state_dict()[name])
    assert moved > 0, "training must have changed the weights"
    # Same momentum buffers, stored where fastai keeps them.
    for (p_ref, *_), (p_fast, *_) in zip(reference.opt.all_params(), fast.opt.all_params(),
                                         strict=True):
        torch.testing.assert_close(fast.opt.state[p_fast]["grad_avg"],
                                   reference.opt.state[p_ref]["grad_avg"], rtol=0, atol=1e-6)
    # one-cycle scheduled the momentum of both (fastai: 0.95 -> 0.85 -> back near 0.95).
    assert fast.opt.hypers[-1]["mom"] == pytest.approx(reference.opt.hypers[-1]["mom"])
    assert 0.94 < fast.opt.hypers[-1]["mom"] <= 0.95


def test_norm_and_bias_parameters_are_not_decayed():
    """With a zero gradient only weight decay moves a parameter: weights shrink, norm/bias don't."""
    learn = Learner(data(), copy.deepcopy(MODEL), loss_func=nn.CrossEntropyLoss(),
                    opt_func=partial(ForeachSGD, mom=0.9), wd=0.5, splitter=two_groups)
    learn.create_opt()
    learn.opt.set_hypers(lr=0.1, wd=0.5, mom=0.9)
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    for p in learn.model.parameters():
        p.grad = torch.zeros_like(p)
    learn.opt.step()
    for name, p in learn.model.named_parameters():
        norm_or_bias = name.endswith("bias") or ".1." in name or ".4." in name
        if norm_or_bias:
            assert torch.equal(p, before[name]), name
        else:
            torch.testing.assert_close(p, before[name] * (1 - 0.1 * 0.5), msg=name)


def test_parameters_without_gradient_are_left_alone():
    learn = Learner(data(), copy.deepcopy(MODEL), loss_func=nn.CrossEntropyLoss(),
                    opt_func=partial(ForeachSGD, mom=0.9), wd=0.1, splitter=two_groups)
    learn.create_opt()
    learn.opt.set_hypers(lr=0.1)
    head = list(learn.model[1].parameters())
    body = list(learn.model[0].parameters())
    for p in head:
        p.grad = torch.ones_like(p)
    body_before = [p.detach().clone() for p in body]
    learn.opt.step()
    assert all(torch.equal(p, b) for p, b in zip(body, body_before, strict=True))
    assert all("grad_avg" not in learn.opt.state[p] for p in body)
    assert all("grad_avg" in learn.opt.state[p] for p in head)


def test_state_dict_moves_between_fastai_and_foreach_sgd():
    reference = trained(partial(SGD, mom=0.9), unfreeze_slice=False, epochs=1)
    fast = Learner(data(), copy.deepcopy(reference.model), loss_func=nn.CrossEntropyLoss(),
                   opt_func=partial(ForeachSGD, mom=0.9), wd=0.01, splitter=two_groups)
    fast.create_opt()
    fast.opt.load_state_dict(reference.opt.state_dict())
    for (p_ref, *_), (p_fast, *_) in zip(reference.opt.all_params(), fast.opt.all_params(),
                                         strict=True):
        assert torch.equal(fast.opt.state[p_fast]["grad_avg"],
                           reference.opt.state[p_ref]["grad_avg"])
