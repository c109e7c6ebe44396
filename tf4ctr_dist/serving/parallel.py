"""`tf4ctr predict --workers N`: a predict's shares scored by N Ray actors, one output file.

The driver plans the shares (serving.predict.plan: fields, split, files and headers are checked
before Ray starts) from the model's description alone (export.describe: the artifact's header or
the run's manifest; no weights). Each actor loads the scorer itself, from the run's best
checkpoint or the artifact (whichever the driver was given), and scores whole shares, each into
a part file in a temporary folder beside the target (``OUT.parts-XXXXXXXX/part-NNNNN.parquet``).
The driver prints a line per finished part (rows, rows/s), then writes the final file from the
parts in share order (rows sorted as one process writes them; raw rows numbered on across
files) under a temporary name renamed at the end, and removes the parts folder; a failed part,
an error or an interrupt removes it too, and nothing appears under the target name. The scores
are the one-process output bit for bit: the same single-device scorer, and the same batches
(serving.predict explains why that matters).

What runs in parallel: a prepared split (its batches cut into N ranges), raw Parquet files (each
cut into N row ranges at batch boundaries), several raw CSV/TSV files (one share per file). A
single raw CSV/TSV file cannot be cut without reading it through: it is scored in this process,
as with --workers 1, and a log line says so.

Ray: the cluster at ``address`` (or $RAY_ADDRESS), else a private local one on 127.0.0.1
(train.launch.init_ray, as training's dev mode); a cluster this call started is shut down at the
end. Paths must be readable by the workers: local paths are made absolute (same machine), and on
a multi-node cluster inputs and output should be object-storage URLs.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from typing import Any, Callable, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.storage import resolve
from tf4ctr_dist.serving.predict import Share, numbered, plan, predict, score_share, write_atomic


def _absolute(url: str) -> str:
    """A local path made absolute: a worker's working directory is not the driver's."""
    return url if "://" in url else os.path.abspath(url)


def predict_on_workers(data: str | Sequence[str], out: str, *, run: Optional[str] = None, model: Optional[str] = None,
                       workers: int = 2, split: str = "test", batch_size: int = 65_536, keep: Sequence[str] = (),
                       columns: Optional[Sequence[str]] = None, storage_options: Optional[dict] = None,
                       address: Optional[str] = None, log: Callable[[str], None] = print,
                       precision: Optional[str] = None) -> dict[str, Any]:
    """Score ``data`` with the model of ``run`` (a run folder) or ``model`` (an artifact) on
    ``workers`` Ray actors and write ``out``; see the module docstring. Returns a summary."""
    from tf4ctr_dist.serving.export import describe

    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    run = _absolute(run) if run else None
    model = _absolute(model) if model else None
    urls = [_absolute(u) for u in ([data] if isinstance(data, str) else data)]
    info = describe(run=run, model=model, storage_options=storage_options)  # a bad artifact: refused here, before Ray
    shares = plan(info, urls, split, batch_size, keep, columns, storage_options, pieces=workers)
    if workers == 1 or len(shares) == 1:
        if workers > 1:
            why = (f"{shares[0].url} is one CSV/TSV file, which cannot be split without reading it (give several "
                   "files to spread them over workers)") if shares[0].kind == "text" else \
                f"the input is a single batch of --batch-size {batch_size} rows"
            log(f"[tf4ctr] predict: {why}: scoring it in this process")
        from tf4ctr_dist.serving import from_run, load

        scorer = from_run(run, storage_options, precision) if run else load(model, precision)  # type: ignore[arg-type]
        return {**predict(scorer, urls, out, split, batch_size, keep, storage_options, columns), "workers": 1}

    out = _absolute(out)
    parts_dir = f"{out}.parts-{uuid.uuid4().hex[:8]}"
    parts = [f"{parts_dir}/part-{i:05d}.parquet" for i in range(len(shares))]
    n = min(workers, len(shares))
    import ray

    from tf4ctr_dist.train.launch import init_ray

    env = {k: os.environ[k] for k in ("MKL_CBWR", "ATEN_CPU_CAPABILITY") if k in os.environ}  # the driver's CPU numerics
    started = init_ray(address, max(os.cpu_count() or 1, n), env, what=f"predict ({n} workers)", dashboard=False,
                       log_to_driver=False)
    actors: list = []
    try:
        remote = ray.remote(num_cpus=1, max_restarts=0)(PredictWorker)
        actors = [remote.remote(run, model, storage_options, n, precision) for _ in range(n)]
        _get([a.load.remote() for a in actors])  # every worker loads its scorer (in parallel) before any share
        rows = _run_shares(actors, shares, parts, batch_size, keep, storage_options, log)
        t0 = time.monotonic()
        total = write_atomic(out, numbered((s, _part_tables(p, r, storage_options)) for s, p, r in zip(shares, parts, rows)),
                             storage_options)
        log(f"[tf4ctr] predict: wrote {out} ({total:,} rows from {len(shares)} parts, {time.monotonic() - t0:.1f} s)")
    finally:
        for actor in actors:
            ray.kill(actor)
        _remove(parts_dir, storage_options)
        if started:
            ray.shutdown()
    return {"out": out, "rows": total, "workers": n, "parts": len(shares)}


class PredictWorker:
    """A Ray actor: one scorer, loaded once, scoring whole shares into part files."""

    def __init__(self, run: Optional[str], model: Optional[str], storage_options: Optional[dict], workers: int,
                 precision: Optional[str] = None) -> None:
        self.run, self.model, self.storage_options, self.precision = run, model, storage_options, precision
        self.threads = max(1, (os.cpu_count() or 1) // workers)  # the node's cores, shared with the others
        self.scorer: Any = None

    def load(self) -> None:
        import torch

        from tf4ctr_dist.serving import from_run, load

        torch.set_num_threads(self.threads)
        self.scorer = (from_run(self.run, self.storage_options, self.precision) if self.run
                       else load(self.model, self.precision))

    def score(self, share: Share, part: str, batch_size: int, keep: Sequence[str]) -> tuple[int, float]:
        """(rows, seconds): the share scored into the Parquet file ``part`` (none if no rows)."""
        t0 = time.monotonic()
        rows = write_atomic(part, score_share(self.scorer, share, batch_size, keep, self.storage_options),
                            self.storage_options, allow_empty=True)
        return rows, time.monotonic() - t0


def _run_shares(actors: list, shares: list[Share], parts: list[str], batch_size: int, keep: Sequence[str],
                storage_options: Optional[dict], log: Callable[[str], None]) -> list[int]:
    """Every share to the next idle actor; a log line per finished part; rows per share."""
    import ray

    idle, todo = list(actors), deque(range(len(shares)))
    pending: dict = {}  # ref -> (share index, actor)
    rows = [0] * len(shares)
    finished = 0
    try:
        while todo or pending:
            while todo and idle:
                i, actor = todo.popleft(), idle.pop()
                pending[actor.score.remote(shares[i], parts[i], batch_size, list(keep))] = (i, actor)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(ref)
            rows[i], seconds = _get(ref)
            idle.append(actor)
            finished += 1
            rate = f"{rows[i] / seconds:,.0f}" if seconds > 0 else "-"
            log(f"[tf4ctr] predict: part {finished}/{len(shares)} done ({shares[i].describe()}): "
                f"{rows[i]:,} rows in {seconds:.1f} s ({rate} rows/s)")
    finally:
        for ref in pending:  # an error: stop the others' work (the actors are killed next)
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - already finished or gone: nothing to stop
                pass
    return rows


def _part_tables(part: str, rows: int, storage_options: Optional[dict]) -> Iterator[pa.Table]:
    """A part's tables, a row group (= one scored batch) at a time."""
    if not rows:
        return
    loc = resolve(part, storage_options)
    with loc.fs.open(loc.path(), "rb") as f:
        pf = pq.ParquetFile(f)
        for g in range(pf.metadata.num_row_groups):
            yield pf.read_row_group(g)


def _remove(url: str, storage_options: Optional[dict]) -> None:
    loc = resolve(url, storage_options)
    try:
        if loc.fs.exists(loc.path()):
            loc.fs.rm(loc.path(), recursive=True)
    except OSError:
        pass


def _get(refs: Any) -> Any:
    """ray.get, with a worker's own error (bad data, config, a missing file) raised as itself,
    without Ray's wrapping; other failures as Ray reports them."""
    import ray
    from ray.exceptions import RayError

    from tf4ctr_dist.config import ConfigError
    from tf4ctr_dist.data.storage import StorageUnavailable

    try:
        return ray.get(refs)
    except RayError as exc:
        seen: set[int] = set()
        todo: list = [exc]
        while todo:
            e = todo.pop()
            if e is None or id(e) in seen:
                continue
            seen.add(id(e))
            if isinstance(e, (DataError, ConfigError, FileNotFoundError, PermissionError, StorageUnavailable)) \
                    and not isinstance(e, RayError):
                raise e from None
            todo += [getattr(e, "cause", None), e.__cause__]
        raise
