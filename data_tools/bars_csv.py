"""BARS-style CSV -> prepared Parquet dataset (e.g. Frappe x1: label + categorical columns).

Three files (train, valid, test), each with a header; the label column in {0, 1}; every other
used column categorical. Vocabularies are fit on TRAIN only (counted: tokens seen >= min_count
times, empty cells are missing and map to OOV) or hashed per field (see data_tools.fields).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import Manifest
from tf4ctr_dist.data.storage import display_url

from .csv_input import TextShard, check_shard_rows, group_ids, open_text_input, parse_labels, plan_text_shards
from .engine import Engine
from .fields import FieldPlan, resolve_fields
from .options import BarsCsvOptions
from .pipeline import Chunk, Source, adaptive_row_group_rows, prepare

__all__ = ["prepare_bars_csv", "adaptive_row_group_rows"]


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


class BarsSource(Source):
    created_by = "data_tools.bars_csv"

    def __init__(
        self, urls: tuple[str, str, str], label_col: str, group_col: str | None, entries: list[Any] | None,
        resolve: Mapping[str, Any], storage_options: Mapping[str, Any] | None,
    ) -> None:
        self.urls = urls
        self.inputs = [open_text_input(url, storage_options, delimiter=",") for url in urls]
        if entries is None:
            entries = [c for c in self.inputs[0].columns if c != label_col]
        self.fields: list[FieldPlan] = resolve_fields(list(entries), kinds=("categorical",), **resolve)
        if not self.fields:
            raise DataError(f"{self.inputs[0].url}: no feature columns besides label {label_col!r}")
        names = [f.name for f in self.fields]
        if label_col in names:
            raise DataError(f"label column {label_col!r} cannot also be a field")
        self.label, self.group = label_col, group_col
        self.needed = _unique([label_col, *names, *([group_col] if group_col else [])])
        for inp in self.inputs:
            inp.require(self.needed)
        self.resolve = dict(resolve)

    def shards(self, engine: Engine) -> list[TextShard]:
        return [s for i, inp in enumerate(self.inputs) for s in plan_text_shards(inp, i, (i,), engine)]

    def read(self, shard: TextShard, names: Sequence[str]) -> Iterator[Chunk]:
        inp, rows = self.inputs[shard.source], 0
        columns = _unique([self.label, *names, *([self.group] if self.group else [])])
        for offset, batch in inp.batches(columns, start=shard.start, end=shard.end, first_row=shard.first_row):
            labels = parse_labels(inp, batch.column(self.label), offset, self.label)
            groups = group_ids(batch.column(self.group)) if self.group else None
            rows += batch.num_rows
            yield Chunk(labels, {name: batch.column(name) for name in names}, shard.source, groups)
        check_shard_rows(inp, shard, rows)

    def train_rows_hint(self) -> int | None:
        """Estimated from the file size and the first ~1 MB of lines (no extra pass over train)."""
        inp = self.inputs[0]
        if inp.compressed:
            return None
        with inp.loc.fs.open(inp.loc.path(), "rb") as f:
            head = f.read(1 << 20)
        lines = max(1, head.count(b"\n"))
        return max(1, int(inp.size() / (len(head) / lines)) - 1)

    def spec(self) -> dict[str, Any]:
        return {
            "format": "bars-csv",
            "inputs": {split: display_url(url) for split, url in zip(("train", "valid", "test"), self.urls)},
            "label_col": self.label,
            "group_col": self.group,
            "fields": [f.name for f in self.fields],
            "min_count": self.resolve["min_count"],
        }


def prepare_bars_csv(
    train: str,
    valid: str,
    test: str,
    out_url: str,
    options: BarsCsvOptions | None = None,
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    engine: Engine | None = None,
    **keys: Any,
) -> Manifest:
    """Convert three CSV files (header; `label_col` in {0,1}; all other used columns categorical).

    `options` and/or its flat keys (`label_col`, `group_col`, `fields`, `min_count`, ...;
    data_tools.options). `fields`: column names or per-field mappings (data_tools.fields);
    default all but the label. Two streaming passes over train (count, then transform; one when
    every field is hashed), one over valid and test. `storage_options` apply to the inputs and
    the output. Returns the written manifest.
    """
    opts = BarsCsvOptions.build(options, keys)
    source = BarsSource(
        (train, valid, test), opts.label_col, opts.group_col, opts.fields, opts.vocab.field_defaults(), storage_options,
    )
    return prepare(
        source, out_url, opts.write, engine=engine, overwrite=overwrite, storage_options=storage_options,
        vocab_memory_mb=opts.vocab.vocab_memory_mb,
    )
