"""``tf4ctr``: the one front door.

  tf4ctr prepare FORMAT --input ... --out URL [key=value ...]   raw logs -> Parquet + manifest
  tf4ctr check URL                                               verify a prepared dataset
  tf4ctr train [--data URL | --train/--valid/--test CSV] [key=value ...]
  tf4ctr retrain --from RUN (--data URL | --logs DIR --spec FILE) [key=value ...]
  tf4ctr plan (--manifest URL | --vocab-sizes ... | ...) --gpus N   offline sharding plan

Every command takes settings as ``key=value`` after its options. This module and the command
modules it registers import only the standard library and the typed config, so ``--help`` and
mistakes answer in well under a second; torch, torchrec and ray are imported once a command
has checked its arguments. Expected failures (bad config, data or placement) print one line
``tf4ctr COMMAND: error: ...`` and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from tf4ctr_dist.cli import data, plan, serve, studies, train

EXIT_USAGE = 2  # bad arguments or configuration (argparse's code)
EXIT_FAILED = 1  # bad data, or the run failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tf4ctr",
        description="TF4CTR on TorchRec + Ray Train: prepare data, train, retrain, plan a cluster.",
        epilog="`tf4ctr COMMAND --help` describes each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    data.add_commands(sub)
    train.add_commands(sub)
    plan.add_commands(sub)
    serve.add_commands(sub)
    studies.add_commands(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run one command; returns its exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = parser.parse_known_args(argv)  # which command (top-level --help and a missing command end here)
    command_parser = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    if command_parser.prefix_chars != "\0":  # prepare/check hand their arguments to data_tools unparsed
        # Again on the command's own parser, so options, the positionals and key=value settings
        # may come in any order (`sweep FILE --out DIR epochs=5`), and a mistake is reported by
        # the command with its usage ("tf4ctr train: error: unrecognized arguments: ...").
        command = args.command
        args = command_parser.parse_intermixed_args(argv[argv.index(command) + 1:])
        args.command = command
    return run_guarded(args.func, args, command_parser)


def run_guarded(func, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Call a command; the errors a user can fix become one line on stderr and an exit code."""
    from tf4ctr_dist.config import ConfigError
    from tf4ctr_dist.data.errors import DataError
    from tf4ctr_dist.data.storage import StorageUnavailable
    from tf4ctr_dist.distributed.placement import ShardingError

    try:
        return int(func(args, parser) or 0)
    except (ConfigError, ShardingError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except (DataError, FileNotFoundError, StorageUnavailable) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr, flush=True)
        return 130


def run_job(command: str, argv: Optional[list[str]] = None, defaults: tuple[str, ...] = ()) -> None:
    """What a jobs/ script does: ``tf4ctr COMMAND [defaults] ARGV`` and exit with its code.

    ``defaults`` come before the user's arguments, so a later option of the same name wins."""
    sys.exit(main([command, *defaults, *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
