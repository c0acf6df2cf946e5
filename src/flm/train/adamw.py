"""AdamW whose step count may differ per element, so that grown tensors are bias-corrected right.

After growth, a tensor holds old entries (trained for t steps, with moments) and new entries (zero
moments). Adam's bias correction 1/(1-β^step) must use t for the old entries and the steps since
growth for the new ones; one shared count would make the first updates of new entries
(1-β1)/sqrt(1-β2) times their proper size. So the `step` state is a scalar tensor, as in
torch.optim.AdamW, except for grown tensors, where it is a tensor of the parameter's shape. Once
every entry's bias correction has reached exactly 1.0 in double precision it is a scalar again: the
extra memory lasts a few hundred steps after each growth.

The update is the decoupled-weight-decay AdamW of Loshchilov & Hutter, in the same order of
operations as torch.optim.AdamW (foreach path for scalar steps).
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A reduction over a sharded (DTensor) step count, completed over all shards."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _settled(step: torch.Tensor, beta1: float, beta2: float) -> bool:
    """True when 1 - β^step is exactly 1.0 in double precision for every entry (of every shard)."""
    low = float(_whole(step.min()))
    return 1.0 - beta1 ** low == 1.0 and 1.0 - beta2 ** low == 1.0


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            flat = []  # (param, grad, exp_avg, exp_avg_sq, step) with a scalar step: the foreach path
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if state["step"].dim() == 0:
                    flat.append((p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]))
                else:
                    self._per_element(p, state, lr, beta1, beta2, eps, wd)
            if flat:
                self._foreach(flat, lr, beta1, beta2, eps, wd)

    @staticmethod
    def _foreach(flat, lr, beta1, beta2, eps, wd) -> None:
        params, grads, avgs, sqs, steps = (list(t) for t in zip(*flat))
        torch._foreach_add_(steps, 1.0)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, 1 - beta2)
        ts = [step.item() for step in steps]
        denom = torch._foreach_sqrt(sqs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in ts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, avgs, denom, [-lr / (1 - beta1 ** t) for t in ts])

    @staticmethod
    def _per_element(p, state, lr, beta1, beta2, eps, wd) -> None:
        step = state["step"].add_(1.0)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if wd != 0:
            p.mul_(1 - lr * wd)
        m.lerp_(p.grad, 1 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        s = step.double()
        bc1 = (1 - beta1 ** s).to(p.dtype)
        bc2_sqrt = (1 - beta2 ** s).sqrt().to(p.dtype)
        p.sub_(lr * m / bc1 / (v.sqrt() / bc2_sqrt + eps))
        if _settled(step, beta1, beta2):
            state["step"] = _whole(step.max()).cpu()
