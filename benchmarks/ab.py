"""A/B timing of training-step variants in ONE process, round by round:
`python -m benchmarks.ab --variants reference,default,default_bf16,eager_bn`.

Every variant but the reference is the real 1-worker path built by `build_training` from its own
RunConfig (own DMP, optimizer, pipeline and shuffled reader); each is warmed up, then `per_round`
steps of each are timed in turn for `rounds` rounds (order rotated every round). The median of
the per-round ratios cannot be biased by a slow drift of the machine, unlike two measurements in
separate processes minutes apart. The benchmark's "interleaved" section is this with the four
variants below.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.probes import cores, machine_info
from benchmarks.report import format_table, summarize_ab
from benchmarks.settings import DEFAULT_CACHE, LOSS, SEED, log, model_cfg, run_config
from benchmarks.workers import (
    ensure_dataset,
    epochs_forever,
    profile_steps,
    reference_stepper,
)

# name -> what differs from the default 1-worker run (table_wise + fused row-wise Adagrad, fp32):
#   model: ModelConfig overrides; cpu_kernels: the train.cpu_kernels setting; reference: the
#   plain single-process ReferenceTF4CTR + ReferenceStep on in-memory batches instead.
AB_VARIANTS: dict[str, dict[str, Any]] = {
    "reference": {"reference": True},
    "default": {},  # what training runs: train.cpu_kernels=auto (compiled where they build)
    "default_bf16": {"model": {"dense_precision": "bf16"}},
    # train.cpu_kernels=off: eager BatchNorm/ReLU/dropout and fbgemm's table backward (on two
    # threads, one per table set). emb_reg=0: fbgemm's CPU kernel drops the tables' weight decay,
    # so a run with it is refused (placement.check_table_weight_decay); without decay the maths
    # is the same as what this path trained before that check. Named after its first form so that
    # the report's keys (`ratio_vs_reference_eager_bn_interleaved`) stay those of earlier runs.
    "eager_bn": {"cpu_kernels": "off", "emb_reg": 0.0},
}
# The benchmark's interleaved section (see benchmarks/run.py).
INTERLEAVED_VARIANTS = ("reference", "default", "default_bf16", "eager_bn")


def _build_variant(spec: dict, variant: dict) -> Callable[[], Any]:
    """A step function of one variant: its parts from `build_training`, its table routing set
    before each step.

    Why per step: fbgemm's CPU table backward is one dispatcher op, and the dispatcher holds one
    kernel per op for the whole process, so routing it to this package's kernel is process-wide
    (`tf4ctr_dist.distributed.table_kernel`); `shard_model` sets it once for the model it wraps,
    which is all a training run needs, but here the last variant built would win for all."""
    import torch

    from benchmarks.settings import EMB_REG
    from benchmarks.workers import kernel_use
    from tf4ctr_dist.config import RunConfig
    from tf4ctr_dist.distributed.table_kernel import route_table_backward
    from tf4ctr_dist.kernels import loaded
    from tf4ctr_dist.train.setup import build_training

    cfg = RunConfig.from_dict(run_config(
        spec["url"], workers=1, batch=spec["batch"], model=variant.get("model"),
        shuffle_buffer_rows=spec["shuffle_buffer_rows"], cpu_kernels=variant.get("cpu_kernels", "auto"),
        emb_reg=variant.get("emb_reg", EMB_REG)))
    parts = build_training(cfg, 0, 1, torch.device("cpu"), splits=("train",))
    routed = kernel_use(parts)["table_kernel"]
    kernels = loaded() if routed else None
    pipeline, it = parts.pipeline, epochs_forever(parts.readers["train"])
    parts.dmp.train()

    def step():
        route_table_backward(kernels, routed)
        return pipeline.progress(it)

    return step


def ab_worker(rank: int, world: int, spec: dict) -> dict:
    """Build every variant, then time `per_round` steps of each in turn for `rounds` rounds."""
    from tf4ctr_dist.train.logs import quiet_library_logs

    quiet_library_logs()
    import torch

    from tf4ctr_dist.data.manifest import load_manifest

    manifest = load_manifest(spec["url"])
    steppers: dict[str, Callable[[], Any]] = {}
    for name in spec["variants"]:
        v = AB_VARIANTS[name]
        if v.get("reference"):
            steps = spec["warmup"] + spec["rounds"] * spec["per_round"] + spec.get("profile_steps", 0)
            steppers[name], _ = reference_stepper(spec, manifest, steps)
        else:
            steppers[name] = _build_variant(spec, v)
    losses: dict[str, list[float]] = {n: [] for n in steppers}
    for name, step in steppers.items():
        for _ in range(spec["warmup"]):
            step()
        log(f"  ab: {name} warmed up")
    rounds: dict[str, list[tuple[float, float]]] = {n: [] for n in steppers}
    names = list(steppers)
    for r in range(spec["rounds"]):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(spec["per_round"]):
                out = steppers[name]()
            rounds[name].append((time.perf_counter() - t0, time.process_time() - c0))
            losses[name].append(float(out[0]))
        log(f"  ab round {r + 1}/{spec['rounds']}: " + ", ".join(
            f"{n} {spec['per_round'] * spec['batch'] / rounds[n][-1][0]:,.0f}/s" for n in names))
    device = torch.device("cpu")
    profiles = ({n: profile_steps(steppers[n], spec["profile_steps"], device) for n in names}
                if spec.get("profile_steps") else {})
    return {"rounds": rounds, "losses": losses, "threads": torch.get_num_threads(), "profiles": profiles}


def ab_spec(url: str, variants: Sequence[str], *, batch: int, warmup: int, rounds: int, per_round: int,
            profile_steps: int = 0) -> dict:
    from tf4ctr_dist.config import DataConfig

    return {"url": url, "variants": list(variants), "batch": batch, "warmup": warmup, "rounds": rounds,
            "per_round": per_round, "seed": SEED, "model": model_cfg(), "loss": dict(LOSS),
            "shuffle_buffer_rows": DataConfig().shuffle_buffer_rows, "profile_steps": profile_steps}


def run_ab(argv: Sequence[str] | None = None) -> dict:
    """A/B timing of training-step variants side by side (see AB_VARIANTS); prints ratios."""
    from tf4ctr_dist.distributed.spawn import spawn

    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="reference,default",
                   help=f"comma list, the first is the baseline: {','.join(AB_VARIANTS)}")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per-round", type=int, default=5, help="steps per variant per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the rounds, torch.profiler over STEPS steps of each variant (top ops printed)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(AB_VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}; choose from {','.join(AB_VARIANTS)}")
    spec = ab_spec(ensure_dataset(args.rows, args.cache_dir), variants, batch=args.batch, warmup=args.warmup,
                   rounds=args.rounds, per_round=args.per_round, profile_steps=args.profile)
    threads = args.threads or cores()
    machine = machine_info()
    log(f"A/B {variants} on {threads} thread(s), batch {args.batch}, {args.rounds} rounds x {args.per_round} steps; "
        f"load average {machine['loadavg_start'][0]:.2f}")
    r = spawn(ab_worker, 1, spec, backend="gloo", threads=threads, timeout=3600)[0]
    base = variants[0]
    summary = summarize_ab(r, variants, spec["per_round"], args.batch)
    rows = [(f"{n} samples/s (median of rounds)", s["samples_per_s"], "samples/s") for n, s in summary.items()]
    rows += [(f"{n} / {base} (median of per-round ratios; min..max {s['ratio_vs_base_min']:.2f}..{s['ratio_vs_base_max']:.2f})",
              s["ratio_vs_base"], "x") for n, s in summary.items() if n != base]
    rows += [(f"{n} / {base} per CPU-second", s["cpu_ratio_vs_base"], "x") for n, s in summary.items() if n != base]
    rows += [(f"{n} / {s['previous']} (median of per-round ratios)", s["ratio_vs_previous"], "x")
             for n, s in list(summary.items())[2:]]
    machine["loadavg_end"] = os.getloadavg()
    for name, prof in r["profiles"].items():
        print(f"\n-- profile of {name}: {prof['wall_ms_per_step']:.1f} ms per step (wall, profiled)")
        for op in prof["top_ops"][:15]:
            print(f"  {op['self_cpu_share'] * 100:5.1f}%  {op['self_cpu_ms_per_step']:7.2f} ms  "
                  f"{op['calls_per_step']:5.0f} calls  {op['name'][:70]}")
    print(format_table(rows))
    print(f"(threads {r['threads']}; load average start {machine['loadavg_start'][0]:.2f}, "
          f"end {machine['loadavg_end'][0]:.2f})")
    report = {"summary": summary, "raw": r, "config": {**spec, "threads": threads, "argv": list(argv or [])},
              "machine": machine}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return report


def interleaved(url: str, *, batch: int, rounds: int, threads: int, timeout: float) -> dict:
    """The benchmark's interleaved section: the reference, our 1-worker default (fp32 and bf16)
    and fp32 with train.cpu_kernels=off, 2 steps of each in turn for `rounds` rounds."""
    from tf4ctr_dist.distributed.spawn import spawn

    variants = list(INTERLEAVED_VARIANTS)
    spec = ab_spec(url, variants, batch=batch, warmup=3, rounds=rounds, per_round=2)
    log(f"interleaved: {', '.join(variants)} in one process x {threads} threads, "
        f"{spec['rounds']} rounds x {spec['per_round']} steps each")
    r = spawn(ab_worker, 1, spec, backend="gloo", threads=threads, timeout=timeout)[0]
    summary = summarize_ab(r, variants, spec["per_round"], batch)
    for name, v in summary.items():
        log(f"  {name}: {v['samples_per_s']:,.0f} samples/s, {v['ratio_vs_base']:.2f}x the reference "
            f"(per-round {v['ratio_vs_base_min']:.2f}..{v['ratio_vs_base_max']:.2f})")
    return {"variants": summary, "rounds": r["rounds"], "threads": r["threads"],
            "spec": {k: spec[k] for k in ("warmup", "rounds", "per_round", "batch")}}


if __name__ == "__main__":
    run_ab()
