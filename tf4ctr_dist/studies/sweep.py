"""`tf4ctr sweep`: a grid / random search over any config keys, times seeds, on Ray Tune.

Every trial is a whole training run (``tf4ctr_dist.train.launch.run_training``: a Ray Train
TorchTrainer with its own workers) launched from a Tune function trainable, the Ray Train V2 way
of combining the two. The driver expands the search space itself: the random values are drawn
here with a fixed seed, so every cell is known, checked (``RunConfig.with_overrides`` on each
one: a mistyped key fails before Ray starts) and has a stable name. Tune then runs one grid over
the trial ids.

Layout of a sweep folder (local path or URL)::

    SWEEP/sweep.json                     the expanded trials (cell, seed, config); resume checks it
    SWEEP/runs/CELL/seed-SEED/           each trial's run folder (result.json, checkpoints/, ...)
    SWEEP/tune/                          Ray Tune's experiment state (Tuner.restore)
    SWEEP/results.csv, SWEEP/results.md  one row per trial; mean +- std per cell and p-values

Resuming: the same command again restores Tune's experiment (finished trials are not run
again) and a trial whose run folder already holds result.json only reports it; an interrupted
trial continues from its own checkpoints (checkpoint.resume=auto), since its run folder depends
only on its cell and seed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import fsspec

from tf4ctr_dist.config import ConfigError, RunConfig, _resolve_key, parse_mapping

SPEC_KEYS = ("name", "base", "data", "overrides", "variants", "grid", "random", "samples", "seeds", "baseline",
             "sample_seed", "scheduler", "metric", "grace_epochs")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
SCHEDULERS = ("none", "asha", "median")
RESULT_METRICS = ("AUC", "gAUC", "logloss")
# The markdown table's columns (mean +- std over seeds, p-value against the baseline).
TABLE_METRICS = ("test_AUC", "test_gAUC", "test_logloss", "valid_AUC", "best_epoch", "plateau_gain",
                 "passed_first_plateau")


@dataclass
class SweepSpec:
    """A sweep file (YAML/JSON), e.g.::

        base: frappe_x1                     # preset name or config file
        data: runs/frappe/dataset           # a prepared dataset (or --data)
        overrides: [epochs=10]
        variants:                           # named sets of settings, one more grid dimension
          tf4ctr: {ssem: ser, dfm: wsf, loss: tf}
          dualmlp: {ssem: share, dfm: sum, loss: bce}
        grid: {ssem: [share, ser, gm, moe], dfm: [sum, wsf]}
        random: {alpha: {uniform: [0.1, 0.5]}}
        samples: 1                          # random draws per grid point
        seeds: [2023, 2024, 2025]
        baseline: {ssem: share, dfm: sum}
        scheduler: none                     # none | asha | median (early stopping on `metric`)
    """

    name: str = "sweep"
    base: Optional[str] = None
    data: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    # name -> settings applied together (a grid dimension `variant` whose values are these names):
    # for comparisons that change several keys at once, e.g. TF4CTR against DualMLP
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    random: dict[str, dict] = field(default_factory=dict)
    samples: int = 1
    seeds: list[int] = field(default_factory=lambda: [2023])
    baseline: Optional[dict[str, Any]] = None
    sample_seed: int = 0
    scheduler: str = "none"
    metric: str = "valid_AUC"  # what the scheduler watches (per-epoch reports: valid_AUC, valid_logloss, ...)
    grace_epochs: int = 1  # ASHA / median: epochs every trial runs before it can be stopped


@dataclass
class Cell:
    label: str  # "ssem=share dfm=sum"
    slug: str  # its folder name: "ssem-share_dfm-sum"
    values: dict[str, Any]  # the swept keys as written in the spec -> value


@dataclass
class Trial:
    id: str  # "SLUG/seed-SEED"
    cell: Cell
    seed: int
    config: RunConfig


def load_spec(path: str) -> SweepSpec:
    """Read and check a sweep file; errors name the file and the key."""
    with fsspec.open(path, "r") as f:
        text = f.read()
    return spec_from_dict(parse_mapping(text, path), where=path)


def spec_from_dict(raw: Any, where: str = "sweep") -> SweepSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown sweep key(s) {', '.join(map(repr, unknown))}; "
                          f"a sweep file has: {', '.join(SPEC_KEYS)} (config keys go under grid/random/overrides)")
    spec = SweepSpec(**raw)
    if isinstance(spec.overrides, str):
        spec.overrides = [spec.overrides]
    if not isinstance(spec.grid, dict) or any(not isinstance(v, list) or not v for v in spec.grid.values()):
        raise ConfigError(f"{where}: grid must map config keys to non-empty lists, e.g. grid: {{ssem: [share, ser]}}")
    if not isinstance(spec.random, dict):
        raise ConfigError(f"{where}: random must map config keys to a distribution, e.g. {{alpha: {{uniform: [0.1, 0.5]}}}}")
    for key, dist in spec.random.items():
        if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS):
            raise ConfigError(f"{where}: random.{key}: expected one of {', '.join(DISTRIBUTIONS)}, "
                              f"e.g. {{uniform: [0.1, 0.5]}}; got {dist!r}")
        kind, args = next(iter(dist.items()))
        if kind != "choice" and not (isinstance(args, list) and len(args) == 2 and args[0] <= args[1]):
            raise ConfigError(f"{where}: random.{key}.{kind}: expected [low, high] with low <= high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}: random.{key}.loguniform: the bounds must be > 0, got {args!r}")
        if kind == "choice" and not (isinstance(args, list) and args):
            raise ConfigError(f"{where}: random.{key}.choice: expected a non-empty list, got {args!r}")
    if not isinstance(spec.variants, dict) or any(
            not isinstance(v, dict) or not v for v in spec.variants.values()):
        raise ConfigError(f"{where}: variants must map names to settings, e.g. "
                          f"{{tf4ctr: {{ssem: ser, dfm: wsf}}, dualmlp: {{ssem: share, dfm: sum}}}}")
    for vname, settings in spec.variants.items():
        for key in settings:
            try:
                path = _resolve_key(key)
            except ConfigError as e:
                raise ConfigError(f"{where}: variants.{vname}.{key}: {e}") from None
            if path[-1] == "seed" or key in ("out", "name"):
                raise ConfigError(f"{where}: variants.{vname}: {key!r} cannot be set per variant")
    if VARIANT in spec.grid or VARIANT in spec.random:
        raise ConfigError(f"{where}: {VARIANT!r} is the variants' dimension; it cannot be a grid or random key")
    both = set(spec.grid) & set(spec.random)
    if both:
        raise ConfigError(f"{where}: key(s) {', '.join(sorted(both))} are in both grid and random")
    if not isinstance(spec.seeds, list) or not spec.seeds or not all(isinstance(s, int) for s in spec.seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {spec.seeds!r}")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"{where}: seeds has duplicates: {spec.seeds}")
    for key in [*spec.grid, *spec.random]:
        try:
            path = _resolve_key(key)
        except ConfigError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
        if path[-1] == "seed" or key in ("out", "name"):
            raise ConfigError(f"{where}: {key!r} cannot be swept (seeds come from `seeds:`, folders from the sweep)")
    if not isinstance(spec.samples, int) or spec.samples < 1:
        raise ConfigError(f"{where}: samples must be an integer >= 1, got {spec.samples!r}")
    if spec.samples > 1 and not spec.random:
        raise ConfigError(f"{where}: samples={spec.samples} repeats random draws, but random is empty")
    if spec.scheduler not in SCHEDULERS:
        raise ConfigError(f"{where}: scheduler must be one of {', '.join(SCHEDULERS)}, got {spec.scheduler!r}")
    if spec.baseline is not None and not isinstance(spec.baseline, dict):
        raise ConfigError(f"{where}: baseline must map swept keys to values, e.g. {{ssem: share, dfm: sum}}")
    if spec.baseline:
        extra = sorted(set(spec.baseline) - set(swept_keys(spec)))
        if extra:
            raise ConfigError(f"{where}: baseline key(s) {', '.join(extra)} are not swept "
                              f"(swept: {', '.join(swept_keys(spec))})")
    return spec


VARIANT = "variant"  # the cell key that names a variant


def swept_keys(spec: SweepSpec) -> list[str]:
    """The keys that tell cells apart: ``variant`` (when there are variants), grid, random."""
    return ([VARIANT] if spec.variants else []) + list(spec.grid) + list(spec.random)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "cell"


def _draw(kind: str, args: Any, rng: random.Random) -> Any:
    if kind == "uniform":
        return rng.uniform(float(args[0]), float(args[1]))
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
    if kind == "randint":
        return rng.randint(int(args[0]), int(args[1]))
    return args[rng.randrange(len(args))]


def expand_cells(spec: SweepSpec) -> list[Cell]:
    """Grid points (in the spec's order) times ``samples`` random draws (seeded by sample_seed)."""
    import itertools

    rng = random.Random(spec.sample_seed)
    dims = {VARIANT: list(spec.variants)} if spec.variants else {}
    dims.update(spec.grid)
    keys = list(dims)
    cells: list[Cell] = []
    for sample in range(spec.samples if spec.random else 1):
        for combo in itertools.product(*(dims[k] for k in keys)):
            values = dict(zip(keys, combo))
            for key, dist in spec.random.items():
                kind, args = next(iter(dist.items()))
                values[key] = _draw(kind, args, rng)
            parts = [f"{k}={_fmt_value(v)}" for k, v in values.items()]
            if spec.samples > 1:
                parts.insert(0, f"#{sample}")
            label = " ".join(parts) or "base"
            cells.append(Cell(label, _slugify("_".join(p.replace("=", "-") for p in parts) or "base"), values))
    slugs = [c.slug for c in cells]
    if len(set(slugs)) != len(slugs):
        dup = sorted({s for s in slugs if slugs.count(s) > 1})
        raise ConfigError(f"sweep: cells with the same folder name {dup}; make the grid values distinct")
    return cells


def absolute(url: str) -> str:
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    return os.path.abspath(url.removeprefix("file://"))


def build_trials(spec: SweepSpec, base: RunConfig, out: str, extra_overrides: Sequence[str] = ()) -> list[Trial]:
    """Every (cell, seed) as a checked RunConfig whose run folder is OUT/runs/CELL/seed-SEED."""
    common = base.with_overrides(list(spec.overrides)).with_overrides(list(extra_overrides))
    if spec.data:
        common = common.with_overrides({"data.url": absolute(spec.data)})
    if not common.data.url:
        raise ConfigError("sweep: no dataset; give `data:` in the sweep file or --data URL (a prepared dataset)")
    trials = []
    for cell in expand_cells(spec):
        settings = {k: v for k, v in cell.values.items() if k != VARIANT}
        if VARIANT in cell.values:  # the variant's settings first; grid and random values on top
            settings = {**spec.variants[cell.values[VARIANT]], **settings}
        try:
            cell_cfg = common.with_overrides(settings)
        except ConfigError as e:
            raise ConfigError(f"sweep cell {cell.label!r}: {e}") from None
        for seed in spec.seeds:
            tid = f"{cell.slug}/seed-{seed}"
            cfg = cell_cfg.with_overrides({"train.seed": seed, "out": f"{out}/runs/{tid}",
                                           "name": f"{spec.name}-{cell.slug}-seed-{seed}"[:100]})
            trials.append(Trial(tid, cell, seed, cfg))
    return trials


def baseline_label(spec: SweepSpec, cells: Sequence[Cell]) -> Optional[str]:
    """The one cell whose swept values match ``spec.baseline`` (values compared as the spec parses them)."""
    if not spec.baseline:
        return None
    matches = [c for c in cells if all(_same(c.values.get(k), v) for k, v in spec.baseline.items())]
    if len(matches) != 1:
        raise ConfigError(f"sweep: baseline {spec.baseline} matches {len(matches)} cells "
                          f"({', '.join(c.label for c in matches) or 'none'}); it must name exactly one")
    return matches[0].label


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return a == b


def max_concurrent(cluster_cpus: float, cfg: RunConfig) -> int:
    """Trials that fit at once: each needs its workers' CPUs plus one for its Tune trainable."""
    per_trial = cfg.cluster.workers * cfg.cluster.cpus_per_worker + 1
    return max(1, int(cluster_cpus // per_trial))


def cluster_config(trials: Sequence[Trial]) -> RunConfig:
    """The trial config the sweep's Ray cluster is started, sized and checked from.

    The one whose workers need the most CPUs, so that every trial fits, whatever the grid does to
    cluster.workers or cluster.cpus_per_worker (sizing from the first trial alone left the larger
    ones waiting forever for workers). What is fixed for the whole cluster must be the same in
    every trial: the cluster to join, the device, and the workers' process environment
    (train.blas_numerics sets MKL_CBWR, which MKL reads once, at process start)."""
    from tf4ctr_dist.train.launch import worker_env

    first = trials[0].config
    fixed = {"cluster.ray_address": lambda c: c.cluster.ray_address, "cluster.use_gpu": lambda c: c.cluster.use_gpu,
             "train.blas_numerics": worker_env}
    for key, value in fixed.items():
        for t in trials[1:]:
            if value(t.config) != value(first):
                raise ConfigError(f"sweep: {key} differs between trials ({t.cell.label}); it is fixed for the "
                                  f"whole Ray cluster the sweep runs on: run one sweep per value")
    return max((t.config for t in trials), key=lambda c: c.cluster.workers * c.cluster.cpus_per_worker)


# ---------------------------------------------------------------------------------------------
# Inside Ray: the trainable.


def _read_json(url: str) -> Optional[dict]:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    return json.loads(fs.cat_file(path))


def plateau_dynamics(result: dict) -> dict[str, Any]:
    """How a run met its first lr plateau, from result.json's per-epoch history.

    first_plateau_epoch: the first epoch whose monitored validation score did not improve (the lr
    was decayed after it); plateau_gain: the score's change over the next epoch, the first at the
    lower lr; passed_first_plateau: 1 if a later epoch improved on the best, 0 if the run stopped
    with its best from before the plateau. Under the published patience of 2 a run that gains too
    little in that one epoch stops there, so two settings with the same mean test AUC can still
    differ here (README "Results": the compiled kernel against the eager ops). None where the run
    met no plateau.
    """
    history = result.get("history") or []
    monitor = ((result.get("config") or {}).get("train") or {}).get("monitor") or []
    score = [sum(v for m, v in (record.get("valid") or {}).items() if m in monitor and isinstance(v, float))
             for record in history]
    first = next((i for i, record in enumerate(history) if not record.get("improved", True)), None)
    if first is None:
        return {"first_plateau_epoch": None, "plateau_gain": None, "passed_first_plateau": None}
    later = history[first + 1:]
    return {"first_plateau_epoch": first + 1,
            "plateau_gain": score[first + 1] - score[first] if later else None,
            "passed_first_plateau": int(any(record.get("improved") for record in later))}


def _flat(result: dict) -> dict[str, Any]:
    out: dict[str, Any] = {"epochs": result.get("epochs"), "best_epoch": result.get("best_epoch")}
    for split in ("valid", "test"):
        for m in RESULT_METRICS:
            v = (result.get(split) or {}).get(m)
            if v is not None:
                out[f"{split}_{m}"] = v
    out.update(plateau_dynamics(result))
    return out


def _mark_start(run_dir: str) -> None:
    """One file per training start under RUN/sweep-starts/ (how the resume test counts reruns)."""
    fs, path = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(f"{path}/sweep-starts", exist_ok=True)
    with fs.open(f"{path}/sweep-starts/{time.time_ns()}-{os.getpid()}", "w") as f:
        f.write("")


def _trial_fn(config: dict, trials: dict) -> None:
    """Tune function trainable: one training run on Ray Train, per-epoch reports forwarded to Tune."""
    import ray.tune

    from tf4ctr_dist.train.launch import run_training

    cfg = RunConfig.from_dict(trials[config["trial"]])
    result = _read_json(cfg.out.rstrip("/") + "/result.json")
    if result is None:
        _mark_start(cfg.out)
        from ray.tune.integration.ray_train import TuneReportCallback

        result = run_training(cfg, callbacks=[TuneReportCallback()])
    # The last report: the final metrics (valid with the best weights, test), epoch = the last one.
    ray.tune.report({"epoch": result.get("epochs"), "finished": 1, **_flat(result)})


# ---------------------------------------------------------------------------------------------
# The driver.


def _scheduler(spec: SweepSpec, epochs: int):
    if spec.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    if spec.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=max(epochs, 1), grace_period=spec.grace_epochs)
    return MedianStoppingRule(time_attr="epoch", grace_period=spec.grace_epochs, min_samples_required=2)


def _write_text(url: str, text: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)


def _check_same_sweep(out: str, manifest: dict) -> None:
    old = _read_json(f"{out}/sweep.json")
    if old is not None and old.get("trials") != json.loads(json.dumps(manifest["trials"], default=str)):
        raise ConfigError(f"{out} holds a different sweep (its trials or their configs differ from this spec); "
                          f"use a new --out, or --restart to discard it")


def run_sweep(spec: SweepSpec, base: RunConfig, out: str, extra_overrides: Sequence[str] = (),
              max_concurrent_trials: Optional[int] = None, restart: bool = False,
              say=lambda msg: print(f"[tf4ctr] {msg}", flush=True)) -> list[dict]:
    """Run (or resume) the sweep; writes OUT/results.csv and OUT/results.md; returns the CSV rows."""
    out = absolute(out)
    trials = build_trials(spec, base, out, extra_overrides)
    cells = list({t.cell.label: t.cell for t in trials}.values())
    baseline = baseline_label(spec, cells)
    first = trials[0].config
    from tf4ctr_dist.cli.train import check_before_launch

    device = "cuda" if first.cluster.use_gpu else "cpu"
    dataset = check_before_launch(first, device, dataset=first.data.url)
    for t in trials[1:]:
        check_before_launch(t.config, device, manifest=dataset if t.config.data.url == first.data.url else None)
    largest = cluster_config(trials)
    manifest = {"spec": spec.__dict__, "baseline": baseline,
                "trials": {t.id: {"cell": t.cell.label, "values": t.cell.values, "seed": t.seed,
                                  "config": t.config.to_dict()} for t in trials}}
    if restart:
        fs, path = fsspec.core.url_to_fs(out)
        if fs.exists(path):
            say(f"--restart: removing {out}")
            fs.rm(path, recursive=True)
    _check_same_sweep(out, manifest)
    _write_text(f"{out}/sweep.json", json.dumps(manifest, indent=1, default=str))
    say(f"sweep: {len(cells)} cell(s) x {len(spec.seeds)} seed(s) = {len(trials)} trial(s) -> {out}")

    from tf4ctr_dist.train.launch import _init_ray

    _init_ray(largest)
    import ray
    from ray import tune

    cpus = ray.cluster_resources().get("CPU", 1.0)
    per_trial = largest.cluster.workers * largest.cluster.cpus_per_worker
    if per_trial + 1 > cpus:
        raise ConfigError(f"sweep: one trial needs {per_trial:g} worker CPU(s) + 1 for its trainable, "
                          f"the cluster has {cpus:g}; lower cluster.workers or cluster.cpus_per_worker")
    concurrent = max_concurrent_trials or max_concurrent(cpus, largest)
    say(f"at most {concurrent} trial(s) at once ({cpus:g} CPUs; {per_trial:g} + 1 per trial)")

    trainable = tune.with_resources(
        tune.with_parameters(_trial_fn, trials={t.id: t.config.to_dict() for t in trials}),
        {"CPU": 1, "GPU": 0})
    tune_dir = f"{out}/tune"
    if not restart and tune.Tuner.can_restore(tune_dir):
        say(f"resuming the sweep in {tune_dir} (finished trials are kept)")
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        metric, mode = spec.metric, ("min" if "logloss" in spec.metric else "max")
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.id for t in trials])},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, max_concurrent_trials=concurrent,
                                        scheduler=_scheduler(spec, first.train.epochs)),
            run_config=tune.RunConfig(name="tune", storage_path=out, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    reported = {}
    for r in grid:
        tid = (r.config or {}).get("trial")
        if tid is not None:
            reported[tid] = (r.metrics or {}, r.error)
    rows = collect_rows(trials, reported)
    write_results(out, rows, swept_keys(spec), baseline)
    done = sum(r["status"] == "finished" for r in rows)
    say(f"{done}/{len(rows)} trial(s) finished; wrote {out}/results.csv and {out}/results.md")
    return rows


def collect_rows(trials: Sequence[Trial], reported: dict[str, tuple[dict, Any]]) -> list[dict]:
    """One row per trial: the run folder's result.json when it finished, else Tune's last report
    (an early-stopped trial: its last epoch's valid metrics) or the error."""
    rows = []
    for t in trials:
        row: dict[str, Any] = {"cell": t.cell.label, **{k: _fmt_value(v) if isinstance(v, list) else v
                                                       for k, v in t.cell.values.items()}, "seed": t.seed}
        result = _read_json(t.config.out.rstrip("/") + "/result.json")
        metrics, error = reported.get(t.id, ({}, None))
        if result is not None:
            row.update(status="finished", **_flat(result))
        elif error is not None:
            row.update(status="error", error=str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
        elif metrics:
            row.update(status="stopped", epochs=metrics.get("epoch"),
                       **{k: v for k, v in metrics.items() if k.startswith("valid_") and isinstance(v, float)})
        else:
            row.update(status="not run")
        row["run_dir"] = t.config.out
        rows.append(row)
    return rows


CSV_TAIL = ("seed", "status", "valid_AUC", "valid_gAUC", "valid_logloss", "test_AUC", "test_gAUC",
            "test_logloss", "best_epoch", "epochs", "first_plateau_epoch", "plateau_gain", "passed_first_plateau",
            "run_dir", "error")


def write_results(out: str, rows: Sequence[dict], swept: Sequence[str], baseline: Optional[str]) -> None:
    from tf4ctr_dist.studies.stats import markdown_table, seed_table

    columns = ["cell", *swept, *CSV_TAIL]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    _write_text(f"{out}/results.csv", buf.getvalue())

    finished = [r for r in rows if r["status"] == "finished"]
    metrics = [m for m in TABLE_METRICS if any(r.get(m) is not None for r in finished)]
    lines = [f"# Sweep results: {out}", "",
             f"{len(finished)} of {len(rows)} trial(s) finished. Mean +- std over seeds (sample std)."]
    present = {r["cell"] for r in finished}
    base = baseline if baseline in present else None
    if baseline is not None:
        lines.append(f"p: two-tailed t-test against the baseline cell `{baseline}` (paired when both ran the "
                     f"same seeds, Welch otherwise)." + ("" if base else " The baseline has no finished trial."))
    lines.append("")
    if finished:
        table = seed_table(finished, metrics, baseline=base, group_key="cell")
        lines.append(markdown_table(table, metrics, baseline=base))
    others = [r for r in rows if r["status"] != "finished"]
    if others:
        lines += ["", "Not finished:", ""]
        lines += [f"- {r['cell']} seed {r['seed']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "")
                  for r in others]
    _write_text(f"{out}/results.md", "\n".join(lines).rstrip() + "\n")


# ---------------------------------------------------------------------------------------------
# `tf4ctr report SWEEP`: the grid as a heatmap (paper Table 3), a swept number as a curve (Figs 6-8).


def write_sweep_report(sweep: str, out: str, metric: str = "test_AUC") -> list[str]:
    """Plots of a finished sweep folder into the local folder ``out``; returns the files written.

    Two swept keys: a heatmap of the mean ``metric`` over seeds (rows: the first key, columns: the
    second). One swept key: the mean +- std over seeds against its values."""
    from tf4ctr_dist.studies.report import ReportError, _pyplot, save_figure
    from tf4ctr_dist.studies.stats import summarize

    sweep = sweep.rstrip("/")
    manifest = _read_json(f"{sweep}/sweep.json")
    fs, root = fsspec.core.url_to_fs(sweep)
    if manifest is None or not fs.exists(f"{root}/results.csv"):
        raise ReportError(f"{sweep}: no sweep.json and results.csv (expected a folder written by `tf4ctr sweep`)")
    rows = [r for r in csv.DictReader(io.StringIO(fs.cat_file(f"{root}/results.csv").decode()))
            if r["status"] == "finished" and r.get(metric)]
    spec = manifest["spec"]
    keys = [*([VARIANT] if spec.get("variants") else []), *spec.get("grid", {}), *spec.get("random", {})]
    os.makedirs(out, exist_ok=True)
    written: list[str] = []
    plt = _pyplot()
    by_cell: dict[tuple, list[float]] = {}
    for r in rows:
        by_cell.setdefault(tuple(r[k] for k in keys), []).append(float(r[metric]))
    if len(keys) == 2 and spec.get("grid") and len(spec["grid"]) == 2:
        ys, xs = [[_fmt_value(v) for v in spec["grid"][k]] for k in keys]
        import numpy as np

        grid = np.full((len(ys), len(xs)), np.nan)
        for (y, x), vals in by_cell.items():
            if y in ys and x in xs:
                grid[ys.index(y), xs.index(x)] = summarize(vals).mean
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(xs), 1.2 + 0.8 * len(ys)))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_yticks(range(len(ys)), ys)
        ax.set(xlabel=keys[1], ylabel=keys[0], title=f"mean {metric} over seeds")
        finite = grid[np.isfinite(grid)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(len(ys)):
            for j in range(len(xs)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.4f}", ha="center", va="center", fontsize=8,
                            color="black" if grid[i, j] > mid else "white")
        fig.colorbar(im, ax=ax, label=metric)
        save_figure(fig, os.path.join(out, "sweep_heatmap.png"))
        written.append("sweep_heatmap.png")
    elif len(keys) == 1:
        points = []
        for (v,), vals in by_cell.items():
            try:
                x = float(v)
            except ValueError:
                continue
            s = summarize(vals)
            points.append((x, s.mean, s.std))
        if points:
            points.sort()
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=3, label=f"mean +- std over seeds")
            ax.set(xlabel=keys[0], ylabel=metric, title=f"{metric} over {keys[0]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            save_figure(fig, os.path.join(out, "sweep_curve.png"))
            written.append("sweep_curve.png")
    table = fs.cat_file(f"{root}/results.md").decode() if fs.exists(f"{root}/results.md") else ""
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(table + "".join(f"\n![{w}]({w})\n" for w in written))
    written.append("sweep.md")
    return written
