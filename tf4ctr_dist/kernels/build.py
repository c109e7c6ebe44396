"""Build (once per machine and source version) and load the compiled CPU kernels.

They are compiled with torch's C++ extension builder (the C++ compiler named by $CXX, default
c++, and ninja) for the CPU they run on, and cached under ``TF4CTR_KERNEL_DIR`` (default
~/.cache/tf4ctr_dist/kernels) by a name that hashes the sources, the flags, the CPU and the
torch and Python versions, so a cached build is never loaded where it was not built for.
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
from typing import Optional, Union

import torch

from tf4ctr_dist.config import ConfigError
from tf4ctr_dist.kernels.ops import CpuKernels

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("bn_relu_dropout.cpp", "rowwise_adagrad.cpp")]
# -ffp-contract=off: no multiply-add is fused into an FMA, so the kernels round the same on every
# x86-64 CPU whatever -march=native enables (their loops vectorise across columns, each column
# summed in row order: the vector width does not change the sums either).
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
MODES = ("auto", "on", "off")


class KernelUnavailable(ConfigError):
    """``cpu_kernels=on`` and the kernels cannot be built or loaded on this machine."""


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


def build_name() -> str:
    digest = hashlib.sha256()
    for part in (*(s.read_bytes() for s in SOURCES), " ".join(_CFLAGS).encode(), _cpu_signature().encode(),
                 torch.__version__.encode(), sys.version.encode()):
        digest.update(part)
    return f"tf4ctr_cpu_kernels_{digest.hexdigest()[:12]}"


def _reason(e: BaseException) -> str:
    """One line on why: the builder's message holds the whole compiler log, whose last line
    ("ninja: build stopped") says nothing; the first line that names a problem does."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    telling = [line for line in lines if any(k in line for k in ("not found", "error:", "No such file", "fatal"))]
    return f"{type(e).__name__}: {(telling or lines or [''])[0 if telling else -1]}"


@functools.cache
def _build() -> Union[CpuKernels, str]:
    """The loaded kernels, or why they could not be built or loaded. Tried once per process: a
    failed compile is not retried (it would fail again, slowly)."""
    from torch.utils import cpp_extension

    name = build_name()
    build_dir = kernel_dir() / name
    try:
        if shutil.which("ninja") is None:
            import ninja  # the pip package; torch's builder looks for the executable on PATH

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        build_dir.mkdir(parents=True, exist_ok=True)
        if not (build_dir / f"{name}.so").exists():
            print(f"[tf4ctr] compiling the CPU kernels into {build_dir} "
                  "(once per machine and source version, about 30 s)", file=sys.stderr, flush=True)
        cpp_extension.load(name, [str(s) for s in SOURCES], extra_cflags=_CFLAGS, build_directory=str(build_dir),
                           is_python_module=False, verbose=False)
        return CpuKernels.from_namespace(torch.ops.tf4ctr)
    except Exception as e:  # no compiler, no headers, read-only cache...
        return _reason(e)


@functools.cache
def _warn_fallback(reason: str) -> None:
    """One warning per process and reason (cached), not one per model built."""
    warnings.warn(f"tf4ctr_dist: the CPU kernels could not be built ({reason}); cpu_kernels=auto runs the eager "
                  "ops and fbgemm's table backward instead (slower; fbgemm's CPU kernel drops embedding weight "
                  "decay, so such runs are refused)", RuntimeWarning, stacklevel=3)


def load(mode: str) -> Optional[CpuKernels]:
    """The kernels for ``train.cpu_kernels`` = ``mode``: "off" -> None without building;
    "auto" -> built and loaded, or None after one warning where they cannot be; "on" -> built
    and loaded, or KernelUnavailable saying why."""
    if mode not in MODES:
        raise ConfigError(f"cpu_kernels={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return None
    built = _build()
    if isinstance(built, CpuKernels):
        return built
    if mode == "on":
        raise KernelUnavailable(
            f"cpu_kernels=on but the CPU kernels could not be built or loaded on this machine ({built}). "
            f"They need a C++ compiler ($CXX, default c++), ninja and a writable {kernel_dir()} "
            "(TF4CTR_KERNEL_DIR); install them, or set cpu_kernels=auto (fall back to the eager ops) or off")
    _warn_fallback(built)
    return None


def loaded() -> Optional[CpuKernels]:
    """The kernels if this process has already loaded them, else None; never builds."""
    if _build.cache_info().currsize == 0:
        return None
    built = _build()
    return built if isinstance(built, CpuKernels) else None
