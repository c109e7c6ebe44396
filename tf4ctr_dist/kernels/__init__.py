"""This package's compiled CPU kernels (csrc/), registered as `torch.ops.tf4ctr`:

- BatchNorm1d -> ReLU -> dropout as one kernel (bn_relu_dropout.cpp). Why: on the Criteo-shaped
  benchmark each hidden layer's BatchNorm + ReLU + dropout took about 7.5 ms forward and backward
  on a (4096, 400) float32 activation (2 cores), five layers a step, mostly passes over memory;
  the kernel does the same in about 2.6 ms (BENCHMARKS.md, speed-up 7). It is also registered
  in two halves each way, for BatchNorm whose statistics are pooled over workers between them
  (`PooledBatchNormReLUDropout`, `train.sync_batch_norm`).
- The pooled tables' backward fused with the exact row-wise Adagrad update (rowwise_adagrad.cpp),
  which the distributed layer puts in place of fbgemm's CPU kernel
  (`tf4ctr_dist.distributed.table_kernel`). Why: fbgemm's took 26 ms of a 157 ms step for one
  table set, on one core, and drops weight decay on the CPU (BENCHMARKS.md, speed-up 9).

The setting is ``train.cpu_kernels``: ``on`` requires them (the run fails where they cannot be
built), ``auto`` uses them where they build and falls back to the eager ops and fbgemm's kernel
with one warning, ``off`` never builds them. `load(mode)` returns the `CpuKernels` handle (or
None), which builders pass into the model (`tf4ctr(..., cpu_kernels=...)`) and the sharding code
(`shard_model(..., table_kernel=...)`). ``python -m tf4ctr_dist.kernels`` builds them ahead.
"""

from tf4ctr_dist.kernels.build import KernelUnavailable, kernel_dir, load, loaded
from tf4ctr_dist.kernels.ops import BatchNormReLUDropout, CpuKernels, PooledBatchNormReLUDropout, StatisticsPool

__all__ = ["BatchNormReLUDropout", "CpuKernels", "KernelUnavailable", "PooledBatchNormReLUDropout", "StatisticsPool",
           "kernel_dir", "load", "loaded"]
