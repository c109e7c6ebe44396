"""Command-line front ends behind the thin scripts in jobs/.

train_bars: any BARS-style dataset (CSV files, prepared on the fly, or a prepared Parquet URL).
criteo_full: a Criteo-shaped prepared dataset; with no --data it generates a synthetic one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

import fsspec

from tf4ctr_dist.config import ConfigError, RunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/JSON config file (defaults: the job's preset)")
    p.add_argument("--workers", type=int, help="number of Ray Train workers (cluster.workers)")
    p.add_argument("--seed", type=int, help="random seed (train.seed)")
    p.add_argument("--out", help="run folder (local path or URL); default runs/<name>-<time>")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. alpha=0.25 easy_hidden_units=[400,400]")


def _apply_common(cfg: RunConfig, args: argparse.Namespace, name: str) -> RunConfig:
    extra: dict = {"name": name}
    if args.workers is not None:
        extra["cluster.workers"] = args.workers
    if args.seed is not None:
        extra["train.seed"] = args.seed
    if args.gpu:
        extra["cluster.use_gpu"] = True
    if args.ray_address:
        extra["cluster.ray_address"] = args.ray_address
    extra["out"] = args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg.with_overrides(extra).with_overrides(args.overrides)


def _has_manifest(url: str) -> bool:
    fs, root = fsspec.core.url_to_fs(url)
    return fs.exists(f"{root.rstrip('/')}/manifest.json")


def _print_result(result: dict) -> None:
    for split in ("valid", "test"):
        if split in result:
            metrics = " ".join(f"{k}={v:.6f}" for k, v in result[split].items() if isinstance(v, float))
            print(f"[tf4ctr] {split:5s} {metrics}")


def train_bars(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="train_bars", description="Train TF4CTR on a BARS-style dataset.")
    p.add_argument("--train", help="train CSV (file or URL)")
    p.add_argument("--valid", help="valid CSV")
    p.add_argument("--test", help="test CSV")
    p.add_argument("--data", help="an already prepared Parquet dataset (URL with manifest.json)")
    p.add_argument("--group-col", help="column that defines gAUC groups (e.g. user)")
    p.add_argument("--label-col", default="label")
    p.add_argument("--min-count", type=int, default=2)
    _common_args(p)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config or CONFIGS / "frappe_x1.yaml")
        cfg = _apply_common(cfg, args, "bars")
    except ConfigError as e:
        p.error(str(e))
    if args.data:
        data_url = args.data
    else:
        if not (args.train and args.valid and args.test):
            p.error("give --train, --valid and --test CSV files, or --data with a prepared dataset")
        from data_tools.bars_csv import prepare_bars_csv

        data_url = cfg.out.rstrip("/") + "/dataset"
        if _has_manifest(data_url):
            print(f"[tf4ctr] reusing prepared dataset at {data_url}", flush=True)
        else:
            print(f"[tf4ctr] preparing {args.train}, {args.valid}, {args.test} -> {data_url}", flush=True)
            prepare_bars_csv(
                args.train, args.valid, args.test, data_url,
                label_col=args.label_col, group_col=args.group_col, min_count=args.min_count,
            )
    cfg = cfg.with_overrides({"data.url": data_url})
    return _launch(cfg)


def criteo_full_parser() -> argparse.ArgumentParser:
    """The command line of jobs/criteo_full.py (also used to check cluster/ job specs)."""
    p = argparse.ArgumentParser(
        prog="criteo_full",
        description="Train TF4CTR on a prepared Criteo-shaped dataset. Without --data, generates a "
        "synthetic Criteo-shaped dataset (fixed seed) and trains on it with 2 local workers.",
    )
    p.add_argument("--data", help="prepared Parquet dataset URL (local path, file:// or s3://)")
    p.add_argument("--synthetic-rows", type=int, default=1_000_000, help="rows of the generated demo dataset")
    p.add_argument("--synthetic-scale-vocab", type=float, default=0.1,
                   help="vocabulary scale of the demo dataset (1.0: ~930k rows per table set)")
    _common_args(p)
    return p


def criteo_full(argv: Optional[list[str]] = None) -> dict:
    p = criteo_full_parser()
    args = p.parse_args(argv)
    preset = "criteo_x4.yaml" if args.data else "demo.yaml"
    try:
        cfg = load_config(args.config or CONFIGS / preset)
        cfg = _apply_common(cfg, args, "criteo")
    except ConfigError as e:
        p.error(str(e))
    data_url = args.data
    if not data_url:
        from data_tools.synthetic import generate_synthetic

        data_url = f".tf4ctr-cache/synthetic-criteo-{args.synthetic_rows}-v{args.synthetic_scale_vocab:g}"
        if _has_manifest(data_url):
            print(f"[tf4ctr] reusing synthetic dataset at {data_url}", flush=True)
        else:
            print(f"[tf4ctr] generating a synthetic Criteo-shaped dataset: {args.synthetic_rows:,} rows -> {data_url}",
                  flush=True)
            generate_synthetic(data_url, rows=args.synthetic_rows, scale_vocab=args.synthetic_scale_vocab, seed=2026)
    cfg = cfg.with_overrides({"data.url": data_url})
    return _launch(cfg)


def retrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retrain",
        description="Warm-start from a finished run's best checkpoint and train on new date partitions only; "
        "evaluates on the dataset's valid/test dates (the next partitions) and writes a new run.",
    )
    p.add_argument("--from", dest="source", required=True, help="the finished run's folder (its OUT; local or URL)")
    p.add_argument("--data", help="a prepared dataset of the new partitions (hashed vocabularies: same table sizes)")
    p.add_argument("--logs", help="or: date-partitioned raw logs (dt=YYYY-MM-DD/...), prepared into OUT/dataset")
    p.add_argument("--spec", help="the parquet-logs dataset spec for --logs (YAML)")
    p.add_argument("--train-dates", help="dates to train on, e.g. 2026-11-24..2026-11-25 (overrides the spec)")
    p.add_argument("--valid-dates", help="validation date(s) (overrides the spec)")
    p.add_argument("--test-dates", help="test date(s), typically the next partition (overrides the spec)")
    p.add_argument("--workers", type=int, help="number of Ray Train workers (default: the source run's)")
    p.add_argument("--out", help="the new run's folder; default runs/retrain-<time>")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("overrides", nargs="*", help="key=value settings on top of the source run's, e.g. epochs=2 lr=5e-4")
    return p


def _dates(text: Optional[str]) -> Optional[list[str]]:
    return [d.strip() for d in text.split(",") if d.strip()] if text else None


def retrain(argv: Optional[list[str]] = None) -> dict:
    """The source run's configuration, its best weights, new data; see ``retrain_parser``."""
    import json

    import yaml

    p = retrain_parser()
    args = p.parse_args(argv)
    if bool(args.data) == bool(args.logs):
        p.error("give exactly one of --data (a prepared dataset) or --logs with --spec")
    source = absolute_url(args.source)
    config_path = source.rstrip("/") + "/config.json"
    try:
        with fsspec.open(config_path, "r") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--from {args.source}: no config.json there; is it a run folder?") from None
    cfg = RunConfig.from_dict(raw)
    extra: dict = {"name": "retrain", "checkpoint.warm_start": source, "checkpoint.root": None,
                   "checkpoint.resume": "auto",
                   "out": args.out or f"runs/retrain-{time.strftime('%Y%m%d-%H%M%S')}"}
    if args.workers is not None:
        extra["cluster.workers"] = args.workers
    if args.ray_address:
        extra["cluster.ray_address"] = args.ray_address
    try:
        cfg = cfg.with_overrides(extra).with_overrides(args.overrides)
    except ConfigError as e:
        p.error(str(e))
    data_url = args.data
    if args.logs:
        if not args.spec:
            p.error("--logs needs --spec (a parquet-logs dataset spec)")
        from data_tools.parquet_logs import prepare_parquet_logs

        with open(args.spec) as f:
            spec = yaml.safe_load(f) or {}
        for key, value in (("train_dates", args.train_dates), ("valid_dates", args.valid_dates),
                           ("test_dates", args.test_dates)):
            if value:
                spec[key] = _dates(value)
        data_url = cfg.out.rstrip("/") + "/dataset"
        if _has_manifest(data_url):
            print(f"[tf4ctr] reusing prepared dataset at {data_url}", flush=True)
        else:
            print(f"[tf4ctr] preparing {args.logs} (train {spec.get('train_dates')}, valid {spec.get('valid_dates')}, "
                  f"test {spec.get('test_dates')}) -> {data_url}", flush=True)
            prepare_parquet_logs(absolute_url(args.logs), data_url, **spec)
    cfg = cfg.with_overrides({"data.url": data_url})
    print(f"[tf4ctr] warm start from {source}", flush=True)
    return _launch(cfg)


def absolute_url(url: str) -> str:
    """Local paths become absolute: Ray workers do not share the driver's working directory."""
    if "://" in url and not url.startswith("file://"):
        return url
    return os.path.abspath(url.removeprefix("file://"))


def _launch(cfg: RunConfig) -> dict:
    from tf4ctr_dist.train.launch import run_training
    from tf4ctr_dist.train.loop import check_run_config

    cfg = cfg.with_overrides({"data.url": absolute_url(cfg.data.url), "out": absolute_url(cfg.out)})
    check_run_config(cfg, "cuda" if cfg.cluster.use_gpu else "cpu", cfg.cluster.workers)
    print(f"[tf4ctr] run folder: {cfg.out}", flush=True)
    result = run_training(cfg)
    _print_result(result)
    print(f"[tf4ctr] wrote {cfg.out.rstrip('/')}/result.json", flush=True)
    return result


def run_cli(job, argv: Optional[list[str]] = None) -> None:
    """Run a job function for a command line: expected failures (bad data, bad config,
    impossible placement) print one clear line and exit 1 instead of a traceback."""
    from tf4ctr_dist.data.errors import DataError
    from tf4ctr_dist.distributed.sharding import ShardingError

    try:
        job(sys.argv[1:] if argv is None else argv)
    except (DataError, ConfigError, ShardingError, FileNotFoundError) as e:
        print(f"[tf4ctr] error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
