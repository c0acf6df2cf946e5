"""3-D parallel training on PyTorch's distributed engine: FSDP2, DTensor tensor parallelism,
torch.distributed.pipelining, DCP checkpoints, and growth of a sharded model (docs/parallel.md)."""
