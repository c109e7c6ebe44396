"""Typed options of the converters, shared by every format, and their parsing from a spec.

A format's options are one frozen dataclass (`CriteoOptions`, ...) made of shared groups and the
format's own keys:

    WriteOptions   row_group_rows, row_groups_per_part          (every format)
    VocabOptions   min_count, vocab_mode, buckets, field_options, vocab_memory_mb
                                                                 (every format but synthetic)
    SplitOptions   split, seed                                   (criteo, movielens, synthetic)

A spec (YAML mapping, `key=value` overrides, or a converter's keyword arguments) is flat: its keys
are the leaf fields of the groups plus the format's own keys, e.g. `min_count: 2` sets
`CriteoOptions.vocab.min_count`. `FormatOptions.parse` checks it: an unknown key names the
closest valid one and lists them all; a missing required key and a value of the wrong type or
range are errors too, raised before any input is read (`OptionError`).

Light on purpose (no pyarrow, numpy or ray): the CLI parses and checks a spec with this module
alone, so a mistake costs milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

from tf4ctr_dist.data.errors import DataError

DEFAULT_ROW_GROUP_ROWS = 65_536
DEFAULT_ROW_GROUPS_PER_PART = 32  # ~2M rows per file: few files, still many row groups to shard
VOCAB_MODES = ("counted", "hashed")
ENGINES = ("local", "ray")


class OptionError(DataError):
    """An unknown, missing or ill-typed converter option (a usage error: exit status 2)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class WriteOptions:
    """Layout of the written parts. row_group_rows None: adaptive, from the train rows (see
    data_tools.pipeline.adaptive_row_group_rows)."""

    row_group_rows: int | None = None
    row_groups_per_part: int = DEFAULT_ROW_GROUPS_PER_PART

    def __post_init__(self) -> None:
        if self.row_group_rows is not None and (not _is_int(self.row_group_rows) or self.row_group_rows < 1):
            raise OptionError(f"row_group_rows must be a positive integer, got {self.row_group_rows!r}")
        if not _is_int(self.row_groups_per_part) or self.row_groups_per_part < 1:
            raise OptionError(f"row_groups_per_part must be a positive integer, got {self.row_groups_per_part!r}")


@dataclass(frozen=True)
class VocabOptions:
    """Spec-level vocabulary defaults (per-field overrides: `fields`, `field_options`; see
    data_tools.fields) and the counting memory budget (MiB; None: data_tools.vocab's default)."""

    min_count: int = 1
    vocab_mode: str = "counted"
    buckets: int | None = None
    field_options: Mapping[str, Any] | None = None
    vocab_memory_mb: float | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.min_count) or self.min_count < 1:
            raise OptionError(f"min_count must be >= 1, got {self.min_count!r}")
        if self.vocab_mode not in VOCAB_MODES:
            raise OptionError(f"vocab_mode should be one of {list(VOCAB_MODES)}, got {self.vocab_mode!r}")
        if self.buckets is not None and (not _is_int(self.buckets) or self.buckets < 1):
            raise OptionError(f"buckets should be an integer >= 1, got {self.buckets!r}")
        if self.field_options is not None and not isinstance(self.field_options, Mapping):
            raise OptionError(f"field_options should map field names to settings, got {self.field_options!r}")
        if self.vocab_memory_mb is not None and not (_is_number(self.vocab_memory_mb) and self.vocab_memory_mb > 0):
            raise OptionError(f"vocab_memory_mb must be a positive number, got {self.vocab_memory_mb!r}")

    def field_defaults(self) -> dict[str, Any]:
        """The keyword arguments of data_tools.fields.resolve_fields."""
        return dict(vocab_mode=self.vocab_mode, min_count=self.min_count, buckets=self.buckets, field_options=self.field_options)


@dataclass(frozen=True)
class SplitOptions:
    """Train/valid/test fractions of a seeded row hash (or of generated rows), and the seed."""

    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 2018

    def __post_init__(self) -> None:
        split = self.split
        if not isinstance(split, (list, tuple)) or len(split) != 3 or not all(_is_number(x) for x in split):
            raise OptionError(f"split must be three non-negative fractions summing to 1, got {split!r}")
        if min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
            raise OptionError(f"split must be three non-negative fractions summing to 1, got {tuple(split)}")
        # Kept as given (ints stay ints): the manifest records the values as they were passed.
        object.__setattr__(self, "split", tuple(split))
        if not _is_int(self.seed):
            raise OptionError(f"seed must be an integer, got {self.seed!r}")


GROUPS = (WriteOptions, VocabOptions, SplitOptions)
F = TypeVar("F", bound="FormatOptions")


@dataclass(frozen=True)
class FormatOptions:
    """Base of the per-format options: fields typed as a group (WriteOptions, ...) contribute
    their fields as flat keys; every other field is a key of its own (required when it has no
    default)."""

    format: ClassVar[str] = ""

    @classmethod
    def _groups(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls) if _group_type(f) is not None}

    @classmethod
    def key_owners(cls) -> dict[str, str | None]:
        """Flat spec key -> the group attribute holding it (None: the format's own key)."""
        owners: dict[str, str | None] = {}
        groups = cls._groups()
        for f in dataclasses.fields(cls):
            if f.name in groups:
                for leaf in dataclasses.fields(_group_type(f)):  # type: ignore[arg-type]
                    owners[leaf.name] = f.name
            else:
                owners[f.name] = None
        return owners

    @classmethod
    def keys(cls) -> list[str]:
        return sorted(cls.key_owners())

    @classmethod
    def required(cls) -> list[str]:
        """Own keys without a default, in declaration order."""
        groups = cls._groups()
        return [
            f.name for f in dataclasses.fields(cls)
            if f.name not in groups and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]

    @classmethod
    def parse(cls: type[F], spec: Mapping[str, Any], *, base: F | None = None, where: str = "in the spec") -> F:
        """Flat `spec` (over `base`, default: the format's defaults) -> options. OptionError for
        an unknown key (naming the closest valid one), a missing required key, a bad value."""
        owners = cls.key_owners()
        unknown = sorted(k for k in spec if k not in owners)
        if unknown:
            raise OptionError(unknown_keys_message(cls.format, unknown, owners))
        if base is None:
            missing = [k for k in cls.required() if k not in spec]
            if missing:
                raise OptionError(f"{cls.format} needs {', '.join(missing)} {where}")
        groups = cls._groups()
        kwargs: dict[str, Any] = {}
        for name, f in groups.items():
            current = getattr(base, name) if base is not None else f.default_factory()  # type: ignore[misc]
            changes = {k: v for k, v in spec.items() if owners[k] == name}
            kwargs[name] = dataclasses.replace(current, **changes) if changes else current
        for f in dataclasses.fields(cls):
            if f.name in groups:
                continue
            if f.name in spec:
                kwargs[f.name] = spec[f.name]
            elif base is not None:
                kwargs[f.name] = getattr(base, f.name)
        return cls(**kwargs)

    @classmethod
    def build(cls: type[F], options: F | None, keys: Mapping[str, Any]) -> F:
        """A converter's `options` argument and its keyword overrides -> options."""
        if options is not None and not isinstance(options, cls):
            raise OptionError(f"{cls.format}: options should be {cls.__name__}, got {type(options).__name__}")
        if options is not None and not keys:
            return options
        return cls.parse(keys, base=options, where="(as keyword arguments)")

    def flat(self) -> dict[str, Any]:
        """The options as one flat mapping (the inverse of parse)."""
        out: dict[str, Any] = {}
        groups = self._groups()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in groups:
                out.update({leaf.name: getattr(value, leaf.name) for leaf in dataclasses.fields(value)})
            else:
                out[f.name] = value
        return out


def _group_type(f: dataclasses.Field) -> type | None:
    """The group class of a FormatOptions field (from its default_factory's result)."""
    if f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return None
    made = f.default_factory()  # type: ignore[misc]
    return type(made) if isinstance(made, GROUPS) else None


def unknown_keys_message(fmt: str, unknown: Sequence[str], valid: Mapping[str, Any] | Sequence[str]) -> str:
    names = sorted(valid)
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
        if close:
            hints.append(f"{key!r} -> did you mean {close[0]!r}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return f"unknown spec key(s) for {fmt}: {list(unknown)}{hint}; valid keys: {', '.join(names)}"


# ---- the formats ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriteoOptions(FormatOptions):
    """split_rule (one raw input): hash (per-row seeded hash, streaming) or stratified (BARS
    Criteo_x4: 10 label-stratified folds, seed 2018, folds 8:1:1; one extra pass over the labels).
    Three inputs (the BARS x4 train/valid/test.csv) keep their split."""

    format: ClassVar[str] = "criteo"
    split_rule: str = "hash"
    vocab: VocabOptions = field(default_factory=lambda: VocabOptions(min_count=10))
    splits: SplitOptions = field(default_factory=SplitOptions)
    write: WriteOptions = field(default_factory=lambda: WriteOptions(row_group_rows=DEFAULT_ROW_GROUP_ROWS))

    def __post_init__(self) -> None:
        if self.split_rule not in ("hash", "stratified"):
            raise OptionError(f"split_rule should be 'hash' or 'stratified' (BARS x4), got {self.split_rule!r}")


@dataclass(frozen=True)
class BarsCsvOptions(FormatOptions):
    format: ClassVar[str] = "bars-csv"
    label_col: str = "label"
    group_col: str | None = None
    fields: list[Any] | None = None  # column names or per-field mappings; None: all but the label
    vocab: VocabOptions = field(default_factory=lambda: VocabOptions(min_count=2))
    write: WriteOptions = field(default_factory=WriteOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.label_col, str) or not self.label_col:
            raise OptionError(f"label_col should be a column name, got {self.label_col!r}")
        if self.group_col is not None and (not isinstance(self.group_col, str) or not self.group_col):
            raise OptionError(f"group_col should be a column name, got {self.group_col!r}")


SPLIT_RULES = ("exact", "hash")


@dataclass(frozen=True)
class MovieLensOptions(FormatOptions):
    """ML-1M as the TF4CTR authors had it by default: every rating kept, label rating >=
    label_threshold, the five fields UserID, Gender, Age, Occupation, MovieID, min count 2, an
    exact 8:1:1 split. drop_neutral: drop the rating-3 rows (AutoInt's rule); genres: add the
    Genres sequence field (max_len 3); split_rule: exact (seeded permutation, exact sizes, see
    data_tools.splits) or hash (per-line hash, streaming)."""

    format: ClassVar[str] = "movielens"
    label_threshold: int = 4
    drop_neutral: bool = False
    genres: bool = False
    split_rule: str = "exact"
    vocab: VocabOptions = field(default_factory=lambda: VocabOptions(min_count=2))
    splits: SplitOptions = field(default_factory=SplitOptions)
    write: WriteOptions = field(default_factory=WriteOptions)

    def __post_init__(self) -> None:
        if not _is_int(self.label_threshold) or not 2 <= self.label_threshold <= 5:
            raise OptionError(f"label_threshold should be an integer rating in 2..5, got {self.label_threshold!r}")
        for key in ("drop_neutral", "genres"):
            if not isinstance(getattr(self, key), bool):
                raise OptionError(f"{key} should be true or false, got {getattr(self, key)!r}")
        if self.split_rule not in SPLIT_RULES:
            raise OptionError(f"split_rule should be one of {list(SPLIT_RULES)}, got {self.split_rule!r}")


@dataclass(frozen=True)
class KKBoxOptions(FormatOptions):
    """KKBox_x1 from the BARS CSVs (train/valid/test.csv); fields fixed (data_tools.bars_sets)."""

    format: ClassVar[str] = "kkbox"
    label_col: str = "label"
    vocab: VocabOptions = field(default_factory=lambda: VocabOptions(min_count=2))
    write: WriteOptions = field(default_factory=WriteOptions)


@dataclass(frozen=True)
class AvazuOptions(FormatOptions):
    """Avazu_x4: the raw train.csv (split by `split_rule`: stratified = BARS x4's 10 stratified
    folds 8:1:1, seed 2018) or the BARS x4 train/valid/test.csv."""

    format: ClassVar[str] = "avazu"
    label_col: str = "click"
    split_rule: str = "stratified"
    vocab: VocabOptions = field(default_factory=lambda: VocabOptions(min_count=2))
    splits: SplitOptions = field(default_factory=SplitOptions)
    write: WriteOptions = field(default_factory=WriteOptions)

    def __post_init__(self) -> None:
        if self.split_rule not in ("stratified", "exact"):
            raise OptionError(f"split_rule should be 'stratified' or 'exact', got {self.split_rule!r}")


@dataclass(frozen=True)
class MLTagOptions(FormatOptions):
    """MovielensLatest_x1 (label, user_id, item_id, tag_id): three files, or one file split
    exactly (data_tools.splits.exact_split) 7:2:1."""

    format: ClassVar[str] = "ml-tag"
    label_col: str = "label"
    vocab: VocabOptions = field(default_factory=lambda: VocabOptions(min_count=2))
    splits: SplitOptions = field(default_factory=lambda: SplitOptions(split=(0.7, 0.2, 0.1)))
    write: WriteOptions = field(default_factory=WriteOptions)


@dataclass(frozen=True)
class FuxiCTROptions(FormatOptions):
    """A FuxiCTR dataset_config YAML (the --input; data_tools.fuxictr): dataset_id picks one of
    its datasets (needed when it holds several); fields, label and files come from the YAML;
    min_count: the default when the YAML gives no min_categr_count (FuxiCTR's default 1)."""

    format: ClassVar[str] = "fuxictr"
    dataset_id: str | None = None
    group_col: str | None = None
    vocab: VocabOptions = field(default_factory=lambda: VocabOptions(min_count=1))
    write: WriteOptions = field(default_factory=WriteOptions)

    def __post_init__(self) -> None:
        for key in ("dataset_id", "group_col"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise OptionError(f"{key} should be a name, got {value!r}")


@dataclass(frozen=True)
class ParquetLogsOptions(FormatOptions):
    """Dates: lists of YYYY-MM-DD dates or inclusive 'A..B' ranges (see data_tools.parquet_logs)."""

    format: ClassVar[str] = "parquet-logs"
    label: str
    fields: list[Any]
    train_dates: Any
    valid_dates: Any = None
    test_dates: Any = None
    group: str | None = None
    partition_key: str = "dt"
    vocab: VocabOptions = field(default_factory=VocabOptions)
    write: WriteOptions = field(default_factory=WriteOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise OptionError(f"parquet-logs needs label: the label column's name, got {self.label!r}")
        if not isinstance(self.fields, list):
            raise OptionError(f"parquet-logs needs fields: a list of columns, got {self.fields!r}")
        if not isinstance(self.partition_key, str) or not self.partition_key:
            raise OptionError(f"partition_key should be a column name, got {self.partition_key!r}")


@dataclass(frozen=True)
class SyntheticOptions(FormatOptions):
    """vocab_sizes: embedding rows per field incl. PAD and OOV (default: the Criteo-like mix
    times scale_vocab)."""

    format: ClassVar[str] = "synthetic"
    rows: int
    fields: int = 39
    vocab_sizes: Sequence[int] | None = None
    scale_vocab: float = 1.0
    power_law: float = 1.1
    positive_rate: float = 0.25
    splits: SplitOptions = field(default_factory=lambda: SplitOptions(seed=0))
    write: WriteOptions = field(default_factory=lambda: WriteOptions(row_group_rows=DEFAULT_ROW_GROUP_ROWS))

    def __post_init__(self) -> None:
        if not _is_int(self.rows) or self.rows < 1:
            raise OptionError(f"rows must be >= 1, got {self.rows!r}")
        if not _is_int(self.fields) or self.fields < 1:
            raise OptionError(f"fields must be >= 1, got {self.fields!r}")
        if not _is_number(self.scale_vocab) or self.scale_vocab <= 0:
            raise OptionError(f"scale_vocab must be > 0, got {self.scale_vocab!r}")
        if not _is_number(self.power_law) or self.power_law <= 0:
            raise OptionError(f"power_law must be > 0, got {self.power_law!r}")
        if not _is_number(self.positive_rate) or not 0 < self.positive_rate < 1:
            raise OptionError(f"positive_rate must be in (0, 1), got {self.positive_rate!r}")
        if self.write.row_group_rows is None:
            raise OptionError("synthetic needs row_group_rows (the generation chunk); it has no adaptive default")
        if self.vocab_sizes is not None:
            if not isinstance(self.vocab_sizes, (list, tuple)) or not all(_is_int(v) for v in self.vocab_sizes):
                raise OptionError(f"vocab_sizes should be a list of integers, got {self.vocab_sizes!r}")
            if len(self.vocab_sizes) != self.fields:
                raise OptionError(f"vocab_sizes has {len(self.vocab_sizes)} entries; expected one per field ({self.fields})")
            if min(self.vocab_sizes) < 3:
                raise OptionError(f"every vocab size must be >= 3 (PAD, at least one id, OOV), got {min(self.vocab_sizes)}")


FORMAT_OPTIONS: dict[str, type[FormatOptions]] = {
    cls.format: cls for cls in (
        BarsCsvOptions, CriteoOptions, MovieLensOptions, ParquetLogsOptions, SyntheticOptions,
        KKBoxOptions, AvazuOptions, MLTagOptions, FuxiCTROptions,
    )
}
FORMATS = tuple(sorted(FORMAT_OPTIONS))
