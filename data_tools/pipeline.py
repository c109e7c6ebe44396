"""The preparation every converter shares: (1) count train tokens of the counted fields and save
their vocabularies, and fit the normalisers of numeric value x vector fields (data_tools.numeric),
(2) map every row to ids (or normalised values) and route it to its split, (3) write parts and
the manifest atomically.

A converter is a `Source`: its field plans, an ordered list of shards, and `read(shard)` yielding
`Chunk`s of raw tokens (labels validated, splits assigned). Pass 1 runs only when some field is
counted or has a normaliser to fit, and only over shards that can hold train rows; hashed
fields never need it, so a dataset whose fields are all hashed reads its input once. Both
passes go through an engine (data_tools.engine); the output is independent of the engine (see
there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import SPLITS, FieldSpec, Manifest

from .engine import SPLIT_COLUMN, Engine, LocalEngine
from .fields import FieldPlan, lookup_lists
from .numeric import FITTED, NumericStats, ValueNormalizer
from .vocab import COUNT_SCHEMA, DEFAULT_MEMORY_BUDGET, HashedVocabulary, Vocabulary, VocabCounter, aggregate_counts, count_values
from .options import DEFAULT_ROW_GROUP_ROWS, WriteOptions
from .progress import Progress
from .writer import VOCAB_DIR, DatasetWriter

TRAIN = 0
# Rows of count_shard's table below the counts (field ids of real fields are >= 0).
TRAIN_ROWS_FIELD = -1  # the shard's train rows
READ_ROWS_FIELD = -2  # the rows it read (train or not): progress of the counting pass
STATS_FIELD = -3  # per fitted numeric field: count = its index, token = NumericStats.to_json()
T = TypeVar("T")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def vocab_file_name(index: int, name: str) -> str:
    """vocab/<field>.parquet, or vocab/field-<index>.parquet when the name is no safe file name."""
    stem = name if _SAFE_NAME.fullmatch(name) and len(name) <= 100 else f"field-{index:03d}"
    return f"{VOCAB_DIR}/{stem}.parquet"


@dataclass
class Chunk:
    """Raw rows of one input batch: labels (float32, 0/1), tokens per field (string array, or
    clean list<string> for sequence fields, float64 values with nulls for numeric value x
    vector fields), split index per row (or one for all), group ids, and the bytes of the
    shard's input read so far (None: not known), for progress lines."""

    labels: np.ndarray
    tokens: dict[str, pa.Array]
    split: np.ndarray | int
    groups: np.ndarray | None = None
    position: int | None = None

    @property
    def rows(self) -> int:
        return len(self.labels)

    def split_mask(self, index: int) -> np.ndarray | bool:
        return self.split == index


class Source:
    """Base class of the converters' inputs (picklable: shipped to Ray tasks)."""

    created_by = "data_tools"
    label = "label"
    group: str | None = None
    fields: list[FieldPlan]
    split_indexes: tuple[int, ...] = (0, 1, 2)  # splits this dataset has (written even if empty)

    def shards(self, engine: Engine) -> list[Any]:
        """Ordered shards; each has `.splits`, the split indexes its rows can belong to."""
        raise NotImplementedError

    def read(self, shard: Any, names: Sequence[str]) -> Iterator[Chunk]:
        """Chunks of the shard, in order, with tokens for the fields `names`."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def shard_bytes(self, shard: Any) -> int | None:
        """Input bytes of the shard, the total that Chunk.position counts up to (None: unknown)."""
        return None

    def shard_rows(self, shard: Any) -> int | None:
        """Rows of the shard when known before reading it (None: unknown)."""
        return getattr(shard, "rows", None)

    def train_rows_hint(self) -> int | None:
        """Train rows (exact or estimated) when no counting pass runs; for adaptive row groups."""
        return None


def adaptive_row_group_rows(train_rows: int) -> int:
    """Small datasets get at least ~16 row groups, so the per-epoch row-group permutation
    changes which rows each worker reads; large ones the reader-friendly default."""
    return int(min(DEFAULT_ROW_GROUP_ROWS, max(1024, -(-train_rows // 16))))


# ---- shard functions (run by an engine: in process, or as Ray tasks) --------------------------


FitChunk = tuple[pa.Table | None, int, Chunk, list[NumericStats] | None]


def count_chunks(source: Source, shard: Any, names: Sequence[str], fitted: Sequence[str] = ()) -> Iterator[FitChunk]:
    """Per chunk: partial counts (field = index in `names`) over its train rows (None: it has
    none), its train rows, the chunk (for progress), and the NumericStats of the numeric fields
    `fitted` over its train rows (None: no train rows)."""
    plans = {f.name: f for f in source.fields}
    for chunk in source.read(shard, [*names, *fitted]):
        train = chunk.split_mask(TRAIN)
        if isinstance(train, (bool, np.bool_)):
            if not train:
                yield None, 0, chunk, None
                continue
            rows, keep = chunk.rows, None
        else:
            rows, keep = int(np.count_nonzero(train)), pa.array(train)
            if rows == 0:
                yield None, 0, chunk, None
                continue
        partials = []
        for i, name in enumerate(names):
            column = chunk.tokens[name]
            if keep is not None:
                column = column.filter(keep)
            if plans[name].kind == "sequence":
                column = pc.list_flatten(column)
            partials.append(count_values(i, column))
        stats = []
        for name in fitted:
            values = chunk.tokens[name] if keep is None else chunk.tokens[name].filter(keep)
            stats.append(NumericStats.of(values.drop_null().to_numpy(zero_copy_only=False)))
        yield pa.concat_tables(partials) if partials else None, rows, chunk, stats


def count_shard(source: Source, names: Sequence[str], fitted: Sequence[str], shard: Any) -> pa.Table:
    """count_chunks of a whole shard, aggregated, as one table (what a Ray Data block holds):
    the counts, then two rows (token ""): field TRAIN_ROWS_FIELD, count = the shard's train
    rows; field READ_ROWS_FIELD, count = the rows it read; then one STATS_FIELD row per fitted
    numeric field (count = its index in `fitted`, token = its NumericStats as JSON)."""
    partials, rows, read = [], 0, 0
    stats = [NumericStats() for _ in fitted]
    for partial, n, chunk, chunk_stats in count_chunks(source, shard, names, fitted):
        read += chunk.rows
        rows += n
        if chunk_stats is not None:
            stats = [a + b for a, b in zip(stats, chunk_stats)]
        if partial is None:
            continue
        partials.append(partial)
        if len(partials) >= 32:
            partials = [aggregate_counts(partials)]
    fields = [TRAIN_ROWS_FIELD, READ_ROWS_FIELD, *[STATS_FIELD] * len(stats)]
    meta = pa.table(
        [pa.array(fields, pa.int32()), pa.array(["", "", *(s.to_json() for s in stats)]),
         pa.array([rows, read, *range(len(stats))], pa.int64())],
        schema=COUNT_SCHEMA,
    )
    return pa.concat_tables([aggregate_counts(partials), meta])


def _shard_stats(table: pa.Table, fitted: int) -> list[NumericStats]:
    """The STATS_FIELD rows of a count_shard table (or of one block of it), merged per field."""
    stats = [NumericStats() for _ in range(fitted)]
    rows = table.filter(pc.equal(table.column("field"), STATS_FIELD))
    for index, text in zip(rows.column("count").to_pylist(), rows.column("token").to_pylist()):
        stats[index] = stats[index] + NumericStats.from_json(text)
    return stats


def _meta(table: pa.Table, field: int) -> int:
    """A count_shard table's TRAIN_ROWS_FIELD or READ_ROWS_FIELD count (0 if this block of it
    has none: Ray Data may cut a table into several blocks)."""
    return int(pc.sum(table.filter(pc.equal(table.column("field"), field)).column("count")).as_py() or 0)


def _schema(source: Source) -> pa.Schema:
    return Manifest(_draft_specs(source), source.label, source.group, {}).arrow_schema()


def _draft_specs(source: Source) -> list[FieldSpec]:
    """Field specs with placeholder vocabulary sizes (fit while writing)."""
    return [FieldSpec(f.name, f.stored_kind, 1 if f.embeds_value else 2, f.max_len, f.vocab_mode)  # type: ignore[arg-type]
            for f in source.fields]


Vocabs = Mapping[str, Vocabulary | HashedVocabulary | ValueNormalizer]  # raw tokens -> stored column, per field


def transform_chunks(
    source: Source, vocabs: Vocabs, shard: Any
) -> Iterator[tuple[list[pa.Table | None], Chunk]]:
    """Per chunk: its rows as ids, one table (or None) per split index; and the chunk (for
    progress)."""
    schema = _schema(source)
    names = [f.name for f in source.fields]
    for chunk in source.read(shard, names):
        n = chunk.rows
        columns: list[pa.Array] = [pa.array(np.asarray(chunk.labels, dtype=np.float32))]
        for f in source.fields:
            tokens = chunk.tokens[f.name]
            if f.kind == "sequence":
                columns.append(lookup_lists(vocabs[f.name], tokens))
            elif f.embeds_value:
                columns.append(vocabs[f.name].apply(tokens))  # type: ignore[union-attr]
            else:
                columns.append(pa.array(vocabs[f.name].lookup(tokens), pa.int64()))
        groups = chunk.groups if chunk.groups is not None else np.zeros(n, dtype=np.int64)
        columns.append(pa.array(groups, pa.int64()))
        table = pa.Table.from_arrays(columns, schema=schema)
        out: list[pa.Table | None] = [None] * len(SPLITS)
        if isinstance(chunk.split, (int, np.integer)):
            out[int(chunk.split)] = table
        else:
            for i in range(len(SPLITS)):
                mask = chunk.split == i
                if mask.any():
                    out[i] = table if mask.all() else table.filter(pa.array(mask))
        yield out, chunk


def transform_shard(source: Source, vocabs: Vocabs, shard: Any) -> pa.Table:
    """transform_chunks of a whole shard as one table (what a Ray Data block holds): the id
    rows in shard order, each tagged with its split index in a leading SPLIT_COLUMN."""
    tagged = []
    for tables, _ in transform_chunks(source, vocabs, shard):
        for i, table in enumerate(tables):
            if table is not None and table.num_rows:
                tagged.append(table.add_column(0, SPLIT_COLUMN, pa.array(np.full(table.num_rows, i, dtype=np.int8))))
    if not tagged:
        schema = _schema(source)
        return schema.insert(0, pa.field(SPLIT_COLUMN, pa.int8())).empty_table()
    return pa.concat_tables(tagged)


def untag_splits(table: pa.Table) -> list[pa.Table | None]:
    """A transform_shard table -> one table (or None) per split index, rows in order."""
    split = table.column(SPLIT_COLUMN).to_numpy()
    rows = table.drop_columns([SPLIT_COLUMN])
    out: list[pa.Table | None] = [None] * len(SPLITS)
    for i in np.unique(split).tolist():
        mask = split == i
        out[i] = rows if mask.all() else rows.filter(pa.array(mask))
    return out


# ---- driver -----------------------------------------------------------------------------------


def _start_pass(progress: Progress, phase: str, source: Source, shards: Sequence[Any], engine: Engine) -> None:
    """Start a pass with its input size: bytes when the engine streams here (chunks tell their
    position), else rows where every shard's rows are known, else unknown."""
    sizes = [source.shard_bytes(s) for s in shards] if engine.streams else []
    if sizes and None not in sizes:
        progress.start(phase, sum(n or 0 for n in sizes), "bytes")
        return
    rows = [source.shard_rows(s) for s in shards]
    progress.start(phase, sum(n or 0 for n in rows) if rows and None not in rows else None)


def _read_here(
    progress: Progress, source: Source, shards: Sequence[Any], per_shard: Callable[[Any], Iterator[T]],
    chunk_of: Callable[[T], Chunk],
) -> Iterator[T]:
    """per_shard(shard)'s items of every shard in order (local engine), reporting each chunk's
    rows and the pass's input bytes read so far."""
    before = 0  # input bytes of the shards already read
    for shard in shards:
        for item in per_shard(shard):
            chunk = chunk_of(item)
            progress.add(chunk.rows, None if chunk.position is None else before + chunk.position)
            yield item
        before += source.shard_bytes(shard) or 0


def prepare(
    source: Source,
    out_url: str,
    write: WriteOptions | None = None,
    *,
    engine: Engine | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    vocab_memory_mb: float | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Run both passes of `source` on `engine` (default: this process) and commit the dataset.

    write.row_group_rows None: adaptive (from the train rows). vocab_memory_mb: counting budget
    (default 64 MiB; see data_tools.vocab.VocabCounter). progress: where each pass reports
    (default: nowhere).
    """
    engine = engine or LocalEngine()
    progress = progress or Progress.silent()
    write = write or WriteOptions()
    row_group_rows = write.row_group_rows
    if vocab_memory_mb is not None and not (isinstance(vocab_memory_mb, (int, float)) and vocab_memory_mb > 0):
        raise DataError(f"vocab_memory_mb must be a positive number, got {vocab_memory_mb!r}")
    budget = int(vocab_memory_mb * (1 << 20)) if vocab_memory_mb else DEFAULT_MEMORY_BUDGET
    counted = [f for f in source.fields if f.counted]
    names = [f.name for f in counted]
    fitted = [f.name for f in source.fields if f.normalizer in FITTED]
    with DatasetWriter(
        out_url,
        fields=_draft_specs(source),
        label=source.label,
        group=source.group,
        row_group_rows=row_group_rows or DEFAULT_ROW_GROUP_ROWS,
        row_groups_per_part=write.row_groups_per_part,
        overwrite=overwrite,
        storage_options=storage_options,
    ) as writer:
        shards = source.shards(engine)
        vocabs: dict[str, Vocabulary | HashedVocabulary | ValueNormalizer] = {}
        stats = [NumericStats() for _ in fitted]
        train_rows: int | None = None
        if counted or fitted:
            train_shards = [s for s in shards if TRAIN in s.splits]
            train_rows = 0
            what = "counting vocabularies" if counted else "fitting normalisers"
            _start_pass(progress, f"pass 1/2: {what}", source, train_shards, engine)
            with VocabCounter(len(counted), memory_budget=budget) as counter:
                if engine.streams:
                    counts = _read_here(progress, source, train_shards, lambda s: count_chunks(source, s, names, fitted),
                                        lambda c: c[2])
                    for partial, n, _, chunk_stats in counts:
                        if partial is not None:
                            counter.add(partial)
                        if chunk_stats is not None:
                            stats = [a + b for a, b in zip(stats, chunk_stats)]
                        train_rows += n
                else:
                    for table in engine.map_tables(count_shard, train_shards, source, names, fitted):
                        train_rows += _meta(table, TRAIN_ROWS_FIELD)
                        progress.add(_meta(table, READ_ROWS_FIELD))
                        stats = [a + b for a, b in zip(stats, _shard_stats(table, len(fitted)))]
                        counter.add(table.filter(pc.greater_equal(table.column("field"), 0)))
                progress.end()
                vocabs.update(zip(names, counter.vocabularies([f.min_count for f in counted])))
        fits = dict(zip(fitted, stats))
        for f in source.fields:
            if f.embeds_value:
                vocabs[f.name] = ValueNormalizer.fit(f.name, f.normalizer, fits.get(f.name))  # type: ignore[arg-type]
        # Saved with the dataset (staged like the parts): raw value -> id for serving, and counts.
        vocab_files = {
            f.name: writer.write_file(vocab_file_name(i, f.name), vocabs[f.name].table())  # type: ignore[union-attr]
            for i, f in enumerate(source.fields)
            if f.counted
        }
        for f in source.fields:
            if not f.counted and not f.embeds_value:
                assert f.buckets is not None
                vocabs[f.name] = HashedVocabulary(f.buckets)
        if row_group_rows is None:
            hint = train_rows if train_rows is not None else source.train_rows_hint()
            writer.row_group_rows = adaptive_row_group_rows(hint) if hint is not None else DEFAULT_ROW_GROUP_ROWS
        outs = {i: writer.split(SPLITS[i]) for i in source.split_indexes}

        def write(tables: list[pa.Table | None]) -> None:
            for i, table in enumerate(tables):
                if table is not None and table.num_rows:
                    if i not in outs:
                        raise AssertionError(f"rows for split {SPLITS[i]} that {type(source).__name__} does not write")
                    outs[i].write(table)

        _start_pass(progress, "pass 2/2: writing parts" if counted else "writing parts", source, shards, engine)
        if engine.streams:
            for tables, _ in _read_here(progress, source, shards, lambda s: transform_chunks(source, vocabs, s), lambda t: t[1]):
                write(tables)
        else:
            for table in engine.map_tables(transform_shard, shards, source, vocabs):
                progress.add(table.num_rows)
                write(untag_splits(table))
        progress.end()
        spec = source.spec()
        spec["row_group_rows"] = writer.row_group_rows
        spec["vocab"] = {f.name: f.describe() for f in source.fields}
        for name, info in vocab_files.items():
            spec["vocab"][name]["file"] = info
        for f in source.fields:
            if f.embeds_value:
                spec["vocab"][f.name].update(vocabs[f.name].describe())  # type: ignore[union-attr]
        specs = [f.field_spec(vocabs[f.name]) for f in source.fields]
        return writer.commit(spec, created_by=source.created_by, fields=specs)
