"""Tensor parallelism for FLM and the llama arch with DTensor (`parallelize_module`), Megatron-style.

In each block the fused QKV and the first FFN matrix are split by output rows (whole heads, whole FFN
units: the QKV rows are laid out head by head), the attention output projection and the second FFN
matrix by input columns (llama: q, k, v, gate and up by rows, with tp dividing the key/value heads too, so
each rank's query heads find their key/value heads on the same rank; o and down by columns), so each block
costs two all-reduces forward and two backward. The embedding is split by vocabulary rows, the LM head by vocabulary rows too, with the loss computed on the
vocabulary-sharded logits (`loss_parallel`), so no rank ever holds a full [tokens, vocab] matrix.

With sequence parallelism the residual stream between the matrix multiplications is a DTensor split
along the sequence: LayerNorms, dropout and residual adds work on 1/tp of the tokens, and the
all-reduces become reduce-scatter + all-gather pairs (same traffic, less activation memory).
LayerNorm parameters are then replicated DTensors. Mask buffers of a growth in progress are plain
tensors; the forward pass runs under `implicit_replication` so they act as replicated values.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               parallelize_module)

from flm.config import ModelConfig
from flm.errors import FlmError
from flm.model import FLM
from flm.model.decoder import held_blocks


# Each architecture's block plan: the linear layers split by output rows (colwise: whole heads, whole FFN units),
# then those split by input columns (rowwise: their outputs are summed over the tp ranks).
BLOCK_PLANS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "flm": (("attn.qkv", "mlp.fc1"), ("attn.proj", "mlp.fc2")),
    "llama": (("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
              ("attn.o_proj", "mlp.down_proj")),
}


def check_tensor_parallel(cfg: ModelConfig, tp: int, seq_len: int, sequence_parallel: bool) -> None:
    """Every split must be whole: heads, key/value heads, FFN units, vocabulary rows (and tokens, with sequence
    parallelism)."""
    for what, size in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", cfg.kv_heads),
                       ("the FFN width", cfg.ffn_dim), ("model.vocab_size", cfg.vocab_size)):
        if size % tp:
            raise FlmError(f"tensor parallelism tp={tp} must divide {what} ({size})")
    if sequence_parallel and seq_len % tp:
        raise FlmError(f"sequence parallelism needs tp={tp} to divide train.seq_len ({seq_len})")


def apply_tensor_parallel(model: FLM, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `model`'s blocks (the ones it still holds), embedding and head over the 1-D `mesh`, in place."""
    stream = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream between modules
    keep = not sequence_parallel  # without SP the stream is an ordinary (replicated) local tensor
    if model.embed is not None:
        parallelize_module(model.embed, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=stream,
                                                              use_local_output=keep))
    colwise, rowwise = BLOCK_PLANS[model.cfg.arch]
    for block in held_blocks(model).values():
        plan = {name: ColwiseParallel() for name in colwise}
        plan.update({name: RowwiseParallel(output_layouts=stream, use_local_output=keep) for name in rowwise})
        if sequence_parallel:  # gather the tokens before attention and the FFN; their insides stay local
            plan["attn"] = PrepareModuleInput(input_layouts=(stream, None, None, None),  # (x, rope, cache, layer)
                                              desired_input_layouts=(Replicate(), None, None, None),
                                              use_local_output=True)
            plan["mlp"] = PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),),
                                             use_local_output=True)
            for ln in (block.ln1, block.ln2):
                distribute_module(ln, mesh)  # replicated DTensor parameters, applied to Shard(1) activations
        parallelize_module(block, mesh, plan)
    if model.lm_head is not None:
        if sequence_parallel:
            distribute_module(model.ln_f, mesh)
        parallelize_module(model.lm_head, mesh, ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1),
                                                                use_local_output=False))
        if model.cfg.tie_embeddings and model.embed is not None:
            model.lm_head.weight = model.embed.weight  # both are vocabulary-row shards: one tensor again


def local_slice(mask: torch.Tensor | None, mesh: DeviceMesh) -> torch.Tensor | None:
    """This rank's part of a per-head or per-unit mask (heads and FFN units are split in contiguous blocks)."""
    if mask is None:
        return None
    return mask.chunk(mesh.size())[mesh.get_local_rank()]
