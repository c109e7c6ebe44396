"""Ray Train orchestration: the driver builds a TorchTrainer; all heavy work runs in workers.

Credentials for object storage are never passed through the config: workers inherit the
driver's environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...) on a
local cluster, and use the node's role or the cluster's secret store elsewhere.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec

from tf4ctr_dist.config import RunConfig


def _ray_worker(loop_config: dict) -> None:
    from tf4ctr_dist.train.logs import quiet_library_logs

    quiet_library_logs()
    import ray.train
    import ray.train.torch

    from tf4ctr_dist.train.loop import WorkerContext, train_worker

    cfg = RunConfig.from_dict(loop_config["config"])
    context = ray.train.get_context()
    ctx = WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        report=lambda metrics: ray.train.report(metrics),
    )
    train_worker(cfg, ctx)


def _init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Dev mode: a local cluster sized so every worker is schedulable even on a 2-core laptop.
    cpus = max(os.cpu_count() or 1, int(cfg.cluster.workers * cfg.cluster.cpus_per_worker) + 1)
    # With the dashboard: Ray Train's placement-group cleaner polls the State API, which the
    # dashboard serves, and without it logs a warning every second of the run (about 5 s more
    # start-up).
    ray.init(num_cpus=cpus, include_dashboard=True, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    print(f"[tf4ctr] started a local Ray cluster ({cpus} CPUs) for {cfg.cluster.workers} worker(s)", flush=True)


def _storage_path(out: str) -> str:
    if "://" in out and not out.startswith("file://"):
        return out.rstrip("/") + "/ray"
    return os.path.abspath(out.removeprefix("file://")) + "/ray"


def _expected_error(exc: BaseException) -> BaseException | None:
    """The first ConfigError / DataError / ShardingError behind a Ray Train failure (worker
    failures are keyed by rank and may be wrapped in Ray's task errors)."""
    from tf4ctr_dist.config import ConfigError
    from tf4ctr_dist.data.errors import DataError
    from tf4ctr_dist.distributed.sharding import ShardingError

    seen: set[int] = set()
    todo: list = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (ConfigError, DataError, ShardingError)):
            return e
        failures = getattr(e, "worker_failures", None) or {}
        todo.extend(failures[k] for k in sorted(failures))
        todo.extend([getattr(e, "cause", None), e.__cause__, getattr(e, "controller_failure", None)])
    return None


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """Launch ``cfg.cluster.workers`` Ray Train workers and return RUN_DIR/result.json."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    _init_ray(cfg)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.workers,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
        ),
        run_config=RayRunConfig(
            name=cfg.name,
            storage_path=_storage_path(cfg.out),
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - re-raised below
        ours = _expected_error(e)
        if ours is not None:  # bad config or data found inside a worker: one clear message
            raise ours from None
        raise
    with fsspec.open(cfg.out.rstrip("/") + "/result.json", "r") as f:
        return json.load(f)
