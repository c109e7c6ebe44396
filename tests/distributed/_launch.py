"""Run a function in N spawned processes joined by a gloo process group (for tests).

    results = run_gloo(fn, 2, arg1, arg2, timeout=60)

fn(rank, world_size, *args) runs in every child after init_process_group("gloo"); it must be a
module-level (picklable) function. Returns the list of per-rank return values (rank order;
they must be picklable). Raises RuntimeError with the child's traceback if any rank fails or
dies, and TimeoutError (after killing the children) if they do not finish within `timeout`.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port the OS just reported free (tiny race window before the children bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, q) -> None:
    # Several ranks share a few test cores: one intra-op thread each avoids oversubscription.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        q.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)


def run_gloo(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, fn, args, q), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, ok, payload = q.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and not _has_report(dead, results):
                    # Give a failing child's report a moment to arrive through the pipe.
                    try:
                        rank, ok, payload = q.get(timeout=2.0)
                    except queue.Empty:
                        codes = {r: procs[r].exitcode for r in dead}
                        raise RuntimeError(f"rank(s) died without a report, exit codes {codes}")
                elif time.monotonic() > deadline:
                    raise TimeoutError(
                        f"run_gloo({getattr(fn, '__name__', fn)}) exceeded {timeout}s; "
                        f"finished ranks: {sorted(results)}"
                    )
                else:
                    continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        # Surviving ranks of a failed run may block in a collective forever: end them.
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [results[r] for r in range(world_size)]


def _has_report(ranks: list[int], results: dict) -> bool:
    return all(r in results for r in ranks)
