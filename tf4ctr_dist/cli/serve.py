"""``tf4ctr export``, ``tf4ctr predict`` and ``tf4ctr serve``: a trained model leaves the system.

  tf4ctr export --run RUN --out FILE             one self-contained artifact (tables, dense
                                                 weights, feature spec, vocabularies)
  tf4ctr predict (--run RUN | --model FILE) --data URL... --out URL [--workers N]
                                                 scores -> Parquet (N Ray workers: same file)
  tf4ctr serve FILE [--host 127.0.0.1] [--port 8000]               Ray Serve HTTP endpoint

Light imports only: torch, torchrec and ray load once the arguments are checked.
"""

from __future__ import annotations

import argparse
import json
import sys

PRECISIONS = ("auto", "fp32", "bf16")  # config.INFERENCE_PRECISION (not imported: the CLI stays light)


def add_commands(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "export", help="write a finished run's model as one serving artifact",
        description="Consolidate the run's best checkpoint (tables from any sharding, read in blocks of rows; "
        "dense weights, BatchNorm statistics) with its feature spec and vocabularies into one file (safetensors layout, no pickled code). "
        "Load it with tf4ctr_dist.serving.load(FILE).")
    e.add_argument("--run", required=True, help="the run folder (its config.json and checkpoints/)")
    e.add_argument("--out", required=True, help="the artifact file to write (local path)")
    e.add_argument("--block-mb", type=float, default=256.0,
                   help="tables are read and written in blocks of rows of at most this size (default 256): "
                   "export memory is bounded by it, not by the largest table")
    e.set_defaults(func=run_export)

    p = sub.add_parser(
        "predict", help="score a prepared split or raw logs with a run's model; writes Parquet",
        description="Score a prepared dataset's split (ids as training read them) or raw CSV/TSV/Parquet files "
        "in the run's input columns (mapped through the saved vocabularies). Writes one Parquet file with the row "
        "index, the label (and group) columns and the score, atomically. --workers N spreads the work over N Ray "
        "workers (a local cluster on 127.0.0.1, or --address); the output is the same file, bit for bit.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a finished run folder: its best checkpoint")
    src.add_argument("--model", help="an artifact written by `tf4ctr export`")
    p.add_argument("--data", required=True, nargs="+", metavar="URL",
                   help="a prepared dataset URL, or raw files (.csv/.tsv/.parquet; several: rows numbered on "
                   "across them in this order)")
    p.add_argument("--out", required=True, help="the Parquet file to write (local path or s3://...)")
    p.add_argument("--split", default="test", help="split of a prepared dataset (default: test)")
    p.add_argument("--keep", action="append", default=[], metavar="COL",
                   help="raw input: another column to copy to the output (e.g. an id); repeatable")
    p.add_argument("--columns", metavar="A,B,...",
                   help="raw CSV/TSV without a header line: its columns in order (default: the column order the "
                   "dataset was prepared from, when its manifest recorded it, as criteo and bars-csv do)")
    p.add_argument("--batch-size", type=int, default=65_536)
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the towers' matmuls while scoring (model.inference_precision): auto = the run's "
                   "dense_precision; bf16 roughly doubles CPU speed and moves scores by about 1e-4 (default: the run's setting)")
    p.add_argument("--workers", type=int, default=1,
                   help="Ray workers scoring disjoint shares (default 1: in this process). Parallel: a prepared "
                   "split, Parquet files, several CSV/TSV files (one per file)")
    p.add_argument("--address", help="the Ray cluster to run --workers on (default: $RAY_ADDRESS, else a local "
                   "cluster on 127.0.0.1 for this command)")
    p.set_defaults(func=run_predict)

    s = sub.add_parser(
        "serve", help="serve an exported model over HTTP with Ray Serve (request batching)",
        description="Start a Ray Serve deployment that answers POST / with JSON rows of raw feature values, "
        'e.g. {"rows": [{"user": "u1", "item": "i9"}, ...]} or {"columns": {"user": [...], ...}}, with '
        '{"scores": [...]}. Binds to 127.0.0.1 unless --host says otherwise. Ctrl-C stops it.')
    s.add_argument("model", metavar="FILE", help="an artifact written by `tf4ctr export`")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="model.inference_precision while serving (default: the run's; see predict --precision)")
    s.add_argument("--max-batch-size", type=int, default=64, help="requests scored together (serve.batch)")
    s.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    s.set_defaults(func=run_serve)


def run_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.block_mb > 0:
        parser.error(f"--block-mb must be > 0, got {args.block_mb}")
    from tf4ctr_dist.serving import export_run

    summary = export_run(args.run, args.out, block_bytes=max(1, int(args.block_mb * (1 << 20))))
    print(json.dumps(summary), flush=True)
    return 0


def run_predict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.address and args.workers == 1:
        parser.error("--address runs --workers on a Ray cluster; give --workers N (N > 1) with it")
    columns = None
    if args.columns is not None:
        columns = [c.strip() for c in args.columns.split(",")]
        if not all(columns) or len(set(columns)) != len(columns):
            parser.error(f"--columns: expected distinct names separated by commas, got {args.columns!r}")
    if args.workers > 1:
        from tf4ctr_dist.serving.parallel import predict_on_workers

        summary = predict_on_workers(args.data, args.out, run=args.run, model=args.model, workers=args.workers,
                                     split=args.split, batch_size=args.batch_size, keep=args.keep, columns=columns,
                                     address=args.address, precision=args.precision)
    else:
        from tf4ctr_dist.serving import from_run, load
        from tf4ctr_dist.serving.predict import predict

        scorer = from_run(args.run, precision=args.precision) if args.run else load(args.model, args.precision)
        summary = predict(scorer, args.data, args.out, split=args.split, batch_size=args.batch_size, keep=args.keep,
                          columns=columns)
    print(json.dumps(summary), flush=True)
    return 0


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.replicas < 1 or args.max_batch_size < 1 or args.batch_wait_ms < 0:
        parser.error("--replicas and --max-batch-size must be >= 1, --batch-wait-ms >= 0")
    import os

    if not os.path.isfile(args.model):
        raise FileNotFoundError(f"{args.model}: no such artifact file")
    from tf4ctr_dist.serving.deploy import serve_forever

    serve_forever(args.model, host=args.host, port=args.port, replicas=args.replicas,
                  max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000, precision=args.precision)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
