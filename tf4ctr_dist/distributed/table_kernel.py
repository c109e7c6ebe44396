"""Which kernel trains fused CPU tables: this package's backward + row-wise Adagrad, or fbgemm's.

TorchRec's fused CPU tables with the exact row-wise Adagrad optimizer run the dispatcher op
``fbgemm::split_embedding_backward_codegen_rowwise_adagrad_cpu``. This package's kernel
(`tf4ctr_dist.kernels`, csrc/rowwise_adagrad.cpp) can be registered in its place. The two differ
in rounding, in speed (fbgemm's runs on one core at about 600 ns per distinct row) and in weight
decay, which fbgemm's CPU kernel drops and this one applies.

Routing is process-wide by nature: the dispatcher holds one CPU kernel per op for the whole
process, and fbgemm's table modules call the op by name, so there is no per-model switch to pass
anywhere. `shard_model` therefore sets the routing for the model it wraps (the last call in a
process wins); benchmarks that alternate variants in one process call `route_table_backward`
before each variant's step.
"""

from __future__ import annotations

from typing import Optional

import torch

from tf4ctr_dist.distributed.placement import EmbeddingPlacement
from tf4ctr_dist.kernels import CpuKernels, loaded


def table_kernel_applies(placement: EmbeddingPlacement, device: torch.device) -> bool:
    """Whether these tables run the op the kernel stands in for: CPU, fused, row-wise Adagrad
    (on a GPU fbgemm's own kernel runs, and applies weight decay)."""
    return device.type == "cpu" and placement.fused and placement.optimizer == "rowwise_adagrad"


def uses_table_kernel(placement: EmbeddingPlacement, device: torch.device, kernels: Optional[CpuKernels]) -> bool:
    """Whether fused tables on ``device`` train with this package's kernel given ``kernels``
    (the loaded kernels, or None: fbgemm's)."""
    return kernels is not None and table_kernel_applies(placement, device)


def route_table_backward(kernels: Optional[CpuKernels], on: bool) -> bool:
    """Make fbgemm's CPU row-wise Adagrad backward op dispatch to this package's kernel (``on``)
    or back to fbgemm's own, for the whole process. Returns whether it was routed before.

    ``kernels=None`` (not loaded, or switched off): routing in is impossible and raises; routing
    out undoes a routing made earlier in this process with kernels loaded then, if any."""
    if kernels is None:
        if on:
            raise ValueError("route_table_backward(None, on=True): the CPU kernels are not loaded")
        kernels = loaded()
        if kernels is None:
            return False  # never loaded in this process, so never routed
    import fbgemm_gpu  # noqa: F401  (defines the op being routed)

    return bool(kernels.route_fbgemm_rowwise_adagrad(on))
