"""BatchNorm1d -> ReLU -> dropout as one compiled CPU kernel (csrc/bn_relu_dropout.cpp).

Why: on the Criteo-shaped benchmark each hidden layer's BatchNorm + ReLU + dropout took about
7.5 ms forward and backward on a (4096, 400) float32 activation (2 cores), five layers a step,
mostly passes over memory; the kernel does the same in about 2.6 ms (BENCHMARKS.md, speed-up 7).

The kernel is compiled on first use with torch's C++ extension builder (g++, ninja) for the CPU
it runs on, and cached under `TF4CTR_KERNEL_DIR` (default ~/.cache/tf4ctr_dist/kernels) by a
name that hashes the source, the CPU and the torch version. Where it cannot be built (no
compiler, say) one warning is printed and the eager path runs instead; TF4CTR_CPU_KERNELS=0
switches it off.
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

_SOURCE = Path(__file__).with_name("csrc") / "bn_relu_dropout.cpp"
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
    for part in (_SOURCE.read_bytes(), " ".join(_CFLAGS).encode(), _cpu_signature().encode(),
                 torch.__version__.encode(), sys.version.encode()):
        digest.update(part)
    return f"tf4ctr_bn_relu_dropout_{digest.hexdigest()[:12]}"


@functools.cache
def bn_relu_dropout_extension() -> Any | None:
    """The compiled kernel's ops (`torch.ops.tf4ctr`), built on the first call of the process if
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
            print(f"[tf4ctr] compiling the fused BatchNorm/ReLU/dropout CPU kernel into {build_dir} "
                  "(once per machine and source version, about 15 s)", file=sys.stderr, flush=True)
        cpp_extension.load(name, [str(_SOURCE)], extra_cflags=_CFLAGS, build_directory=str(build_dir),
                           is_python_module=False, verbose=False)
        return torch.ops.tf4ctr
    except Exception as e:  # no compiler, no headers, read-only cache...: run the eager ops
        warnings.warn(f"tf4ctr_dist: the fused BatchNorm/ReLU/dropout CPU kernel could not be built "
                      f"({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}); "
                      "using the eager ops (slower)", RuntimeWarning, stacklevel=2)
        return None


def available() -> bool:
    """Whether float32 CPU training runs the kernel: switched on and built (or buildable)."""
    return ENABLED and bn_relu_dropout_extension() is not None


class BatchNormReLUDropout(torch.autograd.Function):
    """y = relu(batch_norm(x + shift)) * keep * scale, x (B, N) float32 contiguous, shift (N) the
    preceding Linear's bias (its gradient is zero: BatchNorm cancels it; it moves the running
    mean). Saves x, y and the batch statistics. `ext` is `bn_relu_dropout_extension()`; the keep
    lanes are numpy SFC64 words from `sfc64_state` ((4,) int64), as `dropout_keep_mask` draws
    them; unused when drop_levels is 0."""

    @staticmethod
    def forward(ctx, x, shift, weight, bias, running_mean, running_var, ext, momentum, eps, drop_levels, scale,
                sfc64_state):  # type: ignore[override]
        y, mean, invstd = ext.bn_relu_dropout_forward(x, shift, weight, bias, running_mean, running_var, momentum,
                                                      eps, drop_levels, scale, sfc64_state)
        ctx.save_for_backward(x, y, mean, invstd, weight)
        ctx.shift_grad = shift.requires_grad
        ctx.ext, ctx.scale = ext, scale
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, y, mean, invstd, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = ctx.ext.bn_relu_dropout_backward(
            grad.contiguous(), x, y, mean, invstd, weight, ctx.scale)
        grad_shift = torch.zeros_like(mean) if ctx.shift_grad else None
        return grad_x, grad_shift, grad_weight, grad_bias, None, None, None, None, None, None, None, None
