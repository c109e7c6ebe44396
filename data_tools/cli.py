"""`python -m data_tools prepare FORMAT ...` and `python -m data_tools check URL`.

Credentials for s3:// come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, ...), never from the command line or a spec file, so they cannot end up in shell
history or in the manifest. An S3-compatible endpoint can be given with --endpoint-url or
AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import Manifest
from tf4ctr_dist.data.storage import redact, resolve

from .engine import ENGINES

FORMATS = ("bars-csv", "criteo", "movielens", "parquet-logs", "synthetic")

# Spec keys each format accepts (= keyword arguments of its converter). Unknown keys are errors.
_VOCAB_KEYS = {"min_count", "vocab_mode", "buckets", "field_options", "vocab_memory_mb"}
_LAYOUT_KEYS = {"row_group_rows", "row_groups_per_part"}
SPEC_KEYS: dict[str, set[str]] = {
    "bars-csv": {"label_col", "group_col", "fields"} | _VOCAB_KEYS | _LAYOUT_KEYS,
    "criteo": {"split", "seed"} | _VOCAB_KEYS | _LAYOUT_KEYS,
    "movielens": {"split", "seed"} | _VOCAB_KEYS | _LAYOUT_KEYS,
    "parquet-logs": {
        "label", "group", "fields", "train_dates", "valid_dates", "test_dates", "partition_key",
    } | _VOCAB_KEYS | _LAYOUT_KEYS,
    "synthetic": {
        "rows", "fields", "vocab_sizes", "scale_vocab", "power_law", "positive_rate", "seed", "split",
    } | _LAYOUT_KEYS,
}
REQUIRED_KEYS = {"parquet-logs": ("label", "fields", "train_dates")}
SPLIT_NAMES = ("train", "valid", "test")
BARS_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zst")


class UsageError(Exception):
    """Bad command-line arguments or spec file (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="convert raw data (or generate synthetic data) into a prepared dataset")
    prep.add_argument("format", choices=FORMATS)
    prep.add_argument(
        "--input", action="append", default=[], metavar="PATH_OR_URL",
        help="bars-csv: a folder holding train/valid/test.csv, or three files in that order; "
        "criteo: the raw file, or a folder or glob of day files; movielens: the ML-1M folder (ratings/users/movies.dat); "
        "parquet-logs: the folder of dt=YYYY-MM-DD partitions; synthetic: not used",
    )
    prep.add_argument("--out", required=True, metavar="URL", help="dataset root (local path, file://, s3://)")
    prep.add_argument("--spec", metavar="SPEC.yaml", help="converter options (YAML mapping; an unknown key is an error listing the valid ones)")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one spec key (YAML value)")
    prep.add_argument(
        "--engine", default="local", choices=ENGINES,
        help="local: this process (streaming); ray: Ray tasks over input shards (same output)",
    )
    prep.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)")
    prep.add_argument("--shard-mb", type=float, metavar="MB", help="--engine ray: input bytes per task (default 64)")
    prep.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    prep.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials from the environment)")

    chk = sub.add_parser("check", help="validate a dataset against its manifest; exit 0 only when sound")
    chk.add_argument("url")
    chk.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials from the environment)")
    chk.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
    try:
        if args.command == "prepare":
            return _prepare(args, options)
        return _check(args, options)
    except UsageError as exc:
        print(f"error: {redact(str(exc), options)}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"error: {redact(str(exc), options)}", file=sys.stderr)
        return 1


def load_spec(path: str | None, overrides: list[str], fmt: str) -> dict[str, Any]:
    """Spec file + KEY=VALUE overrides, restricted to the keys `fmt` understands."""
    spec: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read spec file {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"spec file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UsageError(f"spec file {path}: expected a mapping of options, got {type(loaded).__name__}")
        spec.update(loaded or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        spec[key.strip()] = yaml.safe_load(value)
    unknown = sorted(set(spec) - SPEC_KEYS[fmt])
    if unknown:
        raise UsageError(f"unknown spec key(s) for {fmt}: {unknown}; allowed: {sorted(SPEC_KEYS[fmt])}")
    missing = [key for key in REQUIRED_KEYS.get(fmt, ()) if key not in spec]
    if missing:
        raise UsageError(f"{fmt} needs {', '.join(missing)} in --spec (or --set KEY=VALUE)")
    if "split" in spec:
        if not isinstance(spec["split"], (list, tuple)):
            raise UsageError(f"split: expected three fractions, got {spec['split']!r}")
        spec["split"] = tuple(spec["split"])
    return spec


def _one_input(fmt: str, inputs: list[str], what: str) -> str:
    if len(inputs) != 1:
        raise UsageError(f"{fmt} needs exactly one --input ({what}); got {len(inputs)}")
    return inputs[0]


def _bars_inputs(inputs: list[str], options: dict | None) -> list[str]:
    if len(inputs) == 3:
        return inputs
    if len(inputs) != 1:
        raise UsageError(f"bars-csv needs --input FOLDER or three --input files (train, valid, test); got {len(inputs)}")
    loc = resolve(inputs[0], options)
    if not loc.fs.isdir(loc.path()):
        raise DataError(f"--input {loc.url}: not a folder (give a folder with train/valid/test.csv, or three files)")
    found = []
    for split in SPLIT_NAMES:
        for suffix in BARS_SUFFIXES:
            if loc.fs.exists(loc.path(split + suffix)):
                found.append(inputs[0].rstrip("/") + "/" + split + suffix)
                break
        else:
            raise DataError(f"--input {loc.url}: no {split}.csv (or compressed variant) in the folder")
    return found


def _prepare(args: argparse.Namespace, options: dict | None) -> int:
    spec = load_spec(args.spec, args.set, args.format)
    common: dict[str, Any] = dict(overwrite=args.overwrite, storage_options=options)
    run: Callable[[Any], Manifest]
    if args.format == "bars-csv":
        from .bars_csv import prepare_bars_csv

        train, valid, test = _bars_inputs(args.input, options)
        run = lambda engine: prepare_bars_csv(train, valid, test, args.out, **spec, **common, engine=engine)  # noqa: E731
    elif args.format == "criteo":
        from .criteo import prepare_criteo

        path = _one_input("criteo", args.input, "the raw file, or a folder or glob of files")
        run = lambda engine: prepare_criteo(path, args.out, **spec, **common, engine=engine)  # noqa: E731
    elif args.format == "movielens":
        from .movielens import prepare_movielens

        path = _one_input("movielens", args.input, "the ML-1M folder")
        run = lambda engine: prepare_movielens(path, args.out, **spec, **common, engine=engine)  # noqa: E731
    elif args.format == "parquet-logs":
        from .parquet_logs import prepare_parquet_logs

        path = _one_input("parquet-logs", args.input, "the folder of partitions")
        run = lambda engine: prepare_parquet_logs(path, args.out, **spec, **common, engine=engine)  # noqa: E731
    else:
        from .synthetic import generate_synthetic

        if args.input:
            raise UsageError("synthetic takes no --input (set rows etc. with --spec or --set rows=N)")
        if "rows" not in spec:
            raise UsageError("synthetic needs a row count: --set rows=N (or rows: in --spec)")
        run = lambda engine: generate_synthetic(args.out, **spec, **common, engine=engine)  # noqa: E731
    if args.shard_mb is not None and args.shard_mb <= 0:
        raise UsageError(f"--shard-mb must be > 0, got {args.shard_mb}")
    from .engine import make_engine

    started = time.monotonic()
    with make_engine(args.engine, address=args.ray_address, shard_mb=args.shard_mb) as engine:
        try:
            manifest = run(engine)
        except TypeError as exc:  # a spec value of the wrong type reaching the converter
            raise UsageError(f"bad spec value: {exc}") from None
    seconds = time.monotonic() - started
    rows = {name: info.rows for name, info in manifest.splits.items()}
    total = sum(rows.values())
    print(f"wrote {args.out} in {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} rows/s, engine {args.engine}): "
          f"rows {rows}; {len(manifest.fields)} fields, {sum(f.vocab_size for f in manifest.fields):,} embedding rows")
    return 0


def _check(args: argparse.Namespace, options: dict | None) -> int:
    from .check import check_dataset

    progress = None if args.quiet else (lambda msg: print(f"checking {msg}", flush=True))
    report = check_dataset(args.url, options, progress=progress)
    for warning in report.warnings:
        print(f"warning: {redact(warning, options)}")
    for problem in report.problems:
        print(f"problem: {redact(problem, options)}")
    if report.ok:
        print(f"OK: {report.url}: {report.rows_checked:,} rows, checksums, schema and id ranges match the manifest")
        return 0
    print(f"FAILED: {report.url}: {len(report.problems)} problem(s)")
    return 1
