"""Peak memory of `flm import hf` and `flm export hf` on a stock Llama folder: both stream one tensor at a time, so
their peak resident memory should be the interpreter's own plus a few copies of the largest tensor, not the model.

A random Llama checkpoint is written first, without ever holding the model: transformers writes config.json, the
model is laid out on the meta device (names and shapes, no memory), and random bf16 tensors are written shard by
shard with the index transformers writes (model.safetensors.index.json), beside a small tokenizer. Default shape
~1B (16 layers x 2048, 32 heads of 64 with 4 key/value heads, FFN 5632, vocabulary 32000: 0.84B parameters,
1.7 GB in bf16). Then, each in its own process, with its peak resident memory (ru_maxrss): the bare interpreter
with flm's import/export modules loaded (the floor), `flm import hf` (bf16 folder -> fp32 checkpoint) and
`flm export hf --dtype bf16` (which must give back every tensor bit for bit: checked one tensor at a time).

    python benchmarks/llama_import_memory.py --work /tmp/llama-memory            # ~7 GB of disk, minutes
    python benchmarks/llama_import_memory.py --work /tmp/llama-memory --small    # a 2-layer model: seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flm.files import write_json_report

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=4,
               head_dim=64, intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
    "small": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, intermediate_size=688, vocab_size=32000, max_position_embeddings=512),
}
SHARD_BYTES = 500 * 2**20  # the source folder's shards (as save_pretrained's max_shard_size)
FLOOR = "import torch, safetensors, flm.export.hf, flm.export.llama_hf, flm.inference"


def write_folder(folder: Path, shape: dict) -> tuple[int, int]:
    """A random bf16 Llama folder written shard by shard; returns (bytes of weights, bytes of the largest tensor)."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    sizes = {k: math.prod(s) * 2 for k, s in shapes.items()}
    shards, used = [[]], 0
    for name in shapes:
        if shards[-1] and used + sizes[name] > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(0)
    for file, names in zip(files, shards):  # one shard in memory at a time
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    weight_map = {n: f for f, names in zip(files, shards) for n in names}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return sum(sizes.values()), max(sizes.values())


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak resident set of the command's process in MiB, seconds)."""
    t0 = time.perf_counter()
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1]) / 2**10, time.perf_counter() - t0


def folder_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of folder `a` equal, bit for bit, to the same-named one of `b` (one tensor pair at a time)."""
    import torch
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        return {k: folder / "model.safetensors" for k in safe_open(str(folder / "model.safetensors"), "pt").keys()}

    left, right = where(a), where(b)
    if left.keys() != right.keys():
        return False
    for name in left:
        with safe_open(str(left[name]), "pt") as f, safe_open(str(right[name]), "pt") as g:
            if not torch.equal(f.get_tensor(name), g.get_tensor(name)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/flm-llama-memory")
    parser.add_argument("--small", action="store_true", help="a 2-layer x 256 model (checks the benchmark runs)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    shape = SHAPES["small" if args.small else "1b"]
    MiB = 2**20
    t0 = time.perf_counter()
    weights, largest = write_folder(work / "hf", shape)
    results = {"machine": platform.processor() or platform.machine(), "shape": shape,
               "write_seconds": time.perf_counter() - t0, "source_weights_mib": weights / MiB,
               "largest_tensor_bf16_mib": largest / MiB, "largest_tensor_fp32_mib": 2 * largest / MiB}
    flm = [sys.executable, "-m", "flm.cli.main"]
    results["floor_peak_mib"], _ = peak_rss([sys.executable, "-c", FLOOR])
    results["import_peak_mib"], results["import_seconds"] = peak_rss([*flm, "import", "hf", str(work / "hf"),
                                                                      str(work / "run")])
    results["checkpoint_mib"] = folder_bytes(work / "run" / "checkpoints") / MiB
    results["export_peak_mib"], results["export_seconds"] = peak_rss([*flm, "export", "hf", str(work / "run"),
                                                                      str(work / "out"), "--dtype", "bf16",
                                                                      "--max-shard-size", "500MiB"])
    results["exported_weights_mib"] = folder_bytes(work / "out") / MiB
    results["export_equals_source_bit_for_bit"] = same_tensors(work / "hf", work / "out")
    for step in ("import", "export"):  # above the floor, in units of the largest tensor (fp32 in the checkpoint)
        results[f"{step}_above_floor_in_largest_fp32_tensors"] = (
            (results[f"{step}_peak_mib"] - results["floor_peak_mib"]) / results["largest_tensor_fp32_mib"])
    print(json.dumps(results, indent=1))
    if args.json:
        write_json_report(args.json, results)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
