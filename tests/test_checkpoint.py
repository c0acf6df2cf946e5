"""The checkpoint package on its own: meta.json validation key by key, the streaming safetensors writer read
back by the safetensors library, and the lazy reader against the files it reads."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flm.checkpoint import save_checkpoint
from flm.checkpoint.meta import FORMAT_VERSION, validate_meta
from flm.checkpoint.reader import CheckpointReader
from flm.checkpoint.stream import StreamingSafetensors
from flm.config import Config, ModelConfig, TrainConfig, config_to_dict
from flm.errors import FlmError
from flm.model import FLM
from flm.train.optim import build_optimizer

MODEL = ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, vocab_size=64, max_seq_len=32)
FILE = Path("/run/step_00000006/meta.json")


def good_meta(step: int = 6) -> dict:
    old = dataclasses.asdict(dataclasses.replace(MODEL, d_model=16, n_heads=1))
    return {"format": FORMAT_VERSION, "step": step, "model": config_to_dict(MODEL),
            "config": config_to_dict(Config(model=MODEL, train=TrainConfig(seq_len=32))), "stage": 1,
            "data": {"samples_seen": 96},
            "ramp": {"old": old, "sources": [[0, False], [1, False]], "ramp_steps": 10, "steps_done": 4}}


def test_a_complete_meta_passes_for_inference_and_resume():
    meta = good_meta()
    assert validate_meta(FILE, meta, resume=True) is meta
    assert validate_meta(FILE, {**meta, "ramp": None, "data": None, "step": 0}, resume=True)
    inference_only = {k: meta[k] for k in ("format", "step", "model", "ramp")}
    assert validate_meta(FILE, inference_only) is inference_only  # inference needs no data position


@pytest.mark.parametrize("change, resume, message", [
    (lambda m: m.pop("format"), False, "key 'format' is missing"),
    (lambda m: m.update(format=FORMAT_VERSION + 1), False, f"a checkpoint of format {FORMAT_VERSION + 1}"),
    (lambda m: m.pop("step"), False, "key 'step' is missing"),
    (lambda m: m.update(step=-1), False, "'step' must be an integer >= 0, got -1"),
    (lambda m: m.update(step=True), False, "'step' must be an integer >= 0, got True"),
    (lambda m: m.update(step=6.0), False, "'step' must be an integer >= 0, got 6.0"),
    (lambda m: m.pop("model"), False, "key 'model' is missing"),
    (lambda m: m.update(model=[]), False, "'model' must be an object, got []"),
    (lambda m: m.update(model={"d_model": 0}), False, "'model' is not a valid model config"),
    (lambda m: m.pop("ramp"), False, "key 'ramp' is missing"),
    (lambda m: m.update(ramp=3), False, "'ramp' must be an object, got 3"),
    (lambda m: m["ramp"].update(old={"n_layers": "two"}), False, "'ramp.old' is not a valid model config"),
    (lambda m: m["ramp"].pop("old"), False, "'ramp.old' must be an object, got None"),
    (lambda m: m["ramp"].update(sources="all"), False, "'ramp.sources' must be a list of [old layer, is new] pairs"),
    (lambda m: m["ramp"].update(sources=[[0, False, 1]]), False, "'ramp.sources'"),
    (lambda m: m["ramp"].update(sources=[[0.5, True]]), False, "'ramp.sources'"),
    (lambda m: m["ramp"].update(sources=[[0, "yes"]]), False, "'ramp.sources'"),
    (lambda m: m["ramp"].update(ramp_steps=0), False, "'ramp.ramp_steps' must be an integer >= 1, got 0"),
    (lambda m: m["ramp"].update(steps_done=-1), False, "'ramp.steps_done' must be an integer >= 0, got -1"),
    (lambda m: m["ramp"].update(steps_done=10), False, "'ramp.steps_done' (10) must be below ramp.ramp_steps (10)"),
    (lambda m: m["ramp"].update(operator="clone"), False,
     "'ramp.operator' must be one of ('msg', 'zero') (the families that ramp), got 'clone'"),
    (lambda m: m.pop("config"), True, "key 'config' is missing"),
    (lambda m: m.update(config={"train": {"lr": 5}}), True, "'config' is not a valid run config"),
    (lambda m: m.pop("stage"), True, "key 'stage' is missing"),
    (lambda m: m.update(stage=-2), True, "'stage' must be an integer >= 0, got -2"),
    (lambda m: m.pop("data"), True, "key 'data' is missing"),
    (lambda m: m.update(data=None), True, "'data' is null at step 6"),
    (lambda m: m.update(data=None, step=1), True, "'data' is null at step 1: the data position is unknown, so "
                                                  "resuming would read samples again that were already trained on"),
    (lambda m: m.update(config=[]), True, "'config' must be an object, got []"),
    (lambda m: m.update(data=[]), True, "'data' must be an object, got []"),
    (lambda m: m.update(data={"samples_seen": "96"}), True, "'data.samples_seen' must be an integer >= 0, got '96'"),
])
def test_each_damage_is_one_line_naming_the_file_and_key(change, resume, message):
    meta = copy.deepcopy(good_meta())
    change(meta)
    with pytest.raises(FlmError) as e:
        validate_meta(FILE, meta, resume=resume)
    assert str(e.value).startswith(f"{FILE}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_resume_keys_are_not_asked_for_inference_and_the_ramp_may_name_fresh_layers():
    meta = good_meta()
    meta["ramp"]["sources"] = [[0, False], [None, True], [1, 1]]  # a fresh layer; 0/1 as written by other tools
    for key in ("config", "stage", "data"):
        assert validate_meta(FILE, {k: v for k, v in meta.items() if k != key})
    with pytest.raises(FlmError, match="must hold a JSON object, got list"):
        validate_meta(FILE, [meta])


def test_a_sharded_checkpoint_must_say_how_many_processes_wrote_it():
    meta = good_meta()
    with pytest.raises(FlmError, match="key 'layout' is missing"):
        validate_meta(FILE, meta, sharded=True)
    with pytest.raises(FlmError, match=re.escape("'layout.world_size' must be an integer >= 1, got 0")):
        validate_meta(FILE, {**meta, "layout": {"world_size": 0}}, sharded=True)
    with pytest.raises(FlmError, match=re.escape("'layout' must be an object, got 4")):
        validate_meta(FILE, {**meta, "layout": 4}, sharded=True)
    assert validate_meta(FILE, {**meta, "layout": {"world_size": 4}}, sharded=True)


def test_the_streaming_writer_makes_files_the_safetensors_library_reads(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(4, 2).bfloat16(), "u8": torch.arange(7, dtype=torch.uint8),
               "i64": torch.tensor([[-1, 2**40]]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
               "f16": torch.randn(2).half(), "bool": torch.tensor([True, False]),
               "strided": torch.randn(4, 6)[:, ::2]}
    writer = StreamingSafetensors(tmp_path / "a.safetensors")
    for name, t in tensors.items():
        writer.add(name, t)
    assert not (tmp_path / "a.safetensors").exists()  # appears only when complete
    writer.close()
    back = load_file(str(tmp_path / "a.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no body or temporary file left
    with pytest.raises(ValueError, match="written twice"):
        again = StreamingSafetensors(tmp_path / "b.safetensors")
        again.add("x", torch.ones(1))
        again.add("x", torch.ones(1))
    again.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_the_reader_gives_each_tensor_of_a_checkpoint_one_at_a_time(tmp_path):
    torch.manual_seed(0)
    model = FLM(MODEL)
    opt = build_optimizer(model, Config(model=MODEL).train)
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    meta = {k: v for k, v in good_meta().items() if k not in ("format", "step")}
    ckpt = save_checkpoint(tmp_path / "checkpoints", 6, model, opt, {**meta, "ramp": None}, keep_last=1)
    reader = CheckpointReader(ckpt)
    saved = load_file(str(ckpt / "model.safetensors"))
    state = load_file(str(ckpt / "train_state.safetensors"))
    assert sorted(reader.weights) == sorted(saved) and "blocks.0.ln1.weight" in reader.weights
    assert "nope" not in reader.weights and len(reader.weights) == len(saved)
    for name in saved:
        assert torch.equal(reader.weights[name], saved[name])
        assert {f: torch.equal(v, state[f"opt.{name}.{f}"]) for f, v in reader.adam[name].items()} == \
            {"exp_avg": True, "exp_avg_sq": True, "step": True}
    assert torch.equal(reader.rng()["torch_cpu"], state["rng.torch_cpu"])
    with pytest.raises(KeyError):
        reader.weights["lm_head.bias"]
    json.loads((ckpt / "meta.json").read_text())


def test_a_ramp_round_trips_through_its_checkpoint_form_and_old_forms_still_load():
    """The growth ramp as meta.json holds it: every field back as it was (a new layer's source is null), a ramp
    written before growth families is an msg ramp, and a damaged old shape is named by its key."""
    from flm.growth import Ramp
    from flm.growth.operators import LayerSource

    old = ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, vocab_size=101, max_seq_len=64)
    ramp = Ramp(old, [LayerSource(0, False), LayerSource(None, True), LayerSource(1, False)], 10, 3, "zero")
    form = json.loads(json.dumps(ramp.to_dict()))
    assert form["sources"] == [[0, False], [None, True], [1, False]]
    assert Ramp.from_dict(form) == ramp
    del form["operator"]
    assert Ramp.from_dict(form).operator == "msg"
    form["old"]["bogus"] = 1
    with pytest.raises(FlmError, match=r"unknown key 'growth\.old\.bogus'"):
        Ramp.from_dict(form)
