"""python -m tf4ctr_dist.kernels: build (or find cached) the CPU kernels and say whether they load."""

import sys

from tf4ctr_dist.kernels import kernel_dir, load

if __name__ == "__main__":
    ok = load("auto") is not None
    print(f"[setup] CPU kernels {'ready' if ok else 'unavailable'} ({kernel_dir()})"
          + ("" if ok else ": cpu_kernels=auto runs the eager ops and fbgemm's kernels"))
    sys.exit(0)
