"""``tf4ctr prepare`` and ``tf4ctr check``: the dataset tools of data_tools/, behind the front door.

The arguments go unchanged to ``data_tools.cli`` (which owns them, their help and their errors),
so ``tf4ctr prepare ...`` and ``python -m data_tools prepare ...`` are the same command. The front
door is the one place in the package that imports data_tools: the library itself never does
(tests/unit/test_import_direction.py).
"""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    for name, summary in (
        ("prepare", "raw logs (criteo, avazu, kkbox, movielens, ml-tag, bars-csv, fuxictr, parquet-logs, synthetic) -> Parquet"),
        ("check", "re-read a prepared dataset: checksums, schema, ids, vocabularies"),
    ):
        p = sub.add_parser(name, help=summary, add_help=False, prefix_chars="\0")
        p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=_forward(name))


def _forward(command: str):
    def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
        import os

        # Arrow's jemalloc pool returns freed memory sooner (see data_tools/__main__.py); set
        # before pyarrow first allocates.
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
        from data_tools import cli

        return int(cli.main([command, *args.args], prog="tf4ctr") or 0)

    return run
