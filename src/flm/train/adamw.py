"""AdamW whose step count may differ between entries of a tensor, so that grown tensors are bias-corrected right,
and whose step can be cancelled on the device (a bad step is skipped without the host looking at it).

After growth, a tensor holds old entries (trained for t steps, with moments) and new entries (zero moments).
Adam's bias correction 1/(1-β^step) must use t for the old entries and the steps since growth for the new ones;
one shared count would make the first updates of new entries (1-β1)/sqrt(1-β2) times their proper size. A grown
tensor's state therefore holds `step`, one count per age class, and `age`, one byte per entry naming its class
(flm.growth.optimizer). Once every class's bias correction has reached exactly 1.0 in double precision, the
counts fold into one scalar and `age` is dropped: the extra byte per entry lasts a few hundred steps after each
growth (about 730 at β2 = 0.95).

Tensors with a scalar count (all of them outside that window) take torch's fused AdamW kernel, the
decoupled-weight-decay AdamW of Loshchilov & Hutter in one pass per tensor; grown tensors take the same update
written out with per-class bias corrections, on each process's own piece. `step(skip=flag)` with a device scalar
cancels the whole step where the flag is set (parameters, moments and counts unchanged, NaN gradients ignored):
the fused kernel's `found_inf`, and a `torch.where` for grown tensors. No value is read back to the host for
that, so the training loop never waits for the device to decide.

Whether a grown tensor's counts have settled is a read from the device, so the host keeps an upper bound of each
one's smallest count (it grows by one per step; a cancelled step leaves the count behind) and reads only once that
bound has reached the first count that can settle: one read for all grown tensors when an optimizer meets them
(after growth or a resume), then none until the fold is near, instead of one per tensor per step. The fold still
happens at exactly the step where the counts settle.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam as functional_adam


def _piece(t: torch.Tensor) -> torch.Tensor:
    """This process's piece of a sharded tensor (the update is elementwise, so pieces are updated alone)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _settled(counts: torch.Tensor, beta1: float, beta2: float) -> bool:
    """True when 1 - β^count is exactly 1.0 in double precision for every class (one small read)."""
    low = float(counts.min())
    return 1.0 - beta1 ** low == 1.0 and 1.0 - beta2 ** low == 1.0


def unsettled_below(beta1: float, beta2: float) -> float:
    """A count below which 1 - β^count cannot be 1.0 in double precision for the larger β.

    1 - x rounds to 1.0 only for x <= 2^-54; below log(2^-54) / log(β) steps β^count is above that, and one
    step of margin covers the rounding of β ** count itself."""
    beta = max(beta1, beta2)
    return 0.0 if beta == 0.0 else math.log(2.0 ** -54) / math.log(beta) - 1.0


def scalar_step(value: float, device: torch.device) -> torch.Tensor:
    """A scalar step count where the fused kernel wants it: a float32 tensor on the parameter's device, filled there
    (a tensor copied from the host would make the host wait for the device)."""
    return torch.full((), float(value), dtype=torch.float32, device=device)


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        # Per grown tensor (by id of its parameter): its count tensor and a host-side upper bound of its smallest
        # count; the entry is valid only while that count tensor is still the state's (a loaded state replaces it).
        self._count_bounds: dict[int, tuple[torch.Tensor, float]] = {}

    @torch.no_grad()
    def step(self, closure=None, skip: torch.Tensor | None = None):
        """One AdamW step; with `skip` (a boolean device scalar) set, nothing changes."""
        found_inf = None if skip is None else skip.to(torch.float32)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            flat = []  # (param, grad, exp_avg, exp_avg_sq, step) with a scalar step: the fused kernel
            grown = []  # (param, state) with counts per age class
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = scalar_step(0, p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "age" not in state and state["step"].dim() > 0:
                    state.update(_classes(state["step"]))  # per-entry counts of a checkpoint from before
                if "age" in state:
                    grown.append((p, state))
                else:
                    flat.append((p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]))
            self._learn_bounds(grown)
            for p, state in grown:
                self._per_class(p, state, lr, beta1, beta2, eps, wd, skip)
            if flat:
                params, grads, avgs, sqs, steps = (list(t) for t in zip(*flat))
                functional_adam(params, grads, avgs, sqs, [], steps, fused=True, found_inf=found_inf,
                                decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                                weight_decay=wd, eps=eps, maximize=False)

    def _learn_bounds(self, grown: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> None:
        """Read the smallest count of every grown tensor whose bound is not known yet, all in one read."""
        unknown = [(p, state["step"]) for p, state in grown if self._bound(p, state) is None]
        if unknown:
            lows = torch.stack([counts.min() for _, counts in unknown]).tolist()
            for (p, counts), low in zip(unknown, lows):
                self._count_bounds[id(p)] = (counts, low)

    def _bound(self, p: torch.Tensor, state: dict[str, torch.Tensor]) -> float | None:
        entry = self._count_bounds.get(id(p))
        return entry[1] if entry is not None and entry[0] is state["step"] else None

    def _per_class(self, p, state, lr, beta1, beta2, eps, wd, skip) -> None:
        counts = state["step"]
        new_counts = counts + (1.0 if skip is None else (~skip).to(counts.dtype))
        c = new_counts.double()
        bc1_of = (1 - beta1 ** c).to(p.dtype)  # per class
        bc2_sqrt_of = (1 - beta2 ** c).sqrt().to(p.dtype)
        param, grad = _piece(p), _piece(p.grad)
        m, v, age = _piece(state["exp_avg"]), _piece(state["exp_avg_sq"]), _piece(state["age"]).long()
        if skip is not None:
            grad = torch.where(skip, 0.0, grad)  # a NaN gradient must not reach m and v
        new_m = m.lerp(grad, 1 - beta1)
        new_v = v.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        new_p = param.mul(1 - lr * wd) if wd != 0 else param.clone()
        new_p.sub_(lr * new_m / bc1_of[age] / (new_v.sqrt() / bc2_sqrt_of[age] + eps))
        for old, new in ((m, new_m), (v, new_v), (param, new_p)):
            old.copy_(new if skip is None else torch.where(skip, old, new))
        counts.copy_(new_counts)
        bound = self._bound(p, state) + 1.0  # still an upper bound: a count grows by at most one per step
        if bound >= unsettled_below(beta1, beta2) and _settled(counts, beta1, beta2):
            state["step"] = scalar_step(float(counts.max()), _piece(p).device)
            del state["age"]
            del self._count_bounds[id(p)]
        else:
            self._count_bounds[id(p)] = (counts, bound)


def _classes(per_entry: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-entry step counts (a sharded tensor's, whole) as class counts and one byte of class per entry."""
    counts, age = torch.unique(per_entry.full_tensor() if isinstance(per_entry, DTensor) else per_entry,
                               return_inverse=True)
    if isinstance(per_entry, DTensor):
        from torch.distributed.tensor import distribute_tensor

        age = distribute_tensor(age, per_entry.device_mesh, per_entry.placements, src_data_rank=None)
    return {"step": counts.float().to(_piece(per_entry).device), "age": age.to(torch.uint8)}
