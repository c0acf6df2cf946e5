"""The parallel layout of a stage: tp x pp x dp processes, one class for the torchrun trainer and the planner.

dp counts all data-parallel ranks; HSDP splits them into dp_replicate groups that each shard the model over
dp_shard ranks. The last four fields are the planner's memory assumptions (Megatron's micro-batch, sequence
parallelism, recomputation, distributed optimizer); the torchrun trainer takes its own from [parallel] and
[train] and leaves them at their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    dp_replicate: int = 1
    micro_batch_size: int = 1
    sequence_parallel: bool = True
    recompute: str = "selective"  # "none", "selective" or "full"
    distributed_optimizer: bool = True

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        hsdp = f" ({self.dp_replicate} replicas x {self.dp_shard} shards)" if self.dp_replicate > 1 else ""
        return f"dp{self.dp}{hsdp} x tp{self.tp} x pp{self.pp}"
