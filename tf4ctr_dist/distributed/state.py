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
