"""fastai's SGD, stepped with torch's multi-tensor (foreach) operations.

fastai's :func:`fastai.optimizer.SGD` updates one parameter at a time through a chain of
Python callbacks (decoupled weight decay, momentum average, step). On a GPU that loop
launches several small kernels per parameter and costs a quarter of a training step
(``bench/gpu.sh``). :class:`ForeachSGD` computes exactly the same update with one foreach
call per operation and parameter group.

Why not ``torch.optim.SGD``: its ``weight_decay`` is L2 regularisation (``wd * p`` added to
the gradient, then amplified by momentum, about 10x at momentum 0.9) and applies to every
parameter, while fastai's SGD decays the weights directly (``p *= 1 - lr * wd``, "true"
weight decay) and exempts normalisation and bias parameters (``do_wd=False``, which the
Learner sets and ``OptimWrapper`` never passes on to torch).
"""

from __future__ import annotations

import torch
from fastai.optimizer import Optimizer, average_grad, momentum_step, weight_decay

from pcamlib.errors import InputError


class ForeachSGD(Optimizer):
    """fastai's ``SGD(mom, wd, decouple_wd=True)`` with foreach updates.

    Per parameter group, with that group's ``lr``, ``mom`` and ``wd`` hyper-parameters
    (which fastai's schedulers set, e.g. one-cycle's LR and momentum), for every
    parameter ``p`` that has a gradient:

    1. ``p *= 1 - lr * wd`` unless the Learner set ``do_wd=False`` (norm layers, biases);
    2. ``grad_avg = grad_avg * mom + grad`` (fastai's convention: no dampening, the
       average starts at zero);
    3. ``p -= lr * grad_avg``.

    It is a fastai :class:`~fastai.optimizer.Optimizer` (same parameter groups, hypers,
    freezing and ``state_dict``, with the momentum buffer stored as fastai's
    ``grad_avg``), so checkpoints move between ``optimizer="fastai"`` and
    ``"fastai-foreach"``.

    Args:
        params: Parameters or parameter groups (as the Learner's splitter gives them).
        lr: Learning rate.
        mom: Momentum.
        wd: Decoupled weight decay.
    """

    def __init__(self, params, lr, mom: float = 0.9, wd: float = 0.0):
        # The callbacks are fastai's own; they document the update and make step()
        # easy to check against Optimizer.step, which would run them one by one.
        super().__init__(params, [weight_decay, average_grad, momentum_step],
                         lr=lr, mom=mom, wd=wd)

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient (see the class docstring)."""
        if closure is not None:
            raise InputError("ForeachSGD.step: closures are not supported (fastai's SGD "
                             "does not support them either)")
        for group, hyper in zip(self.param_lists, self.hypers, strict=True):
            params = [p for p in group if p.grad is not None]
            if not params:
                continue
            lr, mom, wd = hyper["lr"], hyper["mom"], hyper["wd"]
            if wd != 0:
                decayed = [p for p in params if self.state[p].get("do_wd", True)]
                if decayed:
                    torch._foreach_mul_(decayed, 1 - lr * wd)
            averages = []
            for p in params:
                state = self.state[p]
                if state.get("grad_avg") is None:
                    state["grad_avg"] = torch.zeros_like(p.grad)
                averages.append(state["grad_avg"])
            torch._foreach_mul_(averages, mom)
            torch._foreach_add_(averages, [p.grad for p in params])
            torch._foreach_add_(params, averages, alpha=-lr)
