"""A FuxiCTR `dataset_config` YAML -> the bars-csv converter's options and files.

A FuxiCTR user brings a dataset description as it is, e.g. (FuxiCTR's own layout, one file may
hold several dataset ids):

    frappe_x1:
        data_format: csv
        data_root: ../data/Frappe/
        feature_cols:
        - {active: true, dtype: float, name: [user, item, daytime, ...], type: categorical}
        label_col: {dtype: float, name: label}
        min_categr_count: 2
        train_data: ../data/Frappe/Frappe_x1/train.csv
        valid_data: ../data/Frappe/Frappe_x1/valid.csv
        test_data: ../data/Frappe/Frappe_x1/test.csv

Mapping: feature_cols[].name (a name or a list of names: one field each), active (false: left
out), dtype (str / float / int: every raw cell is read as text, so only a check), type
(categorical; sequence with splitter / max_len, truncated keeping the first max_len items as
FuxiCTR does; numeric embedded as value x vector as FuxiCTR does, with `normalizer`
StandardScaler / MinMaxScaler / none fit on train - a missing value gives the zero vector,
where FuxiCTR fills it with 0 first - or, with this system's `bucketing` key, bucketised into
categorical ids), min_categr_count (per column, else the config's, else 1 as in FuxiCTR),
preprocess (a data_tools.derive name, e.g. extract_country_code, convert_weekday; `copy_from(COL)`;
convert_to_bucket = the Criteo bucketing), copy_from; label_col {name, dtype}; train_data /
valid_data / test_data (relative paths: from the YAML file's folder). Any other key is refused by
name (e.g. "frappe_x1.feature_cols[3].embedding_dim: not supported").
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any, Mapping

from tf4ctr_dist.data.errors import DataError

from .options import OptionError

DATASET_KEYS = {"data_format", "data_root", "train_data", "valid_data", "test_data", "min_categr_count",
                "feature_cols", "label_col"}
COLUMN_KEYS = {"name", "active", "dtype", "type", "min_categr_count", "splitter", "max_len", "preprocess",
               "copy_from", "bucketing", "normalizer"}
NORMALIZERS = {"StandardScaler": "standard", "MinMaxScaler": "min_max", None: "none"}  # FuxiCTR's -> data_tools.fields
LABEL_KEYS = {"name", "dtype"}
DTYPES = {"str", "float", "int"}
# FuxiCTR preprocess functions whose input is a fixed raw column (not the field's own name).
FIXED_SOURCE = {"convert_weekday": "hour", "convert_weekend": "hour"}
_COPY = re.compile(r"^copy_from\((\w+)\)$")


def _refuse(where: str, keys: set[str], allowed: set[str]) -> None:
    unknown = sorted(str(k) for k in set(keys) - allowed)
    if unknown:
        raise OptionError(f"{where}.{unknown[0]}: not supported (FuxiCTR keys understood here: {', '.join(sorted(allowed))})")


def read_config(path: str, dataset_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """(dataset id, its mapping) from a FuxiCTR dataset_config YAML: the one named, or the only
    one; a file holding one dataset's keys directly is accepted too (id: the file's stem)."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise DataError(f"cannot read FuxiCTR dataset config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise OptionError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict) or not loaded:
        raise OptionError(f"{path}: expected a mapping of dataset ids to dataset configs")
    if "feature_cols" in loaded:
        return dataset_id or Path(path).stem, loaded
    if dataset_id is None:
        if len(loaded) != 1:
            raise OptionError(f"{path}: holds datasets {sorted(loaded)}; choose one with dataset_id=ID")
        dataset_id = next(iter(loaded))
    if dataset_id not in loaded:
        raise OptionError(f"{path}: no dataset {dataset_id!r}; it holds {sorted(loaded)}")
    config = loaded[dataset_id]
    if not isinstance(config, dict):
        raise OptionError(f"{path}: {dataset_id}: expected a mapping, got {type(config).__name__}")
    return str(dataset_id), config


def _path(value: Any, where: str, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise OptionError(f"{where}: expected a file path, got {value!r}")
    if "://" in value or posixpath.isabs(value):
        return value
    return str((base / value).resolve())


def _columns(dataset: str, cols: Any, default_min: int | None) -> list[Any]:
    if not isinstance(cols, list) or not cols:
        raise OptionError(f"{dataset}.feature_cols: expected a non-empty list of columns")
    fields: list[Any] = []
    for i, col in enumerate(cols):
        where = f"{dataset}.feature_cols[{i}]"
        if not isinstance(col, dict):
            raise OptionError(f"{where}: expected a mapping (name, type, ...), got {col!r}")
        _refuse(where, set(col), COLUMN_KEYS)
        if col.get("active", True) is False:
            continue
        names = col.get("name")
        names = names if isinstance(names, list) else [names]
        if not names or not all(isinstance(n, str) and n for n in names):
            raise OptionError(f"{where}.name: expected a column name or a list of names, got {col.get('name')!r}")
        if col.get("dtype", "str") not in DTYPES:
            raise OptionError(f"{where}.dtype: expected one of {sorted(DTYPES)}, got {col.get('dtype')!r}")
        kind = col.get("type", "categorical")
        count = col.get("min_categr_count", default_min)
        entry: dict[str, Any] = {} if count is None else {"min_count": count}
        if kind == "sequence":
            for key in ("splitter", "max_len"):
                if key not in col:
                    raise OptionError(f"{where}: a sequence column needs {key}")
            entry.update(kind="sequence", splitter=col["splitter"], keep="first")
            entry["max_len"] = col["max_len"]
        elif kind == "numeric" and "bucketing" in col:
            if "normalizer" in col:
                raise OptionError(f"{where}: bucketing (categorical ids) and normalizer (value x vector) exclude each other")
            entry.update(kind="numeric", bucketing=col["bucketing"])
        elif kind == "numeric":
            if col.get("normalizer") not in NORMALIZERS:
                raise OptionError(f"{where}.normalizer: expected StandardScaler or MinMaxScaler (or none), got {col['normalizer']!r}")
            entry = {"kind": "numeric", "normalizer": NORMALIZERS[col.get("normalizer")]}  # no ids: no min count
        elif kind != "categorical":
            raise OptionError(f"{where}.type: expected categorical, sequence or numeric, got {kind!r}")
        if "normalizer" in col and kind != "numeric":
            raise OptionError(f"{where}.normalizer: only for type numeric")
        for key in ("splitter", "max_len"):
            if key in col and kind != "sequence":
                raise OptionError(f"{where}.{key}: only for type sequence")
        step, source = col.get("preprocess"), col.get("copy_from")
        if step is not None:
            if not isinstance(step, str):
                raise OptionError(f"{where}.preprocess: expected a name, got {step!r}")
            copied = _COPY.match(step)
            if copied:
                source, step = copied.group(1), None
            elif step == "convert_to_bucket":
                entry.update(kind="numeric", bucketing="criteo")
                step = None
            else:
                source = source or FIXED_SOURCE.get(step)
        for name in names:
            field = {"name": name, **entry}
            if step is not None:
                field["preprocess"] = step
            if source is not None and source != name:
                field["copy_from"] = source
            fields.append(field)
    return fields


def fuxictr_to_bars(path: str, dataset_id: str | None = None) -> tuple[tuple[str, str, str], dict[str, Any]]:
    """((train, valid, test) files, bars-csv spec keys: label_col, fields) of a FuxiCTR config."""
    dataset, config = read_config(path, dataset_id)
    _refuse(dataset, set(config), DATASET_KEYS)
    if config.get("data_format", "csv") != "csv":
        raise OptionError(f"{dataset}.data_format: only csv is read here, got {config.get('data_format')!r}")
    base = Path(path).resolve().parent
    files = tuple(_path(config.get(f"{s}_data"), f"{dataset}.{s}_data", base) for s in ("train", "valid", "test"))
    label = config.get("label_col")
    if not isinstance(label, dict):
        raise OptionError(f"{dataset}.label_col: expected {{name: ..., dtype: ...}}, got {label!r}")
    _refuse(f"{dataset}.label_col", set(label), LABEL_KEYS)
    if not isinstance(label.get("name"), str):
        raise OptionError(f"{dataset}.label_col.name: expected a column name, got {label.get('name')!r}")
    default_min = config.get("min_categr_count")  # None: the min_count option (default 1)
    fields = _columns(dataset, config.get("feature_cols"), default_min)
    return files, {"label_col": label["name"], "fields": fields}  # type: ignore[return-value]


def prepare_fuxictr(
    config_path: str, out_url: str, options: Any = None, *, overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None, engine: Any = None, progress: Any = None, **keys: Any,
) -> Any:
    """Prepare the dataset a FuxiCTR dataset_config describes with the bars-csv converter.
    options: FuxiCTROptions (dataset_id, group_col, vocab and layout keys)."""
    from .bars_csv import prepare_bars_csv
    from .options import BarsCsvOptions, FuxiCTROptions

    opts = FuxiCTROptions.build(options, keys)
    files, spec = fuxictr_to_bars(config_path, opts.dataset_id)
    bars = BarsCsvOptions(label_col=spec["label_col"], group_col=opts.group_col, fields=spec["fields"],
                          vocab=opts.vocab, write=opts.write)
    return prepare_bars_csv(*files, out_url, bars, overwrite=overwrite, storage_options=storage_options, engine=engine,
                            progress=progress)
