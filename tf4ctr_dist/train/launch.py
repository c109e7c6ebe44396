"""Ray Train orchestration: the driver builds a TorchTrainer; all heavy work runs in workers.

Credentials for object storage are never passed through the config: workers inherit the
driver's environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...) on a
local cluster, and use the node's role or the cluster's secret store elsewhere.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Sequence

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


# Ray reads this once, when it is first imported: "0" keeps a local cluster's node address at
# 127.0.0.1 instead of resolving it to the machine's address, and with that address the GCS,
# raylet, workers and agents listen on the loopback interface only.
_LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# train.blas_numerics=portable: the same CPU code paths on every x86-64 CPU with AVX2, so a seed
# trains the same model on another CPU model. MKL_CBWR: MKL's own switch for its matrix products.
# ATEN_CPU_CAPABILITY: torch's vectorised elementwise kernels run two vectors per iteration and
# the leftover elements through scalar code that rounds differently (pow, sigmoid...); which
# elements are left over depends on the vector width (AVX2 or AVX-512) wherever a tensor's
# length mod 32 is 16 or more, e.g. the 375 rows of a worker's last batch at batch 1024.
PORTABLE_NUMERICS = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@functools.cache  # worker_env runs once per trial when a sweep checks its cluster settings
def _has_avx2() -> bool:
    """This machine's CPU runs AVX2 code (torch takes ATEN_CPU_CAPABILITY=avx2 without checking)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx2" in line.split() for line in f)
    except OSError:
        return False


def worker_env(cfg: RunConfig) -> dict[str, str]:
    """Environment variables the workers need from process start (the job's runtime_env).

    MKL reads MKL_CBWR and torch reads ATEN_CPU_CAPABILITY once, before any code of ours in a
    worker could set them, so ``train.blas_numerics=portable`` reaches the workers this way
    (ATEN_CPU_CAPABILITY only where this machine has AVX2: the workers are assumed to be CPUs of
    the same family). Each is left out where the user chose a value: in this process's
    environment, or in the runtime_env of the submitted Ray job (Ray refuses a driver
    runtime_env that repeats a job's variable)."""
    if cfg.train.blas_numerics != "portable":
        return {}
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    job_env = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {key: value for key, value in PORTABLE_NUMERICS.items()
            if key not in os.environ and key not in job_env and (key != "ATEN_CPU_CAPABILITY" or _has_avx2())}


def _init_ray(cfg: RunConfig) -> None:
    # Dev mode: a local cluster sized so every worker is schedulable even on a 2-core laptop.
    cpus = max(os.cpu_count() or 1, int(cfg.cluster.workers * cfg.cluster.cpus_per_worker) + 1)
    # With the dashboard: Ray Train's placement-group cleaner polls the State API, which the
    # dashboard serves, and without it logs a warning every second of the run (about 5 s more
    # start-up).
    init_ray(cfg.cluster.ray_address, cpus, worker_env(cfg), what=f"{cfg.cluster.workers} worker(s)",
             dashboard=True, log_to_driver=True)


def init_ray(address: str | None, cpus: int, env: dict[str, str] | None = None, *, what: str,
             dashboard: bool = False, log_to_driver: bool = True) -> bool:
    """Join the Ray cluster at ``address`` (or $RAY_ADDRESS), or else start a private local one
    on 127.0.0.1 with ``cpus`` CPUs (dev mode); nothing when Ray is already initialised in this
    process. ``env``: environment variables for the workers. Returns True when this call
    started or joined Ray (the caller shuts it down when done)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and "ray" not in sys.modules:
        # Dev mode: nothing outside this machine may reach the local cluster (it runs any code
        # it is sent). Set before ray's first import; its processes inherit it.
        os.environ[_LOOPBACK_ONLY_ENV] = "0"
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env={"env_vars": env} if env else None)
        return True
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        print(f"[tf4ctr] warning: ray was imported before the local cluster was started, so its "
              f"processes listen on this machine's network address too (set {_LOOPBACK_ONLY_ENV}=0 "
              f"before importing ray to keep them on 127.0.0.1)", file=sys.stderr, flush=True)
    # address="local": never join a cluster that someone else started on this machine.
    ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard,
             **({"dashboard_host": "127.0.0.1"} if dashboard else {}),
             _node_ip_address="127.0.0.1", log_to_driver=log_to_driver,
             runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", **(env or {})}})
    print(f"[tf4ctr] started a local Ray cluster ({cpus} CPUs, listening on 127.0.0.1 only) "
          f"for {what}", flush=True)
    return True


def _storage_path(out: str) -> str:
    if "://" in out and not out.startswith("file://"):
        return out.rstrip("/") + "/ray"
    return os.path.abspath(out.removeprefix("file://")) + "/ray"


def _expected_error(exc: BaseException) -> BaseException | None:
    """The first error behind a Ray Train failure that no restart can fix: a ConfigError,
    DataError or ShardingError, a missing file or bucket (FileNotFoundError) or denied access
    (PermissionError, which s3fs raises for AccessDenied). Worker failures are keyed by rank and
    may be wrapped in Ray's task and controller errors."""
    from tf4ctr_dist.config import ConfigError
    from tf4ctr_dist.data.errors import DataError
    from tf4ctr_dist.distributed.placement import ShardingError

    permanent = (ConfigError, DataError, ShardingError, FileNotFoundError, PermissionError)
    seen: set[int] = set()
    todo: list = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, permanent):
            return e
        failures = getattr(e, "worker_failures", None) or {}
        todo.extend(failures[k] for k in sorted(failures))
        todo.extend([getattr(e, "cause", None), e.__cause__, getattr(e, "controller_failure", None)])
    return None


def _stop_on_permanent_errors():
    """A Ray Train callback (run on the controller) that ends the run at the first worker error
    `_expected_error` calls permanent, whatever `max_failures` allows.

    Ray Train 2.60's failure policy retries every worker-group error, but an error raised by a
    controller callback becomes a ControllerError, which it does not retry: the run stops, the
    other workers are shut down (even those blocked in a collective) and the driver gets the
    original error as `controller_failure`. The class is built here so that importing this
    module does not import ray (see `_init_ray`)."""
    from ray.train import UserCallback

    class StopOnPermanentErrors(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for rank in sorted(worker_exceptions):
                error = _expected_error(worker_exceptions[rank])
                if error is not None:
                    raise error

    return StopOnPermanentErrors()


def run_training(cfg: RunConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Launch ``cfg.cluster.workers`` Ray Train workers and return RUN_DIR/result.json.

    ``callbacks``: more Ray Train callbacks for the controller (a sweep's trial passes Tune's
    TuneReportCallback, which forwards the per-epoch reports to Tune's schedulers)."""
    _init_ray(cfg)  # first: it decides how ray is imported
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
            callbacks=[_stop_on_permanent_errors(), *callbacks],
        ),
    )
    try:
        trainer.fit()
    except Exception as e:  # re-raised below
        ours = _expected_error(e)
        if ours is not None:  # bad config or data found inside a worker: one clear message
            raise ours from None
        raise
    with fsspec.open(cfg.out.rstrip("/") + "/result.json", "r") as f:
        return json.load(f)
