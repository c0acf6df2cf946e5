"""AdamW whose step count may differ per element, so that grown tensors are bias-corrected right, and whose
step can be cancelled on the device (a bad step is skipped without the host looking at it).

After growth, a tensor holds old entries (trained for t steps, with moments) and new entries (zero
moments). Adam's bias correction 1/(1-β^step) must use t for the old entries and the steps since
growth for the new ones; one shared count would make the first updates of new entries
(1-β1)/sqrt(1-β2) times their proper size. So the `step` state is a scalar tensor, as in
torch.optim.AdamW, except for grown tensors, where it is a tensor of the parameter's shape. Once
every entry's bias correction has reached exactly 1.0 in double precision it is a scalar again: the
extra memory lasts a few hundred steps after each growth.

Tensors with a scalar count (all of them outside a growth ramp) take torch's fused AdamW kernel, the
decoupled-weight-decay AdamW of Loshchilov & Hutter in one pass per tensor; grown tensors take the
same update written out with per-element bias corrections. `step(skip=flag)` with a device scalar
cancels the whole step where the flag is set (parameters, moments and counts unchanged, NaN gradients
ignored): the fused kernel's `found_inf`, and a `torch.where` for grown tensors. No value is read
back to the host, so the training loop never waits for the device to decide.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam as functional_adam


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A reduction over a sharded (DTensor) step count, completed over all shards."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _settled(step: torch.Tensor, beta1: float, beta2: float) -> bool:
    """True when 1 - β^step is exactly 1.0 in double precision for every entry (of every shard)."""
    low = float(_whole(step.min()))
    return 1.0 - beta1 ** low == 1.0 and 1.0 - beta2 ** low == 1.0


def scalar_step(value: float, device: torch.device) -> torch.Tensor:
    """A scalar step count where the fused kernel wants it: a float32 tensor on the parameter's device."""
    return torch.tensor(float(value), dtype=torch.float32, device=device)


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None, skip: torch.Tensor | None = None):
        """One AdamW step; with `skip` (a boolean device scalar) set, nothing changes."""
        found_inf = None if skip is None else skip.to(torch.float32)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            flat = []  # (param, grad, exp_avg, exp_avg_sq, step) with a scalar step: the fused kernel
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = scalar_step(0, p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if state["step"].dim() == 0:
                    flat.append((p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]))
                else:
                    self._per_element(p, state, lr, beta1, beta2, eps, wd, skip)
            if flat:
                params, grads, avgs, sqs, steps = (list(t) for t in zip(*flat))
                functional_adam(params, grads, avgs, sqs, [], steps, fused=True, found_inf=found_inf,
                                decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                                weight_decay=wd, eps=eps, maximize=False)

    @staticmethod
    def _per_element(p, state, lr, beta1, beta2, eps, wd, skip) -> None:
        step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        new_step = step + 1.0
        grad = p.grad if skip is None else torch.where(skip, 0.0, p.grad)  # a NaN gradient must not reach m, v
        new_m = m.lerp(grad, 1 - beta1)
        new_v = v.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        s = new_step.double()
        bc1 = (1 - beta1 ** s).to(p.dtype)
        bc2_sqrt = (1 - beta2 ** s).sqrt().to(p.dtype)
        new_p = p.mul(1 - lr * wd) if wd != 0 else p.clone()
        new_p.sub_(lr * new_m / bc1 / (new_v.sqrt() / bc2_sqrt + eps))
        for old, new in ((step, new_step), (m, new_m), (v, new_v), (p, new_p)):
            old.copy_(new if skip is None else torch.where(skip, old, new))
        if _settled(step, beta1, beta2):
            state["step"] = scalar_step(float(_whole(step.max())), p.device)
