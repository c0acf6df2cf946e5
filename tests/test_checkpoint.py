"""The checkpoint package on its own: meta.json validation key by key, the streaming safetensors writer read
back by the safetensors library, the lazy reader against the files it reads, extra files carried over by name-blind
copying, and a full disk in any of a checkpoint's writes."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from flm.checkpoint import CheckpointReader, WholeWriter, copy_extra_files, save_checkpoint, save_streamed
from flm.checkpoint.meta import FORMAT_VERSION, validate_meta
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


# ---- a full disk -----------------------------------------------------------------------------------------------
NO_SPACE = "No space left on device (os error 28)"  # what the tokenizers library raises, as a plain Exception


def trained(seed: int = 0):
    torch.manual_seed(seed)
    model = FLM(MODEL)
    opt = build_optimizer(model, Config(model=MODEL).train)
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    return model, opt


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_full_disk_in_any_write_of_a_checkpoint_is_one_line_and_the_older_one_survives(tmp_path):
    """Each writer of a checkpoint fails on a full disk in its own way (OSError, SafetensorError, or the plain
    Exception of the tokenizers library in `write_extra`): always the one line naming the last good checkpoint,
    no staging folder left, the older checkpoint as it was; an error that is not a write error (a bug) keeps its
    type and traceback, and leaves no staging folder either."""
    model, opt = trained()
    meta = {k: v for k, v in good_meta().items() if k not in ("format", "step")}
    root = tmp_path / "checkpoints"
    good = save_checkpoint(root, 3, model, opt, meta, keep_last=5,
                           write_extra=lambda folder: (folder / "tokenizer.json").write_text("{}"))
    before = files_of(good)

    def full(folder: Path) -> None:
        (folder / "tokenizer.json").write_text("{")  # a part written, then the disk is full
        raise Exception(NO_SPACE)

    def disk_full(error: BaseException):
        def write(folder: Path) -> None:
            raise error
        return write

    for write_extra in (full, disk_full(OSError(28, "No space left on device")),
                        disk_full(SafetensorError(f"Error while serializing: IoError({NO_SPACE})"))):
        with pytest.raises(FlmError) as e:
            save_checkpoint(root, 6, model, opt, meta, keep_last=5, write_extra=write_extra)
        assert str(e.value) == (f"could not write checkpoint step 6 in {root}: No space left on device; "
                                f"the last good checkpoint is {good}")
        assert sorted(p.name for p in root.iterdir()) == ["step_00000003"] and files_of(good) == before

    def streamed(out: WholeWriter) -> None:
        out.weight("embed.weight", torch.ones(4))
        raise Exception(NO_SPACE)

    with pytest.raises(FlmError, match=f"could not write checkpoint step 6 in .*: No space left on device; "
                                       f"the last good checkpoint is {good}$"):
        save_streamed(root, 6, streamed, meta, keep_last=5)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"] and files_of(good) == before
    for bug in (Exception("not an OS error"), KeyError("tokenizer")):
        with pytest.raises(type(bug), match=str(bug)):
            save_checkpoint(root, 6, model, opt, meta, keep_last=5, write_extra=disk_full(bug))
        assert sorted(p.name for p in root.iterdir()) == ["step_00000003"] and files_of(good) == before


def test_a_checkpoint_rewritten_from_another_keeps_every_extra_file(tmp_path):
    """`flm grow` copies what `write_extra` added (by exclusion of the format's own entries), so a file added to
    checkpoints later travels with no change to the copier."""
    model, opt = trained()
    meta = {k: v for k, v in good_meta().items() if k not in ("format", "step")}

    def extra(folder: Path) -> None:
        (folder / "tokenizer.json").write_text("{}")
        (folder / "guard.safetensors").write_bytes(b"guard")
        (folder / "future").mkdir()
        (folder / "future" / "table.bin").write_bytes(b"\1\2")

    source = save_checkpoint(tmp_path / "a", 6, model, opt, meta, keep_last=1, write_extra=extra)
    reader = CheckpointReader(source)

    def copy(out: WholeWriter) -> None:
        for name, value in reader.weights.items():
            out.weight(name, value)
        for name, fields in reader.adam.items():
            for field, value in fields.items():
                out.adam(name, field, value)
        out.rng(reader.rng())

    copied = save_streamed(tmp_path / "b", 6, copy, meta, keep_last=1,
                           write_extra=lambda folder: copy_extra_files(source, folder))
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in source.iterdir())
    for name in ("tokenizer.json", "guard.safetensors"):
        assert (copied / name).read_bytes() == (source / name).read_bytes()
    assert (copied / "future" / "table.bin").read_bytes() == b"\1\2"
    for name in ("model.safetensors", "train_state.safetensors"):  # the same tensors, streamed
        a, b = load_file(str(source / name)), load_file(str(copied / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_full_disk_while_training_and_while_resuming_is_one_line_and_resume_is_exact_after(tiny, tmp_path, cli,
                                                                                            monkeypatch):
    """The tokenizer file of a checkpoint is written by the tokenizers library, which reports a full disk as a
    plain Exception. Training, and a resume while the disk is still full, end with exit status 2 and one line
    naming the last good checkpoint, with nothing half-written left; once there is room, resuming continues
    exactly as an uninterrupted run."""
    from flm.data.tokenizer import Tokenizer

    run, straight = tmp_path / "run", tmp_path / "straight"
    assert cli("train", *tiny.args(straight)).status == 0
    assert cli("train", *tiny.args(run), "--until-step", "3").status == 0
    good = run / "checkpoints" / "step_00000003"
    before = files_of(good)
    real_save = Tokenizer.save

    def no_space(self, directory):
        real_save(self, directory)  # the file is there, half-written, when the error comes
        raise Exception(NO_SPACE)

    monkeypatch.setattr(Tokenizer, "save", no_space)
    for attempt in ("training", "resuming while the disk is still full"):
        result = cli("train", *tiny.args(run), "--resume", "auto")
        assert result.status == 2, attempt
        assert result.err.strip().splitlines() == [
            f"error: could not write checkpoint step 6 in {run / 'checkpoints'}: No space left on device; "
            f"the last good checkpoint is {good}"], attempt
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"], attempt
        assert files_of(good) == before, attempt
    monkeypatch.undo()
    result = cli("train", *tiny.args(run), "--resume", "auto")
    assert result.status == 0 and "resumed from" in result.out
    last = "checkpoints/step_00000012"
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(str(straight / last / name)), load_file(str(run / last / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_full_disk_in_a_sharded_checkpoint_is_the_same_one_line(tmp_path):
    """The sharded format's writer (every process of a torchrun job; here one, over gloo) fails alike: the extra
    files' plain Exception is one line on every process, and the staging folder is gone."""
    import torch.distributed as dist

    model, opt = trained()
    meta = {**{k: v for k, v in good_meta().items() if k not in ("format", "step")}, "layout": {"world_size": 1}}
    root = tmp_path / "checkpoints"

    def full(folder: Path) -> None:
        raise Exception(NO_SPACE)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        good = save_checkpoint(root, 3, model, opt, meta, keep_last=5, distributed=True)
        with pytest.raises(FlmError) as e:
            save_checkpoint(root, 6, model, opt, meta, keep_last=5, write_extra=full, distributed=True)
    finally:
        dist.destroy_process_group()
    assert str(e.value) == (f"could not write checkpoint step 6 in {root}: No space left on device; "
                            f"the last good checkpoint is {good}")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
