"""``tf4ctr train`` and ``tf4ctr retrain``: check everything on the driver, then launch Ray Train.

The order matters for a user's time: arguments, then the configuration (types, ranges, the
placement on this device type), then the dataset's manifest (present, readable, with the splits
the config names), and only then the Ray cluster and its workers. A mistake therefore costs a
second, not the minutes of starting a worker group, and never reaches Ray Train's restarts.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING, Any, Optional

from tf4ctr_dist.config import PRESETS_DIR, ConfigError, RunConfig, load_config

if TYPE_CHECKING:
    from tf4ctr_dist.data.manifest import Manifest

# The preset a training run starts from when --config is not given, by data source.
DEFAULT_PRESETS = {"synthetic": "demo", "prepared": "criteo_x4", "csv": "frappe_x1"}

TRAIN_EXAMPLES = """\
examples:
  tf4ctr train                                   # synthetic Criteo-shaped demo, 2 local workers
  tf4ctr train --train data/frappe/train.csv --valid data/frappe/valid.csv --test data/frappe/test.csv \\
      --group-col user --seed 2023 --out runs/frappe-2023
  tf4ctr train --data s3://bucket/criteo_x4 --workers 8 --gpu
  tf4ctr train --config frappe_x1 --data runs/frappe-2023/dataset alpha=0.25 ssem=share dfm=sum loss=bce

Settings: key=value after the options (short keys resolve to their section: alpha=0.25, or
dotted: loss.alpha=0.25). Presets: {presets}.
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train TF4CTR on a prepared dataset, BARS-style CSVs or the synthetic demo data",
        description="Train TF4CTR with Ray Train workers. Without a data source, generates a synthetic "
        "Criteo-shaped dataset (fixed seed) and trains the demo preset on it.",
        epilog=TRAIN_EXAMPLES.format(presets=", ".join(preset_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    r = sub.add_parser(
        "retrain",
        help="warm-start from a finished run and train on new date partitions",
        description="Warm-start from a finished run's best checkpoint and train on new date partitions only; "
        "evaluates on the dataset's valid/test dates (the next partitions) and writes a new run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_retrain_arguments(r)
    r.set_defaults(func=run_retrain)


def train_parser() -> argparse.ArgumentParser:
    """`tf4ctr train`'s parser on its own (checks the job specs in cluster/ against it)."""
    p = argparse.ArgumentParser(prog="tf4ctr train")
    add_train_arguments(p)
    return p


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_preset(name_or_path: str) -> str:
    """A preset name (``frappe_x1``) or a YAML/JSON file path."""
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml", ".json")):
        if candidate.exists():
            return str(candidate)
        raise ConfigError(f"--config {name_or_path!r}: no such preset; presets: {', '.join(preset_names())}")
    if not os.path.exists(name_or_path):
        raise ConfigError(f"--config {name_or_path}: no such file")
    return name_or_path


def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, help="number of Ray Train workers (cluster.workers)")
    g.add_argument("--out", help="run folder (local path or URL); default runs/<name>-<time>")
    g.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    g.add_argument("-v", "--verbose", action="store_true", help="print the whole sharding plan")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. alpha=0.25 easy_hidden_units=[400,400]")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PRESET|FILE",
                   help="preset name or YAML/JSON file (default: demo without data, criteo_x4 with --data, "
                   "frappe_x1 with CSVs)")
    src = p.add_argument_group("data (one source)")
    src.add_argument("--data", metavar="URL", help="a prepared Parquet dataset (local path, file:// or s3://)")
    src.add_argument("--train", metavar="CSV", help="BARS-style train CSV (with --valid and --test), prepared "
                     "on the fly into OUT/dataset")
    src.add_argument("--valid", metavar="CSV")
    src.add_argument("--test", metavar="CSV")
    src.add_argument("--group-col", help="CSVs: the column that defines gAUC groups (e.g. user)")
    src.add_argument("--label-col", default="label", help="CSVs: the label column (default label)")
    src.add_argument("--min-count", type=int, default=2, help="CSVs: rarer values map to OOV (default 2)")
    src.add_argument("--synthetic-rows", type=int, default=1_000_000, help="rows of the generated demo dataset")
    src.add_argument("--synthetic-scale-vocab", type=float, default=0.1,
                     help="vocabulary scale of the demo dataset (1.0: ~930k rows per table set)")
    g = p.add_argument_group("shortcuts")
    g.add_argument("--seed", type=int, help="random seed (train.seed)")
    g.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl (cluster.use_gpu=true)")
    _run_options(p)


def add_retrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, help="the finished run's folder (its OUT; local or URL)")
    p.add_argument("--data", help="a prepared dataset of the new partitions (hashed vocabularies: same table sizes)")
    p.add_argument("--logs", help="or: date-partitioned raw logs (dt=YYYY-MM-DD/...), prepared into OUT/dataset")
    p.add_argument("--spec", help="the parquet-logs dataset spec for --logs (YAML)")
    p.add_argument("--train-dates", help="dates to train on, e.g. 2026-11-24..2026-11-25 (overrides the spec)")
    p.add_argument("--valid-dates", help="validation date(s) (overrides the spec)")
    p.add_argument("--test-dates", help="test date(s), typically the next partition (overrides the spec)")
    _run_options(p)


def data_source(args: argparse.Namespace) -> str:
    csvs = [args.train, args.valid, args.test]
    if args.data and any(csvs):
        raise ConfigError("give either --data (a prepared dataset) or --train/--valid/--test CSVs, not both")
    if any(csvs) and not all(csvs):
        raise ConfigError("CSV input needs all three of --train, --valid and --test")
    return "prepared" if args.data else "csv" if any(csvs) else "synthetic"


def train_config(args: argparse.Namespace) -> tuple[RunConfig, str]:
    """The run's configuration from the arguments, checked for types and ranges; and its source."""
    source = data_source(args)
    if source == "synthetic" and _sets_data_url(args.overrides):
        source = "prepared"
    cfg = load_config(resolve_preset(args.config or DEFAULT_PRESETS[source]))
    if source == "synthetic" and cfg.data.url:  # a config file (e.g. a run's config.json) naming its dataset
        source = "prepared"
    name = {"synthetic": "demo", "prepared": "train", "csv": "bars"}[source]
    extra: dict[str, Any] = {"name": name}
    if args.seed is not None:
        extra["train.seed"] = args.seed
    if args.gpu:
        extra["cluster.use_gpu"] = True
    return _with_run_options(cfg, args, extra, name), source


def _sets_data_url(overrides: list[str]) -> bool:
    """Whether the key=value settings name the dataset (data.url=..., url=...)."""
    from tf4ctr_dist.config import _resolve_key, _split

    return any(_resolve_key(_split(item)[0]) == ["data", "url"] and _split(item)[1] for item in overrides)


def _with_run_options(cfg: RunConfig, args: argparse.Namespace, extra: dict, name: str) -> RunConfig:
    if args.workers is not None:
        extra["cluster.workers"] = args.workers
    if args.ray_address:
        extra["cluster.ray_address"] = args.ray_address
    if args.verbose:
        extra["verbose"] = True
    extra["out"] = args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg.with_overrides(extra).with_overrides(args.overrides)


def _say(msg: str) -> None:
    print(f"[tf4ctr] {msg}", flush=True)


def _has_manifest(url: str) -> bool:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return fs.exists(f"{root.rstrip('/')}/manifest.json")


def _need_file(flag: str, path: str) -> None:
    if "://" not in path and not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such file")


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cfg, source = train_config(args)
    device_type = "cuda" if cfg.cluster.use_gpu else "cpu"
    data_url = (args.data or cfg.data.url) if source == "prepared" else ""
    manifest = check_before_launch(cfg, device_type, dataset=data_url)
    if source == "prepared":
        if not args.data:
            _say(f"dataset {data_url} (data.url of the configuration)")
    elif source == "csv":
        for flag, path in (("--train", args.train), ("--valid", args.valid), ("--test", args.test)):
            _need_file(flag, path)
        data_url = cfg.out.rstrip("/") + "/dataset"
        if _has_manifest(data_url):
            _say(f"reusing prepared dataset at {data_url}")
        else:
            from data_tools.bars_csv import prepare_bars_csv

            _say(f"preparing {args.train}, {args.valid}, {args.test} -> {data_url}")
            prepare_bars_csv(args.train, args.valid, args.test, data_url,
                             label_col=args.label_col, group_col=args.group_col, min_count=args.min_count)
    else:
        data_url = f".tf4ctr-cache/synthetic-criteo-{args.synthetic_rows}-v{args.synthetic_scale_vocab:g}"
        if _has_manifest(data_url):
            _say(f"reusing synthetic dataset at {data_url}")
        else:
            from data_tools.synthetic import generate_synthetic

            _say(f"generating a synthetic Criteo-shaped dataset: {args.synthetic_rows:,} rows -> {data_url}")
            generate_synthetic(data_url, rows=args.synthetic_rows, scale_vocab=args.synthetic_scale_vocab, seed=2026)
    launch(cfg.with_overrides({"data.url": data_url}), manifest if source == "prepared" else None)
    return 0


def check_before_launch(cfg: RunConfig, device_type: str, dataset: Optional[str] = None,
                        manifest: Optional["Manifest"] = None) -> Optional["Manifest"]:
    """Everything that can be refused without a worker: the placement on ``device_type`` and,
    for a prepared ``dataset`` (or its ``manifest``, already read and checked), the splits the
    config names, every part of them from its footer (data.validate.check_part_footers: done
    once, when the manifest is read here), and settings that need the model
    (``train.sync_batch_norm`` on a model without BatchNorm, checked on the model built on meta).
    Returns the manifest, read or given."""
    from tf4ctr_dist.distributed.placement import check_run_config

    check_run_config(cfg, device_type, cfg.cluster.workers)
    read_here = bool(dataset) and manifest is None
    if read_here:
        from tf4ctr_dist.data.manifest import load_manifest

        manifest = load_manifest(absolute_url(dataset))
    if manifest is None:
        return None
    missing = [s for s in (cfg.data.train_split, cfg.data.valid_split) if s not in manifest.splits]
    if missing:
        raise ConfigError(f"dataset {dataset or cfg.data.url} has no split(s) {', '.join(missing)} "
                          f"(it has: {', '.join(manifest.splits)}); set data.train_split / data.valid_split")
    if read_here:
        from tf4ctr_dist.data.validate import check_part_footers

        splits = [s for s in (cfg.data.train_split, cfg.data.valid_split, cfg.data.test_split) if s in manifest.splits]
        parts = sum(len(manifest.split(s).parts) for s in splits)
        if parts >= 100:  # seconds on an object store: say what the wait is
            _say(f"checking the footers of {parts:,} parts ({', '.join(splits)})")
        check_part_footers(absolute_url(dataset), manifest, splits, retry_seconds=cfg.data.storage_retry_seconds)
    if cfg.train.sync_batch_norm:
        from tf4ctr_dist.model import model_for_dataset
        from tf4ctr_dist.train.setup import check_sync_batch_norm

        check_sync_batch_norm(cfg, model_for_dataset(manifest, cfg.model, device="meta"))
    return manifest


def _dates(text: Optional[str]) -> Optional[list[str]]:
    return [d.strip() for d in text.split(",") if d.strip()] if text else None


def run_retrain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The source run's configuration, its best weights, new data."""
    import json

    import fsspec

    if bool(args.data) == bool(args.logs):
        raise ConfigError("give exactly one of --data (a prepared dataset) or --logs with --spec")
    if args.logs and not args.spec:
        raise ConfigError("--logs needs --spec (a parquet-logs dataset spec)")
    from tf4ctr_dist.data.storage import credentials_message, has_credentials

    for flag, url in (("--from", args.source), ("--data", args.data), ("--logs", args.logs)):
        if has_credentials(url):  # before anything is read, or echoed in a message
            raise ConfigError(credentials_message(url, flag))
    source = absolute_url(args.source)
    try:
        with fsspec.open(source.rstrip("/") + "/config.json", "r") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--from {args.source}: no config.json there; is it a run folder?") from None
    cfg = RunConfig.from_dict(raw)
    # The source run's settings, except where it ran: a run folder may come from someone else,
    # and its cluster.ray_address would send this job (data, credentials) to their cluster.
    extra: dict = {"name": "retrain", "checkpoint.warm_start": source, "checkpoint.root": None,
                   "checkpoint.resume": "auto", "cluster.ray_address": None}
    cfg = _with_run_options(cfg, args, extra, "retrain")
    manifest = check_before_launch(cfg, "cuda" if cfg.cluster.use_gpu else "cpu", dataset=args.data)
    data_url = args.data
    if args.logs:
        from data_tools.parquet_logs import prepare_parquet_logs
        from tf4ctr_dist.config import parse_mapping

        with open(args.spec) as f:
            spec = parse_mapping(f.read(), args.spec, yaml_syntax=True)
        for key, value in (("train_dates", args.train_dates), ("valid_dates", args.valid_dates),
                           ("test_dates", args.test_dates)):
            if value:
                spec[key] = _dates(value)
        data_url = cfg.out.rstrip("/") + "/dataset"
        if _has_manifest(data_url):
            _say(f"reusing prepared dataset at {data_url}")
        else:
            _say(f"preparing {args.logs} (train {spec.get('train_dates')}, valid {spec.get('valid_dates')}, "
                 f"test {spec.get('test_dates')}) -> {data_url}")
            prepare_parquet_logs(absolute_url(args.logs), data_url, **spec)
    _say(f"warm start from {source}")
    launch(cfg.with_overrides({"data.url": data_url}), manifest if args.data else None)
    return 0


def absolute_url(url: str) -> str:
    """Local paths become absolute: Ray workers do not share the driver's working directory."""
    if "://" in url and not url.startswith("file://"):
        return url
    return os.path.abspath(url.removeprefix("file://"))


def launch(cfg: RunConfig, checked: Optional["Manifest"] = None) -> dict:
    """Run the training on Ray Train and print the final metrics; returns result.json.
    ``checked``: the dataset's manifest where check_before_launch has already read and checked it."""
    from tf4ctr_dist.train.launch import run_training

    cfg = cfg.with_overrides({"data.url": absolute_url(cfg.data.url), "out": absolute_url(cfg.out)})
    check_before_launch(cfg, "cuda" if cfg.cluster.use_gpu else "cpu", dataset=cfg.data.url, manifest=checked)
    if cfg.train.epochs == 0:
        _say("epochs=0: no training; evaluating the initial (or resumed / warm-started) weights only")
    _say(f"run folder: {cfg.out}")
    result = run_training(cfg)
    for split in ("valid", "test"):
        if split in result:
            metrics = " ".join(f"{k}={v:.6f}" for k, v in result[split].items() if isinstance(v, float))
            _say(f"{split:5s} {metrics}")
    _say(f"wrote {cfg.out.rstrip('/')}/result.json")
    return result
