"""``tf4ctr report``: plots and a markdown summary of finished runs; ``tf4ctr sweep``: a grid /
random search times seeds on Ray Tune (tf4ctr_dist/studies/).

matplotlib and torch are imported inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

REPORT_EXAMPLES = """\
examples:
  tf4ctr report runs/frappe                      plots into runs/frappe/report/
  tf4ctr report runs/tf runs/bce --out cmp/      one curves plot with both runs, a folder per run
  tf4ctr report s3://bucket/runs/frappe --out report/
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="PNG plots and a markdown summary of finished runs",
        description="Read each run folder's metrics.jsonl / result.json and draw: loss and AUC curves, "
        "difficulty buckets per epoch, prediction histograms, first-epoch logit gradient norms, gate and "
        "fusion values, and the Twin Focus loss curves (paper Fig 4); plus summary.md. One `tf4ctr sweep` "
        "folder (local or s3://) gets instead the mean test AUC over seeds against the swept keys (a heatmap "
        "for two keys, a curve for one) and its table. Needs matplotlib (pip install 'tf4ctr_dist[report]').",
        epilog=REPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (local path or s3:// URL)")
    p.add_argument("--out", metavar="DIR", help="local folder for the report (default: RUN/report for one local "
                   "run, ./report otherwise)")
    p.set_defaults(func=_report)
    _add_sweep(sub)


def _is_sweep(url: str) -> bool:
    """Whether ``url`` (local or s3://) is a folder written by `tf4ctr sweep`."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return fs.exists(f"{root.rstrip('/')}/sweep.json")


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import os

    from tf4ctr_dist.studies.report import ReportError, write_report

    out = args.out
    if out is None:
        one_local = len(args.runs) == 1 and "://" not in args.runs[0]
        out = os.path.join(args.runs[0], "report") if one_local else "report"
    sweep = len(args.runs) == 1 and _is_sweep(args.runs[0])
    try:
        if sweep:  # a `tf4ctr sweep` folder: its heatmap / curve and table
            from tf4ctr_dist.studies.sweep import write_sweep_report

            files = write_sweep_report(args.runs[0], out)
        else:
            files = write_report(args.runs, out)
    except ReportError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"[tf4ctr] report: {len(files)} files in {out}/ ({', '.join(files)})", flush=True)
    return 0


SWEEP_EXAMPLES = """\
examples:
  tf4ctr sweep table3.yaml --out runs/table3                       run (or resume) the sweep
  tf4ctr sweep table3.yaml --out runs/table3 --scheduler asha epochs=20
  tf4ctr sweep table3.yaml --out runs/table3 --restart             discard it and start over

a sweep file (YAML or JSON):
  base: frappe_x1                         # preset or config file (default: --config, else frappe_x1)
  data: runs/frappe/dataset               # a prepared dataset (tf4ctr prepare), or --data
  overrides: [epochs=10, workers=1]
  grid: {ssem: [share, ser, gm, moe], dfm: [sum, wsf]}
  random: {alpha: {uniform: [0.1, 0.5]}}  # also loguniform, randint, choice
  samples: 1                              # random draws per grid point
  seeds: [2023, 2024, 2025]
  baseline: {ssem: share, dfm: sum}       # p-values against this cell
"""


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="grid / random search over config keys times seeds, on Ray Tune",
        description="Every trial is a full training run (its own Ray Train workers). Writes OUT/results.csv "
        "(one row per trial) and OUT/results.md (mean +- std over seeds per cell, two-tailed t-test p-values "
        "against the baseline cell). Running the same command again resumes: finished trials are kept.",
        epilog=SWEEP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", metavar="SWEEP_FILE", help="the sweep file (YAML/JSON)")
    p.add_argument("--out", required=True, help="the sweep folder (local path or URL); the same --out resumes")
    p.add_argument("--config", metavar="PRESET|FILE", help="base preset or config file (overrides `base:`)")
    p.add_argument("--data", metavar="URL", help="a prepared dataset (overrides `data:`)")
    p.add_argument("--workers", type=int, help="Ray Train workers per trial (cluster.workers)")
    p.add_argument("--scheduler", choices=("none", "asha", "median"), help="early stopping (overrides `scheduler:`)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: cluster CPUs // (workers * "
                   "cpus_per_worker + 1))")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--restart", action="store_true", help="delete OUT and start the sweep over")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings for every trial, e.g. epochs=5")
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import os

    from tf4ctr_dist.cli.train import resolve_preset
    from tf4ctr_dist.config import ConfigError, load_config
    from tf4ctr_dist.studies.sweep import load_spec, run_sweep

    if not os.path.exists(args.spec) and "://" not in args.spec:
        raise FileNotFoundError(f"{args.spec}: no such sweep file")
    spec = load_spec(args.spec)
    if args.data:
        spec.data = args.data
    if args.scheduler:
        spec.scheduler = args.scheduler
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    base = load_config(resolve_preset(args.config or spec.base or "frappe_x1"))
    extra = list(args.overrides)
    if args.workers is not None:
        extra.append(f"cluster.workers={args.workers}")
    if args.ray_address:
        extra.append(f"cluster.ray_address={args.ray_address}")
    rows = run_sweep(spec, base, args.out, extra, max_concurrent_trials=args.max_concurrent, restart=args.restart)
    return 0 if all(r["status"] in ("finished", "stopped") for r in rows) else 1
