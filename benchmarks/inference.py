"""Inference speed, interleaved in ONE process: `python -m benchmarks.inference`.

The forward that evaluation, `tf4ctr predict` and `tf4ctr serve` run, against the plain
single-process PyTorch forward of the same model (the reference's `predict`: `ReferenceTF4CTR`
in eval mode under no_grad, per-field nn.Embedding), at the same batch on the same preloaded
batches. Variants:

  reference   ReferenceTF4CTR.eval() forward (fp32, eager BatchNorm / ReLU)
  default     the 1-worker DMP in eval mode, as `evaluate_split` runs it: model.inference=fused
              (BatchNorm folded into the Linear, Linear + ReLU as one oneDNN op), fp32
  bf16        the same with model.inference_precision=bf16 (the matmuls in bfloat16)
  eager       model.inference=eager: the training-mode ops with dropout off (the earlier path)
  scorer      the single-device model `tf4ctr predict` and `tf4ctr serve` run (serving.export.
              build_model: unsharded EmbeddingBagCollection, model.inference=fused, fp32), on the
              same KJTs (its own random weights: timed, not compared)

Each variant scores every preloaded batch once per round; rounds rotate the order and the
ratios are medians of per-round ratios (a slow drift of the machine cannot bias them). The
three DMP variants hold the same weights (same seed, same few training steps, so that
BatchNorm's running statistics are not their initial 0 / 1), and the report gives how far
their probabilities are from `eager`'s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.probes import cores, machine_info
from benchmarks.report import format_table, summarize_ab
from benchmarks.settings import DEFAULT_CACHE, FIELDS, SEED, log, run_config, typed

INFERENCE_VARIANTS: dict[str, dict[str, str]] = {
    "reference": {},
    "default": {"inference": "fused", "inference_precision": "auto"},
    "bf16": {"inference": "fused", "inference_precision": "bf16"},
    "eager": {"inference": "eager", "inference_precision": "auto"},
    "scorer": {"inference": "fused", "inference_precision": "auto"},
}


def inference_worker(rank: int, world: int, spec: dict) -> dict:
    """Build every variant, preload the batches, then time them round by round."""
    from tf4ctr_dist.train.logs import quiet_library_logs

    quiet_library_logs()
    import torch

    from benchmarks.reference import ReferenceTF4CTR
    from tf4ctr_dist.config import RunConfig
    from tf4ctr_dist.data.manifest import load_manifest
    from tf4ctr_dist.train.setup import build_training

    manifest = load_manifest(spec["url"])
    names = spec["variants"]
    models: dict[str, Any] = {}
    batches = ids = None
    for name in names:
        if name in ("reference", "scorer"):
            continue
        cfg = RunConfig.from_dict(run_config(spec["url"], workers=1, batch=spec["train_batch"],
                                             eval_batch=spec["batch"], model=INFERENCE_VARIANTS[name]))
        parts = build_training(cfg, 0, 1, torch.device("cpu"), splits=("train", "valid"))
        # The same seed, data and steps give every variant the same weights; a few steps so that
        # BatchNorm's running statistics are real ones.
        it = parts.readers["train"].iter_epoch(0)
        for _ in range(spec["train_steps"]):
            parts.pipeline.progress(it)
        if batches is None:
            with parts.readers["valid"] as reader:
                batches = list(itertools.islice(reader.iter_epoch(0), spec["batches"]))
        parts.pipeline.detach()  # the pipeline's hooks off: dmp(batch) runs as in evaluation
        parts.dmp.eval()
        models[name] = parts.dmp
    assert batches is not None
    if "scorer" in names:
        from tf4ctr_dist.serving.export import build_model

        cfg = RunConfig.from_dict(run_config(spec["url"], workers=1, batch=spec["train_batch"],
                                             eval_batch=spec["batch"], model=INFERENCE_VARIANTS["scorer"]))
        models["scorer"] = build_model(manifest, cfg).eval()
    if "reference" in names:
        model_cfg, _ = typed(spec["model"], spec["loss"])
        torch.manual_seed(SEED)
        models["reference"] = ReferenceTF4CTR([f.vocab_size for f in manifest.fields], model_cfg).eval()
        # (F, B) field-major ids -> (B, F): the reference takes one id per field and row
        ids = [b.sparse_features.values().view(len(manifest.fields), -1).t().contiguous() for b in batches]

    def forward(name: str) -> list:
        with torch.no_grad():
            if name == "reference":
                return [torch.sigmoid(models[name](x)[0]).view(-1) for x in ids]
            if name == "scorer":
                return [torch.sigmoid(models[name](b.sparse_features)[0]).view(-1) for b in batches]
            return [models[name](b)[1][1] for b in batches]  # (loss, (z, p, y, valid)) -> p

    samples = sum(int(b.valid.sum()) for b in batches)
    outputs = {}
    for name in names:
        for _ in range(spec["warmup"]):
            outputs[name] = torch.cat(forward(name))
        log(f"  inference: {name} warmed up")
    agreement = {}
    if "eager" in outputs:
        for name in ("default", "bf16"):
            if name in outputs:
                agreement[name] = float((outputs[name] - outputs["eager"]).abs().max())
    rounds: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(spec["rounds"]):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            forward(name)
            rounds[name].append((time.perf_counter() - t0, time.process_time() - c0))
        log(f"  inference round {r + 1}/{spec['rounds']}: " + ", ".join(
            f"{n} {samples / rounds[n][-1][0]:,.0f}/s" for n in names))
    # summarize_ab reports each variant's last "losses"; for a forward that is its mean probability
    means = {n: [float(outputs[n].mean())] for n in names}
    return {"rounds": rounds, "losses": means, "samples_per_round": samples, "threads": torch.get_num_threads(),
            "max_abs_diff_vs_eager": agreement}


def inference_spec(url: str, *, batch: int, batches: int, rounds: int, variants: Sequence[str] = tuple(INFERENCE_VARIANTS),
                   warmup: int = 2, train_steps: int = 3, train_batch: int = 4096) -> dict:
    from benchmarks.settings import LOSS, model_cfg

    return {"url": url, "variants": list(variants), "batch": batch, "batches": batches, "rounds": rounds,
            "warmup": warmup, "train_steps": train_steps, "train_batch": train_batch, "model": model_cfg(),
            "loss": dict(LOSS)}


def inference_section(url: str, *, batch: int, batches: int, rounds: int, threads: int, timeout: float) -> dict:
    """The benchmark's inference section (and the body of `python -m benchmarks.inference`)."""
    from tf4ctr_dist.distributed.spawn import spawn

    spec = inference_spec(url, batch=batch, batches=batches, rounds=rounds)
    log(f"inference: {', '.join(spec['variants'])} in one process x {threads} threads, batch {batch}, "
        f"{batches} preloaded batches, {rounds} rounds")
    r = spawn(inference_worker, 1, spec, backend="gloo", threads=threads, timeout=timeout)[0]
    # summarize_ab counts per_round * batch samples per round: one "step" of samples_per_round
    summary = summarize_ab(r, spec["variants"], 1, r["samples_per_round"])
    for name, v in summary.items():
        log(f"  {name}: {v['samples_per_s']:,.0f} samples/s, {v['ratio_vs_base']:.2f}x the reference "
            f"(per-round {v['ratio_vs_base_min']:.2f}..{v['ratio_vs_base_max']:.2f})")
    return {"variants": summary, "rounds": r["rounds"], "threads": r["threads"],
            "max_abs_diff_vs_eager": r["max_abs_diff_vs_eager"],
            "spec": {k: spec[k] for k in ("batch", "batches", "rounds", "warmup", "train_steps")}}


def main(argv: Sequence[str] | None = None) -> dict:
    from benchmarks.probes import measure_bf16_matmul, measure_matmul, model_flops
    from benchmarks.settings import LOSS, model_cfg
    from benchmarks.workers import ensure_dataset

    p = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=16384, help="the evaluation batch (the benchmark's --eval-batch)")
    p.add_argument("--batches", type=int, default=3, help="preloaded batches scored per round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--out", help="write the JSON here")
    args = p.parse_args(argv)
    import torch

    threads = args.threads or cores()
    machine = machine_info()
    url = ensure_dataset(args.rows, args.cache_dir)
    torch.set_num_threads(threads)
    mm = measure_matmul(2048)
    mm_bf16 = measure_bf16_matmul(2048)
    bf16_rate = mm_bf16["flops_per_s"] if mm_bf16 else None
    flops = model_flops(model_cfg(), dict(LOSS), fields=FIELDS)
    section = inference_section(url, batch=args.batch, batches=args.batches, rounds=args.rounds, threads=threads,
                                timeout=3600)
    derived = inference_figures(section, flops["forward_per_sample"], mm["flops_per_s"], bf16_rate)
    machine["loadavg_end"] = os.getloadavg()
    rows = inference_rows(derived, section)
    rows += [("fp32 matmul 2048^2, all threads (best)", mm["flops_per_s"], "FLOP/s"),
             ("bf16 matmul 2048^2, all threads (best)", bf16_rate, "FLOP/s"),
             ("dense FLOPs per inference sample (counted)", flops["forward_per_sample"], "FLOP")]
    print(format_table(rows))
    print(f"(threads {threads}; load average start {machine['loadavg_start'][0]:.2f}, "
          f"end {machine['loadavg_end'][0]:.2f})")
    report = {**derived, "raw": {"inference": section, "flops": flops, "matmul": {"fp32": mm, "bf16": mm_bf16}},
              "machine": machine, "config": {"argv": list(argv) if argv is not None else [], "threads": threads}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        log(f"wrote {args.out}")
    return report


def inference_figures(section: dict | None, forward_flops: float | None, matmul_flops: float | None,
                      matmul_bf16_flops: float | None) -> dict[str, float | None]:
    """The inference headline figures of a section (None where not measured)."""
    from benchmarks.report import _get, ratio

    v = (section or {}).get("variants") or {}
    dense = lambda rate: None if rate is None or forward_flops is None else rate * forward_flops  # noqa: E731
    default = _get(v, "default.samples_per_s")
    bf16 = _get(v, "bf16.samples_per_s")
    return {
        "inference_vs_reference": _get(v, "default.ratio_vs_base"),
        "inference_vs_reference_bf16": _get(v, "bf16.ratio_vs_base"),
        "inference_vs_reference_eager": _get(v, "eager.ratio_vs_base"),
        "inference_vs_reference_scorer": _get(v, "scorer.ratio_vs_base"),
        "inference_roofline_share": ratio(dense(default), matmul_flops),
        "inference_roofline_share_bf16": ratio(dense(bf16), matmul_bf16_flops),
        "reference_inference_roofline_share": ratio(dense(_get(v, "reference.samples_per_s")), matmul_flops),
    }


def inference_rows(derived: dict, section: dict | None) -> list[tuple[str, Any, str]]:
    from benchmarks.report import _get

    if not section:
        return []
    v = section["variants"]
    rows: list[tuple[str, Any, str]] = [
        (f"inference (eval forward, batch {section['spec']['batch']}, interleaved in one process)", "", "")]
    for name, label in (("reference", "reference forward (nn.Embedding, eager BN/ReLU)"),
                        ("default", "ours 1w, model.inference=fused, fp32"),
                        ("bf16", "ours 1w, inference_precision=bf16"),
                        ("eager", "ours 1w, model.inference=eager"),
                        ("scorer", "predict / serve model (unsharded EBC), fused fp32")):
        if name in v:
            rows.append((label, _get(v, f"{name}.samples_per_s"), "samples/s"))
    rows.append(("ratio ours fused fp32 / reference", derived.get("inference_vs_reference"), "x"))
    rows.append(("ratio ours bf16 / reference", derived.get("inference_vs_reference_bf16"), "x"))
    rows.append(("ratio ours eager / reference", derived.get("inference_vs_reference_eager"), "x"))
    if "scorer" in v:
        rows.append(("ratio predict / serve model / reference", derived.get("inference_vs_reference_scorer"), "x"))
    rows.append(("inference roofline share, fused fp32 (vs fp32 mm)", derived.get("inference_roofline_share"), "%"))
    rows.append(("inference roofline share, bf16 (vs bf16 mm)", derived.get("inference_roofline_share_bf16"), "%"))
    rows.append(("inference roofline share, reference (vs fp32 mm)",
                 derived.get("reference_inference_roofline_share"), "%"))
    for name, diff in section.get("max_abs_diff_vs_eager", {}).items():
        rows.append((f"max |p_{name} - p_eager| over the batches", diff, ""))
    return rows


if __name__ == "__main__":
    main()
