"""The handle to the compiled kernels that builders pass into the model and the sharding code, and
the autograd Functions around the BatchNorm -> ReLU -> dropout kernel (statistics of the input's
own rows, or pooled over workers).

Nothing here builds or loads anything (see `build.py`): a `CpuKernels` exists only once the
kernels are loaded, so holding one means they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class CpuKernels:
    """The loaded kernels' ops (`torch.ops.tf4ctr.*.default`).

    A frozen dataclass of OpOverloads, so that torch.fx can carry it as an argument of a leaf
    function (TorchRec's pipeline traces the model; fx rebuilds a dataclass from its fields and
    passes op overloads through as they are).
    """

    bn_relu_dropout_forward: Any  # OpOverload
    bn_relu_dropout_backward: Any  # OpOverload
    route_fbgemm_rowwise_adagrad: Any  # OpOverload: (bool on) -> bool, whether it was on before
    # the BatchNorm kernel in halves, for statistics pooled over workers (PooledBatchNormReLUDropout)
    bn_batch_moments: Any  # OpOverload
    bn_relu_dropout_pooled_forward: Any  # OpOverload
    bn_relu_dropout_grad_sums: Any  # OpOverload
    bn_relu_dropout_pooled_backward: Any  # OpOverload

    @classmethod
    def from_namespace(cls, ops: Any) -> "CpuKernels":
        """From `torch.ops.tf4ctr` once the library is loaded."""
        return cls(ops.bn_relu_dropout_forward.default, ops.bn_relu_dropout_backward.default,
                   ops.route_fbgemm_rowwise_adagrad.default, ops.bn_batch_moments.default,
                   ops.bn_relu_dropout_pooled_forward.default, ops.bn_relu_dropout_grad_sums.default,
                   ops.bn_relu_dropout_pooled_backward.default)

    def batch_norm_relu_dropout(self, x: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float, eps: float,
                                drop_levels: int, scale: float, sfc64_state: torch.Tensor) -> torch.Tensor:
        """`BatchNormReLUDropout.apply` with these ops: x (B, N) -> (B, N)."""
        return BatchNormReLUDropout.apply(x, shift, weight, bias, running_mean, running_var, self, momentum, eps,
                                          drop_levels, scale, sfc64_state)

    def pooled_batch_norm_relu_dropout(self, x: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                                       bias: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                                       pool: "StatisticsPool", momentum: float, eps: float, drop_levels: int,
                                       scale: float, sfc64_state: torch.Tensor) -> torch.Tensor:
        """`PooledBatchNormReLUDropout.apply` with these ops: x (B, N) -> (B, N)."""
        return PooledBatchNormReLUDropout.apply(x, shift, weight, bias, running_mean, running_var, self, pool,
                                                momentum, eps, drop_levels, scale, sfc64_state)


class StatisticsPool(Protocol):
    """Where the batch statistics of a pooled BatchNorm come from: every worker holding part of
    the batch calls these in the same order (they are collectives across the workers)."""

    def pool_moments(self, count: int, moments: torch.Tensor) -> tuple[int, torch.Tensor]:
        """This worker's row count and moments ((2, N) float64: column means, column sums of
        squared deviations from them) -> the same of all the workers' rows together."""
        ...

    def pool_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Per-column sums ((2, N) float64) of this worker -> their sum over the workers."""
        ...


class BatchNormReLUDropout(torch.autograd.Function):
    """y = relu(batch_norm(x + shift)) * keep * scale, x (B, N) float32 contiguous, shift (N) the
    preceding Linear's bias (its gradient is zero: BatchNorm cancels it; it moves the running
    mean). Saves x, the ReLU-and-dropout mask ((B, N) uint8) and the batch statistics. `kernels`
    is a `CpuKernels`; the keep lanes are numpy SFC64 words from `sfc64_state` ((4,) int64), as
    `modules.mlp.dropout_keep_mask` draws them; unused when drop_levels is 0."""

    @staticmethod
    def forward(ctx, x, shift, weight, bias, running_mean, running_var, kernels, momentum, eps, drop_levels, scale,
                sfc64_state):  # type: ignore[override]
        y, mean, invstd, mask = kernels.bn_relu_dropout_forward(x, shift, weight, bias, running_mean, running_var,
                                                                momentum, eps, drop_levels, scale, sfc64_state)
        ctx.save_for_backward(x, mask, mean, invstd, weight)
        ctx.shift_grad = shift.requires_grad
        ctx.kernels, ctx.scale = kernels, scale
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, mask, mean, invstd, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = ctx.kernels.bn_relu_dropout_backward(
            grad.contiguous(), x, mask, mean, invstd, weight, ctx.scale)
        grad_shift = torch.zeros_like(mean) if ctx.shift_grad else None
        return grad_x, grad_shift, grad_weight, grad_bias, None, None, None, None, None, None, None, None


class PooledBatchNormReLUDropout(torch.autograd.Function):
    """BatchNormReLUDropout with the batch statistics of every worker's rows together: the
    kernel's statistics pass, ``pool.pool_moments``, its output pass; in backward its sums pass,
    ``pool.pool_sums``, its input-gradient pass. The weight and bias gradients stay this worker's
    sums, which data parallelism averages with every other dense gradient. With a pool of one
    worker (moments and sums returned as they are) the result is BatchNormReLUDropout's, bit for
    bit."""

    @staticmethod
    def forward(ctx, x, shift, weight, bias, running_mean, running_var, kernels, pool, momentum, eps, drop_levels,
                scale, sfc64_state):  # type: ignore[override]
        count, moments = pool.pool_moments(x.shape[0], kernels.bn_batch_moments(x))
        y, mean, invstd, mask = kernels.bn_relu_dropout_pooled_forward(
            x, moments, count, shift, weight, bias, running_mean, running_var, momentum, eps, drop_levels, scale,
            sfc64_state)
        ctx.save_for_backward(x, mask, mean, invstd, weight)
        ctx.shift_grad = shift.requires_grad
        ctx.kernels, ctx.pool, ctx.count, ctx.scale = kernels, pool, count, scale
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, mask, mean, invstd, weight = ctx.saved_tensors
        grad = grad.contiguous()
        own = ctx.kernels.bn_relu_dropout_grad_sums(grad, x, mask, mean, ctx.scale)  # (2, N) float64
        pooled = ctx.pool.pool_sums(own.clone())
        grad_x, grad_weight, grad_bias = ctx.kernels.bn_relu_dropout_pooled_backward(
            grad, x, mask, mean, invstd, weight, own, pooled, ctx.count, ctx.scale)
        grad_shift = torch.zeros_like(mean) if ctx.shift_grad else None
        return (grad_x, grad_shift, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None)
