"""Machine probes: dense matmul FLOP/s, resident memory, counted model FLOPs, cores and versions."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.settings import FIELDS, log, typed


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that torch.utils.flop_counter counts while fn() runs (matmuls/convs; 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mlp_train_flops(in_dim: int, hidden: Sequence[int], batch: int, input_grad: bool) -> int:
    """Hand count for a Linear stack: forward 2*B*i*o each; backward 2*B*i*o for the weight
    gradient plus 2*B*i*o for the input gradient (not for the first layer without input_grad)."""
    total, prev = 0, in_dim
    for i, out in enumerate(hidden):
        mac = batch * prev * out
        total += 2 * mac + 2 * mac + (2 * mac if (i > 0 or input_grad) else 0)
        prev = out
    return total


def tf4ctr_train_flops_per_sample(fields: int, dim: int, easy: Sequence[int], hard: Sequence[int]) -> int:
    """Hand count of the TF4CTR (ser) dense part per training sample: both towers and both
    heads, every layer forward + weight grad + input grad (tables need the input gradient)."""
    easy_in, hard_in = fields * (dim // 2), fields * dim
    return (
        mlp_train_flops(easy_in, [*easy, 1], 1, True)  # MLP_s + simple head (400 -> 1)
        + mlp_train_flops(hard_in, [*hard, 1], 1, True)  # MLP_c + complex head
    )


def rss_bytes() -> dict[str, int | None]:
    """Current and peak resident set size of this process.

    /proc/self/status VmHWM is the peak of this address space only (it restarts at exec, so a
    spawned child does not inherit its parent's peak); getrusage's ru_maxrss is the fallback.
    psutil is not a dependency of this project.
    """
    out: dict[str, int | None] = {"rss_bytes": None, "rss_peak_bytes": None, "rss_source": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_bytes"] = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    out["rss_peak_bytes"] = int(line.split()[1]) * 1024
        out["rss_source"] = "/proc/self/status VmHWM"
    except OSError:
        pass
    if out["rss_peak_bytes"] is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["rss_peak_bytes"] = kib * (1 if sys.platform == "darwin" else 1024)
        out["rss_source"] = "getrusage ru_maxrss"
    return out


def measure_matmul(
    n: int = 2048, reps: int = 10, trials: int = 5, device: str = "cpu", dtype: str = "float32",
    shape: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Dense matmul FLOP/s with the current threads: (m,k)@(k,n) repeated; best and median trial."""
    import torch

    m, k, nn_ = shape or (n, n, n)
    dt = getattr(torch, dtype)
    dev = torch.device(device)
    a = torch.randn(m, k, device=dev).to(dt)
    b = torch.randn(k, nn_, device=dev).to(dt)
    c = torch.empty(m, nn_, device=dev, dtype=dt)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for _ in range(3):
        torch.mm(a, b, out=c)
    sync()
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        sync()
        rates.append(2.0 * m * k * nn_ * reps / (time.perf_counter() - t0))
    return {
        "flops_per_s": max(rates),
        "median_flops_per_s": statistics.median(rates),
        "shape": [m, k, nn_],
        "dtype": dtype,
        "device": device,
        "threads": torch.get_num_threads(),
    }


def measure_bf16_matmul(n: int = 2048) -> dict[str, Any] | None:
    """`measure_matmul` in bfloat16 on the CPU, or None where the CPU has no bf16 dot products
    (AVX2 only): there torch's portable bf16 mm is no roofline (one 2048^3 product took a minute
    on an AVX2 EPYC), and the bf16 variants' roofline shares are reported as unmeasured."""
    from tf4ctr_dist.modules.mlp import cpu_has_fast_bf16

    if not cpu_has_fast_bf16():
        log("bf16 matmul rate: not measured (this CPU has no bf16 dot products: AVX512-BF16 / AMX)")
        return None
    return measure_matmul(n, dtype="bfloat16")


def model_flops(model_cfg: dict, loss_cfg: dict, fields: int = FIELDS, batch: int = 256) -> dict[str, float]:
    """Counted dense FLOPs per sample of TF4CTRTrain: one forward+backward (train mode) and one
    forward (eval mode), through the real model code on tiny tables (lookups count 0 FLOPs)."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from data_tools.synthetic import default_field_names
    from tf4ctr_dist.data.batch import Batch
    from tf4ctr_dist.model import Objective, TF4CTRTrain, tf4ctr

    names = default_field_names(fields)
    torch.manual_seed(0)
    model, loss = typed(model_cfg, loss_cfg)
    module = TF4CTRTrain(tf4ctr([(n, 3) for n in names], model, device="cpu"), Objective(loss))
    kjt = KeyedJaggedTensor(
        keys=names,
        values=torch.ones(fields * batch, dtype=torch.int64),
        lengths=torch.ones(fields * batch, dtype=torch.int32),
    )
    labels = (torch.arange(batch) % 2).float()
    b = Batch(kjt, labels, torch.zeros(batch, dtype=torch.int64), torch.arange(batch), torch.ones(batch))

    def train_step() -> None:
        loss, _ = module(b)
        loss.backward()

    module.train()
    train = count_flops(train_step)
    module.eval()
    # with gradients on: under no_grad the fused inference path runs oneDNN's Linear + ReLU, which
    # the counter does not see; the portable path does the same matmuls
    fwd = count_flops(lambda: module(b))
    return {"train_per_sample": train / batch, "forward_per_sample": fwd / batch, "counted_batch": batch,
            "counter": "torch.utils.flop_counter.FlopCounterMode (matmuls only; BN/ReLU/loss/lookups not counted)"}


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = line.split(":", 1)[1].split()
                    flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in fl)
                    break
    except OSError:
        pass

    def version(dist_name: str) -> str | None:
        try:
            return md.version(dist_name)
        except md.PackageNotFoundError:
            return None

    gpu = None
    if torch.cuda.is_available():
        gpu = {"count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "cpu_flags": flags,
        "memory_bytes": mem,
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "torch": torch.__version__,
            "torchrec": version("torchrec"),
            "fbgemm_gpu": version("fbgemm_gpu") or version("fbgemm_gpu-cpu") or version("fbgemm-gpu-cpu"),
            "ray": version("ray"),
            "pyarrow": version("pyarrow"),
            "numpy": version("numpy"),
            "s3fs": version("s3fs"),
            "moto": version("moto"),
        },
        "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:6],
        "loadavg_start": os.getloadavg(),
    }
