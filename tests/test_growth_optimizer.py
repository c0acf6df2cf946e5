"""Adam state through repeated growth, by hand: which age class every entry is in, the counts per class, and the
limit of classes a byte can hold. One growth is covered in test_growth_training.py and test_training_arithmetic.py;
the bugs that only a second growth shows (the first growth's classes lost or rescaled) are caught here. How AdamW
reads the classes (and turns an older checkpoint's per-entry counts into them): test_adamw.py."""

import dataclasses

import pytest
import torch

from flm.config import ModelConfig
from flm.errors import FlmError
from flm.growth.families.clone import clone_adam_state
from flm.growth.optimizer import MAX_AGES, grow_adam_state

BASE = ModelConfig(n_layers=1, d_model=8, n_heads=2, head_dim=4, vocab_size=5, max_seq_len=8, mup=True, base_width=8)


def fresh_state(shape: tuple[int, ...], steps: float) -> dict[str, torch.Tensor]:
    """A tensor's state before any growth: one scalar count, moments with distinct values."""
    n = torch.Size(shape).numel()
    return {"step": torch.tensor(steps), "exp_avg": torch.arange(1.0, n + 1).view(shape),
            "exp_avg_sq": torch.arange(1.0, n + 1).view(shape) ** 2}


def test_two_width_growths_keep_every_class_and_scale_the_heads_moments_by_the_width_ratio():
    """lm_head (vocab x d_model) under μP, d_model 8 -> 16 -> 32: columns 0..7 are in class 0 (the first run's
    count), 8..15 in class 1 (the second stage's), 16..31 in class 2 (new). The head's readout multiplier halves at
    each doubling, so the old block's first moment halves and its second quarters (r = 1/2 each time); the age bytes
    are labels, never scaled."""
    mid, last = dataclasses.replace(BASE, d_model=16, n_heads=4), dataclasses.replace(BASE, d_model=32, n_heads=8)
    s0 = fresh_state((5, 8), 7.0)
    s1 = grow_adam_state("lm_head.weight", s0, torch.Size((5, 16)), BASE, mid)
    s1["step"] += 3  # three steps in the middle stage: every class advances
    s1["exp_avg"][:, 8:], s1["exp_avg_sq"][:, 8:] = 100.0, 400.0  # the middle stage's own history
    s2 = grow_adam_state("lm_head.weight", s1, torch.Size((5, 32)), mid, last)

    assert torch.equal(s2["step"], torch.tensor([10.0, 3.0, 0.0]))
    expected_age = torch.tensor([0] * 8 + [1] * 8 + [2] * 16, dtype=torch.uint8).expand(5, 32)
    assert s2["age"].dtype == torch.uint8 and torch.equal(s2["age"], expected_age)
    m, v = torch.arange(1.0, 41).view(5, 8), torch.arange(1.0, 41).view(5, 8) ** 2
    assert torch.equal(s2["exp_avg"][:, :8], m / 4) and torch.equal(s2["exp_avg_sq"][:, :8], v / 16)
    assert torch.equal(s2["exp_avg"][:, 8:16], torch.full((5, 8), 50.0))
    assert torch.equal(s2["exp_avg_sq"][:, 8:16], torch.full((5, 8), 100.0))
    assert s2["exp_avg"][:, 16:].abs().max() == 0 and s2["exp_avg_sq"][:, 16:].abs().max() == 0


def test_a_tensor_that_did_not_grow_keeps_its_classes():
    wide = dataclasses.replace(BASE, d_ff=64)  # the FFN grows; the attention output projection does not
    state = fresh_state((8, 8), 4.0) | {"step": torch.tensor([4.0, 1.0]),
                                         "age": torch.randint(0, 2, (8, 8), dtype=torch.uint8)}
    out = grow_adam_state("blocks.0.attn.proj.weight", state, torch.Size((8, 8)), BASE, wide)
    assert torch.equal(out["step"], state["step"]) and torch.equal(out["age"], state["age"])
    assert out["age"] is not state["age"]  # a copy: the old optimizer's state stays as it was


def test_the_classes_a_byte_holds_and_the_message_past_them():
    wide = dataclasses.replace(BASE, d_ff=64)
    state = fresh_state((32, 8), 1.0)
    state["age"] = torch.full((32, 8), MAX_AGES - 2, dtype=torch.uint8)
    state["step"] = torch.arange(MAX_AGES - 1, dtype=torch.float32)  # classes 0 .. 253
    out = grow_adam_state("blocks.0.mlp.fc1.weight", state, torch.Size((64, 8)), BASE, wide)
    assert len(out["step"]) == MAX_AGES and out["age"][32:].unique().tolist() == [MAX_AGES - 1]
    with pytest.raises(FlmError, match=r"^blocks\.0\.mlp\.fc1\.weight: 255 growths .*; let each stage run longer$"):
        grow_adam_state("blocks.0.mlp.fc1.weight", out, torch.Size((128, 8)), wide,
                        dataclasses.replace(BASE, d_ff=128))


def test_clone_tiles_the_age_bytes_unscaled_and_divides_the_moments():
    """fc1 (d_ff x d_model) cloned along d_ff: every hidden unit is copied and its outgoing fc2 column halved, so a
    clone's fc1 gradient is half its source's (exp_avg / 2, exp_avg_sq / 4) while fc2's gradient, the unit's
    activation times the output's gradient, is its source's (moments tiled as they are). Each clone inherits its
    source's age class and counts."""
    wide = dataclasses.replace(BASE, d_ff=64)
    age = torch.randint(0, 3, (32, 8), dtype=torch.uint8)
    state = fresh_state((32, 8), 5.0) | {"step": torch.tensor([5.0, 2.0, 1.0]), "age": age}
    out = clone_adam_state("blocks.0.mlp.fc1.weight", state, torch.Size((64, 8)), BASE, wide)
    assert torch.equal(out["step"], state["step"])
    assert out["age"].dtype == torch.uint8 and torch.equal(out["age"], torch.cat([age, age]))
    assert torch.equal(out["exp_avg"], torch.cat([state["exp_avg"]] * 2) / 2)
    assert torch.equal(out["exp_avg_sq"], torch.cat([state["exp_avg_sq"]] * 2) / 4)
    fc2 = fresh_state((8, 32), 5.0)
    out2 = clone_adam_state("blocks.0.mlp.fc2.weight", fc2, torch.Size((8, 64)), BASE, wide)
    assert torch.equal(out2["exp_avg"], torch.cat([fc2["exp_avg"]] * 2, 1))
    assert torch.equal(out2["exp_avg_sq"], torch.cat([fc2["exp_avg_sq"]] * 2, 1))
