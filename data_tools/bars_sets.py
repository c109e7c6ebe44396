"""The BARS datasets with fixed field lists, as the TF4CTR authors (FuxiCTR dataset configs) had
them; each is a bars-csv source with its fields, derivations and group set here.

- kkbox (KKBox_x1, BARS CSVs train/valid/test.csv, label column `label`): 9 categorical fields,
  genre_ids and artist_name as `|`-separated sequences (max_len 3, the first 3 items kept as
  FuxiCTR truncates; mean-pooled by the model), isrc -> country code (first two characters) and
  bd -> age bucket (data_tools.derive); gAUC grouped by msno; min count 2.
- avazu (Avazu_x4): every raw column but id and the label `click`; `hour` (YYMMDDHH) becomes the
  hour of day, and two fields are derived from it: weekday and weekend; min count 2. One raw
  file is split by BARS x4's rule (10 stratified folds, seed 2018, folds 8:1:1).
- ml-tag (MovielensLatest_x1): user_id, item_id, tag_id; gAUC by user_id; min count 2; one file
  is split exactly 7:2:1 (data_tools.splits.exact_split).
"""

from __future__ import annotations

from typing import Any, Mapping

from tf4ctr_dist.data.manifest import Manifest

from .bars_csv import BarsSource
from .criteo import check_split
from .engine import Engine
from .options import AvazuOptions, KKBoxOptions, MLTagOptions
from .pipeline import prepare
from .progress import Progress

KKBOX_CATEGORICAL = [
    "msno", "song_id", "source_system_tab", "source_screen_name", "source_type", "city", "gender",
    "registered_via", "language",
]
KKBOX_FIELDS: list[Any] = [
    *KKBOX_CATEGORICAL,
    {"name": "genre_ids", "kind": "sequence", "max_len": 3, "splitter": "|", "keep": "first"},
    {"name": "artist_name", "kind": "sequence", "max_len": 3, "splitter": "|", "keep": "first"},
    {"name": "isrc", "preprocess": "extract_country_code"},
    {"name": "bd", "preprocess": "bucketize_age"},
]
AVAZU_RAW = [
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    *(f"C{i}" for i in range(14, 22)),
]
AVAZU_FIELDS: list[Any] = [
    {"name": "hour", "preprocess": "convert_hour"},
    *AVAZU_RAW,
    {"name": "weekday", "copy_from": "hour", "preprocess": "convert_weekday"},
    {"name": "weekend", "copy_from": "hour", "preprocess": "convert_weekend"},
]
ML_TAG_FIELDS = ["user_id", "item_id", "tag_id"]


def _run(source: BarsSource, out_url: str, opts: Any, engine: Engine | None, overwrite: bool,
         storage_options: Mapping[str, Any] | None, progress: Progress | None) -> Manifest:
    return prepare(
        source, out_url, opts.write, engine=engine, overwrite=overwrite, storage_options=storage_options,
        vocab_memory_mb=opts.vocab.vocab_memory_mb, progress=progress,
    )


def prepare_kkbox(
    train: str, valid: str, test: str, out_url: str, options: KKBoxOptions | None = None, *,
    overwrite: bool = False, storage_options: Mapping[str, Any] | None = None, engine: Engine | None = None,
    progress: Progress | None = None, **keys: Any,
) -> Manifest:
    """KKBox_x1 from the three BARS CSVs (see the module docstring)."""
    opts = KKBoxOptions.build(options, keys)
    source = BarsSource(
        (train, valid, test), opts.label_col, "msno", KKBOX_FIELDS, opts.vocab.field_defaults(), storage_options,
        created_by="data_tools.bars_sets", spec_format="kkbox",
    )
    return _run(source, out_url, opts, engine, overwrite, storage_options, progress)


def prepare_avazu(
    inputs: list[str], out_url: str, options: AvazuOptions | None = None, *,
    overwrite: bool = False, storage_options: Mapping[str, Any] | None = None, engine: Engine | None = None,
    progress: Progress | None = None, **keys: Any,
) -> Manifest:
    """Avazu_x4 from the raw train.csv (one input: split by split_rule) or the BARS x4
    train/valid/test.csv (three inputs)."""
    opts = AvazuOptions.build(options, keys)
    one = (opts.split_rule, check_split(opts.splits.split), opts.splits.seed) if len(inputs) == 1 else None
    source = BarsSource(
        tuple(inputs), opts.label_col, None, AVAZU_FIELDS, opts.vocab.field_defaults(), storage_options,  # type: ignore[arg-type]
        created_by="data_tools.bars_sets", spec_format="avazu", one_file_split=one,
    )
    return _run(source, out_url, opts, engine, overwrite, storage_options, progress)


def prepare_ml_tag(
    inputs: list[str], out_url: str, options: MLTagOptions | None = None, *,
    overwrite: bool = False, storage_options: Mapping[str, Any] | None = None, engine: Engine | None = None,
    progress: Progress | None = None, **keys: Any,
) -> Manifest:
    """MovielensLatest_x1 from one file (split exactly 7:2:1) or three (train, valid, test)."""
    opts = MLTagOptions.build(options, keys)
    one = ("exact", check_split(opts.splits.split), opts.splits.seed) if len(inputs) == 1 else None
    source = BarsSource(
        tuple(inputs), opts.label_col, "user_id", ML_TAG_FIELDS, opts.vocab.field_defaults(), storage_options,  # type: ignore[arg-type]
        created_by="data_tools.bars_sets", spec_format="ml-tag", one_file_split=one,
    )
    return _run(source, out_url, opts, engine, overwrite, storage_options, progress)
