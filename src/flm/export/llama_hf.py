"""Stock Hugging Face folders of the Llama family <-> checkpoints of the llama arch (flm.model.llama).

`flm import hf DIR RUN` reads a local folder of LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM
(config.json, safetensors weights in one file or shards, tokenizer.json) and `flm export hf` writes one back that
stock transformers loads without trust_remote_code (flm.export.hf dispatches here by config.json's model_type
and the checkpoint's model.arch).

- config.json is mapped field by field; what flm cannot reproduce exactly is refused with one line naming the
  field (`refusal`): rope scaling of any kind, an enabled sliding window shorter than the context, Llama's
  attention/MLP biases, activations other than silu, quantized weights.
- Weights are renamed (`hf_name` / `flm_name`) and never transposed, split or fused; they are streamed one
  tensor at a time in both directions (safetensors' safe_open in, flm.checkpoint's streaming writers out), so
  neither direction holds more than about one tensor. Import widens to fp32 (flm's training precision, exact);
  export writes fp32 (so an fp32 folder round-trips bit for bit) or bf16.
- The folder's tokenizer.json, with its tokenizer_config.json and special_tokens_map.json, becomes the run's
  tokenizer (flm.data.tokenizer carries those files wherever the tokenizer goes) and is written back on export.
- The class imported is recorded as model.hf_class and exported again. A μP readout multiplier (≠ 1) is folded
  into an untied head on export (exact up to one rounding) and refused for a tied one (stock classes have none).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from flm.checkpoint import CheckpointReader, RunLock, WholeWriter, save_streamed
from flm.checkpoint.state import rng_state
from flm.config import Config, DataConfig, ModelConfig, TrainConfig, config_to_dict, config_toml, model_config_from_dict
from flm.data.tokenizer import HF_FILE, Tokenizer, load_tokenizer_dir
from flm.errors import FlmError
from flm.export.folder import INDEX_FILE, WEIGHTS_FILE, write_json, write_weights
from flm.files import atomic_write
from flm.model import build_model, init_order, readout_multiplier

# The stock classes: config.json's architectures[0] -> its model_type, and transformers' defaults for the keys a
# config.json may leave out (those of transformers 5: Mistral's sliding window is on unless set to null).
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "mistral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
IMPORT_CONFIG = "import.toml"  # the run config `flm import hf` writes beside the checkpoints
TOKENIZER_DIR = "tokenizer"  # ... and the run's tokenizer, which that config's data.tokenizer names
# Tensors of older checkpoints that are not weights (recomputed by transformers itself): skipped on import.
_NOT_WEIGHTS = re.compile(r"\.rotary_emb\.inv_freq$")

# flm name -> HF name, per block and outside the blocks.
_BLOCK_NAMES = {"ln1.weight": "input_layernorm.weight", "ln2.weight": "post_attention_layernorm.weight",
                **{f"attn.{p}_proj.{w}": f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")},
                **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
_FLM_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ---- names and configs ---------------------------------------------------------------------------------------
def hf_name(name: str) -> str:
    """flm's name of a llama-arch weight -> its name in a stock folder."""
    m = _FLM_BLOCK.match(name)
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}" if m else _TOP_NAMES[name]


def flm_name(name: str) -> str | None:
    """A stock folder's weight name -> flm's (None: not one of the llama arch's weights)."""
    m = _HF_BLOCK.match(name)
    if m:
        local = {v: k for k, v in _BLOCK_NAMES.items()}.get(m.group(2))
        return f"blocks.{m.group(1)}.{local}" if local else None
    return {v: k for k, v in _TOP_NAMES.items()}.get(name)


def stock_class(hf: dict[str, Any]) -> str | None:
    """The stock class a config.json describes (architectures[0], else its model_type), or None."""
    archs = hf.get("architectures") or []
    if archs and archs[0] in MODEL_TYPES:
        return archs[0]
    by_type = {t: c for c, t in MODEL_TYPES.items()}
    return by_type.get(hf.get("model_type")) if not archs else None


def _shown(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def refusal(hf: dict[str, Any], cls: str) -> str | None:
    """What in config.json flm's llama arch cannot reproduce exactly, as '<field> = <value> <why>' (None: all)."""
    kind = MODEL_TYPES[cls]
    get = lambda key: hf.get(key, _DEFAULTS[kind].get(key))  # noqa: E731
    if hf.get("quantization_config") is not None:
        return f"quantization_config = {_shown(hf['quantization_config'])}: flm reads unquantized weights only"
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        return f"hidden_act = {_shown(act)}: flm's MLP is SwiGLU with silu only"
    if hf.get("rope_scaling") is not None:
        return f"rope_scaling = {_shown(hf['rope_scaling'])}: flm has plain RoPE only (no scaling of any kind)"
    rope = hf.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
        return f"rope_parameters = {_shown(rope)}: flm has plain RoPE only (no scaling of any kind)"
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        return f"partial_rotary_factor = {_shown(hf['partial_rotary_factor'])}: flm rotates the whole head"
    if kind == "llama":
        for key, what in (("attention_bias", "q, k, v and o biases"), ("mlp_bias", "MLP biases")):
            if hf.get(key):
                return f"{key} = true: flm's llama arch has no {what} (Qwen2's q, k, v biases only)"
    window, context = get("sliding_window"), get("max_position_embeddings")
    layer_types = hf.get("layer_types") or []
    if kind == "qwen2":  # as transformers: a window only with use_sliding_window, from layer max_window_layers on
        used = bool(get("use_sliding_window")) and (get("max_window_layers") < hf["num_hidden_layers"]
                                                      or "sliding_attention" in layer_types)
    else:
        used = not layer_types or "sliding_attention" in layer_types
    if used and window is not None and window < context:
        field = "use_sliding_window = true, sliding_window" if kind == "qwen2" else "sliding_window"
        return (f"{field} = {window} is shorter than max_position_embeddings = {context}: flm's attention sees the "
                f"whole context")
    return None


def model_config_from_stock(hf: dict[str, Any], src: Path) -> ModelConfig:
    """The llama-arch ModelConfig of a stock config.json, or a one-line refusal naming the field."""
    cls = stock_class(hf)
    if cls is None:
        raise FlmError(f"{src}/config.json describes {hf.get('architectures') or hf.get('model_type')!r}: flm "
                       f"imports {', '.join(MODEL_TYPES)} (and folders of `flm export hf`)")
    missing = [k for k in _REQUIRED if hf.get(k) is None]
    if missing:
        raise FlmError(f"{src}/config.json lacks {', '.join(missing)}")
    problem = refusal(hf, cls)
    if problem:
        raise FlmError(f"cannot import {src} exactly: config.json has {problem}")
    kind = MODEL_TYPES[cls]
    get = lambda key: hf.get(key) if hf.get(key) is not None else _DEFAULTS[kind].get(key)  # noqa: E731
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if hf["hidden_size"] % heads:
            raise FlmError(f"{src}/config.json: hidden_size {hf['hidden_size']} is not a multiple of "
                           f"num_attention_heads {heads}, and no head_dim is given")
        head_dim = hf["hidden_size"] // heads
    rope = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    table = {"arch": "llama", "n_layers": hf["num_hidden_layers"], "d_model": hf["hidden_size"], "n_heads": heads,
             "head_dim": head_dim, "n_kv_heads": hf.get("num_key_value_heads") or heads,
             "d_ff": hf["intermediate_size"], "vocab_size": hf["vocab_size"],
             "max_seq_len": get("max_position_embeddings"), "tie_embeddings": bool(get("tie_word_embeddings")),
             "ln_eps": float(get("rms_norm_eps")), "rope_theta": float(theta),
             "init_std": float(hf.get("initializer_range", 0.02)), "qkv_bias": kind == "qwen2", "hf_class": cls}
    try:
        return model_config_from_dict(table)
    except FlmError as e:
        raise FlmError(f"{src}/config.json: {e}") from None


def export_class(cfg: ModelConfig) -> str:
    """The stock class a llama-arch model is written as: the one it was imported from, else by its biases."""
    return cfg.hf_class or ("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")


def stock_config(cfg: ModelConfig, tok: Tokenizer, dtype: str) -> dict[str, Any]:
    """config.json of a stock folder for `cfg` (readable by transformers 4.4x and 5)."""
    cls = export_class(cfg)
    kind = MODEL_TYPES[cls]
    out: dict[str, Any] = {
        "architectures": [cls], "model_type": kind, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.ln_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": tok.token_id(tok.declared_token("bos_token")), "eos_token_id": tok.eot_id,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
    }
    if kind == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif kind == "mistral":
        out.update(sliding_window=None)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    return out


# ---- import ----------------------------------------------------------------------------------------------------
def weight_files(src: Path) -> dict[str, str]:
    """Every tensor name of a folder's safetensors weights -> the file holding it (one file or an index)."""
    index = src / INDEX_FILE
    try:
        if index.is_file():
            return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        if (src / WEIGHTS_FILE).is_file():
            with safe_open(str(src / WEIGHTS_FILE), framework="pt") as f:
                return dict.fromkeys(f.keys(), WEIGHTS_FILE)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, SafetensorError) as e:
        raise FlmError(f"cannot read the weights of {src}: {e}") from None
    raise FlmError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {src} (flm reads safetensors weights only)")


class StockWeights:
    """A stock folder's weights by flm name, read one tensor at a time (each file mapped only while read)."""

    def __init__(self, src: Path, cfg: ModelConfig):
        self.src = src
        files = weight_files(src)
        expected = parameter_shapes(cfg)
        self.files: dict[str, str] = {}
        for hf in files:
            name = flm_name(hf)
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # a tied head is the embedding (transformers ignores a saved copy too)
            if name in expected:
                self.files[name] = files[hf]
            elif not _NOT_WEIGHTS.search(hf):
                raise FlmError(f"{src} holds {hf}, which config.json's model does not have")
        missing = [hf_name(n) for n in expected if n not in self.files]
        if missing:
            raise FlmError(f"{src} lacks {missing[0]}" + (f" and {len(missing) - 1} more weights" if len(missing) > 1
                                                         else ""))
        for name, shape in expected.items():
            found = self._open(name, lambda f, key: tuple(f.get_slice(key).get_shape()))
            if found != shape:
                raise FlmError(f"{src}: {hf_name(name)} has shape {list(found)}, config.json implies {list(shape)}")

    def _open(self, name: str, read):
        path = self.src / self.files[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                return read(f, hf_name(name))
        except (OSError, SafetensorError) as e:
            raise FlmError(f"cannot read {hf_name(name)} from {path}: {e}") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._open(name, lambda f, key: f.get_tensor(key))


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, in initialisation order, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        params = dict(build_model(cfg).named_parameters())
    return {name: tuple(params[name].shape) for name in init_order(cfg)}


def import_stock(src: Path, out_run_dir: str | Path, hf: dict[str, Any]) -> Path:
    """A stock folder as step 0 of run `out_run_dir` (checkpoints/step_00000000, fresh Adam state), plus the run's
    tokenizer (`tokenizer/`) and a run config (`import.toml`) whose model section is the imported model."""
    cfg = model_config_from_stock(hf, src)
    if not (src / HF_FILE).is_file():
        raise FlmError(f"no {HF_FILE} in {src}: flm takes a Llama-family folder's tokenizer from its {HF_FILE}")
    tok = load_tokenizer_dir(src)
    if tok.vocab_size > cfg.vocab_size:
        raise FlmError(f"{src}: the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size} rows")
    weights = StockWeights(src, cfg)
    run = Path(out_run_dir)
    config = run_config(cfg, run)
    meta = {"model": config_to_dict(cfg), "config": config_to_dict(config), "stage": 0, "data": None, "ramp": None}

    def write_tensors(out: WholeWriter) -> None:
        for name in weights.files:  # in initialisation order
            out.weight(name, weights[name].to(torch.float32))  # read, widened, written: one tensor at a time
        out.rng(rng_state())

    lock = RunLock(run).acquire()  # the output run folder has one writer, like any run
    try:
        path = save_streamed(run / "checkpoints", 0, write_tensors, meta, keep_last=1 << 30, write_extra=tok.save)
        tok.save(run / TOKENIZER_DIR)
        atomic_write(run / IMPORT_CONFIG, [config_toml(config, [
            f"Written by `flm import hf {src}`: the imported model (keep [model] as it is to resume the",
            "imported checkpoint) and a starting point for [data] and [train]; see docs/llama.md."]).encode()])
        return path
    finally:
        lock.release()


def run_config(cfg: ModelConfig, run: Path) -> Config:
    """A run config to continue training the imported model: its model, the run's tokenizer, a fine-tuning LR."""
    train = TrainConfig(run_dir=str(run), seq_len=min(TrainConfig.seq_len, cfg.max_seq_len), lr=3e-5, min_lr=3e-6,
                        warmup_steps=10)
    data = DataConfig(tokenizer=str(run / TOKENIZER_DIR), dir=str(run / "data"))
    return Config(model=cfg, data=data, train=train)


# ---- export ----------------------------------------------------------------------------------------------------
def write_stock_folder(reader: CheckpointReader, cfg: ModelConfig, tok: Tokenizer, out: Path, max_bytes: int,
                       dtype: torch.dtype, dtype_name: str) -> None:
    """Weights, config.json and generation_config.json of a stock folder for a llama-arch checkpoint, into `out`
    (the caller writes the tokenizer and publishes the folder)."""
    from flm.export.hf import generation_config  # FLM's defaults, which a stock folder extends

    cls = export_class(cfg)
    mult = readout_multiplier(cfg)
    if mult != 1.0 and cfg.tie_embeddings:
        raise FlmError(f"{reader.path}: a tied model's readout multiplier ({mult:g}) cannot be folded into its head "
                       f"(the head is the embedding) and stock {cls} has none; train it untied or with "
                       f"model.mup = false and output_mult = 1")
    expected = {name: shape for name, shape in parameter_shapes(cfg).items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)

    def folded(name: str, value: torch.Tensor) -> torch.Tensor:
        """μP's readout folded into the head, in float64: one rounding."""
        return value.double() * mult if name == "lm_head.weight" and mult != 1.0 else value

    write_weights(reader, expected, out, max_bytes, dtype, hf_name, folded)
    write_json(out / "config.json", stock_config(cfg, tok, dtype_name))
    generation = generation_config(cfg, tok)
    generation.update(bos_token_id=tok.token_id(tok.declared_token("bos_token")), eos_token_id=tok.eot_id)
    write_json(out / "generation_config.json", {k: v for k, v in generation.items() if v is not None})


def write_stock_tokenizer(tok: Tokenizer, cfg: ModelConfig, out: Path) -> None:
    """tokenizer.json with the files it carries (an imported folder's tokenizer_config.json, ...); a tokenizer
    without them (one flm trained) gets flm's own tokenizer_config.json, as an FLM export has."""
    from flm.export.hf import write_tokenizer

    if "tokenizer_config.json" in tok.hf_files:
        tok.save(out)
    else:
        write_tokenizer(tok, cfg, out)
