"""Synthetic Criteo-shaped CTR data with a hidden teacher, for demos, benchmarks and scale tests.

Ids per field follow a Zipf-like law (rank k has weight about k^-power_law: a discretised
continuous power law, sampled by its closed-form inverse CDF) mapped to ids through a fixed
random permutation, so hot ids are spread over the table as in a real sorted vocabulary.
Labels come from a hidden logistic teacher: per-id weights for every field (fields differ in
importance) plus a few low-rank pairwise interactions, standardised so the teacher's logit has a
fixed spread, shifted to the requested positive rate, then drawn as Bernoulli. The Bernoulli
noise keeps the best possible AUC below 1 (the teacher's own AUC is stored in the manifest spec).

Rows are generated one row group at a time from a generator seeded by (seed, split, chunk):
the output depends only on the arguments, never on memory or on how many rows exist in total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from tf4ctr_dist.data.manifest import GROUP_COLUMN, SPLITS, FieldSpec, Manifest

from .engine import SPLIT_COLUMN, Engine, LocalEngine
from .options import SyntheticOptions
from .progress import Progress
from .writer import DatasetWriter

# Embedding rows per field (incl. PAD and OOV) at scale_vocab=1: 13 small bucketised numeric
# fields and 26 categorical ones shaped like Criteo x4 at min_count 10 (~1.08M rows in all).
CRITEO_LIKE_VOCAB = (
    [60, 100, 120, 60, 200, 120, 80, 70, 110, 10, 40, 60, 80]
    + [1445, 553, 175_000, 128_000, 305, 19, 11_900, 629, 4, 39_000, 5_400, 157_000, 3_200]
    + [27, 10_700, 143_000, 11, 4_600, 2_000, 5, 154_000, 17, 16, 52_000, 82, 40_000]
)
TEACHER_LOGIT_STD = 1.6  # spread of the teacher's logit; sets the best reachable AUC (see spec.teacher)
PAIRS = 8  # pairwise interaction terms in the teacher
PAIR_DIM = 4
PILOT_ROWS = 200_000  # rows used to standardise the teacher and set the base rate


def default_field_names(fields: int) -> list[str]:
    if fields == 39:
        return [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    return [f"C{i}" for i in range(1, fields + 1)]


def default_vocab_sizes(fields: int, scale_vocab: float = 1.0) -> list[int]:
    """The Criteo-like mix (cycled when fields != 39), scaled; at least 3 rows (PAD, 1 id, OOV)."""
    sizes = [CRITEO_LIKE_VOCAB[i % len(CRITEO_LIKE_VOCAB)] for i in range(fields)]
    return [max(3, int(round(v * scale_vocab))) for v in sizes]


def power_law_ranks(u: np.ndarray, n: int, a: float) -> np.ndarray:
    """0-based ranks in [0, n) from uniforms ``u``: floor of x ~ density x^-a on [1, n+1), by
    inverse CDF. Closed form instead of a search over an n-entry table: ~10x faster at Criteo
    vocab sizes."""
    top = float(n + 1)
    if abs(a - 1.0) < 1e-9:
        x = top**u
    else:
        x = (1.0 - u * (1.0 - top ** (1.0 - a))) ** (1.0 / (1.0 - a))
    return np.minimum(x.astype(np.int64), n) - 1


def bias_for_rate(z: np.ndarray, positive_rate: float) -> float:
    """The bias b with mean(sigmoid(z + b)) = positive_rate (bisection: monotone in b)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(z + mid)))) < positive_rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class _Field:
    ids: np.ndarray  # rank - 1 -> id in 1..V-1 (a permutation)
    weight: np.ndarray  # teacher weight per id (index = id)


class _Teacher:
    """Hidden labelling function; built from its own seeded stream."""

    def __init__(self, vocab_sizes: list[int], power_law: float, seed: int) -> None:
        rng = np.random.default_rng([seed, 0x7EAC])
        self.power_law = power_law
        self.fields: list[_Field] = []
        for size in vocab_sizes:
            ids = rng.permutation(np.arange(1, size, dtype=np.int64))
            importance = rng.uniform(0.2, 1.0)  # some fields matter more than others
            weight = rng.normal(0.0, importance, size).astype(np.float32)
            weight[0] = 0.0
            self.fields.append(_Field(ids, weight))
        n = len(vocab_sizes)
        pairs = [(int(a), int(b)) for a, b in (rng.choice(n, size=2, replace=False) for _ in range(PAIRS))] if n > 1 else []
        self.pairs = [
            (a, b, rng.normal(0, 1, (vocab_sizes[a], PAIR_DIM)).astype(np.float32), rng.normal(0, 1, (vocab_sizes[b], PAIR_DIM)).astype(np.float32))
            for a, b in pairs
        ]
        self.center, self.scale, self.bias = 0.0, 1.0, 0.0

    def sample_ids(self, rng: np.random.Generator, rows: int) -> list[np.ndarray]:
        return [f.ids[power_law_ranks(rng.random(rows), len(f.ids), self.power_law)] for f in self.fields]

    def raw_logit(self, ids: list[np.ndarray]) -> np.ndarray:
        logit = np.zeros(len(ids[0]), dtype=np.float64)
        for f, col in zip(self.fields, ids):
            logit += f.weight[col]
        for a, b, ua, ub in self.pairs:
            logit += np.einsum("ij,ij->i", ua[ids[a]], ub[ids[b]]) / PAIR_DIM
        return logit

    def probability(self, ids: list[np.ndarray]) -> np.ndarray:
        z = (self.raw_logit(ids) - self.center) * self.scale + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def calibrate(self, seed: int, positive_rate: float) -> dict[str, float]:
        """Standardise the logit to TEACHER_LOGIT_STD and pick the bias for `positive_rate`."""
        rng = np.random.default_rng([seed, 0x9170])
        raw = self.raw_logit(self.sample_ids(rng, PILOT_ROWS))
        self.center = float(raw.mean())
        self.scale = TEACHER_LOGIT_STD / max(float(raw.std()), 1e-12)
        z = (raw - self.center) * self.scale
        self.bias = bias_for_rate(z, positive_rate)
        p = 1 / (1 + np.exp(-(z + self.bias)))
        labels = rng.random(len(p)) < p
        return {"positive_rate": float(labels.mean()), "bayes_auc": _auc(labels, p)}


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels.sum()
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def generate_synthetic(
    out_url: str,
    options: SyntheticOptions | None = None,
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    engine: Engine | None = None,
    progress: Progress | None = None,
    **keys: Any,
) -> Manifest:
    """Write a synthetic dataset (splits train/valid/test) to `out_url`; return its manifest.

    `options` and/or its flat keys (`rows` required; `fields`, `vocab_sizes`, `scale_vocab`,
    `power_law`, `positive_rate`, `split`, `seed`, `row_group_rows`, ...; data_tools.options).
    Deterministic for given options (including row_group_rows, the chunk size). progress: where
    the generation reports (default: nowhere).
    """
    opts = SyntheticOptions.build(options, keys)
    rows, fields, seed, split = opts.rows, opts.fields, opts.splits.seed, opts.splits.split
    power_law, positive_rate = opts.power_law, opts.positive_rate
    row_group_rows, row_groups_per_part = opts.write.row_group_rows, opts.write.row_groups_per_part
    assert row_group_rows is not None  # SyntheticOptions requires it
    sizes = list(opts.vocab_sizes) if opts.vocab_sizes is not None else default_vocab_sizes(fields, opts.scale_vocab)

    names = default_field_names(fields)
    teacher = _Teacher(sizes, power_law, seed)
    stats = teacher.calibrate(seed, positive_rate)
    n_train = int(rows * split[0])
    n_valid = int(rows * split[1])
    counts = {"train": n_train, "valid": n_valid, "test": rows - n_train - n_valid}
    specs = [FieldSpec(name, "categorical", size, None, "counted") for name, size in zip(names, sizes)]

    engine = engine or LocalEngine()
    progress = progress or Progress.silent()
    with DatasetWriter(
        out_url,
        fields=specs,
        label="label",
        group=None,
        row_group_rows=row_group_rows,
        row_groups_per_part=row_groups_per_part,
        overwrite=overwrite,
        storage_options=storage_options,
    ) as writer:
        # Chunk k of a split: rows [k*row_group_rows, ...), generated from rng (seed, split, k).
        # A shard is a run of chunks; the Ray engine generates shards in parallel, the writer
        # takes them in order, so the output does not depend on the engine.
        per_shard = 1
        if engine.shard_bytes:
            per_shard = max(1, engine.shard_bytes // (row_group_rows * (fields + 2) * 8))
        shards = []
        for split_index, name in enumerate(SPLITS):
            chunks = [(k, min(row_group_rows, counts[name] - start)) for k, start in enumerate(range(0, counts[name], row_group_rows))]
            shards += [(split_index, tuple(chunks[i : i + per_shard])) for i in range(0, len(chunks), per_shard)]
        outs = [writer.split(name) for name in SPLITS]
        progress.start("generating rows", rows)
        for table in engine.map_tables(_shard, shards, teacher, names, seed):
            progress.add(table.num_rows)
            # a shard's rows carry its split index (Ray Data may cut a shard's table in two)
            tags, body = table.column(SPLIT_COLUMN).to_numpy(), table.drop_columns([SPLIT_COLUMN])
            for i in np.unique(tags).tolist():
                outs[i].write(body if (tags == i).all() else body.filter(pa.array(tags == i)))
        progress.end()
        spec = {
            "format": "synthetic",
            "rows": rows,
            "fields": fields,
            "vocab_sizes": sizes,
            "power_law": power_law,
            "positive_rate": positive_rate,
            "seed": seed,
            "split": list(split),
            "row_group_rows": row_group_rows,
            "teacher": {"logit_std": TEACHER_LOGIT_STD, "pairs": PAIRS, **stats},
        }
        return writer.commit(spec, created_by="data_tools.synthetic")


def _shard(teacher: _Teacher, names: list[str], seed: int, shard: tuple[int, tuple[tuple[int, int], ...]]) -> pa.Table:
    """The shard's chunks as one table, tagged with its split index (SPLIT_COLUMN, first)."""
    split_index, chunks = shard
    table = pa.concat_tables([_chunk(teacher, names, np.random.default_rng([seed, split_index, k]), n) for k, n in chunks])
    return table.add_column(0, SPLIT_COLUMN, pa.array(np.full(table.num_rows, split_index, dtype=np.int8)))


def _chunk(teacher: _Teacher, names: list[str], rng: np.random.Generator, rows: int) -> pa.Table:
    ids = teacher.sample_ids(rng, rows)
    labels = (rng.random(rows) < teacher.probability(ids)).astype(np.float32)
    columns: dict[str, Any] = {"label": labels}
    columns.update(zip(names, ids))
    columns[GROUP_COLUMN] = np.zeros(rows, dtype=np.int64)
    return pa.table(columns)
