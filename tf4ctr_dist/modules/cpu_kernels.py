"""Compiled CPU kernels (csrc/), registered as `torch.ops.tf4ctr`:

- BatchNorm1d -> ReLU -> dropout as one kernel (bn_relu_dropout.cpp). Why: on the Criteo-shaped
  benchmark each hidden layer's BatchNorm + ReLU + dropout took about 7.5 ms forward and backward
  on a (4096, 400) float32 activation (2 cores), five layers a step, mostly passes over memory;
  the kernel does the same in about 2.6 ms (BENCHMARKS.md, speed-up 7).
- The pooled tables' backward fused with the exact row-wise Adagrad update (rowwise_adagrad.cpp),
  which `route_fbgemm_rowwise_adagrad` puts in place of fbgemm's CPU kernel. Why: fbgemm's took
  26 ms of a 157 ms step for one table set, on one core, and drops weight decay on the CPU
  (BENCHMARKS.md, speed-up 9).

They are compiled on first use with torch's C++ extension builder (g++, ninja) for the CPU they
run on, and cached under `TF4CTR_KERNEL_DIR` (default ~/.cache/tf4ctr_dist/kernels) by a name that
hashes the sources, the CPU and the torch version. Where they cannot be built (no compiler, say)
one warning is printed and the eager ops and fbgemm's kernel run instead; TF4CTR_CPU_KERNELS=0
switches them off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("bn_relu_dropout.cpp", "rowwise_adagrad.cpp")]
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]

_SWITCH_VALUES = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


def switch_from_env(name: str = "TF4CTR_CPU_KERNELS", default: bool = True) -> bool:
    """An on/off environment variable: 1/true/on/yes or 0/false/off/no; anything else is an error."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return _SWITCH_VALUES[raw.strip().lower()]
    except KeyError:
        raise ValueError(f"{name}={raw!r}: expected 1/true/on/yes or 0/false/off/no") from None


# Module switch (A/B timing, tests): False makes MLPEncoder run the eager BatchNorm + relu_dropout;
# TF4CTR_CPU_KERNELS=0 sets it for a whole run.
ENABLED = switch_from_env()


def _cpu_signature() -> str:
    """The CPU model and its feature flags: a -march=native build only runs where these match."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def kernel_dir() -> Path:
    return Path(os.environ.get("TF4CTR_KERNEL_DIR", Path.home() / ".cache" / "tf4ctr_dist" / "kernels"))


def _build_name() -> str:
    digest = hashlib.sha256()
    for part in (*(s.read_bytes() for s in _SOURCES), " ".join(_CFLAGS).encode(), _cpu_signature().encode(),
                 torch.__version__.encode(), sys.version.encode()):
        digest.update(part)
    return f"tf4ctr_cpu_kernels_{digest.hexdigest()[:12]}"


@functools.cache
def cpu_extension() -> Any | None:
    """The compiled kernels' ops (`torch.ops.tf4ctr`), built on the first call of the process if
    not cached; None (after one warning) where they cannot be built or loaded."""
    from torch.utils import cpp_extension

    name = _build_name()
    build_dir = kernel_dir() / name
    try:
        if shutil.which("ninja") is None:
            import ninja  # the pip package; torch's builder looks for the executable on PATH

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        build_dir.mkdir(parents=True, exist_ok=True)
        if not (build_dir / f"{name}.so").exists():
            print(f"[tf4ctr] compiling the CPU kernels into {build_dir} "
                  "(once per machine and source version, about 30 s)", file=sys.stderr, flush=True)
        cpp_extension.load(name, [str(s) for s in _SOURCES], extra_cflags=_CFLAGS, build_directory=str(build_dir),
                           is_python_module=False, verbose=False)
        return torch.ops.tf4ctr
    except Exception as e:  # no compiler, no headers, read-only cache...: run the eager ops
        warnings.warn(f"tf4ctr_dist: the CPU kernels could not be built "
                      f"({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}); "
                      "using the eager ops and fbgemm's table backward (slower)", RuntimeWarning, stacklevel=2)
        return None


def available() -> bool:
    """Whether float32 CPU training runs the kernels: switched on and built (or buildable)."""
    return ENABLED and cpu_extension() is not None


def route_fbgemm_rowwise_adagrad(on: bool) -> bool:
    """Make `fbgemm::split_embedding_backward_codegen_rowwise_adagrad_cpu` (the CPU backward of
    fbgemm's pooled tables with the exact row-wise Adagrad optimizer, which TorchRec's fused CPU
    tables run) dispatch to this package's kernel (on) or back to fbgemm's own (off), for the
    whole process. Returns whether it was routed before; a no-op returning False where the kernels
    are switched off or unavailable. The two differ in rounding and in weight decay, which
    fbgemm's CPU kernel drops and this one applies (csrc/rowwise_adagrad.cpp)."""
    ext = cpu_extension() if ENABLED or not on else None
    if ext is None:
        return False
    import fbgemm_gpu  # noqa: F401  (defines the op being routed)

    return bool(ext.route_fbgemm_rowwise_adagrad(on))


class BatchNormReLUDropout(torch.autograd.Function):
    """y = relu(batch_norm(x + shift)) * keep * scale, x (B, N) float32 contiguous, shift (N) the
    preceding Linear's bias (its gradient is zero: BatchNorm cancels it; it moves the running
    mean). Saves x, the ReLU-and-dropout mask ((B, N) uint8) and the batch statistics. `ext` is
    `cpu_extension()`; the keep lanes are numpy SFC64 words from `sfc64_state` ((4,) int64), as
    `dropout_keep_mask` draws them; unused when drop_levels is 0."""

    @staticmethod
    def forward(ctx, x, shift, weight, bias, running_mean, running_var, ext, momentum, eps, drop_levels, scale,
                sfc64_state):  # type: ignore[override]
        y, mean, invstd, mask = ext.bn_relu_dropout_forward(x, shift, weight, bias, running_mean, running_var, momentum,
                                                      eps, drop_levels, scale, sfc64_state)
        ctx.save_for_backward(x, mask, mean, invstd, weight)
        ctx.shift_grad = shift.requires_grad
        ctx.ext, ctx.scale = ext, scale
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, mask, mean, invstd, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = ctx.ext.bn_relu_dropout_backward(
            grad.contiguous(), x, mask, mean, invstd, weight, ctx.scale)
        grad_shift = torch.zeros_like(mean) if ctx.shift_grad else None
        return grad_x, grad_shift, grad_weight, grad_bias, None, None, None, None, None, None, None, None
