"""``tf4ctr plan``: offline TorchRec sharding plan, memory per rank and all-to-all bytes for a
cluster (no GPUs, no process group; tables built on device "meta").

Heavy imports (torch, torchrec) happen inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

PLAN_EXAMPLES = """\
examples:
  tf4ctr plan --synthetic-rows-total 1000000000 --fields 26 --gpus 64 --gpus-per-node 8 \\
      --gpu-type h100-80gb --batch-size 65536
  tf4ctr plan --manifest s3://bucket/criteo --gpus 16 --json runs/plan.json
  tf4ctr plan --vocab-sizes 1000000,2000,300 --gpu-type cpu --workers 2 sharding=table_wise \\
      embedding_optimizer=rowwise_adagrad
  tf4ctr plan --spec fields.yaml --gpus 8 ssem=share embedding_dim=32
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="offline sharding plan for a cluster: tables per rank, memory, all-to-all bytes",
        description="Run TorchRec's sharding planner for the TF4CTR tables on a described cluster "
        "(meta tensors: nothing is allocated), with training's placement rules. Prints the plan per "
        "table, memory per rank and an all-to-all estimate per sample.",
        epilog=PLAN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("vocabulary (one of)").add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", metavar="URL", help="prepared dataset (local path, file:// or s3://)")
    src.add_argument("--vocab-sizes", metavar="N,N,...", help="rows per field incl. PAD and OOV, comma separated")
    src.add_argument("--spec", metavar="FILE", help="YAML/JSON: fields: [{name, vocab_size, pooling_factor}] "
                     "or fields: {name: vocab_size} or vocab_sizes: [...]")
    src.add_argument("--synthetic-rows-total", type=int, metavar="N",
                     help="split N rows over --fields fields with a Criteo-like skew")
    p.add_argument("--fields", type=int, default=26, help="fields for --synthetic-rows-total (default 26)")
    p.add_argument("--skew", type=float, default=0.5,
                   help="--synthetic-rows-total: field i gets a share ~ skew**i (default 0.5)")

    model = p.add_argument_group("model")
    model.add_argument("--config", metavar="PRESET|FILE", help="preset name or YAML/JSON run config (default criteo_x4)")
    model.add_argument("--batch-size", type=int, help="GLOBAL batch size (default: the config's train.batch_size)")
    model.add_argument("overrides", nargs="*", help="key=value config settings, e.g. ssem=ser embedding_dim=16 "
                       "embedding_optimizer=rowwise_adagrad sharding=table_wise")

    cl = p.add_argument_group("cluster")
    cl.add_argument("--gpu-type", default="h100-80gb",
                    help="device type: h100-80gb (default), h200-141gb, a100-80gb or cpu")
    cl.add_argument("--gpus", type=int, help="number of GPUs (ranks)")
    cl.add_argument("--gpus-per-node", "--workers-per-node", dest="ranks_per_node", type=int,
                    help="ranks per node (default: 8 for GPUs; all workers on one host for cpu)")
    cl.add_argument("--workers", type=int, help="ranks for --gpu-type cpu (default: the config's cluster.workers)")
    cl.add_argument("--hbm-gib", type=float, help="override HBM per GPU (GiB)")
    cl.add_argument("--ddr-gib-per-node", type=float, help="override host memory per node (GiB)")
    cl.add_argument("--intra-node-gbps", type=float, help="override intra-node bandwidth per rank (GB/s)")
    cl.add_argument("--inter-node-gbps", type=float, help="override inter-node bandwidth per rank (GB/s)")

    out = p.add_argument_group("search and output")
    out.add_argument("--search", choices=("fast", "full"), default="fast",
                     help="full: training's exact planner search; fast (default): the same without plain "
                     "row_wise when the cluster has several nodes and every table fits in one node "
                     "(minutes -> seconds for 1024 ranks)")
    out.add_argument("--per-rank", action="store_true", help="print every rank (default: all up to 16 ranks)")
    out.add_argument("--json", metavar="OUT", help="also write the numbers as JSON (path or URL)")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tf4ctr_dist.cli.train import resolve_preset
    from tf4ctr_dist.config import load_config

    cfg = load_config(resolve_preset(args.config or "criteo_x4"), args.overrides)

    # torch / torchrec imports only now (seconds)
    from tf4ctr_dist.distributed.placement import ShardingError
    from tf4ctr_dist.planning import plan_sim

    # TorchRec's notes for planning without hardware ("Topology constructed directly", dry-run dense
    # size, "Sharding spec not found" for data-parallel tables on the root logger) are noise here.
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    try:
        if args.manifest:
            fields = plan_sim.fields_from_manifest(args.manifest)
        elif args.spec:
            fields = plan_sim.fields_from_spec(args.spec)
        elif args.vocab_sizes:
            try:
                sizes = [int(v) for v in args.vocab_sizes.split(",") if v.strip()]
            except ValueError:
                parser.error(f"--vocab-sizes: expected comma-separated integers, got {args.vocab_sizes!r}")
            fields = plan_sim.fields_from_vocab_sizes(sizes)
        else:
            fields = plan_sim.criteo_like_fields(args.synthetic_rows_total, args.fields, args.skew)
        device = plan_sim.DEVICE_TYPES.get(args.gpu_type)
        if device is None:
            parser.error(f"--gpu-type {args.gpu_type!r}: known types are {', '.join(plan_sim.DEVICE_TYPES)}")
        if device.compute_device == "cpu":
            world = args.workers or args.gpus or cfg.cluster.workers
        else:
            world = args.gpus or args.workers or cfg.cluster.workers
        cluster = plan_sim.ClusterSpec.of(
            args.gpu_type, world, args.ranks_per_node, hbm_gib=args.hbm_gib,
            ddr_gib_per_node=args.ddr_gib_per_node, intra_node_gbps=args.intra_node_gbps,
            inter_node_gbps=args.inter_node_gbps,
        )
        report = plan_sim.simulate_plan(fields, cfg, cluster, batch_size=args.batch_size, search=args.search)
    except plan_sim.PlanFitError as e:
        print(f"tf4ctr plan: error: {e}", file=sys.stderr)
        return 3
    except (ShardingError, ValueError, FileNotFoundError) as e:
        print(f"tf4ctr plan: error: {e}", file=sys.stderr)
        return 2
    print(plan_sim.format_report(report, per_rank=True if args.per_rank else None), flush=True)
    if args.json:
        import fsspec

        with fsspec.open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
        print(f"wrote {args.json}")
    return 0
