"""Config loading: typed values, one-line errors, presets and command-line overrides."""

import re

import pytest

from flm.config import config_to_dict, config_toml, load_config
from flm.errors import FlmError


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_file_values_presets_and_overrides(tmp_path):
    path = write(tmp_path, '[model]\npreset = "flm-101b"\nn_layers = 2\n[train]\nlr = 1\nseq_len = 64\n')
    cfg = load_config(path, ["train.batch_size=3", "data.corpus=kjv", "train.sample_prompt='a=b'"])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.vocab_size) == (2, 10240, 100352)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert (cfg.train.batch_size, cfg.data.corpus, cfg.train.sample_prompt) == (3, "kjv", "a=b")


def test_config_round_trips_through_dict():
    cfg = load_config(None, ["model.d_ff=300"])
    from flm.config import config_from_dict

    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_a_config_written_as_toml_reads_back_equal(tmp_path):
    """config_toml -> load_config is the identity on a config with sources, stages, lists, a quoted string with a
    non-ASCII character, and values at and off their defaults; the file names only what differs (and [model])."""
    path = write(tmp_path, """[model]\nn_layers = 2\nd_model = 96\nn_heads = 3\nhead_dim = 32
[data]\ncorpus = "bundled"\nvocab_size = 4096
[[data.sources]]\nkind = "text"\nweight = 0.75
[[data.sources]]\nkind = "teacher"\npath = "bundled"\nweight = 0.25\nval_fraction = 0.2
[train]\nschedule = "wsd"\ndecay_fraction = 0.2\nlr = 3e-3\nmin_lr = 3e-4\nsample_prompt = 'He said "好" \\ left'
[mup]\nladder = [32, 64, 96]
[[stages]]\nname = "2x96"\ntokens = 800_000
[[stages]]\nname = "4x128"\nn_layers = 4\nd_model = 128\nn_heads = 4\ntokens = 600_000\nlr_at_growth = "continue"
copy_noise = 0.2\nramp_steps = 0
""")
    cfg = load_config(path)
    text = config_toml(cfg, ["a recipe", "", "its second line"])
    assert text.startswith("# a recipe\n#\n# its second line\n\n[model]\n")
    again = write(tmp_path, text)
    assert load_config(again) == cfg
    assert "[parallel]" not in text and "[plan]" not in text  # all at their defaults
    assert text.count("[[stages]]") == 2 and text.count("[[data.sources]]") == 2
    assert "\nramp_steps = 0\n" in text and "\nladder = [32, 64, 96]\n" in text
    assert load_config(write(tmp_path, config_toml(load_config(None), []))) == load_config(None)


@pytest.mark.parametrize("text, message", [
    ("[model]\nn_layer = 3\n", "unknown key 'model.n_layer' (did you mean 'n_layers'?)"),
    ("[modle]\n", "unknown section 'modle'"),
    ("[model]\nn_layers = 'four'\n", "model.n_layers must be an integer, got 'four'"),
    ("[model]\nn_layers = true\n", "model.n_layers must be an integer, got True"),
    ("[model]\nn_layers = 0\n", "model.n_layers must be positive"),
    ("[model]\nhead_dim = 15\n", "model.head_dim must be even"),
    ("[model]\npreset = 'flm-7t'\n", "unknown preset 'flm-7t'"),
    ("[train]\nseq_len = 4096\n", "exceeds model.max_seq_len"),
    ("[train]\ndtype = 'fp8'\n", "train.dtype must be"),
    ("[train]\nlr = 1e-3\nmin_lr = 1e-2\n", "train.min_lr must be in [0, lr]"),
    ("[train\n", "config error"),
    ("[model]\narch = 'gpt'\n", "model.arch must be one of ('flm', 'llama'), got 'gpt'"),
])
def test_bad_configs_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(FlmError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("train.lr", "expected section.key=value"),
    ("lr=3", "the key must be section.key"),
    ("train.lrr=3", "unknown key 'train.lrr'"),
])
def test_bad_overrides(override, message):
    with pytest.raises(FlmError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


def test_cli_reports_user_errors_in_one_line_with_exit_2(tmp_path, cli_process):
    bad = write(tmp_path, "[train]\nbatch_size = -1\n")
    for args in (["train", "--config", str(tmp_path / "missing.toml")], ["train", "--config", str(bad)],
                 ["generate", str(tmp_path)]):
        proc = cli_process(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr


def test_overrides_reach_arrays_of_tables(tmp_path):
    """--set reaches [[stages]] and [[data.sources]] by index, at any depth."""
    path = write(tmp_path, '[[stages]]\ntokens = 1000\n[[stages]]\nd_model = 256\ntokens = 2000\n'
                           '[data]\n[[data.sources]]\nkind = "text"\nweight = 1.0\n'
                           '[[data.sources]]\nkind = "teacher"\npath = "t.jsonl"\nweight = 0.25\n')
    cfg = load_config(path, ["stages.1.d_model=192", "stages.0.tokens=500", "data.sources.1.weight=0.5"])
    assert [s.d_model for s in cfg.stages] == [None, 192] and cfg.stages[0].tokens == 500
    assert [s.weight for s in cfg.data.sources] == [1.0, 0.5]
    for override, message in [("stages.2.tokens=1", "stages has 2 entries (indices 0..1), not '2'"),
                              ("stages.x.tokens=1", "not 'x'"),
                              ("stages.d_model=1", "'stages' is a list; name an entry by its index"),
                              ("stages=1", "must be section.key"),
                              ("train.lr.x=1", "train.lr must be a number"),
                              ("stages.0.nope=1", "unknown key 'stages[0].nope'")]:
        with pytest.raises(FlmError, match=re.escape(message)):
            load_config(path, [override])


def test_every_declared_arch_builds_its_model():
    """model.arch is declared in the config (validated without torch) and mapped to a class by flm.model's one
    seam: both name the same architectures."""
    from flm.config import model_config_from_dict
    from flm.config.schema import ARCHS
    from flm.model import MODELS, build_model

    assert sorted(MODELS) == sorted(ARCHS)
    for arch in ARCHS:
        cfg = model_config_from_dict({"arch": arch, "n_layers": 1, "vocab_size": 11})
        assert type(build_model(cfg)) is MODELS[arch]


def test_a_model_table_without_arch_is_an_flm_so_older_checkpoints_load(tmp_path):
    """Checkpoints written before model.arch existed hold model and run configs (and a ramp's old shape) without
    it: the default makes their meta.json valid for inference and resume."""
    from flm.checkpoint.meta import FORMAT_VERSION, validate_meta
    from flm.config import model_config_from_dict

    config = config_to_dict(load_config(None, ["model.vocab_size=300"]))
    model = config["model"]
    assert model.pop("arch") == "flm"
    ramp = {"old": model, "sources": [[i, False] for i in range(model["n_layers"])], "ramp_steps": 10,
            "steps_done": 1, "operator": "msg"}
    meta = {"format": FORMAT_VERSION, "step": 3, "model": model, "ramp": ramp, "config": config, "stage": 0,
            "data": {"samples_seen": 48}}
    assert validate_meta(tmp_path / "meta.json", meta, resume=True) is meta
    assert model_config_from_dict(model).arch == "flm"


def test_the_growable_shape_is_declared_once():
    """flm.config.shape names each growable dimension by its config key (a [model] and a [[stages]] field) and its
    ModelConfig attribute; a stage setting each key changes exactly that attribute of its model."""
    import dataclasses

    from flm.config import ModelConfig, StageConfig
    from flm.config.shape import SHAPE_FIELDS, SHAPE_KEYS

    assert SHAPE_KEYS == ("n_layers", "d_model", "n_heads", "d_ff", "n_kv_heads")
    for field in SHAPE_FIELDS:
        assert field.key in {f.name for f in dataclasses.fields(StageConfig)}
        assert field.key in {f.name for f in dataclasses.fields(ModelConfig)} and hasattr(ModelConfig(), field.attr)
        cfg = load_config(None, ["model.d_ff=512"])  # set, so that d_model's growth leaves the FFN alone
        cfg.stages = [StageConfig(tokens=1000), StageConfig(tokens=1000)]
        before = getattr(cfg.model, field.attr)
        setattr(cfg.stages[1], field.key, 2 * before)
        first, second = cfg.stage_models()
        changed = [f.key for f in SHAPE_FIELDS if getattr(first, f.attr) != getattr(second, f.attr)]
        # An unset n_kv_heads is n_heads (every FLM model): its key/value heads follow its heads.
        follows = ["n_kv_heads"] if field.key == "n_heads" else []
        assert changed == [field.key, *follows] and getattr(second, field.attr) == 2 * before
