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
RayEngine: the per-shard work (counting, transforming, generating) runs on Ray Data:
    `map_tables` builds a dataset of shard indexes, one block each, `map_batches` runs the shard
    function on it (its output: one Arrow table, e.g. id rows tagged with their split), and the
    driver iterates the result blocks with `preserve_order`, so it sees every shard's rows in
    shard order whatever ran where or finished first; Ray Data's streaming executor bounds the
    blocks in flight (backpressure), and finished out-of-order blocks wait in the object store,
    not in the driver. Ray Data may cut a large output into several blocks; their order is
    kept, and the writer depends only on the row sequence. Small planning steps that return
    plain values (the row count of each byte range of a text file) stay Ray tasks (`map`), with
    at most `max_in_flight` in flight and results taken in order.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from tf4ctr_dist.data.errors import DataError

from .options import ENGINES

SPLIT_COLUMN = "__split"  # split index of each row in a shard's output table (never written)
ERROR_COLUMN = "__data_error"  # a shard's DataError message, as map_tables' UDF returns it
DEFAULT_SHARD_BYTES = 64 << 20


class LocalEngine:
    name = "local"
    streams = True  # the pipeline consumes per-batch results directly (no per-shard collection)
    shard_bytes: int | None = None  # coarsest shards

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *shared: Any) -> Iterator[Any]:
        """fn(*shared, item) for every item, in order."""
        for item in items:
            yield fn(*shared, item)

    def map_tables(self, fn: Callable[..., pa.Table], items: Iterable[Any], *shared: Any) -> Iterator[pa.Table]:
        """fn(*shared, item) -> a table, for every item, in order."""
        return self.map(fn, items, *shared)

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
            # address None: RAY_ADDRESS if set, else a new local cluster on this machine ("local":
            # never join a cluster someone else started here, which Ray's default would do).
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                     log_to_driver=False)
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

    def map_tables(self, fn: Callable[..., pa.Table], items: Iterable[Any], *shared: Any) -> Iterator[pa.Table]:
        """fn(*shared, item) -> a table, for every item, on Ray Data; the tables in item order
        (a table may arrive cut into several consecutive ones)."""
        ray = self._ray
        import ray.data

        items = list(items)
        if not items:
            return
        refs = [ray.put(items), *(ray.put(value) for value in shared)]  # shipped once, not once per shard
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        ctx.execution_options.preserve_order = True  # blocks come back in shard order
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset INFO lines in the CLI's output
        try:
            ds = ray.data.range(len(items), override_num_blocks=len(items)).map_batches(
                _run_shard, fn_args=(fn, refs), batch_size=1, batch_format="pyarrow", num_cpus=1,
            )
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                if ERROR_COLUMN in block.column_names:
                    raise DataError(block.column(ERROR_COLUMN)[0].as_py())
                yield block
        except DataError:
            raise
        except Exception as exc:
            error = _data_error(exc)
            if error is not None:
                raise error from None
            raise
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved

    def _get(self, ref: Any) -> Any:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            error = _data_error(exc)
            if error is not None:
                raise error from None
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


def _run_shard(batch: pa.Table, fn: Callable[..., pa.Table], refs: list[Any]) -> pa.Table:
    """Ray Data UDF: the one shard index in `batch` -> fn(*shared, items[index]).
    `refs` (items, *shared) is a list, so Ray passes the references rather than resolving them."""
    import ray

    (index,) = batch.column("id").to_pylist()
    items, *shared = ray.get(refs)
    try:
        return fn(*shared, items[index])
    except DataError as exc:
        # Returned, not raised: Ray Data keeps only the text of a UDF's exception, under its
        # own traceback, and the converter's message (file, line, column) is the point.
        return pa.table({ERROR_COLUMN: [str(exc)]})


def _data_error(exc: BaseException) -> DataError | None:
    """The converter's DataError inside a Ray task's error, as a fresh DataError with its
    message alone (no Ray traceback); None when there is none."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            return DataError(str(e))
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def make_engine(name: str = "local", *, address: str | None = None, shard_mb: float | None = None) -> Engine:
    if name == "local":
        return LocalEngine()
    if name == "ray":
        shard_bytes = int(shard_mb * (1 << 20)) if shard_mb else DEFAULT_SHARD_BYTES
        return RayEngine(address or os.environ.get("RAY_ADDRESS") or None, shard_bytes=shard_bytes)
    raise DataError(f"engine should be one of {list(ENGINES)}, got {name!r}")
