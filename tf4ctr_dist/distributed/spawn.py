"""Run a function in N local processes joined by a process group (tests, benchmarks, dev).

    results = spawn(fn, 2, arg1, arg2, backend="gloo", threads=1, timeout=60)

fn(rank, world, *args) runs in every child after init_process_group (no group when backend is
None); it must be a module-level (picklable) function and return picklable values. Returns the
per-rank results in rank order. Raises RuntimeError with the child's traceback if any rank fails
or dies, and TimeoutError (after killing the children) past ``timeout``. Surviving ranks of a
failed run may block in a collective forever, so they are always killed.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Optional


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(rank: int, world: int, port: int, backend: Optional[str], threads: int, fn: Callable, args: tuple, q) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        if backend:
            import torch.distributed as dist

            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            result = fn(rank, world, *args)
        finally:
            if backend:
                import torch.distributed as dist

                dist.destroy_process_group()
        q.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)


def spawn(
    fn: Callable, world: int, *args: Any, backend: Optional[str] = "gloo", threads: int = 1, timeout: float = 1800.0
) -> list:
    """fn(rank, world, *args) in `world` spawned processes (process group `backend`, or none),
    each with `threads` intra-op threads (OMP_NUM_THREADS too). Returns per-rank results; raises
    RuntimeError with the child's traceback if a rank fails, TimeoutError after `timeout` s."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    env_keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.update({k: str(threads) for k in env_keys})
    try:
        procs = [ctx.Process(target=_child, args=(r, world, port, backend, threads, fn, args, q), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, ok, payload = q.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    try:
                        rank, ok, payload = q.get(timeout=3.0)
                    except queue.Empty:
                        raise RuntimeError(f"rank(s) {dead} died without a report (exit codes "
                                           f"{[procs[r].exitcode for r in dead]}; out of memory?)") from None
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"{getattr(fn, '__name__', fn)} exceeded {timeout:.0f}s") from None
                else:
                    continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [results[r] for r in range(world)]
