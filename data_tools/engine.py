"""Where the per-shard work of a preparation runs: in this process, or as Ray tasks.

Every converter describes its input as an ordered list of *shards* (byte ranges of a text file,
row-group ranges of Parquet files, chunks of synthetic rows) and two pure functions of a shard:
count its train tokens, and transform it into id rows per split. An engine only runs those
functions; the driver always merges the counts and writes the output, feeding each shard's rows
to the dataset writer in shard order. The writer cuts row groups and part files from the
concatenated row sequence alone, so the dataset (every part's bytes and sha256, the manifest)
does not depend on the engine, on the number of shards or on which worker ran what.

LocalEngine: one process; shards are as coarse as possible (a whole text file is one stream)
    and results stream batch by batch, so memory stays bounded by batch sizes and the counting
    budget.
RayEngine: Ray tasks (not Ray Data: its block sizes and ordering are its own, and byte-identical
    output needs exact control over row order). Shards are ~`shard_bytes` of input; at most
    `max_in_flight` tasks run or wait to be collected, and results are taken in shard order, so
    the driver holds a bounded number of shard results.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from tf4ctr_dist.data.errors import DataError

ENGINES = ("local", "ray")
DEFAULT_SHARD_BYTES = 64 << 20


class LocalEngine:
    name = "local"
    streams = True  # the pipeline consumes per-batch results directly (no per-shard collection)
    shard_bytes: int | None = None  # coarsest shards

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *shared: Any) -> Iterator[Any]:
        """fn(*shared, item) for every item, in order."""
        for item in items:
            yield fn(*shared, item)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RayEngine:
    name = "ray"
    streams = False

    def __init__(
        self,
        address: str | None = None,
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        max_in_flight: int | None = None,
    ) -> None:
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - ray is part of the pinned stack
            raise DataError(f"--engine ray needs the ray package ({exc})") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            # address None: RAY_ADDRESS if set, else a new local cluster on this machine.
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._started = True
        if shard_bytes < 1:
            raise DataError(f"shard size must be >= 1 byte, got {shard_bytes}")
        self.shard_bytes = int(shard_bytes)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.max_in_flight = max_in_flight or max(2, 2 * cpus)

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *shared: Any) -> Iterator[Any]:
        ray = self._ray
        remote = ray.remote(num_cpus=1, max_retries=2)(fn)
        refs = [ray.put(value) for value in shared]  # shipped once, not once per task
        pending: deque[Any] = deque()
        todo = iter(items)
        try:
            for item in todo:
                pending.append(remote.remote(*refs, item))
                if len(pending) >= self.max_in_flight:
                    yield self._get(pending.popleft())
            while pending:
                yield self._get(pending.popleft())
        finally:
            for ref in pending:  # an error (or an abandoned generator): stop the rest
                ray.cancel(ref, force=False)

    def _get(self, ref: Any) -> Any:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, DataError):
                raise DataError(str(cause)) from None  # the converter's message, without Ray's traceback
            raise

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Engine = LocalEngine | RayEngine


def make_engine(name: str = "local", *, address: str | None = None, shard_mb: float | None = None) -> Engine:
    if name == "local":
        return LocalEngine()
    if name == "ray":
        shard_bytes = int(shard_mb * (1 << 20)) if shard_mb else DEFAULT_SHARD_BYTES
        return RayEngine(address or os.environ.get("RAY_ADDRESS") or None, shard_bytes=shard_bytes)
    raise DataError(f"engine should be one of {list(ENGINES)}, got {name!r}")
