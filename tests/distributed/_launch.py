"""Spawn N gloo processes for a test: ``run_gloo(fn, 2, *args, timeout=60)``.

fn(rank, world_size, *args) must be a module-level function; see tf4ctr_dist.distributed.spawn.
One intra-op thread per rank: several ranks share a few test cores.
"""

from __future__ import annotations

from typing import Any, Callable

from tf4ctr_dist.distributed.spawn import free_port, spawn

__all__ = ["free_port", "run_gloo"]


def run_gloo(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list:
    return spawn(fn, world_size, *args, backend="gloo", threads=1, timeout=timeout)
