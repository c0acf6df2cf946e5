"""flm.train.adamw.AdamW on its own: per-entry step counts (age classes) against separate torch.optim.AdamW
instances, when the counts fold back into one, the host's bound on reading them, older checkpoints' per-entry
counts, a step cancelled on the device, and the fused kernel on CUDA.

How growth gives a tensor its classes is tests/test_growth_optimizer.py's; Adam state through a whole growth and
training step, against torch's AdamW: tests/test_training_arithmetic.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flm.train.adamw import AdamW, unsettled_below

NAN, INF = float("nan"), float("inf")


# ---- counts per age class ------------------------------------------------------------------------------------
def test_adamw_per_element_steps_equal_separate_optimizers_and_settle():
    torch.manual_seed(0)
    old_part, new_part = torch.randn(4, 3), torch.randn(2, 3)
    whole = torch.nn.Parameter(torch.cat([old_part, new_part]))
    ref_old, ref_new = torch.nn.Parameter(old_part.clone()), torch.nn.Parameter(new_part.clone())
    opt = AdamW([whole], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref_a = torch.optim.AdamW([ref_old], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref_b = torch.optim.AdamW([ref_new], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(7):  # the old rows have a history of 7 steps; the new rows have none
        g = torch.randn(4, 3)
        ref_old.grad, whole.grad = g.clone(), torch.cat([g, torch.zeros(2, 3)])
        ref_a.step()
        opt.step()
    whole.data[4:] = new_part
    state = opt.state[whole]
    state["exp_avg"][4:], state["exp_avg_sq"][4:] = 0, 0
    state["step"] = torch.cat([torch.full((4, 3), 7.0), torch.zeros(2, 3)])
    for _ in range(3):
        g = torch.randn(6, 3)
        whole.grad, ref_old.grad, ref_new.grad = g.clone(), g[:4].clone(), g[4:].clone()
        opt.step()
        ref_a.step()
        ref_b.step()
        assert torch.allclose(whole.data, torch.cat([ref_old.data, ref_new.data]), atol=1e-7, rtol=0)
    for _ in range(800):  # 1 - 0.95**800 == 1.0 in double: the count becomes a scalar again
        whole.grad = torch.randn(6, 3)
        opt.step()
    assert opt.state[whole]["step"].dim() == 0 and opt.state[whole]["step"].item() == 810


def first_settled(beta1: float, beta2: float) -> int:
    """By brute force: the least step count whose bias corrections are both exactly 1.0 in double precision."""
    return next(t for t in itertools.count() if 1.0 - beta1 ** t == 1.0 and 1.0 - beta2 ** t == 1.0)


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.999), (0.5, 0.6), (0.0, 0.95), (0.0, 0.0)])
def test_no_count_below_the_read_bound_settles(betas):
    """Below `unsettled_below` the optimizer does not read the counts from the device: no count there settles, and
    reading starts at most a few steps before the first one that does."""
    assert unsettled_below(*betas) <= first_settled(*betas) <= unsettled_below(*betas) + 3


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.99, 0.9)])  # the second: β1's correction settles last
def test_grown_counts_fold_at_the_step_they_settle_and_a_loaded_state_is_read_afresh(betas):
    """The host's bound only delays reads, never the fold: a tensor with classes of 0 and 5 steps folds at the step
    its youngest class settles, as it would if the counts were read at every step. A state loaded into the same
    optimizer (a rollback) is read afresh, not judged by the bound of the state it replaced."""
    whole = torch.nn.Parameter(torch.randn(3, 2))
    opt = AdamW([whole], lr=1e-3, betas=betas)

    def grown_state(young: float, old: float) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor([old, young]), "age": torch.tensor([[0, 0], [0, 1], [1, 1]], dtype=torch.uint8),
                "exp_avg": torch.zeros(3, 2), "exp_avg_sq": torch.zeros(3, 2)}

    opt.state[whole] = grown_state(0.0, 5.0)
    for step in range(1, first_settled(*betas) + 1):
        whole.grad = torch.randn(3, 2)
        opt.step()
        assert (opt.state[whole]["step"].dim() == 0) == (step == first_settled(*betas)), step
    assert opt.state[whole]["step"].item() == first_settled(*betas) + 5
    opt.state[whole] = grown_state(0.0, 5.0)
    for _ in range(3):  # the bound is now 3, far below the first count that can settle
        whole.grad = torch.randn(3, 2)
        opt.step()
    opt.state[whole] = grown_state(first_settled(*betas) - 1.0, first_settled(*betas) + 9.0)  # one step from settled
    whole.grad = torch.randn(3, 2)
    opt.step()
    assert opt.state[whole]["step"].dim() == 0 and opt.state[whole]["step"].item() == first_settled(*betas) + 10


def test_per_entry_counts_of_an_older_checkpoint_become_classes_plain_and_sharded():
    """Checkpoints from before age classes stored one float count per entry; AdamW's next step turns them into the
    sorted distinct counts and one byte per entry (here a cancelled step, which keeps the counts as they were
    loaded). A sharded state (DTensor, here a one-process mesh) gets the same classes, its age sharded as the
    counts were."""
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    per_entry = torch.tensor([[5.0, 0.0], [5.0, 5.0], [0.0, 2.0], [2.0, 0.0]])
    expected_age = torch.tensor([[2, 0], [2, 2], [0, 1], [1, 0]], dtype=torch.uint8)

    def after_loading(param: torch.nn.Parameter, counts: torch.Tensor, like) -> dict[str, torch.Tensor]:
        """The optimizer state once a step has met `counts`, as the resume of such a checkpoint leaves them."""
        opt = AdamW([param], lr=0.1, betas=(0.9, 0.95))
        opt.state[param] = {"step": counts, "exp_avg": like(torch.zeros(4, 2)), "exp_avg_sq": like(torch.zeros(4, 2))}
        param.grad = like(torch.ones(4, 2))
        opt.step(skip=torch.tensor(True))
        return opt.state[param]

    plain = after_loading(torch.nn.Parameter(torch.zeros(4, 2)), per_entry.clone(), lambda t: t)
    assert torch.equal(plain["step"], torch.tensor([0.0, 2.0, 5.0])) and plain["step"].dtype == torch.float32
    assert plain["age"].dtype == torch.uint8 and torch.equal(plain["age"], expected_age)

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])

        def shard(t: torch.Tensor) -> torch.Tensor:
            return distribute_tensor(t, mesh, [Shard(0)])

        sharded = after_loading(torch.nn.Parameter(shard(torch.zeros(4, 2))), shard(per_entry), shard)
        assert torch.equal(sharded["step"], torch.tensor([0.0, 2.0, 5.0]))
        assert sharded["age"].placements == (Shard(0),) and sharded["age"].device_mesh == mesh
        assert sharded["age"].dtype == torch.uint8 and torch.equal(sharded["age"].full_tensor(), expected_age)
    finally:
        torch.distributed.destroy_process_group()


# ---- a cancelled step ----------------------------------------------------------------------------------------
def test_a_cancelled_adamw_step_leaves_parameters_moments_and_counts_exactly():
    """Both paths: the fused kernel (scalar counts) and the age-class path of a grown tensor."""
    torch.manual_seed(0)
    plain, grown = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    opt = AdamW([plain, grown], lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(2):
        plain.grad, grown.grad = torch.randn(4, 3), torch.randn(5)
        opt.step()
    state = opt.state[grown]
    state["step"] = torch.tensor([2.0, 0.0])  # old entries 2 steps, the last two entries new
    state["age"] = torch.tensor([0, 0, 0, 1, 1], dtype=torch.uint8)
    state["exp_avg"][3:], state["exp_avg_sq"][3:] = 0.0, 0.0  # new entries start without moments
    before = {k: v.clone() for k, v in [("p", plain.detach()), ("g", grown.detach()),
                                         *[(f"p.{f}", v) for f, v in opt.state[plain].items()],
                                         *[(f"g.{f}", v) for f, v in state.items()]]}
    plain.grad, grown.grad = torch.full((4, 3), NAN), torch.tensor([1.0, NAN, 1.0, 1.0, INF])
    opt.step(skip=torch.tensor(True))
    after = {k: v for k, v in [("p", plain.detach()), ("g", grown.detach()),
                               *[(f"p.{f}", v) for f, v in opt.state[plain].items()],
                               *[(f"g.{f}", v) for f, v in state.items()]]}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # Not cancelled: the grown tensor's new entries take a first step's full size (lr, times sign), the old ones a
    # bias-corrected third step's, each from its own count.
    g = torch.tensor([0.5, -0.5, 0.5, 2.0, -2.0])
    plain.grad, grown.grad = torch.randn(4, 3), g.clone()
    start = grown.detach().clone()
    opt.step(skip=torch.tensor(False))
    assert torch.equal(state["step"], torch.tensor([3.0, 1.0]))
    moved = (grown.detach() - start * (1 - 0.1 * 0.1))
    assert torch.allclose(moved[3:], -0.1 * torch.sign(g[3:]), rtol=1e-5)  # m̂/sqrt(v̂) = sign(g) at count 1
    assert not torch.allclose(moved[:3].abs(), torch.full((3,), 0.1), rtol=1e-3)
    assert all(math.isfinite(v) for v in grown.detach().tolist())


# ---- on CUDA ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_adamw_on_cuda_equals_torch_adamw_and_a_cancelled_step_changes_nothing():
    """flm's AdamW runs torch's fused CUDA kernel: five steps equal torch.optim.AdamW's single-tensor loop to
    float32 rounding; a step cancelled on the device (NaN gradients) leaves weights, moments and counts bit for bit."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(33, 17, device="cuda")), torch.nn.Parameter(torch.randn(17, device="cuda"))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt, ref_opt = AdamW(ours, **kw), torch.optim.AdamW(ref, foreach=False, **kw)
    for _ in range(5):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step(skip=torch.zeros((), dtype=torch.bool, device="cuda"))
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-6)
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in ours]
    for p in ours:
        p.grad = torch.full_like(p, float("nan"))
    opt.step(skip=torch.ones((), dtype=torch.bool, device="cuda"))
    for p, (weight, state) in zip(ours, before):
        assert torch.equal(p, weight) and all(torch.equal(opt.state[p][k], v) for k, v in state.items())
