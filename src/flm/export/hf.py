"""`flm export hf` and `flm import hf`: checkpoints <-> Hugging Face folders loadable with `trust_remote_code`.

This module is the FLM architecture's side and the entry point of both commands; a llama-arch checkpoint and a
stock Llama-family folder (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM: no remote code) are handled
by flm.export.llama_hf, chosen by the checkpoint's model.arch and by config.json.

An exported folder holds `config.json` (with `auto_map` pointing at the bundled `configuration_flm.py` and
`modeling_flm.py`), the weights (`model.safetensors`, or shards and `model.safetensors.index.json`),
`generation_config.json`, the tokenizer (`tokenizer.json` + `tokenizer_config.json`) and `flm_training.json`
(our checkpoint's metadata, so an import can resume training where the checkpoint left off).

Weight names are a plain rename: every flm name gets the prefix `model.` except `lm_head.weight`, which keeps its
name (and is absent when the head is tied to the embedding). Tensors are copied unchanged (fp32) or rounded
(bf16); nothing is transposed, split or fused, so import is the exact inverse of an fp32 export.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from flm.config import Config, ModelConfig, TrainConfig, config_from_dict, config_to_dict, model_config_from_dict
from flm.data.tokenizer import (CL100K_PATTERN, EOT, LABELS, TIKTOKEN_FILE, TIKTOKEN_META, Tokenizer, read_ranks,
                                load_tokenizer_dir)
from flm.errors import FlmError
from flm.export.folder import INDEX_FILE, WEIGHTS_FILE, read_json, write_json, write_weights
from flm.model import FLM, build_model, xpos
from flm.checkpoint import CheckpointReader, RunLock, find_checkpoint, read_meta, save_checkpoint

CODE_DIR = Path(__file__).parent / "hf_code"
# The folder's code: ours for transformers, plus flm's own xPos module, copied byte for byte (one definition).
CODE_FILES = {"configuration_flm.py": CODE_DIR / "configuration_flm.py", "modeling_flm.py": CODE_DIR / "modeling_flm.py",
              "xpos.py": Path(xpos.__file__)}
TRAINING_FILE = "flm_training.json"
HEAD = "lm_head.weight"
PREFIX = "model."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# flm ModelConfig field -> config.json key (d_ff is written as intermediate_size = ffn_dim, resolved; the
# architecture, `arch`, is config.json's model_type).
CONFIG_KEYS = {
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "head_dim": "head_dim", "max_seq_len": "max_position_embeddings",
    "ln_eps": "layer_norm_eps", "rope_theta": "rope_theta", "xpos_scale_base": "xpos_scale_base",
    "output_mult": "output_mult", "base_width": "base_width", "mup": "mup", "dropout": "dropout",
    "init_std": "initializer_range", "tie_embeddings": "tie_word_embeddings", "zero_query": "zero_query",
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# ---- names and configs ---------------------------------------------------------------------------------------
def hf_name(name: str) -> str:
    return name if name == HEAD else PREFIX + name


def flm_name(name: str) -> str:
    if name == HEAD:
        return name
    if not name.startswith(PREFIX):
        raise FlmError(f"unexpected weight {name!r} in the exported model (expected {HEAD} or model.*)")
    return name[len(PREFIX):]


def hf_config(cfg: ModelConfig, eot_id: int, dtype: str) -> dict[str, Any]:
    """config.json for `cfg`: the shape under Hugging Face names, auto_map to the bundled code, special ids."""
    if cfg.arch != "flm":
        raise FlmError(f"model.arch {cfg.arch!r} has no trust_remote_code export; only 'flm' does")
    out: dict[str, Any] = {
        "architectures": ["FLMForCausalLM"], "model_type": "flm",
        "auto_map": {"AutoConfig": "configuration_flm.FLMConfig", "AutoModel": "modeling_flm.FLMModel",
                     "AutoModelForCausalLM": "modeling_flm.FLMForCausalLM"},
    }
    out.update({hf: getattr(cfg, ours) for ours, hf in CONFIG_KEYS.items()})
    out.update(intermediate_size=cfg.ffn_dim, bos_token_id=eot_id, eos_token_id=eot_id, use_cache=True,
               torch_dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])
    return out


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The inverse of `hf_config` (d_ff is kept explicit: the exported width, whatever flm's default would be)."""
    if hf.get("model_type") != "flm":
        raise FlmError(f"not an exported FLM model: config.json has model_type {hf.get('model_type')!r}, not 'flm'")
    missing = [k for k in (*CONFIG_KEYS.values(), "intermediate_size") if k not in hf]
    if missing:
        raise FlmError(f"config.json lacks {', '.join(missing)}")
    table = {ours: hf[key] for ours, key in CONFIG_KEYS.items()}
    return model_config_from_dict({**table, "d_ff": hf["intermediate_size"]})


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes ('GiB' for powers of two; a bare number is bytes), as transformers reads shard sizes."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise FlmError(f"bad size {text!r}: expected a positive number with an optional unit, e.g. 5GB, 500MiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


# ---- export ----------------------------------------------------------------------------------------------------
def export_hf(checkpoint: str | Path, out_dir: str | Path, max_shard_size: str = "5GB", dtype: str = "fp32") -> Path:
    """Write a checkpoint (or a run folder's newest one) as a Hugging Face folder; returns the folder.

    The folder is written beside `out_dir` under a temporary name and renamed at the end, so an interrupted
    export never leaves a folder that looks complete. `out_dir` must not exist or be empty.
    """
    if dtype not in DTYPES:
        raise FlmError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    ckpt = find_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    refuse_ramp(ckpt, meta)
    cfg = model_config_from_dict(meta["model"])
    if cfg.teacher_head:
        raise FlmError(f"{ckpt} has a separate teacher-signal head (train.teacher_objective = 'separate'), which an "
                       "exported model would not have: it is not exported")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FlmError(f"{out} already exists and is not an empty folder; export into a new folder")
    tok = load_tokenizer_dir(ckpt)
    if tok.vocab_size > cfg.vocab_size:
        raise FlmError(f"{ckpt}: the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size} rows")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if cfg.arch == "llama":  # a stock transformers folder, without flm's code
            from flm.export.llama_hf import write_stock_folder, write_stock_tokenizer

            write_stock_folder(CheckpointReader(ckpt), cfg, tok, tmp, max_bytes, DTYPES[dtype], dtype)
            write_stock_tokenizer(tok, cfg, tmp)
        else:
            write_weights(CheckpointReader(ckpt), expected_shapes(cfg), tmp, max_bytes, DTYPES[dtype], hf_name)
            write_tokenizer(tok, cfg, tmp)
            write_json(tmp / "config.json", hf_config(cfg, tok.eot_id, dtype))
            write_json(tmp / "generation_config.json", generation_config(cfg, tok))
            write_json(tmp / TRAINING_FILE, {k: v for k, v in meta.items() if k not in ("format", "ramp")})
            for name, source_file in CODE_FILES.items():
                shutil.copyfile(source_file, tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def refuse_ramp(ckpt: Path, meta: dict[str, Any]) -> None:
    """A checkpoint mid-ramp computes with growth masks (c < 1), which neither a plain FLM nor the exported model
    has; setting c to 1 would change the function, so such a checkpoint is refused rather than folded."""
    ramp = meta.get("ramp")
    if not ramp:
        return
    done, total = ramp["steps_done"], ramp["ramp_steps"]
    raise FlmError(f"{ckpt} is in the middle of a growth ramp (step {done} of {total}, masks at "
                   f"c = {done / total:.2f}); its outputs depend on the growth masks, which an exported model does "
                   f"not have. Train {total - done} more steps until the ramp ends, or export an earlier checkpoint")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """flm name -> shape of every weight an export of `cfg` holds (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_model(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        del shapes[HEAD]  # one tensor, saved as the embedding
    return shapes


def generation_config(cfg: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
    """Defaults for `generate()`: stop at end-of-text, and never emit the padded embedding rows past the
    tokenizer's vocabulary (`suppress_tokens`, as `flm generate` does with its vocabulary limit)."""
    out: dict[str, Any] = {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id}
    if cfg.vocab_size > tok.vocab_size:
        out["suppress_tokens"] = list(range(tok.vocab_size, cfg.vocab_size))
    return out


def write_tokenizer(tok: Tokenizer, cfg: ModelConfig, out: Path) -> None:
    """`tokenizer.json` + `tokenizer_config.json` for AutoTokenizer (PreTrainedTokenizerFast).

    Our own files come first (`Tokenizer.save`): for a tiktoken tokenizer these are the rank file and its
    description, which `flm import hf` reloads so the imported tokenizer is the very same; the tokenizer.json
    beside them is an equivalent byte-level BPE built from the ranks.
    """
    tok.save(out)
    if (out / TIKTOKEN_META).is_file():
        hf = tiktoken_as_hf(read_ranks(out / TIKTOKEN_FILE), tok.eot_id, with_labels=tok.label_ids is not None)
        hf.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
        "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False,
    })


# ---- tiktoken ranks -> a Hugging Face byte-level BPE ---------------------------------------------------------------
def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes are mapped
    in order to code points 256, 257, ..., so every byte string is a printable string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + n)
    return mapping


def _bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's merge loop on `token` using only ranks below `below`: join the lowest-ranked adjacent pair."""
    parts = [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b, below), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs, default=(below, 0))
        if rank >= below:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def tiktoken_as_hf(ranks: dict[bytes, int], eot_id: int, with_labels: bool = False) -> HFTokenizer:
    """An HF tokenizer that encodes like tiktoken with `ranks` and the cl100k split pattern.

    tiktoken joins the adjacent pair whose concatenation has the lowest rank; a BPE merge list ordered by the rank
    of the merged token does the same. Each token's merge is the pair tiktoken's loop leaves when only lower ranks
    may be used. `ignore_merges` keeps a whole pre-token that is itself in the ranks as one id, as tiktoken does.
    """
    to_str = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_str[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = _bpe_parts(token, ranks, rank) if len(token) > 1 else []
        if len(parts) == 2:
            merges.append((text(parts[0]), text(parts[1])))
    hf = HFTokenizer(models.BPE(vocab={text(b): r for b, r in ranks.items()}, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = [EOT, *LABELS] if with_labels else [EOT]  # in tiktoken's order: end-of-text, then the labels
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if hf.token_to_id(EOT) != eot_id:  # ranks with gaps: the added token would not land after the last rank
        raise FlmError(f"cannot export this tiktoken tokenizer: {EOT} would get id {hf.token_to_id(EOT)} in "
                       f"tokenizer.json instead of {eot_id}")
    return hf


# ---- import ----------------------------------------------------------------------------------------------------
def import_hf(source: str | Path, out_run_dir: str | Path) -> Path:
    """Build an flm checkpoint under `out_run_dir/checkpoints/` from an exported folder; returns it. A stock
    Llama-family folder is imported by flm.export.llama_hf.import_stock (streamed, with a run config).

    Weights are copied exactly (fp32 exports round-trip bit for bit; bf16 ones are widened to fp32). The optimizer
    state is fresh (Adam moments at zero): an export does not carry it. With `flm_training.json` the checkpoint
    keeps the step, run config and data position of the exported one, so `flm train --resume` continues there;
    without it, it starts at step 0 with default training settings.
    """
    src = Path(source)
    if not (src / "config.json").is_file():
        raise FlmError(f"no config.json in {src}: not a Hugging Face model folder")
    hf = read_json(src / "config.json")
    if hf.get("model_type") != "flm":
        from flm.export.llama_hf import import_stock, stock_class

        if stock_class(hf) is not None:
            return import_stock(src, out_run_dir, hf)
    cfg = model_config_from_hf(hf)
    meta = _training_meta(src, cfg)
    cfg = model_config_from_dict(meta["model"])
    tok = load_tokenizer_dir(src)
    if tok.vocab_size > cfg.vocab_size:
        raise FlmError(f"{src}: the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size} rows")
    model = build_model(cfg)
    load_hf_weights(src, model)
    config_from_dict(meta["config"])  # a run config that resume will accept
    step = meta.pop("step", 0)
    lock = RunLock(Path(out_run_dir)).acquire()  # the output run folder has one writer, like any run
    try:
        return save_checkpoint(Path(out_run_dir) / "checkpoints", step, model, None, {**meta, "ramp": None},
                               keep_last=1 << 30, write_extra=tok.save)
    finally:
        lock.release()


def _training_meta(src: Path, cfg: ModelConfig) -> dict[str, Any]:
    """The exported checkpoint's metadata if the folder has it and it describes this config.json, else defaults."""
    path = src / TRAINING_FILE
    if not path.is_file():
        train = TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len))
        return {"model": config_to_dict(cfg), "config": config_to_dict(Config(model=cfg, train=train)), "stage": 0,
                "data": None}
    meta = read_json(path)
    if "model" not in meta or "config" not in meta:
        raise FlmError(f"{path} lacks the model or run config; delete it to import without training state")
    recorded = model_config_from_dict(meta["model"])
    if any(getattr(recorded, f) != getattr(cfg, f) for f in CONFIG_KEYS) or recorded.ffn_dim != cfg.ffn_dim:
        raise FlmError(f"{path} describes a different model than config.json; delete it to import config.json alone")
    return meta


def is_flm_export(folder: Path) -> bool:
    """Whether `folder` is a Hugging Face folder of an FLM (`model_type: flm`, as `flm export hf` writes)."""
    config = Path(folder) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "flm"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_hf_export(src: str | Path) -> tuple[FLM, Tokenizer]:
    """An exported FLM folder as flm's own model and tokenizer, in memory: nothing in the folder is executed
    (its modeling code is ignored; config.json, the safetensors weights and tokenizer.json are only read)."""
    src = Path(src)
    model = build_model(model_config_from_hf(read_json(src / "config.json")))
    load_hf_weights(src, model)
    tok = load_tokenizer_dir(src)
    if tok.vocab_size > model.cfg.vocab_size:
        raise FlmError(f"{src}: the tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size} rows")
    return model.eval(), tok


def load_hf_weights(src: Path, model: FLM) -> None:
    """Copy an exported folder's weights (one file or shards) into `model`, checking names and shapes."""
    index = src / INDEX_FILE
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (src / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        raise FlmError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {src}")
    tensors = {}
    for file in files:
        tensors.update({flm_name(k): v for k, v in load_file(str(src / file)).items()})
    if model.cfg.tie_embeddings:
        tensors.pop(HEAD, None)  # a tied head is the embedding
        if "embed.weight" in tensors:
            tensors[HEAD] = tensors["embed.weight"]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split("\n\t")[1:2]) or str(e).splitlines()[0]
        raise FlmError(f"the weights in {src} do not fit config.json: {detail.strip()}") from None
