"""`python -m data_tools prepare FORMAT ... [KEY=VALUE ...]` and `python -m data_tools check URL`.

Credentials for s3:// come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, ...), never from the command line or a spec file, so they cannot end up in shell
history or in the manifest. An S3-compatible endpoint can be given with --endpoint-url or
AWS_ENDPOINT_URL.

Entry point for other front doors: `main(["prepare", ...])` / `main(["check", ...])` returns the
exit status (0 ok; 2 bad usage or options; 1 bad data or storage) and prints one `error:` line on
stderr. Nothing heavy (pyarrow, ray, torch) is imported before the arguments are parsed and the
spec is checked, so `--help` and mistakes answer at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from tf4ctr_dist.data.errors import DataError

from .options import ENGINES, FORMAT_OPTIONS, FORMATS, FormatOptions, OptionError

if TYPE_CHECKING:
    from tf4ctr_dist.data.manifest import Manifest

PROG = "python -m data_tools"
# Spec keys each format accepts (the flat keys of its options class). Unknown keys are errors.
SPEC_KEYS: dict[str, set[str]] = {fmt: set(cls.keys()) for fmt, cls in FORMAT_OPTIONS.items()}
SPLIT_NAMES = ("train", "valid", "test")
BARS_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zst")


class UsageError(Exception):
    """Bad command-line arguments or spec file (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """Raises UsageError instead of printing usage and exiting, so main() returns a status."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def add_prepare_arguments(prep: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `prepare` subcommand's arguments (for reuse by another front door's parser)."""
    prep.add_argument("format", choices=FORMATS)
    prep.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="spec keys (YAML values) over --spec, e.g. min_count=2 split=[0.8,0.1,0.1]; "
        "an unknown key is an error naming the closest valid one",
    )
    prep.add_argument(
        "--input", action="append", default=[], metavar="PATH_OR_URL",
        help="bars-csv: a folder holding train/valid/test.csv, or three files in that order; "
        "kkbox: the KKBox_x1 folder (train/valid/test.csv); avazu, ml-tag: one file (split by the BARS rule) or a folder / three files; "
        "criteo: the raw file, or a folder or glob of day files, or the BARS x4 folder / three files (train/valid/test.csv); movielens: the ML-1M folder (ratings/users/movies.dat); "
        "fuxictr: a FuxiCTR dataset_config YAML (dataset_id=ID picks one); parquet-logs: the folder of dt=YYYY-MM-DD partitions; synthetic: not used",
    )
    prep.add_argument("--out", required=True, metavar="URL", help="dataset root (local path, file://, s3://)")
    prep.add_argument("--spec", metavar="SPEC.yaml", help="converter options (YAML mapping of spec keys)")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="same as a positional KEY=VALUE")
    prep.add_argument(
        "--engine", default="local", choices=ENGINES,
        help="local: this process (streaming); ray: Ray tasks over input shards (same output)",
    )
    prep.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)")
    prep.add_argument("--shard-mb", type=float, metavar="MB", help="--engine ray: input bytes per task (default 64)")
    prep.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    prep.add_argument(
        "--quiet", action="store_true",
        help="no progress lines (by default one every ~2 s on a terminal, ~30 s in a log; the final line stays)",
    )
    prep.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials from the environment)")
    return prep


def add_check_arguments(chk: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `check` subcommand's arguments (for reuse by another front door's parser)."""
    chk.add_argument("url")
    chk.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials from the environment)")
    chk.add_argument("--quiet", action="store_true")
    return chk


PREPARE_HELP = "convert raw data (or generate synthetic data) into a prepared dataset"
CHECK_HELP = "validate a dataset against its manifest; exit 0 only when sound"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The parser of `prepare` and `check` (its parse errors raise UsageError). Parse with
    `parse_args(argv, parser)`: it also takes KEY=VALUE words placed after options."""
    p = _Parser(prog=prog, description="Prepare a dataset (convert raw data or generate synthetic data), or check one against its manifest.")
    sub = p.add_subparsers(dest="command", required=True)
    add_prepare_arguments(sub.add_parser("prepare", help=PREPARE_HELP, description=PREPARE_HELP))
    add_check_arguments(sub.add_parser("check", help=CHECK_HELP, description=CHECK_HELP))
    return p


def parse_args(argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """argv -> namespace; KEY=VALUE words anywhere after `prepare FORMAT` join `overrides`."""
    parser = parser or build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or getattr(args, "command", None) != "prepare"]
    if stray:
        raise UsageError(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Run `prepare` or `check`; returns the exit status (see the module docstring). `prog`:
    the command name that help and usage errors show (e.g. "tf4ctr")."""
    from tf4ctr_dist.data.storage import StorageUnavailable  # here: fsspec stays out of `import data_tools.cli`

    options: dict[str, Any] | None = None
    argv = list(sys.argv[1:] if argv is None else argv)
    # "tf4ctr prepare: error: ...", as the front door's other commands say it
    where = f"{prog} {argv[0]}" if argv and argv[0] in ("prepare", "check") else prog
    try:
        try:
            args = parse_args(argv, build_parser(prog))
        except SystemExit as exc:  # --help / --version: argparse printed and wants to exit
            return exc.code if isinstance(exc.code, int) else 0
        options = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
        if args.command == "prepare":
            return _prepare(args, options)
        return _check(args, options)
    except (UsageError, OptionError) as exc:
        _error(where, str(exc), options)
        return 2
    except (DataError, StorageUnavailable) as exc:
        _error(where, str(exc), options)
        return 1


def _error(where: str, message: str, options: Mapping[str, Any] | None) -> None:
    from tf4ctr_dist.data.storage import redact

    print(f"{where}: error: {redact(message, options)}", file=sys.stderr)


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's multi-line message as one line: what, and where (line, column)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    import yaml

    spec: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{item!r}: expected KEY=VALUE")
        try:
            spec[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UsageError(f"{item!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    return spec


def load_spec(path: str | None, overrides: Sequence[str], fmt: str) -> dict[str, Any]:
    """Spec file + KEY=VALUE overrides as one flat mapping (keys not checked; see load_options)."""
    import yaml

    spec: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read spec file {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"spec file {path} is not valid YAML ({_yaml_problem(exc)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UsageError(f"spec file {path}: expected a mapping of options, got {type(loaded).__name__}")
        spec.update(loaded or {})
    spec.update(_parse_overrides(overrides))
    return spec


def load_options(path: str | None, overrides: Sequence[str], fmt: str) -> FormatOptions:
    """Spec file + KEY=VALUE overrides -> the format's typed options (OptionError when wrong)."""
    spec = load_spec(path, overrides, fmt)
    cls = FORMAT_OPTIONS[fmt]
    if fmt == "synthetic" and "rows" not in spec and set(spec) <= SPEC_KEYS[fmt]:
        raise UsageError("synthetic needs a row count: rows=N (or rows: in --spec)")
    return cls.parse(spec, where="(in --spec or as KEY=VALUE)")


def _one_input(fmt: str, inputs: list[str], what: str) -> str:
    if len(inputs) != 1:
        raise UsageError(f"{fmt} needs exactly one --input ({what}); got {len(inputs)}")
    return inputs[0]


def _bars_inputs(inputs: list[str], options: dict | None) -> list[str]:
    from tf4ctr_dist.data.storage import resolve

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


def _one_or_three(fmt: str, inputs: list[str], options: dict | None) -> list[str]:
    """One file (split by the format's rule), or a folder / three files (train, valid, test)."""
    from tf4ctr_dist.data.storage import resolve

    if len(inputs) == 1:
        loc = resolve(inputs[0], options)
        if not loc.fs.isdir(loc.path()):
            return inputs
    return _bars_inputs(inputs, options)


def _criteo_inputs(inputs: list[str], options: dict | None) -> str | list[str]:
    """Three files, or a folder holding train.csv (the BARS x4 CSVs) -> the three x4 files;
    else one raw file, folder of day files or glob."""
    from tf4ctr_dist.data.storage import resolve

    if len(inputs) == 3:
        return inputs
    path = _one_input("criteo", inputs, "the raw file, a folder or glob of day files, or the x4 folder / three x4 CSVs")
    loc = resolve(path, options)
    if loc.fs.isdir(loc.path()) and any(loc.fs.exists(loc.path("train" + suffix)) for suffix in BARS_SUFFIXES):
        return _bars_inputs([path], options)
    return path


def _prepare(args: argparse.Namespace, options: dict | None) -> int:
    from .progress import Progress

    opts: Any = load_options(args.spec, [*args.overrides, *args.set], args.format)
    # Started here, so the first line's timer runs from the start of the command.
    progress = Progress.silent() if args.quiet else Progress()
    common: dict[str, Any] = dict(overwrite=args.overwrite, storage_options=options, progress=progress)
    run: Callable[[Any], Manifest]
    if args.format == "bars-csv":
        from .bars_csv import prepare_bars_csv

        train, valid, test = _bars_inputs(args.input, options)
        run = lambda engine: prepare_bars_csv(train, valid, test, args.out, opts, **common, engine=engine)  # noqa: E731
    elif args.format == "criteo":
        from .criteo import prepare_criteo

        crit: Any = _criteo_inputs(args.input, options)
        run = lambda engine: prepare_criteo(crit, args.out, opts, **common, engine=engine)  # noqa: E731
    elif args.format == "movielens":
        from .movielens import prepare_movielens

        path = _one_input("movielens", args.input, "the ML-1M folder")
        run = lambda engine: prepare_movielens(path, args.out, opts, **common, engine=engine)  # noqa: E731
    elif args.format == "kkbox":
        from .bars_sets import prepare_kkbox

        train, valid, test = _bars_inputs(args.input, options)
        run = lambda engine: prepare_kkbox(train, valid, test, args.out, opts, **common, engine=engine)  # noqa: E731
    elif args.format in ("avazu", "ml-tag"):
        from .bars_sets import prepare_avazu, prepare_ml_tag

        files = _one_or_three(args.format, args.input, options)
        convert = prepare_avazu if args.format == "avazu" else prepare_ml_tag
        run = lambda engine: convert(files, args.out, opts, **common, engine=engine)  # noqa: E731
    elif args.format == "fuxictr":
        from .fuxictr import prepare_fuxictr

        config = _one_input("fuxictr", args.input, "the FuxiCTR dataset_config YAML")
        run = lambda engine: prepare_fuxictr(config, args.out, opts, **common, engine=engine)  # noqa: E731
    elif args.format == "parquet-logs":
        from .parquet_logs import prepare_parquet_logs

        path = _one_input("parquet-logs", args.input, "the folder of partitions")
        run = lambda engine: prepare_parquet_logs(path, args.out, opts, **common, engine=engine)  # noqa: E731
    else:
        from .synthetic import generate_synthetic

        if args.input:
            raise UsageError("synthetic takes no --input (set rows etc. as KEY=VALUE, e.g. rows=100000)")
        run = lambda engine: generate_synthetic(args.out, opts, **common, engine=engine)  # noqa: E731
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
    from tf4ctr_dist.data.storage import redact, refuse_credentials

    from .check import check_dataset

    refuse_credentials(args.url, "dataset URL")  # before it is echoed in any line below
    progress = None if args.quiet else (lambda msg: print(f"checking {msg}", flush=True))
    report = check_dataset(args.url, options, progress=progress)

    for warning in report.warnings:
        print(f"warning: {redact(warning, options)}")
    for problem in report.problems:
        print(f"problem: {redact(problem, options)}")
    if report.ok:
        print(f"OK: {report.url}: {report.rows_checked:,} rows, checksums, schema and id ranges match the manifest")
        for line in report.table1():
            print(f"  {line}")
        return 0
    print(f"FAILED: {report.url}: {len(report.problems)} problem(s)")
    return 1
