"""The handle to the compiled kernels that builders pass into the model and the sharding code, and
the autograd Function around the BatchNorm -> ReLU -> dropout kernel.

Nothing here builds or loads anything (see `build.py`): a `CpuKernels` exists only once the
kernels are loaded, so holding one means they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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

    @classmethod
    def from_namespace(cls, ops: Any) -> "CpuKernels":
        """From `torch.ops.tf4ctr` once the library is loaded."""
        return cls(ops.bn_relu_dropout_forward.default, ops.bn_relu_dropout_backward.default,
                   ops.route_fbgemm_rowwise_adagrad.default)

    def batch_norm_relu_dropout(self, x: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float, eps: float,
                                drop_levels: int, scale: float, sfc64_state: torch.Tensor) -> torch.Tensor:
        """`BatchNormReLUDropout.apply` with these ops: x (B, N) -> (B, N)."""
        return BatchNormReLUDropout.apply(x, shift, weight, bias, running_mean, running_var, self, momentum, eps,
                                          drop_levels, scale, sfc64_state)


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
