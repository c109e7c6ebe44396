"""In-memory copies of a sharded model's state (this rank's shards only)."""

from __future__ import annotations

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor


def _local_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, ShardedTensor):
        return [shard.tensor for shard in value.local_shards()]
    if hasattr(value, "to_local"):  # DTensor
        return [value.to_local()]
    if isinstance(value, torch.Tensor):
        return [value]
    return []


@torch.no_grad()
def snapshot(module: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """Clone every local tensor of ``module.state_dict()`` (sharded tables included)."""
    return {k: [t.detach().clone() for t in _local_tensors(v)] for k, v in module.state_dict().items()}


@torch.no_grad()
def restore(module: torch.nn.Module, saved: dict[str, list[torch.Tensor]]) -> None:
    """Copy a ``snapshot`` back in place. The state dict of a DMP model aliases the live
    weights (fused tables included), so an in-place copy updates the model itself."""
    for key, value in module.state_dict().items():
        for live, old in zip(_local_tensors(value), saved[key]):
            live.copy_(old)


@torch.no_grad()
def average_batchnorm_stats(module: torch.nn.Module) -> int:
    """Average BatchNorm running statistics over all ranks; returns how many layers.

    DistributedModelParallel keeps the dense part in DDP without buffer broadcast, so every rank
    updates its running mean/var from its own local batches. Evaluated as is, each rank would
    score its share of the split with slightly different normalisation, and the gathered
    predictions would mix differently calibrated models, which lowers the global AUC.
    """
    import torch.distributed as dist

    layers = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return len(layers)
    stats = [t for m in layers for t in (m.running_mean, m.running_var) if t is not None]
    if stats:
        flat = torch.cat([t.reshape(-1) for t in stats])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for t in stats:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return len(layers)
