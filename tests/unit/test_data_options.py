"""Typed converter options (data_tools.options) and the CLI's KEY=VALUE syntax."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.cli import build_parser, main, parse_args
from data_tools.criteo import prepare_criteo
from data_tools.options import (
    FORMAT_OPTIONS,
    CriteoOptions,
    OptionError,
    ParquetLogsOptions,
    SyntheticOptions,
    VocabOptions,
    WriteOptions,
)
from data_tools.synthetic import generate_synthetic
from tests.data_helpers import tiny_bars

REPO = Path(__file__).resolve().parents[2]


def test_flat_keys_land_in_their_groups_over_the_format_defaults() -> None:
    opts = CriteoOptions.parse({"min_count": 3, "split": [0.7, 0.2, 0.1], "row_groups_per_part": 4})
    assert opts.vocab == VocabOptions(min_count=3)
    assert opts.splits.split == (0.7, 0.2, 0.1) and opts.splits.seed == 2018
    assert opts.write == WriteOptions(row_group_rows=65_536, row_groups_per_part=4)
    # Per-format defaults: criteo counts with min_count 10, movielens 2, bars-csv 2.
    assert CriteoOptions.parse({}).vocab.min_count == 10
    assert FORMAT_OPTIONS["movielens"].parse({}).vocab.min_count == 2
    assert FORMAT_OPTIONS["bars-csv"].parse({}).vocab.min_count == 2
    assert SyntheticOptions.parse({"rows": 5}).splits.seed == 0
    # Overrides over a base keep the base's other values; flat() inverts parse().
    base = CriteoOptions.parse({"seed": 9})
    assert CriteoOptions.parse({"min_count": 2}, base=base).splits.seed == 9
    assert CriteoOptions.parse(opts.flat()) == opts


def test_every_format_shares_the_groups() -> None:
    keys = {fmt: set(cls.keys()) for fmt, cls in FORMAT_OPTIONS.items()}
    layout = {"row_group_rows", "row_groups_per_part"}
    vocab = {"min_count", "vocab_mode", "buckets", "field_options", "vocab_memory_mb"}
    assert all(layout <= k for k in keys.values())
    assert all(vocab <= k for fmt, k in keys.items() if fmt != "synthetic")
    assert keys["criteo"] == layout | vocab | {"split", "seed", "split_rule"}
    assert keys["parquet-logs"] - layout - vocab == {
        "label", "group", "fields", "train_dates", "valid_dates", "test_dates", "partition_key",
    }


def test_unknown_key_names_the_closest_and_lists_the_valid_ones() -> None:
    with pytest.raises(OptionError) as info:
        CriteoOptions.parse({"min_cont": 2})
    msg = str(info.value)
    assert "'min_cont'" in msg and "did you mean 'min_count'?" in msg
    assert "valid keys: buckets, field_options, min_count, row_group_rows" in msg
    with pytest.raises(OptionError, match="did you mean 'row_group_rows'"):
        prepare_criteo("unused.tsv", "unused-out", row_group_rws=10)  # keyword arguments: same check
    with pytest.raises(OptionError, match="parquet-logs needs fields, train_dates"):
        ParquetLogsOptions.parse({"label": "click"})


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"min_count": 0}, "min_count must be >= 1, got 0"),
        ({"min_count": "2"}, "min_count must be >= 1, got '2'"),
        ({"vocab_mode": "hash"}, "vocab_mode should be one of ['counted', 'hashed'], got 'hash'"),
        ({"split": [0.5, 0.5, 0.5]}, "split must be three non-negative fractions summing to 1"),
        ({"split": 0.8}, "split must be three"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"row_group_rows": 0}, "row_group_rows must be a positive integer, got 0"),
        ({"vocab_memory_mb": -1}, "vocab_memory_mb must be a positive number"),
    ],
)
def test_bad_values_are_refused_before_any_input_is_read(spec: dict, message: str) -> None:
    with pytest.raises(OptionError) as info:
        CriteoOptions.parse(spec)
    assert message in str(info.value)


def test_options_object_and_keywords_write_identical_datasets(tmp_path: Path) -> None:
    kwargs = dict(rows=900, fields=3, vocab_sizes=[7, 9, 11], seed=4, row_group_rows=100, row_groups_per_part=2)
    a = generate_synthetic(str(tmp_path / "a"), **kwargs)
    typed = SyntheticOptions.parse(kwargs)
    b = generate_synthetic(str(tmp_path / "b"), typed)
    c = generate_synthetic(str(tmp_path / "c"), typed, seed=5)  # keyword over an options object
    shas = lambda m: [p.sha256 for s in m.splits.values() for p in s.parts]  # noqa: E731
    assert shas(a) == shas(b) and len(shas(a)) == 6  # 9 row groups of 100 over splits, 2 per part
    assert shas(c) != shas(a) and c.spec["seed"] == 5
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_positional_key_value_anywhere_after_the_format(tmp_path: Path) -> None:
    tiny_bars(tmp_path / "in")
    out = tmp_path / "ds"
    argv = ["prepare", "bars-csv", "group_col=u", "--input", str(tmp_path / "in"), "min_count=1",
            "--out", str(out), "row_group_rows=16", "--set", "row_groups_per_part=2"]
    assert main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["group"] == "u" and m["spec"]["min_count"] == 1 and m["spec"]["row_group_rows"] == 16
    assert all(len(p["row_groups"]) <= 2 for s in m["splits"].values() for p in s["parts"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "criteo", "--input", "x.tsv", "--out", "X", "min_cont=3"], "did you mean 'min_count'?"),
        (["prepare", "synthetic", "--out", "X", "rows=-5"], "rows must be >= 1, got -5"),
        (["prepare", "synthetic", "--out", "X", "rows=10", "--bogus"], "unrecognized arguments: --bogus"),
        (["prepare", "synthetic", "--out", "X", "rows=10", "split=[1"], "not valid YAML"),
        (["prepare", "movielens", "--input", "m", "--out", "X", "vocab_mode=hash"], "vocab_mode should be one of"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [str(tmp_path / "o") if a == "X" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m data_tools {argv[0]}: error: ") and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_help_returns_0_and_the_parser_is_reusable(capsys: pytest.CaptureFixture) -> None:
    assert main(["prepare", "--help"]) == 0
    text = capsys.readouterr().out
    assert "KEY=VALUE" in text and "--engine" in text
    parser = build_parser(prog="tf4ctr")
    args = parse_args(["prepare", "criteo", "min_count=2", "--input", "a", "--out", "b", "seed=3"], parser)
    assert (args.command, args.format, args.overrides) == ("prepare", "criteo", ["min_count=2", "seed=3"])


def test_cli_import_is_light() -> None:
    """`--help` must not pay for pyarrow, ray or torch: none is imported with the CLI module."""
    code = (
        "import sys, data_tools.cli\n"
        "heavy = [m for m in ('pyarrow', 'ray', 'torch', 'torchrec', 'numpy', 'pandas', 'fsspec') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
